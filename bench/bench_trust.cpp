// bench_trust: what identities cost. Signing and checking one DHT record (the wrapper and
// Ed25519 signature dht::SignatureValidator adds, and its check at a storing peer), and what
// the connection handshake adds to a new connection: in round trips on an emulated network
// with a fixed latency, and in µs over loopback TCP (each against a bare transport connect).
//
//   bench_trust [--records N] [--value_bytes B] [--connections C] [--latency_ms L]
//
// The last line is one JSON object.

#include "common/machine.hpp"

#include <hive/dht/validation.hpp>
#include <hive/net/rpc.hpp>
#include <hive/net/runtime.hpp>
#include <hive/net/simulated.hpp>
#include <hive/net/tcp.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

using Clock = std::chrono::steady_clock;
using namespace hive;

namespace {

struct Args {
  int records = 20000;
  int value_bytes = 100;
  int connections = 200;
  double latency_ms = 20;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        fmt::print(stderr, "bench_trust: {} needs a value\n", flag);
        std::exit(2);
      }
      return argv[++i];
    };
    if (flag == "--records") a.records = std::max(1, std::atoi(value()));
    else if (flag == "--value_bytes") a.value_bytes = std::max(0, std::atoi(value()));
    else if (flag == "--connections") a.connections = std::max(1, std::atoi(value()));
    else if (flag == "--latency_ms") a.latency_ms = std::max(1.0, std::atof(value()));
    else {
      fmt::print(stderr, "usage: bench_trust [--records N] [--value_bytes B] [--connections C] [--latency_ms L]\n");
      std::exit(2);
    }
  }
  return a;
}

double us_since(Clock::time_point t0) { return std::chrono::duration<double, std::micro>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Medians over `n` new callers, in µs: a bare transport connect (no handshake), a connect
// with the handshake (Rpc::co_peer_at), and a call on the connection that then exists.
struct ConnectionCosts {
  double bare_connect = 0, handshake_connect = 0, warm_call = 0;
};

template <class T, class MakePeer, class MakeTransport>
ConnectionCosts connection_costs(MakePeer make, MakeTransport make_transport, const std::string& address, int n) {
  std::vector<double> bare, connect, warm;
  for (int i = 0; i < n; ++i) {
    {
      auto transport = make_transport();
      auto t0 = Clock::now();
      auto conn = asio::co_spawn(transport->get_executor(), transport->connect(address, deadline_after(Seconds(30))),
                                 asio::use_future)
                      .get();
      bare.push_back(us_since(t0));
      asio::post(transport->get_executor(), [conn, transport] {
        conn->close();
        transport->close();
      });
    }
    auto caller = make();
    auto t0 = Clock::now();
    asio::co_spawn(caller->get_executor(), caller->co_peer_at(address, Seconds(30)), asio::use_future).get();
    connect.push_back(us_since(t0));
    t0 = Clock::now();
    caller->call(address, "echo", Message{}, Seconds(30));
    warm.push_back(us_since(t0));
    caller->close();
  }
  return {median(bare), median(connect), median(warm)};
}

asio::awaitable<Message> echo(net::CallContext, Message m) { co_return m; }

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);

  // ---- records ----
  auto identity = std::make_shared<const Identity>(Identity::generate());
  const dht::SignatureValidator signer(identity);
  const dht::SignatureValidator checker;
  const Id160 key = Id160::of("progress");
  const dht::Subkey subkey = identity->owner_marker();
  const dht::Bytes value(static_cast<std::size_t>(args.value_bytes), 0x5a);
  std::vector<dht::Bytes> signed_values;
  signed_values.reserve(static_cast<std::size_t>(args.records));
  auto t0 = Clock::now();
  for (int i = 0; i < args.records; ++i)
    signed_values.push_back(signer.sign(dht::RecordView{key, {}, &subkey, value, 1e9 + i}));
  const double sign_us = us_since(t0) / args.records;
  t0 = Clock::now();
  int valid = 0;
  for (int i = 0; i < args.records; ++i)
    valid += checker.validate(dht::RecordView{key, {}, &subkey, signed_values[static_cast<std::size_t>(i)], 1e9 + i}) ? 1 : 0;
  const double verify_us = us_since(t0) / args.records;
  if (valid != args.records) {
    fmt::print(stderr, "bench_trust: {} of {} signed records failed their check\n", args.records - valid, args.records);
    return 1;
  }
  // The same records again, as when several replicas return one (the validator remembers the
  // signatures it verified): the most recent ones, which it still remembers.
  const int again = std::min<int>(args.records, static_cast<int>(dht::SignatureValidator::verified_cache_entries));
  t0 = Clock::now();
  for (int i = args.records - again; i < args.records; ++i)
    valid += checker.validate(dht::RecordView{key, {}, &subkey, signed_values[static_cast<std::size_t>(i)], 1e9 + i}) ? 1 : 0;
  const double reverify_us = again > 0 ? us_since(t0) / again : 0.0;
  // libsodium's own Ed25519 costs, for the share the wrapper adds.
  const std::vector<std::uint8_t> message(static_cast<std::size_t>(args.value_bytes) + 64, 0x5a);
  std::vector<Signature> signatures(static_cast<std::size_t>(args.records));
  t0 = Clock::now();
  for (auto& sig : signatures) sig = identity->sign(message);
  const double raw_sign_us = us_since(t0) / args.records;
  t0 = Clock::now();
  for (const auto& sig : signatures) valid += verify_signature(identity->public_key(), message, sig) ? 1 : 0;
  const double raw_verify_us = us_since(t0) / args.records;
  if (valid != 2 * args.records + again) {
    fmt::print(stderr, "bench_trust: a record or signature failed its second check\n");
    return 1;
  }
  fmt::print("record ({} B value): sign {:.1f} µs, check {:.1f} µs, sign+check {:.1f} µs; a record checked before {:.1f} µs\n",
             args.value_bytes, sign_us, verify_us, sign_us + verify_us, reverify_us);
  fmt::print("libsodium Ed25519 alone: sign {:.1f} µs, verify {:.1f} µs\n", raw_sign_us, raw_verify_us);

  // ---- handshake on an emulated network: round trips ----
  net::Runtime runtime(2);
  const double rtt_us = 2 * args.latency_ms * 1000;
  auto network = net::SimNetwork::create(
      runtime.executor(),
      net::SimNetworkOptions().latency(net::LatencyDistribution::fixed).mean_latency(Seconds(args.latency_ms / 1000)));
  auto sim_server = net::Rpc<net::Simulated>::create(runtime.executor(), net::Simulated::Options().network(network));
  sim_server->add_handler("echo", echo);
  const auto sim_address = sim_server->listen("10.0.0.1:9000");
  int host = 2;
  const int sim_connections = std::min(args.connections, 20);
  const auto sim = connection_costs<net::Simulated>(
      [&] {
        return net::Rpc<net::Simulated>::create(runtime.executor(),
                                                 net::Simulated::Options().network(network).host(fmt::format("10.0.1.{}", host++)));
      },
      [&] {
        return std::make_shared<net::Simulated>(runtime.executor(),
                                                net::Simulated::Options().network(network).host(fmt::format("10.0.2.{}", host++)));
      },
      sim_address, sim_connections);
  const double handshake_rtts = (sim.handshake_connect - sim.bare_connect) / rtt_us;
  fmt::print("emulated, {} ms one way: connect {:.2f} RTT, connect with the handshake {:.2f} RTT (+{:.2f}), a call {:.2f} RTT\n",
             args.latency_ms, sim.bare_connect / rtt_us, sim.handshake_connect / rtt_us, handshake_rtts, sim.warm_call / rtt_us);
  sim_server->close();

  // ---- handshake over loopback TCP: CPU and latency ----
  auto tcp_server = net::Rpc<net::Tcp>::create(runtime.executor());
  tcp_server->add_handler("echo", echo);
  const auto tcp_address = tcp_server->listen("127.0.0.1:0");
  const auto tcp = connection_costs<net::Tcp>([&] { return net::Rpc<net::Tcp>::create(runtime.executor()); },
                                              [&] { return std::make_shared<net::Tcp>(runtime.executor()); }, tcp_address,
                                              args.connections);
  fmt::print("loopback TCP: connect {:.0f} µs, connect with the handshake {:.0f} µs (+{:.0f}), a call {:.0f} µs\n",
             tcp.bare_connect, tcp.handshake_connect, tcp.handshake_connect - tcp.bare_connect, tcp.warm_call);
  tcp_server->close();

  nlohmann::json out{{"bench", "trust"},
                     {"record_value_bytes", args.value_bytes},
                     {"sign_us", sign_us},
                     {"verify_us", verify_us},
                     {"sign_and_verify_us", sign_us + verify_us},
                     {"reverify_us", reverify_us},
                     {"ed25519_sign_us", raw_sign_us},
                     {"ed25519_verify_us", raw_verify_us},
                     {"emulated_one_way_latency_ms", args.latency_ms},
                     {"emulated_connect_rtts", sim.bare_connect / rtt_us},
                     {"emulated_connect_with_handshake_rtts", sim.handshake_connect / rtt_us},
                     {"handshake_extra_rtts", handshake_rtts},
                     {"emulated_call_rtts", sim.warm_call / rtt_us},
                     {"tcp_connect_us", tcp.bare_connect},
                     {"tcp_connect_with_handshake_us", tcp.handshake_connect},
                     {"tcp_call_us", tcp.warm_call},
                     {"load_average", hive::bench::load_average()}};
  fmt::print("{}\n", out.dump());
}
