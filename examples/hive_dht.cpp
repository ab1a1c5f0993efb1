// hive-dht: a long-running DHT peer. It prints the address others join with, keeps its routing
// table fresh, and stops cleanly on SIGINT or SIGTERM.
//
//   hive-dht [--listen_on HOST:PORT] [--initial_peers A,B,...] [--refresh_period SECONDS]
//            [--announce_host HOST] [--config FILE.json] [--help]

#include <hive/dht/dht.hpp>

#include "common/cli.hpp"

#include <asio/signal_set.hpp>

#include <fmt/format.h>

#include <csignal>
#include <iostream>
#include <sstream>
#include <string>

namespace {

constexpr const char* usage = R"(usage: hive-dht [options]

A long-running hive DHT peer: it prints the address others join with, answers their lookups,
stores its share of the records, and refreshes its routing table.

options:
  --listen_on HOST:PORT      where to listen (default 0.0.0.0:0, a free port)
  --initial_peers A,B,...    peers of an existing swarm to join through (default: start a new one)
  --refresh_period SECONDS   how often stale buckets are refreshed and records purged (default 600)
  --announce_host HOST       host to print instead of a wildcard listen address (default 127.0.0.1)
  --status_period SECONDS    how often to print the routing-table and storage size (default 60, 0: never)
  --config FILE              DHTOptions as JSON (see docs/dht.md); flags override it
  --help                     this text
)";

using hive::examples::split_commas;

}  // namespace

int main(int argc, char** argv) try {
  hive::DHTOptions options;
  double status_period = 60;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw hive::InvalidArgument(fmt::format("{} needs a value (see --help)", flag));
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      std::cout << usage;
      return 0;
    } else if (flag == "--config") {
      options = hive::DHTOptions::from_json_text(hive::examples::read_text_file(value()));
    } else if (flag == "--listen_on") {
      options.listen_on(value());
    } else if (flag == "--initial_peers") {
      for (auto& p : split_commas(value())) options.initial_peers().push_back(p);
    } else if (flag == "--refresh_period") {
      options.node().refresh_period(hive::Seconds(std::stod(value())));
    } else if (flag == "--announce_host") {
      options.announce_host(value());
    } else if (flag == "--status_period") {
      status_period = std::stod(value());
    } else {
      throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
    }
  }

  hive::DHT dht(options);
  const auto addresses = dht.visible_addresses();
  fmt::print("hive-dht peer {} is running\n", dht.peer_id());
  fmt::print("To join this DHT, use --initial_peers {}\n", fmt::join(addresses, ","));
  std::fflush(stdout);

  // Wait for a signal on a small context of our own; print the status now and then.
  asio::io_context signals_io;
  asio::signal_set signals(signals_io, SIGINT, SIGTERM);
  bool stop = false;
  signals.async_wait([&](std::error_code ec, int signal) {
    if (!ec) fmt::print("received signal {}, shutting down\n", signal);
    stop = true;
  });
  asio::steady_timer status(signals_io);
  std::function<void()> schedule = [&] {
    if (status_period <= 0) return;
    status.expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(hive::Seconds(status_period)));
    status.async_wait([&](std::error_code ec) {
      if (ec || stop) return;
      auto node = dht.node();
      auto peers = asio::co_spawn(dht.executor(), node->routing_table_size(), asio::use_future).get();
      auto [stored, cached] = asio::co_spawn(dht.executor(), node->storage_size(), asio::use_future).get();
      fmt::print("routing table: {} peers; storage: {} keys, cache: {} keys\n", peers, stored, cached);
      std::fflush(stdout);
      schedule();
    });
  };
  schedule();
  while (!stop) signals_io.run_one();
  status.cancel();
  dht.shutdown();
  fmt::print("stopped\n");
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "hive-dht: {}\n", e.what());
  return 1;
}
