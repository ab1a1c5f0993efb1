// The second routing model: a swarm whose records go through OpenDHT (dht::OpenDHT) stores and
// finds values and dictionaries across peers, declares and finds experts, and refuses the
// knobs OpenDHT decides itself. All peers on 127.0.0.1 (TCP and UDP).
//
// No `using namespace hive`: OpenDHT's own namespace is `::dht`.
#include "../common/wait.hpp"

#include <hive/dht/dht.hpp>
#include <hive/dht/experts.hpp>
#include <hive/dht/opendht.hpp>

#include <doctest/doctest.h>

#include <memory>
#include <vector>

namespace {

using OpenDhtDHT = hive::BasicDHT<hive::net::Tcp, hive::dht::OpenDHT>;

struct OpenDhtPolicies : hive::DefaultPolicies {
  using routing = hive::dht::OpenDHT;
};
static_assert(std::is_same_v<hive::DHTFor<OpenDhtPolicies>, OpenDhtDHT>);
static_assert(hive::dht::Routing<hive::dht::OpenDHT>);
static_assert(hive::dht::RoutingFor<hive::dht::OpenDHT, hive::net::Simulated>);

/// `n` OpenDHT-routed peers on loopback: the first starts the swarm, the others join it.
std::vector<std::unique_ptr<OpenDhtDHT>> opendht_swarm(std::size_t n) {
  std::vector<std::unique_ptr<OpenDhtDHT>> peers;
  peers.push_back(std::make_unique<OpenDhtDHT>(hive::DHTOptions().listen_on("127.0.0.1:0")));
  const auto first = peers[0]->visible_addresses();
  for (std::size_t i = 1; i < n; ++i)
    peers.push_back(std::make_unique<OpenDhtDHT>(hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(first)));
  return peers;
}

}  // namespace

TEST_CASE("opendht: six OpenDHT-routed peers store and find values and dictionaries across peers") {
  auto peers = opendht_swarm(6);
  const double t = hive::wall_time();
  REQUIRE(peers[1]->store("od.value", nlohmann::json{{"x", 1}}, t + 60));
  REQUIRE(peers[2]->store("od.team", "alice", t + 60, hive::dht::Subkey(std::string("a"))));
  REQUIRE(peers[3]->store("od.team", "bob", t + 60, hive::dht::Subkey(std::string("b"))));
  // A newer value of the same subkey replaces the older one; an older one does not.
  REQUIRE(peers[4]->store("od.team", "alice2", t + 90, hive::dht::Subkey(std::string("a"))));

  auto value = peers[5]->get("od.value", true);
  REQUIRE(value);
  REQUIRE(value->value);
  CHECK(value->value->value == nlohmann::json{{"x", 1}});
  std::optional<hive::DHTRecord> team;
  // Puts report once stored; a reader may still meet a node that missed the edit: bounded wait.
  CHECK(hive::test::wait_for([&] {
    team = peers[0]->get("od.team", true);
    return team && team->dictionary.size() == 2 &&
           team->dictionary.at(hive::dht::Subkey(std::string("a"))).value == "alice2";
  }));
  REQUIRE(team);
  CHECK(team->dictionary.at(hive::dht::Subkey(std::string("b"))).value == "bob");
  CHECK_FALSE(peers[5]->get("od.missing", true).has_value());
  // Expired or beyond OpenDHT's lifetime: refused, not kept silently shorter.
  CHECK_FALSE(peers[1]->store("od.old", 1, t - 1));
  CHECK_FALSE(peers[1]->store("od.far", 1, t + hive::dht::OpenDHT::value_lifetime + 600));
}

TEST_CASE("opendht: experts declared on an OpenDHT-routed swarm are found by uid and by beam search") {
  auto peers = opendht_swarm(4);
  const std::vector<std::string> uids{"ffn.0.0", "ffn.0.1", "ffn.1.0"};
  auto declared = hive::dht::declare_experts(*peers[1], uids, "127.0.0.1:4321", hive::wall_time() + 120);
  for (bool ok : declared) CHECK(ok);
  std::vector<std::optional<std::string>> found;
  CHECK(hive::test::wait_for([&] {
    found = hive::dht::get_experts(*peers[3], {"ffn.0.0", "ffn.1.0", "ffn.9.9"});
    return found[0] && found[1];
  }));
  CHECK(found[0] == "127.0.0.1:4321");
  CHECK(found[1] == "127.0.0.1:4321");
  CHECK_FALSE(found[2]);
  auto directory = hive::dht::ExpertDirectory::over(*peers[2], "ffn", {2, 2});
  const std::vector<float> scores{1.0f, 0.0f, 0.5f, 2.0f};  // prefers ffn.0, then ffn.0.1
  auto best = directory->find_best(std::span<const float>(scores), 1, 2);
  REQUIRE(best.size() == 1);
  REQUIRE(best[0].size() == 2);
  CHECK(best[0][0].uid == "ffn.0.1");
  CHECK(best[0][1].uid == "ffn.0.0");
}

TEST_CASE("opendht: knobs OpenDHT decides itself are refused, and a dead initial peer is named") {
  CHECK_THROWS_AS(OpenDhtDHT(hive::DHTOptions().listen_on("127.0.0.1:0").node(hive::dht::NodeOptions().num_replicas(3))),
                  hive::InvalidArgument);
  CHECK_THROWS_AS(OpenDhtDHT(hive::DHTOptions().client_mode(true)), hive::InvalidArgument);
  // Nobody answers on this port (a fresh socket's port, closed again).
  std::string dead;
  {
    OpenDhtDHT gone(hive::DHTOptions().listen_on("127.0.0.1:0"));
    dead = gone.visible_addresses().front();
  }
  try {
    OpenDhtDHT joiner(hive::DHTOptions()
                          .listen_on("127.0.0.1:0")
                          .initial_peers({dead})
                          .node(hive::dht::NodeOptions().wait_timeout(hive::Seconds(0.5))));
    FAIL("the bootstrap should have failed");
  } catch (const hive::Error& e) {
    CHECK(std::string(e.what()).find(dead) != std::string::npos);
  }
}
