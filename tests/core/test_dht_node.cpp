// The DHT protocol: small TCP swarms, a few hundred simulated peers with crashes, client-only
// peers, expert records and hostile input.
#include "net_fixtures.hpp"

#include <hive/dht/dht.hpp>
#include <hive/dht/experts.hpp>

#include <doctest/doctest.h>

#include <random>

using namespace hive;
using namespace std::chrono_literals;

namespace {

dht::NodeOptions fast_node_options() {
  return dht::NodeOptions().wait_timeout(Seconds(1)).refresh_period(Seconds(0));
}

// `num_peers` peers on `network`, each bootstrapped from one random earlier peer.
std::vector<std::shared_ptr<dht::Node<net::Simulated>>> simulated_swarm(net::Runtime& runtime,
                                                                      const std::shared_ptr<net::SimNetwork>& network,
                                                                      int num_peers, std::mt19937& rng) {
  using Node = dht::Node<net::Simulated>;
  std::vector<std::shared_ptr<Node>> nodes;
  for (int i = 0; i < num_peers; ++i) {
    auto node = Node::create(runtime.executor(), fast_node_options().wait_timeout(Seconds(5)),
                             net::SimulatedOptions().network(network));
    node->listen("0.0.0.0:0");
    std::vector<std::string> initial;
    if (!nodes.empty()) initial.push_back(nodes[std::uniform_int_distribution<int>(0, i - 1)(rng)]->address());
    auto answered = asio::co_spawn(runtime.executor(), node->bootstrap(initial), asio::use_future).get();
    if (!initial.empty()) REQUIRE(answered == 1);
    nodes.push_back(node);
  }
  return nodes;
}

}  // namespace

TEST_CASE("dht tcp: a handful of peers store and find values, dictionaries and latest versions") {
  std::vector<std::unique_ptr<DHT>> peers;
  peers.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0").node(fast_node_options())));
  const auto entry = peers[0]->visible_addresses();
  REQUIRE(entry.size() == 1);
  for (int i = 0; i < 4; ++i)
    peers.push_back(std::make_unique<DHT>(
        DHTOptions().listen_on("127.0.0.1:0").initial_peers(entry).node(fast_node_options())));
  const double now = wall_time();

  CHECK(peers[1]->store("answer", 42, now + 60));
  auto got = peers[4]->get("answer");
  REQUIRE(got);
  REQUIRE(got->value);
  CHECK(got->value->value == 42);
  CHECK_FALSE(peers[3]->get("no such key"));

  // Strictly newer wins, and get(latest) finds the newest.
  CHECK(peers[2]->store("answer", 43, now + 120));
  peers[3]->store("answer", 41, now + 30);  // older: a replica that lacked the key may take it
  auto latest = peers[0]->get("answer", /*latest=*/true);
  REQUIRE(latest);
  CHECK(latest->value->value == 43);

  // Dictionary values collect subkeys from different peers.
  CHECK(peers[1]->store("group", "alice", now + 60, dht::Subkey(std::string("a"))));
  CHECK(peers[2]->store("group", "bob", now + 60, dht::Subkey(std::int64_t{7})));
  auto group = peers[3]->get("group", /*latest=*/true);
  REQUIRE(group);
  CHECK(group->is_dictionary());
  CHECK(group->dictionary.size() == 2);
  CHECK(group->dictionary.at(dht::Subkey(std::string("a"))).value == "alice");

  // A client-only peer queries and stores but gives no address and is in nobody's table.
  DHT client(DHTOptions().client_mode(true).initial_peers(entry).node(fast_node_options()));
  CHECK(client.visible_addresses().empty());
  CHECK(client.store("from client", "hi", now + 60));
  CHECK(peers[2]->get("from client")->value->value == "hi");
  CHECK(client.get("answer", true)->value->value == 43);
  for (auto& p : peers) {
    auto size = asio::co_spawn(p->executor(), p->node()->routing_table_size(), asio::use_future).get();
    CHECK(size <= peers.size() - 1);  // the client is in no routing table
  }

  // Joining through a dead address fails with a clear error.
  CHECK_THROWS_AS(DHT(DHTOptions().listen_on("127.0.0.1:0").initial_peers({"127.0.0.1:1"}).node(fast_node_options())),
                  Error);
}

TEST_CASE("dht tcp: hostile input is refused while the peer keeps serving") {
  DHT peer(DHTOptions().listen_on("127.0.0.1:0").node(fast_node_options().storage(
      dht::StorageOptions().max_value_bytes(1024))));
  const auto address = peer.visible_addresses().at(0);
  net::Runtime runtime(1);
  auto raw = net::Rpc<net::Tcp>::create(runtime.executor());
  const double now = wall_time();
  auto key = nlohmann::json::binary(std::vector<std::uint8_t>(20, 1));
  auto value = nlohmann::json::binary(nlohmann::json::to_msgpack(nlohmann::json(1)));
  nlohmann::json items = nlohmann::json::array({
      nlohmann::json::array({key, nullptr, value, now + 60, false}),                                   // good
      nlohmann::json::array({nlohmann::json::binary(std::vector<std::uint8_t>(3, 1)), nullptr, value, now + 60, false}),  // short key
      nlohmann::json::array({key, nullptr, nlohmann::json::binary(std::vector<std::uint8_t>(5000, 1)), now + 120, false}),  // oversized
      nlohmann::json::array({key, nullptr, value, now + 1e9, false}),                                  // absurd expiration
      nlohmann::json::array({key, 1.5, value, now + 200, false}),                                      // float subkey
      nlohmann::json::array({key, nullptr, "not binary", now + 300, false}),                           // value not binary
      nlohmann::json("garbage"),                                                                       // not an item
      nlohmann::json::array({key, nullptr, value, now - 5, false}),                                    // expired
  });
  auto reply = raw->call(address, "dht.store", Message{nlohmann::json{{"items", items}}, {}}, 5s);
  const auto& results = reply.header.at("results");
  REQUIRE(results.size() == items.size());
  CHECK(results[0] == "stored");
  for (std::size_t i = 1; i < results.size(); ++i) {
    CAPTURE(i);
    CHECK(results[i] != "stored");
  }
  CHECK_THROWS_AS(raw->call(address, "dht.find", Message{nlohmann::json{{"keys", "nope"}}, {}}, 5s), RemoteError);
  CHECK_THROWS_AS(raw->call(address, "dht.store", Message{nlohmann::json(17), {}}, 5s), RemoteError);
  CHECK_THROWS_AS(raw->call(address, "dht.find", Message{nlohmann::json{{"keys", {1, 2}}}, {}}, 5s), RemoteError);
  // "k" (nearest peers wanted per key) must be a positive integer; a huge one is cut to K.
  for (const auto& bad : {nlohmann::json(0), nlohmann::json(-3), nlohmann::json("five"), nlohmann::json(2.5)})
    CHECK_THROWS_AS(raw->call(address, "dht.find", Message{nlohmann::json{{"keys", {key}}, {"k", bad}}, {}}, 5s),
                    RemoteError);
  CHECK(raw->call(address, "dht.find", Message{nlohmann::json{{"keys", {key}}, {"k", std::uint64_t{1} << 60}}, {}}, 5s)
            .header.at("results").at(0).contains("r"));
  // "v": false asks for peers only (a store's lookup); it must be a boolean.
  const auto peers_only =
      raw->call(address, "dht.find", Message{nlohmann::json{{"keys", {key}}, {"v", false}}, {}}, 5s).header;
  CHECK_FALSE(peers_only.at("results").at(0).contains("r"));
  CHECK(peers_only.at("results").at(0).contains("n"));
  CHECK(raw->call(address, "dht.find", Message{nlohmann::json{{"keys", {key}}, {"v", true}}, {}}, 5s)
            .header.at("results").at(0).contains("r"));
  CHECK_THROWS_AS(raw->call(address, "dht.find", Message{nlohmann::json{{"keys", {key}}, {"v", 0}}, {}}, 5s),
                  RemoteError);
  // Still serving.
  auto found = raw->call(address, "dht.find", Message{nlohmann::json{{"keys", {key}}}, {}}, 5s);
  CHECK(found.header.at("results").at(0).contains("r"));
  CHECK(peer.store("still", "alive", now + 60));
  raw->close();
}

TEST_CASE("dht simulated: 200 peers store and find 1000 keys, and with 20% crashed at least 99% are still found") {
  net::Runtime runtime(1);
  auto network = net::SimNetwork::create(runtime.executor(), net::SimNetworkOptions().seed(3));
  constexpr int num_peers = 200, num_keys = 1000;
  std::mt19937 rng(5);
  auto nodes = simulated_swarm(runtime, network, num_peers, rng);
  const double expiration = wall_time() + 600;
  // Operations run 50 at a time: all simulated peers share one strand, and a thousand
  // lookups at once would queue frames past the request timeouts on a loaded CI machine.
  auto run_all = [&](auto make_op) {
    int ok = 0;
    for (int first = 0; first < num_keys; first += 50) {
      std::vector<std::future<bool>> futures;
      for (int k = first; k < std::min(num_keys, first + 50); ++k)
        futures.push_back(asio::co_spawn(runtime.executor(), make_op(k), asio::use_future));
      for (auto& f : futures) ok += f.get();
    }
    return ok;
  };
  std::vector<int> writer(num_keys), reader(num_keys);
  for (int k = 0; k < num_keys; ++k) {
    writer[k] = std::uniform_int_distribution<int>(0, num_peers - 1)(rng);
    reader[k] = std::uniform_int_distribution<int>(0, num_peers - 1)(rng);
  }
  const int stored = run_all([&](int k) -> asio::awaitable<bool> {
    std::vector<dht::StoreItem> items{{Id160::of(fmt::format("key{}", k)), std::nullopt,
                                       nlohmann::json::to_msgpack(nlohmann::json(k)), expiration}};
    auto ok = co_await nodes[writer[k]]->store_many(std::move(items));
    co_return ok.at(0);
  });
  CHECK(stored == num_keys);
  auto get_all = [&](const std::vector<bool>& alive) {
    return run_all([&](int k) -> asio::awaitable<bool> {
      int r = reader[k];
      while (!alive[r]) r = (r + 1) % num_peers;
      auto record = co_await nodes[r]->get(Id160::of(fmt::format("key{}", k)));
      co_return record && !record->is_dictionary() &&
          nlohmann::json::from_msgpack(record->regular().value) == nlohmann::json(k);
    });
  };
  std::vector<bool> alive(num_peers, true);
  CHECK(get_all(alive) == num_keys);

  // Crash 20% of the peers, then read everything again from the survivors.
  std::vector<int> order(num_peers);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  for (int i = 0; i < num_peers / 5; ++i) {
    alive[order[i]] = false;
    network->crash(net::HostPort::parse(nodes[order[i]]->address()).host);
  }
  const int found = get_all(alive);
  MESSAGE("found " << found << " of " << num_keys << " keys after crashing " << num_peers / 5 << " peers");
  CHECK(found >= num_keys * 99 / 100);
  for (auto& n : nodes) n->close();
}

TEST_CASE("dht experts: declare and resolve uids, prefix dictionaries, signed declarations, uid validation") {
  DHT a(DHTOptions().listen_on("127.0.0.1:0").node(fast_node_options()));
  DHT b(DHTOptions().listen_on("127.0.0.1:0").initial_peers(a.visible_addresses()).node(fast_node_options()));
  const double expiration = wall_time() + 60;
  auto ok = dht::declare_experts(a, {"expert.3.7", "expert.3.8", "expert.4.0"}, "10.0.0.1:1337", expiration);
  CHECK(ok == std::vector<bool>{true, true, true});
  auto found = dht::get_experts(b, {"expert.3.7", "expert.4.0", "expert.9.9"});
  REQUIRE(found.size() == 3);
  CHECK(found[0] == std::optional<std::string>("10.0.0.1:1337"));
  CHECK(found[1] == std::optional<std::string>("10.0.0.1:1337"));
  CHECK_FALSE(found[2]);
  // The prefix dictionaries beam search will walk.
  auto top = b.get("expert.", true);
  REQUIRE(top);
  CHECK(top->dictionary.size() == 2);  // coordinates 3 and 4
  auto row = b.get("expert.3.", true);
  REQUIRE(row);
  CHECK(row->dictionary.size() == 2);
  // Each entry is signed by the peer that declared it: its subkey starts with a's owner marker.
  CHECK(row->dictionary.at(dht::Subkey(a.owner_marker() + "8")).value[0] == "expert.3.8");
  CHECK(b.get("expert.3.7", true)->dictionary.at(dht::Subkey(a.owner_marker())).value == "10.0.0.1:1337");

  // Nobody declares experts in another peer's name. c cannot sign under a's marker, and what it
  // writes without a marker (a uid record, a prefix entry) is skipped by every reader.
  DHT c(DHTOptions().listen_on("127.0.0.1:0").initial_peers(a.visible_addresses()).node(fast_node_options()));
  CHECK_THROWS_AS(c.store("expert.3.", nlohmann::json::array({"expert.3.7", "10.6.6.6:1"}), expiration + 30,
                          dht::Subkey(a.owner_marker() + "7")),
                  InvalidArgument);
  CHECK(c.store("expert.3.7", "10.6.6.6:1", expiration + 30, dht::Subkey(std::string())));
  CHECK(c.store("expert.3.", nlohmann::json::array({"expert.3.9", "10.6.6.6:1"}), expiration + 30, dht::Subkey(std::string("9"))));
  CHECK(c.store("expert.3.", nlohmann::json::array({"expert.3.9", "10.6.6.6:1"}), expiration + 30, dht::Subkey(std::int64_t{9})));
  CHECK(b.get("expert.3.7", true)->dictionary.size() == 2);  // stored, as anyone may store unowned entries...
  CHECK(dht::get_experts(b, {"expert.3.7"})[0] == std::optional<std::string>("10.0.0.1:1337"));  // ...but not read
  auto directory = dht::ExpertDirectory::over(b, "expert", {10, 10});
  std::vector<float> scores(20, 0.f);
  scores[10 + 9] = 100.f;  // coordinate 9 of dimension 1 would win if it counted
  const auto best = directory->find_best(std::span<const float>(scores), 1, 3);
  REQUIRE(best[0].size() == 3);
  for (const auto& e : best[0]) CHECK(e.address == "10.0.0.1:1337");
  // A peer that declares the same uid under its own marker competes openly: the declaration
  // that expires last is used (as in hivemind, where the last store wins).
  CHECK(dht::declare_experts(c, {"expert.3.7"}, "10.7.7.7:1", expiration + 30)[0]);
  CHECK(dht::get_experts(b, {"expert.3.7"})[0] == std::optional<std::string>("10.7.7.7:1"));

  for (const char* bad : {"expert", "expert.", ".3", "expert.x", "expert.-1", "expert.03", "expert.3.", "expert..3"})
    CHECK_THROWS_AS(dht::parse_uid(bad), InvalidArgument);
  CHECK(dht::parse_uid("ffn_expert.0.12").second == std::vector<std::int64_t>{0, 12});
  CHECK_THROWS_AS(dht::declare_experts(a, {"bad uid"}, "10.0.0.1:1", expiration), InvalidArgument);
}

namespace {
/// An id at XOR distance `distance` (a small number) from `key`'s id.
Id160 near(std::string_view key, std::uint8_t distance, bool flip_top = false) {
  auto bytes = Id160::of(key).bytes();
  bytes[19] ^= distance;
  if (flip_top) bytes[0] ^= 0x80;
  return Id160(bytes);
}
}  // namespace

TEST_CASE("dht tcp: a newly seen closer peer is handed the keys, found values are cached, read cache entries refresh") {
  const auto options = [] {
    return DHTOptions().listen_on("127.0.0.1:0").node(
        fast_node_options().num_replicas(1).refresh_period(Seconds(1)).cache_refresh_before_expiry(Seconds(3)));
  };
  // Hand-over: `far` holds the key alone; `nearest` joins and is closer, so it gets a copy.
  auto far = std::make_unique<DHT>(options(), net::TcpOptions{}, near("k", 0, /*flip_top=*/true));
  CHECK(far->store("k", "v1", wall_time() + 60));
  DHT nearest(options().initial_peers(far->visible_addresses()), net::TcpOptions{}, near("k", 1));
  auto sizes = [](DHT& d) { return asio::co_spawn(d.executor(), d.node()->storage_size(), asio::use_future).get(); };
  CHECK(test::wait_for([&] { return sizes(nearest).first == 1; }));

  // Caching: `far` reads the key; `middle` answered the lookup without it, so it caches it.
  DHT middle(options().initial_peers(nearest.visible_addresses()), net::TcpOptions{}, near("k", 64));
  auto got = far->get("k", /*latest=*/true);
  REQUIRE(got);
  CHECK(got->value->value == "v1");
  CHECK(test::wait_for([&] { return sizes(middle).second == 1; }));

  // Refresh: `middle` holds a cache entry about to expire and reads it; a newer value is then
  // stored in the DHT, and shortly before the cached entry expires `middle` fetches it.
  far.reset();
  DHT writer(options().initial_peers(nearest.visible_addresses()).client_mode(true));
  const double short_expiry = wall_time() + 4;
  // A cache entry about to expire: store it into middle's cache directly via the protocol.
  {
    net::Runtime runtime(1);
    auto raw = net::Rpc<net::Tcp>::create(runtime.executor());
    const auto id = Id160::of("c");
    auto key = nlohmann::json::binary(std::vector<std::uint8_t>(id.bytes().begin(), id.bytes().end()));
    nlohmann::json items = nlohmann::json::array(
        {nlohmann::json::array({key, nullptr, nlohmann::json::binary(nlohmann::json::to_msgpack("old")), short_expiry, true})});
    auto reply = raw->call(middle.visible_addresses().at(0), "dht.store", Message{nlohmann::json{{"items", items}}, {}}, 5s);
    CHECK(reply.header.at("results").at(0) == "stored");
    raw->close();
  }
  CHECK(middle.get("c")->value->value == "old");  // served from the cache, and now watched
  CHECK(writer.store("c", "new", wall_time() + 60));
  CHECK(test::wait_for(
      [&] {
        auto v = middle.get("c");
        return v && v->value && v->value->value == "new";
      },
      10s));
}

TEST_CASE("dht simulated: store_many and get_many batch their lookups, with far fewer frames than a lookup per key") {
  net::Runtime runtime(1);
  auto network = net::SimNetwork::create(runtime.executor(), net::SimNetworkOptions().seed(11));
  constexpr int num_peers = 100, num_keys = 300;
  std::mt19937 rng(7);
  auto nodes = simulated_swarm(runtime, network, num_peers, rng);
  const double expiration = wall_time() + 600;
  auto items_of = [&](const std::string& prefix) {
    std::vector<dht::StoreItem> items;
    for (int k = 0; k < num_keys; ++k)
      items.push_back({Id160::of(fmt::format("{}{}", prefix, k)), std::nullopt, nlohmann::json::to_msgpack(nlohmann::json(k)),
                       expiration});
    return items;
  };
  auto frames = [&] { return network->stats().frames_delivered; };
  auto& writer = nodes[3];
  auto& reader = nodes[60];

  // One key per call, the calls one after another: a lookup and its stores per key.
  auto before = frames();
  int one_by_one = 0;
  for (auto& item : items_of("single")) {
    auto ok = asio::co_spawn(runtime.executor(), writer->store_many({item}), asio::use_future).get();
    one_by_one += ok.at(0);
  }
  const auto single_store_frames = frames() - before;
  CHECK(one_by_one == num_keys);
  // All keys in one call: one batched lookup, then one store request per replica.
  before = frames();
  auto batched = asio::co_spawn(runtime.executor(), writer->store_many(items_of("batch")), asio::use_future).get();
  const auto batch_store_frames = frames() - before;
  CHECK(std::count(batched.begin(), batched.end(), true) == num_keys);
  MESSAGE("store: " << single_store_frames << " frames one key per call, " << batch_store_frames << " batched");
  CHECK(batch_store_frames * 3 < single_store_frames);

  // Gets: one per key, then get_many of all; both find every value.
  std::vector<Id160> single_keys, batch_keys;
  for (int k = 0; k < num_keys; ++k) {
    single_keys.push_back(Id160::of(fmt::format("single{}", k)));
    batch_keys.push_back(Id160::of(fmt::format("batch{}", k)));
  }
  auto value_is = [](const std::optional<dht::Record>& record, int k) {
    return record && !record->is_dictionary() && nlohmann::json::from_msgpack(record->regular().value) == nlohmann::json(k);
  };
  before = frames();
  int found_single = 0;
  for (int k = 0; k < num_keys; ++k)
    found_single += value_is(asio::co_spawn(runtime.executor(), reader->get(single_keys[k]), asio::use_future).get(), k);
  const auto single_get_frames = frames() - before;
  before = frames();
  auto records = asio::co_spawn(runtime.executor(), reader->get_many(batch_keys), asio::use_future).get();
  const auto batch_get_frames = frames() - before;
  REQUIRE(records.size() == static_cast<std::size_t>(num_keys));
  int found_batch = 0;
  for (int k = 0; k < num_keys; ++k) found_batch += value_is(records[k], k);
  CHECK(found_single == num_keys);
  CHECK(found_batch == num_keys);
  MESSAGE("get: " << single_get_frames << " frames one key per call, " << batch_get_frames << " batched");
  CHECK(batch_get_frames * 2 < single_get_frames);
  // A key nobody stored comes back empty, in its place.
  auto mixed = asio::co_spawn(runtime.executor(), reader->get_many({batch_keys[0], Id160::of("nobody"), batch_keys[1]}),
                              asio::use_future).get();
  REQUIRE(mixed.size() == 3);
  CHECK(value_is(mixed[0], 0));
  CHECK_FALSE(mixed[1].has_value());
  CHECK(value_is(mixed[2], 1));
  for (auto& n : nodes) n->close();
}
