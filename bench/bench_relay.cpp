// bench_relay: what a relay costs. The same peer is called directly and through a relay (the
// path a peer behind NAT is reached by), over loopback TCP; the relay runs on a thread of its
// own so that its CPU time is its alone.
//
//   bench_relay [--calls N] [--payload_bytes B] [--bulk_mib M] [--bulk_rounds R] [--receive_cache_mib C]
//
// Latency: N sequential echo calls carrying a B-byte blob (default 4 KiB), direct and relayed;
// p50 and p99 in µs. Bulk: R one-way calls carrying an M MiB blob each (default 16 MiB × 16),
// acknowledged by a tiny reply, direct and relayed; throughput in Gbit/s and the relay's CPU
// time per relayed MiB. C sets every transport's TcpOptions::receive_cache_bytes in MiB (0: off).
// The last line is one JSON object.

#include "common/machine.hpp"
#include "common/transfer.hpp"

#include <hive/net/rpc.hpp>
#include <hive/net/runtime.hpp>
#include <hive/net/tcp.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

using Clock = std::chrono::steady_clock;

namespace {

using Args = hive::bench::TransferArgs;
using hive::bench::percentile;

// CPU seconds the thread `t` has used.
double thread_cpu_seconds(std::thread& t) {
  clockid_t id;
  if (pthread_getcpuclockid(t.native_handle(), &id) != 0) return 0;
  timespec ts{};
  clock_gettime(id, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

using Rpc = hive::net::Rpc<hive::net::Tcp>;

// Sequential echo calls to `address`; round trips in µs.
std::vector<double> latency(Rpc& caller, const std::string& address, int calls, int bytes, const char* what) {
  hive::Message request{nlohmann::json::object(), {}};
  request.add_blob(hive::Buffer::copy_of(std::string(static_cast<std::size_t>(bytes), 'x')));
  for (int i = 0; i < 50; ++i) caller.call(address, "echo", request);  // warm-up: connections, allocator
  std::vector<double> out;
  out.reserve(static_cast<std::size_t>(calls));
  for (int i = 0; i < calls; ++i) {
    const auto t0 = Clock::now();
    caller.call(address, "echo", request);
    out.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    if ((i + 1) % std::max(1, calls / 4) == 0) fmt::print("  {} latency: {}/{} calls\n", what, i + 1, calls);
  }
  return out;
}

// Bulk one-way calls to `address`; seconds in all.
double bulk(Rpc& caller, const std::string& address, int mib, int rounds, const char* what) {
  hive::Message request{nlohmann::json::object(), {}};
  request.add_blob(hive::Buffer::copy_of(std::string(static_cast<std::size_t>(mib) << 20, 'y')));
  caller.call(address, "sink", request);  // warm-up
  const auto t0 = Clock::now();
  for (int r = 0; r < rounds; ++r) {
    caller.call(address, "sink", request);
    if ((r + 1) % std::max(1, rounds / 4) == 0) fmt::print("  {} bulk: {}/{} calls of {} MiB\n", what, r + 1, rounds, mib);
  }
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) try {
  const Args a = hive::bench::parse_transfer_args(argc, argv, "bench_relay", Args{3000, 4096, 16, 16});
  const std::uint64_t frame_limit = (std::uint64_t(a.bulk_mib) << 20) + (1 << 20);
  const auto limits = hive::Limits().max_frame_bytes(frame_limit);
  hive::net::Runtime peers(2);
  // The relay on an io_context and thread of its own.
  asio::io_context relay_io;
  auto guard = asio::make_work_guard(relay_io);
  std::thread relay_thread([&] { relay_io.run(); });  // running before listen(), which waits on it
  auto relay = Rpc::create(relay_io.get_executor(), a.apply(hive::net::Tcp::Options().limits(limits)));
  const auto relay_address = relay->listen("127.0.0.1:0");

  auto target = Rpc::create(peers.executor(), a.apply(hive::net::Tcp::Options().limits(limits)));
  target->add_handler("echo", [](hive::net::CallContext, hive::Message m) -> asio::awaitable<hive::Message> { co_return m; });
  target->add_handler("sink", [](hive::net::CallContext, hive::Message m) -> asio::awaitable<hive::Message> {
    co_return hive::Message{nlohmann::json(m.blobs.empty() ? 0 : m.blobs[0].size()), {}};
  });
  const auto direct = target->listen("127.0.0.1:0");
  const auto relayed = asio::co_spawn(peers.executor(), target->co_reserve(relay_address), asio::use_future).get().address;
  auto caller = Rpc::create(peers.executor(), a.apply(hive::net::Tcp::Options().limits(limits)));
  fmt::print("bench_relay: target {} (direct) and {} (relayed)\n", direct, relayed);

  const auto direct_rtt = latency(*caller, direct, a.calls, a.payload_bytes, "direct");
  const auto relayed_rtt = latency(*caller, relayed, a.calls, a.payload_bytes, "relayed");
  const double direct_s = bulk(*caller, direct, a.bulk_mib, a.bulk_rounds, "direct");
  const double cpu0 = thread_cpu_seconds(relay_thread);
  const double relayed_s = bulk(*caller, relayed, a.bulk_mib, a.bulk_rounds, "relayed");
  const double relay_cpu = thread_cpu_seconds(relay_thread) - cpu0;
  const double relayed_mib = static_cast<double>(a.bulk_mib) * a.bulk_rounds;
  const double bits = relayed_mib * 8.0 * 1024 * 1024;

  const double dp50 = percentile(direct_rtt, 0.5), dp99 = percentile(direct_rtt, 0.99);
  const double rp50 = percentile(relayed_rtt, 0.5), rp99 = percentile(relayed_rtt, 0.99);
  fmt::print("echo {} B: direct p50 {:.1f} us p99 {:.1f} us | relayed p50 {:.1f} us p99 {:.1f} us\n", a.payload_bytes,
             dp50, dp99, rp50, rp99);
  fmt::print("bulk {} x {} MiB: direct {:.2f} Gbit/s | relayed {:.2f} Gbit/s | relay CPU {:.2f} ms per relayed MiB\n",
             a.bulk_rounds, a.bulk_mib, bits / direct_s / 1e9, bits / relayed_s / 1e9, relay_cpu * 1e3 / relayed_mib);

  caller->close();
  target->close();
  relay->close();
  guard.reset();
  relay_thread.join();
  nlohmann::json out = {{"bench", "relay"},
                        {"calls", a.calls},
                        {"payload_bytes", a.payload_bytes},
                        {"direct_p50_us", dp50},
                        {"direct_p99_us", dp99},
                        {"relayed_p50_us", rp50},
                        {"relayed_p99_us", rp99},
                        {"bulk_mib", a.bulk_mib},
                        {"bulk_rounds", a.bulk_rounds},
                        {"direct_gbit_s", bits / direct_s / 1e9},
                        {"relayed_gbit_s", bits / relayed_s / 1e9},
                        {"relay_cpu_ms_per_mib", relay_cpu * 1e3 / relayed_mib},
                        {"relayed_calls", relay->relayed_calls()},
                        {"load_average", hive::bench::load_average()}};
  fmt::print("{}\n", out.dump());
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "bench_relay: {}\n", e.what());
  return 1;
}
