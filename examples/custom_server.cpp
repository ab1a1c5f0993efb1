// A compile-time configured server: the expert type, the scheduler and the transport are
// template arguments, and the expert is a module of the user's own (docs/moe.md).
//
//   custom_server            serve two GatedMLP experts, train them from a client in this
//                            process for a few steps, print the loss, exit
//   custom_server --serve    serve until SIGINT (listen address: --listen_on, default 127.0.0.1:0)

#include <hive/hive.hpp>

#include "common/cli.hpp"

#include <asio/signal_set.hpp>

#include <csignal>
#include <iostream>

/// The user's expert: a gated MLP, out = W2 (silu(W1 x) * (V x)).
class GatedMLPImpl : public torch::nn::Cloneable<GatedMLPImpl> {
 public:
  explicit GatedMLPImpl(std::int64_t hidden_dim) : hidden_dim_(hidden_dim) { reset(); }
  void reset() override {
    w1 = register_module("w1", torch::nn::Linear(hidden_dim_, 2 * hidden_dim_));
    v = register_module("v", torch::nn::Linear(hidden_dim_, 2 * hidden_dim_));
    w2 = register_module("w2", torch::nn::Linear(2 * hidden_dim_, hidden_dim_));
  }
  torch::Tensor forward(const torch::Tensor& x) { return w2(torch::silu(w1(x)) * v(x)); }

  torch::nn::Linear w1{nullptr}, v{nullptr}, w2{nullptr};

 private:
  std::int64_t hidden_dim_;
};
TORCH_MODULE(GatedMLP);

/// Every policy spelled out: TCP, Kademlia with k=20 and alpha=3, batches of at most 1024
/// rows, and a backend that holds GatedMLP modules (no type erasure).
using MyServer = hive::Server<hive::net::Tcp, hive::dht::Kademlia<20, 3>, hive::moe::PriorityBatcher<1024>,
                              hive::moe::ModuleBackend<GatedMLP>>;

int main(int argc, char** argv) try {
  bool serve = false;
  std::string listen_on = "127.0.0.1:0";
  for (int i = 1; i < argc; ++i) {
    const std::string flag = hive::examples::flag_name(argv[i]);
    if (flag == "--serve") serve = true;
    else if (flag == "--listen_on" && i + 1 < argc) listen_on = argv[++i];
    else if (flag == "--help") {
      std::cout << "usage: custom_server [--serve] [--listen_on HOST:PORT]\n";
      return 0;
    } else {
      throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
    }
  }

  constexpr std::int64_t hidden = 64;
  std::vector<hive::moe::ModuleBackend<GatedMLP>> backends;
  for (const auto& uid : {"gated.0", "gated.1"})
    backends.emplace_back(uid, GatedMLP(hidden), std::vector<torch::Tensor>{torch::zeros({1, hidden})},
                          hive::moe::BackendOptions().optimizer("adam").learning_rate(1e-3));
  MyServer server(std::move(backends), hive::ServerOptions().dht(hive::DHTOptions().listen_on(listen_on)));
  fmt::print("serving gated.0 and gated.1 at {}\n", server.address());
  std::fflush(stdout);

  if (serve) {
    asio::io_context io;
    asio::signal_set signals(io, SIGINT, SIGTERM);
    signals.async_wait([](std::error_code, int) {});
    io.run();
    server.shutdown();
    fmt::print("stopped\n");
    return 0;
  }

  // A client: regress a fixed target through both experts in sequence.
  hive::moe::RemoteExpert first("gated.0", server.address()), second("gated.1", server.address());
  torch::manual_seed(0);
  auto x = torch::randn({32, hidden});
  auto target = torch::tanh(x.flip(1));
  double loss0 = 0, loss = 0;
  for (int step = 0; step < 30; ++step) {
    auto l = torch::mse_loss(second(first(x)), target);
    l.backward();  // each backward is one Adam step on the server, for both experts
    loss = l.item<double>();
    if (step == 0) loss0 = loss;
    if (step % 10 == 0) fmt::print("step {:2d}  loss {:.4f}\n", step, loss);
  }
  fmt::print("loss {:.4f} -> {:.4f}; gated.0 took {} updates\n", loss0, loss, server.backend("gated.0").updates());
  return loss < loss0 ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "custom_server: {}\n", e.what());
  return 1;
}
