// The remote-experts quickstart (docs/moe.md): look up two experts in the DHT and train
// proj_out(expert1(expert4(x))) through them; the loss falls as the local layer and both
// remote experts learn. Then the same experts as a mixture (grid (5,), k_best 2).
//
// With a server running elsewhere:
//   hive-server --expert_cls ffn --hidden_dim 512 --num_experts 5 --listen_on 127.0.0.1:1337
//   moe_quickstart --initial_peers 127.0.0.1:1337
// Without --initial_peers it starts such a server inside this process first.

#include <hive/hive.hpp>

#include "common/cli.hpp"

#include <iostream>
#include <memory>
#include <optional>

int main(int argc, char** argv) try {
  std::string initial_peer;
  std::int64_t hidden_dim = 512;
  int steps = 100, mixture_steps = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = hive::examples::flag_name(argv[i]);
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw hive::InvalidArgument(fmt::format("{} needs a value", flag));
      return argv[++i];
    };
    if (flag == "--initial_peers") initial_peer = value();
    else if (flag == "--hidden_dim") hidden_dim = std::stoll(value());
    else if (flag == "--steps") steps = std::stoi(value());
    else if (flag == "--mixture_steps") mixture_steps = std::stoi(value());
    else if (flag == "--help") {
      std::cout << "usage: moe_quickstart [--initial_peers HOST:PORT] [--hidden_dim 512] [--steps 100] [--mixture_steps 20]\n";
      return 0;
    } else {
      throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
    }
  }

  // Stand-in for `hive-server --expert_cls ffn --hidden_dim 512 --num_experts 5` when no swarm was given.
  std::optional<hive::DefaultServer> server;
  if (initial_peer.empty()) {
    server.emplace(hive::moe::make_backends("ffn", hive::dht::expand_uid_pattern("expert.[0:5]"), hidden_dim),
                   hive::ServerOptions().dht(hive::DHTOptions().listen_on("127.0.0.1:0")));
    initial_peer = server->address();
    fmt::print("started a server with experts expert.0 ... expert.4 at {}\n", initial_peer);
  }

  // A client-only DHT peer: it looks experts up but stores nothing for others.
  hive::DHT dht(hive::DHTOptions().initial_peers({initial_peer}).client_mode(true));
  auto experts = hive::moe::get_experts(dht, {"expert.1", "expert.4"});
  HIVE_CHECK(experts[0] && experts[1], "the server hasn't declared expert.1 and expert.4 (yet?)");
  auto& expert1 = experts[0];
  auto& expert4 = experts[1];
  fmt::print("found {} and {}\n", expert1->address(), expert4->address());

  torch::manual_seed(0);
  torch::nn::Linear proj_out(hidden_dim, 10);
  torch::optim::SGD opt(proj_out->parameters(), torch::optim::SGDOptions(0.05));
  auto x = torch::randn({16, hidden_dim});
  auto y = torch::randint(0, 10, {16});
  double first = 0, last = 0;
  for (int step = 0; step < steps; ++step) {
    opt.zero_grad();
    // Forward runs on the server; backward sends gradients back and the experts take a step.
    auto logits = proj_out(expert1(expert4(x)));
    auto loss = torch::nn::functional::cross_entropy(logits, y);
    loss.backward();
    opt.step();
    last = loss.item<double>();
    if (step == 0) first = last;
    if (step % 10 == 0 || step + 1 == steps) fmt::print("step {:3d}  loss {:.4f}\n", step, last);
  }
  fmt::print("loss went from {:.4f} to {:.4f}\n", first, last);

  // The same experts as a decentralized mixture: a gate over grid (5,) picks the 2 best
  // experts per sample, found by beam search in the DHT.
  hive::moe::RemoteMixtureOfExperts dmoe(hive::moe::MixtureOptions(hidden_dim, "expert", {5}).k_best(2), dht);
  torch::optim::SGD mixture_opt(dmoe->parameters(), torch::optim::SGDOptions(0.05));
  double mixture_first = 0, mixture_last = 0;
  for (int step = 0; step < mixture_steps; ++step) {
    mixture_opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(proj_out(dmoe(x)), y);
    loss.backward();
    mixture_opt.step();
    mixture_last = loss.item<double>();
    if (step == 0) mixture_first = mixture_last;
  }
  if (mixture_steps > 0)
    fmt::print("mixture (grid (5,), k_best 2): loss went from {:.4f} to {:.4f}\n", mixture_first, mixture_last);
  return last < first && (mixture_steps == 0 || mixture_last < mixture_first) ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "moe_quickstart: {}\n", e.what());
  return 1;
}
