// bench_rpc: RPC latency and bulk throughput over loopback TCP, beside the same bytes through a
// bare Asio socket pair, so that hive's overhead reads as a ratio.
//
//   bench_rpc [--calls N] [--bulk_mib M] [--bulk_rounds R] [--payload_bytes B] [--receive_cache_mib C]
//
// Latency: N sequential echo calls carrying a B-byte blob (default 4 KiB); p50 and p99 in µs.
// Bulk: R one-way sends of an M MiB float32 tensor (default 64 MiB), encoded and decoded by the
// tensor codec, each acknowledged by a tiny reply; throughput in Gbit/s. The bare socket reads
// each into a fresh buffer; hive's transports reuse their large-body buffers up to C MiB
// (TcpOptions::receive_cache_bytes, default 256; 0 allocates every body afresh too).
// Both are measured on plaintext connections (RpcOptions::encrypt off) and on encrypted ones
// (the default; the cipher both sides prefer, docs/protocol.md "Encryption").
// The last line is one JSON object.

#include "common/transfer.hpp"

#include <hive/core/tensor_codec.hpp>
#include <hive/net/rpc.hpp>
#include <hive/net/runtime.hpp>
#include <hive/net/tcp.hpp>

#include <ATen/ops/randn.h>
#include <asio/ip/tcp.hpp>
#include <asio/read.hpp>
#include <asio/write.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

using Args = hive::bench::TransferArgs;
using hive::bench::percentile;

// ---- the bare socket baseline ---------------------------------------------------------------

struct RawResult {
  std::vector<double> rtt_us;
  double bulk_seconds = 0;
};

// Echo server for the latency run: reads a fixed-size message, writes it back.
asio::awaitable<void> raw_echo_server(asio::ip::tcp::acceptor& acceptor, std::size_t size, std::size_t bulk_bytes,
                                      int rounds) {
  auto socket = co_await acceptor.async_accept(asio::use_awaitable);
  socket.set_option(asio::ip::tcp::no_delay(true));
  std::vector<std::byte> buf(size);
  for (;;) {
    std::uint8_t tag;
    co_await asio::async_read(socket, asio::buffer(&tag, 1), asio::use_awaitable);
    if (tag == 0) {
      co_await asio::async_read(socket, asio::buffer(buf), asio::use_awaitable);
      co_await asio::async_write(socket, asio::buffer(buf), asio::use_awaitable);
    } else if (tag == 1) {
      // A fresh buffer per message, as a receiver that keeps the data must have.
      auto big = std::make_unique_for_overwrite<std::byte[]>(bulk_bytes);
      co_await asio::async_read(socket, asio::buffer(big.get(), bulk_bytes), asio::use_awaitable);
      std::uint64_t ack = bulk_bytes;
      co_await asio::async_write(socket, asio::buffer(&ack, 8), asio::use_awaitable);
    } else {
      co_return;
    }
  }
  (void)rounds;
}

RawResult run_raw(const Args& a) {
  RawResult r;
  asio::io_context server_io, client_io;
  asio::ip::tcp::acceptor acceptor(server_io, {asio::ip::make_address("127.0.0.1"), 0});
  const auto port = acceptor.local_endpoint().port();
  const std::size_t bulk_bytes = std::size_t(a.bulk_mib) << 20;
  asio::co_spawn(server_io, raw_echo_server(acceptor, a.payload_bytes, bulk_bytes, a.bulk_rounds), asio::detached);
  std::thread server([&] { server_io.run(); });
  asio::co_spawn(
      client_io,
      [&]() -> asio::awaitable<void> {
        asio::ip::tcp::socket s(client_io);
        co_await s.async_connect({asio::ip::make_address("127.0.0.1"), port}, asio::use_awaitable);
        s.set_option(asio::ip::tcp::no_delay(true));
        std::vector<std::byte> out(a.payload_bytes, std::byte{7}), in(a.payload_bytes);
        std::uint8_t tag = 0;
        for (int i = 0; i < a.calls; ++i) {
          auto t0 = Clock::now();
          std::array<asio::const_buffer, 2> bufs{asio::buffer(&tag, 1), asio::buffer(out)};
          co_await asio::async_write(s, bufs, asio::use_awaitable);
          co_await asio::async_read(s, asio::buffer(in), asio::use_awaitable);
          r.rtt_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        }
        std::vector<std::byte> big(bulk_bytes, std::byte{1});
        tag = 1;
        auto t0 = Clock::now();
        for (int i = 0; i < a.bulk_rounds; ++i) {
          std::array<asio::const_buffer, 2> bufs{asio::buffer(&tag, 1), asio::buffer(big)};
          co_await asio::async_write(s, bufs, asio::use_awaitable);
          std::uint64_t ack;
          co_await asio::async_read(s, asio::buffer(&ack, 8), asio::use_awaitable);
        }
        r.bulk_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
        tag = 2;
        co_await asio::async_write(s, asio::buffer(&tag, 1), asio::use_awaitable);
      },
      asio::detached);
  client_io.run();
  server.join();
  return r;
}

// ---- hive RPC ------------------------------------------------------------------------------

struct RpcResult {
  std::vector<double> rtt_us;
  double bulk_seconds = 0;
};

RpcResult run_rpc(const Args& a, bool encrypt) {
  RpcResult r;
  hive::net::Runtime server_rt(1), client_rt(1);
  using Rpc = hive::net::Rpc<hive::net::Tcp>;
  const auto options = hive::net::RpcOptions().encrypt(encrypt);
  auto server = Rpc::create(server_rt.executor(), a.apply(hive::net::Tcp::Options()), options);
  auto client = Rpc::create(client_rt.executor(), a.apply(hive::net::Tcp::Options()), options);
  server->add_handler("echo", [](hive::net::CallContext, hive::Message m) -> asio::awaitable<hive::Message> {
    co_return m;
  });
  server->add_handler("sink", [](hive::net::CallContext, hive::Message m) -> asio::awaitable<hive::Message> {
    auto t = hive::get_tensors(m);
    co_return hive::Message{nlohmann::json(t.at(0).numel()), {}};
  });
  const auto address = server->listen("127.0.0.1:0");
  const std::size_t bulk_elems = (std::size_t(a.bulk_mib) << 20) / sizeof(float);
  auto big = at::randn({static_cast<std::int64_t>(bulk_elems)});
  auto done = asio::co_spawn(
      client->get_executor(),
      [&]() -> asio::awaitable<void> {
        hive::Message m;
        m.add_blob(hive::Buffer::adopt(std::vector<std::byte>(a.payload_bytes, std::byte{7})));
        for (int i = 0; i < a.calls; ++i) {
          auto t0 = Clock::now();
          auto reply = co_await client->co_call(address, "echo", m, 10s);
          r.rtt_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
          if (reply.blobs.size() != 1) throw std::runtime_error("echo lost its payload");
        }
        auto t0 = Clock::now();
        for (int i = 0; i < a.bulk_rounds; ++i) {
          hive::Message bulk;
          hive::add_tensors(bulk, {big});
          auto reply = co_await client->co_call(address, "sink", std::move(bulk), 60s);
          if (reply.header.get<std::size_t>() != bulk_elems) throw std::runtime_error("sink lost elements");
        }
        r.bulk_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      },
      asio::use_future);
  done.get();
  client->close();
  server->close();
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = hive::bench::parse_transfer_args(argc, argv, "bench_rpc", Args{});
  fmt::print("bench_rpc: {} echo calls of {} B, {} bulk sends of {} MiB over loopback TCP\n", a.calls,
             a.payload_bytes, a.bulk_rounds, a.bulk_mib);
  // Warm-up runs so that page faults and connection set-up do not skew the first figures.
  run_raw(Args{200, a.payload_bytes, a.bulk_mib, 1});
  run_rpc(Args{200, a.payload_bytes, a.bulk_mib, 1, a.receive_cache_mib}, false);
  run_rpc(Args{200, a.payload_bytes, a.bulk_mib, 1, a.receive_cache_mib}, true);
  const auto raw = run_raw(a);
  const auto rpc = run_rpc(a, false);
  const auto sealed = run_rpc(a, true);
  const std::string cipher = hive::net::local_ciphers().front();
  const double bulk_bits = 8.0 * static_cast<double>(std::size_t(a.bulk_mib) << 20) * a.bulk_rounds;
  const double raw_gbps = bulk_bits / raw.bulk_seconds / 1e9;
  const double rpc_gbps = bulk_bits / rpc.bulk_seconds / 1e9;
  const double p50 = percentile(rpc.rtt_us, 0.5), p99 = percentile(rpc.rtt_us, 0.99);
  const double raw_p50 = percentile(raw.rtt_us, 0.5), raw_p99 = percentile(raw.rtt_us, 0.99);
  const double enc_gbps = bulk_bits / sealed.bulk_seconds / 1e9;
  const double enc_p50 = percentile(sealed.rtt_us, 0.5), enc_p99 = percentile(sealed.rtt_us, 0.99);
  fmt::print("echo {} B   hive p50 {:.1f} us  p99 {:.1f} us | bare socket p50 {:.1f} us  p99 {:.1f} us | ratio {:.2f}\n",
             a.payload_bytes, p50, p99, raw_p50, raw_p99, p50 / raw_p50);
  fmt::print("bulk {} MiB hive {:.2f} Gbit/s | bare socket {:.2f} Gbit/s | ratio {:.2f}\n", a.bulk_mib, rpc_gbps,
             raw_gbps, rpc_gbps / raw_gbps);
  fmt::print("encrypted ({}): echo p50 {:.1f} us  p99 {:.1f} us | bulk {:.2f} Gbit/s, ratio to bare socket {:.2f}\n", cipher,
             enc_p50, enc_p99, enc_gbps, enc_gbps / raw_gbps);
  nlohmann::json out = {{"bench", "rpc"},           {"calls", a.calls},
                        {"payload_bytes", a.payload_bytes},
                        {"p50_us", p50},            {"p99_us", p99},
                        {"raw_p50_us", raw_p50},    {"raw_p99_us", raw_p99},
                        {"p50_vs_raw", p50 / raw_p50},
                        {"bulk_mib", a.bulk_mib},   {"bulk_rounds", a.bulk_rounds},
                        {"bulk_gbps", rpc_gbps},    {"raw_gbps", raw_gbps},
                        {"bulk_vs_raw", rpc_gbps / raw_gbps},
                        {"cipher", cipher},         {"p50_us_encrypted", enc_p50},
                        {"p99_us_encrypted", enc_p99},
                        {"bulk_gbps_encrypted", enc_gbps},
                        {"bulk_vs_raw_encrypted", enc_gbps / raw_gbps},
                        {"receive_cache_bytes", a.apply(hive::net::Tcp::Options()).receive_cache_bytes()}};
  fmt::print("{}\n", out.dump());
}
