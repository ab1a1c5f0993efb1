#pragma once
/// @file
/// Averaging groups: who takes part in a round, the DHT keys peers meet under, and how the
/// averaged vector is split into the members' parts and chunks.

#include <hive/core/error.hpp>
#include <hive/core/id.hpp>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace hive::averaging {

/// One member of an averaging group.
struct Member {
  /// Where the other members send this member's part; empty for a client-mode member.
  std::string address;
  /// True for a member that sends its tensors but averages no part (it cannot be called).
  bool client_mode = false;
  /// What the member attached to the round (see DecentralizedAverager::step).
  nlohmann::json gathered;
};

/// Writes a member as {"address", "client_mode", "gathered"}.
inline void to_json(nlohmann::json& j, const Member& m) {
  j = {{"address", m.address}, {"client_mode", m.client_mode}, {"gathered", m.gathered}};
}

/// Reads a member; throws nlohmann::json exceptions on a malformed one.
inline void from_json(const nlohmann::json& j, Member& m) {
  m.address = j.at("address").get<std::string>();
  m.client_mode = j.at("client_mode").get<bool>();
  m.gathered = j.contains("gathered") ? j["gathered"] : nlohmann::json();
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
};

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

/// The chunks of `range`, each at most `chunk` elements (one empty chunk for an empty range,
/// so that every reducer still hears from every sender).
[[nodiscard]] inline std::vector<Range> chunks_of(Range range, std::int64_t chunk) {
  HIVE_CHECK(chunk > 0, "chunk size must be positive, got {}", chunk);
  std::vector<Range> out;
  for (std::int64_t b = range.begin; b < range.end; b += chunk) out.push_back({b, std::min(range.end, b + chunk)});
  if (out.empty()) out.push_back({range.begin, range.begin});
  return out;
}

/// All tensors as one contiguous float32 vector (a copy).
[[nodiscard]] inline at::Tensor flatten_tensors(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  for (const auto& t : tensors) flat.push_back(t.detach().reshape({-1}).to(at::kFloat));
  if (flat.empty()) return at::empty({0}, at::kFloat);
  return at::cat(flat);
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
