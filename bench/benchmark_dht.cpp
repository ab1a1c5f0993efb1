// benchmark_dht: hivemind's DHT benchmark in C++. Creates a swarm of DHT peers in one process,
// declares experts through one of them in batches, kills a fraction of the peers, then resolves
// every expert through another peer.
//
//   benchmark_dht [--num_peers 1024] [--num_experts 16384] [--expert_batch_size 64]
//                 [--expiration 300] [--kill_fraction 0] [--transport tcp|sim] [--seed 0]
//
// The last line is one JSON object.

#include <hive/core/progress.hpp>
#include <hive/dht/dht.hpp>
#include <hive/dht/experts.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <numeric>
#include <chrono>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

struct Args {
  int num_peers = 1024;
  int num_experts = 16384;
  int expert_batch_size = 64;
  double expiration = 300;
  double kill_fraction = 0;
  std::string transport = "tcp";
  std::uint64_t seed = 0;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto v = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument("missing value for " + k);
      return argv[++i];
    };
    if (k == "--num_peers") a.num_peers = std::stoi(v());
    else if (k == "--num_experts") a.num_experts = std::stoi(v());
    else if (k == "--expert_batch_size") a.expert_batch_size = std::stoi(v());
    else if (k == "--expiration") a.expiration = std::stod(v());
    else if (k == "--kill_fraction") a.kill_fraction = std::stod(v());
    else if (k == "--transport") a.transport = v();
    else if (k == "--seed") a.seed = std::stoull(v());
    else if (k == "--help" || k == "-h") {
      fmt::print("usage: benchmark_dht [--num_peers N] [--num_experts N] [--expert_batch_size N] [--expiration S]\n"
                 "                     [--kill_fraction F] [--transport tcp|sim] [--seed N]\n");
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown flag " + k + " (see --help)");
    }
  }
  HIVE_CHECK(a.num_peers >= 2, "--num_peers must be at least 2");
  HIVE_CHECK(a.num_experts >= 1 && a.expert_batch_size >= 1, "--num_experts and --expert_batch_size must be positive");
  HIVE_CHECK(a.kill_fraction >= 0 && a.kill_fraction < 1, "--kill_fraction must be in [0, 1)");
  HIVE_CHECK(a.transport == "tcp" || a.transport == "sim", "--transport must be tcp or sim");
  return a;
}

// MemAvailable from /proc/meminfo (8 GiB when it cannot be read).
std::uint64_t available_memory_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string name;
  std::uint64_t kib = 0;
  std::string unit;
  while (meminfo >> name >> kib >> unit)
    if (name == "MemAvailable:") return kib * 1024;
  return std::uint64_t{8} << 30;
}

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

template <class T>
int run(const Args& a) {
  using Node = typename hive::BasicDHT<T>::node_type;
  std::mt19937_64 rng(a.seed);
  hive::net::Runtime runtime(2);
  std::shared_ptr<hive::net::SimNetwork> network;
  if constexpr (std::is_same_v<T, hive::net::Simulated>) network = hive::net::SimNetwork::create(runtime.executor());

  // Every peer lives in this process, so its connections share one file limit and one
  // memory: each in-process connection costs two descriptors and, encrypted, about 320 KiB
  // (both ends' buffers). The swarm gets a third of the available memory's worth of
  // connections, and the file limit is raised to fit them where the process may. The two
  // peers the benchmark talks through get an eighth of the connections each, up to one to
  // every peer, as a peer in a process of its own would have; the others share the rest, their
  // idle connections closed and reopened on demand. A contact is usually mutual (the callee
  // pings back to verify the caller), hence two connections per contact.
  const long by_memory = static_cast<long>(available_memory_bytes() / 3 / (320 * 1024));
  const rlim_t files = hive::net::raise_file_limit(static_cast<rlim_t>(2L * by_memory + 2L * a.num_peers + 500));
  // Each peer's listening socket takes a descriptor too.
  const long connections = std::min(by_memory, (static_cast<long>(files) - a.num_peers - 500) / 2);
  const auto client_pool = static_cast<std::uint32_t>(std::clamp<long>(connections / 8, 1, a.num_peers));
  const auto per_peer = static_cast<std::uint32_t>(
      std::max<long>(1, (connections - 2L * client_pool) / (2L * (a.num_peers + 1))));
  auto rpc_options = hive::net::RpcOptions().max_outgoing_connections(per_peer).request_timeout(hive::Seconds(5));
  auto client_rpc_options = rpc_options;
  client_rpc_options.max_outgoing_connections(client_pool);
  auto node_options = hive::dht::NodeOptions().wait_timeout(hive::Seconds(5)).refresh_period(hive::Seconds(0));
  auto transport = [&] {
    if constexpr (std::is_same_v<T, hive::net::Simulated>) return hive::net::SimulatedOptions().network(network);
    else return hive::net::TcpOptions();
  };
  fmt::print("benchmark_dht: {} peers over {}, {} experts in batches of {}, kill fraction {}, file limit {} ({} "
             "outgoing connections per peer, {} for the storing and the reading peer)\n",
             a.num_peers, a.transport, a.num_experts, a.expert_batch_size, a.kill_fraction, files, per_peer, client_pool);
  // The peers the experts are stored through and read through.
  const auto store_index = std::uniform_int_distribution<int>(0, a.num_peers - 1)(rng);
  const auto get_index = std::uniform_int_distribution<int>(0, a.num_peers - 1)(rng);

  auto t0 = Clock::now();
  std::vector<std::shared_ptr<Node>> peers;
  hive::Progress creating("peers", static_cast<std::size_t>(a.num_peers));
  for (int i = 0; i < a.num_peers; ++i) {
    const bool client = i == store_index || i == get_index;
    auto node = Node::create(runtime.executor(), node_options, transport(), client ? client_rpc_options : rpc_options);
    node->listen("127.0.0.1:0");
    std::vector<std::string> initial;
    for (int j = 0; j < 3 && !peers.empty(); ++j)
      initial.push_back(peers[std::uniform_int_distribution<std::size_t>(0, peers.size() - 1)(rng)]->address());
    asio::co_spawn(runtime.executor(), node->bootstrap(initial), asio::use_future).get();
    peers.push_back(node);
    creating.update(static_cast<std::size_t>(i) + 1);
  }
  creating.finish();
  const double create_s = since(t0);

  // Expert uids as in hivemind's benchmark: three random coordinates each.
  std::set<std::string> unique;
  std::uniform_int_distribution<int> coord(0, 999);
  while (static_cast<int>(unique.size()) < a.num_experts)
    unique.insert(fmt::format("expert.{}.{}.{}", coord(rng), coord(rng), coord(rng)));
  std::vector<std::string> uids(unique.begin(), unique.end());
  std::shuffle(uids.begin(), uids.end(), rng);

  auto store_peer = peers[static_cast<std::size_t>(store_index)];
  auto get_peer = peers[static_cast<std::size_t>(get_index)];
  const std::string endpoint = "10.0.0.1:1337";

  t0 = Clock::now();
  std::size_t stored = 0;
  hive::Progress storing("store", uids.size());
  for (std::size_t b = 0; b < uids.size(); b += a.expert_batch_size) {
    std::vector<std::string> batch(uids.begin() + b, uids.begin() + std::min(uids.size(), b + a.expert_batch_size));
    // As hivemind's declare_experts: each declaration expires `expiration` seconds after it is
    // made, so a later batch's prefix entries replace an earlier batch's.
    const double expiration = hive::wall_time() + a.expiration;
    // Signed by the storing peer, as dht::declare_experts does.
    auto declaration = hive::dht::declare_experts_items(batch, endpoint, expiration, store_peer->rpc()->identity().owner_marker());
    hive::dht::sign_items(*store_peer, declaration.items);
    auto ok = asio::co_spawn(runtime.executor(), store_peer->store_many(declaration.items), asio::use_future).get();
    for (bool uid_ok : declaration.per_uid(ok)) stored += uid_ok;
    storing.update(std::min(uids.size(), b + a.expert_batch_size));
  }
  storing.finish();
  const double store_s = since(t0);

  // Kill a fraction of the peers (never the two the benchmark talks through).
  std::vector<std::size_t> order(peers.size());
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  const std::size_t to_kill = static_cast<std::size_t>(a.kill_fraction * a.num_peers);
  std::size_t killed = 0;
  for (auto i : order) {
    if (killed >= to_kill) break;
    if (peers[i] == store_peer || peers[i] == get_peer) continue;
    if constexpr (std::is_same_v<T, hive::net::Simulated>)
      network->crash(hive::net::HostPort::parse(peers[i]->address()).host);
    else
      peers[i]->close();
    ++killed;
  }

  t0 = Clock::now();
  std::size_t found = 0;
  hive::Progress getting("get", uids.size());
  for (std::size_t b = 0; b < uids.size(); b += a.expert_batch_size) {
    const std::size_t end = std::min(uids.size(), b + a.expert_batch_size);
    // As hivemind's get_experts: one batched get of the batch's uids.
    std::vector<hive::Id160> keys;
    std::vector<std::string> raw_keys(uids.begin() + b, uids.begin() + end);
    for (const auto& uid : raw_keys) keys.push_back(hive::Id160::of(uid));
    auto records = asio::co_spawn(runtime.executor(), get_peer->get_many(keys, false, raw_keys), asio::use_future).get();
    for (auto& record : records) {
      const auto decoded = record ? hive::BasicDHT<T>::decode(*record) : std::nullopt;
      if (decoded && hive::dht::expert_address(*decoded, /*signed_only=*/true) == endpoint) ++found;
    }
    getting.update(end);
  }
  getting.finish();
  const double get_s = since(t0);

  const double n = static_cast<double>(uids.size());
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  const double max_rss_mib = static_cast<double>(usage.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB
  fmt::print("create {} peers: {:.1f} s\n", a.num_peers, create_s);
  fmt::print("store: {:.1f}% success, {:.1f} s total, {:.2f} ms per expert\n", 100.0 * stored / n, store_s, 1e3 * store_s / n);
  fmt::print("get:   {:.1f}% success, {:.1f} s total, {:.2f} ms per expert\n", 100.0 * found / n, get_s, 1e3 * get_s / n);
  fmt::print("node survival: {:.1f}% ({} of {} killed)\n", 100.0 * (a.num_peers - killed) / a.num_peers, killed, a.num_peers);
  fmt::print("memory: {:.0f} MiB at most for the whole swarm ({:.2f} MiB per peer)\n", max_rss_mib, max_rss_mib / a.num_peers);
  nlohmann::json out = {{"bench", "dht"},
                        {"transport", a.transport},
                        {"peers", a.num_peers},
                        {"experts", uids.size()},
                        {"expert_batch_size", a.expert_batch_size},
                        {"create_s", create_s},
                        {"store_s", store_s},
                        {"store_success", stored / n},
                        {"store_ms_per_expert", 1e3 * store_s / n},
                        {"get_s", get_s},
                        {"get_success", found / n},
                        {"get_ms_per_expert", 1e3 * get_s / n},
                        {"kill_fraction", a.kill_fraction},
                        {"node_survival", (a.num_peers - killed) / static_cast<double>(a.num_peers)},
                        {"max_rss_mib", max_rss_mib},
                        {"outgoing_connections_per_peer", per_peer}};
  for (auto& p : peers) p->close();
  peers.clear();
  store_peer.reset();
  get_peer.reset();
  fmt::print("{}\n", out.dump());
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  const Args a = parse(argc, argv);
  return a.transport == "tcp" ? run<hive::net::Tcp>(a) : run<hive::net::Simulated>(a);
} catch (const std::exception& e) {
  fmt::print(stderr, "benchmark_dht: {}\n", e.what());
  return 2;
}
