// The hive-dht command-line peer: starts, prints its join address, serves, stops on SIGINT.
#include "../common/child_process.hpp"

#include <hive/dht/dht.hpp>

#include <doctest/doctest.h>

#include <cstdlib>

#ifndef HIVE_DHT_CLI
#error "tests/CMakeLists.txt must define HIVE_DHT_CLI as the path of the hive-dht program"
#endif

using namespace hive;
using namespace std::chrono_literals;

TEST_CASE("cli hive-dht: prints its address, serves a joining peer, stops cleanly on SIGINT") {
  test::ChildProcess child({HIVE_DHT_CLI, "--listen_on", "127.0.0.1:0", "--status_period", "0"});
  auto line = child.read_until("--initial_peers ", 10s, 3);
  REQUIRE(line);
  const std::string join = line->substr(line->find("--initial_peers ") + 16);
  REQUIRE_FALSE(join.empty());
  {
    DHT peer(DHTOptions().listen_on("127.0.0.1:0").initial_peers({join}));
    CHECK(peer.store("cli-key", "cli-value", wall_time() + 60));
    DHT other(DHTOptions().client_mode(true).initial_peers({join}));
    auto got = other.get("cli-key", true);
    REQUIRE(got);
    CHECK(got->value->value == "cli-value");
  }
  REQUIRE(child.signal(SIGINT));
  std::string rest;
  const auto status = child.wait_exit(10s, &rest);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
  CHECK(rest.find("stopped") != std::string::npos);

  // --help works and bad flags fail with a message.
  CHECK(std::system((std::string(HIVE_DHT_CLI) + " --help > /dev/null").c_str()) == 0);
  CHECK(std::system((std::string(HIVE_DHT_CLI) + " --no-such-flag 2> /dev/null").c_str()) != 0);
}
