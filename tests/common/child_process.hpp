#pragma once
// A program under test run as a child process, its stdout read through a pipe with bounded
// waits; the child is killed and reaped if the test ends early.

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace hive::test {

class ChildProcess {
 public:
  /// Starts `argv[0]` with arguments `argv`; its stdout goes to a pipe read by this object.
  explicit ChildProcess(std::vector<std::string> argv) {
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe failed");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_addclose(&actions, out[0]);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    const int rc = posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    close(out[1]);
    if (rc != 0) {
      close(out[0]);
      throw std::runtime_error("cannot start " + argv[0]);
    }
    fd_ = out[0];
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  /// Kills and reaps the child if it still runs.
  ~ChildProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (fd_ >= 0) close(fd_);
  }

  /// The child's pid.
  [[nodiscard]] pid_t pid() const noexcept { return pid_; }

  /// Sends `sig` to the child.
  bool signal(int sig) const { return pid_ > 0 && kill(pid_, sig) == 0; }

  /// Reads one line of the child's stdout, giving up after `limit` (returns what it has).
  std::string read_line(std::chrono::milliseconds limit) {
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + limit;
    char c;
    while (std::chrono::steady_clock::now() < deadline && line.size() < 4096) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      if (read(fd_, &c, 1) != 1) break;
      if (c == '\n') return line;
      line += c;
    }
    return line;
  }

  /// Reads lines until one contains `marker` (returns it) or `limit` passes (returns nullopt).
  std::optional<std::string> read_until(const std::string& marker, std::chrono::milliseconds limit, int max_lines = 100) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (int i = 0; i < max_lines && std::chrono::steady_clock::now() < deadline; ++i) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      auto line = read_line(left);
      if (line.find(marker) != std::string::npos) return line;
    }
    return std::nullopt;
  }

  /// Reads stdout to its end (the child exited or closed it) within `limit`; nullopt when it
  /// was still open at the deadline.
  std::optional<std::string> read_to_end(std::chrono::milliseconds limit) {
    std::string out;
    const auto deadline = std::chrono::steady_clock::now() + limit;
    char buf[4096];
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd p{fd_, POLLIN, 0};
      if (left.count() <= 0 || poll(&p, 1, static_cast<int>(left.count())) <= 0) return std::nullopt;
      const auto n = read(fd_, buf, sizeof buf);
      if (n <= 0) return out;
      out.append(buf, static_cast<std::size_t>(n));
    }
  }

  /// Waits for the child to exit: its stdout reaching end-of-file bounds the wait by `limit`,
  /// then waitpid returns at once. Returns the wait status, or nullopt (after killing it) when
  /// it did not exit in time. `output` receives what it printed meanwhile.
  std::optional<int> wait_exit(std::chrono::milliseconds limit, std::string* output = nullptr) {
    auto rest = read_to_end(limit);
    if (output && rest) *output = *rest;
    if (!rest) kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    if (!rest) return std::nullopt;
    return status;
  }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
};

}  // namespace hive::test
