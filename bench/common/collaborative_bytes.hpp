#pragma once
// Part 3 of benchmark_averaging: what collaborative training sends. A swarm of peers trains a
// Fashion-MNIST MLP (784-128-10, 101 770 parameters) on the emulated network (net::Simulated,
// no latency, so that every byte is counted by the network), once per configuration: the
// target-batch-size optimizer with plain, float16 and 8-bit gradient averaging and with
// PowerSGD rank 4, and DiLoCo with H = 50 local steps. For each: bytes sent per peer per
// global step (all traffic, the DHT's included; a "global step" is target_batch_size samples
// processed by the swarm, for DiLoCo too, so that rows compare at equal samples), per
// averaging round, and the test accuracy reached at the same total number of samples ("steps":
// the optimizer steps the swarm made, DiLoCo's outer ones).

#include "../../examples/common/fashion_mnist.hpp"
#include "../../examples/common/seeded.hpp"

#include <hive/net/simulated.hpp>
#include <hive/optim/collaborative.hpp>
#include <hive/optim/diloco.hpp>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace hive::bench {

/// Part 3's knobs.
struct CollaborativeBytesArgs {
  /// Peers of each swarm.
  int peers = 4;
  /// Training images (one shard per peer), and passes over them.
  std::int64_t train_samples = 8000;
  int passes = 6;
  /// Local batch and global batch (samples per global step).
  std::int64_t batch = 32, target = 256;
  /// DiLoCo's local steps.
  std::int64_t local_steps = 50;
};

/// One configuration of part 3.
struct CollaborativeConfig {
  std::string name;
  Compression compression = Compression::none;
  std::int64_t power_sgd_rank = 0;
  bool diloco = false;
};

/// The run's model: every peer and the reference start from the same weights.
inline torch::nn::Sequential collaborative_mlp() {
  return examples::seeded(7, [] {
    return torch::nn::Sequential(torch::nn::Linear(784, 128), torch::nn::ReLU(), torch::nn::Linear(128, 10));
  });
}

/// Runs one configuration; a JSON object with its figures.
inline nlohmann::json collaborative_bytes(const CollaborativeBytesArgs& a, const CollaborativeConfig& c,
                                          const examples::Dataset& train, const examples::Dataset& test) {
  using Sim = net::Simulated;
  net::Runtime runtime(1);
  auto network = net::SimNetwork::create(runtime.executor(), net::SimNetwork::Options().seed(1));
  std::vector<std::unique_ptr<BasicDHT<Sim, dht::Kademlia<>>>> dhts;
  for (int p = 0; p < a.peers; ++p) {
    auto o = DHTOptions().listen_on("127.0.0.1:0");
    if (p > 0) o.initial_peers(dhts[0]->visible_addresses());
    dhts.push_back(std::make_unique<BasicDHT<Sim, dht::Kademlia<>>>(o, net::SimulatedOptions().network(network)));
  }
  const std::int64_t total = a.train_samples * a.passes;
  const std::int64_t global_steps = total / a.target;
  const std::int64_t inner_steps = total / (a.batch * a.peers);  // DiLoCo: per peer
  const auto bytes_before = network->stats().bytes_sent;
  std::vector<double> accuracy(static_cast<std::size_t>(a.peers));
  std::vector<std::size_t> rounds(static_cast<std::size_t>(a.peers));
  std::vector<std::int64_t> steps(static_cast<std::size_t>(a.peers));  // optimizer steps (DiLoCo: outer)
  // The target-batch-size swarm stops at the first global step after `total` samples.
  std::atomic<std::int64_t> samples{0};
  std::atomic<std::int64_t> stop_epoch{std::numeric_limits<std::int64_t>::max()};
  const auto started = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int p = 0; p < a.peers; ++p)
    threads.emplace_back([&, p] {
      auto model = collaborative_mlp();
      torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(c.diloco ? 0.05 : 0.1).momentum(0.9));
      const std::int64_t shard = a.train_samples / a.peers;
      std::int64_t at = p * shard;
      auto batch = [&] {
        model->zero_grad();
        torch::nn::functional::cross_entropy(model->forward(train.images.slice(0, at, at + a.batch)),
                                             train.labels.slice(0, at, at + a.batch))
            .backward();
        at += a.batch;
        if (at + a.batch > (p + 1) * shard) at = p * shard;
      };
      auto& dht = *dhts[static_cast<std::size_t>(p)];
      if (c.diloco) {
        // Outer lr 0.5: DiLoCo's 0.7 overshoots in a run of few outer steps (docs/collaborative.md).
        auto o = optim::DiLoCoOptions()
                     .run_id("bytes_" + c.name)
                     .local_steps(static_cast<std::size_t>(a.local_steps))
                     .outer_lr(0.5);
        o.averager().target_group_size(static_cast<std::size_t>(a.peers)).matchmaking_time(Seconds(5)).compression(c.compression);
        optim::DiLoCoOptimizer<Sim> opt(sgd, dht, o);
        for (std::int64_t s = 0; s < inner_steps; ++s) {
          batch();
          opt.step();
        }
        rounds[static_cast<std::size_t>(p)] = opt.stats().averaged;
        steps[static_cast<std::size_t>(p)] = static_cast<std::int64_t>(opt.stats().outer_steps);
        opt.shutdown();
      } else {
        auto o = optim::CollaborativeOptions()
                     .run_id("bytes_" + c.name)
                     .target_batch_size(a.target)
                     .batch_size_per_step(a.batch)
                     .matchmaking_time(Seconds(3))
                     .grad_compression(c.compression)
                     .power_sgd_rank(c.power_sgd_rank)
                     .average_state_every(0);
        o.progress().min_refresh_period(Seconds(0.01)).max_refresh_period(Seconds(0.5)).expiration(Seconds(10));
        optim::CollaborativeOptimizer<Sim> opt(sgd, dht, o);
        for (std::int64_t guard = 0; opt.epoch() < stop_epoch.load() && guard < 4 * total / a.batch; ++guard) {
          batch();
          if ((samples += a.batch) >= total) {
            auto expected = std::numeric_limits<std::int64_t>::max();
            stop_epoch.compare_exchange_strong(expected, opt.epoch() + 1);
          }
          opt.step();
        }
        rounds[static_cast<std::size_t>(p)] = opt.stats().grad_averaged;
        steps[static_cast<std::size_t>(p)] = opt.epoch();
        opt.shutdown();
      }
      torch::NoGradGuard no_grad;
      accuracy[static_cast<std::size_t>(p)] =
          model->forward(test.images).argmax(1).eq(test.labels).to(at::kFloat).mean().item<double>() * 100;
    });
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  const double bytes = static_cast<double>(network->stats().bytes_sent - bytes_before);
  dhts.clear();
  double mean_accuracy = 0;
  std::size_t mean_rounds = 0;
  for (int p = 0; p < a.peers; ++p) {
    mean_accuracy += accuracy[static_cast<std::size_t>(p)] / a.peers;
    mean_rounds += rounds[static_cast<std::size_t>(p)];
  }
  mean_rounds /= static_cast<std::size_t>(a.peers);
  const double per_peer = bytes / a.peers;
  return {{"bytes_per_peer_per_step", std::round(per_peer / static_cast<double>(global_steps))},
          {"bytes_per_peer_per_round", mean_rounds > 0 ? std::round(per_peer / static_cast<double>(mean_rounds)) : 0.0},
          {"rounds", mean_rounds},
          {"steps", *std::max_element(steps.begin(), steps.end())},
          {"samples", c.diloco ? inner_steps * a.batch * a.peers : samples.load()},
          {"accuracy", std::round(mean_accuracy * 100) / 100},
          {"seconds", std::round(seconds * 10) / 10}};
}

/// Part 3: every configuration, and one machine on the same samples (batch target).
inline nlohmann::json collaborative_part(const CollaborativeBytesArgs& a) {
  auto train = examples::load_fashion_mnist(true, a.train_samples);
  auto test = examples::load_fashion_mnist(false, 2000);
  const std::vector<CollaborativeConfig> configs{{"plain", Compression::none, 0, false},
                                                 {"float16", Compression::float16, 0, false},
                                                 {"uniform8", Compression::uniform8, 0, false},
                                                 {"powersgd4", Compression::none, 4, false},
                                                 {"diloco50", Compression::none, 0, true}};
  nlohmann::json out = nlohmann::json::object();
  for (const auto& c : configs) {
    fmt::print("part 3: {} ...\n", c.name);
    std::fflush(stdout);
    out[c.name] = collaborative_bytes(a, c, train, test);
    fmt::print("part 3: {}: {}\n", c.name, out[c.name].dump());
    std::fflush(stdout);
  }
  // The reference: one machine, batch target, the same samples.
  auto model = collaborative_mlp();
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  const std::int64_t steps = a.train_samples * a.passes / a.target;
  for (std::int64_t s = 0; s < steps; ++s) {
    const auto at = (s * a.target) % (a.train_samples - a.target + 1);
    model->zero_grad();
    torch::nn::functional::cross_entropy(model->forward(train.images.slice(0, at, at + a.target)),
                                         train.labels.slice(0, at, at + a.target))
        .backward();
    sgd.step();
  }
  torch::NoGradGuard no_grad;
  out["one_machine_accuracy"] =
      std::round(model->forward(test.images).argmax(1).eq(test.labels).to(at::kFloat).mean().item<double>() * 10000) / 100;
  out["model_parameters"] = 784 * 128 + 128 + 128 * 10 + 10;
  out["peers"] = a.peers;
  out["target_batch_size"] = a.target;
  return out;
}

}  // namespace hive::bench
