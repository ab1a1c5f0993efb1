// A decentralized mixture of experts trained on Fashion-MNIST: a few local servers host a grid
// of ffn experts; the client's model routes each image's features to its best experts
// (beam search over the DHT) and trains the gate, its own layers and, through the backward
// calls, the experts. A progress bar shows the loss and how many experts answer.
//
//   moe_fashion_mnist [--servers 4] [--grid 4,4] [--hidden 64] [--k_best 4] [--epochs 3]
//                     [--train_samples 20000] [--batch 128] [--switch]
//                     [--kill_servers 1 --kill_at 0.5]   (stop servers part-way: training goes on)

#include "common/cli.hpp"
#include "common/fashion_mnist.hpp"

#include <hive/hive.hpp>

#include <unistd.h>

#include <iostream>
#include <memory>
#include <sstream>

namespace {

constexpr const char* usage = R"(usage: moe_fashion_mnist [options]

Trains Linear(784, h) -> ReLU -> mixture of remote experts -> ReLU -> Linear(h, 10) on
Fashion-MNIST (/usr/share/datasets/fashion-mnist) with experts hosted by local servers.

  --servers N         servers started in this process (default 4)
  --grid A,B,...      expert grid; server s hosts the experts whose coordinates sum to s mod N (default 4,4)
  --hidden H          width of the experts and of the model (default 64)
  --k_best K          experts per sample (default 4; the switch variant uses 1)
  --epochs E          (default 3)
  --train_samples N   training images used (default 20000; at most 60000)
  --batch B           (default 128)
  --switch            use the switch mixture (top-1 routing, load-balancing loss)
  --kill_servers N    stop N servers part-way (default 0)
  --kill_at F         when to stop them, as a fraction of training (default 0.5)
)";

std::vector<std::int64_t> parse_grid(const std::string& s) {
  std::vector<std::int64_t> grid;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');) grid.push_back(std::stoll(part));
  return grid;
}

}  // namespace

int main(int argc, char** argv) try {
  int servers_n = 4, k_best = 4, epochs = 3, kill = 0;
  std::int64_t hidden = 64, train_samples = 20000, batch = 128;
  double kill_at = 0.5;
  bool use_switch = false;
  std::vector<std::int64_t> grid{4, 4};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = hive::examples::flag_name(argv[i]);
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw hive::InvalidArgument(fmt::format("{} needs a value (see --help)", flag));
      return argv[++i];
    };
    if (flag == "--help") {
      std::cout << usage;
      return 0;
    } else if (flag == "--servers") servers_n = std::stoi(value());
    else if (flag == "--grid") grid = parse_grid(value());
    else if (flag == "--hidden") hidden = std::stoll(value());
    else if (flag == "--k_best") k_best = std::stoi(value());
    else if (flag == "--epochs") epochs = std::stoi(value());
    else if (flag == "--train_samples") train_samples = std::stoll(value());
    else if (flag == "--batch") batch = std::stoll(value());
    else if (flag == "--switch") use_switch = true;
    else if (flag == "--kill_servers") kill = std::stoi(value());
    else if (flag == "--kill_at") kill_at = std::stod(value());
    else throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
  }
  HIVE_CHECK(servers_n >= 1 && kill >= 0 && kill < servers_n, "need at least one server left alive");

  // Servers: every expert of the grid, spread so that neighbours in the grid live on
  // different servers (losing a server then costs each sample at most some of its experts).
  std::vector<std::vector<std::string>> hosted(static_cast<std::size_t>(servers_n));
  std::string pattern = "expert";
  for (auto g : grid) pattern += fmt::format(".[0:{}]", g);
  for (const auto& uid : hive::dht::expand_uid_pattern(pattern)) {
    std::int64_t sum = 0;
    for (auto c : hive::dht::parse_uid(uid).second) sum += c;
    hosted[static_cast<std::size_t>(sum % servers_n)].push_back(uid);
  }
  std::vector<std::unique_ptr<hive::DefaultServer>> servers;
  std::vector<std::string> addresses;
  for (const auto& uids : hosted) {
    if (uids.empty()) continue;
    auto options = hive::ServerOptions().dht(hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(addresses));
    servers.push_back(std::make_unique<hive::DefaultServer>(
        hive::moe::make_backends("ffn", uids, hidden, hive::moe::BackendOptions().optimizer("adam").learning_rate(1e-3)),
        options));
    addresses.push_back(servers.back()->address());
  }
  const auto total_experts = hive::dht::expand_uid_pattern(pattern).size();
  fmt::print("{} servers host {} experts on grid [{}]; first server at {}\n", servers.size(), total_experts,
             fmt::join(grid, ", "), addresses.front());

  hive::DHT dht(hive::DHTOptions().client_mode(true).initial_peers(addresses));
  auto options = hive::moe::MixtureOptions(hidden, "expert", grid).k_best(use_switch ? 1 : k_best).timeout_after_k_min(hive::Seconds(0.5));
  hive::moe::RemoteMixtureOfExperts mixture(nullptr);
  hive::moe::RemoteSwitchMixtureOfExperts switch_mixture(nullptr);
  if (use_switch) switch_mixture = hive::moe::RemoteSwitchMixtureOfExperts(options, dht);
  else mixture = hive::moe::RemoteMixtureOfExperts(options, dht);

  const auto train = hive::examples::load_fashion_mnist(true, train_samples);
  const auto test = hive::examples::load_fashion_mnist(false);
  torch::manual_seed(0);
  torch::nn::Linear in(784, hidden), out(hidden, 10);
  std::vector<torch::Tensor> params = in->parameters();
  for (auto& p : out->parameters()) params.push_back(p);
  for (auto& p : use_switch ? switch_mixture->parameters() : mixture->parameters()) params.push_back(p);
  torch::optim::Adam opt(params, torch::optim::AdamOptions(2e-3));

  // Returns the logits, the balancing loss (0 without --switch) and the experts that answered.
  auto model = [&](const torch::Tensor& x) -> std::tuple<torch::Tensor, torch::Tensor, std::size_t> {
    auto h = torch::relu(in(x));
    if (use_switch) {
      auto [y, balance] = switch_mixture(h);
      return {out(torch::relu(y)), balance, switch_mixture->last_stats().experts_answered};
    }
    auto y = mixture(h);
    return {out(torch::relu(y)), torch::zeros({}), mixture->last_stats().experts_answered};
  };

  const auto steps_per_epoch = train.images.size(0) / batch;
  const auto total_steps = steps_per_epoch * epochs;
  const auto kill_step = static_cast<std::int64_t>(kill_at * static_cast<double>(total_steps));
  const bool tty = isatty(STDOUT_FILENO);
  std::int64_t step = 0;
  for (int epoch = 0; epoch < epochs; ++epoch) {
    auto order = torch::randperm(train.images.size(0));
    double loss_avg = 0;
    for (std::int64_t s = 0; s < steps_per_epoch; ++s, ++step) {
      if (kill > 0 && step == kill_step) {
        for (int k = 0; k < kill; ++k) servers[servers.size() - 1 - static_cast<std::size_t>(k)]->shutdown();
        fmt::print("{}stopped {} of {} servers at step {}\n", tty ? "\n" : "", kill, servers.size(), step);
      }
      auto idx = order.narrow(0, s * batch, batch);
      opt.zero_grad();
      auto [logits, balance, live] = model(train.images.index_select(0, idx));
      auto loss = torch::nn::functional::cross_entropy(logits, train.labels.index_select(0, idx)) + 0.01 * balance;
      loss.backward();
      opt.step();
      loss_avg = s == 0 ? loss.item<double>() : 0.95 * loss_avg + 0.05 * loss.item<double>();
      if (tty || s % 20 == 0 || s + 1 == steps_per_epoch) {
        constexpr int width = 30;
        const int filled = static_cast<int>(width * (s + 1) / steps_per_epoch);
        fmt::print("{}epoch {}/{} [{}{}] {:3d}%  loss {:.3f}  live experts {}/{}{}", tty ? "\r" : "", epoch + 1, epochs,
                   std::string(static_cast<std::size_t>(filled), '#'), std::string(static_cast<std::size_t>(width - filled), '.'),
                   100 * (s + 1) / steps_per_epoch, loss_avg, live, total_experts, tty ? "" : "\n");
        std::fflush(stdout);
      }
    }
    torch::NoGradGuard no_grad;
    if (use_switch) switch_mixture->eval();
    else mixture->eval();
    // In batches, to bound memory (calls are split at max_rows_per_call anyway).
    std::int64_t correct = 0;
    std::size_t live = 0;
    for (std::int64_t at = 0; at < test.images.size(0); at += 1000) {
      const auto n = std::min<std::int64_t>(1000, test.images.size(0) - at);
      auto [logits, balance, answered] = model(test.images.narrow(0, at, n));
      correct += logits.argmax(1).eq(test.labels.narrow(0, at, n)).sum().item<std::int64_t>();
      live = answered;
    }
    const double acc = static_cast<double>(correct) / static_cast<double>(test.images.size(0));
    if (use_switch) switch_mixture->train();
    else mixture->train();
    fmt::print("{}epoch {}: test accuracy {:.2f}% ({} experts answered)\n", tty ? "\n" : "", epoch + 1, 100 * acc, live);
  }
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "moe_fashion_mnist: {}\n", e.what());
  return 1;
}
