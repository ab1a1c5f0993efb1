#pragma once
// Separate hosts for the tests: Linux network namespaces, one veth each on a bridge that lives
// in a namespace of its own. Nothing links to the root namespace and there is no default
// route, so the hosts reach each other and nothing else. Names are unique per run; every
// namespace is removed when the network is destroyed (also when a test fails), and networks
// left by a run that was killed are removed by the next one.
//
// A host behind NAT (add_nat_host) sits on a private link of its own behind a router
// namespace: the router has one veth on the bridge and one towards the host, forwards, and
// masquerades what leaves on the bridge side (an nftables rule), like a home router. The
// private host has a route to the bridge's subnet through the router and nothing else.

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
  /// Why NAT routers cannot be made here (as unavailable_reason(), or no nft), or "".
  static std::string nat_unavailable_reason() {
    auto why = unavailable_reason();
    if (!why.empty()) return why;
    if (nft_binary().empty()) return "nftables' nft is not installed (scripts/setup.sh installs it)";
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
  /// IPv4 address of host i (behind NAT: its private address, which only its router reaches).
  [[nodiscard]] std::string ip(int i) const {
    return is_nat(i) ? fmt::format("192.168.{}.2", i) : fmt::format("{}.{}", subnet_, i + 1);
  }
  /// True when host i sits behind a NAT router.
  [[nodiscard]] bool is_nat(int i) const { return nat_.size() > static_cast<std::size_t>(i) && nat_[static_cast<std::size_t>(i)]; }
  /// The address host i's NAT router has on the bridge: what peers see host i connect from.
  [[nodiscard]] std::string router_ip(int i) const { return fmt::format("{}.{}", subnet_, 101 + i); }

  /// Adds a host behind a NAT router of its own; returns its index. Throws std::runtime_error
  /// naming the command that failed.
  int add_nat_host() {
    const int i = hosts_;
    const auto host = ns(i), router = fmt::format("{}-r{}", prefix_, i), port = fmt::format("p{}", i);
    nat_.resize(static_cast<std::size_t>(i) + 1, false);
    nat_[static_cast<std::size_t>(i)] = true;  // first: ip(i) is the private address from here on
    run({"netns", "add", router});
    namespaces_.push_back(router);
    run({"netns", "add", host});
    namespaces_.push_back(host);
    for (const auto& n : {router, host}) run({"-n", n, "link", "set", "lo", "up"});
    // The router's public side on the bridge, its private side towards the host.
    run({"-n", router, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", switch_name()});
    run({"-n", switch_name(), "link", "set", port, "master", "br0", "up"});
    run({"-n", router, "addr", "add", router_ip(i) + "/24", "dev", "eth0"});
    run({"-n", router, "link", "set", "eth0", "up"});
    run({"-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", host});
    run({"-n", router, "addr", "add", fmt::format("192.168.{}.1/24", i), "dev", "lan0"});
    run({"-n", router, "link", "set", "lan0", "up"});
    run({"-n", host, "addr", "add", ip(i) + "/24", "dev", "eth0"});
    run({"-n", host, "link", "set", "eth0", "up"});
    run({"-n", host, "route", "add", subnet_ + ".0/24", "via", fmt::format("192.168.{}.1", i)});
    run({"netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"});
    const auto nft = nft_binary();
    run({"netns", "exec", router, nft, "add", "table", "ip", "nat"});
    run({"netns", "exec", router, nft, "add chain ip nat post { type nat hook postrouting priority 100 ; }"});
    run({"netns", "exec", router, nft, "add", "rule", "ip", "nat", "post", "oifname", "eth0", "masquerade"});
    ++hosts_;
    return i;
  }
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
  static std::string nft_binary() {
    for (const char* path : {"/usr/sbin/nft", "/sbin/nft"})
      if (std::filesystem::exists(path)) return path;
    return "";
  }
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
  std::vector<bool> nat_;  // per host: behind a NAT router
  int hosts_ = 0;
};

}  // namespace hive::test
