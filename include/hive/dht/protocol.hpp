#pragma once
/// @file
/// The DHT wire protocol (docs/protocol.md): its method names, the items a store carries, and
/// the codec between records and their JSON/MessagePack form, including how a find reply is
/// fitted into its byte budget and how records from several peers are merged. dht::Node
/// serves and calls these; nothing here touches the network.

#include <hive/core/error.hpp>
#include <hive/core/id.hpp>
#include <hive/dht/storage.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>
#include <vector>

namespace hive::dht {

/// Liveness check; the reply carries the responder's id and the host it saw the caller at.
inline constexpr std::string_view ping_method = "dht.ping";
/// Stores items on the responder (or in its cache).
inline constexpr std::string_view store_method = "dht.store";
/// The responder's nearest peers to each key, and its record of each key.
inline constexpr std::string_view find_method = "dht.find";

/// One item of a store: a key (already hashed), an optional subkey, a value, its expiration.
struct StoreItem {
  /// The key's id (Id160::of(user key)).
  Id160 key;
  /// Set for a dictionary entry.
  std::optional<Subkey> subkey;
  /// MessagePack bytes.
  Bytes value;
  /// Absolute expiration (wall_time() base).
  double expiration = 0;
};

namespace detail {

inline nlohmann::json id_to_json(const Id160& id) {
  return nlohmann::json::binary(std::vector<std::uint8_t>(id.bytes().begin(), id.bytes().end()));
}
inline Id160 id_from_json(const nlohmann::json& j) {
  if (!j.is_binary() || j.get_binary().size() != Id160::size) throw Error(errc::bad_header, "a DHT id must be 20 bytes");
  return Id160::from_bytes(j.get_binary());
}
inline nlohmann::json record_to_json(const Record& r) {
  if (!r.is_dictionary()) {
    const auto& v = r.regular();
    return {{"v", nlohmann::json::binary(v.value)}, {"e", v.expiration}};
  }
  nlohmann::json items = nlohmann::json::array();
  for (const auto& [subkey, v] : r.dictionary())
    items.push_back({subkey_to_json(subkey), nlohmann::json::binary(v.value), v.expiration});
  return {{"d", std::move(items)}};
}
inline double finite_number(const nlohmann::json& j) {
  if (!j.is_number()) throw Error(errc::bad_header, "an expiration must be a number");
  const double x = j.get<double>();
  if (!std::isfinite(x)) throw Error(errc::bad_header, "an expiration must be finite");
  return x;
}
inline Bytes bytes_from_json(const nlohmann::json& j) {
  if (!j.is_binary()) throw Error(errc::bad_header, "a DHT value must be binary MessagePack");
  return j.get_binary();
}
inline Record record_from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw Error(errc::bad_header, "a record must be a map");
  if (auto v = j.find("v"); v != j.end()) {
    Record r;
    r.content = ValueWithExpiration{bytes_from_json(*v), finite_number(j.at("e"))};
    r.expiration = std::get<0>(r.content).expiration;
    return r;
  }
  auto d = j.find("d");
  if (d == j.end() || !d->is_array()) throw Error(errc::bad_header, "a record holds \"v\" or \"d\"");
  Dictionary dict;
  double latest = -std::numeric_limits<double>::infinity();
  for (const auto& item : *d) {
    if (!item.is_array() || item.size() != 3) throw Error(errc::bad_header, "a dictionary item is [subkey, value, expiration]");
    auto subkey = subkey_from_json(item[0]);
    if (!subkey) throw Error(errc::bad_header, "a subkey must be an integer or a string");
    ValueWithExpiration v{bytes_from_json(item[1]), finite_number(item[2])};
    latest = std::max(latest, v.expiration);
    dict[*subkey] = std::move(v);
  }
  Record r;
  r.content = std::move(dict);
  r.expiration = latest;
  return r;
}

/// Bytes a value with its subkey takes in a reply, framing included (roughly).
inline std::size_t reply_bytes(const Bytes& value, const std::optional<Subkey>& subkey) {
  return value.size() + (subkey ? subkey_bytes(*subkey) : 0) + 16;
}

/// `record` cut to fit `budget` bytes (which it reduces): whole if it fits; a dictionary keeps
/// its latest-expiring subkeys that fit; nullopt when nothing fits. Sets `truncated` when
/// anything was left out.
inline std::optional<Record> fit_record(const Record& record, std::size_t& budget, bool& truncated) {
  if (!record.is_dictionary()) {
    const auto need = reply_bytes(record.regular().value, std::nullopt);
    if (need > budget) {
      truncated = true;
      return std::nullopt;
    }
    budget -= need;
    return record;
  }
  const auto& dict = record.dictionary();
  std::vector<const std::pair<const Subkey, ValueWithExpiration>*> order;
  order.reserve(dict.size());
  for (const auto& item : dict) order.push_back(&item);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->second.expiration > b->second.expiration; });
  Dictionary kept;
  for (const auto* item : order) {
    const auto need = reply_bytes(item->second.value, item->first);
    if (need > budget) {
      truncated = true;
      continue;
    }
    budget -= need;
    kept.emplace(item->first, item->second);
  }
  if (kept.empty()) return std::nullopt;
  Record out;
  for (const auto& [subkey, v] : kept) out.expiration = std::max(out.expiration, v.expiration);
  out.content = std::move(kept);
  return out;
}

/// Merges `incoming` into `best`: the later regular value, the union of dictionaries with the
/// later entry per subkey, and between a regular value and a dictionary the later record.
inline void merge_record(std::optional<Record>& best, const Record& incoming, double now) {
  if (incoming.expiration <= now) return;
  if (!best) {
    best = incoming;
    return;
  }
  if (best->is_dictionary() && incoming.is_dictionary()) {
    auto dict = best->dictionary();
    for (const auto& [subkey, v] : incoming.dictionary()) {
      auto it = dict.find(subkey);
      if (it == dict.end() || it->second.expiration < v.expiration) dict[subkey] = v;
    }
    best->content = std::move(dict);
    best->expiration = std::max(best->expiration, incoming.expiration);
  } else if (incoming.expiration > best->expiration) {
    best = incoming;
  }
}

}  // namespace detail

}  // namespace hive::dht
