// Decentralized mixtures of experts: beam search over the DHT, fault tolerance, and training
// on Fashion-MNIST through experts on several servers, also when some of them die.
#include "../../examples/common/fashion_mnist.hpp"

#include <hive/moe/mixture.hpp>
#include <hive/moe/server.hpp>

#include <doctest/doctest.h>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

#include <atomic>
#include <condition_variable>
#include <optional>
#include <random>

using namespace hive;
using namespace std::chrono_literals;

namespace {

ServerOptions local_server() {
  return ServerOptions().dht(DHTOptions().listen_on("127.0.0.1:0")).update_period(Seconds(60));
}

/// Top k of the `alive` experts of `grid` by brute force: (uid, score), best first.
std::vector<std::pair<std::string, double>> brute_force(const std::vector<std::int64_t>& grid, const std::set<std::string>& alive,
                                                        const float* row, std::size_t k) {
  std::vector<std::tuple<double, std::vector<std::int64_t>, std::string>> all;
  std::vector<std::int64_t> c(grid.size(), 0);
  for (;;) {
    std::string uid = "expert";
    double score = 0;
    std::int64_t offset = 0;
    for (std::size_t d = 0; d < grid.size(); ++d) {
      uid += "." + std::to_string(c[d]);
      score += static_cast<double>(row[offset + c[d]]);
      offset += grid[d];
    }
    if (alive.contains(uid)) all.emplace_back(score, c, uid);
    std::size_t d = grid.size();
    while (d > 0 && ++c[d - 1] == grid[d - 1]) c[--d] = 0;
    if (d == 0) break;
  }
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    return std::get<0>(a) != std::get<0>(b) ? std::get<0>(a) > std::get<0>(b) : std::get<1>(a) < std::get<1>(b);
  });
  std::vector<std::pair<std::string, double>> out;
  for (std::size_t i = 0; i < std::min(k, all.size()); ++i) out.emplace_back(std::get<2>(all[i]), std::get<0>(all[i]));
  return out;
}

std::vector<std::pair<std::string, double>> as_pairs(const std::vector<dht::FoundExpert>& found) {
  std::vector<std::pair<std::string, double>> out;
  for (const auto& f : found) out.emplace_back(f.uid, f.score);
  return out;
}

/// An expert that blocks while `stalled` is set, until released: a server stuck mid-request.
struct Gate {
  std::mutex mutex;
  std::condition_variable cv;
  bool stalled = false;
  void release() {
    std::lock_guard lock(mutex);
    stalled = false;
    cv.notify_all();
  }
};
Gate& stall_gate() {
  static Gate gate;
  return gate;
}
class StallImpl : public torch::nn::Cloneable<StallImpl> {
 public:
  explicit StallImpl(std::int64_t h = 4) : h_(h) { reset(); }
  void reset() override { w = register_parameter("w", at::ones({h_})); }
  at::Tensor forward(const at::Tensor& x) {
    std::unique_lock lock(stall_gate().mutex);
    stall_gate().cv.wait_for(lock, 60s, [] { return !stall_gate().stalled; });
    return x * w;
  }
  at::Tensor w;

 private:
  std::int64_t h_;
};
TORCH_MODULE(Stall);

/// An expert whose output is NaN.
class PoisonImpl : public torch::nn::Cloneable<PoisonImpl> {
 public:
  explicit PoisonImpl(std::int64_t h = 4) : h_(h) { reset(); }
  void reset() override { w = register_parameter("w", at::ones({h_})); }
  at::Tensor forward(const at::Tensor& x) { return x * w * std::numeric_limits<float>::quiet_NaN(); }
  at::Tensor w;

 private:
  std::int64_t h_;
};
TORCH_MODULE(Poison);

/// Four servers on loopback hosting a 4×4 grid of ffn experts, interleaved so that every row
/// and column of the grid spans all four servers: server s hosts expert.i.j with (i+j)%4 == s.
struct Swarm {
  std::vector<std::unique_ptr<DefaultServer>> servers;
  std::unique_ptr<DHT> client;
  explicit Swarm(std::int64_t hidden) {
    for (int s = 0; s < 4; ++s) {
      std::vector<std::string> uids;
      for (int i = 0; i < 4; ++i) uids.push_back(fmt::format("expert.{}.{}", i, (s - i + 4) % 4));
      auto options = local_server();
      if (!servers.empty()) options.dht().initial_peers({servers.front()->address()});
      servers.push_back(std::make_unique<DefaultServer>(
          moe::make_backends("ffn", uids, hidden, moe::BackendOptions().optimizer("adam").learning_rate(1e-3)), options));
    }
    std::vector<std::string> peers;
    for (auto& s : servers) peers.push_back(s->address());
    client = std::make_unique<DHT>(DHTOptions().client_mode(true).initial_peers(peers));
  }
  std::int64_t updates() {
    std::int64_t n = 0;
    for (auto& s : servers)
      for (const auto& uid : s->uids()) n += s->backend(uid).updates();
    return n;
  }
};

/// Test accuracy of `model` on `data`.
template <class F>
double accuracy(F&& model, const examples::Dataset& data) {
  torch::NoGradGuard no_grad;
  at::Tensor predicted = model(data.images).argmax(1);
  return predicted.eq(data.labels).to(at::kFloat).mean().item<double>();
}

/// Trains x → Linear(784, h) → ReLU → mixture → ReLU → Linear(h, 10) on a Fashion-MNIST
/// subset; calls `midway` halfway through. Returns the test accuracy.
template <class Mixture>
double train_fashion(Mixture& mixture, std::int64_t hidden, const std::function<void()>& midway = {},
                     double balancing = 0.0) {
  torch::manual_seed(0);
  static const auto train = examples::load_fashion_mnist(true, 12000);
  static const auto test = examples::load_fashion_mnist(false, 2000);
  torch::nn::Linear in(784, hidden), out(hidden, 10);
  std::vector<at::Tensor> params = in->parameters();
  for (auto& p : out->parameters()) params.push_back(p);
  for (auto& p : mixture->parameters()) params.push_back(p);
  torch::optim::Adam opt(params, torch::optim::AdamOptions(2e-3));
  auto forward = [&](const at::Tensor& x) -> std::pair<at::Tensor, at::Tensor> {
    auto h = torch::relu(in(x));
    if constexpr (std::is_same_v<Mixture, moe::RemoteSwitchMixtureOfExperts>) {
      auto [y, loss] = mixture(h);
      return {out(torch::relu(y)), loss};
    } else {
      return {out(torch::relu(mixture(h))), at::zeros({})};
    }
  };
  constexpr std::int64_t batch = 128, epochs = 3;
  const auto steps_per_epoch = train.images.size(0) / batch;
  std::int64_t step = 0;
  for (std::int64_t epoch = 0; epoch < epochs; ++epoch) {
    auto order = at::randperm(train.images.size(0));
    for (std::int64_t s = 0; s < steps_per_epoch; ++s, ++step) {
      if (midway && step == epochs * steps_per_epoch / 2) midway();
      auto idx = order.narrow(0, s * batch, batch);
      opt.zero_grad();
      auto [logits, aux] = forward(train.images.index_select(0, idx));
      auto loss = torch::nn::functional::cross_entropy(logits, train.labels.index_select(0, idx)) + balancing * aux;
      loss.backward();
      opt.step();
    }
  }
  mixture->eval();
  return accuracy([&](const at::Tensor& x) { return forward(x).first; }, test);
}

}  // namespace

TEST_CASE("moe beam search returns exactly the best experts of a full grid, and alive ones of a sparse grid") {
  DHT dht(DHTOptions().listen_on("127.0.0.1:0"));
  const std::vector<std::int64_t> grid{3, 4, 5};
  std::vector<std::string> uids = dht::expand_uid_pattern("expert.[0:3].[0:4].[0:5]");
  std::mt19937 rng(5);
  std::vector<std::string> sparse;
  for (const auto& uid : uids)
    if (rng() % 3 != 0) sparse.push_back(uid);
  // Each expert "served" at its own address; only the DHT records matter here.
  for (std::size_t i = 0; i < uids.size(); ++i)
    REQUIRE(dht::declare_experts(dht, {uids[i]}, fmt::format("10.0.{}.{}:1", i / 250, i % 250), wall_time() + 600)[0]);
  DHT other(DHTOptions().listen_on("127.0.0.1:0"));
  for (const auto& uid : sparse) REQUIRE(dht::declare_experts(other, {uid}, "10.1.0.1:1", wall_time() + 600)[0]);

  auto scores = at::randn({16, 3 + 4 + 5});
  const float* s = scores.data_ptr<float>();
  auto full = dht::ExpertDirectory::over(dht, "expert", grid);
  for (std::size_t k : {1u, 4u, 7u}) {
    auto found = full->find_best(std::span<const float>(s, 16 * 12), 16, k);
    for (std::size_t b = 0; b < 16; ++b) {
      CAPTURE(b);
      CAPTURE(k);
      auto expected = brute_force(grid, {uids.begin(), uids.end()}, s + b * 12, k);
      auto got = as_pairs(found[b]);
      REQUIRE(got.size() == expected.size());
      for (std::size_t i = 0; i < got.size(); ++i) {
        CHECK(got[i].first == expected[i].first);
        CHECK(got[i].second == doctest::Approx(expected[i].second));
      }
    }
  }
  // A sparse grid (a third of the experts missing) in a separate swarm, under another prefix.
  DHT sparse_dht(DHTOptions().listen_on("127.0.0.1:0").initial_peers(other.visible_addresses()));
  auto holes = dht::ExpertDirectory::over(sparse_dht, "expert", grid);
  // With a beam as wide as the grid, exact; with beam = k, alive experts, best first.
  auto exact = holes->find_best(std::span<const float>(s, 16 * 12), 16, 4, 60);
  auto narrow = holes->find_best(std::span<const float>(s, 16 * 12), 16, 4);
  const std::set<std::string> alive(sparse.begin(), sparse.end());
  for (std::size_t b = 0; b < 16; ++b) {
    CHECK(as_pairs(exact[b]) == brute_force(grid, alive, s + b * 12, 4));
    CHECK(narrow[b].size() == 4);
    for (std::size_t i = 0; i < narrow[b].size(); ++i) {
      CHECK(alive.contains(narrow[b][i].uid));
      if (i > 0) CHECK(narrow[b][i - 1].score >= narrow[b][i].score);
    }
  }
  // Lookups are shared by the batch and cached: a second search makes none.
  const auto lookups = holes->lookups();
  CHECK(lookups <= 1 + 3 + 3 * 4);
  (void)holes->find_best(std::span<const float>(s, 16 * 12), 16, 4);
  CHECK(holes->lookups() == lookups);
  // An empty prefix is looked up once, then remembered as empty.
  auto ghost = dht::ExpertDirectory::over(dht, "ghost", {4});
  CHECK(ghost->find_best(std::span<const float>(s, 4), 1, 2)[0].empty());
  CHECK(ghost->find_best(std::span<const float>(s, 4), 1, 2)[0].empty());
  CHECK(ghost->lookups() == 1);
  // A reported failure is left out: the best is then the runner-up (a full-width beam, since a
  // narrow one may not hold the runner-up's branch).
  const auto best2 = brute_force(grid, {uids.begin(), uids.end()}, s, 2);
  full->report_failure(best2[0].first);
  CHECK(as_pairs(full->find_best(std::span<const float>(s, 12), 1, 1, 60)[0])[0].first == best2[1].first);
  CHECK(full->is_banned(best2[0].first));
}

TEST_CASE("moe mixture: one batched call per expert, a stalled expert is left out after timeout_after_k_min, backward only to those that answered") {
  auto& gate = stall_gate();
  DefaultServer good(moe::make_backends("ffn", {"expert.0"}, 8), local_server());
  std::vector<moe::ModuleBackend<Stall>> stalled_backends;
  stalled_backends.emplace_back("expert.1", Stall(8), std::vector<at::Tensor>{at::zeros({1, 8})});
  Server<net::Tcp, dht::Kademlia<>, moe::PriorityBatcher<>, moe::ModuleBackend<Stall>> slow(
      std::move(stalled_backends), local_server().dht(DHTOptions().listen_on("127.0.0.1:0").initial_peers({good.address()})));
  DHT client(DHTOptions().client_mode(true).initial_peers({good.address(), slow.address()}));
  struct Release {
    Gate& g;
    ~Release() { g.release(); }
  } release{gate};

  moe::RemoteMixtureOfExperts mixture(
      moe::MixtureOptions(8, "expert", {2}).k_best(2).k_min(1).timeout_after_k_min(Seconds(0.3)).forward_timeout(Seconds(20)),
      client);
  // Both answer: one call each for the whole batch.
  auto x = at::randn({32, 8}).requires_grad_();
  auto y = mixture(x);
  CHECK(y.sizes() == at::IntArrayRef{32, 8});
  CHECK(mixture->last_stats().experts_found == 2);
  CHECK(mixture->last_stats().experts_answered == 2);
  CHECK(good.scheduler().stats()[0].batches == 1);
  CHECK(good.scheduler().stats()[0].rows == 32);
  y.sum().backward();
  CHECK(good.backend("expert.0").updates() == 1);
  CHECK(slow.backend("expert.1").updates() == 1);
  // More rows than max_rows_per_call: several calls to the same expert, same result.
  moe::RemoteMixtureOfExperts chunked(
      moe::MixtureOptions(8, "expert", {2}).k_best(2).max_rows_per_call(10).forward_timeout(Seconds(20)), client);
  chunked->gate->weight.data().copy_(mixture->gate->weight.data());
  chunked->gate->bias.data().copy_(mixture->gate->bias.data());
  auto x3 = at::randn({25, 8});
  CHECK(at::allclose(chunked(x3), mixture(x3), 1e-5, 1e-5));
  CHECK(chunked->last_stats().experts_answered == 2);
  CHECK(good.scheduler().stats()[0].rows == 32 + 25 + 25);

  // expert.1 stalls: the layer answers with expert.0 alone, after about timeout_after_k_min.
  {
    std::lock_guard lock(gate.mutex);
    gate.stalled = true;
  }
  const auto start = SteadyClock::now();
  auto x2 = at::randn({4, 8}).requires_grad_();
  auto y2 = mixture(x2);
  CHECK(SteadyClock::now() - start < 10s);
  CHECK(mixture->last_stats().experts_answered == 1);
  CHECK(mixture->last_stats().calls_failed == 1);
  // With one answer the softmax weight is 1: the output is expert.0's own.
  CHECK(at::allclose(y2, good.backend("expert.0").forward({x2.detach()})[0], 1e-4, 1e-4));
  y2.sum().backward();
  CHECK(good.backend("expert.0").updates() == 2);
  CHECK(slow.backend("expert.1").updates() == 1);  // no backward for the expert that did not answer
  // The stalled expert is now left out of the search.
  CHECK(mixture->directory()->is_banned("expert.1"));
  gate.release();
}

TEST_CASE("moe mixture: no answer raises unless allow_zero_outputs, and detect_anomalies drops non-finite experts") {
  std::vector<moe::ModuleBackend<Poison>> poison;
  poison.emplace_back("bad.0", Poison(4), std::vector<at::Tensor>{at::zeros({1, 4})});
  Server<net::Tcp, dht::Kademlia<>, moe::PriorityBatcher<>, moe::ModuleBackend<Poison>> bad(std::move(poison), local_server());
  DefaultServer fine(moe::make_backends("ffn", {"bad.1"}, 4),
                     local_server().dht(DHTOptions().listen_on("127.0.0.1:0").initial_peers({bad.address()})));
  DHT client(DHTOptions().client_mode(true).initial_peers({bad.address()}));
  auto x = at::randn({3, 4});
  moe::RemoteMixtureOfExperts trusting(moe::MixtureOptions(4, "bad", {2}).k_best(2), client);
  CHECK(at::isnan(trusting(x)).any().item<bool>());
  moe::RemoteMixtureOfExperts careful(moe::MixtureOptions(4, "bad", {2}).k_best(2).detect_anomalies(true), client);
  auto y = careful(x);
  CHECK(at::isfinite(y).all().item<bool>());
  CHECK(careful->last_stats().experts_answered == 1);

  // Only the poisoned expert: nobody answers.
  moe::RemoteMixtureOfExperts lonely(moe::MixtureOptions(4, "bad", {2}).k_best(1).detect_anomalies(true), client);
  lonely->gate->bias.data().copy_(at::tensor({10.0f, -10.0f}));  // always choose bad.0
  lonely->gate->weight.data().zero_();
  CHECK_THROWS_WITH_AS((void)lonely(x), doctest::Contains("no expert answered for sample 0"), Error);
  moe::RemoteMixtureOfExperts forgiving(
      moe::MixtureOptions(4, "bad", {2}).k_best(1).detect_anomalies(true).allow_zero_outputs(true), client);
  forgiving->gate->bias.data().copy_(at::tensor({10.0f, -10.0f}));
  forgiving->gate->weight.data().zero_();
  CHECK(forgiving(x).abs().sum().item<double>() == 0);
  // No experts under a prefix at all.
  moe::RemoteMixtureOfExperts nowhere(moe::MixtureOptions(4, "nobody", {3}), client);
  CHECK_THROWS_WITH_AS((void)nowhere(x), doctest::Contains("no alive experts found under 'nobody.'"), Error);
  CHECK_THROWS_AS((void)careful(at::randn({3, 5})), InvalidArgument);
}

TEST_CASE("moe mixture of 16 experts on 4 servers trains a Fashion-MNIST classifier to at least 80%") {
  constexpr std::int64_t hidden = 64;
  Swarm swarm(hidden);
  moe::RemoteMixtureOfExperts mixture(moe::MixtureOptions(hidden, "expert", {4, 4}).k_best(4), *swarm.client);
  const double acc = train_fashion(mixture, hidden);
  MESSAGE("test accuracy " << acc);
  CHECK(acc >= 0.80);
  CHECK(swarm.updates() > 0);
}

TEST_CASE("moe mixture keeps training to at least 80% when a quarter of the servers die midway") {
  constexpr std::int64_t hidden = 64;
  Swarm swarm(hidden);
  moe::RemoteMixtureOfExperts mixture(moe::MixtureOptions(hidden, "expert", {4, 4}).k_best(4).timeout_after_k_min(Seconds(0.5)),
                                      *swarm.client);
  std::size_t answered_after = 0;
  const double acc = train_fashion(mixture, hidden, [&] {
    swarm.servers[3]->shutdown();  // its experts' records stay in the DHT until they expire
  });
  answered_after = mixture->last_stats().experts_answered;
  MESSAGE("test accuracy " << acc << " with " << answered_after << " experts answering at the end");
  CHECK(acc >= 0.80);
  CHECK(answered_after <= 12);
}

TEST_CASE("moe switch mixture trains with top-1 routing and a load-balancing loss") {
  constexpr std::int64_t hidden = 64;
  Swarm swarm(hidden);
  moe::RemoteSwitchMixtureOfExperts mixture(moe::MixtureOptions(hidden, "expert", {4, 4}).k_best(1), *swarm.client);
  const double acc = train_fashion(mixture, hidden, {}, 0.01);
  MESSAGE("switch test accuracy " << acc);
  CHECK(acc >= 0.80);
  // The balancing loss kept several experts in use.
  std::int64_t used = 0;
  for (auto& s : swarm.servers)
    for (const auto& uid : s->uids()) used += s->backend(uid).updates() > 0;
  CHECK(used >= 4);
  for (const auto& u : mixture->utilization) CHECK(u.sum().item<double>() == doctest::Approx(1.0).epsilon(0.01));
}
