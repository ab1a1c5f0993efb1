// The averaging peer: trains an image classifier on its own shard of CIFAR-10 (binary format,
// --data_dir) or Fashion-MNIST (/usr/share/datasets/fashion-mnist), and averages its
// parameters in the background with the other peers of the run, found through the DHT.
//
// The first peer prints the line others join with:
//   averaging_peer --shard 0/2
//   averaging_peer --shard 1/2 --initial_peers 127.0.0.1:PORT
// A joining peer first downloads the current state (parameters, optimizer state, step) from a
// peer of the run. `--alone` trains without a swarm: the baseline.

#include "common/cifar10.hpp"
#include "common/cli.hpp"
#include "common/fashion_mnist.hpp"
#include "common/models.hpp"

#include <hive/core/blas.hpp>
#include <hive/averaging/gloo.hpp>
#include <hive/hive.hpp>
#include <hive/serve/server.hpp>

#include <unistd.h>

#include <cmath>
#include <chrono>
#include <iostream>
#include <thread>

namespace {

constexpr const char* usage = R"(usage: averaging_peer [options]

Trains a classifier on a shard of CIFAR-10 (--data_dir, the binary version) or of
Fashion-MNIST, averaging its parameters with the peers of the same run (--prefix) in the
background. Prints the --initial_peers line that other peers join with.

  --initial_peers A,B    peers of a running swarm (none: start a new one)
  --listen_on HOST:PORT  where to listen (default 127.0.0.1:0: a free loopback port)
  --announce_host HOST   host others reach this peer at, for a wildcard --listen_on
  --client_mode          do not accept connections (average without reducing a part)
  --data_dir DIR         CIFAR-10 binary files (data_batch_1.bin, test_batch.bin); default: Fashion-MNIST
  --shard K/N            train on the K-th of N equal shards of the training samples (default 0/1)
  --train_samples N      training samples before sharding (default 12000; 0: all)
  --test_samples N       test samples (default 2000; 0: all)
  --epochs E             passes over the shard (default 2)
  --batch B              batch size (default 32)
  --lr LR                SGD learning rate, momentum 0.9 (default 0.01)
  --seed S               initialization and shuffling seed (default 0)
  --prefix NAME          the run's name in the DHT (default averaging_peer)
  --target_group_size N  peers per averaging group (default 16)
  --min_group_size N     fewest peers a round starts with (default 2)
  --averaging_period N   start a round every N local steps (default 10)
  --matchmaking_time S   seconds a round looks for a group (default 3)
  --compression C        none, float16, uniform8, quantile8 (default float16; gloo: none or float16)
  --strategy S           all-reduce: butterfly (hive's own, the default) or gloo (libtorch's
                         c10d Gloo, for trusted clusters where every peer reaches every other)
  --no_load_state        do not download the state of a peer when joining
  --no_final_average     skip the last synchronous round after training
  --wait_for_peers N     before the last round, wait (up to 60 s) until N peers of the run have
                         finished training, so that the last round gathers them all (default 0)
  --alone                no swarm at all: train alone (the baseline)
  --threads N            torch compute threads (default 1: several peers share this machine)
  --serve                also answer predictions (serve.predict on this peer's port, declared
                         under PREFIX.serve for hive-infer clients and replicas)
  --serve_mode M         snapshot (a consistent copy, the default) or live (the training weights)
  --publish_every N      with --serve: publish a snapshot every N steps (default 10)
  --linger S             with --serve: keep serving S seconds after training (default 0)
  --quiet                no per-round log lines
)";

struct Flags {
  std::vector<std::string> initial_peers;
  std::string listen_on = "127.0.0.1:0", announce_host, data_dir, prefix = "averaging_peer";
  std::string compression = "float16", strategy = "butterfly";
  std::string serve_mode = "snapshot";
  bool client_mode = false, load_state = true, final_average = true, alone = false, quiet = false, serve = false;
  std::uint64_t publish_every = 10;
  double linger = 0;
  std::size_t wait_for_peers = 0;
  std::int64_t shard = 0, shards = 1, train_samples = 12000, test_samples = 2000, batch = 32;
  int epochs = 2, threads = 1;
  std::uint64_t seed = 0;
  double lr = 0.01, matchmaking_time = 3;
  std::size_t target_group_size = 16, min_group_size = 2, averaging_period = 10;
};

Flags parse(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = hive::examples::flag_name(argv[i]);
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw hive::InvalidArgument(fmt::format("{} needs a value (see --help)", flag));
      return argv[++i];
    };
    if (flag == "--help") {
      std::cout << usage;
      std::exit(0);
    } else if (flag == "--initial_peers") f.initial_peers = hive::examples::split_commas(value());
    else if (flag == "--listen_on") f.listen_on = value();
    else if (flag == "--announce_host") f.announce_host = value();
    else if (flag == "--client_mode") f.client_mode = true;
    else if (flag == "--data_dir") f.data_dir = value();
    else if (flag == "--shard") {
      const auto v = value();
      const auto slash = v.find('/');
      HIVE_CHECK(slash != std::string::npos, "--shard takes K/N, got '{}'", v);
      f.shard = std::stoll(v.substr(0, slash));
      f.shards = std::stoll(v.substr(slash + 1));
    } else if (flag == "--train_samples") f.train_samples = std::stoll(value());
    else if (flag == "--test_samples") f.test_samples = std::stoll(value());
    else if (flag == "--epochs") f.epochs = std::stoi(value());
    else if (flag == "--batch") f.batch = std::stoll(value());
    else if (flag == "--lr") f.lr = std::stod(value());
    else if (flag == "--seed") f.seed = std::stoull(value());
    else if (flag == "--prefix") f.prefix = value();
    else if (flag == "--target_group_size") f.target_group_size = std::stoul(value());
    else if (flag == "--min_group_size") f.min_group_size = std::stoul(value());
    else if (flag == "--averaging_period") f.averaging_period = std::stoul(value());
    else if (flag == "--matchmaking_time") f.matchmaking_time = std::stod(value());
    else if (flag == "--compression") f.compression = value();
    else if (flag == "--strategy") f.strategy = value();
    else if (flag == "--no_load_state") f.load_state = false;
    else if (flag == "--no_final_average") f.final_average = false;
    else if (flag == "--wait_for_peers") f.wait_for_peers = std::stoul(value());
    else if (flag == "--alone") f.alone = true;
    else if (flag == "--quiet") f.quiet = true;
    else if (flag == "--threads") f.threads = std::stoi(value());
    else if (flag == "--serve") f.serve = true;
    else if (flag == "--serve_mode") f.serve_mode = value();
    else if (flag == "--publish_every") f.publish_every = std::stoull(value());
    else if (flag == "--linger") f.linger = std::stod(value());
    else throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
  }
  HIVE_CHECK(f.shards >= 1 && f.shard >= 0 && f.shard < f.shards, "--shard K/N needs 0 <= K < N");
  HIVE_CHECK(f.epochs >= 1 && f.batch >= 1 && f.lr > 0 && f.threads >= 1,
             "--epochs, --batch, --lr and --threads must be positive");
  (void)hive::serve::parse_mode(f.serve_mode);
  HIVE_CHECK(!f.serve || (!f.alone && !f.client_mode), "--serve needs a swarm peer that accepts connections (not --alone or --client_mode)");
  HIVE_CHECK(f.publish_every >= 1 && f.linger >= 0, "--publish_every must be positive and --linger not negative");
  (void)hive::parse_compression(f.compression);  // a clear error now rather than after loading the data
  HIVE_CHECK(f.strategy == "butterfly" || f.strategy == "gloo", "--strategy must be butterfly or gloo, got '{}'", f.strategy);
  return f;
}

/// The policy bundle of --strategy gloo: the default one with Gloo as the all-reduce.
struct GlooPolicies : hive::DefaultPolicies {
  using strategy = hive::averaging::Gloo;
};

/// Trains `model` on `train` (alone, or as a peer of Trainer type TrainerT) and reports.
template <class TrainerT>
int run(const Flags& flags, torch::nn::Sequential& model, const hive::examples::Dataset& train,
        const hive::examples::Dataset& test, std::int64_t per_shard) {
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(flags.lr).momentum(0.9));
  std::unique_ptr<TrainerT> trainer;
  if (!flags.alone) {
    auto optimizer = hive::optim::DecentralizedOptions()
                         .prefix(flags.prefix)
                         .target_group_size(flags.target_group_size)
                         .min_group_size(flags.min_group_size)
                         .averaging_steps_period(flags.averaging_period)
                         .verbose(!flags.quiet);
    optimizer.averager()
        .matchmaking_time(hive::Seconds(flags.matchmaking_time))
        .compression(hive::parse_compression(flags.compression));
    trainer = std::make_unique<TrainerT>(
        sgd, hive::TrainerOptions()
                 .dht(hive::DHTOptions()
                          .initial_peers(flags.initial_peers)
                          .listen_on(flags.listen_on)
                          .announce_host(flags.announce_host)
                          .client_mode(flags.client_mode))
                 .optimizer(optimizer));
    if (!trainer->address().empty())
      fmt::print("To join this swarm, run another peer with: --initial_peers {}\n", trainer->address());
    if (!flags.initial_peers.empty() && flags.load_state) {
      if (trainer->load_state_from_peers(hive::Seconds(30)))
        fmt::print("Loaded the swarm's state from a peer (step {})\n", trainer->optimizer().local_step());
      else
        fmt::print("No peer shares a state yet: starting from this peer's own initialization\n");
    }
    std::fflush(stdout);
  }
  // --serve: predictions from snapshots published every --publish_every steps, computed on a
  // serving thread of their own while this one trains.
  std::unique_ptr<hive::serve::Publisher<torch::nn::Sequential>> publisher;
  // Both trainer types run on TCP and Kademlia, the endpoint's default policies.
  std::unique_ptr<hive::serve::InferenceServer<torch::nn::Sequential>> endpoint;
  if (flags.serve) {
    // Training and serving share this machine: one OpenBLAS thread per matrix product each.
    hive::examples::limit_blas_threads(flags.threads);
    publisher = std::make_unique<hive::serve::Publisher<torch::nn::Sequential>>(
        model, hive::serve::PublisherOptions()
                   .mode(hive::serve::parse_mode(flags.serve_mode))
                   .every_steps(flags.publish_every)
                   .every_seconds(hive::Seconds(0)));
    publisher->set_step(trainer->optimizer().local_step());
    publisher->publish();
    endpoint = std::make_unique<hive::serve::InferenceServer<torch::nn::Sequential>>(
        *publisher, trainer->dht(), hive::examples::image_schema(!flags.data_dir.empty()),
        hive::serve::InferenceOptions().prefix(flags.prefix));
    fmt::print("Serving predictions ({}) at {}\n", flags.serve_mode, endpoint->address());
    std::fflush(stdout);
  }

  const auto steps_per_epoch = per_shard / flags.batch;
  const bool tty = isatty(STDOUT_FILENO);
  for (int epoch = 0; epoch < flags.epochs; ++epoch) {
    auto order = torch::randperm(per_shard);
    double loss_avg = 0;
    for (std::int64_t s = 0; s < steps_per_epoch; ++s) {
      auto idx = order.narrow(0, s * flags.batch, flags.batch);
      sgd.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(model->forward(train.images.index_select(0, idx)),
                                                       train.labels.index_select(0, idx));
      loss.backward();
      if (publisher) publisher->step([&] { trainer->step(); });
      else if (trainer) trainer->step();
      else sgd.step();
      loss_avg = s == 0 ? loss.item<double>() : 0.95 * loss_avg + 0.05 * loss.item<double>();
      // A progress bar on a terminal; a line every 10% otherwise (logs, the demo).
      const bool tick = (s + 1) * 10 / steps_per_epoch != s * 10 / steps_per_epoch;
      if (tty || tick || s + 1 == steps_per_epoch) {
        constexpr int width = 30;
        const int filled = static_cast<int>(width * (s + 1) / steps_per_epoch);
        std::string rounds;
        if (trainer) {
          const auto st = trainer->optimizer().stats();
          rounds = fmt::format("  rounds {}/{} averaged (last group {})", st.averaged, st.rounds, st.last_group_size);
        }
        fmt::print("{}epoch {}/{} [{}{}] {:3d}%  loss {:.3f}{}{}", tty ? "\r" : "", epoch + 1, flags.epochs,
                   std::string(static_cast<std::size_t>(filled), '#'), std::string(static_cast<std::size_t>(width - filled), '.'),
                   100 * (s + 1) / steps_per_epoch, loss_avg, rounds, tty ? "" : "\n");
        std::fflush(stdout);
      }
    }
    if (tty) fmt::print("\n");
  }

  if (trainer && flags.final_average) {
    // Peers finish at different times: one last round with whoever is averaging now, or,
    // with --wait_for_peers, with everyone once they all have finished (a barrier in the DHT:
    // each finished peer adds itself to a dictionary and waits until it is full).
    if (flags.wait_for_peers > 0) {
      // A background round still running would mix this peer's mid-training parameters
      // into the others' last round: finish it first.
      trainer->optimizer().wait_for_round(hive::Seconds(60));
      auto& dht = trainer->dht();
      const auto key = flags.prefix + ".finished";
      const auto me = trainer->address().empty() ? dht.peer_id().hex() : trainer->address();
      dht.store(key, true, dht.node()->now() + 300, hive::dht::Subkey(me));
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      std::size_t finished = 0;
      while (std::chrono::steady_clock::now() < give_up) {
        auto record = dht.get(key, /*latest=*/true);
        finished = record ? record->dictionary.size() : 0;
        if (finished >= flags.wait_for_peers) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the DHT offers no event to wait on
      }
      fmt::print("{} of {} peers have finished training\n", finished, flags.wait_for_peers);
    }
    // With --serve, the last round's write of the parameters is an update like a step.
    if (publisher) publisher->begin_update();
    auto r = trainer->optimizer().average_now();
    if (publisher) publisher->end_update(false);
    if (!r.ok) fmt::print("The last averaging round found no group ({}); keeping the local parameters\n", r.error);
    else fmt::print("The last averaging round had {} peers\n", r.group_size);
    const auto st = trainer->optimizer().stats();
    fmt::print("averaging: {} of {} rounds averaged\n", st.averaged, st.rounds);
  }
  {
    // A fingerprint of the parameters, to compare peers (equal after a round they shared).
    torch::NoGradGuard no_grad;
    double sum = 0, sq = 0;
    for (const auto& p : model->parameters()) {
      sum += p.sum().item<double>();
      sq += p.pow(2).sum().item<double>();
    }
    fmt::print("parameters: sum {:.6f} norm {:.6f}\n", sum, std::sqrt(sq));
  }
  const double acc = hive::examples::accuracy(model, test);
  const auto samples = static_cast<std::int64_t>(flags.epochs) * steps_per_epoch * flags.batch;
  fmt::print("test accuracy: {:.2f}% after {} samples seen by this peer{}\n", acc, samples, flags.alone ? " (alone)" : "");
  std::fflush(stdout);
  if (endpoint) {
    publisher->publish();  // the final (averaged) weights
    if (flags.linger > 0) {
      fmt::print("Serving for {} more seconds\n", flags.linger);
      std::fflush(stdout);
      std::this_thread::sleep_for(std::chrono::duration<double>(flags.linger));
    }
    const auto st = endpoint->stats();
    fmt::print("serving: {} requests answered ({} rows), {} refused or failed\n", st.answered, st.rows, st.failed);
    std::fflush(stdout);
    endpoint->shutdown();
  }
  if (trainer) trainer->shutdown();
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  const auto flags = parse(argc, argv);
  if (const auto advice = hive::blas_advice(); !advice.empty()) hive::log::warn("blas", "{}", advice);
  torch::manual_seed(flags.seed);
  at::set_num_threads(flags.threads);

  // Data: this peer's shard.
  const bool cifar = !flags.data_dir.empty();
  if (cifar)
    HIVE_CHECK(hive::examples::is_cifar10_dir(flags.data_dir),
               "{} does not hold CIFAR-10's binary files (data_batch_1.bin, test_batch.bin)", flags.data_dir);
  auto train = cifar ? hive::examples::load_cifar10(flags.data_dir, true, flags.train_samples)
                     : hive::examples::load_fashion_mnist(true, flags.train_samples);
  auto test = cifar ? hive::examples::load_cifar10(flags.data_dir, false, flags.test_samples)
                    : hive::examples::load_fashion_mnist(false, flags.test_samples);
  const auto per_shard = train.images.size(0) / flags.shards;
  HIVE_CHECK(per_shard >= flags.batch, "a shard of {} samples is smaller than one batch", per_shard);
  train.images = train.images.narrow(0, flags.shard * per_shard, per_shard);
  train.labels = train.labels.narrow(0, flags.shard * per_shard, per_shard);
  fmt::print("{}: training on {} samples (shard {}/{}), testing on {}\n", cifar ? "CIFAR-10" : "Fashion-MNIST", per_shard,
             flags.shard, flags.shards, test.images.size(0));

  auto model = cifar ? hive::examples::cifar_model() : hive::examples::fashion_model();
  if (flags.strategy == "gloo") return run<hive::TrainerFor<GlooPolicies>>(flags, model, train, test, per_shard);
  return run<hive::Trainer<>>(flags, model, train, test, per_shard);
} catch (const std::exception& e) {
  fmt::print(stderr, "averaging_peer: {}\n", e.what());
  return 1;
}
