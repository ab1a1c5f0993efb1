#pragma once
/// @file
/// Averaging groups: who takes part in a round, the DHT keys peers meet under, and how the
/// averaged vector is split into the members' parts and chunks.

#include <hive/core/error.hpp>
#include <hive/core/id.hpp>
#include <hive/core/identity.hpp>
#include <hive/core/message.hpp>
#include <hive/dht/storage.hpp>
#include <hive/dht/validation.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hive::averaging {

/// The name under which the averager of run `prefix` serves `method` ("avg.part:my_run"), so
/// that averagers of different runs share one DHT peer.
[[nodiscard]] inline std::string method_for(std::string_view method, std::string_view prefix) {
  return fmt::format("{}:{}", method, prefix);
}

/// One member of an averaging group.
struct Member {
  /// Where the other members send this member's part; empty for a client-mode member.
  std::string address;
  /// True for a member that sends its tensors but averages no part (it cannot be called).
  bool client_mode = false;
  /// True for an auxiliary member: it averages a part but sends no tensors of its own (it
  /// holds no model).
  bool auxiliary = false;
  /// The bandwidth it announced (any unit, the same for every member); its part's share is in
  /// proportion when every reducer announced one (> 0), else the parts are equal.
  double bandwidth = 0;
  /// What the member attached to the round (see DecentralizedAverager::step).
  nlohmann::json gathered;
  /// Its peer id (hive::Identity), as the connection it joined over proved it to the leader:
  /// a reducer takes this member's chunks only from a caller that proves this id. Empty where
  /// the id is not known (then chunks are taken from any caller).
  std::string peer;
};

/// The key a member is banned under (BanList): its peer id, or its address when the id is not
/// known.
[[nodiscard]] inline const std::string& ban_key(const Member& m) noexcept { return m.peer.empty() ? m.address : m.peer; }

/// Writes a member as {"address", "client_mode", "auxiliary", "bandwidth", "gathered", "peer"}.
inline void to_json(nlohmann::json& j, const Member& m) {
  j = {{"address", m.address},     {"client_mode", m.client_mode}, {"auxiliary", m.auxiliary},
       {"bandwidth", m.bandwidth}, {"gathered", m.gathered},       {"peer", m.peer}};
}

/// Reads a member; throws nlohmann::json exceptions on a malformed one (a bandwidth that is
/// not a finite number >= 0, an auxiliary member in client mode, a peer id that is not one).
inline void from_json(const nlohmann::json& j, Member& m) {
  m.address = j.at("address").get<std::string>();
  m.client_mode = j.at("client_mode").get<bool>();
  m.auxiliary = j.contains("auxiliary") ? j["auxiliary"].get<bool>() : false;
  m.bandwidth = j.contains("bandwidth") ? j["bandwidth"].get<double>() : 0.0;
  if (!std::isfinite(m.bandwidth) || m.bandwidth < 0)
    throw nlohmann::json::other_error::create(501, "a member's bandwidth must be a finite number >= 0", &j);
  if (m.auxiliary && m.client_mode)
    throw nlohmann::json::other_error::create(501, "a member cannot be both auxiliary and in client mode", &j);
  m.gathered = j.contains("gathered") ? j["gathered"] : nlohmann::json();
  m.peer = j.contains("peer") ? j["peer"].get<std::string>() : std::string();
  if (!m.peer.empty() && !public_key_of(m.peer))
    throw nlohmann::json::other_error::create(501, "a member's 'peer' must be a peer id (hive::Identity)", &j);
}

/// A group assembled by matchmaking: an id, the members (leader first), and this peer's place.
struct GroupInfo {
  /// Random id naming the round on the wire.
  std::string group_id;
  /// The members in the order the leader fixed; every member sees the same order.
  std::vector<Member> members;
  /// This peer's index in `members`.
  std::size_t my_index = 0;

  /// Number of members.
  [[nodiscard]] std::size_t size() const noexcept { return members.size(); }
  /// Indices of the members that average a part (all but client-mode members), in order.
  [[nodiscard]] std::vector<std::size_t> reducers() const {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < members.size(); ++i)
      if (!members[i].client_mode) out.push_back(i);
    return out;
  }
  /// Number of members that send their tensors (all but auxiliary members).
  [[nodiscard]] std::size_t senders() const {
    std::size_t n = 0;
    for (const auto& m : members) n += m.auxiliary ? 0 : 1;
    return n;
  }
};

/// An avg.join request as the leader reads it (DecentralizedAverager's matchmaking).
struct JoinRequest {
  /// The group key the requester looks for a group under.
  std::string key;
  /// Its schema: the tensors' shapes, and the round tag if any.
  std::string schema;
  /// The compression it averages with, as sent ("none" when absent).
  nlohmann::json compression = "none";
  /// The requester, then the followers it brings along.
  std::vector<Member> block;
};

/// Decodes an avg.join request header from the caller whose connection proved peer id
/// `caller` (net::CallContext::peer): the requester's Member::peer is that id, whatever the
/// header says; its followers' ids are the ones it vouches for. Throws
/// hive::Error(errc::bad_header) when 'key', 'schema', 'address' (strings) or 'client_mode'
/// (bool) is missing, when a member is malformed (see from_json(Member)), when a member that
/// averages a part has no address, or when two members name the same peer id.
[[nodiscard]] inline JoinRequest decode_join_request(const nlohmann::json& h, std::string caller = {}) {
  if (!h.is_object() || !h.contains("key") || !h["key"].is_string() || !h.contains("schema") ||
      !h["schema"].is_string() || !h.contains("client_mode") || !h["client_mode"].is_boolean() ||
      !h.contains("address") || !h["address"].is_string())
    throw Error(errc::bad_header, "avg.join needs 'key', 'schema', 'address' (strings) and 'client_mode' (bool)");
  JoinRequest r;
  r.key = h["key"].get<std::string>();
  r.schema = h["schema"].get<std::string>();
  r.compression = h.value("compression", nlohmann::json("none"));
  r.block.resize(1);
  auto& requester = r.block[0];
  requester.address = h["address"].get<std::string>();
  requester.client_mode = h["client_mode"].get<bool>();
  requester.gathered = h.value("gathered", nlohmann::json());
  requester.peer = std::move(caller);
  try {
    requester.auxiliary = h.value("auxiliary", false);
    requester.bandwidth = h.value("bandwidth", 0.0);
  } catch (const nlohmann::json::exception& e) {
    throw Error(errc::bad_header, fmt::format("avg.join: bad 'auxiliary' or 'bandwidth': {}", e.what()));
  }
  if (!std::isfinite(requester.bandwidth) || requester.bandwidth < 0 || (requester.auxiliary && requester.client_mode))
    throw Error(errc::bad_header,
                "avg.join: 'bandwidth' must be a finite number >= 0, and a client-mode member cannot be auxiliary");
  if (h.contains("followers")) {
    try {
      for (auto& f : h["followers"].get<std::vector<Member>>()) r.block.push_back(std::move(f));
    } catch (const nlohmann::json::exception& e) {
      throw Error(errc::bad_header, fmt::format("avg.join: bad 'followers': {}", e.what()));
    }
  }
  for (std::size_t i = 0; i < r.block.size(); ++i) {
    const auto& member = r.block[i];
    if (!member.client_mode && member.address.empty())
      throw Error(errc::bad_header, "avg.join: a member that averages a part needs an address");
    for (std::size_t j = 0; j < i && !member.peer.empty(); ++j)
      if (r.block[j].peer == member.peer)
        throw Error(errc::bad_header, fmt::format("avg.join: peer {} appears twice among the members", member.peer));
  }
  return r;
}

/// A leader's answer to avg.join, as the requester reads it.
struct JoinAnswer {
  /// The group, when the leader took the requester in (its index is `my_index`).
  std::optional<GroupInfo> group;
  /// For a refusal: true when asking this leader again this step is pointless.
  bool final = true;
  /// For a refusal: the leader's reason.
  std::string reason;
};

/// Decodes a leader's avg.join reply to the peer at `address` (in client mode or not) that
/// brought `brought` followers along, who take the places after it; with `peer` (this peer's
/// id), its place must carry that id. Throws hive::Error(errc::bad_header) for a malformed
/// reply, or a group that does not hold the peer and its followers where it says.
[[nodiscard]] inline JoinAnswer decode_join_reply(const nlohmann::json& h, std::string_view address, bool client_mode,
                                                  std::size_t brought, std::string_view peer = {}) {
  if (!h.is_object() || !h.contains("accepted") || !h["accepted"].is_boolean())
    throw Error(errc::bad_header, "avg.join reply lacks 'accepted'");
  JoinAnswer out;
  try {
    if (!h["accepted"].get<bool>()) {
      out.final = h.value("final", true);
      out.reason = h.value("reason", std::string("rejected"));
      return out;
    }
    GroupInfo g;
    g.group_id = h.at("group_id").get<std::string>();
    g.members = h.at("members").get<std::vector<Member>>();
    g.my_index = integer_field<std::size_t>(h, "index", "avg.join reply");
    out.group = std::move(g);
  } catch (const nlohmann::json::exception& e) {
    throw Error(errc::bad_header, fmt::format("bad avg.join reply: {}", e.what()));
  }
  const auto& g = *out.group;
  if (g.members.size() < 2 || g.my_index >= g.members.size() || brought >= g.members.size() - g.my_index ||
      g.members[g.my_index].address != address || g.members[g.my_index].client_mode != client_mode ||
      (!peer.empty() && g.members[g.my_index].peer != peer))
    throw Error(errc::bad_header, "avg.join reply names a group this peer is not in");
  return out;
}

/// A peer's matchmaking announcement, one entry of the group key's DHT dictionary: the subkey
/// is its owner marker and address ("[owner:<peer id>]host:port", announcement_subkey), so
/// that only the peer itself can write it (dht::SignatureValidator), or the bare address on a
/// routing model that signs nothing; the value is {"deadline": number, "schema": string} while
/// it looks for a group (hive overwrites it with {"looking": false}, which names no peer to
/// ask, when it stops).
struct Announcement {
  /// Where the peer takes join requests.
  std::string address;
  /// The peer id that signed it; empty for an unsigned announcement.
  std::string peer;
  /// Its matchmaking deadline (wall-clock seconds, its own clock).
  double deadline = 0;
  /// Its schema (empty when absent).
  std::string schema;
  /// False once it stopped looking.
  bool looking = true;
};

/// The subkey a peer announces itself under: `owner_marker` (Identity::owner_marker(), or
/// empty on a routing model that signs nothing) followed by its address.
[[nodiscard]] inline std::string announcement_subkey(std::string_view owner_marker, std::string_view address) {
  return fmt::format("{}{}", owner_marker, address);
}

/// Reads one entry of a group key's dictionary; nullopt when it is not a well-formed
/// announcement (a subkey that is not a string of the announcement_subkey form, no finite
/// 'deadline', a 'schema' that is not a string or a 'looking' that is not a bool). The caller
/// decides whether unsigned ones (Announcement::peer empty) count. Never throws for a
/// malformed value.
[[nodiscard]] inline std::optional<Announcement> decode_announcement(const dht::Subkey& subkey,
                                                                    const nlohmann::json& value) {
  const auto* text = std::get_if<std::string>(&subkey);
  if (!text || !value.is_object()) return std::nullopt;
  const auto owned = dht::split_owned(*text);
  if (!owned || owned->second.empty()) return std::nullopt;
  auto deadline = value.find("deadline");
  auto schema = value.find("schema");
  auto looking = value.find("looking");
  if (deadline == value.end() || !deadline->is_number() || (schema != value.end() && !schema->is_string()) ||
      (looking != value.end() && !looking->is_boolean()))
    return std::nullopt;
  Announcement a{owned->second, owned->first, deadline->get<double>(),
                 schema == value.end() ? std::string() : schema->get<std::string>(), looking == value.end() || looking->get<bool>()};
  // A NaN would break the ordering that candidates are sorted by.
  if (!std::isfinite(a.deadline)) return std::nullopt;
  return a;
}

/// An element range [begin, end) of the flattened vector.
struct Range {
  /// First element.
  std::int64_t begin = 0;
  /// One past the last element.
  std::int64_t end = 0;
  /// Number of elements.
  [[nodiscard]] std::int64_t size() const noexcept { return end - begin; }
};

/// Splits `total` elements into `parts` contiguous ranges whose sizes differ by at most one.
[[nodiscard]] inline std::vector<Range> split_evenly(std::int64_t total, std::size_t parts) {
  HIVE_CHECK(parts > 0, "cannot split a vector into 0 parts");
  std::vector<Range> out(parts);
  const auto n = static_cast<std::int64_t>(parts);
  std::int64_t begin = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t size = total / n + (i < total % n ? 1 : 0);
    out[static_cast<std::size_t>(i)] = {begin, begin + size};
    begin += size;
  }
  return out;
}

/// Splits `total` elements into contiguous ranges in proportion to `shares` (every member
/// derives the same ranges from the same shares): each range gets the floor of its exact
/// share, and the elements left over go one each to the largest remainders (ties to the
/// earlier range). Equal parts (split_evenly) when any share is not a finite number > 0.
[[nodiscard]] inline std::vector<Range> split_in_proportion(std::int64_t total, const std::vector<double>& shares) {
  HIVE_CHECK(!shares.empty(), "cannot split a vector into 0 parts");
  double sum = 0;
  for (double s : shares) {
    if (!std::isfinite(s) || s <= 0) return split_evenly(total, shares.size());
    sum += s;
  }
  std::vector<std::int64_t> sizes(shares.size());
  std::vector<std::pair<double, std::size_t>> remainders;
  std::int64_t given = 0;
  for (std::size_t i = 0; i < shares.size(); ++i) {
    const long double exact = static_cast<long double>(total) * shares[i] / sum;
    sizes[i] = std::min<std::int64_t>(total, static_cast<std::int64_t>(std::floor(exact)));
    given += sizes[i];
    remainders.emplace_back(-static_cast<double>(exact - static_cast<long double>(sizes[i])), i);
  }
  std::sort(remainders.begin(), remainders.end());
  for (std::size_t k = 0; given < total; k = (k + 1) % remainders.size(), ++given) ++sizes[remainders[k].second];
  std::vector<Range> out(shares.size());
  std::int64_t begin = 0;
  for (std::size_t i = 0; i < shares.size(); ++i) {
    out[i] = {begin, begin + sizes[i]};
    begin += sizes[i];
  }
  return out;
}

/// The parts of a group's vector of `total` elements, one per reducer (GroupInfo::reducers()),
/// in proportion to the reducers' announced bandwidths (split_in_proportion).
[[nodiscard]] inline std::vector<Range> partition(const GroupInfo& group, std::int64_t total) {
  std::vector<double> shares;
  for (auto r : group.reducers()) shares.push_back(group.members[r].bandwidth);
  HIVE_CHECK(!shares.empty(), "a group of client-mode peers only cannot average");
  return split_in_proportion(total, shares);
}

/// The chunks of `range`, each at most `chunk` elements (one empty chunk for an empty range,
/// so that every reducer still hears from every sender).
[[nodiscard]] inline std::vector<Range> chunks_of(Range range, std::int64_t chunk) {
  HIVE_CHECK(chunk > 0, "chunk size must be positive, got {}", chunk);
  std::vector<Range> out;
  for (std::int64_t b = range.begin; b < range.end; b += chunk) out.push_back({b, std::min(range.end, b + chunk)});
  if (out.empty()) out.push_back({range.begin, range.begin});
  return out;
}

/// A float32 vector handed out round after round, so that a round's large vectors reuse memory
/// that is already mapped: glibc maps every allocation above 32 MiB afresh and unmaps it when it
/// is freed, and faulting 64 MiB of fresh pages in costs tens of milliseconds of every round.
/// Thread-safe.
class ReusedVector {
 public:
  /// A vector of `numel` float32 elements (contents unspecified): the kept one when it has that
  /// size and nothing else refers to it any more (no tensor, view or buffer of the last round
  /// that handed it out), else a new one, kept from now on.
  [[nodiscard]] at::Tensor take(std::int64_t numel) {
    std::lock_guard lock(mutex_);
    if (!kept_.defined() || kept_.numel() != numel || kept_.use_count() != 1 || kept_.storage().use_count() != 1)
      kept_ = at::empty({numel}, at::kFloat);
    return kept_;
  }

 private:
  std::mutex mutex_;
  at::Tensor kept_;
};

/// All tensors as one contiguous float32 vector (a copy), written into `into`'s vector when
/// given one (ReusedVector::take).
[[nodiscard]] inline at::Tensor flatten_tensors(const std::vector<at::Tensor>& tensors, ReusedVector* into = nullptr) {
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  std::int64_t total = 0;
  for (const auto& t : tensors) {
    flat.push_back(t.detach().reshape({-1}).to(at::kFloat));
    total += flat.back().numel();
  }
  if (flat.empty()) return at::empty({0}, at::kFloat);
  if (!into) return at::cat(flat);
  auto out = into->take(total);
  at::cat_out(out, flat);
  return out;
}

/// Writes `flat` (as from flatten_tensors) back into `tensors`, in place, casting to each
/// tensor's dtype. Throws hive::InvalidArgument when the sizes disagree (nothing is written).
inline void unflatten_into(const at::Tensor& flat, const std::vector<at::Tensor>& tensors) {
  std::int64_t total = 0;
  for (const auto& t : tensors) total += t.numel();
  HIVE_CHECK(flat.dim() == 1 && flat.numel() == total, "averaged vector has {} elements, the tensors {}", flat.numel(),
             total);
  std::int64_t at = 0;
  for (const auto& t : tensors) {
    const auto n = t.numel();
    auto target = t.detach();
    target.copy_(flat.slice(0, at, at + n).view(target.sizes()));
    at += n;
  }
}

/// A fingerprint of the tensors' dtypes and shapes: peers only average with peers whose
/// fingerprint is equal.
[[nodiscard]] inline std::string schema_hash(const std::vector<at::Tensor>& tensors) {
  std::string s;
  for (const auto& t : tensors) {
    s += std::string(c10::toString(t.scalar_type()));
    s += '[';
    for (auto d : t.sizes()) s += std::to_string(d) + ',';
    s += ']';
  }
  return Id160::of(s).hex().substr(0, 16);
}

/// The DHT keys of a run's matchmaking: `prefix.0b<group bits>`. After a round, a peer's group
/// bits take the binary digits of its index in the group (hivemind's rule), so that the next
/// round mixes peers from different groups.
class GroupKeys {
 public:
  /// Keys under `prefix` with initial group bits `bits` (a string of '0' and '1', may be empty).
  GroupKeys(std::string prefix, std::string bits) : prefix_(std::move(prefix)), bits_(std::move(bits)) {
    HIVE_CHECK(!prefix_.empty(), "an averaging prefix must not be empty");
    for (char c : prefix_) HIVE_CHECK(c > ' ' && c != 127, "averaging prefix '{}' has a space or control character", prefix_);
    for (char c : bits_) HIVE_CHECK(c == '0' || c == '1', "group bits must be 0s and 1s, got '{}'", bits_);
  }
  /// The key peers of this run meet under now.
  [[nodiscard]] std::string group_key() const { return prefix_ + ".0b" + bits_; }
  /// The key where peers that share their state announce themselves.
  [[nodiscard]] std::string state_key() const { return prefix_ + ".all_averagers"; }
  /// The run's prefix.
  [[nodiscard]] const std::string& prefix() const noexcept { return prefix_; }
  /// The current group bits.
  [[nodiscard]] const std::string& bits() const noexcept { return bits_; }
  /// Shifts in the digits of `index` in a group of `size` (keeps the bits' length).
  void update(std::size_t index, std::size_t size) {
    if (bits_.empty() || size < 2) return;
    const auto nbits = static_cast<std::size_t>(std::ceil(std::log2(static_cast<double>(size))));
    std::string digits;
    for (std::size_t b = nbits; b-- > 0;) digits += ((index >> b) & 1) ? '1' : '0';
    const auto joined = bits_ + digits;
    bits_ = joined.substr(joined.size() - bits_.size());
  }

 private:
  std::string prefix_;
  std::string bits_;
};

}  // namespace hive::averaging
