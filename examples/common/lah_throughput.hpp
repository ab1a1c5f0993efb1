#pragma once
// The Learning@home throughput experiment (examples/learning_at_home_throughput.cpp): trainers
// push batches through L layers of remote experts spread over several servers, against a
// model-parallel pipeline over the same layers, as the per-hop latency grows. Shared with
// tests/torch/test_lah_throughput.cpp so that the test runs the program's own code.
//
// Layout, as in the testbed's throughput_client.py: layer l's experts are "expert.l.e"
// (e < experts_per_layer); expert (l, e) lives on server (l + e) mod S, so consecutive layers
// sit on different servers ("interleaved", like the testbed's zip over hosts).
//
// What one hop costs (a hop is one message between two machines, one way, latency λ):
// - DMoE: a trainer calls each layer's expert, a request and a reply: 2 hops per layer forward,
//   2 more backward.
// - Pipeline: the activation goes from the server of layer l straight to the server of layer
//   l + 1: 1 hop per layer forward, 1 backward. hive's servers do not forward to each other, so
//   one driver relays the activations; on the emulator its network has λ/2 per message (a
//   relayed layer then costs one λ round trip, like the direct hop it stands for).
// On the emulator the latency is the network's (SimNetworkOptions min/max latency); over TCP,
// where loopback has none to speak of, the stream sleeps the hops' time after each layer and
// again when the gradient passes back, as the testbed's clients did (time.sleep per layer).

#include "cli.hpp"

#include <hive/moe/experts.hpp>
#include <hive/moe/remote_expert.hpp>
#include <hive/moe/server.hpp>
#include <hive/net/simulated.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace hive::examples::lah_throughput {

/// How batches cross the layers.
enum class Mode {
  dmoe,      ///< many trainers at once, each calling every layer's expert
  pipeline,  ///< one batch at a time passed from server to server (model parallelism)
};

/// "dmoe" or "pipeline".
inline const char* mode_name(Mode mode) { return mode == Mode::dmoe ? "dmoe" : "pipeline"; }

/// The expert classes a layer may be made of: one tensor in, one tensor of the same shape out.
inline const std::vector<std::string>& block_types() {
  static const std::vector<std::string> names = {"ffn", "transformer", "nop"};
  return names;
}

/// The experiment's knobs (the flags of learning_at_home_throughput).
struct Config {
  /// Servers ("GPUs") on the emulator; over TCP, the number of --hosts.
  std::int64_t servers = 4;
  /// Layers per server (the testbed's --layers-per-gpu): the model has servers x this many.
  std::int64_t layers_per_server = 2;
  /// Experts per layer; a DMoE trainer picks one of them at random per layer and batch, the
  /// pipeline always uses expert 0.
  std::int64_t experts_per_layer = 1;
  /// Width of every block.
  std::int64_t hidden_dim = 512;
  /// Block type (ffn, transformer, nop).
  std::string block = "ffn";
  /// Rows per batch.
  std::int64_t batch_size = 16;
  /// Concurrent DMoE trainers (-j).
  int trainers = 32;
  /// Measured batches per trainer, and of the pipeline (after one warm-up batch each).
  int batches = 4;
  /// Measurements per latency and mode (their mean is reported).
  int runs = 1;
  /// One-way per-hop latencies to measure, in milliseconds.
  std::vector<double> latencies_ms = {0, 10, 50, 100, 200};
  /// Forward and backward (each backward an update on the server); false: forward only, as the testbed's clients.
  bool backward = true;
  /// Expert servers reached over TCP ("host:port"); empty runs everything on the emulator.
  std::vector<std::string> hosts;
  /// Longest one measurement may take; a measurement cut short is reported as incomplete.
  double timeout_s = 600;
  /// Seed of the inputs, the experts and the random expert choices.
  std::uint64_t seed = 0;

  /// Number of layers.
  [[nodiscard]] std::int64_t layers() const { return servers * layers_per_server; }
  /// Experts each server hosts.
  [[nodiscard]] std::int64_t experts_per_server() const { return layers_per_server * experts_per_layer; }
  /// True when the servers are emulated in this process.
  [[nodiscard]] bool emulated() const { return hosts.empty(); }

  /// Throws hive::InvalidArgument naming the first knob that makes no sense.
  void validate() const {
    HIVE_CHECK(std::find(block_types().begin(), block_types().end(), block) != block_types().end(),
               "unknown block type '{}' (known: {})", block, fmt::join(block_types(), ", "));
    HIVE_CHECK(servers >= 1 && layers_per_server >= 1 && experts_per_layer >= 1,
               "--servers, --layers_per_server and --experts_per_layer must be at least 1");
    HIVE_CHECK(hidden_dim >= 1 && batch_size >= 1, "--hidden_dim and --batch_size must be at least 1");
    HIVE_CHECK(trainers >= 1 && batches >= 1 && runs >= 1, "--trainers, --batches and --runs must be at least 1");
    HIVE_CHECK(!latencies_ms.empty(), "--latencies needs at least one value");
    for (double ms : latencies_ms)
      HIVE_CHECK(std::isfinite(ms) && ms >= 0 && ms <= 60'000, "latency {} ms is not in [0, 60000]", ms);
    HIVE_CHECK(std::isfinite(timeout_s) && timeout_s > 0, "--timeout must be positive");
    HIVE_CHECK(layers() * experts_per_layer <= 100'000, "{} layers x {} experts is too many experts",
               layers(), experts_per_layer);
    for (const auto& h : hosts) (void)net::HostPort::parse(h);
  }
};

namespace detail {

/// `text` as an int within +-1e6 (counts of threads, batches, runs).
inline int parse_small(const std::string& flag, const std::string& text) {
  const auto v = parse_number<std::int64_t>(flag, text);
  HIVE_CHECK(v >= -1'000'000 && v <= 1'000'000, "{} {} is out of range", flag, v);
  return static_cast<int>(v);
}

}  // namespace detail

/// The flags the program reads besides the Config's.
struct Flags {
  /// The experiment.
  Config config;
  /// Directory of throughput.csv, throughput.png and the gnuplot script.
  std::string out = "lah_throughput";
  /// Whether to draw the PNG (needs gnuplot).
  bool plot = true;
  /// Whether --help was asked for.
  bool help = false;
};

/// Parses the command line (argv[0] skipped); throws hive::InvalidArgument for an unknown
/// flag, a missing or malformed value, or a Config that fails validate().
inline Flags parse_flags(const std::vector<std::string>& args) {
  Flags f;
  Config& c = f.config;
  bool servers_given = false;
  std::optional<std::int64_t> layers;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string flag = flag_name(args[i]);
    if (flag == "--help" || flag == "-h") {
      f.help = true;
      return f;
    }
    if (flag == "--no_plot") {
      f.plot = false;
      continue;
    }
    if (flag == "--forward_only") {
      c.backward = false;
      continue;
    }
    HIVE_CHECK(i + 1 < args.size(), "{} needs a value (see --help)", flag);
    const std::string value = args[++i];
    if (flag == "--servers") {
      c.servers = parse_number<std::int64_t>(flag, value);
      servers_given = true;
    } else if (flag == "--layers") {
      layers = parse_number<std::int64_t>(flag, value);
    } else if (flag == "--layers_per_server") {
      c.layers_per_server = parse_number<std::int64_t>(flag, value);
    } else if (flag == "--experts_per_layer") {
      c.experts_per_layer = parse_number<std::int64_t>(flag, value);
    } else if (flag == "--hidden_dim") {
      c.hidden_dim = parse_number<std::int64_t>(flag, value);
    } else if (flag == "--block" || flag == "--block_type") {
      c.block = value;
    } else if (flag == "--batch_size") {
      c.batch_size = parse_number<std::int64_t>(flag, value);
    } else if (flag == "--trainers" || flag == "-j" || flag == "--jobs") {
      c.trainers = detail::parse_small(flag, value);
    } else if (flag == "--batches") {
      c.batches = detail::parse_small(flag, value);
    } else if (flag == "--runs") {
      c.runs = detail::parse_small(flag, value);
    } else if (flag == "--latencies") {
      c.latencies_ms.clear();
      for (const auto& part : split_commas(value)) c.latencies_ms.push_back(parse_number<double>(flag, part));
    } else if (flag == "--hosts") {
      c.hosts = split_commas(value);
      HIVE_CHECK(!c.hosts.empty(), "--hosts needs at least one host:port");
    } else if (flag == "--timeout") {
      c.timeout_s = parse_number<double>(flag, value);
    } else if (flag == "--seed") {
      const auto seed = parse_number<std::int64_t>(flag, value);
      HIVE_CHECK(seed >= 0, "--seed must not be negative");
      c.seed = static_cast<std::uint64_t>(seed);
    } else if (flag == "--out") {
      HIVE_CHECK(!value.empty(), "--out needs a directory");
      f.out = value;
    } else {
      throw InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
    }
  }
  if (!c.hosts.empty()) {
    HIVE_CHECK(!servers_given || c.servers == static_cast<std::int64_t>(c.hosts.size()),
               "--servers {} but {} --hosts: over TCP every host is one server", c.servers, c.hosts.size());
    c.servers = static_cast<std::int64_t>(c.hosts.size());
  }
  if (layers) {
    HIVE_CHECK(*layers >= 1 && c.servers >= 1 && *layers % c.servers == 0,
               "--layers {} must be a positive multiple of the {} servers (each holds as many)", *layers, c.servers);
    c.layers_per_server = *layers / c.servers;
  }
  c.validate();
  return f;
}

/// The uid of expert `e` of layer `layer`: "expert.<layer>.<e>".
inline std::string expert_uid(std::int64_t layer, std::int64_t e) { return fmt::format("expert.{}.{}", layer, e); }

/// The index of the server hosting expert `e` of layer `layer` among `servers`.
inline std::size_t server_of(std::int64_t layer, std::int64_t e, std::int64_t servers) {
  return static_cast<std::size_t>((layer + e) % servers);
}

/// The uids server `s` hosts.
inline std::vector<std::string> uids_of_server(const Config& c, std::int64_t s) {
  std::vector<std::string> uids;
  for (std::int64_t l = 0; l < c.layers(); ++l)
    for (std::int64_t e = 0; e < c.experts_per_layer; ++e)
      if (server_of(l, e, c.servers) == static_cast<std::size_t>(s)) uids.push_back(expert_uid(l, e));
  return uids;
}

/// The hive-server pattern naming every expert of the model ("expert.[0:L].[0:E]").
inline std::string uid_pattern(const Config& c) {
  return fmt::format("expert.[0:{}].[0:{}]", c.layers(), c.experts_per_layer);
}

/// What the hops of one mode cost at one-way latency `latency`.
struct HopCost {
  /// One-way latency of every message on the emulated network (unused over TCP).
  Seconds network{0};
  /// Time a stream sleeps after each layer, forward and backward (TCP only).
  Seconds per_layer{0};
};

/// One-way hops a layer costs `mode`: a request and its reply, or one direct hop.
inline double hops_per_layer(Mode mode) { return mode == Mode::dmoe ? 2.0 : 1.0; }

/// The cost of the hops of `mode` at one-way latency `latency`, on the emulator or over TCP.
inline HopCost hop_cost(Mode mode, Seconds latency, bool emulated) {
  if (emulated) return {mode == Mode::dmoe ? latency : latency / 2, Seconds(0)};
  return {Seconds(0), latency * hops_per_layer(mode)};
}

/// The least time one batch of one stream spends on hops at one-way latency `latency`:
/// layers x hops per layer x latency, twice with the backward pass.
inline Seconds latency_floor(const Config& c, Mode mode, Seconds latency) {
  return latency * (static_cast<double>(c.layers()) * hops_per_layer(mode) * (c.backward ? 2.0 : 1.0));
}

/// The expert servers of one measurement, emulated in this process (one network, one Server
/// per "GPU", each hosting its share of the layers).
class EmulatedServers {
 public:
  /// Starts `c.servers` servers on a network that delays every message by `latency`.
  EmulatedServers(const Config& c, Seconds latency, std::uint64_t seed)
      : network_(net::SimNetwork::create(
            runtime_.executor(), net::SimNetworkOptions().min_latency(latency).max_latency(latency).seed(seed))) {
    at::manual_seed(seed);
    for (std::int64_t s = 0; s < c.servers; ++s) {
      auto options = ServerOptions()
                         .dht(DHTOptions().listen_on("127.0.0.1:0"))
                         .update_period(Seconds(3600))
                         .batching(moe::BatcherOptions().compute_threads(1));
      servers_.push_back(std::make_unique<Server<net::Simulated>>(
          moe::make_backends(c.block, uids_of_server(c, s), c.hidden_dim), options,
          net::SimulatedOptions().network(network_)));
      addresses_.push_back(servers_.back()->address());
    }
    client_ = std::make_shared<moe::Client<net::Simulated>>(net::SimulatedOptions().network(network_));
  }
  EmulatedServers(const EmulatedServers&) = delete;
  EmulatedServers& operator=(const EmulatedServers&) = delete;
  /// Stops the client and the servers before the network's runtime.
  ~EmulatedServers() {
    client_.reset();
    for (auto& s : servers_) s->shutdown();
    servers_.clear();
  }

  /// Each server's address, by index.
  [[nodiscard]] const std::vector<std::string>& addresses() const noexcept { return addresses_; }
  /// The client the trainers call the experts with.
  [[nodiscard]] std::shared_ptr<moe::ExpertClient> client() const { return client_; }
  /// The emulated network.
  [[nodiscard]] const std::shared_ptr<net::SimNetwork>& network() const noexcept { return network_; }

 private:
  net::Runtime runtime_{1};
  std::shared_ptr<net::SimNetwork> network_;
  std::vector<std::unique_ptr<Server<net::Simulated>>> servers_;
  std::vector<std::string> addresses_;
  std::shared_ptr<moe::Client<net::Simulated>> client_;
};

/// The result of one measurement.
struct Measurement {
  Mode mode = Mode::dmoe;        ///< how batches crossed the layers
  double latency_ms = 0;         ///< one-way per-hop latency
  int streams = 0;               ///< concurrent trainers (1 for the pipeline)
  std::int64_t batches = 0;      ///< measured batches, all streams together
  std::int64_t samples = 0;      ///< rows of those batches
  double elapsed_s = 0;          ///< wall time from the common start to the last stream's end
  double samples_per_s = 0;      ///< samples / elapsed_s
  double batch_s = 0;            ///< mean time of one batch in one stream
  bool complete = true;          ///< false when the timeout cut it short
};

/// Pushes batches through the layers served at `addresses` (index = server), as `mode` does:
/// for DMoE `c.trainers` concurrent streams, for the pipeline one. Each stream runs one
/// warm-up batch, waits for the others, then `c.batches` measured batches (fewer when
/// `c.timeout_s` runs out). Throws the first failure of any stream, naming it.
inline Measurement measure(const Config& c, Mode mode, double latency_ms, const std::vector<std::string>& addresses,
                           const std::shared_ptr<moe::ExpertClient>& client, Seconds per_layer_delay) {
  using Clock = std::chrono::steady_clock;
  HIVE_CHECK(static_cast<std::int64_t>(addresses.size()) == c.servers, "{} addresses for {} servers",
             addresses.size(), c.servers);
  const int streams = mode == Mode::dmoe ? c.trainers : 1;
  const auto sample = moe::ExpertRegistry::global().get(c.block).sample_inputs;
  const auto timeouts = moe::RemoteExpertOptions()
                            .forward_timeout(Seconds(std::max(30.0, c.timeout_s)))
                            .backward_timeout(Seconds(std::max(60.0, c.timeout_s)));
  const auto delay = std::chrono::duration_cast<Clock::duration>(per_layer_delay);

  std::latch start(streams + 1);
  std::mutex mutex;
  std::exception_ptr failure;
  std::string failure_where;
  std::vector<std::int64_t> done(static_cast<std::size_t>(streams), 0);
  std::vector<double> busy_s(static_cast<std::size_t>(streams), 0);
  Clock::time_point deadline;  // set before the latch releases the streams

  auto stream = [&](int index) {
    std::mt19937_64 rng(c.seed * 1'000'003 + static_cast<std::uint64_t>(index) + 1);
    std::uniform_int_distribution<std::int64_t> pick(0, c.experts_per_layer - 1);
    std::vector<std::vector<moe::RemoteExpert>> experts(static_cast<std::size_t>(c.layers()));
    std::vector<at::Tensor> input;
    std::string where = "setting up";
    auto one_batch = [&] {
      std::optional<at::NoGradGuard> no_grad;
      if (!c.backward) no_grad.emplace();
      at::Tensor x = input.at(0);
      for (std::int64_t l = 0; l < c.layers(); ++l) {
        const std::int64_t e = mode == Mode::dmoe ? pick(rng) : 0;
        auto& expert = experts[static_cast<std::size_t>(l)][static_cast<std::size_t>(e)];
        where = fmt::format("{} at {}", expert->uid(), expert->address());
        x = expert(x);
        if (delay > Clock::duration::zero()) {
          std::this_thread::sleep_for(delay);
          if (c.backward) x.register_hook([delay](const at::Tensor&) { std::this_thread::sleep_for(delay); });
        }
      }
      if (c.backward) {
        // A loss bounded below, so that experts trained for a whole run stay finite (the mean
        // of the output, unbounded, drove them to NaN over TCP, where servers live across runs).
        where = "the backward pass";
        x.square().mean().backward();
      }
    };
    auto fail = [&](std::string what) {
      std::lock_guard lock(mutex);
      if (!failure) {
        failure = std::current_exception();
        failure_where = std::move(what);
      }
    };
    try {
      for (std::int64_t l = 0; l < c.layers(); ++l)
        for (std::int64_t e = 0; e < c.experts_per_layer; ++e)
          experts[static_cast<std::size_t>(l)].emplace_back(expert_uid(l, e), addresses[server_of(l, e, c.servers)],
                                                              client, timeouts);
      input = sample(c.batch_size, c.hidden_dim);
      one_batch();
    } catch (const std::exception&) {
      fail(fmt::format("{} stream {}, warm-up batch, {}", mode_name(mode), index, where));
    }
    start.arrive_and_wait();
    {
      std::lock_guard lock(mutex);
      if (failure) return;
    }
    for (int b = 0; b < c.batches && Clock::now() < deadline; ++b) {
      const auto t0 = Clock::now();
      try {
        one_batch();
      } catch (const std::exception&) {
        fail(fmt::format("{} stream {}, batch {}, {}", mode_name(mode), index, b, where));
        return;
      }
      busy_s[static_cast<std::size_t>(index)] += std::chrono::duration<double>(Clock::now() - t0).count();
      ++done[static_cast<std::size_t>(index)];
    }
  };

  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(streams));
  for (int i = 0; i < streams; ++i) threads.emplace_back(stream, i);
  // The clock starts once every stream has made its warm-up batch (connections, first
  // allocations); the deadline counts the warm-up too.
  deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(Seconds(c.timeout_s));
  start.arrive_and_wait();
  const auto t0 = Clock::now();
  for (auto& t : threads) t.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  if (failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}: {}", failure_where, e.what()));
    }
  }

  Measurement m;
  m.mode = mode;
  m.latency_ms = latency_ms;
  m.streams = streams;
  double busy = 0;
  for (int i = 0; i < streams; ++i) {
    m.batches += done[static_cast<std::size_t>(i)];
    busy += busy_s[static_cast<std::size_t>(i)];
  }
  m.samples = m.batches * c.batch_size;
  m.elapsed_s = elapsed;
  m.samples_per_s = elapsed > 0 ? static_cast<double>(m.samples) / elapsed : 0;
  m.batch_s = m.batches > 0 ? busy / static_cast<double>(m.batches) : 0;
  m.complete = m.batches == static_cast<std::int64_t>(streams) * c.batches;
  return m;
}

/// One measurement of `mode` at `latency_ms`: on freshly started emulated servers when
/// `c.emulated()`, else against `c.hosts` through `tcp_client`.
inline Measurement measure_point(const Config& c, Mode mode, double latency_ms,
                                 const std::shared_ptr<moe::ExpertClient>& tcp_client, std::uint64_t seed) {
  const auto cost = hop_cost(mode, Seconds(latency_ms / 1000.0), c.emulated());
  if (!c.emulated()) return measure(c, mode, latency_ms, c.hosts, tcp_client, cost.per_layer);
  EmulatedServers servers(c, cost.network, seed);
  return measure(c, mode, latency_ms, servers.addresses(), servers.client(), cost.per_layer);
}

}  // namespace hive::examples::lah_throughput
