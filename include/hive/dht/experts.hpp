#pragma once
/// @file
/// Expert records: where each expert is served, plus the prefix dictionaries that beam search
/// walks to find the best experts on a grid.
///
/// Over 400 lines: the record layout, the operations that write and read it (declare, get) and
/// the beam search over it change together.

#include <hive/dht/dht.hpp>

#include <algorithm>
#include <charconv>
#include <functional>
#include <future>
#include <mutex>
#include <span>
#include <optional>
#include <random>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace hive::dht {

/// Separates a uid's prefix from its grid coordinates: "expert.3.7".
inline constexpr char uid_delimiter = '.';

/// Parses an expert uid "prefix.c1.c2…" into its prefix and non-negative integer coordinates
/// (no leading zeros, at least one). Throws hive::InvalidArgument explaining what is wrong.
inline std::pair<std::string, std::vector<std::int64_t>> parse_uid(std::string_view uid) {
  const auto first = uid.find(uid_delimiter);
  HIVE_CHECK(first != std::string_view::npos && first > 0,
             "expert uid '{}' must look like prefix.c1[.c2...] with integer coordinates, e.g. expert.3.7", uid);
  std::string prefix(uid.substr(0, first));
  std::vector<std::int64_t> coords;
  std::size_t at = first + 1;
  for (;;) {
    const auto next = uid.find(uid_delimiter, at);
    const auto part = uid.substr(at, next == std::string_view::npos ? std::string_view::npos : next - at);
    std::int64_t value = -1;
    auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), value);
    HIVE_CHECK(!part.empty() && ec == std::errc{} && end == part.data() + part.size() && value >= 0 &&
                   (part.size() == 1 || part[0] != '0'),
               "expert uid '{}': coordinate '{}' must be a non-negative integer without leading zeros", uid, part);
    coords.push_back(value);
    if (next == std::string_view::npos) break;
    at = next + 1;
  }
  return {std::move(prefix), std::move(coords)};
}

/// Expands an expert-uid pattern: a prefix, then dot-separated coordinates, each an integer or
/// a half-open range "[a:b]" ("expert.[0:4].[0:3]" names 12 uids). With `count`, returns that
/// many distinct uids drawn at random (seeded by `seed`) in sorted order; without it, all of
/// them in order. Throws hive::InvalidArgument for a malformed pattern, an empty range, or a
/// count above the number of uids the pattern names.
inline std::vector<std::string> expand_uid_pattern(std::string_view pattern, std::optional<std::size_t> count = std::nullopt,
                                                   std::uint64_t seed = 0) {
  constexpr std::uint64_t max_uids = std::uint64_t{1} << 20;
  const auto first = pattern.find(uid_delimiter);
  HIVE_CHECK(first != std::string_view::npos && first > 0,
             "uid pattern '{}' must look like prefix.c1[.c2...], each c an integer or a range [a:b]", pattern);
  std::vector<std::pair<std::int64_t, std::int64_t>> ranges;  // [lo, hi)
  std::size_t at = first + 1;
  for (;;) {
    const auto next = pattern.find(uid_delimiter, at);
    const auto part = pattern.substr(at, next == std::string_view::npos ? std::string_view::npos : next - at);
    auto number = [&](std::string_view text) {
      std::int64_t value = -1;
      auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
      HIVE_CHECK(!text.empty() && ec == std::errc{} && end == text.data() + text.size() && value >= 0,
                 "uid pattern '{}': '{}' is not a non-negative integer", pattern, text);
      return value;
    };
    if (part.size() >= 2 && part.front() == '[' && part.back() == ']') {
      const auto colon = part.find(':');
      HIVE_CHECK(colon != std::string_view::npos, "uid pattern '{}': range '{}' must look like [a:b]", pattern, part);
      const auto lo = number(part.substr(1, colon - 1)), hi = number(part.substr(colon + 1, part.size() - colon - 2));
      HIVE_CHECK(lo < hi, "uid pattern '{}': range '{}' is empty", pattern, part);
      ranges.emplace_back(lo, hi);
    } else {
      const auto v = number(part);
      ranges.emplace_back(v, v + 1);
    }
    if (next == std::string_view::npos) break;
    at = next + 1;
  }
  std::uint64_t total = 1;
  for (auto [lo, hi] : ranges) {
    total *= static_cast<std::uint64_t>(hi - lo);
    HIVE_CHECK(total <= max_uids, "uid pattern '{}' names more than {} uids", pattern, max_uids);
  }
  const std::string prefix(pattern.substr(0, first));
  auto uid_at = [&](std::uint64_t index) {
    std::string uid = prefix;
    std::vector<std::int64_t> coords(ranges.size());
    for (std::size_t i = ranges.size(); i-- > 0;) {
      const auto size = static_cast<std::uint64_t>(ranges[i].second - ranges[i].first);
      coords[i] = ranges[i].first + static_cast<std::int64_t>(index % size);
      index /= size;
    }
    for (auto c : coords) uid += uid_delimiter + std::to_string(c);
    return uid;
  };
  std::vector<std::uint64_t> picked(total);
  for (std::uint64_t i = 0; i < total; ++i) picked[i] = i;
  if (count) {
    HIVE_CHECK(*count <= total, "uid pattern '{}' names {} uids, fewer than the {} asked for", pattern, total, *count);
    std::mt19937_64 rng(seed);
    for (std::size_t i = 0; i < *count; ++i)  // partial Fisher-Yates
      std::swap(picked[i], picked[i + std::uniform_int_distribution<std::uint64_t>(0, total - 1 - i)(rng)]);
    picked.resize(*count);
    std::sort(picked.begin(), picked.end());
  }
  std::vector<std::string> uids;
  uids.reserve(picked.size());
  for (auto i : picked) uids.push_back(uid_at(i));
  return uids;
}

/// The records that announce `uids` at `address`, each a dictionary entry whose subkey starts
/// with the declaring peer's `owner_marker` (Identity::owner_marker(); empty on a routing
/// model that signs nothing), so that only that peer can write or replace it: the uid → {marker:
/// address}, and for each proper prefix ("expert.", "expert.3.") → {marker + next coordinate:
/// [uid, address]}, so that beam search can list the alive children of a prefix. Peers that
/// declare the same uid each keep their own entry. The values still need signing
/// (sign_items).
inline std::vector<StoreItem> expert_records(const std::vector<std::string>& uids, const std::string& address,
                                             double expiration, std::string_view owner_marker = {}) {
  std::vector<StoreItem> items;
  for (const auto& uid : uids) {
    auto [prefix, coords] = parse_uid(uid);
    items.push_back({Id160::of(uid), Subkey(std::string(owner_marker)), nlohmann::json::to_msgpack(nlohmann::json(address)),
                     expiration});
    std::string key = prefix + uid_delimiter;
    const auto entry = nlohmann::json::to_msgpack(nlohmann::json::array({uid, address}));
    for (std::size_t i = 0; i < coords.size(); ++i) {
      items.push_back({Id160::of(key), Subkey(fmt::format("{}{}", owner_marker, coords[i])), entry, expiration});
      key += std::to_string(coords[i]) + uid_delimiter;
    }
  }
  return items;
}

/// Reads a coordinate written by expert_records from a prefix dictionary's `subkey`: the
/// declaring peer's id (empty when unsigned) and the coordinate; nullopt for anything else.
[[nodiscard]] inline std::optional<std::pair<std::string, std::int64_t>> expert_coordinate(const Subkey& subkey) {
  const auto* text = std::get_if<std::string>(&subkey);
  if (!text) return std::nullopt;
  auto owned = split_owned(*text);
  if (!owned) return std::nullopt;
  const auto& digits = owned->second;
  std::int64_t value = -1;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (digits.empty() || ec != std::errc{} || end != digits.data() + digits.size() || value < 0 ||
      (digits.size() > 1 && digits[0] == '0'))
    return std::nullopt;
  return std::pair{std::move(owned->first), value};
}

/// The store items of one declaration, deduplicated: experts that share a prefix write the
/// same (key, subkey) entry, which is stored once and counts for each of them.
struct ExpertDeclaration {
  /// What to store, one item per distinct (key, subkey).
  std::vector<StoreItem> items;
  /// For each uid, the indices in `items` of its records.
  std::vector<std::vector<std::size_t>> records_of;

  /// Per uid: whether all of its records were accepted, given per-item acceptance `ok`.
  [[nodiscard]] std::vector<bool> per_uid(const std::vector<bool>& ok) const {
    std::vector<bool> result(records_of.size(), true);
    for (std::size_t u = 0; u < records_of.size(); ++u)
      for (auto i : records_of[u]) result[u] = result[u] && ok.at(i);
    return result;
  }
};

/// Builds the records that announce `uids` at `address` until `expiration`, owned by the peer
/// whose marker is `owner_marker` (see expert_records; sign them with sign_items before
/// storing); throws hive::InvalidArgument for a malformed uid or an empty address.
inline ExpertDeclaration declare_experts_items(const std::vector<std::string>& uids, const std::string& address,
                                               double expiration, std::string_view owner_marker = {}) {
  HIVE_CHECK(!address.empty(), "declare_experts needs the address the experts are served at");
  ExpertDeclaration d;
  std::map<std::pair<Id160, std::optional<Subkey>>, std::size_t> index;
  d.records_of.resize(uids.size());
  for (std::size_t u = 0; u < uids.size(); ++u) {
    for (auto& record : expert_records({uids[u]}, address, expiration, owner_marker)) {
      auto [it, inserted] = index.try_emplace({record.key, record.subkey}, d.items.size());
      if (inserted) d.items.push_back(std::move(record));
      d.records_of[u].push_back(it->second);
    }
  }
  return d;
}

/// The owner marker `dht`'s expert records carry: its own, where its routing model signs
/// records, else none.
template <net::Transport T, Routing R>
[[nodiscard]] std::string expert_owner_marker(const BasicDHT<T, R>& dht) {
  return signs_records<typename BasicDHT<T, R>::node_type> ? dht.owner_marker() : std::string();
}

/// Announces that `address` serves `uids` until `expiration`, in records signed by this peer
/// (expert_records), so that nobody else can declare experts in its name. Completes `token`
/// (any Asio completion token for `void(std::exception_ptr, std::vector<bool>)`; a
/// std::future by default) with, per uid, whether all of its records were accepted by at
/// least one replica. Throws hive::InvalidArgument at once for a malformed uid or an empty
/// address.
template <net::Transport T, Routing R, class Token = asio::use_future_t<>>
auto async_declare_experts(BasicDHT<T, R>& dht, const std::vector<std::string>& uids, const std::string& address,
                           double expiration, Token&& token = {}) {
  auto declaration =
      std::make_shared<ExpertDeclaration>(declare_experts_items(uids, address, expiration, expert_owner_marker(dht)));
  sign_items(*dht.node(), declaration->items);
  return asio::co_spawn(
      dht.executor(),
      [node = dht.node(), declaration]() -> asio::awaitable<std::vector<bool>> {
        // Named locals, not temporaries, in the co_await: GCC 12 destroys such a temporary twice.
        auto op = node->store_many(declaration->items);
        auto ok = co_await std::move(op);
        co_return declaration->per_uid(ok);
      },
      std::forward<Token>(token));
}

/// Blocking async_declare_experts().
template <net::Transport T, Routing R>
std::vector<bool> declare_experts(BasicDHT<T, R>& dht, const std::vector<std::string>& uids, const std::string& address,
                                  double expiration) {
  return async_declare_experts(dht, uids, address, expiration, asio::use_future).get();
}

/// The address in a uid's record (expert_records) that expires last, among the entries signed
/// by their owner (or, with `signed_only` false, also unsigned ones); nullopt when there is
/// none.
[[nodiscard]] inline std::optional<std::string> expert_address(const DHTRecord& record, bool signed_only) {
  std::optional<std::string> best;
  double latest = -1;
  for (const auto& [subkey, v] : record.dictionary) {
    const auto* text = std::get_if<std::string>(&subkey);
    const auto owned = text ? split_owned(*text) : std::nullopt;
    if (!owned || !owned->second.empty() || (signed_only && owned->first.empty()) || !v.value.is_string()) continue;
    if (v.expiration > latest) {
      latest = v.expiration;
      best = v.value.get<std::string>();
    }
  }
  return best;
}

/// Resolves each uid to the address serving it (the latest-expiring signed declaration),
/// or nullopt when no alive record exists;
/// completes `token` for `void(std::exception_ptr, std::vector<std::optional<std::string>>)`
/// (a std::future by default). Throws hive::InvalidArgument at once for a malformed uid.
template <net::Transport T, Routing R, class Token = asio::use_future_t<>>
auto async_get_experts(BasicDHT<T, R>& dht, const std::vector<std::string>& uids, Token&& token = {}) {
  for (const auto& uid : uids) parse_uid(uid);
  using Addresses = std::vector<std::optional<std::string>>;
  // One batched get of every uid; the first unexpired record suffices: a server re-declares
  // its experts long before they expire, so any replica's copy names a live address.
  return asio::co_spawn(
      dht.executor(),
      [&dht, uids]() -> asio::awaitable<Addresses> {
        auto op = dht.async_get_many(uids, /*latest=*/false, asio::use_awaitable);
        auto records = co_await std::move(op);
        Addresses out(uids.size());
        for (std::size_t i = 0; i < uids.size() && i < records.size(); ++i)
          if (records[i]) out[i] = expert_address(*records[i], signs_records<typename BasicDHT<T, R>::node_type>);
        co_return out;
      },
      std::forward<Token>(token));
}

/// Blocking async_get_experts().
template <net::Transport T, Routing R>
std::vector<std::optional<std::string>> get_experts(BasicDHT<T, R>& dht, const std::vector<std::string>& uids) {
  return async_get_experts(dht, uids, asio::use_future).get();
}

/// An expert found by beam search: its uid, where it is served, its grid coordinates and its
/// score (the sum of the per-dimension scores of its coordinates).
struct FoundExpert {
  /// The expert's uid ("expert.3.1").
  std::string uid;
  /// The address serving it.
  std::string address;
  /// Its grid coordinates.
  std::vector<std::int64_t> coords;
  /// Sum over dimensions of the score of its coordinate.
  double score = 0;
};

/// Run-time knobs of ExpertDirectory.
struct ExpertDirectoryOptions {
  /// A prefix's children, once fetched, are reused for this long.
  HIVE_ARG(Seconds, cache_period, Seconds(5));
  /// A prefix found empty (no alive expert under it) is not looked up again for this long.
  HIVE_ARG(Seconds, negative_cache_period, Seconds(30));
  /// An expert reported as failed (report_failure) is left out of searches for this long.
  HIVE_ARG(Seconds, failure_ban_period, Seconds(30));
  HIVE_OPTIONS_JSON(ExpertDirectoryOptions, cache_period, negative_cache_period, failure_ban_period)
};

/// Finds the best alive experts of a grid by beam search over the DHT's prefix dictionaries
/// (see expert_records): for each sample, level by level, it keeps the `beam_size` best
/// prefixes that have alive experts under them, scoring a prefix by the sum of its
/// coordinates' scores, and returns the `k_best` best complete experts.
///
/// With every expert of the grid alive, the result is exactly the top k_best (scores add up
/// per dimension, so the best completion of every prefix is the same). With holes in the grid,
/// a wider beam trades lookups for exactness.
///
/// Lookups are shared by the samples of a batch (one DHT get per distinct prefix), reused
/// for cache_period, and empty prefixes are remembered for negative_cache_period.
///
/// @par Thread safety
/// find_best() may be called from several threads; it blocks on DHT lookups, so not from a
/// DHT io thread.
class ExpertDirectory {
 public:
  /// Looks keys up; returns one record (or nullopt) per key, in order.
  using Fetch = std::function<std::vector<std::optional<DHTRecord>>(const std::vector<std::string>& keys)>;

  /// A directory of grid `grid` under `uid_prefix` ("expert"), reading the DHT through `fetch`;
  /// with `signed_only`, it takes only entries signed by the peer that declared them (over()
  /// sets it for a DHT that signs records).
  ExpertDirectory(Fetch fetch, std::string uid_prefix, std::vector<std::int64_t> grid, ExpertDirectoryOptions options = {},
                  bool signed_only = true)
      : fetch_(std::move(fetch)),
        prefix_(std::move(uid_prefix)),
        grid_(std::move(grid)),
        options_(std::move(options)),
        signed_only_(signed_only) {
    HIVE_CHECK(fetch_, "an ExpertDirectory needs a fetch function");
    HIVE_CHECK(!prefix_.empty() && prefix_.find(uid_delimiter) == std::string::npos,
               "uid_prefix '{}' must be non-empty and contain no '{}'", prefix_, uid_delimiter);
    HIVE_CHECK(!grid_.empty(), "the grid needs at least one dimension");
    for (auto g : grid_) HIVE_CHECK(g > 0, "grid sizes must be positive, got {}", g);
  }

  /// A directory reading `dht` (which must outlive it).
  template <net::Transport T, Routing R>
  static std::shared_ptr<ExpertDirectory> over(BasicDHT<T, R>& dht, std::string uid_prefix, std::vector<std::int64_t> grid,
                                               ExpertDirectoryOptions options = {}) {
    auto fetch = [&dht](const std::vector<std::string>& keys) {
      // latest: ask every nearest replica and merge their dictionaries. Each server adds its
      // own subkeys, and a replica that joined late may hold only some of them.
      return dht.get_many(keys, /*latest=*/true);
    };
    return std::make_shared<ExpertDirectory>(std::move(fetch), std::move(uid_prefix), std::move(grid), std::move(options),
                                             signs_records<typename BasicDHT<T, R>::node_type>);
  }

  /// The grid.
  [[nodiscard]] const std::vector<std::int64_t>& grid() const noexcept { return grid_; }
  /// The uid prefix.
  [[nodiscard]] const std::string& uid_prefix() const noexcept { return prefix_; }
  /// DHT lookups made so far (cache misses).
  [[nodiscard]] std::size_t lookups() const {
    std::lock_guard lock(mutex_);
    return lookups_;
  }

  /// For each of `batch` samples, the (up to) `k_best` best alive experts, best first.
  /// `scores` holds batch rows of sum(grid) values: the scores of dimension 0's coordinates,
  /// then dimension 1's, and so on. `beam_size` 0 means k_best.
  std::vector<std::vector<FoundExpert>> find_best(std::span<const float> scores, std::size_t batch, std::size_t k_best,
                                                  std::size_t beam_size = 0) {
    std::size_t width = 0;
    for (auto g : grid_) width += static_cast<std::size_t>(g);
    HIVE_CHECK(scores.size() == batch * width, "find_best: {} scores for {} samples of {} each", scores.size(), batch, width);
    HIVE_CHECK(k_best >= 1, "k_best must be at least 1");
    if (beam_size == 0) beam_size = k_best;
    HIVE_CHECK(beam_size >= k_best, "beam_size {} must be at least k_best {}", beam_size, k_best);

    struct Beam {
      double score;
      std::vector<std::int64_t> coords;
      std::string uid, address;
    };
    std::vector<std::vector<Beam>> beams(batch, std::vector<Beam>{Beam{0.0, {}, {}, {}}});
    std::size_t offset = 0;
    for (std::size_t d = 0; d < grid_.size(); ++d) {
      std::vector<std::string> keys;
      for (const auto& sample : beams)
        for (const auto& beam : sample) keys.push_back(key_of(beam.coords));
      std::sort(keys.begin(), keys.end());
      keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
      auto children = children_of(keys, d);
      const bool last = d + 1 == grid_.size();
      const std::size_t keep = last ? k_best : beam_size;
      for (std::size_t b = 0; b < batch; ++b) {
        const float* row = scores.data() + b * width + offset;
        std::vector<Beam> next;
        for (const auto& beam : beams[b]) {
          const auto& kids = children.at(key_of(beam.coords));
          for (const auto& [c, entry] : kids) {
            if (last && is_banned(entry.first)) continue;
            Beam child{beam.score + static_cast<double>(row[c]), beam.coords, entry.first, entry.second};
            child.coords.push_back(c);
            next.push_back(std::move(child));
          }
        }
        const auto n = std::min(keep, next.size());
        std::partial_sort(next.begin(), next.begin() + static_cast<std::ptrdiff_t>(n), next.end(), [](const Beam& x, const Beam& y) {
          return x.score != y.score ? x.score > y.score : x.coords < y.coords;
        });
        next.resize(n);
        beams[b] = std::move(next);
      }
      offset += static_cast<std::size_t>(grid_[d]);
    }
    std::vector<std::vector<FoundExpert>> out(batch);
    for (std::size_t b = 0; b < batch; ++b)
      for (auto& beam : beams[b]) out[b].push_back({std::move(beam.uid), std::move(beam.address), std::move(beam.coords), beam.score});
    return out;
  }

  /// Forgets what is cached about the prefixes (the next search looks everything up again)
  /// and the failures reported.
  void clear_cache() {
    std::lock_guard lock(mutex_);
    cache_.clear();
    banned_.clear();
  }

  /// Leaves expert `uid` out of searches for failure_ban_period (it failed or timed out), so
  /// that a dead server's experts stop being chosen before their DHT records expire.
  void report_failure(const std::string& uid) {
    std::lock_guard lock(mutex_);
    banned_[uid] = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(options_.failure_ban_period());
  }
  /// True while `uid` is left out after a failure.
  [[nodiscard]] bool is_banned(const std::string& uid) const {
    std::lock_guard lock(mutex_);
    auto it = banned_.find(uid);
    return it != banned_.end() && it->second > SteadyClock::now();
  }

 private:
  /// coordinate → (uid, address) of an alive expert under prefix.coordinate.
  using Children = std::map<std::int64_t, std::pair<std::string, std::string>>;
  struct Cached {
    Children children;
    SteadyClock::time_point until;
  };

  [[nodiscard]] std::string key_of(const std::vector<std::int64_t>& coords) const {
    std::string key = prefix_ + uid_delimiter;
    for (auto c : coords) key += std::to_string(c) + uid_delimiter;
    return key;
  }

  // The children of each key (all of depth `d`), from the cache or one batch of lookups.
  std::map<std::string, Children> children_of(const std::vector<std::string>& keys, std::size_t d) {
    std::map<std::string, Children> out;
    std::vector<std::string> missing;
    const auto now = SteadyClock::now();
    {
      std::lock_guard lock(mutex_);
      for (const auto& key : keys) {
        auto it = cache_.find(key);
        if (it != cache_.end() && it->second.until > now) out[key] = it->second.children;
        else missing.push_back(key);
      }
      lookups_ += missing.size();
    }
    if (missing.empty()) return out;
    auto records = fetch_(missing);
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < missing.size(); ++i) {
      Children kids;
      if (i < records.size() && records[i] && records[i]->is_dictionary()) {
        // Several servers may declare the same coordinate, each in its own signed entry: the
        // one that expires last wins.
        std::map<std::int64_t, double> latest;
        for (const auto& [subkey, v] : records[i]->dictionary) {
          const auto c = expert_coordinate(subkey);
          if (!c || (signed_only_ && c->first.empty()) || c->second >= grid_[d]) continue;
          const auto& entry = v.value;
          if (!entry.is_array() || entry.size() != 2 || !entry[0].is_string() || !entry[1].is_string()) continue;
          if (auto it = latest.find(c->second); it != latest.end() && it->second >= v.expiration) continue;
          latest[c->second] = v.expiration;
          kids[c->second] = std::make_pair(entry[0].get<std::string>(), entry[1].get<std::string>());
        }
      }
      const auto ttl = kids.empty() ? options_.negative_cache_period() : options_.cache_period();
      cache_[missing[i]] = Cached{kids, now + std::chrono::duration_cast<SteadyClock::duration>(ttl)};
      out[missing[i]] = std::move(kids);
    }
    return out;
  }

  Fetch fetch_;
  std::string prefix_;
  std::vector<std::int64_t> grid_;
  ExpertDirectoryOptions options_;
  bool signed_only_ = true;
  mutable std::mutex mutex_;
  std::map<std::string, Cached> cache_;
  std::map<std::string, SteadyClock::time_point> banned_;
  std::size_t lookups_ = 0;
};

}  // namespace hive::dht
