// hive_demo: a small local swarm that trains.
//
// Each peer is a DHT peer on loopback TCP: the first starts the swarm, the others join through
// it, and every peer announces itself in the DHT dictionary "demo.peers". Each fits its own
// shard of a linear-regression problem with plain SGD; every few steps it reads the swarm's
// members from the DHT, pulls the parameters of a random other peer over RPC on the same port
// (compressed tensors) and averages them into its own. The swarm ends near the true weights
// although no peer saw all the data.
//
//   hive_demo [--peers N] [--steps S] [--gossip_every K] [--dim D] [--lr LR]
//             [--compression none|float16|uniform8|quantile8]

#include <hive/core/tensor_codec.hpp>
#include <hive/dht/dht.hpp>

#include <torch/torch.h>

#include <fmt/format.h>

#include <mutex>
#include <random>
#include <string>
#include <vector>

using namespace std::chrono_literals;

namespace {

struct Args {
  int peers = 4;
  int steps = 300;
  int gossip_every = 5;
  int dim = 256;
  double lr = 0.05;
  hive::Compression compression = hive::Compression::float16;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument("missing value for " + k);
      return argv[++i];
    };
    if (k == "--peers") a.peers = std::stoi(value());
    else if (k == "--steps") a.steps = std::stoi(value());
    else if (k == "--gossip_every") a.gossip_every = std::stoi(value());
    else if (k == "--dim") a.dim = std::stoi(value());
    else if (k == "--lr") a.lr = std::stod(value());
    else if (k == "--compression") a.compression = nlohmann::json(value()).get<hive::Compression>();
    else if (k == "--help" || k == "-h") {
      fmt::print("usage: hive_demo [--peers N] [--steps S] [--gossip_every K] [--dim D] [--lr LR] [--compression C]\n");
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown flag " + k + " (see --help)");
    }
  }
  HIVE_CHECK(a.peers >= 2, "--peers must be at least 2, got {}", a.peers);
  HIVE_CHECK(a.steps >= 1 && a.gossip_every >= 1 && a.dim >= 1, "--steps, --gossip_every and --dim must be positive");
  HIVE_CHECK(a.lr > 0 && a.lr < 1, "--lr must be in (0, 1), got {}", a.lr);
  return a;
}

/// One training peer: its data shard, its weights, and the RPC endpoint that serves them.
struct Peer {
  std::string address;
  torch::Tensor x, y, w;
  std::mutex mutex;  // guards w against the RPC handler reading it mid-update
  std::unique_ptr<hive::DHT> dht;  // last: stops (and its handler with it) before w goes

  torch::Tensor snapshot() {
    std::lock_guard lock(mutex);
    return w.clone();
  }
  double loss() {
    std::lock_guard lock(mutex);
    return torch::mse_loss(torch::matmul(x, w), y).item<double>();
  }
};

}  // namespace

int main(int argc, char** argv) try {
  const Args args = parse(argc, argv);
  torch::manual_seed(0);
  const int rows_per_peer = args.dim / 2;  // each shard alone under-determines the problem
  auto w_true = torch::randn({args.dim, 1});

  std::vector<std::unique_ptr<Peer>> peers;
  std::vector<std::string> join;
  for (int i = 0; i < args.peers; ++i) {
    auto p = std::make_unique<Peer>();
    p->x = torch::randn({rows_per_peer, args.dim});
    p->y = torch::matmul(p->x, w_true) + 0.01 * torch::randn({rows_per_peer, 1});
    p->w = torch::zeros({args.dim, 1});
    p->dht = std::make_unique<hive::DHT>(hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(join));
    Peer* self = p.get();
    const auto compression = args.compression;
    // The DHT peer's RPC endpoint serves our method too: one port per peer.
    p->dht->node()->rpc()->add_handler(
        "demo.params", [self, compression](hive::net::CallContext, hive::Message) -> asio::awaitable<hive::Message> {
          hive::Message reply;
          hive::add_tensors(reply, {self->snapshot()}, compression);
          co_return reply;
        });
    p->address = p->dht->visible_addresses().at(0);
    HIVE_CHECK(p->dht->store("demo.peers", p->address, hive::wall_time() + 3600, hive::dht::Subkey(p->address)),
               "could not announce peer {} in the DHT", i);
    if (join.empty()) {
      join = p->dht->visible_addresses();
      fmt::print("peer 0 started the swarm; to join it, use initial_peers = {}\n", join.at(0));
    } else {
      fmt::print("peer {} joined through {} and listens on {}\n", i, join.at(0), p->address);
    }
    peers.push_back(std::move(p));
  }

  std::mt19937 rng(1);
  const double lr = args.lr;
  std::uint64_t bytes_pulled = 0;
  int exchanges = 0;
  fmt::print("\n{:>6}  {}\n", "step", "loss of each peer on its own shard | distance of each peer to the true weights");
  for (int step = 1; step <= args.steps; ++step) {
    for (auto& p : peers) {
      std::lock_guard lock(p->mutex);
      auto grad = 2.0 / rows_per_peer * torch::matmul(p->x.t(), torch::matmul(p->x, p->w) - p->y);
      p->w -= lr * grad;
    }
    if (step % args.gossip_every == 0) {
      for (std::size_t i = 0; i < peers.size(); ++i) {
        // Who is in the swarm: the DHT's "demo.peers" dictionary, minus ourselves.
        std::vector<std::string> others;
        if (auto members = peers[i]->dht->get("demo.peers", /*latest=*/true))
          for (const auto& [subkey, v] : members->dictionary)
            if (v.value.is_string() && v.value != peers[i]->address) others.push_back(v.value.get<std::string>());
        if (others.empty()) continue;
        const auto& partner = others[std::uniform_int_distribution<std::size_t>(0, others.size() - 1)(rng)];
        auto reply = peers[i]->dht->node()->rpc()->call(partner, "demo.params", hive::Message{}, 10s);
        bytes_pulled += reply.blob_bytes();
        auto theirs = hive::get_tensors(reply).at(0);
        std::lock_guard lock(peers[i]->mutex);
        peers[i]->w = 0.5 * (peers[i]->w + theirs);
        ++exchanges;
      }
    }
    if (step == 1 || step % (args.steps / 10 > 0 ? args.steps / 10 : 1) == 0) {
      std::string losses, distances;
      for (auto& p : peers) {
        losses += fmt::format(" {:8.4f}", p->loss());
        distances += fmt::format(" {:7.3f}", (p->snapshot() - w_true).norm().item<double>());
      }
      fmt::print("{:>6} {} |{}\n", step, losses, distances);
    }
  }

  // What one peer reaches alone on its shard, for comparison.
  auto lonely = torch::zeros({args.dim, 1});
  for (int step = 1; step <= args.steps; ++step)
    lonely -= lr * 2.0 / rows_per_peer * torch::matmul(peers[0]->x.t(), torch::matmul(peers[0]->x, lonely) - peers[0]->y);
  double swarm_distance = 0;
  for (auto& p : peers) swarm_distance = std::max(swarm_distance, (p->snapshot() - w_true).norm().item<double>());
  const double lonely_distance = (lonely - w_true).norm().item<double>();
  fmt::print("\n{} exchanges, {:.1f} KiB of {} parameters pulled over TCP\n", exchanges, bytes_pulled / 1024.0,
             hive::to_string(args.compression));
  fmt::print("distance to the true weights: worst swarm peer {:.3f}, a peer training alone {:.3f}\n", swarm_distance,
             lonely_distance);
  peers.clear();  // each DHT peer stops and joins its runtime
  return swarm_distance < lonely_distance ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "hive_demo: {}\n", e.what());
  return 2;
}
