// Reachable addresses: what a wildcard listener announces, what a receiver records for a
// caller, the observed address in ping replies, and clear bootstrap errors.
#include "../common/raw_client.hpp"

#include <hive/dht/dht.hpp>
#include <hive/net/address.hpp>

#include <doctest/doctest.h>

using namespace hive;
using namespace std::chrono_literals;

TEST_CASE("addresses: a receiver records the caller's source host with the port it claims") {
  CHECK(net::reachable_address("0.0.0.0:4444", "127.0.0.1:5555") == "127.0.0.1:4444");
  CHECK(net::reachable_address("127.0.0.1:4444", "10.47.0.3:5555") == "10.47.0.3:4444");
  // A claimed foreign host (spoofed or unroutable) is replaced, so it is never dialled.
  CHECK(net::reachable_address("203.0.113.5:4444", "10.47.0.3:5555") == "10.47.0.3:4444");
  CHECK(net::reachable_address("[::]:4444", "[2001:db8::7]:5555") == "[2001:db8::7]:4444");
  CHECK(net::reachable_address("nonsense", "10.47.0.3:5555").empty());
  CHECK(net::reachable_address("10.0.0.1:0", "10.47.0.3:5555").empty());
}

TEST_CASE("addresses: a wildcard listener announces observed hosts, then interfaces, never the wildcard") {
  CHECK(net::announce_addresses("10.47.0.1:4000", "", {}) == std::vector<std::string>{"10.47.0.1:4000"});
  CHECK(net::announce_addresses("0.0.0.0:4000", "198.51.100.7", {"192.0.2.1"}) ==
        std::vector<std::string>{"198.51.100.7:4000"});
  const auto observed = net::announce_addresses("0.0.0.0:4000", "", {"192.0.2.1", "2001:db8::1"});
  REQUIRE_FALSE(observed.empty());
  CHECK(observed.front() == "192.0.2.1:4000");  // what other peers saw comes first
  for (const auto& a : observed) {
    CHECK(a.find("0.0.0.0") == std::string::npos);
    CHECK(a.find("2001:db8::1") == std::string::npos);  // an IPv4 wildcard announces IPv4 only
    CHECK(a.find("127.0.0.1") == std::string::npos);    // loopback only when there is nothing else
  }
  const auto dual = net::announce_addresses("[::]:4000", "", {"2001:db8::1"});
  CHECK(dual.front() == "[2001:db8::1]:4000");
  CHECK(net::announce_addresses("", "", {}).empty());  // client mode
  for (const auto& h : net::interface_hosts()) CHECK_FALSE(net::is_wildcard_host(h));
}

TEST_CASE("addresses: a ping reply tells the caller where it was seen, and a claimed address never enters a table as is") {
  DHT a(DHTOptions().listen_on("127.0.0.1:0"));
  DHT b(DHTOptions().listen_on("0.0.0.0:0").initial_peers({a.node()->address()}));
  // b listens on a wildcard: it announces neither the wildcard nor loopback, since a told it
  // the host it saw (127.0.0.1 here) and its interfaces have better ones; with only loopback
  // around, that is what it falls back to.
  for (const auto& address : b.visible_addresses()) CHECK(address.find("0.0.0.0") == std::string::npos);

  // A raw caller claims to be a peer at a foreign host with a's own port: a records the
  // caller's real source host instead, pings it there, and learns a's own id, so no entry
  // for the claimed id appears and the foreign host is never dialled.
  const auto a_port = net::HostPort::parse(a.node()->address()).port;
  const Id160 fake = Id160::of("a peer that lies");
  test::RawClient liar(a.node()->address());
  const nlohmann::json from = {
      {"id", nlohmann::json::binary(std::vector<std::uint8_t>(fake.bytes().begin(), fake.bytes().end()))},
      {"addr", fmt::format("203.0.113.5:{}", a_port)}};
  liar.send(test::request_bytes(1, "dht.ping", {{"from", from}}));
  auto pong = liar.read_frame(10s);
  REQUIRE(pong);
  REQUIRE(pong->kind == net::FrameKind::response);
  CHECK(pong->message.header["you"] == "127.0.0.1");
  liar.send(test::request_bytes(2, "dht.find",
                                {{"keys", nlohmann::json::array({nlohmann::json::binary(std::vector<std::uint8_t>(
                                              fake.bytes().begin(), fake.bytes().end()))})}}));
  auto found = liar.read_frame(10s);
  REQUIRE(found);
  REQUIRE(found->kind == net::FrameKind::response);
  for (const auto& n : found->message.header["results"][0]["n"]) {
    CHECK(n[1].get<std::string>().find("203.0.113.5") == std::string::npos);
    const std::vector<std::uint8_t> id = n[0].get_binary();
    CHECK(id != std::vector<std::uint8_t>(fake.bytes().begin(), fake.bytes().end()));
  }
}

TEST_CASE("addresses: an initial peer that does not answer is a clear error naming it and the reason") {
  // A port on loopback that nobody listens on (bound and closed at once).
  std::string dead;
  {
    DHT gone(DHTOptions().listen_on("127.0.0.1:0"));
    dead = gone.node()->address();
  }
  const auto t0 = std::chrono::steady_clock::now();
  try {
    DHT joiner(DHTOptions().listen_on("127.0.0.1:0").initial_peers({dead}));
    FAIL("joining through a dead peer should throw");
  } catch (const Error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("none of the 1 initial peers answered") != std::string::npos);
    CHECK(what.find(dead) != std::string::npos);
    CHECK(what.find("refused") != std::string::npos);
  }
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);
}
