#pragma once
// Separate hosts for the tests: Linux network namespaces, one veth each on a bridge that lives
// in a namespace of its own. Nothing links to the root namespace and there is no default
// route, so the hosts reach each other and nothing else. Names are unique per run; every
// namespace is removed when the network is destroyed (also when a test fails), and networks
// left by a run that was killed are removed by the next one.

#include "child_process.hpp"

#include <fmt/format.h>

#include <signal.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace hive::test {

/// A network of `hosts` namespaces ("hv<pid>-<n>-h<i>") on one bridge, host i at 10.47.0.(i+1)
/// and fd47::(i+1) (an IPv6 unique-local address).
class HostNetwork {
 public:
  /// Why namespaces cannot be made here (not root, no `ip`), or "" when they can.
  static std::string unavailable_reason() {
    if (::geteuid() != 0) return "network namespaces need root (CI runs as root)";
    if (!std::filesystem::exists(ip_binary())) return "iproute2's ip is not installed";
    return "";
  }

  /// Builds the network; throws std::runtime_error naming the command that failed.
  explicit HostNetwork(int hosts, std::string subnet = "10.47.0") : subnet_(std::move(subnet)) {
    remove_stale();
    static int serial = 0;
    prefix_ = fmt::format("hv{}-{}", ::getpid(), serial++);
    try {
      const auto sw = switch_name();
      run({"netns", "add", sw});
      namespaces_.push_back(sw);
      run({"-n", sw, "link", "set", "lo", "up"});
      run({"-n", sw, "link", "add", "br0", "type", "bridge"});
      run({"-n", sw, "link", "set", "br0", "up"});
      for (int i = 0; i < hosts; ++i) add_host();
    } catch (...) {
      remove();
      throw;
    }
  }
  HostNetwork(const HostNetwork&) = delete;
  HostNetwork& operator=(const HostNetwork&) = delete;
  ~HostNetwork() { remove(); }

  /// Number of hosts.
  [[nodiscard]] int size() const noexcept { return hosts_; }
  /// Namespace name of host i.
  [[nodiscard]] std::string ns(int i) const { return fmt::format("{}-h{}", prefix_, i); }
  /// IPv4 address of host i.
  [[nodiscard]] std::string ip(int i) const { return fmt::format("{}.{}", subnet_, i + 1); }
  /// IPv6 address of host i.
  [[nodiscard]] std::string ip6(int i) const { return fmt::format("fd47::{:x}", i + 1); }

  /// The command line that runs `argv` on host i.
  [[nodiscard]] std::vector<std::string> on(int i, std::vector<std::string> argv) const {
    std::vector<std::string> full{ip_binary(), "netns", "exec", ns(i)};
    full.insert(full.end(), argv.begin(), argv.end());
    return full;
  }

  /// Starts `argv` on host i (`ip netns exec` execs it, so the child's pid is the program's).
  [[nodiscard]] std::unique_ptr<ChildProcess> start(int i, std::vector<std::string> argv) const {
    return std::make_unique<ChildProcess>(on(i, std::move(argv)));
  }

  /// Cuts host i off the network (its link goes down), as a machine that loses its cable.
  void unplug(int i) const { run({"-n", ns(i), "link", "set", "eth0", "down"}); }

 private:
  static std::string ip_binary() { return std::filesystem::exists("/usr/sbin/ip") ? "/usr/sbin/ip" : "/sbin/ip"; }
  [[nodiscard]] std::string switch_name() const { return prefix_ + "-sw"; }

  void add_host() {
    const int i = hosts_;
    const auto host = ns(i);
    const auto port = fmt::format("p{}", i);
    run({"netns", "add", host});
    namespaces_.push_back(host);
    run({"-n", host, "link", "set", "lo", "up"});
    // Both ends are created inside namespaces: no interface ever exists in the root namespace.
    run({"-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", switch_name()});
    run({"-n", switch_name(), "link", "set", port, "master", "br0", "up"});
    run({"-n", host, "addr", "add", ip(i) + "/24", "dev", "eth0"});
    // nodad: usable at once, without duplicate-address detection's delay.
    run({"-n", host, "addr", "add", ip6(i) + "/64", "dev", "eth0", "nodad"});
    run({"-n", host, "link", "set", "eth0", "up"});
    ++hosts_;
  }

  // Kills every process left in namespace `name` (programs of a test that failed or was
  // killed), so that deleting the namespace really frees it.
  static void kill_processes(const std::string& name) noexcept {
    try {
      std::stringstream pids(run({"netns", "pids", name}));
      for (pid_t pid; pids >> pid;)
        if (pid > 1 && pid != ::getpid()) ::kill(pid, SIGKILL);
    } catch (...) {
    }
  }

  static std::string run(const std::vector<std::string>& args) {
    std::string command = ip_binary();
    for (const auto& a : args) command += " '" + a + "'";
    command += " 2>&1";
    std::string output;
    FILE* p = ::popen(command.c_str(), "r");
    if (!p) throw std::runtime_error("cannot run " + command);
    std::array<char, 256> buf{};
    while (std::fgets(buf.data(), buf.size(), p)) output += buf.data();
    if (::pclose(p) != 0) throw std::runtime_error(fmt::format("'{}' failed: {}", command, output));
    return output;
  }

  void remove() noexcept {
    for (auto it = namespaces_.rbegin(); it != namespaces_.rend(); ++it) {
      kill_processes(*it);
      try {
        run({"netns", "del", *it});
      } catch (...) {
      }
    }
    namespaces_.clear();
  }

  // Namespaces named hv<pid>-... whose process is gone were left by a run that was killed.
  static void remove_stale() {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator("/run/netns", ec)) {
      const auto name = entry.path().filename().string();
      if (name.rfind("hv", 0) != 0) continue;
      const auto dash = name.find('-');
      if (dash == std::string::npos) continue;
      const std::string pid = name.substr(2, dash - 2);
      if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos) continue;
      if (std::stoi(pid) == ::getpid() || ::kill(std::stoi(pid), 0) == 0) continue;
      kill_processes(name);
      try {
        run({"netns", "del", name});
      } catch (...) {
      }
    }
  }

  std::string subnet_;
  std::string prefix_;
  std::vector<std::string> namespaces_;
  int hosts_ = 0;
};

}  // namespace hive::test
