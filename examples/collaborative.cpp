// Collaborative training on Fashion-MNIST: a swarm of peers in this process (each with its own
// DHT peer on loopback TCP) trains one classifier with the target-batch-size optimizer
// (optim::CollaborativeOptimizer) or with DiLoCo (optim::DiLoCoOptimizer). One peer joins late
// and loads the swarm's state, one leaves midway. At the end, one machine trains the same model
// on the same total number of samples (with batch target_batch_size, or peers x batch for
// DiLoCo): the fair reference. Prints a summary table.
//
//   collaborative                         # 4 peers, target batch 256, two passes over 24000 images
//   collaborative --mode diloco --local_steps 50 --outer_lr 0.7
//   collaborative --power_sgd_rank 4 --peers 6

#include "common/cli.hpp"
#include "common/fashion_mnist.hpp"
#include "common/models.hpp"
#include "common/seeded.hpp"

#include <hive/core/blas.hpp>
#include <hive/core/progress.hpp>
#include <hive/optim/collaborative.hpp>
#include <hive/optim/diloco.hpp>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <atomic>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <thread>

namespace {

constexpr const char* usage = R"(usage: collaborative [options]

Trains Fashion-MNIST with a swarm of peers in this process, then one machine on the same total
number of samples, and prints both accuracies.

  --mode collaborative|diloco  the optimizer (default collaborative)
  --peers N               peers (default 4; the last joins late, peer 1 leaves midway)
  --train_samples N       training images, split into one shard per peer (default 24000)
  --passes P              passes over the data; the run ends at the one-machine step count (default 2)
  --batch B               images per local step (default 32)
  --target_batch_size S   collaborative: samples per global step (default 256)
  --local_steps H         diloco: inner steps per outer step (default 25)
  --outer_lr X            diloco: learning rate of the outer SGD, Nesterov momentum 0.9 (default 0.5;
                          DiLoCo's 0.7 overshoots in a run of few outer steps)
  --lr X                  learning rate of the (inner) SGD (default 0.1; diloco and the
                          --delay_* flags 0.05)
  --momentum M            momentum of the SGD (default 0.9; the --delay_* flags 0.5)
  --compression C         none|float16|uniform8|quantile8 for gradients / pseudo-gradients (default none)
  --power_sgd_rank R      collaborative: average gradients with PowerSGD of rank R (default 0: off)
  --delay_grad_averaging  collaborative: average in the background while computing (steps
                          then apply one-step-old gradients: hence the gentler defaults)
  --delay_optimizer_step  collaborative: run the optimizer step in the background too, on an
                          offloaded copy of the parameters (with the gentler defaults as well)
  --no_late_joiner        every peer starts at once
  --no_leaver             no peer leaves
)";

struct Flags {
  std::string mode = "collaborative";
  int peers = 4, passes = 2;
  std::int64_t train_samples = 24000, batch = 32, target = 256, local_steps = 25, power_sgd_rank = 0;
  double lr = -1, momentum = -1, outer_lr = 0.5;
  hive::Compression compression = hive::Compression::none;
  bool delay = false, delay_step = false, late_joiner = true, leaver = true;
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
    } else if (flag == "--mode") f.mode = value();
    else if (flag == "--peers") f.peers = std::stoi(value());
    else if (flag == "--train_samples") f.train_samples = std::stoll(value());
    else if (flag == "--passes") f.passes = std::stoi(value());
    else if (flag == "--batch") f.batch = std::stoll(value());
    else if (flag == "--target_batch_size") f.target = std::stoll(value());
    else if (flag == "--local_steps") f.local_steps = std::stoll(value());
    else if (flag == "--lr") f.lr = std::stod(value());
    else if (flag == "--momentum") f.momentum = std::stod(value());
    else if (flag == "--outer_lr") f.outer_lr = std::stod(value());
    else if (flag == "--compression") f.compression = nlohmann::json(value()).get<hive::Compression>();
    else if (flag == "--power_sgd_rank") f.power_sgd_rank = std::stoll(value());
    else if (flag == "--delay_grad_averaging") f.delay = true;
    else if (flag == "--delay_optimizer_step") f.delay_step = true;
    else if (flag == "--no_late_joiner") f.late_joiner = false;
    else if (flag == "--no_leaver") f.leaver = false;
    else throw hive::InvalidArgument(fmt::format("unknown flag {} (see --help)", argv[i]));
  }
  HIVE_CHECK(f.mode == "collaborative" || f.mode == "diloco", "--mode is collaborative or diloco, got '{}'", f.mode);
  HIVE_CHECK(f.peers >= 2, "--peers must be at least 2");
  HIVE_CHECK(f.passes >= 1 && f.batch >= 1 && f.target >= f.batch && f.local_steps >= 1, "--passes, --batch, --local_steps >= 1, "
             "--target_batch_size >= --batch");
  HIVE_CHECK(f.train_samples >= f.peers * f.batch, "--train_samples must give every peer at least one batch");
  const bool delayed = f.mode == "collaborative" && (f.delay || f.delay_step);
  if (f.lr < 0) f.lr = f.mode == "diloco" || delayed ? 0.05 : 0.1;
  if (f.momentum < 0) f.momentum = delayed ? 0.5 : 0.9;
  HIVE_CHECK(f.momentum < 1, "--momentum must be below 1");
  return f;
}

// Every peer and the reference start from the same weights.
torch::nn::Sequential mlp() {
  return hive::examples::seeded(7, [] {
    return torch::nn::Sequential(torch::nn::Linear(784, 128), torch::nn::ReLU(), torch::nn::Linear(128, 10));
  });
}

void train_batch(torch::nn::Sequential& model, const hive::examples::Dataset& data, std::int64_t at, std::int64_t batch) {
  torch::nn::functional::cross_entropy(model->forward(data.images.slice(0, at, at + batch)),
                                       data.labels.slice(0, at, at + batch))
      .backward();
}

struct PeerResult {
  double accuracy = 0;
  std::int64_t epoch = 0;
  std::size_t rounds = 0, averaged = 0, states_loaded = 0;
  std::string role = "from the start";
};

}  // namespace

int main(int argc, char** argv) try {
  using namespace hive;
  const auto f = parse(argc, argv);
  if (const auto advice = hive::blas_advice(); !advice.empty()) hive::log::warn("blas", "{}", advice);
  at::set_num_threads(1);
  examples::limit_blas_threads(1);
  const bool diloco = f.mode == "diloco";
  auto train = examples::load_fashion_mnist(true, f.train_samples);
  auto test = examples::load_fashion_mnist(false, 5000);
  const std::int64_t total = f.train_samples * f.passes;
  // The one-machine step count. The collaborative swarm stops at the first global step after
  // it processed `total` samples; a DiLoCo peer after as many inner steps as one machine with
  // batch peers x batch makes.
  const std::int64_t reference_batch = diloco ? f.batch * f.peers : f.target;
  const std::int64_t goal = total / reference_batch;
  fmt::print("{} peers, {} mode, {} samples ({} passes): the swarm stops {}\n", f.peers, f.mode, total, f.passes,
             diloco ? fmt::format("after {} inner steps per peer", goal) : fmt::format("at the global step after {} samples", total));
  std::fflush(stdout);  // before the progress lines on stderr

  std::vector<std::unique_ptr<DHT>> dhts;
  dhts.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0")));
  for (int p = 1; p < f.peers; ++p)
    dhts.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0").initial_peers(dhts[0]->visible_addresses())));

  std::vector<PeerResult> results(static_cast<std::size_t>(f.peers));
  std::atomic<std::int64_t> swarm_progress{0};  // diloco: peer 0's inner steps; collaborative: samples
  std::atomic<std::int64_t> stop_epoch{std::numeric_limits<std::int64_t>::max()};
  const std::int64_t progress_total = diloco ? goal : total;
  // A bar on a terminal, a line every 5% otherwise.
  hive::Progress bar("training", static_cast<std::size_t>(progress_total));
  const auto started = SteadyClock::now();
  const std::int64_t shard = f.train_samples / f.peers;
  const int late = f.late_joiner ? f.peers - 1 : -1;
  const int leaver = f.leaver ? 1 : -1;
  std::vector<std::thread> threads;
  for (int p = 0; p < f.peers; ++p)
    threads.emplace_back([&, p] {
      auto& r = results[static_cast<std::size_t>(p)];
      auto& dht = *dhts[static_cast<std::size_t>(p)];
      if (p == late) {
        r.role = "joined at 25%";
        // Polls the swarm's progress, for at most 10 minutes.
        const auto until = SteadyClock::now() + std::chrono::minutes(10);
        while (swarm_progress.load() < progress_total / 4 && SteadyClock::now() < until)
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      if (p == leaver) r.role = "left at 50%";
      auto model = mlp();
      torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(f.lr).momentum(f.momentum));
      std::int64_t at = p * shard;
      auto next_batch = [&] {
        model->zero_grad();
        train_batch(model, train, at, f.batch);
        at += f.batch;
        if (at + f.batch > (p + 1) * shard) at = p * shard;
      };
      if (diloco) {
        auto options = optim::DiLoCoOptions().run_id("collaborative_demo").local_steps(static_cast<std::size_t>(f.local_steps))
                           .outer_lr(f.outer_lr);
        options.averager().target_group_size(static_cast<std::size_t>(f.peers)).matchmaking_time(Seconds(5)).compression(f.compression);
        optim::DiLoCoOptimizer<> opt(sgd, dht, options);
        if (p == late && opt.load_state_from_peers(Seconds(30)))
          r.states_loaded = 1;
        while (opt.stats().inner_steps < static_cast<std::size_t>(goal)) {
          if (p == leaver && swarm_progress.load() >= goal / 2) break;
          next_batch();
          opt.step();
          if (p == 0) {
            swarm_progress = static_cast<std::int64_t>(opt.stats().inner_steps);
            bar.update(static_cast<std::size_t>(swarm_progress.load()), fmt::format("outer step {}", opt.stats().outer_steps));
          }
        }
        if (p != leaver) opt.outer_step();
        const auto s = opt.stats();
        r.epoch = static_cast<std::int64_t>(s.outer_steps);
        r.rounds = s.outer_steps;
        r.averaged = s.averaged;
      } else {
        auto options = optim::CollaborativeOptions()
                           .run_id("collaborative_demo")
                           .target_batch_size(f.target)
                           .batch_size_per_step(f.batch)
                           .matchmaking_time(Seconds(3))
                           .averaging_timeout(Seconds(30))
                           .load_state_timeout(Seconds(60))
                           .grad_compression(f.compression)
                           .power_sgd_rank(f.power_sgd_rank)
                           .delay_grad_averaging(f.delay)
                           .delay_optimizer_step(f.delay_step);
        options.averager().sender_timeout(Seconds(2)).reducer_timeout(Seconds(5));
        options.progress().min_refresh_period(Seconds(0.1)).max_refresh_period(Seconds(1)).expiration(Seconds(10));
        optim::CollaborativeOptimizer<> opt(sgd, dht, options);
        if (p == late) opt.load_state_from_peers();
        // Bounded by the samples a peer could ever need (it may spend steps loading states).
        for (std::int64_t guard = 0; opt.epoch() < stop_epoch.load() && guard < 4 * total / f.batch; ++guard) {
          if (p == leaver && swarm_progress.load() >= total / 2) break;
          next_batch();
          // When the swarm has processed the reference's samples, every peer goes on to the
          // next global step, so that all take the last one together.
          if ((swarm_progress += f.batch) >= total) {
            auto expected = std::numeric_limits<std::int64_t>::max();
            stop_epoch.compare_exchange_strong(expected, opt.epoch() + 1);
          }
          opt.step();
          if (p == 0) {
            const auto g = opt.progress();
            bar.update(static_cast<std::size_t>(swarm_progress.load()), fmt::format("epoch {}, {} peers, {:.0f} samples/s, next step in {:.1f} s", g.epoch, g.peers,
                                                 g.samples_per_second, std::isfinite(g.eta_s) ? g.eta_s : 0.0));
          }
        }
        const auto s = opt.stats();
        r.epoch = s.epoch;
        r.rounds = s.grad_rounds;
        r.averaged = s.grad_averaged;
        r.states_loaded = s.states_loaded;
      }
      r.accuracy = examples::accuracy(model, test);
    });
  for (auto& t : threads) t.join();
  bar.finish();
  const double swarm_s = std::chrono::duration<double>(SteadyClock::now() - started).count();
  dhts.clear();

  // The fair reference: one machine, the same total samples, the batch the swarm adds up to.
  auto model = mlp();
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(f.lr).momentum(f.momentum));
  const auto one_started = SteadyClock::now();
  for (std::int64_t step = 0; step < goal; ++step) {
    const auto at = (step * reference_batch) % (f.train_samples - reference_batch + 1);
    model->zero_grad();
    train_batch(model, train, at, reference_batch);
    sgd.step();
  }
  const double one_accuracy = examples::accuracy(model, test);
  const double one_s = std::chrono::duration<double>(SteadyClock::now() - one_started).count();

  fmt::print("\n== summary ({} mode{}): test accuracy on 5000 images\n", f.mode,
             f.power_sgd_rank > 0 ? fmt::format(", PowerSGD rank {}", f.power_sgd_rank) : std::string());
  fmt::print("  {:<8} {:>9} {:>7} {:>16} {:>7}  {}\n", "peer", "accuracy", diloco ? "outer" : "epoch", "rounds averaged",
             "loaded", "role");
  for (int p = 0; p < f.peers; ++p) {
    const auto& r = results[static_cast<std::size_t>(p)];
    fmt::print("  {:<8} {:>8.2f}% {:>7} {:>9} of {:<4} {:>7}  {}\n", p, r.accuracy, r.epoch, r.averaged, r.rounds,
               r.states_loaded, r.role);
  }
  fmt::print("  {:<8} {:>8.2f}% {:>7}  batch {}, {} steps, the same {} samples ({:.1f} s)\n", "1 machine", one_accuracy, goal,
             reference_batch, goal, total, one_s);
  fmt::print("  swarm: {:.1f} s{}\n", swarm_s,
             diloco ? std::string()
                    : fmt::format(", {} global steps on {} samples", results[0].epoch, swarm_progress.load()));
  return 0;
} catch (const std::exception& e) {
  std::cerr << "collaborative: " << e.what() << "\n";
  return 1;
}
