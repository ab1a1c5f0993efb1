#pragma once
/// @file
/// Storage: the records a DHT peer holds (its share of the DHT, or its cache), with absolute
/// expiration times, dictionary values whose subkeys expire independently, and bounds on what
/// a remote peer can make it hold.
///
/// Over 400 lines because the fair-eviction bookkeeping (bytes charged per source, per record
/// and per dictionary) must change together with every insert, replace and purge.

#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/id.hpp>
#include <hive/core/options.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

namespace hive::dht {

/// An opaque value: MessagePack bytes, as `nlohmann::json::to_msgpack` produces them.
using Bytes = std::vector<std::uint8_t>;

/// A dictionary subkey: an integer or a string, nothing else (as in hivemind).
using Subkey = std::variant<std::int64_t, std::string>;

/// The subkey a JSON value stands for: integers that fit in int64 and strings; anything else
/// (floats, booleans, null, arrays, objects, binary, huge unsigned) is refused with nullopt.
inline std::optional<Subkey> subkey_from_json(const nlohmann::json& j) {
  if (j.is_string()) return Subkey(j.get<std::string>());
  if (j.is_number_unsigned()) {
    const auto u = j.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return std::nullopt;
    return Subkey(static_cast<std::int64_t>(u));
  }
  if (j.is_number_integer()) return Subkey(j.get<std::int64_t>());
  return std::nullopt;
}

/// The JSON form of a subkey (a number or a string), for the wire.
inline nlohmann::json subkey_to_json(const Subkey& subkey) {
  return std::visit([](const auto& v) { return nlohmann::json(v); }, subkey);
}

/// A value and the moment it expires (seconds since the epoch, the wall_time() base).
struct ValueWithExpiration {
  /// The stored bytes.
  Bytes value;
  /// Absolute expiration time; the value is valid while now < expiration.
  double expiration = 0;
  /// Field-wise equality.
  friend bool operator==(const ValueWithExpiration&, const ValueWithExpiration&) = default;
};

/// A dictionary value: subkey -> value with its own expiration.
using Dictionary = std::map<Subkey, ValueWithExpiration>;

/// What a key holds: a regular value, or a dictionary of unexpired subkeys.
struct Record {
  /// The regular value or the dictionary.
  std::variant<ValueWithExpiration, Dictionary> content;
  /// The record's expiration: the regular value's, or the latest of the dictionary's subkeys.
  double expiration = 0;

  /// Whether the record is a dictionary.
  [[nodiscard]] bool is_dictionary() const noexcept { return content.index() == 1; }
  /// The regular value; throws hive::InvalidArgument for a dictionary.
  [[nodiscard]] const ValueWithExpiration& regular() const {
    HIVE_CHECK(!is_dictionary(), "the record is a dictionary, not a regular value");
    return std::get<0>(content);
  }
  /// The dictionary; throws hive::InvalidArgument for a regular value.
  [[nodiscard]] const Dictionary& dictionary() const {
    HIVE_CHECK(is_dictionary(), "the record is a regular value, not a dictionary");
    return std::get<1>(content);
  }
  /// Field-wise equality.
  friend bool operator==(const Record&, const Record&) = default;
};

/// Why a store was accepted or refused; worth reporting to the peer that asked.
enum class StoreStatus {
  stored,            ///< accepted
  expired,           ///< the expiration is not after now (or is NaN)
  too_far_ahead,     ///< the expiration is beyond now + max_expiration_ahead
  not_newer,         ///< what is held expires as late or later (equal expirations lose)
  value_too_large,   ///< value plus subkey exceed max_value_bytes
  too_many_subkeys,  ///< the dictionary is full of subkeys that outlive the new one
  storage_full,      ///< no room: every record that could be evicted outlives the new one
  invalid,           ///< a record validator refused it (a missing or wrong owner signature, say)
};

/// A short name for a status, e.g. "not_newer".
inline std::string_view to_string(StoreStatus s) noexcept {
  switch (s) {
    case StoreStatus::stored: return "stored";
    case StoreStatus::expired: return "expired";
    case StoreStatus::too_far_ahead: return "too_far_ahead";
    case StoreStatus::not_newer: return "not_newer";
    case StoreStatus::value_too_large: return "value_too_large";
    case StoreStatus::too_many_subkeys: return "too_many_subkeys";
    case StoreStatus::storage_full: return "storage_full";
    case StoreStatus::invalid: return "invalid";
  }
  return "unknown";
}

/// Bounds on what a Storage holds, so a remote peer cannot make it grow without limit.
struct StorageOptions {
  /// Most keys held; when full, the record expiring soonest gives way to a later-expiring one.
  HIVE_ARG(std::uint64_t, max_keys, 100000);
  /// Largest accepted value, in bytes (for a subkey entry, value plus subkey).
  HIVE_ARG(std::uint64_t, max_value_bytes, 1u << 20);
  /// Most subkeys in one dictionary.
  HIVE_ARG(std::uint64_t, max_subkeys, 4096);
  /// Bytes of values and subkeys held in all; eviction follows the same soonest-first rule.
  HIVE_ARG(std::uint64_t, max_total_bytes, std::uint64_t{256} << 20);
  /// Latest accepted expiration, relative to now. Since only a strictly later expiration can
  /// replace a record, a far-future one would pin a key; a day is far beyond hivemind's uses
  /// (seconds to minutes) and leaves room for clock skew.
  HIVE_ARG(Seconds, max_expiration_ahead, Seconds(86400.0));
  /// Most keys one remote source (the AddressSource key of its address) may hold, whether
  /// the storage is full or not (0: no cap but the fair shares). A source at its cap stores a
  /// new key only by giving up its own record that expires soonest, when that expires before
  /// the new one; otherwise the store gets `storage_full`. Others are not affected.
  HIVE_ARG(std::uint64_t, max_keys_per_source, 25000);
  HIVE_OPTIONS_JSON(StorageOptions, max_keys, max_value_bytes, max_subkeys, max_total_bytes,
                    max_expiration_ahead, max_keys_per_source)
};

namespace detail {

/// A dictionary plus its subkeys ordered by expiration, for pruning and eviction, and the
/// source that wrote each subkey.
struct StoredDictionary {
  Dictionary items;
  std::set<std::pair<double, Subkey>> by_expiration;
  std::map<Subkey, std::string> writers;
};

/// A record as stored: content, overall expiration, the bytes it accounts for, and the source
/// it is charged to (the writer of a regular value, the creator of a dictionary).
struct StoredRecord {
  std::variant<ValueWithExpiration, StoredDictionary> content;
  double expiration = 0;
  std::size_t bytes = 0;
  std::string source;
};

/// What one source holds in a Storage.
struct SourceShare {
  std::size_t keys = 0;
  std::size_t bytes = 0;
  std::set<std::pair<double, Id160>> records;  // by expiration
};

/// Bytes a subkey accounts for.
inline std::size_t subkey_bytes(const Subkey& subkey) noexcept {
  if (const auto* s = std::get_if<std::string>(&subkey)) return s->size();
  return sizeof(std::int64_t);
}

}  // namespace detail

/// The records of one DHT peer, keyed by Id160 (the SHA-1 of the user's key); used both for
/// the peer's own storage and for its cache (hivemind's DHTLocalStorage).
///
/// A newer record wins: a store is accepted only if it expires strictly later than what the
/// key holds, so replicas converge whatever order stores arrive in. Every call that takes `now`
/// first drops what expired by then; an ordered index of expirations makes that cost
/// O(log n) per dropped record.
///
/// Stores name their `source` (the remote peer's AddressSource key; empty for this peer). A
/// source holds at most max_keys_per_source keys.
/// When the storage (or a dictionary) is full, a source that holds more than the newcomer's
/// source gives way first, soonest-expiring record first, whatever its expirations: one
/// source cannot pin the storage with far-future records and lock others out. Otherwise a
/// record that expires sooner than the new one gives way, unless its source holds less than
/// the newcomer's: a heavy source cannot push out a light one's short-lived records either.
///
/// @par Thread safety
/// None; the DHT protocol serializes access.
class Storage {
 public:
  /// An empty storage with the given bounds; throws hive::InvalidArgument for zero bounds.
  explicit Storage(StorageOptions options = {}) : options_(std::move(options)) {
    HIVE_CHECK(options_.max_keys() >= 1, "max_keys must be at least 1");
    HIVE_CHECK(options_.max_subkeys() >= 1, "max_subkeys must be at least 1");
    HIVE_CHECK(options_.max_expiration_ahead().count() > 0, "max_expiration_ahead must be positive, got {}",
               options_.max_expiration_ahead().count());
  }

  /// The bounds this storage was built with.
  [[nodiscard]] const StorageOptions& options() const noexcept { return options_; }

  /// Stores a regular value under `key` until `expiration`, replacing what the key holds (a
  /// regular value or a whole dictionary) if that expires strictly earlier.
  StoreStatus store(const Id160& key, Bytes value, double expiration, double now = wall_time(),
                    std::string_view source = {}) {
    purge(now);
    if (auto bad = check_new(value.size(), expiration, now)) return *bad;
    auto it = records_.find(key);
    if (it != records_.end() && !(expiration > it->second.expiration)) return StoreStatus::not_newer;
    const std::size_t held = it == records_.end() ? 0 : it->second.bytes;
    if (!make_room(key, it == records_.end() ? 1 : 0, positive_delta(value.size(), held), expiration, source))
      return StoreStatus::storage_full;
    if (records_.contains(key)) take(key);
    detail::StoredRecord record;
    record.bytes = value.size();
    record.expiration = expiration;
    record.source = std::string(source);
    record.content = ValueWithExpiration{std::move(value), expiration};
    put(key, std::move(record));
    return StoreStatus::stored;
  }

  /// Stores `value` as `subkey` of the dictionary under `key` until `expiration`.
  ///
  /// A regular value that expires as late or later wins; an earlier one is replaced by a new
  /// dictionary. Within a dictionary the subkey is stored only if it expires strictly later
  /// than that subkey's current entry; other subkeys are untouched.
  StoreStatus store_subkey(const Id160& key, Subkey subkey, Bytes value, double expiration,
                           double now = wall_time(), std::string_view source = {}) {
    purge(now);
    const std::size_t entry_bytes = value.size() + detail::subkey_bytes(subkey);
    if (auto bad = check_new(entry_bytes, expiration, now)) return *bad;
    auto it = records_.find(key);
    if (it == records_.end() || !std::holds_alternative<detail::StoredDictionary>(it->second.content)) {
      if (it != records_.end() && !(expiration > it->second.expiration)) return StoreStatus::not_newer;
      const std::size_t held = it == records_.end() ? 0 : it->second.bytes;
      if (!make_room(key, it == records_.end() ? 1 : 0, positive_delta(entry_bytes, held), expiration, source))
        return StoreStatus::storage_full;
      if (records_.contains(key)) take(key);
      detail::StoredRecord record;
      detail::StoredDictionary dict;
      dict.by_expiration.emplace(expiration, subkey);
      dict.writers.emplace(subkey, std::string(source));
      dict.items.emplace(std::move(subkey), ValueWithExpiration{std::move(value), expiration});
      record.content = std::move(dict);
      record.expiration = expiration;
      record.bytes = entry_bytes;
      record.source = std::string(source);
      put(key, std::move(record));
      return StoreStatus::stored;
    }

    auto& dict = std::get<detail::StoredDictionary>(it->second.content);
    std::size_t freed = 0;
    std::optional<Subkey> victim;
    if (auto held = dict.items.find(subkey); held != dict.items.end()) {
      if (!(expiration > held->second.expiration)) return StoreStatus::not_newer;
      freed = held->second.value.size() + detail::subkey_bytes(subkey);
    } else if (dict.items.size() >= options_.max_subkeys()) {
      victim = subkey_victim(dict, expiration, source);
      if (!victim) return StoreStatus::too_many_subkeys;
      freed = dict.items.at(*victim).value.size() + detail::subkey_bytes(*victim);
    }
    if (!make_room(key, 0, positive_delta(entry_bytes, freed), expiration, source)) return StoreStatus::storage_full;
    if (!records_.contains(key)) return StoreStatus::storage_full;  // defensive: make_room spares `key`

    detail::StoredRecord record = take(key);
    auto& d = std::get<detail::StoredDictionary>(record.content);
    if (victim) erase_subkey(record, *victim);
    erase_subkey(record, subkey);
    d.by_expiration.emplace(expiration, subkey);
    d.writers.insert_or_assign(subkey, std::string(source));
    d.items.emplace(std::move(subkey), ValueWithExpiration{std::move(value), expiration});
    record.bytes += entry_bytes;
    record.expiration = d.by_expiration.rbegin()->first;
    put(key, std::move(record));
    return StoreStatus::stored;
  }

  /// What `key` holds at `now`: nothing, a regular value, or a dictionary of its unexpired
  /// subkeys (a dictionary whose subkeys all expired is nothing).
  [[nodiscard]] std::optional<Record> get(const Id160& key, double now = wall_time()) {
    purge(now);
    auto it = records_.find(key);
    if (it == records_.end()) return std::nullopt;
    return to_record(it->second);
  }

  /// The value `key` holds (with `subkey`: that dictionary entry) at `now`, without copying;
  /// nullptr when there is none. Valid until the storage next changes.
  [[nodiscard]] const ValueWithExpiration* find(const Id160& key, const Subkey* subkey, double now = wall_time()) const {
    auto it = records_.find(key);
    if (it == records_.end()) return nullptr;
    const ValueWithExpiration* found = nullptr;
    if (const auto* dict = std::get_if<detail::StoredDictionary>(&it->second.content)) {
      if (!subkey) return nullptr;
      auto entry = dict->items.find(*subkey);
      if (entry != dict->items.end()) found = &entry->second;
    } else if (!subkey) {
      found = &std::get<ValueWithExpiration>(it->second.content);
    }
    return found && found->expiration > now ? found : nullptr;
  }

  /// Every unexpired (key, record) at `now`, in no particular order.
  [[nodiscard]] std::vector<std::pair<Id160, Record>> items(double now = wall_time()) {
    purge(now);
    std::vector<std::pair<Id160, Record>> out;
    out.reserve(records_.size());
    for (const auto& [key, record] : records_) out.emplace_back(key, to_record(record));
    return out;
  }

  /// The key whose record expires soonest after `now`, with that expiration (for cache
  /// refreshes); nullopt when empty.
  [[nodiscard]] std::optional<std::pair<Id160, double>> soonest(double now = wall_time()) {
    purge(now);
    if (by_expiration_.empty()) return std::nullopt;
    return std::pair{by_expiration_.begin()->second, by_expiration_.begin()->first};
  }

  /// The keys whose records expire before `deadline` (and after `now`), soonest first.
  [[nodiscard]] std::vector<std::pair<Id160, double>> expiring_before(double deadline, double now = wall_time()) {
    purge(now);
    std::vector<std::pair<Id160, double>> out;
    for (auto it = by_expiration_.begin(); it != by_expiration_.end() && it->first < deadline; ++it)
      out.emplace_back(it->second, it->first);
    return out;
  }

  /// Removes `key` whatever it holds; returns whether it held anything.
  bool erase(const Id160& key) {
    if (!records_.contains(key)) return false;
    take(key);
    return true;
  }

  /// Drops every record and subkey that expired by `now` (expiration <= now); returns how many
  /// keys disappeared.
  std::size_t purge(double now) {
    HIVE_CHECK(!std::isnan(now), "now must be a time, got NaN");
    std::size_t removed = 0;
    while (!by_expiration_.empty() && by_expiration_.begin()->first <= now) {
      take(by_expiration_.begin()->second);
      ++removed;
    }
    // Dictionaries left are alive (their latest subkey is), but some subkeys may be dead.
    while (!dict_pruning_.empty() && dict_pruning_.begin()->first <= now) {
      const Id160 key = dict_pruning_.begin()->second;
      detail::StoredRecord record = take(key);
      auto& d = std::get<detail::StoredDictionary>(record.content);
      while (!d.by_expiration.empty() && d.by_expiration.begin()->first <= now) {
        const Subkey dead = d.by_expiration.begin()->second;
        erase_subkey(record, dead);
      }
      put(key, std::move(record));
    }
    return removed;
  }

  /// Number of keys held (records that expired since the last call taking `now` included).
  [[nodiscard]] std::size_t size() const noexcept { return records_.size(); }
  /// Whether no key is held.
  [[nodiscard]] bool empty() const noexcept { return records_.empty(); }
  /// Bytes of values and subkeys held, as counted against max_total_bytes.
  [[nodiscard]] std::size_t total_bytes() const noexcept { return total_bytes_; }
  /// Keys charged to `source` (records it wrote, dictionaries it created).
  [[nodiscard]] std::size_t keys_of(std::string_view source) const {
    auto it = shares_.find(std::string(source));
    return it == shares_.end() ? 0 : it->second.keys;
  }

 private:
  static std::size_t positive_delta(std::size_t incoming, std::size_t outgoing) noexcept {
    return incoming > outgoing ? incoming - outgoing : 0;
  }

  std::optional<StoreStatus> check_new(std::size_t bytes, double expiration, double now) const {
    if (!(expiration > now)) return StoreStatus::expired;
    if (!(expiration <= now + options_.max_expiration_ahead().count())) return StoreStatus::too_far_ahead;
    if (bytes > options_.max_value_bytes()) return StoreStatus::value_too_large;
    return std::nullopt;
  }

  /// Makes room for `extra_keys` more keys and `extra_bytes` more bytes from `source`, never
  /// evicting `spare`. First a source holding more than `source` gives way, its soonest record
  /// first; then records that expire before `expiration`, soonest first, of sources holding at
  /// least as many keys as `source`. The second step evicts nothing if it cannot make enough
  /// room.
  bool make_room(const Id160& spare, std::size_t extra_keys, std::size_t extra_bytes, double expiration,
                 std::string_view source) {
    const auto over = [](std::size_t have, std::size_t add, std::uint64_t limit) -> std::size_t {
      return have + add > limit ? static_cast<std::size_t>(have + add - limit) : 0;
    };
    // A remote source at its cap pays with its own soonest-expiring record, or not at all.
    if (const auto cap = options_.max_keys_per_source(); !source.empty() && cap > 0 && extra_keys > 0) {
      const auto mine = shares_.find(std::string(source));
      if (mine != shares_.end() && over(mine->second.keys, extra_keys, cap) > 0) {
        std::optional<Id160> victim;
        for (const auto& [when, key] : mine->second.records)
          if (key != spare) {
            if (when < expiration) victim = key;
            break;
          }
        if (!victim) return false;
        take(*victim);
      }
    }
    for (;;) {
      const bool keys_short = over(records_.size(), extra_keys, options_.max_keys()) > 0;
      const bool bytes_short = over(total_bytes_, extra_bytes, options_.max_total_bytes()) > 0;
      if (!keys_short && !bytes_short) return true;
      const auto mine = shares_.find(std::string(source));
      const std::size_t my_keys = (mine == shares_.end() ? 0 : mine->second.keys) + extra_keys;
      const std::size_t my_bytes = (mine == shares_.end() ? 0 : mine->second.bytes) + extra_bytes;
      const detail::SourceShare* heaviest = nullptr;
      for (const auto& [name, share] : shares_) {
        if (name == source) continue;
        const bool heavier = keys_short ? share.keys > my_keys : share.bytes > my_bytes;
        if (heavier && (!heaviest || (keys_short ? share.keys > heaviest->keys : share.bytes > heaviest->bytes)))
          heaviest = &share;
      }
      if (!heaviest) break;
      const Id160* victim = nullptr;
      for (const auto& [when, key] : heaviest->records)
        if (key != spare) {
          victim = &key;
          break;
        }
      if (!victim) break;
      take(Id160(*victim));
    }
    const std::size_t need_keys = over(records_.size(), extra_keys, options_.max_keys());
    const std::size_t need_bytes = over(total_bytes_, extra_bytes, options_.max_total_bytes());
    if (need_keys == 0 && need_bytes == 0) return true;
    // Records of a source holding less than `source` never give way to it.
    const auto mine = shares_.find(std::string(source));
    const std::size_t my_keys = (mine == shares_.end() ? 0 : mine->second.keys) + extra_keys;
    std::vector<Id160> victims;
    std::size_t freed_keys = 0, freed_bytes = 0;
    for (const auto& [when, key] : by_expiration_) {
      if (freed_keys >= need_keys && freed_bytes >= need_bytes) break;
      if (!(when < expiration)) break;
      if (key == spare) continue;
      const auto& owner = records_.at(key).source;
      if (owner != source && shares_.at(owner).keys < my_keys) continue;
      victims.push_back(key);
      ++freed_keys;
      freed_bytes += records_.at(key).bytes;
    }
    if (freed_keys < need_keys || freed_bytes < need_bytes) return false;
    for (const auto& key : victims) take(key);
    return true;
  }

  /// The subkey that gives way in a full dictionary for a new one from `source` expiring at
  /// `expiration`: the soonest of a writer holding more subkeys than `source` would, else the
  /// soonest that expires before `expiration` and whose writer holds at least as many as
  /// `source` would; nullopt when none may give way.
  static std::optional<Subkey> subkey_victim(const detail::StoredDictionary& dict, double expiration,
                                             std::string_view source) {
    std::map<std::string_view, std::size_t> counts;
    for (const auto& [subkey, writer] : dict.writers) counts[writer]++;
    const std::size_t mine = counts[source] + 1;
    std::string_view heaviest;
    std::size_t most = 0;
    for (const auto& [writer, n] : counts)
      if (writer != source && n > mine && n > most) {
        heaviest = writer;
        most = n;
      }
    if (most > 0)
      for (const auto& [when, subkey] : dict.by_expiration)
        if (dict.writers.at(subkey) == heaviest) return subkey;
    for (const auto& [when, subkey] : dict.by_expiration) {
      if (!(when < expiration)) break;
      const auto& writer = dict.writers.at(subkey);
      if (writer == source || counts[writer] >= mine) return subkey;
    }
    return std::nullopt;
  }

  static void erase_subkey(detail::StoredRecord& record, const Subkey& subkey) {
    auto& d = std::get<detail::StoredDictionary>(record.content);
    auto it = d.items.find(subkey);
    if (it == d.items.end()) return;
    d.writers.erase(subkey);
    d.by_expiration.erase({it->second.expiration, subkey});
    record.bytes -= it->second.value.size() + detail::subkey_bytes(subkey);
    d.items.erase(it);
  }

  /// Inserts `record` under `key` (absent from the indexes) and indexes it; an empty dictionary
  /// is dropped instead.
  void put(const Id160& key, detail::StoredRecord record) {
    if (auto* d = std::get_if<detail::StoredDictionary>(&record.content)) {
      if (d->items.empty()) return;
      record.expiration = d->by_expiration.rbegin()->first;
      const double earliest = d->by_expiration.begin()->first;
      if (earliest < record.expiration) dict_pruning_.emplace(earliest, key);
    }
    by_expiration_.emplace(record.expiration, key);
    total_bytes_ += record.bytes;
    auto& share = shares_[record.source];
    share.keys++;
    share.bytes += record.bytes;
    share.records.emplace(record.expiration, key);
    records_.insert_or_assign(key, std::move(record));
  }

  /// Removes `key` (which must be held) from the map and the indexes and returns its record.
  detail::StoredRecord take(Id160 key) {
    auto it = records_.find(key);
    detail::StoredRecord record = std::move(it->second);
    records_.erase(it);
    by_expiration_.erase({record.expiration, key});
    if (auto* d = std::get_if<detail::StoredDictionary>(&record.content); d && !d->items.empty())
      dict_pruning_.erase({d->by_expiration.begin()->first, key});
    total_bytes_ -= record.bytes;
    if (auto share = shares_.find(record.source); share != shares_.end()) {
      share->second.records.erase({record.expiration, key});
      share->second.bytes -= record.bytes;
      if (--share->second.keys == 0) shares_.erase(share);
    }
    return record;
  }

  static Record to_record(const detail::StoredRecord& stored) {
    Record r;
    r.expiration = stored.expiration;
    if (const auto* v = std::get_if<ValueWithExpiration>(&stored.content)) r.content = *v;
    else r.content = std::get<detail::StoredDictionary>(stored.content).items;
    return r;
  }

  StorageOptions options_;
  std::unordered_map<Id160, detail::StoredRecord> records_;
  std::set<std::pair<double, Id160>> by_expiration_;  // every key by its record's expiration
  std::set<std::pair<double, Id160>> dict_pruning_;   // dictionaries by their earliest subkey, if
                                                      // it expires before the dictionary does
  std::unordered_map<std::string, detail::SourceShare> shares_;  // what each source is charged
  std::size_t total_bytes_ = 0;
};

}  // namespace hive::dht
