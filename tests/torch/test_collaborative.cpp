// Collaborative training: bandwidth-aware parts, auxiliary peers, several averagers per DHT
// peer, the progress tracker, PowerSGD, the target-batch-size optimizer and DiLoCo, with
// convergence checks on Fashion-MNIST against one machine trained on the same samples.
#include "../../examples/common/fashion_mnist.hpp"
#include "../../examples/common/seeded.hpp"
#include "../common/averaging_swarm.hpp"
#include "../common/wait.hpp"

#include <hive/averaging/powersgd.hpp>
#include <hive/optim/collaborative.hpp>
#include <hive/optim/diloco.hpp>

#include <doctest/doctest.h>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <future>
#include <limits>
#include <thread>

using namespace hive;
using averaging::AveragerOptions;

using test::fast;
using test::swarm;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

/// The same weights for the same seed, also when the peers' threads build theirs at once (a
/// DiLoCo peer whose start differed, since its anchor is its own start, stayed apart).
torch::nn::Sequential small_model(int seed) {
  return examples::seeded(static_cast<std::uint64_t>(seed), [] {
    return torch::nn::Sequential(torch::nn::Linear(784, 64), torch::nn::ReLU(), torch::nn::Linear(64, 10));
  });
}

double accuracy(torch::nn::Sequential& model, const examples::Dataset& test) {
  torch::NoGradGuard no_grad;
  return model->forward(test.images).argmax(1).eq(test.labels).to(at::kFloat).mean().item<double>() * 100;
}

}  // namespace

TEST_CASE("averaging: parts follow the announced bandwidths, and every member derives the same ones") {
  auto parts = averaging::split_in_proportion(1000, {1, 2, 1});
  REQUIRE(parts.size() == 3);
  CHECK(parts[0].size() == 250);
  CHECK(parts[1].size() == 500);
  CHECK(parts[2].size() == 250);
  CHECK(parts[2].end == 1000);
  // Leftover elements go to the largest remainders; the sizes add up.
  auto odd = averaging::split_in_proportion(10, {1, 1, 1});
  CHECK(odd[0].size() + odd[1].size() + odd[2].size() == 10);
  CHECK(odd[0].size() == 4);
  // An unknown bandwidth anywhere: equal parts.
  auto even = averaging::split_in_proportion(9, {5, 0, 1});
  CHECK(even[1].size() == 3);
  // A group's partition skips client-mode members and reads each reducer's bandwidth.
  averaging::GroupInfo g;
  g.members = {{"a:1", false, false, 3.0, nullptr, {}},
               {"", true, false, 0.0, nullptr, {}},
               {"b:1", false, false, 1.0, nullptr, {}}};
  auto p = averaging::partition(g, 400);
  REQUIRE(p.size() == 2);
  CHECK(p[0].size() == 300);
  CHECK(p[1].size() == 100);
  // Members read back from the wire refuse a negative bandwidth.
  CHECK_THROWS(nlohmann::json({{"address", "a:1"}, {"client_mode", false}, {"bandwidth", -1.0}}).get<averaging::Member>());
}

TEST_CASE("averaging: members of different bandwidths average exactly, each reducing its share") {
  auto dhts = swarm(3);
  std::vector<std::vector<at::Tensor>> tensors;
  std::vector<std::unique_ptr<averaging::DecentralizedAverager<>>> averagers;
  auto mean = at::zeros({5000}, at::kDouble);
  for (std::size_t i = 0; i < 3; ++i) {
    at::manual_seed(static_cast<std::uint64_t>(40 + i));
    tensors.push_back({at::randn({5000})});
    mean += tensors.back()[0].to(at::kDouble) / 3;
    averagers.push_back(std::make_unique<averaging::DecentralizedAverager<>>(
        *dhts[i], tensors.back(), fast("bandwidth", 3).bandwidth(static_cast<double>(i + 1) * 100).part_size_bytes(4096)));
  }
  std::vector<std::future<averaging::StepResult>> steps;
  for (auto& a : averagers) steps.push_back(a->async_step());
  for (std::size_t i = 0; i < 3; ++i) {
    auto r = steps[i].get();
    INFO(r.error);
    REQUIRE(r.complete());
    CHECK(max_diff(tensors[i][0], mean) < 1e-5);
  }
}

TEST_CASE("averaging: two averagers share one DHT peer under different prefixes, and a second one of a prefix is refused") {
  auto dhts = swarm(2);
  std::vector<std::vector<at::Tensor>> grads{{at::full({10}, 1.0)}, {at::full({10}, 3.0)}};
  std::vector<std::vector<at::Tensor>> state{{at::full({4}, -1.0)}, {at::full({4}, 5.0)}};
  std::vector<std::unique_ptr<averaging::DecentralizedAverager<>>> g, s;
  for (std::size_t i = 0; i < 2; ++i) {
    g.push_back(std::make_unique<averaging::DecentralizedAverager<>>(*dhts[i], grads[i], fast("two_grad", 2)));
    s.push_back(std::make_unique<averaging::DecentralizedAverager<>>(*dhts[i], state[i], fast("two_state", 2)));
  }
  CHECK_THROWS_AS(averaging::DecentralizedAverager<>(*dhts[0], grads[0], fast("two_grad", 2)), InvalidArgument);
  // Both run at once, each on its own prefix.
  auto g0 = g[0]->async_step(), s0 = s[0]->async_step(), g1 = g[1]->async_step(), s1 = s[1]->async_step();
  for (auto* f : {&g0, &s0, &g1, &s1}) {
    auto r = f->get();
    INFO(r.error);
    CHECK(r.complete());
  }
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK(max_diff(grads[i][0], at::full({10}, 2.0)) < 1e-6);
    CHECK(max_diff(state[i][0], at::full({4}, 2.0)) < 1e-6);
  }
}

TEST_CASE("averaging: an auxiliary peer reduces a part, sends nothing and keeps nothing") {
  auto dhts = swarm(3);
  std::vector<std::vector<at::Tensor>> tensors{{at::full({3000}, 1.0)}, {at::full({3000}, 2.0)}, {at::full({3000}, 100.0)}};
  std::vector<std::unique_ptr<averaging::DecentralizedAverager<>>> averagers;
  for (std::size_t i = 0; i < 3; ++i)
    averagers.push_back(std::make_unique<averaging::DecentralizedAverager<>>(*dhts[i], tensors[i],
                                                                             fast("aux", 3).auxiliary(i == 2).part_size_bytes(2048)));
  CHECK(averagers[2]->auxiliary());
  std::vector<std::future<averaging::StepResult>> steps;
  for (auto& a : averagers) steps.push_back(a->async_step(1.0));
  for (std::size_t i = 0; i < 3; ++i) {
    auto r = steps[i].get();
    INFO("peer ", i, ": ", r.error);
    REQUIRE(r.ok);
    CHECK(r.group_size == 3);
  }
  // The trainers hold the mean of theirs (the auxiliary peer's 100 weighs nothing), though a
  // third of the vector was reduced by the auxiliary peer.
  CHECK(max_diff(tensors[0][0], at::full({3000}, 1.5)) < 1e-6);
  CHECK(max_diff(tensors[1][0], at::full({3000}, 1.5)) < 1e-6);
  CHECK(max_diff(tensors[2][0], at::full({3000}, 100.0)) == 0);
  CHECK_THROWS_AS(averaging::DecentralizedAverager<>(*dhts[0], tensors[0], fast("aux2", 2).auxiliary(true).client_mode(true)),
                  InvalidArgument);
}

TEST_CASE("averaging: PowerSGD averages gradients of rank <= r exactly, in two phases, and counts what it sends") {
  auto dhts = swarm(2);
  std::vector<std::vector<at::Tensor>> grads;
  std::vector<std::unique_ptr<averaging::PowerSGDAverager<>>> averagers;
  auto mean_matrix = at::zeros({64, 48}, at::kDouble);
  auto mean_bias = at::zeros({48}, at::kDouble);
  for (std::size_t i = 0; i < 2; ++i) {
    at::manual_seed(static_cast<std::uint64_t>(70 + i));
    auto m = at::randn({64, 1}).mm(at::randn({1, 48}));  // rank 1 each: the mean has rank 2
    auto b = at::randn({48});
    mean_matrix += m.to(at::kDouble) / 2;
    mean_bias += b.to(at::kDouble) / 2;
    grads.push_back({m, b});
    averagers.push_back(std::make_unique<averaging::PowerSGDAverager<>>(*dhts[i], grads.back(), fast("psgd", 2),
                                                                        averaging::PowerSGDOptions().rank(4)));
  }
  const auto [sent, full] = averagers[0]->elements_per_round();
  CHECK(sent == 4 * (64 + 48) + 48);
  CHECK(full == 64 * 48 + 48);
  auto a = std::async(std::launch::async, [&] { return averagers[0]->step(); });
  auto b = averagers[1]->step();
  auto ra = a.get();
  INFO(ra.error, " / ", b.error);
  REQUIRE(ra.ok);
  REQUIRE(b.ok);
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK(max_diff(grads[i][0], mean_matrix) < 1e-4);
    CHECK(max_diff(grads[i][1], mean_bias) < 1e-5);
  }
}

TEST_CASE("progress: a peer reporting absurd progress cannot move the global epoch, and another model is ignored") {
  auto dhts = swarm(2);
  auto options = optim::ProgressOptions().key("absurd_progress").target_batch_size(100).min_refresh_period(Seconds(0.05));
  optim::ProgressTracker<> tracker(*dhts[0], options, "schema_a");
  tracker.report(3, 10);
  const double now = wall_time();
  // A liar (far-future epoch, negative samples) and a peer of another model, straight into the DHT.
  dhts[1]->store("absurd_progress",
                 {{"epoch", 1000000}, {"samples", -50}, {"samples_per_second", -1.0}, {"time", now}, {"schema", "schema_a"}},
                 now + 30, dht::Subkey(std::string("liar")));
  dhts[1]->store("absurd_progress",
                 {{"epoch", 3}, {"samples", 90}, {"samples_per_second", 1.0}, {"time", now}, {"schema", "schema_b"}}, now + 30,
                 dht::Subkey(std::string("other_model")));
  optim::GlobalProgress g;
  REQUIRE(test::wait_for([&] {
    g = tracker.refresh();
    return g.clamped > 0 && g.mismatched == 1;
  }));
  CHECK(g.epoch == 4);   // one past this peer's 3, not a million
  CHECK(g.samples == 0);  // nobody is at epoch 4 with samples; the liar's -50 counts as 0
  CHECK_FALSE(g.ready());
  CHECK(g.peers == 2);    // this peer and the liar; the other model's report is not counted
}

namespace {

/// The learning rate of step `step` of `steps`: linear decay from `lr` to a tenth of it. The
/// last steps are small, so the final accuracy depends little on where they fell (at a
/// constant lr 0.1 it moves by ±1.5 points with the order of the batches).
double decayed(double lr, std::int64_t step, std::int64_t steps) {
  return lr * std::max(0.1, 1.0 - static_cast<double>(step) / static_cast<double>(steps));
}

void set_lr(torch::optim::SGD& sgd, double lr) {
  for (auto& group : sgd.param_groups()) static_cast<torch::optim::SGDOptions&>(group.options()).lr(lr);
}

/// Trains one machine with batch `batch` for `total` samples of `train` (lr decayed over the
/// steps); its test accuracy.
/// With `stale`, each step applies the gradients of the step before (as delay_grad_averaging).
double one_machine(const examples::Dataset& train, const examples::Dataset& test, std::int64_t total, std::int64_t batch,
                   double lr, double momentum = 0.9, bool stale = false) {
  auto model = small_model(7);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(lr).momentum(momentum));
  const auto n = train.images.size(0);
  std::vector<at::Tensor> previous;
  for (std::int64_t seen = 0; seen + batch <= total; seen += batch) {
    const auto b = seen % n;
    set_lr(sgd, decayed(lr, seen / batch, total / batch));
    sgd.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(train.images.slice(0, b, b + batch)), train.labels.slice(0, b, b + batch))
        .backward();
    if (stale) {
      std::vector<at::Tensor> now;
      for (auto& p : model->parameters()) now.push_back(p.grad().clone());
      if (!previous.empty()) {
        auto params = model->parameters();
        for (std::size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = previous[i];
        sgd.step();
      }
      previous = std::move(now);
    } else {
      sgd.step();
    }
  }
  return accuracy(model, test);
}

/// How a swarm run of check_swarm trains.
struct SwarmRun {
  std::string run_id;
  std::int64_t power_sgd_rank = 0;
  bool delay_grad_averaging = false;
  bool delay_optimizer_step = false;
  bool kill_one = false;  // peer 3 dies (its connections close) in the middle of training
  bool late_joiner = false;  // peer 3 starts after the others' first epochs and loads the state
  // SGD of every peer and of the reference. At lr 0.2 the final accuracy of this model swings
  // by ±3 points with the batch size (76-83%), at 0.1 by ±1 (83.4-84.9%). With
  // delay_grad_averaging each step applies the gradients of the epoch before, which momentum
  // 0.9 does not survive (one machine: 27% against 85% at lr 0.1); lr 0.05 with momentum 0.5
  // does, and the reference then applies one-step-old gradients too (81.4% against 82.9%).
  double lr = 0.1, momentum = 0.9;
};

/// Four collaborative peers, each on its quarter of the data with batch 32, target batch 256;
/// every surviving peer must reach the one-machine accuracy (batch 256, the same total samples)
/// within `points`.
void check_swarm(const SwarmRun& run, double points) {
  at::set_num_threads(1);
  constexpr std::int64_t n = 8000, batch = 32, target = 256, peers = 4, passes = 6;
  auto train = examples::load_fashion_mnist(true, n);
  auto test = examples::load_fashion_mnist(false, 2000);
  const double reference = one_machine(train, test, n * passes, target, run.lr, run.momentum, run.delay_grad_averaging);

  auto dhts = swarm(peers);
  std::vector<double> accuracies(peers, 0);
  std::vector<optim::CollaborativeStats> stats(peers);
  std::atomic<bool> killed{false};
  std::atomic<std::int64_t> swarm_epoch{0};
  std::atomic<std::int64_t> swarm_samples{0};
  // When the swarm has processed the reference's samples, every peer goes on to the next epoch
  // boundary, so that all take the last step together.
  std::atomic<std::int64_t> stop_epoch{std::numeric_limits<std::int64_t>::max()};
  std::vector<std::thread> threads;
  for (std::int64_t p = 0; p < peers; ++p)
    threads.emplace_back([&, p] {
      const auto i = static_cast<std::size_t>(p);
      if (run.late_joiner && p == 3) test::wait_for([&] { return swarm_epoch.load() >= 5; }, std::chrono::seconds(60));
      auto model = small_model(7);
      torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(run.lr).momentum(run.momentum));
      auto options = optim::CollaborativeOptions()
                         .run_id(run.run_id)
                         .target_batch_size(target)
                         .batch_size_per_step(batch)
                         .matchmaking_time(Seconds(2))
                         .averaging_timeout(Seconds(10))
                         .load_state_timeout(Seconds(20))
                         .power_sgd_rank(run.power_sgd_rank)
                         .delay_grad_averaging(run.delay_grad_averaging)
                         .delay_optimizer_step(run.delay_optimizer_step);
      options.averager().target_group_size(peers).sender_timeout(Seconds(1)).reducer_timeout(Seconds(3));
      options.progress().min_refresh_period(Seconds(0.01)).max_refresh_period(Seconds(0.5)).expiration(Seconds(5));
      const std::int64_t epochs = n * passes / target;  // the reference's steps
      // The schedule per global epoch, as the reference's per step.
      optim::CollaborativeOptimizer<> opt(sgd, *dhts[i], options,
                                          [&](std::int64_t e) { set_lr(sgd, decayed(run.lr, e, epochs)); });
      if (run.late_joiner && p == 3) {
        CHECK(opt.load_state_from_peers());
        // It starts from the swarm's state, not from scratch. Which epoch it gets is its
        // provider's when downloaded, and swarm_epoch is the most advanced peer's: a provider
        // can be a few epochs behind that (runs of .ci/run here saw 4 against 5, and less than 4
        // against 6).
        MESSAGE("the late joiner loaded epoch ", opt.epoch(), " while the swarm was at ", swarm_epoch.load());
        CHECK(opt.epoch() >= 1);
        set_lr(sgd, decayed(run.lr, opt.epoch(), epochs));
      }
      const std::int64_t shard = n / peers;
      std::int64_t b = p * shard;
      for (int guard = 0; opt.epoch() < stop_epoch.load() && guard < 40000; ++guard) {
        if (run.kill_one && p == 3 && opt.epoch() >= epochs / 3) {
          killed = true;
          dhts[i]->node()->rpc()->close();  // dies: every connection drops, nothing answers
          break;
        }
        if (swarm_epoch.load() > opt.epoch() + 3 && !(run.late_joiner && p == 3)) break;  // left far behind: stop
        opt.zero_grad();
        torch::nn::functional::cross_entropy(model->forward(train.images.slice(0, b, b + batch)), train.labels.slice(0, b, b + batch))
            .backward();
        if ((swarm_samples += batch) >= n * passes) {
          auto expected = std::numeric_limits<std::int64_t>::max();
          stop_epoch.compare_exchange_strong(expected, opt.epoch() + 1);
        }
        opt.step();
        swarm_epoch = std::max(swarm_epoch.load(), opt.epoch());
        b += batch;
        if (b + batch > (p + 1) * shard) b = p * shard;
      }
      accuracies[i] = accuracy(model, test);
      stats[i] = opt.stats();
      opt.shutdown();  // the killed one's against a closed RPC
    });
  for (auto& t : threads) t.join();
  MESSAGE(run.run_id, ": one machine (batch ", target, ", ", n * passes, " samples, ", n * passes / target, " steps",
          std::string(run.delay_grad_averaging ? ", one-step-old gradients" : ""), "): ", reference,
          "%; the swarm made ", swarm_epoch.load(), " steps on ", swarm_samples.load(), " samples");
  for (std::int64_t p = 0; p < peers; ++p) {
    const auto& s = stats[static_cast<std::size_t>(p)];
    MESSAGE("peer ", p, ": ", accuracies[static_cast<std::size_t>(p)], "% at epoch ", s.epoch, ", ", s.grad_averaged, " of ",
            s.grad_rounds, " gradient rounds averaged, ", s.states_loaded, " states loaded, last group ", s.last_group_size);
    if (run.kill_one && p == 3) continue;
    CHECK(s.grad_averaged >= s.grad_rounds * 3 / 4);
    CHECK(accuracies[static_cast<std::size_t>(p)] >= reference - points);
  }
  if (run.kill_one) CHECK(killed.load());
  if (run.late_joiner) CHECK(stats[3].states_loaded >= 1);
}

}  // namespace

TEST_CASE("collaborative: a lone peer steps once per target_batch_size samples without waiting for anyone") {
  auto dhts = swarm(1);
  auto model = small_model(1);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
  std::vector<std::int64_t> epochs;
  optim::CollaborativeOptimizer<> opt(sgd, *dhts[0],
                                      optim::CollaborativeOptions().run_id("lone").target_batch_size(64).matchmaking_time(Seconds(30)),
                                      [&](std::int64_t e) { epochs.push_back(e); });
  auto x = at::randn({16, 784});
  auto y = at::randint(0, 10, {16});
  const auto started = SteadyClock::now();
  for (int i = 0; i < 12; ++i) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    opt.step(16);
  }
  CHECK(opt.epoch() == 3);
  CHECK(epochs == std::vector<std::int64_t>{1, 2, 3});
  CHECK(SteadyClock::now() - started < std::chrono::seconds(20));  // no matchmaking_time per epoch
  CHECK_THROWS_AS(opt.step(0), InvalidArgument);
}

TEST_CASE("collaborative: four peers reach one machine's accuracy (batch = target_batch_size) within 2 points") {
  check_swarm({.run_id = "collab"}, 2.0);
}

TEST_CASE("collaborative: with PowerSGD rank 4 within 3 points") {
  check_swarm({.run_id = "collab_psgd", .power_sgd_rank = 4}, 3.0);
}

TEST_CASE("collaborative: a member killed mid-run, and a late joiner that loads the state, still converge") {
  check_swarm({.run_id = "collab_kill", .kill_one = true}, 3.0);
  check_swarm({.run_id = "collab_late", .late_joiner = true}, 3.0);
}

TEST_CASE("collaborative: delay_grad_averaging within 3 points of one machine with one-step-old gradients") {
  check_swarm({.run_id = "collab_delay", .delay_grad_averaging = true, .lr = 0.05, .momentum = 0.5}, 3.0);
}

TEST_CASE("collaborative: delay_optimizer_step with delay_grad_averaging within 3 points of one machine with one-step-old gradients") {
  check_swarm({.run_id = "collab_offload", .delay_grad_averaging = true, .delay_optimizer_step = true, .lr = 0.05, .momentum = 0.5},
              3.0);
}

TEST_CASE("collaborative: delay_optimizer_step steps an offloaded copy and applies the change at the next step()") {
  auto dhts = swarm(1);
  auto model = small_model(3);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.5));
  std::vector<std::int64_t> epochs;
  optim::CollaborativeOptimizer<> opt(
      sgd, *dhts[0], optim::CollaborativeOptions().run_id("offload").target_batch_size(16).delay_optimizer_step(true),
      [&](std::int64_t e) { epochs.push_back(e); });
  auto x = at::randn({16, 784});
  auto y = at::randint(0, 10, {16});
  std::vector<at::Tensor> before, expected;
  for (auto& p : model->parameters()) before.push_back(p.detach().clone());
  auto train_step = [&] {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
  };
  train_step();
  for (std::size_t i = 0; i < before.size(); ++i) expected.push_back(before[i] - 0.5 * model->parameters()[i].grad());
  opt.step(16);  // ends epoch 1: its step runs in the background
  CHECK(opt.epoch() == 1);
  auto params = model->parameters();
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(at::equal(params[i].detach(), before[i]));
  CHECK(epochs.empty());
  // The wrapped optimizer steps copies: stepping it does not move the model.
  CHECK(!sgd.param_groups()[0].params()[0].is_same(params[0]));
  train_step();
  opt.step(16);  // applies epoch 1's step, then ends epoch 2 (applied by the next step())
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(at::allclose(params[i].detach(), expected[i], 1e-5, 1e-6));
  CHECK(epochs == std::vector<std::int64_t>{1});
  // zero_grad() clears the model's gradients, not only the copies'.
  opt.zero_grad();
  for (auto& p : params) CHECK((!p.grad().defined() || p.grad().abs().sum().item<double>() == 0));
  // An optimizer that already stepped holds state of the model's tensors: refused.
  auto other = small_model(4);
  torch::optim::SGD stepped(other->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::nn::functional::cross_entropy(other->forward(x), y).backward();
  stepped.step();
  CHECK_THROWS_AS(optim::CollaborativeOptimizer<>(stepped, *dhts[0],
                                                  optim::CollaborativeOptions().run_id("offload2").delay_optimizer_step(true)),
                  InvalidArgument);
}

TEST_CASE("collaborative: a model of other shapes under the same run is refused with a clear error") {
  auto dhts = swarm(2);
  auto a = small_model(1);
  torch::nn::Sequential b(torch::nn::Linear(784, 32), torch::nn::ReLU(), torch::nn::Linear(32, 10));
  torch::optim::SGD sa(a->parameters(), torch::optim::SGDOptions(0.1)), sb(b->parameters(), torch::optim::SGDOptions(0.1));
  auto options = optim::CollaborativeOptions().run_id("mismatch").target_batch_size(1000000);
  options.progress().min_refresh_period(Seconds(0.05)).max_refresh_period(Seconds(0.2));
  optim::CollaborativeOptimizer<> oa(sa, *dhts[0], options), ob(sb, *dhts[1], options);
  // Each sees the other's report and ignores it.
  CHECK(test::wait_for([&] { return oa.tracker().refresh().mismatched == 1; }));
  CHECK(oa.progress().peers == 1);
  // Loading the other's state names the mismatch.
  try {
    ob.load_state_from_peers();
    FAIL("loaded a state of another model");
  } catch (const InvalidArgument& e) {
    CHECK(std::string(e.what()).find("another shape") != std::string::npos);
  }
}

TEST_CASE("diloco: four peers with H = 25 local steps reach one machine's accuracy within 3 points") {
  at::set_num_threads(1);
  // 8 outer steps of H = 25 inner steps, all inside the loop: every peer's last outer step is
  // the 8th, with the others (a separate final outer_step() can meet only part of the group).
  constexpr std::int64_t n = 8000, batch = 32, peers = 4, local = 25, steps = 8 * local;
  auto train = examples::load_fashion_mnist(true, n);
  auto test = examples::load_fashion_mnist(false, 2000);
  const double reference = one_machine(train, test, steps * batch * peers, batch * peers, 0.1);
  constexpr double inner_lr = 0.05;
  auto dhts = swarm(peers);
  std::vector<double> accuracies(peers);
  std::vector<optim::DiLoCoStats> stats(peers);
  std::vector<std::thread> threads;
  for (std::int64_t p = 0; p < peers; ++p)
    threads.emplace_back([&, p] {
      const auto i = static_cast<std::size_t>(p);
      auto model = small_model(7);
      torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(inner_lr).momentum(0.9));
      // Outer lr 0.5 rather than the default 0.7: with only 8 outer steps, 0.7 overshoots
      // (76% against 82% in a simulation of the same run without a network).
      auto options = optim::DiLoCoOptions().run_id("diloco").local_steps(local).outer_lr(0.5);
      // A group forms as soon as all 4 joined; the long matchmaking_time only keeps a peer that a
      // busy machine delayed in the group (parameters that once averaged apart stay apart).
      options.averager().target_group_size(peers).matchmaking_time(Seconds(10)).compression(Compression::float16);
      optim::DiLoCoOptimizer<> opt(sgd, *dhts[i], options);
      const std::int64_t shard = n / peers;
      std::int64_t b = p * shard;
      for (std::int64_t s = 0; s < steps; ++s) {
        set_lr(sgd, decayed(inner_lr, s, steps));
        opt.zero_grad();
        torch::nn::functional::cross_entropy(model->forward(train.images.slice(0, b, b + batch)), train.labels.slice(0, b, b + batch))
            .backward();
        opt.step();
        b += batch;
        if (b + batch > (p + 1) * shard) b = p * shard;
      }
      accuracies[i] = accuracy(model, test);
      stats[i] = opt.stats();
      opt.shutdown();
    });
  for (auto& t : threads) t.join();
  MESSAGE("one machine (batch ", batch * peers, "): ", reference, "%");
  for (std::size_t p = 0; p < accuracies.size(); ++p) {
    MESSAGE("peer ", p, ": ", accuracies[p], "%, ", stats[p].averaged, " of ", stats[p].outer_steps,
            " outer steps averaged, last group ", stats[p].last_group_size);
    CHECK(stats[p].averaged >= stats[p].outer_steps * 3 / 4);
    CHECK(accuracies[p] >= reference - 3.0);
  }
}

TEST_CASE("diloco: a newcomer downloads parameters, outer parameters, both optimizers' states and the counters") {
  auto dhts = swarm(2);
  auto a = small_model(1), b = small_model(2);
  torch::optim::SGD sa(a->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9)),
      sb(b->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  auto options = optim::DiLoCoOptions().run_id("diloco_state").local_steps(3);
  options.averager().matchmaking_time(Seconds(0.3));
  optim::DiLoCoOptimizer<> oa(sa, *dhts[0], options);
  auto x = at::randn({8, 784});
  auto y = at::randint(0, 10, {8});
  for (int i = 0; i < 7; ++i) {  // two outer steps alone, one inner step since
    oa.zero_grad();
    torch::nn::functional::cross_entropy(a->forward(x), y).backward();
    oa.step();
  }
  CHECK(oa.stats().outer_steps == 2);
  optim::DiLoCoOptimizer<> ob(sb, *dhts[1], options);
  REQUIRE(test::wait_for([&] { return ob.load_state_from_peers(Seconds(5)); }));
  CHECK(ob.stats().outer_steps == 2);
  CHECK(ob.stats().since_outer == 1);
  auto pa = a->parameters(), pb = b->parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    CHECK(at::equal(pa[i], pb[i]));
    CHECK(at::equal(oa.outer_parameters()[i], ob.outer_parameters()[i]));
  }
}
