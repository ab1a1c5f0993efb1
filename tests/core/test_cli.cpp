// The hive-dht command-line peer: starts, prints its join address, serves, stops on SIGINT.
#include "net_fixtures.hpp"

#include <hive/dht/dht.hpp>

#include <doctest/doctest.h>

#include <poll.h>
#include <optional>

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

/// Reads `fd` to its end (the writer exited) within `limit`; returns what was read, or nullopt
/// when the writer was still open at the deadline.
std::optional<std::string> read_to_end(int fd, std::chrono::milliseconds limit) {
  std::string out;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  char buf[4096];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd p{fd, POLLIN, 0};
    if (left.count() <= 0 || poll(&p, 1, static_cast<int>(left.count())) <= 0) return std::nullopt;
    const auto n = read(fd, buf, sizeof buf);
    if (n <= 0) return out;
    out.append(buf, static_cast<std::size_t>(n));
  }
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
  // A failed REQUIRE must not leave the program running.
  struct Reaper {
    pid_t pid;
    bool reaped = false;
    ~Reaper() {
      if (!reaped) kill(pid, SIGKILL), waitpid(pid, nullptr, 0);
    }
  } reaper{pid};

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
  // Its stdout reaches end-of-file when it exits; then waitpid returns at once.
  const auto rest = read_to_end(out[0], 10s);
  close(out[0]);
  if (!rest) kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  reaper.reaped = true;
  REQUIRE(rest.has_value());
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(rest->find("stopped") != std::string::npos);

  // --help works and bad flags fail with a message.
  CHECK(std::system((std::string(HIVE_DHT_CLI) + " --help > /dev/null").c_str()) == 0);
  CHECK(std::system((std::string(HIVE_DHT_CLI) + " --no-such-flag 2> /dev/null").c_str()) != 0);
}
