// Separate hosts: the real programs on a network of Linux network namespaces (one address
// each, a bridge in a namespace of its own, no route anywhere else), as a user would run
// them on several machines. Without root each test reports itself skipped with the reason.
#include "helpers.hpp"

#include <hive/dht/dht.hpp>

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <sys/wait.h>

#include <functional>
#include <iostream>
#include <regex>
#include <sstream>

using namespace hive;
using namespace std::chrono_literals;

TEST_CASE("multihost dht: 16 hive-dht peers on 8 hosts store and read across hosts, also after a quarter are killed") {
  if (skip_without_namespaces()) return;
  test::HostNetwork net(8);
  std::vector<std::unique_ptr<test::ChildProcess>> peers;
  std::vector<std::string> addresses;
  for (int p = 0; p < 16; ++p) {
    const int host = p % 8;
    const auto port = std::to_string(5000 + p / 8);
    std::vector<std::string> argv{HIVE_DHT_CLI, "--listen_on", "0.0.0.0:" + port, "--status_period", "0"};
    if (p > 0) argv.insert(argv.end(), {"--initial_peers", addresses.front()});
    peers.push_back(net.start(host, argv));
    auto line = peers.back()->read_until("To join this DHT", 20s);
    REQUIRE(line);
    // The join line names the host's own address, never a wildcard or loopback.
    CHECK(line->find(net.ip(host) + ":" + port) != std::string::npos);
    CHECK(line->find("127.0.0.1") == std::string::npos);
    CHECK(line->find("0.0.0.0") == std::string::npos);
    addresses.push_back(net.ip(host) + ":" + port);
  }
  // Stored from host 3 (through the peer on host 5), read from host 6 (through host 2's).
  auto stored = one_shot(net, 3, {"--initial_peers", addresses[5], "--store", "greeting", "{\"hello\": \"hosts\"}",
                                  "--expiration", "300"});
  CHECK(stored.status == 0);
  CHECK(stored.json.value("stored", false));
  auto got = one_shot(net, 6, {"--initial_peers", addresses[2], "--get", "greeting"});
  CHECK(got.status == 0);
  CHECK(got.json["value"] == nlohmann::json{{"hello", "hosts"}});

  // A quarter of the peers die (not the ones the reads go through).
  for (int p : {1, 7, 9, 11}) peers[static_cast<std::size_t>(p)]->signal(SIGKILL);
  auto after = one_shot(net, 0, {"--initial_peers", addresses[10], "--get", "greeting", "--latest"});
  CHECK(after.status == 0);
  CHECK(after.json["value"] == nlohmann::json{{"hello", "hosts"}});
  // A key that was never stored is reported as missing, with exit status 1.
  auto missing = one_shot(net, 4, {"--initial_peers", addresses[0], "--get", "nobody-stored-this"});
  CHECK(missing.status == 1);
  CHECK_FALSE(missing.json.value("found", true));
}

TEST_CASE("multihost dht: over IPv6, a dual-stack wildcard listener announces its IPv6 address and serves it") {
  if (skip_without_namespaces()) return;
  test::HostNetwork net(2);
  auto peer = net.start(0, {HIVE_DHT_CLI, "--listen_on", "[::]:5000", "--status_period", "0"});
  auto line = peer->read_until("To join this DHT", 20s);
  REQUIRE(line);
  INFO(*line);
  CHECK(line->find("[" + net.ip6(0) + "]:5000") != std::string::npos);
  CHECK(line->find("[::]") == std::string::npos);
  const auto entry = "[" + net.ip6(0) + "]:5000";
  auto stored = one_shot(net, 1, {"--initial_peers", entry, "--store", "v6", "42"});
  CHECK(stored.status == 0);
  auto got = one_shot(net, 1, {"--initial_peers", entry, "--get", "v6"});
  CHECK(got.status == 0);
  CHECK(got.json["value"] == 42);
}

TEST_CASE("multihost dht: an unreachable initial peer is a clear error naming it, within the bootstrap timeout") {
  if (skip_without_namespaces()) return;
  test::HostNetwork net(2);
  // hive-dht's error goes to stderr: run it through a shell that folds stderr into stdout.
  auto attempt = [&](const std::string& peer) {
    const auto t0 = std::chrono::steady_clock::now();
    auto child = net.start(0, {"/bin/sh", "-c", fmt::format("{} --initial_peers {} --get x 2>&1", HIVE_DHT_CLI, peer)});
    std::string out;
    const auto status = child->wait_exit(30s, &out);
    INFO(out);
    REQUIRE(status);
    CHECK(WEXITSTATUS(*status) == 1);
    CHECK(out.find("none of the 1 initial peers answered") != std::string::npos);
    CHECK(out.find(peer) != std::string::npos);
    return std::pair{out, std::chrono::steady_clock::now() - t0};
  };
  // Nobody listens on host 1: refused at once.
  auto [refused, refused_time] = attempt(net.ip(1) + ":5999");
  CHECK(refused.find("refused") != std::string::npos);
  CHECK(refused_time < 10s);
  // Nobody has this address: the connection attempt times out within the bootstrap timeout.
  auto [silent, silent_time] = attempt("10.47.0.99:5999");
  CHECK((silent.find("timed out") != std::string::npos || silent.find("unreachable") != std::string::npos));
  CHECK(silent_time < 20s);
}

TEST_CASE("multihost moe: the seed quickstart across two hosts, wildcard listen, separate DHT port: the loss falls") {
  if (skip_without_namespaces()) return;
  test::HostNetwork net(2);
  auto server = net.start(0, {HIVE_SERVER_CLI, "--expert_cls", "ffn", "--hidden_dim", "64", "--num_experts", "5",
                              "--listen_on", "0.0.0.0:1337", "--dht_port", "1338"});
  auto join = server->read_until("To join this swarm", 60s);
  REQUIRE(join);
  CHECK(join->find(net.ip(0) + ":1338") != std::string::npos);
  // hivemind's newer dashed spelling works too.
  auto client = net.start(1, {HIVE_MOE_QUICKSTART, "--initial-peers", net.ip(0) + ":1338", "--hidden_dim", "64",
                              "--steps", "30", "--mixture_steps", "15"});
  std::string out;
  const auto status = client->wait_exit(120s, &out);
  INFO(out);
  REQUIRE(status);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);  // 0: both losses fell
  CHECK(out.find("found " + net.ip(0) + ":1337") != std::string::npos);
  CHECK(out.find("loss went from") != std::string::npos);
  CHECK(out.find("mixture (grid (5,), k_best 2): loss went from") != std::string::npos);
}


TEST_CASE("multihost averaging: 4 averaging peers on 4 hosts with wildcard listen addresses average in groups of 4") {
  if (skip_without_namespaces()) return;
  test::HostNetwork net(4);
  check_averaging_across_hosts(net, "butterfly");
}

TEST_CASE("multihost averaging: the same 4 peers on 4 hosts average through Gloo (c10d, a store per round)") {
  if (skip_without_namespaces()) return;
  test::HostNetwork net(4);
  check_averaging_across_hosts(net, "gloo");
}

TEST_CASE("multihost rpc: a peer that dies mid-call on another host costs the caller an error within the timeout") {
  if (skip_without_namespaces()) return;
  test::HostNetwork net(3);
  auto server = net.start(0, {HIVE_MULTIHOST_TESTS, "--serve", "0.0.0.0:7000"});
  REQUIRE(server->read_until("serving", 20s));
  // The process dies: its kernel closes the connection, the caller learns at once.
  auto caller = net.start(1, {HIVE_MULTIHOST_TESTS, "--call", net.ip(0) + ":7000", "20"});
  REQUIRE(server->read_until("hang called", 20s));
  server->signal(SIGKILL);
  std::string out;
  auto status = caller->wait_exit(30s, &out);
  INFO(out);
  REQUIRE(status);
  CHECK(out.find("error after") != std::string::npos);
  CHECK(out.find("timed out") == std::string::npos);

  // The whole host goes away (its link down): nobody closes anything, the call times out.
  auto second = net.start(2, {HIVE_MULTIHOST_TESTS, "--serve", "0.0.0.0:7000"});
  REQUIRE(second->read_until("serving", 20s));
  auto caller2 = net.start(1, {HIVE_MULTIHOST_TESTS, "--call", net.ip(2) + ":7000", "3"});
  REQUIRE(second->read_until("hang called", 20s));
  net.unplug(2);
  status = caller2->wait_exit(30s, &out);
  INFO(out);
  REQUIRE(status);
  CHECK(out.find("error after") != std::string::npos);
  CHECK(out.find("timed out") != std::string::npos);
}

namespace {

/// The JSON summary a `hive-infer --client` run printed last.
nlohmann::json client_summary(const std::string& out) {
  nlohmann::json summary;
  for (const auto& line : lines_of(out))
    if (!line.empty() && line.front() == '{') summary = nlohmann::json::parse(line, nullptr, false);
  return summary;
}

}  // namespace

TEST_CASE("multihost serve: a training peer serves while it trains, a replica on another host follows it, clients "
          "vote across both and fail over when the replica dies") {
  if (skip_without_namespaces()) return;
  test::HostNetwork net(2);
  // Host 0 trains (alone: this is about serving, not averaging) and serves its snapshots.
  auto trainer = net.start(0, {HIVE_AVERAGING_PEER, "--listen_on", "0.0.0.0:4000", "--train_samples", "4000",
                               "--test_samples", "200", "--epochs", "3", "--serve", "--publish_every", "10",
                               "--linger", "120", "--no_final_average", "--quiet", "--prefix", "served"});
  auto serving = trainer->read_until("Serving predictions", 60s);
  REQUIRE(serving);
  CHECK(serving->find(net.ip(0) + ":4000") != std::string::npos);
  // Host 1 runs a replica of the swarm on a wildcard address.
  auto replica = net.start(1, {HIVE_INFER, "--initial_peers", net.ip(0) + ":4000", "--prefix", "served", "--listen_on",
                               "0.0.0.0:5000", "--every_seconds", "2", "--every_steps", "20"});
  auto started = replica->read_until("Replica of 'served'", 60s);
  REQUIRE(started);
  CHECK(started->find(net.ip(1) + ":5000") != std::string::npos);

  auto run_client = [&](std::vector<std::string> args, std::function<void(test::ChildProcess&)> meanwhile = {}) {
    std::vector<std::string> argv{HIVE_INFER, "--client", "--initial_peers", net.ip(0) + ":4000", "--prefix", "served",
                                  "--test_samples", "500"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto client = net.start(1, argv);
    if (meanwhile) meanwhile(*client);
    std::string out;
    const auto status = client->wait_exit(120s, &out);
    INFO(out);
    REQUIRE(status);
    CHECK(WEXITSTATUS(*status) == 0);
    return std::pair{client_summary(out), out};
  };
  // Every endpoint answers each batch, the vote is right most of the time (10% is chance).
  const auto all_run = run_client({"--mode", "all", "--requests", "30", "--concurrency", "2"});
  const auto& all = all_run.first;
  const auto& all_out = all_run.second;
  INFO(all_out);
  CHECK(all_out.find("2 endpoints") != std::string::npos);
  CHECK(all["failed"] == 0);
  CHECK(all["answered_by"].size() == 2);
  CHECK(all["answered_by"].dump().find(net.ip(0) + ":4000") != std::string::npos);
  CHECK(all["answered_by"].dump().find(net.ip(1) + ":5000") != std::string::npos);
  CHECK(all["accuracy"].get<double>() > 30);
  // The replica serves a downloaded state, not its own initialization.
  const auto rep_run = run_client({"--mode", "one", "--role", "replica", "--requests", "10"});
  const auto& rep = rep_run.first;
  INFO(rep_run.second);
  CHECK(rep["failed"] == 0);
  CHECK(rep["min_step"].get<std::uint64_t>() > 0);
  // The replica dies while a client streams: requests in flight to it fail over to the trainer.
  const auto one_run = run_client({"--mode", "one", "--requests", "400", "--concurrency", "4"}, [&](test::ChildProcess& c) {
    REQUIRE(c.read_until("2 endpoints", 60s));
    replica->signal(SIGKILL);
  });
  const auto& one = one_run.first;
  INFO(one_run.second);
  CHECK(one["failed"] == 0);
  CHECK(one["answered"] == 400);
  CHECK(one["failovers"].get<int>() >= 1);
}
