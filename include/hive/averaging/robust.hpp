#pragma once
/// @file
/// Byzantine-robust aggregation of the chunks a butterfly reducer receives (CenteredClip, a
/// coordinate-wise trimmed mean), and the list of peers banned for sending parts that failed
/// validation.

#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/options.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hive::averaging {

/// How a reducer combines the chunks its group's members sent for one chunk of its part.
enum class Aggregation {
  mean,           ///< the weighted mean Σ wᵢ·xᵢ / Σ wᵢ (the default; not robust)
  centered_clip,  ///< CenteredClip (BTARD, Gorbunov et al., ICML 2022): a mean that bounds each member's pull
  trimmed_mean,   ///< per coordinate, drop the `trim` largest and smallest values, weighted mean of the rest
};

/// Where CenteredClip's iteration starts.
enum class ClipStart {
  median,  ///< the coordinate-wise median of the members' chunks (the lower one for an even count)
  mean,    ///< the weighted mean
};

/// The names used in JSON and logs: "mean", "centered_clip", "trimmed_mean".
[[nodiscard]] constexpr std::string_view to_string(Aggregation a) noexcept {
  switch (a) {
    case Aggregation::mean: return "mean";
    case Aggregation::centered_clip: return "centered_clip";
    case Aggregation::trimmed_mean: return "trimmed_mean";
  }
  return "unknown";
}

/// The names used in JSON: "median", "mean".
[[nodiscard]] constexpr std::string_view to_string(ClipStart s) noexcept {
  return s == ClipStart::median ? "median" : "mean";
}

/// Writes an aggregation by name.
inline void to_json(nlohmann::json& j, Aggregation a) { j = to_string(a); }
/// Reads an aggregation by name; throws hive::InvalidArgument for another value.
inline void from_json(const nlohmann::json& j, Aggregation& a) {
  for (auto c : {Aggregation::mean, Aggregation::centered_clip, Aggregation::trimmed_mean})
    if (j.is_string() && j.get_ref<const std::string&>() == to_string(c)) {
      a = c;
      return;
    }
  throw InvalidArgument(fmt::format("unknown aggregation {} (known: mean, centered_clip, trimmed_mean)",
                                    j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
}
/// Writes a clip start by name.
inline void to_json(nlohmann::json& j, ClipStart s) { j = to_string(s); }
/// Reads a clip start by name; throws hive::InvalidArgument for another value.
inline void from_json(const nlohmann::json& j, ClipStart& s) {
  for (auto c : {ClipStart::median, ClipStart::mean})
    if (j.is_string() && j.get_ref<const std::string&>() == to_string(c)) {
      s = c;
      return;
    }
  throw InvalidArgument(fmt::format("unknown CenteredClip start {} (known: median, mean)",
                                    j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
}

/// How a butterfly reducer aggregates each chunk of its part (AveragerOptions::aggregation).
///
/// Every member of a run should use the same settings: each reducer applies its own to its
/// part. The robust methods keep every sender's chunk until the chunk is aggregated (memory: the
/// part times the group's size, instead of one sum), and compute in float64, over the senders
/// in the group's order, so that the result depends on which members sent what, never on the
/// order in which their chunks arrived.
struct AggregationOptions {
  /// The method: mean (default), centered_clip or trimmed_mean.
  HIVE_ARG(Aggregation, method, Aggregation::mean);
  /// CenteredClip's radius τ, as a root mean square per element: a member whose chunk lies
  /// farther than τ·√n (L2, for a chunk of n elements) from the current center pulls it only as
  /// far as one at that distance would. So τ does not depend on the chunk size; set it near
  /// the spread of honest members' values (e.g. the RMS difference of two honest peers'
  /// parameters at a round). > 0.
  HIVE_ARG(double, tau, 1.0);
  /// CenteredClip's iterations at most (≥ 1).
  HIVE_ARG(std::size_t, max_iterations, 20);
  /// CenteredClip stops early once an iteration moves the center by less than this (RMS per
  /// element; ≥ 0, 0: always max_iterations).
  HIVE_ARG(double, eps, 1e-6);
  /// Where CenteredClip starts: the coordinate-wise median (default) or the weighted mean.
  HIVE_ARG(ClipStart, start, ClipStart::median);
  /// The trimmed mean drops this many largest and this many smallest values of each
  /// coordinate (≥ 1). A group must have more than 2 × trim members (min_group_size is
  /// checked); when members are missing from a chunk, fewer are dropped so that at least one
  /// value is left (the median, at worst).
  HIVE_ARG(std::size_t, trim, 1);
  HIVE_OPTIONS_JSON(AggregationOptions, method, tau, max_iterations, eps, start, trim)

 public:
  /// Throws hive::InvalidArgument for a bad value: τ not a finite number > 0, no iterations,
  /// eps negative or not finite, trim 0 with the trimmed mean, or (with min_group_size > 0)
  /// a trim of half of min_group_size or more.
  void validate(std::size_t min_group_size = 0) const {
    HIVE_CHECK(std::isfinite(tau_) && tau_ > 0, "aggregation tau (CenteredClip's radius) must be a finite number > 0, got {}",
               tau_);
    HIVE_CHECK(max_iterations_ >= 1 && max_iterations_ <= 100000,
               "aggregation max_iterations must be in [1, 100000], got {}", max_iterations_);
    HIVE_CHECK(std::isfinite(eps_) && eps_ >= 0, "aggregation eps must be a finite number >= 0, got {}", eps_);
    if (method_ == Aggregation::trimmed_mean) {
      HIVE_CHECK(trim_ >= 1, "aggregation trim must be at least 1 for the trimmed mean (trim 0 is the plain mean)");
      HIVE_CHECK(min_group_size == 0 || 2 * trim_ < min_group_size,
                 "aggregation trim {} drops {} of every coordinate's values: min_group_size must be at least {}, got {}",
                 trim_, 2 * trim_, 2 * trim_ + 1, min_group_size);
    }
  }
};

/// Aggregates `values` (one row per contributing member, in the group's order; float64
/// [members, n]) with `weights` (float64 [members], each > 0) by `options`' method. The result
/// is float64 [n]. Deterministic: the same rows give the same result.
[[nodiscard]] inline at::Tensor aggregate(const at::Tensor& values, const at::Tensor& weights,
                                          const AggregationOptions& options) {
  HIVE_CHECK(values.dim() == 2 && weights.dim() == 1 && values.size(0) == weights.size(0) && values.size(0) > 0,
             "aggregate needs [members, n] values and [members] weights, got {} and {} dimensions", values.dim(),
             weights.dim());
  const auto members = values.size(0);
  const auto n = values.size(1);
  const auto w = weights.to(at::kDouble);
  const auto x = values.to(at::kDouble);
  const auto total = w.sum();
  const auto weighted_mean = [&] { return x.mul(w.unsqueeze(1)).sum(0).div(total); };
  switch (options.method()) {
    case Aggregation::mean: return weighted_mean();
    case Aggregation::centered_clip: {
      if (n == 0 || members == 1) return weighted_mean();
      const double scale = std::sqrt(static_cast<double>(n));
      const double radius = options.tau() * scale;
      const double eps = options.eps() * scale;
      at::Tensor v = options.start() == ClipStart::median ? std::get<0>(x.median(0)) : weighted_mean();
      for (std::size_t it = 0; it < options.max_iterations(); ++it) {
        const auto diff = x - v;                   // [members, n]
        const auto dist = diff.norm(2, {1});        // [members]
        // min(1, τ / ‖xᵢ − v‖); a member at the center (distance 0) keeps factor 1.
        const auto factor = radius / dist;
        const auto clipped = factor.clamp_max(1.0).nan_to_num(1.0, 1.0, 1.0);
        const auto step = diff.mul((w * clipped).unsqueeze(1)).sum(0).div(total);
        v = v + step;
        if (step.norm().item<double>() < eps) break;
      }
      return v;
    }
    case Aggregation::trimmed_mean: {
      const auto t = std::min<std::int64_t>(static_cast<std::int64_t>(options.trim()), (members - 1) / 2);
      if (t == 0) return weighted_mean();
      // A stable sort: equal values keep the group's order, so ties drop the same members on
      // every run.
      // (stable spelled as an optional: a plain `true` would pick the overload (dim, descending)).
      auto [sorted, order] = at::sort(x, c10::optional<bool>(true), /*dim=*/0, /*descending=*/false);
      const auto ws = w.unsqueeze(1).expand({members, n}).gather(0, order);
      const auto kept = sorted.slice(0, t, members - t);
      const auto kept_w = ws.slice(0, t, members - t);
      return kept.mul(kept_w).sum(0).div(kept_w.sum(0));
    }
  }
  throw InvalidArgument("unknown aggregation method");
}

/// FOR TESTING ATTACKS ONLY: a function a peer applies to every chunk it sends to another
/// member (AveragerOptions::tamper_outgoing_for_testing), returning what goes on the wire
/// instead (scaled, random, NaN, another shape or dtype...). Honest peers never set one.
using PartTamper = std::function<at::Tensor(const at::Tensor& chunk)>;

/// A peer banned from this peer's groups: its peer id and address, until when, and why.
struct Ban {
  /// The member's peer id (hive::Identity); empty when it was not known.
  std::string peer;
  /// The member's address (as in its group's member list; empty for a client-mode member).
  std::string address;
  /// When the ban ends (this peer's steady clock).
  Deadline until{};
  /// What it sent (e.g. "chunk 0 holds non-finite values").
  std::string reason;

  /// What the ban is kept under: the peer id, or the address when the id is not known.
  [[nodiscard]] const std::string& key() const noexcept { return peer.empty() ? address : peer; }
};

/// Peers banned from a peer's averaging groups for a while, by peer id (a peer that moves to
/// another address stays banned), or by address for members whose id is not known.
///
/// @par Thread safety
/// None: the averager touches it only on its DHT peer's strand.
class BanList {
 public:
  /// Most bans kept at once; past it, the ban that ends first makes room.
  static constexpr std::size_t max_bans = 4096;

  /// Bans the member with `peer` id at `address` for `duration` (extends a shorter ban). A
  /// member with neither (a client-mode member of unknown id) or a duration <= 0 bans nothing.
  void ban(const std::string& peer, const std::string& address, Seconds duration, std::string reason) {
    Ban b{peer, address, {}, std::move(reason)};
    if (b.key().empty() || !(duration > Seconds(0))) return;
    const auto now = SteadyClock::now();
    std::erase_if(bans_, [&](const auto& kv) { return kv.second.until <= now; });
    b.until = now + std::chrono::duration_cast<SteadyClock::duration>(duration);
    if (auto it = bans_.find(b.key()); it != bans_.end()) {
      if (it->second.until < b.until) it->second = std::move(b);
      return;
    }
    if (bans_.size() >= max_bans)
      bans_.erase(std::min_element(bans_.begin(), bans_.end(),
                                   [](const auto& a, const auto& c) { return a.second.until < c.second.until; }));
    auto key = b.key();
    bans_.emplace(std::move(key), std::move(b));
  }
  /// The ban in force on `key` (a peer id, or an address for a member of unknown id), if any.
  [[nodiscard]] std::optional<Ban> find(const std::string& key) const {
    if (key.empty()) return std::nullopt;
    auto it = bans_.find(key);
    if (it == bans_.end() || it->second.until <= SteadyClock::now()) return std::nullopt;
    return it->second;
  }
  /// True when `key` (a peer id, or an address) is banned now.
  [[nodiscard]] bool banned(const std::string& key) const { return find(key).has_value(); }
  /// The bans in force.
  [[nodiscard]] std::vector<Ban> list() const {
    std::vector<Ban> out;
    const auto now = SteadyClock::now();
    for (const auto& [_, b] : bans_)
      if (b.until > now) out.push_back(b);
    return out;
  }
  /// Lifts the ban on `key` (a peer id, or an address), if any; also a ban whose address is
  /// `key`.
  void lift(const std::string& key) {
    std::erase_if(bans_, [&](const auto& kv) { return kv.first == key || kv.second.address == key; });
  }

 private:
  std::map<std::string, Ban> bans_;
};

/// A member dropped from a round by this peer, and why.
struct DroppedMember {
  /// Its index in the group.
  std::size_t index = 0;
  /// Its address (empty for a client-mode member).
  std::string address;
  /// Its peer id (Member::peer).
  std::string peer;
  /// What failed validation, e.g. "chunk 0 holds non-finite values", or that it is banned here.
  std::string reason;
};

}  // namespace hive::averaging
