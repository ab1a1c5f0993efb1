// The hive-dht command-line peer: starts, prints its join address, serves, stops on SIGINT.
#include "net_fixtures.hpp"

#include <hive/dht/dht.hpp>

#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef HIVE_DHT_CLI
#error "tests/CMakeLists.txt must define HIVE_DHT_CLI as the path of the hive-dht program"
#endif

using namespace hive;
using namespace std::chrono_literals;

namespace {

/// Reads one line from `fd`, giving up after `limit`.
std::string read_line(int fd, std::chrono::milliseconds limit) {
  std::string line;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  char c;
  while (std::chrono::steady_clock::now() < deadline && line.size() < 4096) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    if (read(fd, &c, 1) != 1) break;
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

/// Waits for `pid` to exit within `limit`; returns its wait status, or -1 on timeout.
int wait_exit(pid_t pid, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) return status;
    std::this_thread::sleep_for(10ms);
  }
  return -1;
}

}  // namespace

TEST_CASE("cli hive-dht: prints its address, serves a joining peer, stops cleanly on SIGINT") {
  int out[2];
  REQUIRE(pipe(out) == 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_addclose(&actions, out[0]);
  char exe[] = HIVE_DHT_CLI;
  char a1[] = "--listen_on", a2[] = "127.0.0.1:0", a3[] = "--status_period", a4[] = "0";
  char* argv[] = {exe, a1, a2, a3, a4, nullptr};
  pid_t pid = 0;
  REQUIRE(posix_spawn(&pid, exe, &actions, nullptr, argv, environ) == 0);
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);

  std::string join;
  for (int i = 0; i < 3 && join.empty(); ++i) {
    auto line = read_line(out[0], 10s);
    if (auto at = line.find("--initial_peers "); at != std::string::npos) join = line.substr(at + 16);
  }
  REQUIRE_FALSE(join.empty());
  {
    DHT peer(DHTOptions().listen_on("127.0.0.1:0").initial_peers({join}));
    CHECK(peer.store("cli-key", "cli-value", wall_time() + 60));
    DHT other(DHTOptions().client_mode(true).initial_peers({join}));
    auto got = other.get("cli-key", true);
    REQUIRE(got);
    CHECK(got->value->value == "cli-value");
  }
  REQUIRE(kill(pid, SIGINT) == 0);
  const int status = wait_exit(pid, 10s);
  if (status == -1) kill(pid, SIGKILL), waitpid(pid, nullptr, 0);
  REQUIRE(status != -1);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  std::string rest;
  for (std::string line; !(line = read_line(out[0], 1s)).empty();) rest += line + "\n";
  CHECK(rest.find("stopped") != std::string::npos);
  close(out[0]);

  // --help works and bad flags fail with a message.
  CHECK(std::system((std::string(HIVE_DHT_CLI) + " --help > /dev/null").c_str()) == 0);
  CHECK(std::system((std::string(HIVE_DHT_CLI) + " --no-such-flag 2> /dev/null").c_str()) != 0);
}
