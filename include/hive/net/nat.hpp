#pragma once
/// @file
/// net::Nat: whether other peers can connect to this one (dial-backs, AutoNAT's idea) and, when
/// they cannot, the relays this peer keeps reservations at and the relayed addresses it
/// announces instead (docs/multihost.md, "Behind NAT").

#include <hive/core/log.hpp>
#include <hive/core/options.hpp>
#include <hive/detail/event.hpp>
#include <hive/net/rpc.hpp>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace hive::net {

/// Whether peers elsewhere can open connections to this one.
enum class Reachability {
  unknown,      ///< not checked, or no helper answered: the peer announces its addresses
  reachable,    ///< a helper dialled this peer back: it announces its own addresses
  unreachable,  ///< helpers answered and none could dial back: it announces relayed addresses
};

/// "unknown", "reachable" or "unreachable".
inline const char* to_string(Reachability r) noexcept {
  switch (r) {
    case Reachability::reachable: return "reachable";
    case Reachability::unreachable: return "unreachable";
    default: return "unknown";
  }
}

/// Run-time knobs of reachability checks and relay reservations (NodeOptions::nat).
struct NatOptions {
  /// Ask peers to dial this one back after bootstrap and whenever its addresses change (only
  /// for a peer that listens on a wildcard address and announces no host of its own).
  HIVE_ARG(bool, check_reachability, true);
  /// Peers asked per check; the peer is unreachable when those that answer all fail to dial.
  HIVE_ARG(std::size_t, helpers, 3);
  /// Relays an unreachable peer keeps reservations at (each gives it one relayed address);
  /// 0 makes an unreachable peer a client only.
  HIVE_ARG(std::size_t, num_relays, 2);
  /// Relays to try first ("host:port"), e.g. dedicated ones (`hive-dht --relay`); after them,
  /// peers from the routing table and the initial peers.
  HIVE_ARG(std::vector<std::string>, relays, {});
  /// How often the reservations are looked at: a relay whose connection closed is replaced
  /// (and reservations are renewed every third of their ttl).
  HIVE_ARG(Seconds, check_period, Seconds(5));
  /// Reachability is checked again this often even when the addresses stayed the same.
  HIVE_ARG(Seconds, recheck_period, Seconds(1800));
  /// A relay that refused or failed is not asked again for this long.
  HIVE_ARG(Seconds, relay_retry_after, Seconds(60));
  HIVE_OPTIONS_JSON(NatOptions, check_reachability, helpers, num_relays, relays, check_period, recheck_period,
                    relay_retry_after)
};

/// Reachability and relays of one RPC peer. The DHT peer (dht::Node) drives it: it supplies
/// the peers to ask and to reserve at, and announces relayed_addresses() while unreachable.
///
/// @par Thread safety
/// check() and maintain() run on the RPC peer's strand, one at a time; reachability() and
/// relayed_addresses() may be called from any thread.
template <Transport T>
class Nat {
 public:
  /// Manages reachability and reservations for `rpc`.
  Nat(std::shared_ptr<Rpc<T>> rpc, NatOptions options) : rpc_(std::move(rpc)), options_(std::move(options)) {}

  /// The options.
  [[nodiscard]] const NatOptions& options() const noexcept { return options_; }
  /// The last check's verdict.
  [[nodiscard]] Reachability reachability() const {
    std::lock_guard lock(mutex_);
    return reachability_;
  }
  /// The addresses others call this peer at through its relays (empty unless unreachable).
  [[nodiscard]] std::vector<std::string> relayed_addresses() const {
    std::lock_guard lock(mutex_);
    return relayed_;
  }

  /// True when `direct` (the addresses the peer would announce) differs from those last
  /// checked, or recheck_period passed.
  [[nodiscard]] bool due(const std::vector<std::string>& direct) const {
    return direct != checked_ || SteadyClock::now() >= next_check_;
  }

  /// Asks up to options().helpers() of `helpers` (direct addresses) to dial this peer back at
  /// `port`; settles reachability() unless none answers. `direct` is what was checked.
  asio::awaitable<void> check(std::vector<std::string> helpers, std::uint16_t port, std::vector<std::string> direct) {
    std::erase_if(helpers, [](const std::string& h) { return RelayedAddress::is_relayed(h); });
    if (helpers.size() > options_.helpers()) helpers.resize(options_.helpers());
    if (helpers.empty()) co_return;
    struct Tally {
      std::size_t pending = 0, yes = 0, no = 0;
      std::string seen_at, why;
      hive::detail::Event done;
    };
    auto tally = std::make_shared<Tally>();
    tally->pending = helpers.size();
    for (const auto& helper : helpers) {
      asio::co_spawn(rpc_->get_executor(), [rpc = rpc_, helper, port, tally]() -> asio::awaitable<void> {
        try {
          auto op = rpc->co_check_reachable(helper, port);
          const auto answer = co_await std::move(op);
          ++(answer.reachable ? tally->yes : tally->no);
          tally->seen_at = answer.address;
          if (!answer.reachable) tally->why = fmt::format("{} could not dial {}: {}", helper, answer.address, answer.error);
        } catch (const std::exception& e) {
          log::debug("nat", "reachability check through {} failed: {}", helper, e.what());
        }
        if (--tally->pending == 0) tally->done.set();
      }, asio::detached);
    }
    const Seconds bound = rpc_->options().dial_back_timeout() + rpc_->options().connect_timeout() * 2;
    co_await tally->done.wait(deadline_after(bound));
    checked_ = std::move(direct);
    next_check_ = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(options_.recheck_period());
    if (tally->yes + tally->no == 0) co_return;  // nobody answered: nothing learnt
    const auto verdict = tally->yes > 0 ? Reachability::reachable : Reachability::unreachable;
    Reachability before;
    {
      std::lock_guard lock(mutex_);
      before = reachability_;
      reachability_ = verdict;
    }
    if (verdict == before) co_return;
    if (verdict == Reachability::reachable)
      log::info("nat", "reachable: {} of {} peers dialled this one back at {}", tally->yes, tally->yes + tally->no, tally->seen_at);
    else
      log::warn("nat", "not reachable from other peers ({}): no longer announcing {}; {}", tally->why,
                fmt::join(checked_, ", "),
                options_.num_relays() > 0 ? "taking part through relays" : "taking part as a client (num_relays is 0)");
  }

  /// While unreachable: renews reservations every third of their ttl, replaces relays whose
  /// connection closed or that refused, and reserves at `candidates` (direct addresses, best
  /// first) until num_relays are held. While reachable: releases every reservation.
  asio::awaitable<void> maintain(std::vector<std::string> candidates) {
    const auto now = SteadyClock::now();
    const bool wanted = reachability() == Reachability::unreachable;
    bool changed = false;
    for (auto it = held_.begin(); it != held_.end();) {
      bool keep = wanted;
      if (keep) {
        auto connected_op = rpc_->co_connected(it->relay);
        const bool connected = co_await std::move(connected_op);
        if (!connected || now >= it->renew_at) {
          auto renewal = reserve(*it);
          keep = co_await std::move(renewal);
        }
        if (!keep) log::info("nat", "relay {} lost (its connection closed or it refused a renewal)", it->relay);
      }
      if (keep) {
        ++it;
        continue;
      }
      rpc_->release(it->relay);
      it = held_.erase(it);
      changed = true;
    }
    if (wanted) {
      for (auto& c : options_.relays()) candidates.insert(candidates.begin(), c);
      for (const auto& relay : candidates) {
        if (held_.size() >= options_.num_relays()) break;
        if (RelayedAddress::is_relayed(relay) || !usable(relay, now)) continue;
        if (std::any_of(held_.begin(), held_.end(), [&](const Held& h) { return h.relay == relay; })) continue;
        Held h{relay, {}, {}};
        auto attempt = reserve(h);
        if (co_await std::move(attempt)) {
          held_.push_back(std::move(h));
          changed = true;
        }
      }
    }
    if (!changed) co_return;
    std::vector<std::string> addresses;
    for (const auto& h : held_) addresses.push_back(h.address);
    {
      std::lock_guard lock(mutex_);
      relayed_ = addresses;
    }
    if (wanted)
      log::info("nat", "reachable through {} relay(s): {}", addresses.size(),
                addresses.empty() ? std::string("none yet") : fmt::format("{}", fmt::join(addresses, ", ")));
  }

 private:
  struct Held {
    std::string relay, address;
    SteadyClock::time_point renew_at;
  };

  bool usable(const std::string& relay, SteadyClock::time_point now) const {
    auto it = failed_.find(relay);
    return it == failed_.end() || now >= it->second;
  }

  // Reserves (or renews) at h.relay; false, and the relay set aside for a while, on failure.
  asio::awaitable<bool> reserve(Held& h) {
    try {
      auto op = rpc_->co_reserve(h.relay);
      const auto r = co_await std::move(op);
      h.address = r.address;
      h.renew_at = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(r.ttl / 3);
      co_return true;
    } catch (const std::exception& e) {
      log::debug("nat", "reserving at {} failed: {}", h.relay, e.what());
      failed_[h.relay] = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(options_.relay_retry_after());
      co_return false;
    }
  }

  std::shared_ptr<Rpc<T>> rpc_;
  NatOptions options_;
  mutable std::mutex mutex_;  // guards reachability_ and relayed_
  Reachability reachability_ = Reachability::unknown;
  std::vector<std::string> relayed_;
  // Strand-confined:
  std::vector<Held> held_;
  std::map<std::string, SteadyClock::time_point> failed_;
  std::vector<std::string> checked_;
  SteadyClock::time_point next_check_{};
};

}  // namespace hive::net
