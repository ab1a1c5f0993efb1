#pragma once
// The Learning@home convergence experiment on hive's emulator, shared by
// examples/learning_at_home.cpp and tests/torch/test_learning_at_home.cpp: the README's grid of
// setups, the models shaped as in the paper, and one run (expert servers, a client DHT and N
// trainers in this process, all on one net::SimNetwork).

#include "fashion_mnist.hpp"

#include <hive/hive.hpp>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace hive::examples::lah {

/// One row of the Learning@home README's convergence grid.
struct Setup {
  /// The README's name, e.g. "1000ms 64 experts".
  std::string name;
  /// DMoE experts per layer; 0 means the large FFN baseline.
  std::int64_t experts_per_layer = 0;
  /// Concurrent trainers.
  int trainers = 0;
  /// Samples per trainer step.
  std::int64_t batch_size = 0;
  /// Mean round trip of one call, in milliseconds.
  double delay_ms = 0;
  /// Probability that a request to an expert fails.
  double failure = 0;

  /// True for the large FFN baseline.
  [[nodiscard]] bool is_ffn() const noexcept { return experts_per_layer == 0; }
};

/// The README's eleven setups (experts_per_layer, trainers, batch, delay), in its order; the
/// "10% failure" rows run at 1000 ms.
inline const std::vector<Setup>& setups() {
  static const std::vector<Setup> all{
      {"100ms large ffn", 0, 64, 4, 100, 0},        {"100ms 64 experts", 16, 16, 4, 100, 0},
      {"100ms 256 experts", 64, 64, 4, 100, 0},     {"100ms 4096 experts", 1024, 64, 8, 100, 0},
      {"1000ms large ffn", 0, 64, 4, 1000, 0},      {"1000ms 64 experts", 16, 16, 4, 1000, 0},
      {"1000ms 256 experts", 64, 64, 4, 1000, 0},   {"1000ms 4096 experts", 1024, 64, 8, 1000, 0},
      {"10% failure 64 experts", 16, 16, 4, 1000, 0.1}, {"10% failure 256 experts", 64, 64, 4, 1000, 0.1},
      {"10% failure 4096 experts", 1024, 64, 8, 1000, 0.1},
  };
  return all;
}

/// The command-line spelling of a setup name: "10% failure 64 experts" → "10pct-failure-64-experts".
inline std::string slug(const std::string& name) {
  std::string out;
  for (char c : name) {
    if (c == ' ') out += '-';
    else if (c == '%') out += "pct";
    else out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return out;
}

/// The setup named `name` (its README name or its slug, any case); throws hive::InvalidArgument
/// listing the valid names otherwise.
inline Setup find_setup(const std::string& name) {
  for (const auto& s : setups())
    if (slug(s.name) == slug(name)) return s;
  std::string known;
  for (const auto& s : setups()) known += fmt::format("\n  \"{}\" ({})", s.name, slug(s.name));
  throw InvalidArgument(fmt::format("unknown setup '{}'; the setups are:{}", name, known));
}

/// The paper's block: x + Linear(4d→d)(ReLU(LN(Linear(4d→4d)(ReLU(LN(Linear(d→4d)(x))))))).
/// DMoE experts are such blocks of width d, the large FFN stacks four of width 2d.
class BlockImpl : public torch::nn::Cloneable<BlockImpl> {
 public:
  /// A block of width `dim`.
  explicit BlockImpl(std::int64_t dim) : dim_(dim) { reset(); }
  /// (Re)creates the layers.
  void reset() override {
    const auto h = 4 * dim_;
    layers = register_module(
        "layers", torch::nn::Sequential(torch::nn::Linear(dim_, h), torch::nn::LayerNorm(torch::nn::LayerNormOptions({h})),
                                        torch::nn::ReLU(), torch::nn::Linear(h, h),
                                        torch::nn::LayerNorm(torch::nn::LayerNormOptions({h})), torch::nn::ReLU(),
                                        torch::nn::Linear(h, dim_)));
  }
  /// [batch, dim] → [batch, dim].
  at::Tensor forward(const at::Tensor& x) { return x + layers->forward(x); }
  /// The residual branch.
  torch::nn::Sequential layers{nullptr};

 private:
  std::int64_t dim_;
};
/// The paper's feed-forward block (module holder).
TORCH_MODULE(Block);

/// Parameters of a Block of width `dim`.
constexpr std::int64_t block_parameters(std::int64_t dim) {
  const auto h = 4 * dim;
  return (dim * h + h) + 2 * h + (h * h + h) + 2 * h + (h * dim + dim);
}

/// The grid of a layer of `experts` experts: square when it can be ({16} → {4, 4}), else one
/// dimension.
inline std::vector<std::int64_t> grid_of(std::int64_t experts) {
  const auto side = static_cast<std::int64_t>(std::llround(std::sqrt(static_cast<double>(experts))));
  if (side > 1 && side * side == experts) return {side, side};
  return {experts};
}

/// Knobs of one run; the setup gives the shape of the grid row, the rest how it is emulated.
struct RunOptions {
  /// The grid row.
  HIVE_ARG(Setup, setup, Setup{});
  /// Seeds the models, the data order and the network.
  HIVE_ARG(std::uint64_t, seed, 1337);
  /// Most trainers (0: the setup's count); the reduced grid caps it.
  HIVE_ARG(int, max_trainers, 0);
  /// Width d of the DMoE layers (the paper's 512); the large FFN is 2d wide (the paper's 1024).
  HIVE_ARG(std::int64_t, hidden_dim, 512);
  /// Layers of experts (or FFN blocks), as in the paper.
  HIVE_ARG(int, layers, 4);
  /// Experts asked per sample in each layer, as in the paper.
  HIVE_ARG(int, k_best, 4);
  /// Once one expert of every sample answered, how long a layer waits for the others
  /// (MixtureOptions::timeout_after_k_min; its default).
  HIVE_ARG(Seconds, timeout_after_k_min, Seconds(1));
  /// Expert servers; a layer's experts are spread over all of them.
  HIVE_ARG(int, servers, 4);
  /// Adam's learning rate, for the experts and the trainers' parameters.
  HIVE_ARG(double, learning_rate, 1e-3);
  /// How each frame's one-way latency is drawn; its mean is half the setup's delay, so that
  /// a call's round trip averages the delay.
  HIVE_ARG(net::LatencyDistribution, latency, net::LatencyDistribution::exponential);
  /// Training time (wall clock).
  HIVE_ARG(Seconds, duration, Seconds(60));
  /// Time between two evaluations.
  HIVE_ARG(Seconds, eval_interval, Seconds(5));
  /// Test images per evaluation.
  HIVE_ARG(std::int64_t, eval_samples, 1000);
  /// Training images drawn from (0: all 60000).
  HIVE_ARG(std::int64_t, train_samples, 0);
};

/// Bytes a run needs, estimated before anything is built.
struct MemoryEstimate {
  double experts = 0;   ///< expert weights, gradients and Adam state on the servers
  double trainers = 0;  ///< trainers' replicas of the local layers, and the shared copy with its Adam state
  double data = 0;      ///< Fashion-MNIST in memory
  /// All of it.
  [[nodiscard]] double total() const noexcept { return experts + trainers + data; }
};

/// What `options` will hold in memory: 16 bytes per expert parameter (weights, gradients and
/// Adam's two moments), the trainers' local layers, and the dataset.
inline MemoryEstimate estimate_memory(const RunOptions& options) {
  const auto& s = options.setup();
  const auto d = options.hidden_dim(), layers = static_cast<std::int64_t>(options.layers());
  const int trainers = options.max_trainers() > 0 ? std::min(options.max_trainers(), s.trainers) : s.trainers;
  MemoryEstimate m;
  double local = 0;  // trainer-side parameters of one replica
  if (s.is_ffn()) {
    m.experts = 16.0 * static_cast<double>(layers * block_parameters(2 * d));
    local = static_cast<double>(784 * 2 * d + 2 * d + 4 * d + 2 * d * 10 + 10);
  } else {
    m.experts = 16.0 * static_cast<double>(layers * s.experts_per_layer * block_parameters(d));
    std::int64_t gate = 0;
    for (auto g : grid_of(s.experts_per_layer)) gate += g;
    local = static_cast<double>(784 * d + d + layers * (d * gate + gate) + 2 * d + d * 10 + 10);
  }
  m.trainers = 4.0 * local * (2.0 * (trainers + 1) + 3.0);
  const double images = options.train_samples() > 0 ? static_cast<double>(options.train_samples()) : 60000.0;
  m.data = 4.0 * 785.0 * (images + 10000.0);
  return m;
}

/// Bytes of memory available to this process (MemAvailable of /proc/meminfo; 0 if unknown).
inline double available_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  double kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024.0;
  return 0;
}

/// Throws hive::InvalidArgument when the run makes no sense or cannot fit in `memory_bound`
/// bytes (0: half of the available memory), before anything is built.
inline void check_run(const RunOptions& o, double memory_bound = 0) {
  const auto& s = o.setup();
  HIVE_CHECK(s.trainers >= 1 && s.batch_size >= 1 && s.experts_per_layer >= 0, "setup '{}' is malformed", s.name);
  HIVE_CHECK(std::isfinite(s.delay_ms) && s.delay_ms >= 0, "a delay must be finite and >= 0 ms, got {}", s.delay_ms);
  HIVE_CHECK(s.failure >= 0 && s.failure <= 1, "a failure rate must be a probability, got {}", s.failure);
  HIVE_CHECK(o.hidden_dim() >= 1 && o.layers() >= 1 && o.servers() >= 1 && o.max_trainers() >= 0,
             "hidden_dim, layers and servers must be positive and max_trainers >= 0");
  HIVE_CHECK(s.is_ffn() || (o.k_best() >= 1 && o.k_best() <= s.experts_per_layer),
             "k_best must be in [1, experts per layer = {}], got {}", s.experts_per_layer, o.k_best());
  HIVE_CHECK(o.timeout_after_k_min().count() >= 0, "timeout_after_k_min must be >= 0");
  HIVE_CHECK(o.learning_rate() > 0 && std::isfinite(o.learning_rate()), "learning_rate must be positive");
  HIVE_CHECK(o.duration().count() > 0 && o.eval_interval().count() > 0, "duration and eval_interval must be positive");
  HIVE_CHECK(o.eval_samples() >= 1 && o.eval_samples() <= 10000, "eval_samples must be in [1, 10000]");
  HIVE_CHECK(o.train_samples() >= 0 && o.train_samples() <= 60000, "train_samples must be in [0, 60000]");
  if (memory_bound <= 0) memory_bound = 0.5 * available_memory();
  const auto m = estimate_memory(o);
  HIVE_CHECK(memory_bound <= 0 || m.total() <= memory_bound,
             "'{}' at hidden_dim {} needs about {:.1f} GiB (experts {:.1f}, trainers {:.1f}, data {:.1f}), above the "
             "bound of {:.1f} GiB; lower --hidden_dim or --max_trainers",
             s.name, o.hidden_dim(), m.total() / (1 << 30), m.experts / (1 << 30), m.trainers / (1 << 30),
             m.data / (1 << 30), memory_bound / (1 << 30));
}

/// One evaluation of a run.
struct Point {
  double time_s = 0;                ///< seconds since training started (wall clock)
  std::int64_t samples = 0;         ///< training samples applied so far, all trainers
  double loss = 0;                  ///< mean training loss since the previous point
  double accuracy = 0;              ///< test accuracy (%) on eval_samples images
  std::uint64_t failed_requests = 0;  ///< requests the network failed so far
};

/// What a run did.
struct RunResult {
  std::vector<Point> points;       ///< the evaluations, the last at the end of training
  std::int64_t steps = 0;          ///< trainer steps applied
  std::int64_t failed_steps = 0;   ///< trainer steps abandoned (an error in a pass)
  std::uint64_t requests = 0;      ///< expert requests that reached a server host
  std::uint64_t failed_requests = 0;  ///< of those, the ones the network failed
  double wall_seconds = 0;         ///< the whole run, set-up included
  /// The first time the test accuracy reached `percent`, or a negative value if never.
  [[nodiscard]] double time_to(double percent) const {
    for (const auto& p : points)
      if (p.accuracy >= percent) return p.time_s;
    return -1;
  }
};

/// The trainer-side model: Linear(784, w) → `layers` remote layers → LayerNorm(w) → Linear(w, 10).
using Model = torch::nn::Sequential;

/// Runs one grid row: expert servers, a client DHT and the trainers on one emulated network.
/// The set-up (declarations, the first lookups) runs at 0.5 ms; then the network takes the
/// setup's delay and failure rate and the trainers train for `duration`. `on_point` sees each
/// evaluation as it is made.
inline RunResult run(const RunOptions& o, const Dataset& train, const Dataset& test,
                     const std::function<void(const Point&)>& on_point = {}) {
  check_run(o);
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  const auto& setup = o.setup();
  const int trainers = o.max_trainers() > 0 ? std::min(o.max_trainers(), setup.trainers) : setup.trainers;
  const auto d = o.hidden_dim();
  const auto width = setup.is_ffn() ? 2 * d : d;
  const auto layers = o.layers();
  torch::manual_seed(o.seed());

  net::Runtime runtime(1);
  const auto quick = net::SimNetworkOptions().seed(o.seed()).request_failure_prefix("moe.");
  auto network = net::SimNetwork::create(runtime.executor(), quick);
  auto sim = [&] { return net::SimulatedOptions().network(network); };

  // Servers: expert (a, b) of layer l lives on server (a + b + l) mod servers (i + l on a 1-D
  // grid), so every row and column of every layer spans the servers; the large FFN's block l
  // lives on server l mod servers.
  const auto backend_options = moe::BackendOptions().optimizer("adam").learning_rate(o.learning_rate());
  std::vector<std::vector<moe::ModuleBackend<>>> hosted(static_cast<std::size_t>(o.servers()));
  auto host = [&](std::int64_t index, const std::string& uid) {
    hosted[static_cast<std::size_t>(index % o.servers())].emplace_back(
        uid, moe::AnyExpert::from(Block(width)), std::vector<at::Tensor>{at::zeros({2, width})}, backend_options);
  };
  std::vector<std::string> prefixes;
  for (int l = 0; l < layers; ++l) {
    if (setup.is_ffn()) {
      host(l, fmt::format("ffn.{}", l));
      continue;
    }
    prefixes.push_back(fmt::format("lah{}", l));
    const auto grid = grid_of(setup.experts_per_layer);
    for (std::int64_t i = 0; i < setup.experts_per_layer; ++i) {
      if (grid.size() == 2) host(i / grid[1] + i % grid[1] + l, fmt::format("lah{}.{}.{}", l, i / grid[1], i % grid[1]));
      else host(i + l, fmt::format("lah{}.{}", l, i));
    }
  }
  std::vector<std::unique_ptr<Server<net::Simulated>>> servers;
  std::vector<std::string> addresses;
  for (auto& backends : hosted) {
    if (backends.empty()) continue;
    auto options = ServerOptions().update_period(Seconds(3600));
    options.dht().listen_on("127.0.0.1:0").initial_peers(addresses);
    options.batching().compute_threads(1);
    servers.push_back(std::make_unique<Server<net::Simulated>>(std::move(backends), options, sim()));
    addresses.push_back(servers.back()->address());
  }
  BasicDHT<net::Simulated> dht(DHTOptions().client_mode(true).initial_peers(addresses), sim());

  // Experts do not move during a run: their DHT entries are cached for the whole run, and a
  // failed expert is not banned (the paper's failures hit one request, not the expert).
  const auto directory_options = dht::ExpertDirectoryOptions()
                                     .cache_period(Seconds(3600))
                                     .negative_cache_period(Seconds(5))
                                     .failure_ban_period(Seconds(0));
  std::vector<std::shared_ptr<dht::ExpertDirectory>> directories;
  for (const auto& prefix : prefixes)
    directories.push_back(dht::ExpertDirectory::over(dht, prefix, grid_of(setup.experts_per_layer), directory_options));

  auto make_model = [&](const std::shared_ptr<moe::ExpertClient>& client) {
    Model m;
    m->push_back(torch::nn::Linear(784, width));
    for (int l = 0; l < layers; ++l) {
      if (setup.is_ffn()) {
        auto found = moe::get_experts(dht, {fmt::format("ffn.{}", l)}, client);
        HIVE_CHECK(found[0], "block ffn.{} is not declared in the DHT", l);
        m->push_back(found[0]);
      } else {
        auto options = moe::MixtureOptions(width, prefixes[static_cast<std::size_t>(l)], grid_of(setup.experts_per_layer))
                           .k_best(o.k_best())
                           .timeout_after_k_min(o.timeout_after_k_min())
                           .allow_zero_outputs(true)
                           .directory(directory_options);
        m->push_back(moe::RemoteMixtureOfExperts(options, directories[static_cast<std::size_t>(l)], client));
      }
    }
    m->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    m->push_back(torch::nn::Linear(width, 10));
    return m;
  };
  auto new_client = [&] { return std::make_shared<moe::Client<net::Simulated>>(sim()); };

  // The trainers' layers (input, gates, output) have one shared copy, as in the paper's
  // emulator: a trainer computes its gradient on a snapshot of it, and the shared copy takes
  // that gradient when the trainer's step ends, however stale it has become by then.
  auto eval_client = new_client();
  Model shared = make_model(eval_client);
  torch::optim::Adam adam(shared->parameters(), torch::optim::AdamOptions(o.learning_rate()).amsgrad(true));
  std::mutex shared_mutex;
  Model evaluator = make_model(eval_client);
  auto snapshot = [&](Model& replica) {
    torch::NoGradGuard no_grad;
    std::lock_guard lock(shared_mutex);
    auto from = shared->parameters();
    auto to = replica->parameters();
    for (std::size_t i = 0; i < to.size(); ++i) to[i].copy_(from[i]);
  };

  const auto n_train = o.train_samples() > 0 ? std::min(o.train_samples(), train.images.size(0)) : train.images.size(0);
  const auto n_test = std::min(o.eval_samples(), test.images.size(0));
  auto test_x = test.images.slice(0, 0, n_test), test_y = test.labels.slice(0, 0, n_test);
  auto accuracy = [&]() -> double {
    torch::NoGradGuard no_grad;
    evaluator->eval();
    auto predicted = evaluator->forward(test_x).argmax(1);
    return 100.0 * predicted.eq(test_y).to(at::kFloat).mean().item<double>();
  };
  {
    // Warm the directories (the beam search's first lookups) while the network is quick.
    torch::NoGradGuard no_grad;
    (void)evaluator->forward(test_x.slice(0, 0, std::min<std::int64_t>(n_test, 256)));
  }

  std::vector<std::shared_ptr<moe::ExpertClient>> clients;
  std::vector<Model> replicas;
  for (int t = 0; t < trainers; ++t) {
    clients.push_back(new_client());
    replicas.push_back(make_model(clients.back()));
  }

  auto slow = net::SimNetworkOptions()
                  .latency(o.latency())
                  .request_failure(setup.failure)
                  .request_failure_prefix("moe.")
                  .seed(o.seed());
  const Seconds one_way(setup.delay_ms / 2000.0);
  if (o.latency() == net::LatencyDistribution::uniform) slow.min_latency(Seconds(0)).max_latency(2 * one_way);
  else slow.mean_latency(one_way);
  if (o.latency() == net::LatencyDistribution::normal) slow.latency_stddev(one_way / 2);
  network->set_options(slow);

  // Training ends at `end`: a step that finishes later is dropped, so the last point sees the
  // weights as they were then, however long an evaluation took.
  const auto t0 = Clock::now();
  const auto end = t0 + std::chrono::duration_cast<Clock::duration>(o.duration());
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> samples{0}, steps{0}, failed_steps{0};
  double loss_sum = 0;  // guarded by shared_mutex, like the shared copy
  std::int64_t loss_count = 0;
  std::vector<std::thread> threads;
  for (int t = 0; t < trainers; ++t) {
    threads.emplace_back([&, t] {
      auto& replica = replicas[static_cast<std::size_t>(t)];
      std::mt19937_64 rng(o.seed() * 1000 + static_cast<std::uint64_t>(t));
      std::uniform_int_distribution<std::int64_t> pick(0, n_train - 1);
      auto index = at::empty({setup.batch_size}, at::kLong);
      while (!stop.load()) {
        auto* idx = index.data_ptr<std::int64_t>();
        for (std::int64_t i = 0; i < setup.batch_size; ++i) idx[i] = pick(rng);
        auto x = train.images.index_select(0, index), y = train.labels.index_select(0, index);
        snapshot(replica);
        replica->zero_grad();
        double loss_value = 0;
        try {
          auto loss = torch::nn::functional::cross_entropy(replica->forward(x), y);
          loss.backward();
          loss_value = loss.item<double>();
        } catch (const std::exception&) {
          failed_steps++;
          continue;
        }
        std::lock_guard lock(shared_mutex);
        if (stop.load() || Clock::now() >= end) break;
        auto from = replica->parameters();
        auto to = shared->parameters();
        for (std::size_t i = 0; i < to.size(); ++i)
          if (from[i].grad().defined()) to[i].mutable_grad() = from[i].grad().clone();
        adam.step();
        adam.zero_grad();
        samples += setup.batch_size;
        steps++;
        loss_sum += loss_value;
        loss_count++;
      }
    });
  }

  RunResult result;
  // A point pairs the shared weights with the samples and loss at the moment they were copied.
  auto record = [&](double time_s) {
    Point p;
    p.time_s = time_s;
    {
      torch::NoGradGuard no_grad;
      std::lock_guard lock(shared_mutex);
      auto from = shared->parameters();
      auto to = evaluator->parameters();
      for (std::size_t i = 0; i < to.size(); ++i) to[i].copy_(from[i]);
      p.samples = samples.load();
      p.loss = loss_count ? loss_sum / static_cast<double>(loss_count) : std::nan("");
      loss_sum = 0;
      loss_count = 0;
    }
    p.failed_requests = network->stats().requests_failed;
    try {
      p.accuracy = accuracy();
    } catch (const std::exception& e) {
      log::warn("learning_at_home", "evaluation at {:.1f} s failed: {}", time_s, e.what());
      return;
    }
    result.points.push_back(p);
    if (on_point) on_point(p);
  };
  for (auto next = t0; next < end; next += std::chrono::duration_cast<Clock::duration>(o.eval_interval())) {
    std::this_thread::sleep_until(next);
    if (Clock::now() >= end) break;
    record(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::this_thread::sleep_until(end);
  stop = true;
  const auto final_stats = network->stats();
  // Steps still in flight finish on a quick network and are dropped.
  network->set_options(quick);
  for (auto& th : threads) th.join();
  record(o.duration().count());
  result.steps = steps.load();
  result.failed_steps = failed_steps.load();
  result.requests = final_stats.requests;
  result.failed_requests = final_stats.requests_failed;
  replicas.clear();
  evaluator = nullptr;
  shared = nullptr;
  clients.clear();
  eval_client.reset();
  directories.clear();
  dht.shutdown();
  for (auto& s : servers) s->shutdown();
  result.wall_seconds = std::chrono::duration<double>(Clock::now() - started).count();
  return result;
}

/// Emulated calls per second of wall time that the emulator sustains: `in_flight` callers on
/// as many hosts, each calling an echo method of one of `servers` hosts again as soon as its
/// previous call returns, for `duration`, every frame delayed by `one_way` (fixed).
inline double measure_emulator(int in_flight, int servers, Seconds one_way, Seconds duration) {
  HIVE_CHECK(in_flight >= 1 && servers >= 1 && duration.count() > 0, "measure_emulator needs positive counts");
  net::Runtime runtime(1);
  auto network = net::SimNetwork::create(
      runtime.executor(), net::SimNetworkOptions().latency(net::LatencyDistribution::fixed).mean_latency(one_way));
  std::vector<std::shared_ptr<net::Rpc<net::Simulated>>> peers;
  std::vector<std::string> addresses;
  for (int s = 0; s < servers; ++s) {
    auto peer = net::Rpc<net::Simulated>::create(runtime.executor(), net::SimulatedOptions().network(network));
    peer->add_handler("echo", [](net::CallContext, Message m) -> asio::awaitable<Message> { co_return m; });
    addresses.push_back(peer->listen("0.0.0.0:0"));
    peers.push_back(std::move(peer));
  }
  std::vector<std::shared_ptr<net::Rpc<net::Simulated>>> callers;
  for (int c = 0; c < in_flight; ++c)
    callers.push_back(net::Rpc<net::Simulated>::create(runtime.executor(), net::SimulatedOptions().network(network)));
  // Open the connections first, all at once, so that the count holds calls and not handshakes.
  std::vector<std::future<Message>> opening;
  for (int c = 0; c < in_flight; ++c)
    opening.push_back(callers[static_cast<std::size_t>(c)]->async_call(addresses[static_cast<std::size_t>(c % servers)], "echo",
                                                                       Message{}, Seconds(30), asio::use_future));
  for (auto& f : opening) f.get();
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> done{0}, running{in_flight};
  std::mutex mutex;
  std::condition_variable all_done;
  std::function<void(int)> issue = [&](int c) {
    callers[static_cast<std::size_t>(c)]->async_call(
        addresses[static_cast<std::size_t>(c % servers)], "echo", Message{}, Seconds(30),
        [&, c](std::exception_ptr error, Message) {
          if (!error) done++;
          if (!stop.load()) return issue(c);
          std::lock_guard lock(mutex);
          if (--running == 0) all_done.notify_all();
        });
  };
  const auto t0 = std::chrono::steady_clock::now();
  for (int c = 0; c < in_flight; ++c) issue(c);
  std::this_thread::sleep_for(duration);
  const auto counted = done.load();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stop = true;
  {
    std::unique_lock lock(mutex);
    all_done.wait_for(lock, std::chrono::seconds(30), [&] { return running.load() == 0; });
  }
  for (auto& p : callers) p->close();
  for (auto& p : peers) p->close();
  return static_cast<double>(counted) / seconds;
}

}  // namespace hive::examples::lah
