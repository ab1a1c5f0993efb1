#pragma once
/// @file
/// Reachable addresses: what a peer that listens on a wildcard address announces to peers on
/// other hosts, and what address a receiver records for a peer that claims one.

#include <hive/net/transport.hpp>

#include <asio/ip/address.hpp>

#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace hive::net {

/// True for "0.0.0.0", "::" and other unspecified addresses (a listen address, never one to dial).
inline bool is_wildcard_host(std::string_view host) {
  std::error_code ec;
  const auto ip = asio::ip::make_address(std::string(host), ec);
  return !ec && ip.is_unspecified();
}

/// True for 127.0.0.0/8, ::1 and "localhost".
inline bool is_loopback_host(std::string_view host) {
  if (host == "localhost") return true;
  std::error_code ec;
  const auto ip = asio::ip::make_address(std::string(host), ec);
  return !ec && ip.is_loopback();
}

/// The addresses of this machine's interfaces that are up, as host strings: IPv4 first, then
/// IPv6 (link-local IPv6 left out: it needs a scope to be dialled), loopback last.
inline std::vector<std::string> interface_hosts() {
  std::vector<std::string> v4, v6, loopback;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return {};
  for (const ifaddrs* it = list; it; it = it->ifa_next) {
    if (!it->ifa_addr || !(it->ifa_flags & IFF_UP)) continue;
    asio::ip::address ip;
    if (it->ifa_addr->sa_family == AF_INET) {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(it->ifa_addr);
      ip = asio::ip::address_v4(ntohl(sin->sin_addr.s_addr));
    } else if (it->ifa_addr->sa_family == AF_INET6) {
      const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(it->ifa_addr);
      asio::ip::address_v6::bytes_type bytes;
      std::copy(sin6->sin6_addr.s6_addr, sin6->sin6_addr.s6_addr + 16, bytes.begin());
      const asio::ip::address_v6 a6(bytes);
      if (a6.is_link_local()) continue;
      ip = a6;
    } else {
      continue;
    }
    auto& bucket = ip.is_loopback() ? loopback : ip.is_v4() ? v4 : v6;
    const auto text = ip.to_string();
    if (std::find(bucket.begin(), bucket.end(), text) == bucket.end()) bucket.push_back(text);
  }
  ::freeifaddrs(list);
  v4.insert(v4.end(), v6.begin(), v6.end());
  v4.insert(v4.end(), loopback.begin(), loopback.end());
  return v4;
}

/// The address a receiver records for a peer that called from `remote` ("host:port" of the
/// connection) and claims to listen at `claimed`: the connection's source host with the
/// claimed port, so that a wildcard, a loopback address or someone else's host in the claim
/// never enters a routing table (nor makes this peer dial it). Empty when the claim does not
/// parse or names port 0. A relayed claim ("relay:port/relay/peer") is kept as it is: the
/// relay, not the connection, vouches for it.
inline std::string reachable_address(std::string_view claimed, std::string_view remote) {
  if (RelayedAddress::is_relayed(claimed)) {
    try {
      return RelayedAddress::parse(claimed).str();
    } catch (const Error&) {
      return {};
    }
  }
  HostPort c, r;
  try {
    c = HostPort::parse(claimed);
  } catch (const Error&) {
    return {};
  }
  if (c.port == 0) return {};
  try {
    r = HostPort::parse(remote);
  } catch (const Error&) {
    return c.str();
  }
  return HostPort{r.host, c.port}.str();
}

/// What a peer learns about itself from others: the host each peer saw it connect from
/// (reported in ping replies). Thread-safe; keeps at most 64 distinct hosts.
class ObservedHosts {
 public:
  /// Counts one observation of `host` (empty and wildcard hosts are ignored).
  void add(const std::string& host) {
    if (host.empty() || is_wildcard_host(host)) return;
    std::lock_guard lock(mutex_);
    if (votes_.size() >= 64 && !votes_.contains(host)) return;
    ++votes_[host];
  }
  /// The observed hosts, most often seen first.
  [[nodiscard]] std::vector<std::string> ranked() const {
    std::vector<std::pair<std::size_t, std::string>> all;
    {
      std::lock_guard lock(mutex_);
      for (const auto& [host, n] : votes_) all.emplace_back(n, host);
    }
    std::stable_sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<std::string> out;
    for (auto& [n, host] : all) out.push_back(std::move(host));
    return out;
  }

 private:
  mutable std::mutex mutex_;
  std::map<std::string, std::size_t> votes_;
};

/// The addresses to announce for a peer listening at `listen` ("host:port"): `listen` itself
/// when its host is specific; with a wildcard host, `announce_host` when given, otherwise the
/// hosts others observed (most seen first), then this machine's interface addresses, each
/// with the listen port. Loopback hosts only when there is nothing else (a machine with no
/// network). An IPv4 wildcard announces only IPv4 hosts.
inline std::vector<std::string> announce_addresses(std::string_view listen, std::string_view announce_host,
                                                   const std::vector<std::string>& observed) {
  if (listen.empty()) return {};
  const auto hp = HostPort::parse(listen);
  if (!is_wildcard_host(hp.host)) return {std::string(listen)};
  if (!announce_host.empty()) return {HostPort{std::string(announce_host), hp.port}.str()};
  const bool v4_only = hp.host.find(':') == std::string::npos;
  std::vector<std::string> hosts, later;
  auto consider = [&](const std::string& host) {
    std::error_code ec;
    const auto ip = asio::ip::make_address(host, ec);
    if (ec || ip.is_unspecified() || (v4_only && !ip.is_v4())) return;
    auto& into = ip.is_loopback() ? later : hosts;
    if (std::find(hosts.begin(), hosts.end(), host) == hosts.end() &&
        std::find(later.begin(), later.end(), host) == later.end())
      into.push_back(host);
  };
  for (const auto& h : observed) consider(h);
  for (const auto& h : interface_hosts()) consider(h);
  if (hosts.empty()) hosts = later;  // loopback only when nothing else is known
  std::vector<std::string> out;
  for (auto& h : hosts) out.push_back(HostPort{h, hp.port}.str());
  if (out.empty()) out.push_back(HostPort{v4_only ? "127.0.0.1" : "::1", hp.port}.str());
  return out;
}

}  // namespace hive::net
