// The decentralized-training quickstart (docs/averaging.md), on loopback, in one process.
//
// Part A: two peers average a tensor with DecentralizedAverager; both end with the mean.
// Part B: two trainers fit a linear regression, each on its own samples, averaging their
// parameters in the background; the second joins late and first downloads the state of the
// first. A last synchronous round leaves both with the same parameters.
//
// Exits 0 when both parts end with equal tensors (and the second part learned the task), 1
// otherwise. Run it as build/examples/averaging_quickstart.

#include <hive/hive.hpp>

#include <atomic>
#include <latch>
#include <thread>

using namespace std::chrono_literals;

namespace {

/// A tensor's values, for printing.
std::vector<double> values(const at::Tensor& t) {
  const auto d = t.detach().to(at::kDouble).contiguous();
  return {d.data_ptr<double>(), d.data_ptr<double>() + d.numel()};
}

}  // namespace

int main() try {
  // Two DHT peers: the first starts a swarm, the second joins it.
  hive::DHT first(hive::DHTOptions().listen_on("127.0.0.1:0"));
  const auto join = first.visible_addresses();  // e.g. {"127.0.0.1:40123"}
  hive::DHT second(hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(join));

  std::atomic<bool> ok = true;  // false as soon as a check fails

  // ----- Part A: average one tensor -----
  {
    std::vector<at::Tensor> a{torch::tensor({1.0, 2.0, 3.0, 4.0})};
    std::vector<at::Tensor> b{torch::tensor({5.0, 6.0, 7.0, 8.0})};
    const auto options = hive::averaging::AveragerOptions().prefix("quickstart_a").target_group_size(2).matchmaking_time(2s);
    hive::averaging::DecentralizedAverager<> averager_a(first, a, options);
    hive::averaging::DecentralizedAverager<> averager_b(second, b, options);

    auto ra = averager_a.async_step();  // both look for a group at the same time
    auto rb = averager_b.async_step();
    const auto result_a = ra.get(), result_b = rb.get();  // a and b now both hold 3 4 5 6
    fmt::print("part A: {} (group of {}), {} (group of {})\n", result_a ? "ok" : result_a.error, result_a.group_size,
               result_b ? "ok" : result_b.error, result_b.group_size);
    fmt::print("part A: a = [{}], b = [{}]\n", fmt::join(values(a[0]), " "), fmt::join(values(b[0]), " "));
    const auto mean = torch::tensor({3.0, 4.0, 5.0, 6.0});
    if (!result_a || !result_b || !torch::allclose(a[0], mean) || !torch::allclose(b[0], mean)) ok = false;
  }

  // ----- Part B: train together -----
  // A regression task, y = x·w + 0.5 + noise: each peer has its own 2048 samples.
  struct Data {
    at::Tensor x, y;
  };
  const auto w_true = torch::linspace(-1, 1, 8).unsqueeze(1);
  auto make_data = [&](int seed, std::int64_t n) {
    torch::manual_seed(seed);
    auto x = torch::randn({n, 8});
    return Data{x, x.mm(w_true) + 0.5 + 0.1 * torch::randn({n, 1})};
  };
  const std::vector<Data> shards{make_data(0, 2048), make_data(1, 2048)};
  const auto test = make_data(2, 1000);

  // The default policies, spelled out: TCP, Kademlia routing, butterfly all-reduce.
  using Trainer = hive::Trainer<hive::net::Tcp, hive::dht::Kademlia<>, hive::averaging::Butterfly>;
  constexpr int steps = 200;
  std::latch first_is_training(1);  // the second peer joins once the first has trained a while
  std::latch done_training(2);
  std::vector<torch::nn::Linear> models;
  for (int peer = 0; peer < 2; ++peer) models.emplace_back(8, 1);

  auto train = [&](int peer) {
    auto& model = models[static_cast<std::size_t>(peer)];
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    auto options = hive::optim::DecentralizedOptions()
                       .prefix("quickstart_b")
                       .target_group_size(2)
                       .averaging_steps_period(20)  // a background round every 20 local steps
                       .verbose(true);              // log each round
    options.averager().matchmaking_time(1s);
    if (peer == 1) first_is_training.wait();
    Trainer trainer(sgd, hive::TrainerOptions()
                             .dht(hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(join))
                             .optimizer(options));
    if (peer == 1) {
      // A newcomer starts from the swarm's state: parameters, momentum, step counter.
      const bool loaded = trainer.load_state_from_peers(10s);
      fmt::print("peer 1: {} (step {})\n", loaded ? "loaded the state of peer 0" : "found no state to load",
                 trainer.optimizer().local_step());
      if (!loaded) ok = false;
    }
    const auto& data = shards[static_cast<std::size_t>(peer)];
    for (int step = 0; step < steps; ++step) {
      const auto begin = (step * 32) % 2048;
      trainer.zero_grad();
      auto loss = torch::mse_loss(model(data.x.slice(0, begin, begin + 32)), data.y.slice(0, begin, begin + 32));
      loss.backward();
      trainer.step();  // the SGD step, then (every 20 steps) hand the parameters to a background round
      std::this_thread::sleep_for(5ms);  // stands in for a real model's compute
      if (peer == 0 && step == 50) first_is_training.count_down();
      if (step % 50 == 0)
        fmt::print("peer {}: step {:3d} loss {:.4f}\n", peer, trainer.optimizer().local_step(), loss.item<double>());
    }
    // The peers finish at different times: let any background round finish, then average
    // once more, together, so that both end with the same parameters.
    trainer.optimizer().wait_for_round(5s);
    done_training.arrive_and_wait();
    const auto last = trainer.optimizer().average_now();
    const auto stats = trainer.optimizer().stats();
    torch::NoGradGuard no_grad;
    const auto test_loss = torch::mse_loss(model(test.x), test.y).item<double>();
    fmt::print("peer {}: final round {}, {} of {} rounds averaged, test loss {:.4f}\n", peer, last ? "ok" : last.error,
               stats.averaged, stats.rounds, test_loss);
    if (!last || test_loss > 0.05) ok = false;  // the noise alone gives 0.01
  };
  std::thread peer0(train, 0), peer1(train, 1);
  peer0.join();
  peer1.join();

  for (int peer = 0; peer < 2; ++peer) {
    const auto& w = models[static_cast<std::size_t>(peer)]->weight;
    fmt::print("peer {}: w = [{:.3f}], b = {:.3f}\n", peer, fmt::join(values(w), " "),
               models[static_cast<std::size_t>(peer)]->bias.item<double>());
  }
  if (!torch::equal(models[0]->weight, models[1]->weight) || !torch::equal(models[0]->bias, models[1]->bias)) ok = false;
  fmt::print("{}\n", ok ? "both parts ended with equal tensors" : "FAILED (see above)");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "averaging_quickstart: {}\n", e.what());
  return 1;
}
