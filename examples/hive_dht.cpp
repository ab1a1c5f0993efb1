// hive-dht: a long-running DHT peer. It prints the address others join with, keeps its routing
// table fresh, and stops cleanly on SIGINT or SIGTERM. With --store or --get it is instead a
// one-shot client for scripts: it joins, stores or reads one key, prints JSON and exits.
//
//   hive-dht [--listen_on HOST:PORT] [--initial_peers A,B,...] [--refresh_period SECONDS]
//            [--announce_host HOST] [--relay [--max_reservations N] [--max_relayed_calls N]]
//            [--relays A,B,...] [--num_relays N] [--no_relay] [--identity_path FILE]
//            [--config FILE.json] [--help]
//   hive-dht --initial_peers A --store KEY VALUE [--subkey S] [--expiration SECONDS]
//   hive-dht --initial_peers A --get KEY [--latest]

#include <hive/dht/dht.hpp>

#include "common/cli.hpp"

#include <asio/signal_set.hpp>

#include <fmt/format.h>

#include <csignal>
#include <iostream>
#include <optional>
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
  --relay                    a dedicated relay for peers behind NAT: holds up to --max_reservations
                             reservations (default 1024) and forwards up to --max_relayed_calls calls
                             at once (default 4096). Any reachable peer relays within the library's
                             smaller defaults (64 and 256) unless --no_relay
  --max_reservations N       peers this relay holds reservations for at once
  --max_relayed_calls N      calls this relay forwards at once
  --no_relay                 do not relay for others
  --relays A,B,...           relays to reserve at first if this peer turns out to be behind NAT
  --num_relays N             relays to keep reservations at when behind NAT (default 2; 0: a client)
  --identity_path FILE       this peer's key (Ed25519), created with mode 0600 when missing; the peer
                             id derives from it, so keeping the file keeps the id and the records this
                             peer owns (default: a new identity each run)
  --config FILE              DHTOptions as JSON (see docs/dht.md); flags override it
  --help                     this text

one-shot client (joins --initial_peers without listening, prints one JSON line, exits):
  --store KEY VALUE          store VALUE (JSON if it parses as JSON, else a string) under KEY;
                             exit status 0 when a replica accepted it, 1 otherwise
  --subkey S                 store as dictionary entry S (an integer or a string)
  --expiration SECONDS       how long the stored value lives (default 60)
  --get KEY                  read KEY; exit status 0 when found, 1 otherwise
  --latest                   ask all nearest replicas and merge (default: first found)

Flags may also be spelled with dashes (--initial-peers).
)";

/// VALUE as JSON when it parses as JSON, else as a string ("abc" need not be quoted).
nlohmann::json parse_value(const std::string& text) {
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  return j.is_discarded() ? nlohmann::json(text) : j;
}

nlohmann::json subkey_json(const hive::dht::Subkey& s) { return hive::dht::subkey_to_json(s); }

// The one-shot client: returns the exit status.
int one_shot(hive::DHTOptions options, const std::optional<std::pair<std::string, std::string>>& store,
             const std::optional<std::string>& get, const std::optional<std::string>& subkey, double expiration,
             bool latest) {
  options.client_mode(true);
  hive::DHT dht(options);
  if (store) {
    std::optional<hive::dht::Subkey> sk;
    if (subkey) {
      const auto j = parse_value(*subkey);
      sk = hive::dht::subkey_from_json(j.is_number_integer() ? j : nlohmann::json(*subkey));
    }
    const bool ok = dht.store(store->first, parse_value(store->second), hive::wall_time() + expiration, sk);
    nlohmann::json out{{"key", store->first}, {"stored", ok}, {"expiration_s", expiration}};
    if (sk) out["subkey"] = subkey_json(*sk);
    fmt::print("{}\n", out.dump());
    return ok ? 0 : 1;
  }
  const auto record = dht.get(*get, latest);
  nlohmann::json out{{"key", *get}, {"found", record.has_value()}};
  if (record) {
    out["expiration"] = record->expiration;
    if (record->value) {
      out["value"] = record->value->value;
    } else {
      nlohmann::json dict = nlohmann::json::object();
      for (const auto& [s, v] : record->dictionary) {
        const auto name = std::holds_alternative<std::string>(s) ? std::get<std::string>(s) : std::to_string(std::get<std::int64_t>(s));
        dict[name] = v.value;
      }
      out["dictionary"] = std::move(dict);
    }
  }
  fmt::print("{}\n", out.dump());
  return record ? 0 : 1;
}

using hive::examples::split_commas;

}  // namespace

int main(int argc, char** argv) try {
  hive::net::raise_file_limit();  // a public DHT peer has many callers
  hive::DHTOptions options;
  double status_period = 60;
  std::optional<std::pair<std::string, std::string>> store;
  std::optional<std::string> get, subkey;
  double expiration = 60;
  bool latest = false;
  bool dedicated_relay = false;
  std::optional<std::uint32_t> max_reservations, max_relayed_calls;
  auto count = [](const std::string& flag, const std::string& text) {
    const auto n = hive::examples::parse_number<std::int64_t>(flag, text);
    if (n < 1 || n > 1000000) throw hive::InvalidArgument(fmt::format("{} must be in 1..1000000, got {}", flag, n));
    return static_cast<std::uint32_t>(n);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string flag = hive::examples::flag_name(argv[i]);
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
    } else if (flag == "--relay") {
      dedicated_relay = true;
    } else if (flag == "--max_reservations") {
      max_reservations = count(flag, value());
    } else if (flag == "--max_relayed_calls") {
      max_relayed_calls = count(flag, value());
    } else if (flag == "--no_relay") {
      options.rpc().relay(false);
    } else if (flag == "--num_relays") {
      const auto n = hive::examples::parse_number<std::int64_t>(flag, value());
      if (n < 0 || n > 64) throw hive::InvalidArgument(fmt::format("--num_relays must be in 0..64, got {}", n));
      options.node().nat().num_relays(static_cast<std::size_t>(n));
    } else if (flag == "--identity_path") {
      options.rpc().identity_path(value());
    } else if (flag == "--relays") {
      for (auto& p : split_commas(value())) options.node().nat().relays().push_back(p);
    } else if (flag == "--store") {
      auto key = value();
      store = std::pair{key, value()};
    } else if (flag == "--subkey") {
      subkey = value();
    } else if (flag == "--expiration") {
      expiration = std::stod(value());
    } else if (flag == "--get") {
      get = value();
    } else if (flag == "--latest") {
      latest = true;
    } else {
      throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
    }
  }

  if (store && get) throw hive::InvalidArgument("give --store or --get, not both");
  if (dedicated_relay && !options.rpc().relay()) throw hive::InvalidArgument("give --relay or --no_relay, not both");
  if (dedicated_relay) {
    options.rpc().max_relay_reservations(max_reservations.value_or(1024)).max_relayed_calls(max_relayed_calls.value_or(4096));
  } else {
    if (max_reservations) options.rpc().max_relay_reservations(*max_reservations);
    if (max_relayed_calls) options.rpc().max_relayed_calls(*max_relayed_calls);
  }
  if (store || get) {
    if (options.initial_peers().empty()) throw hive::InvalidArgument("--store and --get need --initial_peers");
    return one_shot(options, store, get, subkey, expiration, latest);
  }

  hive::DHT dht(options);
  const auto addresses = dht.visible_addresses();
  fmt::print("hive-dht peer {} is running, identity {}{}\n", dht.peer_id(), dht.identity().peer_id(),
             options.rpc().identity_path().empty() ? " (new this run)" : fmt::format(" (from {})", options.rpc().identity_path()));
  auto node = dht.node();
  fmt::print("Reachability: {}\n", hive::net::to_string(node->reachability()));
  if (node->reachability() == hive::net::Reachability::unreachable)
    fmt::print("This peer is behind NAT: {}\n",
               addresses.empty() ? std::string("no relay took a reservation, it takes part as a client")
                                 : fmt::format("others reach it through relays at {}", fmt::join(addresses, ", ")));
  if (dedicated_relay)
    fmt::print("Relaying for up to {} peers behind NAT, {} calls at once\n", options.rpc().max_relay_reservations(),
               options.rpc().max_relayed_calls());
  if (addresses.empty())
    fmt::print("Nobody can join through this peer (it has no reachable address)\n");
  else
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
      auto peers = asio::co_spawn(dht.executor(), node->routing_table_size(), asio::use_future).get();
      auto [stored, cached] = asio::co_spawn(dht.executor(), node->storage_size(), asio::use_future).get();
      const auto relayed = node->relayed_addresses();
      fmt::print("routing table: {} peers; storage: {} keys, cache: {} keys; {}{}; relaying for {} peers, {} calls relayed\n",
                 peers, stored, cached, hive::net::to_string(node->reachability()),
                 relayed.empty() ? std::string() : fmt::format(" (through {})", fmt::join(relayed, ", ")),
                 node->rpc()->relay_reservations(), node->rpc()->relayed_calls());
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
