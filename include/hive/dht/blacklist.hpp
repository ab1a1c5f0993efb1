#pragma once
/// @file
/// Blacklist: peers that failed to answer are left alone for an exponentially growing time.

#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/options.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace hive::dht {

/// Run-time knobs of the Blacklist.
struct BlacklistOptions {
  /// Length of the first ban; zero disables banning.
  HIVE_ARG(Seconds, base_time, Seconds(5.0));
  /// Each further consecutive failure multiplies the ban by this (at least 1).
  HIVE_ARG(double, backoff_rate, 2.0);
  /// Longest ban, whatever the failure count: a peer that comes back is retried within it.
  HIVE_ARG(Seconds, max_ban_time, Seconds(3600.0));
  /// Most addresses remembered; beyond it the one whose last failure is oldest is forgotten.
  HIVE_ARG(std::uint64_t, max_size, 10000);
  HIVE_OPTIONS_JSON(BlacklistOptions, base_time, backoff_rate, max_ban_time, max_size)
};

/// Addresses of peers that recently failed to respond, with exponential back-off.
///
/// The n-th consecutive failure bans an address for base_time * backoff_rate^(n-1) seconds
/// (capped at max_ban_time); a success forgets its history. Time is passed in by the caller
/// (SteadyClock), so tests need not sleep.
///
/// @par Thread safety
/// None; the DHT protocol serializes access.
class Blacklist {
 public:
  /// A blacklist with the given knobs; throws hive::InvalidArgument for nonsensical ones.
  explicit Blacklist(BlacklistOptions options = {}) : options_(std::move(options)) {
    HIVE_CHECK(options_.base_time().count() >= 0, "base_time must not be negative, got {}",
               options_.base_time().count());
    HIVE_CHECK(options_.backoff_rate() >= 1.0, "backoff_rate must be at least 1, got {}",
               options_.backoff_rate());
    // The cap keeps time_point arithmetic far from overflow.
    HIVE_CHECK(options_.max_ban_time().count() >= 0 && options_.max_ban_time().count() <= 1e9,
               "max_ban_time must be within [0, 1e9] seconds, got {}", options_.max_ban_time().count());
    HIVE_CHECK(options_.max_size() >= 1, "max_size must be at least 1");
  }

  /// The knobs this blacklist was built with.
  [[nodiscard]] const BlacklistOptions& options() const noexcept { return options_; }

  /// Records that `address` failed to respond at `now` and returns the length of the ban it
  /// started (zero when banning is disabled or a ban is already in force: requests in flight to
  /// a dead peer fail together, and that is one failure, not many).
  Seconds register_failure(std::string_view address, Deadline now = SteadyClock::now()) {
    if (options_.base_time().count() <= 0) return Seconds(0);
    auto it = entries_.find(address);
    if (it == entries_.end()) {
      order_.emplace_back(address);
      it = entries_.emplace(order_.back(), Entry{std::prev(order_.end()), 0, now}).first;
    } else if (it->second.banned_until > now) {
      return Seconds(0);
    } else {
      order_.splice(order_.end(), order_, it->second.position);
    }
    Entry& entry = it->second;
    ++entry.failures;
    const double seconds = std::min(
        options_.base_time().count() * std::pow(options_.backoff_rate(), static_cast<double>(entry.failures - 1)),
        options_.max_ban_time().count());
    const Seconds ban(seconds);
    entry.banned_until = now + std::chrono::duration_cast<SteadyClock::duration>(ban);
    while (entries_.size() > options_.max_size()) {
      entries_.erase(entries_.find(std::string_view(order_.front())));
      order_.pop_front();
    }
    return ban;
  }

  /// Whether `address` is banned at `now`.
  [[nodiscard]] bool is_banned(std::string_view address, Deadline now = SteadyClock::now()) const {
    auto it = entries_.find(address);
    return it != entries_.end() && it->second.banned_until > now;
  }

  /// Records that `address` answered: lifts its ban and forgets its failures.
  void register_success(std::string_view address) {
    if (auto it = entries_.find(address); it != entries_.end()) {
      const auto position = it->second.position;
      entries_.erase(it);
      order_.erase(position);
    }
  }

  /// Consecutive failures counted for `address` (zero if unknown).
  [[nodiscard]] std::uint32_t failures(std::string_view address) const {
    auto it = entries_.find(address);
    return it == entries_.end() ? 0 : it->second.failures;
  }

  /// When the current or last ban of `address` ends, if it has a failure history.
  [[nodiscard]] std::optional<Deadline> banned_until(std::string_view address) const {
    auto it = entries_.find(address);
    if (it == entries_.end()) return std::nullopt;
    return it->second.banned_until;
  }

  /// Number of addresses with a failure history.
  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }

  /// Forgets every address.
  void clear() noexcept {
    entries_.clear();
    order_.clear();
  }

 private:
  struct StringHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  struct Entry {
    std::list<std::string>::iterator position;
    std::uint32_t failures;
    Deadline banned_until;
  };

  BlacklistOptions options_;
  std::list<std::string> order_;  // addresses, least recently failed first
  // Keys view the strings owned by order_, whose nodes never move.
  std::unordered_map<std::string_view, Entry, StringHash, std::equal_to<>> entries_;
};

}  // namespace hive::dht
