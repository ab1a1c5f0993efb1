// Behind NAT: hosts on private links behind router namespaces that masquerade (nftables), as
// home routers do. The real programs find out they are not reachable, take part through relays,
// and recover when a relay dies. Without root or nft each test reports itself skipped.
#include "helpers.hpp"

using namespace hive;

namespace {

/// True (after saying why in a line ctest reads as "skipped") when NAT routers cannot be made.
bool skip_without_nat() {
  const auto why = test::HostNetwork::nat_unavailable_reason();
  if (why.empty()) return false;
  std::cout << "SKIPPED: " << why << std::endl;  // ctest's SKIP_REGULAR_EXPRESSION reads this
  return true;
}

/// The first relayed address ("host:port/relay/id") in `line`, or "".
std::string relayed_in(const std::string& line) {
  static const std::regex re(R"(([0-9.]+:\d+/relay/[0-9a-zA-Z_-]+))");
  std::smatch m;
  return std::regex_search(line, m, re) ? m[1].str() : std::string();
}

}  // namespace

TEST_CASE("multihost nat: public and NATed peers find out which they are, and a NATed DHT peer serves through a relay") {
  if (skip_without_nat()) return;
  test::HostNetwork net(2);
  const int natted = net.add_nat_host();
  const auto entry = net.ip(0) + ":5000";
  auto first = net.start(0, {HIVE_DHT_CLI, "--listen_on", "0.0.0.0:5000", "--status_period", "0"});
  REQUIRE(first->read_until("To join this DHT", 20s));
  // A public peer: a helper dials it back.
  auto second = net.start(1, {HIVE_DHT_CLI, "--listen_on", "0.0.0.0:5000", "--initial_peers", entry, "--status_period", "0"});
  auto reach = second->read_until("Reachability:", 30s);
  REQUIRE(reach);
  CHECK(reach->find("Reachability: reachable") != std::string::npos);
  auto join = second->read_until("To join this DHT", 10s);
  REQUIRE(join);
  CHECK(join->find(net.ip(1) + ":5000") != std::string::npos);

  // A peer behind NAT: nobody can dial it; it announces relayed addresses instead of its own.
  auto hidden = net.start(natted, {HIVE_DHT_CLI, "--listen_on", "0.0.0.0:5000", "--initial_peers",
                                   entry + "," + net.ip(1) + ":5000", "--status_period", "1"});
  reach = hidden->read_until("Reachability:", 30s);
  REQUIRE(reach);
  CHECK(reach->find("Reachability: unreachable") != std::string::npos);
  auto behind = hidden->read_until("This peer is behind NAT", 10s);
  REQUIRE(behind);
  INFO(*behind);
  const auto relayed = relayed_in(*behind);
  REQUIRE_FALSE(relayed.empty());
  CHECK((relayed.starts_with(net.ip(0) + ":5000/") || relayed.starts_with(net.ip(1) + ":5000/")));
  join = hidden->read_until("To join this DHT", 10s);
  REQUIRE(join);
  CHECK(join->find("/relay/") != std::string::npos);
  CHECK(join->find(net.ip(natted)) == std::string::npos);      // its private address reaches nobody
  CHECK(join->find(net.router_ip(natted)) == std::string::npos);  // nor does its router's

  // Clients on public hosts join through the NATed peer's relayed address, store and read.
  auto stored = one_shot(net, 1, {"--initial_peers", relayed, "--store", "behind", "\"nat\"", "--expiration", "300"});
  CHECK(stored.status == 0);
  auto got = one_shot(net, 0, {"--initial_peers", relayed, "--get", "behind"});
  CHECK(got.status == 0);
  CHECK(got.json["value"] == "nat");
  // The NATed peer holds a replica like any other (3 peers, 5 replicas per key).
  CHECK(hidden->read_until("storage: 1 keys", 20s));
  // A client behind the NAT reads through a public peer.
  auto inside = one_shot(net, natted, {"--initial_peers", entry, "--get", "behind"});
  CHECK(inside.status == 0);
  CHECK(inside.json["value"] == "nat");
}

TEST_CASE("multihost nat: the remote-experts quickstart against a server behind NAT, through a relay") {
  if (skip_without_nat()) return;
  test::HostNetwork net(2);
  const int natted = net.add_nat_host();
  const auto entry = net.ip(0) + ":5000";
  auto dht = net.start(0, {HIVE_DHT_CLI, "--listen_on", "0.0.0.0:5000", "--status_period", "0"});
  REQUIRE(dht->read_until("To join this DHT", 20s));
  auto server = net.start(natted, {HIVE_SERVER_CLI, "--expert_cls", "ffn", "--hidden_dim", "64", "--num_experts", "5",
                                   "--listen_on", "0.0.0.0:1337", "--initial_peers", entry});
  auto running = server->read_until("Running a server at", 60s);
  REQUIRE(running);
  INFO(*running);
  const auto relayed = relayed_in(*running);
  REQUIRE_FALSE(relayed.empty());
  CHECK(relayed.starts_with(entry + "/relay/"));
  auto client = net.start(1, {HIVE_MOE_QUICKSTART, "--initial_peers", entry, "--hidden_dim", "64", "--steps", "30",
                              "--mixture_steps", "15"});
  std::string out;
  const auto status = client->wait_exit(180s, &out);
  INFO(out);
  REQUIRE(status);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);  // 0: both losses fell
  CHECK(out.find("found " + relayed) != std::string::npos);
  CHECK(out.find("mixture (grid (5,), k_best 2): loss went from") != std::string::npos);
}

TEST_CASE("multihost nat: 4 averaging peers of which 2 are behind NAT all average, the NATed ones through relays") {
  if (skip_without_nat()) return;
  test::HostNetwork net(2);
  net.add_nat_host();
  net.add_nat_host();
  check_averaging_across_hosts(net, "butterfly");
}

TEST_CASE("multihost nat: a relay killed mid-run, the NATed peer reserves at another and is reachable again") {
  if (skip_without_nat()) return;
  test::HostNetwork net(3);
  const int natted = net.add_nat_host();
  const auto relay0 = net.ip(0) + ":5000", relay1 = net.ip(1) + ":5000";
  auto first = net.start(0, {HIVE_DHT_CLI, "--listen_on", "0.0.0.0:5000", "--relay", "--status_period", "0"});
  REQUIRE(first->read_until("To join this DHT", 20s));
  auto second = net.start(1, {HIVE_DHT_CLI, "--listen_on", "0.0.0.0:5000", "--relay", "--initial_peers", relay0,
                              "--status_period", "0"});
  REQUIRE(second->read_until("To join this DHT", 30s));
  auto third = net.start(2, {HIVE_DHT_CLI, "--listen_on", "0.0.0.0:5000", "--initial_peers", relay0, "--status_period", "0"});
  REQUIRE(third->read_until("To join this DHT", 30s));
  auto hidden = net.start(natted, {HIVE_DHT_CLI, "--listen_on", "0.0.0.0:5000", "--initial_peers", relay0 + "," + relay1,
                                   "--relays", relay0, "--num_relays", "1", "--status_period", "1"});
  auto behind = hidden->read_until("This peer is behind NAT", 30s);
  REQUIRE(behind);
  const auto before = relayed_in(*behind);
  INFO("before: ", before);
  CHECK(before.starts_with(relay0 + "/relay/"));
  auto stored = one_shot(net, 2, {"--initial_peers", before, "--store", "k", "1", "--expiration", "300"});
  CHECK(stored.status == 0);

  // The relay dies; within a few status periods the NATed peer is reachable through another.
  first->signal(SIGKILL);
  std::string after;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (after.empty() && std::chrono::steady_clock::now() < deadline) {
    auto line = hidden->read_until("routing table:", 10s);
    if (!line) continue;
    const auto now = relayed_in(*line);
    if (!now.empty() && !now.starts_with(relay0 + "/")) after = now;
  }
  INFO("after: ", after);
  REQUIRE_FALSE(after.empty());
  // Called at its new address from a public host, it answers (and the DHT still reads).
  auto got = one_shot(net, 2, {"--initial_peers", after, "--get", "k"});
  CHECK(got.status == 0);
  CHECK(got.json["value"] == 1);
}
