#pragma once
/// @file
/// Expert records: where each expert is served, plus the prefix dictionaries that beam search
/// walks to find the best experts on a grid.

#include <hive/dht/dht.hpp>

#include <algorithm>
#include <charconv>
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

/// The records that announce `uids` at `address`: the uid itself → address, and for each
/// proper prefix ("expert.", "expert.3.") a dictionary entry (subkey = next coordinate) →
/// [uid, address], so that beam search can list the alive children of a prefix.
inline std::vector<StoreItem> expert_records(const std::vector<std::string>& uids, const std::string& address,
                                             double expiration) {
  std::vector<StoreItem> items;
  for (const auto& uid : uids) {
    auto [prefix, coords] = parse_uid(uid);
    items.push_back({Id160::of(uid), std::nullopt, nlohmann::json::to_msgpack(nlohmann::json(address)), expiration});
    std::string key = prefix + uid_delimiter;
    const auto entry = nlohmann::json::to_msgpack(nlohmann::json::array({uid, address}));
    for (std::size_t i = 0; i < coords.size(); ++i) {
      items.push_back({Id160::of(key), Subkey(coords[i]), entry, expiration});
      key += std::to_string(coords[i]) + uid_delimiter;
    }
  }
  return items;
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

/// Builds the records that announce `uids` at `address` until `expiration`; throws
/// hive::InvalidArgument for a malformed uid or an empty address.
inline ExpertDeclaration declare_experts_items(const std::vector<std::string>& uids, const std::string& address,
                                               double expiration) {
  HIVE_CHECK(!address.empty(), "declare_experts needs the address the experts are served at");
  ExpertDeclaration d;
  std::map<std::pair<Id160, std::optional<Subkey>>, std::size_t> index;
  d.records_of.resize(uids.size());
  for (std::size_t u = 0; u < uids.size(); ++u) {
    for (auto& record : expert_records({uids[u]}, address, expiration)) {
      auto [it, inserted] = index.try_emplace({record.key, record.subkey}, d.items.size());
      if (inserted) d.items.push_back(std::move(record));
      d.records_of[u].push_back(it->second);
    }
  }
  return d;
}

/// Announces that `address` serves `uids` until `expiration`. Returns, per uid, whether all of
/// its records were accepted by at least one replica.
template <net::Transport T, Routing R>
std::vector<bool> declare_experts(BasicDHT<T, R>& dht, const std::vector<std::string>& uids, const std::string& address,
                                  double expiration) {
  auto declaration = declare_experts_items(uids, address, expiration);
  auto node = dht.node();
  auto ok = asio::co_spawn(dht.executor(), node->store_many(declaration.items), asio::use_future).get();
  return declaration.per_uid(ok);
}

/// Resolves each uid to the address serving it, or nullopt when no alive record exists.
template <net::Transport T, Routing R>
std::vector<std::optional<std::string>> get_experts(BasicDHT<T, R>& dht, const std::vector<std::string>& uids) {
  for (const auto& uid : uids) parse_uid(uid);
  std::vector<std::future<std::optional<DHTRecord>>> pending;
  pending.reserve(uids.size());
  // The first unexpired record suffices: a server re-declares its experts long before they
  // expire, so any replica's copy names a live address.
  for (const auto& uid : uids) pending.push_back(dht.get_async(uid, /*latest=*/false));
  std::vector<std::optional<std::string>> out;
  for (auto& f : pending) {
    auto record = f.get();
    if (record && record->value && record->value->value.is_string())
      out.push_back(record->value->value.template get<std::string>());
    else
      out.push_back(std::nullopt);
  }
  return out;
}

}  // namespace hive::dht
