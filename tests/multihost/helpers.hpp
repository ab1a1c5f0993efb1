#pragma once
// What the multi-host tests share: the skip rule, reading the programs' output, one-shot
// hive-dht runs, and the averaging check run on plain and NATed hosts.
#include "../common/netns.hpp"

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <sys/wait.h>

#include <iostream>
#include <regex>
#include <sstream>

using namespace std::chrono_literals;

namespace {

/// True (after saying why in a line ctest reads as "skipped") when namespaces cannot be made.
inline bool skip_without_namespaces() {
  const auto why = hive::test::HostNetwork::unavailable_reason();
  if (why.empty()) return false;
  std::cout << "SKIPPED: " << why << std::endl;  // ctest's SKIP_REGULAR_EXPRESSION reads this
  return true;
}

inline std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

/// The last JSON line a one-shot `hive-dht --store/--get` printed, and its exit status.
struct OneShot {
  int status = -1;
  nlohmann::json json;
};

inline OneShot one_shot(const hive::test::HostNetwork& net, int host, std::vector<std::string> args) {
  std::vector<std::string> argv{HIVE_DHT_CLI};
  argv.insert(argv.end(), args.begin(), args.end());
  auto child = net.start(host, argv);
  std::string out;
  const auto status = child->wait_exit(30s, &out);
  OneShot r;
  if (!status) return r;
  r.status = WIFEXITED(*status) ? WEXITSTATUS(*status) : -1;
  for (const auto& line : lines_of(out))
    if (!line.empty() && line.front() == '{') r.json = nlohmann::json::parse(line, nullptr, false);
  return r;
}

/// 4 averaging_peer processes on the 4 hosts of `net` (host 0 public: the others join through
/// it), wildcard listen addresses, all-reduce `strategy`: most rounds find a group, the last
/// one gathers all four, and they end with equal parameters.
inline void check_averaging_across_hosts(hive::test::HostNetwork& net, const std::string& strategy) {
  auto args = [&](int i) {
    std::vector<std::string> argv{HIVE_AVERAGING_PEER, "--listen_on", "0.0.0.0:4000", "--shard", fmt::format("{}/4", i),
                                  "--train_samples", "4000", "--test_samples", "500", "--epochs", "2",
                                  "--target_group_size", "4", "--min_group_size", "2", "--averaging_period", "10",
                                  "--matchmaking_time", "5", "--wait_for_peers", "4", "--quiet", "--prefix", "multihost",
                                  "--strategy", strategy};
    if (i > 0) argv.insert(argv.end(), {"--initial_peers", net.ip(0) + ":4000"});
    return argv;
  };
  std::vector<std::unique_ptr<hive::test::ChildProcess>> peers;
  peers.push_back(net.start(0, args(0)));
  auto join = peers[0]->read_until("To join this swarm", 60s);
  REQUIRE(join);
  CHECK(join->find(net.ip(0) + ":4000") != std::string::npos);
  for (int i = 1; i < 4; ++i) peers.push_back(net.start(i, args(i)));
  std::vector<std::string> outputs(4);
  for (int i = 0; i < 4; ++i) {
    const auto status = peers[static_cast<std::size_t>(i)]->wait_exit(300s, &outputs[static_cast<std::size_t>(i)]);
    INFO("peer ", i, ":\n", outputs[static_cast<std::size_t>(i)]);
    REQUIRE(status);
    CHECK(WEXITSTATUS(*status) == 0);
  }
  const std::regex rounds_re(R"(averaging: (\d+) of (\d+) rounds averaged)"), params_re(R"(parameters: sum (\S+) norm (\S+))");
  std::vector<double> sums, norms;
  for (int i = 0; i < 4; ++i) {
    const auto& out = outputs[static_cast<std::size_t>(i)];
    INFO("peer ", i, ":\n", out);
    std::smatch m;
    REQUIRE(std::regex_search(out, m, rounds_re));
    const int averaged = std::stoi(m[1]), rounds = std::stoi(m[2]);
    MESSAGE("host ", i, ": ", averaged, " of ", rounds, " rounds averaged");
    CHECK(rounds > 0);
    CHECK(averaged * 2 >= rounds);  // at least half the rounds found a group (a short run has 2-3)
    // The last round, once all four had finished training, gathered all four.
    CHECK(out.find("4 of 4 peers have finished training") != std::string::npos);
    CHECK(out.find("The last averaging round had 4 peers") != std::string::npos);
    REQUIRE(std::regex_search(out, m, params_re));
    sums.push_back(std::stod(m[1]));
    norms.push_back(std::stod(m[2]));
  }
  // After the last round together, the peers hold the same parameters up to float16 rounding.
  for (int i = 1; i < 4; ++i) {
    CHECK(std::abs(norms[static_cast<std::size_t>(i)] - norms[0]) <= 1e-2 * std::abs(norms[0]));
    CHECK(std::abs(sums[static_cast<std::size_t>(i)] - sums[0]) <= 1e-2 * (1 + std::abs(sums[0])));
  }
}

}  // namespace
