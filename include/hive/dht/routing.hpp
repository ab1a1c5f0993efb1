#pragma once
/// @file
/// The Kademlia routing table: k-buckets over the 160-bit id space, replacement lists, the
/// least-recently-seen ping-out rule, and exact nearest-neighbour queries by XOR distance.

#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/id.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hive::dht {

/// A peer the routing table knows: its id and the address ("host:port") it answers on.
struct NodeInfo {
  /// The peer's DHT id.
  Id160 id;
  /// Where the peer listens, "host:port".
  std::string address;
  /// Field-wise equality.
  friend bool operator==(const NodeInfo&, const NodeInfo&) = default;
};

namespace detail {

/// `id` with every bit from position `depth` on (counted from the most significant) cleared.
inline Id160 keep_prefix(const Id160& id, int depth) noexcept {
  auto b = id.bytes();
  for (int i = 0; i < static_cast<int>(Id160::size); ++i) {
    const int first_bit = 8 * i;
    if (first_bit >= depth) b[i] = 0;
    else if (first_bit + 8 > depth) b[i] &= static_cast<std::uint8_t>(0xFFu << (first_bit + 8 - depth));
  }
  return Id160(b);
}

/// `id` with every bit from position `depth` on set.
inline Id160 fill_suffix(const Id160& id, int depth) noexcept {
  auto b = id.bytes();
  for (int i = 0; i < static_cast<int>(Id160::size); ++i) {
    const int first_bit = 8 * i;
    if (first_bit >= depth) b[i] = 0xFF;
    else if (first_bit + 8 > depth) b[i] |= static_cast<std::uint8_t>(0xFFu >> (depth - first_bit));
  }
  return Id160(b);
}

/// `id` with bit `i` (0 = most significant) set.
inline Id160 set_bit(const Id160& id, int i) noexcept {
  auto b = id.bytes();
  b[i / 8] |= static_cast<std::uint8_t>(0x80u >> (i % 8));
  return Id160(b);
}

}  // namespace detail

/// One k-bucket: the ids sharing the first `depth()` bits of `lower()`, i.e. the range
/// [lower(), last()] of the id space, with up to `capacity()` live nodes and a bounded list of
/// replacements seen while the bucket was full.
///
/// The range is kept as prefix + depth rather than integer bounds because the exclusive upper
/// bound of the whole space, 2^160, does not fit in an Id160.
class KBucket {
 public:
  /// A node or replacement held by the bucket.
  struct Entry {
    /// The node's id.
    Id160 id;
    /// Its last known address.
    std::string address;
    /// The table handed this node out to be pinged and waits for mark_alive/remove/mark_stale.
    bool pinging = false;
    /// It failed to answer while no replacement was at hand; the next newcomer takes its slot.
    bool stale = false;
  };

  /// A bucket for the ids whose first `depth` bits equal those of `prefix`.
  KBucket(const Id160& prefix, int depth, std::size_t capacity, std::size_t max_replacements,
          Deadline now)
      : lower_(detail::keep_prefix(prefix, depth)),
        depth_(depth),
        capacity_(capacity),
        max_replacements_(max_replacements),
        last_updated_(now) {
    HIVE_CHECK(depth >= 0 && depth <= static_cast<int>(Id160::bits), "bucket depth {} is outside [0, 160]",
               depth);
  }

  /// The smallest id in the range (the prefix followed by zeros).
  [[nodiscard]] const Id160& lower() const noexcept { return lower_; }
  /// The largest id in the range (the prefix followed by ones); inclusive.
  [[nodiscard]] Id160 last() const noexcept { return detail::fill_suffix(lower_, depth_); }
  /// Number of leading bits shared by every id in the range.
  [[nodiscard]] int depth() const noexcept { return depth_; }
  /// Whether `id` falls in this bucket's range.
  [[nodiscard]] bool contains(const Id160& id) const noexcept {
    return detail::keep_prefix(id, depth_) == lower_;
  }
  /// Live nodes, least recently seen first.
  [[nodiscard]] const std::vector<Entry>& nodes() const noexcept { return nodes_; }
  /// Replacement candidates, least recently seen first.
  [[nodiscard]] const std::vector<Entry>& replacements() const noexcept { return replacements_; }
  /// Most live nodes the bucket holds (k).
  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  /// Whether the bucket holds k live nodes.
  [[nodiscard]] bool full() const noexcept { return nodes_.size() >= capacity_; }
  /// When a node in this range was last added or refreshed: buckets idle for long need a
  /// refresh lookup for a random id in their range.
  [[nodiscard]] Deadline last_updated() const noexcept { return last_updated_; }
  /// A uniformly random id inside the range, as the target of a bucket refresh.
  template <class Rng>
  [[nodiscard]] Id160 random_id(Rng& rng) const {
    const Id160 r = Id160::random(rng);
    return lower_ ^ (r ^ detail::keep_prefix(r, depth_));
  }

 private:
  friend class RoutingTable;

  static auto locate(std::vector<Entry>& v, const Id160& id) {
    return std::find_if(v.begin(), v.end(), [&](const Entry& e) { return e.id == id; });
  }

  Id160 lower_;
  int depth_;
  std::size_t capacity_;
  std::size_t max_replacements_;
  Deadline last_updated_;
  std::vector<Entry> nodes_;
  std::vector<Entry> replacements_;
};

/// The Kademlia routing table of one peer.
///
/// Buckets partition the id space. A full bucket splits when it contains the own id or when its
/// depth is not a multiple of `depth_modulo` (the relaxation of section 4.2 of the Kademlia
/// paper that hivemind uses); otherwise a newcomer waits in the bucket's replacement list and
/// the least-recently-seen live node is handed back to be pinged.
///
/// Every address belongs to at most one id across live nodes and replacements: a new id
/// announcing a known address takes it over (the peer restarted with a fresh id). Feed the
/// table only addresses that were verified by talking to them, never third-party claims.
///
/// @par Thread safety
/// None; the DHT protocol serializes access (one strand per peer).
class RoutingTable {
 public:
  /// A table for the peer `own_id` with buckets of `bucket_size` (k) nodes, the split relaxation
  /// `depth_modulo`, and replacement lists of `max_replacements` entries (default: k).
  explicit RoutingTable(const Id160& own_id, std::size_t bucket_size = 20, int depth_modulo = 5,
                        std::optional<std::size_t> max_replacements = std::nullopt,
                        Deadline now = SteadyClock::now())
      : own_id_(own_id), bucket_size_(bucket_size), depth_modulo_(depth_modulo) {
    HIVE_CHECK(bucket_size >= 1, "bucket_size must be at least 1, got {}", bucket_size);
    HIVE_CHECK(depth_modulo >= 1, "depth_modulo must be at least 1, got {}", depth_modulo);
    buckets_.emplace_back(Id160{}, 0, bucket_size, max_replacements.value_or(bucket_size), now);
  }

  /// This peer's id; never stored in the table.
  [[nodiscard]] const Id160& own_id() const noexcept { return own_id_; }
  /// The k of the k-buckets.
  [[nodiscard]] std::size_t bucket_size() const noexcept { return bucket_size_; }
  /// The split relaxation: full buckets at depths not divisible by it split anyway.
  [[nodiscard]] int depth_modulo() const noexcept { return depth_modulo_; }

  /// Records that `id` was seen at `address` (it answered us or sent us a request).
  ///
  /// A known node becomes the most recently seen and takes the new address; an unknown one is
  /// added when its bucket has room, possibly after splits. When its bucket is full and cannot
  /// split, a stale node gives way to it; failing that it becomes a replacement and the
  /// least-recently-seen node not already being pinged is returned: ping it, then call
  /// mark_alive() if it answers or remove() / mark_stale() if not. The own id is ignored.
  std::optional<NodeInfo> add_or_update(const Id160& id, std::string_view address,
                                        Deadline now = SteadyClock::now()) {
    HIVE_CHECK(!address.empty(), "node {} needs a non-empty address", id);
    if (id == own_id_) return std::nullopt;
    if (auto holder = by_address_.find(address); holder != by_address_.end() && holder->second != id) {
      const Id160 previous = holder->second;  // remove() erases the map entry holder points to
      remove(previous);
    }
    for (;;) {
      const std::size_t index = bucket_index(id);
      KBucket& bucket = buckets_[index];
      bucket.last_updated_ = now;
      if (auto it = KBucket::locate(bucket.nodes_, id); it != bucket.nodes_.end()) {
        KBucket::Entry entry = std::move(*it);
        bucket.nodes_.erase(it);
        readdress(entry, address);
        entry.pinging = entry.stale = false;
        bucket.nodes_.push_back(std::move(entry));
        return std::nullopt;
      }
      if (!bucket.full()) {
        if (auto it = KBucket::locate(bucket.replacements_, id); it != bucket.replacements_.end())
          bucket.replacements_.erase(it);
        bucket.nodes_.push_back({id, std::string(address)});
        by_address_[std::string(address)] = id;
        ++size_;
        return std::nullopt;
      }
      if (bucket.depth_ < static_cast<int>(Id160::bits) &&
          (bucket.contains(own_id_) || bucket.depth_ % depth_modulo_ != 0)) {
        split(index);
        continue;
      }
      if (auto stale = std::find_if(bucket.nodes_.begin(), bucket.nodes_.end(),
                                    [](const KBucket::Entry& e) { return e.stale; });
          stale != bucket.nodes_.end()) {
        unindex(*stale);
        bucket.nodes_.erase(stale);
        --size_;
        continue;  // now there is room
      }
      KBucket::Entry candidate{id, {}};
      if (auto it = KBucket::locate(bucket.replacements_, id); it != bucket.replacements_.end()) {
        candidate = std::move(*it);
        bucket.replacements_.erase(it);
      }
      readdress(candidate, address);
      bucket.replacements_.push_back(std::move(candidate));
      if (bucket.replacements_.size() > bucket.max_replacements_) {
        unindex(bucket.replacements_.front());
        bucket.replacements_.erase(bucket.replacements_.begin());
      }
      for (auto& entry : bucket.nodes_) {
        if (!entry.pinging) {
          entry.pinging = true;
          return NodeInfo{entry.id, entry.address};
        }
      }
      return std::nullopt;  // every node is already out for a ping
    }
  }

  /// Drops `id` (a live node or a replacement); a live node's slot goes to the most recently
  /// seen replacement. Returns whether the id was known.
  bool remove(const Id160& id) {
    KBucket& bucket = buckets_[bucket_index(id)];
    if (auto it = KBucket::locate(bucket.nodes_, id); it != bucket.nodes_.end()) {
      unindex(*it);
      bucket.nodes_.erase(it);
      --size_;
      if (!bucket.replacements_.empty()) {
        KBucket::Entry promoted = std::move(bucket.replacements_.back());
        bucket.replacements_.pop_back();
        promoted.pinging = promoted.stale = false;
        bucket.nodes_.push_back(std::move(promoted));
        ++size_;
      }
      return true;
    }
    if (auto it = KBucket::locate(bucket.replacements_, id); it != bucket.replacements_.end()) {
      unindex(*it);
      bucket.replacements_.erase(it);
      return true;
    }
    return false;
  }

  /// Records that `id` failed to answer. A replacement is dropped; a live node is replaced by
  /// the freshest replacement if there is one, and otherwise kept but flagged stale (a lone
  /// timeout should not empty a bucket; the next newcomer takes a stale node's slot). Returns
  /// whether the id left the table.
  bool mark_stale(const Id160& id) {
    KBucket& bucket = buckets_[bucket_index(id)];
    auto it = KBucket::locate(bucket.nodes_, id);
    if (it == bucket.nodes_.end() || !bucket.replacements_.empty()) return remove(id);
    it->stale = true;
    it->pinging = false;
    return false;
  }

  /// Records that `id` answered (e.g. the ping requested by add_or_update): clears its stale and
  /// pinging flags and makes it the most recently seen. Returns whether the id was known.
  bool mark_alive(const Id160& id, Deadline now = SteadyClock::now()) {
    KBucket& bucket = buckets_[bucket_index(id)];
    for (auto* list : {&bucket.nodes_, &bucket.replacements_}) {
      if (auto it = KBucket::locate(*list, id); it != list->end()) {
        KBucket::Entry entry = std::move(*it);
        list->erase(it);
        entry.pinging = entry.stale = false;
        list->push_back(std::move(entry));
        bucket.last_updated_ = now;
        return true;
      }
    }
    return false;
  }

  /// Up to `count` live nodes closest to `query` by XOR distance, closest first, leaving out
  /// `exclude`. Exact: the same as sorting every live node by distance.
  [[nodiscard]] std::vector<NodeInfo> nearest(const Id160& query, std::size_t count,
                                              std::optional<Id160> exclude = std::nullopt) const {
    // A bucket is a prefix subtree, and XOR with the query maps it onto another prefix subtree
    // of distances. These images are disjoint, so ordering buckets by their smallest distance
    // orders all their nodes: whole buckets can be taken in that order.
    std::vector<std::pair<Id160, const KBucket*>> order;
    order.reserve(buckets_.size());
    for (const auto& b : buckets_)
      if (!b.nodes_.empty()) order.emplace_back(detail::keep_prefix(query ^ b.lower_, b.depth_), &b);
    std::sort(order.begin(), order.end(),
              [](const auto& x, const auto& y) { return x.first < y.first; });
    std::vector<NodeInfo> result;
    std::vector<std::pair<Id160, const KBucket::Entry*>> local;
    for (const auto& [_, bucket] : order) {
      if (result.size() >= count) break;
      local.clear();
      for (const auto& e : bucket->nodes_)
        if (!exclude || e.id != *exclude) local.emplace_back(query ^ e.id, &e);
      const std::size_t take = std::min(count - result.size(), local.size());
      std::partial_sort(local.begin(), local.begin() + static_cast<std::ptrdiff_t>(take), local.end(),
                        [](const auto& x, const auto& y) { return x.first < y.first; });
      for (std::size_t i = 0; i < take; ++i) result.push_back({local[i].second->id, local[i].second->address});
    }
    return result;
  }

  /// The live node `id`, if the table holds it.
  [[nodiscard]] std::optional<NodeInfo> find(const Id160& id) const {
    const KBucket& bucket = buckets_[bucket_index(id)];
    for (const auto& e : bucket.nodes_)
      if (e.id == id) return NodeInfo{e.id, e.address};
    return std::nullopt;
  }
  /// Whether `id` is a live node of the table.
  [[nodiscard]] bool contains(const Id160& id) const { return find(id).has_value(); }
  /// The id of the live node at `address`, if any.
  [[nodiscard]] std::optional<Id160> id_of(std::string_view address) const {
    auto it = by_address_.find(address);
    if (it == by_address_.end() || !contains(it->second)) return std::nullopt;
    return it->second;
  }
  /// Number of live nodes (replacements not counted).
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  /// The buckets, ordered by their ranges (they partition the id space).
  [[nodiscard]] const std::vector<KBucket>& buckets() const noexcept { return buckets_; }
  /// The index in buckets() of the bucket whose range contains `id`.
  [[nodiscard]] std::size_t bucket_index(const Id160& id) const noexcept {
    auto it = std::upper_bound(buckets_.begin(), buckets_.end(), id,
                               [](const Id160& x, const KBucket& b) { return x < b.lower_; });
    return static_cast<std::size_t>(it - buckets_.begin()) - 1;
  }
  /// The bucket whose range contains `id`.
  [[nodiscard]] const KBucket& bucket_of(const Id160& id) const noexcept { return buckets_[bucket_index(id)]; }

 private:
  struct StringHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };

  void readdress(KBucket::Entry& entry, std::string_view address) {
    if (entry.address == address) return;
    unindex(entry);
    entry.address = std::string(address);
    by_address_[entry.address] = entry.id;
  }
  void unindex(const KBucket::Entry& entry) {
    if (auto it = by_address_.find(entry.address); it != by_address_.end() && it->second == entry.id)
      by_address_.erase(it);
  }

  void split(std::size_t index) {
    KBucket& parent = buckets_[index];
    const int depth = parent.depth_;
    KBucket left(parent.lower_, depth + 1, parent.capacity_, parent.max_replacements_, parent.last_updated_);
    KBucket right(detail::set_bit(parent.lower_, depth), depth + 1, parent.capacity_,
                  parent.max_replacements_, parent.last_updated_);
    for (auto& e : parent.nodes_) (e.id.bit(depth) ? right : left).nodes_.push_back(std::move(e));
    for (auto& e : parent.replacements_) {
      KBucket& child = e.id.bit(depth) ? right : left;
      if (child.full()) {
        child.replacements_.push_back(std::move(e));
      } else {
        e.pinging = e.stale = false;
        child.nodes_.push_back(std::move(e));
        ++size_;
      }
    }
    buckets_[index] = std::move(left);
    buckets_.insert(buckets_.begin() + static_cast<std::ptrdiff_t>(index) + 1, std::move(right));
  }

  Id160 own_id_;
  std::size_t bucket_size_;
  int depth_modulo_;
  std::vector<KBucket> buckets_;
  std::unordered_map<std::string, Id160, StringHash, std::equal_to<>> by_address_;
  std::size_t size_ = 0;
};

}  // namespace hive::dht
