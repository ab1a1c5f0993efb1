// hive-server: hosts experts of a registered class, announces them in the DHT, batches the
// requests of many clients and trains the experts on every backward. Stops cleanly on SIGINT
// or SIGTERM (writing a last checkpoint when --checkpoint_dir is set).
//
//   hive-server --expert_cls ffn --hidden_dim 512 --num_experts 5 --listen_on 0.0.0.0:1337 [--dht_port 1338]

#include <hive/core/blas.hpp>
#include <hive/moe/server.hpp>

#include "common/cli.hpp"

#include <asio/signal_set.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <csignal>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>
#include <string>

namespace {

constexpr const char* usage = R"(usage: hive-server [options]

Hosts experts (torch modules) for clients anywhere: forward and backward over the network,
requests from many clients merged into batches, each backward an optimizer step. The experts
are announced in the DHT; the server's address doubles as a DHT peer to join through.

experts (one of --num_experts, --expert_pattern, --expert_uids):
  --expert_cls NAME          expert class: ffn, transformer, det_dropout, nop (default ffn)
  --hidden_dim N             expert width (default 1024)
  --num_experts N            serve N experts: expert.0 ... expert.N-1, or N drawn from --expert_pattern
  --expert_pattern P         uids like expert.[0:32].[0:32]: all of them, or --num_experts of them at random
                             (also spelled --uid_space)
  --expert_uids A,B,...      exactly these uids
  --seed N                   seed for drawing uids from a pattern (default: random)

network:
  --listen_on HOST:PORT      where to listen for clients (and DHT peers, unless --dht_port) (default 0.0.0.0:0)
  --dht_port PORT            serve the DHT on this port of the same host, the experts on --listen_on's
  --initial_peers A,B,...    DHT peers to join through (default: start a new swarm)
  --announce_host HOST       host announced instead of a wildcard listen address (default: the host
                             other peers see this one at, else this machine's interface address)
  --update_period SECONDS    how often experts are re-announced (default 30)
  --identity_path FILE       this server's key (Ed25519), created with mode 0600 when missing; its
                             peer id derives from it (default: a new identity each run)

batching and compute:
  --max_batch_size N         most rows per batch (default 4096)
  --min_batch_size N         rows to wait for before running a batch (default 1)
  --max_wait SECONDS         longest wait for min_batch_size rows (default 0.005)
  --compute_threads N        threads running batches (default 1)
  --stats_report_interval S  log batches/s, mean batch size and queues every S seconds (default 0: off)

training:
  --optimizer NAME           sgd, adam or none (default sgd)
  --learning_rate X          (default 0.01)
  --clip_grad_norm X         clip each update's gradient norm (default 0: off)
  --checkpoint_dir DIR       restore the newest checkpoint at start, save every --checkpoint_period and at exit
  --checkpoint_period S      (default 300)

  --config FILE              ServerOptions as JSON (see docs/moe.md); flags given after it override it
  --help                     this text

Flags may also be spelled with dashes (--initial-peers).
)";

using hive::examples::split_commas;

}  // namespace

int main(int argc, char** argv) try {
  hive::net::raise_file_limit();  // a public server has many callers
  if (const auto advice = hive::blas_advice(); !advice.empty()) hive::log::warn("blas", "{}", advice);
  hive::ServerOptions options;
  options.dht().listen_on("0.0.0.0:0");
  hive::moe::BackendOptions backend;
  std::string expert_cls = "ffn", pattern;
  std::int64_t hidden_dim = 1024;
  std::optional<std::size_t> num_experts;
  std::optional<std::uint64_t> seed;
  std::vector<std::string> uids;
  std::optional<std::string> listen_on;
  std::optional<std::uint16_t> dht_port;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = hive::examples::flag_name(argv[i]);
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw hive::InvalidArgument(fmt::format("{} needs a value (see --help)", flag));
      return argv[++i];
    };
    auto seconds = [&] { return hive::Seconds(std::stod(value())); };
    if (flag == "--help" || flag == "-h") {
      std::cout << usage;
      return 0;
    } else if (flag == "--config") {
      options = hive::ServerOptions::from_json_text(hive::examples::read_text_file(value()));
    } else if (flag == "--expert_cls") {
      expert_cls = value();
    } else if (flag == "--hidden_dim") {
      hidden_dim = std::stoll(value());
    } else if (flag == "--num_experts") {
      num_experts = std::stoull(value());
    } else if (flag == "--expert_pattern" || flag == "--uid_space") {
      pattern = value();
    } else if (flag == "--expert_uids") {
      uids = split_commas(value());
    } else if (flag == "--seed") {
      seed = std::stoull(value());
    } else if (flag == "--listen_on") {
      listen_on = value();
    } else if (flag == "--dht_port") {
      const auto port = std::stoul(value());
      if (port > 65535) throw hive::InvalidArgument(fmt::format("--dht_port {} is not a port", port));
      dht_port = static_cast<std::uint16_t>(port);
    } else if (flag == "--initial_peers") {
      for (auto& p : split_commas(value())) options.dht().initial_peers().push_back(p);
    } else if (flag == "--announce_host") {
      options.dht().announce_host(value());
    } else if (flag == "--identity_path") {
      options.dht().rpc().identity_path(value());
    } else if (flag == "--update_period") {
      options.update_period(seconds());
    } else if (flag == "--max_batch_size") {
      options.batching().max_batch_size(std::stoull(value()));
    } else if (flag == "--min_batch_size") {
      options.batching().min_batch_size(std::stoull(value()));
    } else if (flag == "--max_wait") {
      options.batching().max_wait(seconds());
    } else if (flag == "--compute_threads") {
      options.batching().compute_threads(std::stoi(value()));
    } else if (flag == "--stats_report_interval") {
      options.batching().stats_report_interval(seconds());
    } else if (flag == "--optimizer") {
      backend.optimizer(value());
    } else if (flag == "--learning_rate") {
      backend.learning_rate(std::stod(value()));
    } else if (flag == "--clip_grad_norm") {
      backend.clip_grad_norm(std::stod(value()));
    } else if (flag == "--checkpoint_dir") {
      options.checkpoint_dir(value());
    } else if (flag == "--checkpoint_period") {
      options.checkpoint_period(seconds());
    } else {
      throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
    }
  }

  if (listen_on) {
    if (dht_port) {
      // The experts on --listen_on, the DHT on the same host's --dht_port.
      options.listen_on(*listen_on);
      options.dht().listen_on(hive::net::HostPort{hive::net::HostPort::parse(*listen_on).host, *dht_port}.str());
    } else {
      options.dht().listen_on(*listen_on);
    }
  } else if (dht_port) {
    options.dht().listen_on(hive::net::HostPort{"0.0.0.0", *dht_port}.str());
  }

  const int given = !uids.empty() + !pattern.empty();
  if (given > 1) throw hive::InvalidArgument("give either --expert_uids or --expert_pattern, not both");
  if (uids.empty() && !pattern.empty()) {
    uids = hive::dht::expand_uid_pattern(pattern, num_experts, seed.value_or(std::random_device{}()));
  } else if (uids.empty()) {
    if (!num_experts || *num_experts == 0)
      throw hive::InvalidArgument("say which experts to serve: --num_experts, --expert_pattern or --expert_uids");
    for (std::size_t e = 0; e < *num_experts; ++e) uids.push_back(fmt::format("expert.{}", e));
  } else if (num_experts && *num_experts != uids.size()) {
    throw hive::InvalidArgument(fmt::format("--num_experts {} but {} --expert_uids", *num_experts, uids.size()));
  }

  // Signals are taken from the start, so that SIGINT during start-up also stops cleanly.
  asio::io_context signals_io;
  asio::signal_set signals(signals_io, SIGINT, SIGTERM);

  hive::DefaultServer server(hive::moe::make_backends(expert_cls, uids, hidden_dim, backend), options);
  fmt::print("Running a server at {} with {} {} experts (hidden_dim {}): {}\n", server.address(), uids.size(),
             expert_cls, hidden_dim, fmt::join(uids, ", "));
  if (server.dht_address() != server.address()) fmt::print("Its DHT peer listens at {}\n", server.dht_address());
  fmt::print("To join this swarm or call its experts, use --initial_peers {}\n", server.dht_address());
  std::fflush(stdout);

  bool stop = false;
  signals.async_wait([&](std::error_code ec, int signal) {
    if (!ec) fmt::print("received signal {}, shutting down\n", signal);
    stop = true;
  });
  while (!stop) signals_io.run_one();
  server.shutdown();
  fmt::print("stopped\n");
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "hive-server: {}\n", e.what());
  return 1;
}
