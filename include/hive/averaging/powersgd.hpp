#pragma once
/// @file
/// PowerSGDAverager: gradient averaging with PowerSGD's rank-r compression and error feedback
/// (Vogels et al., NeurIPS 2019; hivemind's PowerSGDGradientAverager). Each matrix-shaped
/// gradient M (m × n) travels as two thin factors, P = M·Q (m × r) and Q = Mᵀ·P (n × r), in two
/// all-reduces of one group; what the low-rank average misses of M stays as this peer's error
/// and is added to the next round's gradient.

#include <hive/fwd.hpp>
#include <hive/averaging/averager.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace hive::averaging {

/// Knobs of a PowerSGDAverager.
struct PowerSGDOptions {
  /// Rank of the factors.
  HIVE_ARG(std::int64_t, rank, 4);
  /// A tensor is compressed only when its factors take at most this fraction of its elements
  /// (hivemind's min_compression_ratio); others (biases, small matrices) are averaged as they are.
  HIVE_ARG(double, min_compression_ratio, 0.5);
  /// Seed of the initial Q factors (the same on every peer, so that the first round agrees).
  HIVE_ARG(std::uint64_t, seed, 0x5eed);
  HIVE_OPTIONS_JSON(PowerSGDOptions, rank, min_compression_ratio, seed)
};

/// Averages gradients with peers of the same run through PowerSGD.
///
/// The tensors are seen as matrices (first dimension × the rest). A round (step()) looks for a
/// group as DecentralizedAverager does, then, in that group:
/// 1. M = gradient + error; P = M·Q; all-reduce of the P factors with the tensors that are not
///    compressed (phase "P");
/// 2. P is orthonormalized (QR); Q = Mᵀ·P; all-reduce of the Q factors (phase "Q");
/// 3. the gradient becomes P·Qᵀ (Q averaged), the error M − P·Qᵢᵀ (Qᵢ this peer's own), and
///    the averaged Q is kept for the next round.
///
/// A phase that does not average completely (a member died) fails the step and leaves the
/// tensors, errors and factors as they were: PowerSGD needs both factors of the same group.
/// Every peer of a run must use the same rank and tensor shapes (the factors must agree);
/// give a PowerSGD run its own prefix.
///
/// @tparam T, R, A the transport, routing and all-reduce Strategy (as DecentralizedAverager)
/// @par Example
/// @code
/// std::vector<at::Tensor> grads{at::randn({256, 784}), at::randn({256})};
/// hive::averaging::PowerSGDAverager<> averager(dht, grads,
///     hive::averaging::AveragerOptions().prefix("run_powersgd").target_group_size(4),
///     hive::averaging::PowerSGDOptions().rank(4));
/// auto r = averager.step(/*weight=*/32);
/// @endcode
/// @par Thread safety
/// As DecentralizedAverager: step() from any thread but the DHT's, one at a time; the tensors
/// are written under tensors_mutex().
template <class T, class R, class A>
class PowerSGDAverager {
 public:
  /// The averager that finds the groups and runs the all-reduces.
  using averager_type = DecentralizedAverager<T, R, A>;

  /// Averages `tensors` (gradients, written in place) on `dht`. Throws hive::InvalidArgument
  /// for bad options.
  PowerSGDAverager(BasicDHT<T, R>& dht, std::vector<at::Tensor> tensors, AveragerOptions options,
                   PowerSGDOptions power = {})
      : power_(std::move(power)), averager_(dht, tensors, std::move(options)) {
    HIVE_CHECK(power_.rank() >= 1, "PowerSGD rank must be at least 1, got {}", power_.rank());
    HIVE_CHECK(power_.min_compression_ratio() > 0, "min_compression_ratio must be positive");
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      Factor f;
      f.index = i;
      if (t.dim() >= 2) {
        f.m = t.size(0);
        f.n = t.numel() / f.m;
        const auto r = std::min({power_.rank(), f.m, f.n});
        f.compressed = static_cast<double>(r * (f.m + f.n)) <= power_.min_compression_ratio() * static_cast<double>(f.m * f.n);
        if (f.compressed) {
          f.rank = r;
          auto gen = at::detail::createCPUGenerator(power_.seed() + i);
          f.q = at::randn({f.n, r}, gen, at::TensorOptions().dtype(at::kFloat));
          f.error = at::zeros({f.m, f.n}, at::kFloat);
        }
      }
      factors_.push_back(std::move(f));
    }
  }

  /// Looks for a group and averages the gradients with it (weight: this peer's share, e.g. its
  /// samples); never throws for a failed round.
  StepResult step(double weight = 1.0, nlohmann::json gather = nullptr) {
    return averager_.step_with([this](RoundContext& context) { return round(context); }, weight, std::move(gather));
  }

  /// The gradients (the same storage as given).
  [[nodiscard]] const std::vector<at::Tensor>& tensors() const noexcept { return averager_.tensors(); }
  /// Held while the tensors are read or written.
  [[nodiscard]] std::mutex& tensors_mutex() noexcept { return averager_.tensors_mutex(); }
  /// The averager underneath (options, group key, shutdown).
  [[nodiscard]] averager_type& averager() noexcept { return averager_; }
  /// Elements this peer sends per round (both phases) against the uncompressed count.
  [[nodiscard]] std::pair<std::int64_t, std::int64_t> elements_per_round() const {
    std::int64_t sent = 0, full = 0;
    for (std::size_t i = 0; i < factors_.size(); ++i) {
      const auto n = averager_.tensors()[i].numel();
      full += n;
      sent += factors_[i].compressed ? factors_[i].rank * (factors_[i].m + factors_[i].n) : n;
    }
    return {sent, full};
  }
  /// Stops the averager; idempotent.
  void shutdown() { averager_.shutdown(); }

 private:
  struct Factor {
    std::size_t index = 0;
    bool compressed = false;
    std::int64_t m = 0, n = 0, rank = 0;
    at::Tensor q, error;
  };

  // Both phases in the round's group; commits only when both averaged everything.
  asio::awaitable<void> round(RoundContext& context) {
    std::vector<at::Tensor> ms, first;
    {
      std::lock_guard lock(averager_.tensors_mutex());
      const auto& tensors = averager_.tensors();
      for (const auto& f : factors_) {
        if (!f.compressed) continue;
        auto m = tensors[f.index].detach().reshape({f.m, f.n}).to(at::kFloat) + f.error;
        first.push_back(m.mm(f.q).reshape({-1}));
        ms.push_back(std::move(m));
      }
      for (const auto& f : factors_)
        if (!f.compressed) first.push_back(tensors[f.index].detach().reshape({-1}).to(at::kFloat));
    }
    auto phase_p = context.allreduce(at::cat(first), context.weight, "P");
    auto p_reduced = co_await std::move(phase_p);
    if (!p_reduced.unaveraged.empty())
      throw Error(errc::round_failed, "PowerSGD phase P was not averaged completely: the gradients stay local");
    std::vector<at::Tensor> ps, second, local_q;
    std::int64_t offset = 0;
    std::size_t k = 0;
    for (const auto& f : factors_) {
      if (!f.compressed) continue;
      auto p = p_reduced.average.slice(0, offset, offset + f.m * f.rank).view({f.m, f.rank});
      offset += f.m * f.rank;
      p = std::get<0>(at::linalg_qr(p));  // orthonormal columns
      local_q.push_back(ms[k++].t().mm(p));
      second.push_back(local_q.back().reshape({-1}));
      ps.push_back(std::move(p));
    }
    at::Tensor q_average;
    if (!second.empty()) {
      auto phase_q = context.allreduce(at::cat(second), context.weight, "Q");
      auto q_reduced = co_await std::move(phase_q);
      if (!q_reduced.unaveraged.empty())
        throw Error(errc::round_failed, "PowerSGD phase Q was not averaged completely: the gradients stay local");
      q_average = q_reduced.average;
    }
    if (averager_.auxiliary()) co_return;  // it lent its bandwidth, it keeps nothing
    std::lock_guard lock(averager_.tensors_mutex());
    const auto& tensors = averager_.tensors();
    std::int64_t q_at = 0;
    k = 0;
    for (auto& f : factors_) {
      if (!f.compressed) continue;
      auto q = q_average.slice(0, q_at, q_at + f.n * f.rank).view({f.n, f.rank}).clone();
      q_at += f.n * f.rank;
      // The error is what this peer's own low-rank projection misses (M − P·Qᵢᵀ, as in
      // PowerSGD's algorithm 2), not M − P·Qᵀ: the latter would also carry the difference
      // between this peer's gradient and the swarm's into every later round.
      f.error = ms[k] - ps[k].mm(local_q[k].t());
      f.q = std::move(q);
      tensors[f.index].detach().copy_(ps[k].mm(f.q.t()).view(tensors[f.index].sizes()));
      ++k;
    }
    for (const auto& f : factors_) {
      if (f.compressed) continue;
      const auto n = tensors[f.index].numel();
      tensors[f.index].detach().copy_(p_reduced.average.slice(0, offset, offset + n).view(tensors[f.index].sizes()));
      offset += n;
    }
  }

  PowerSGDOptions power_;
  averager_type averager_;
  std::vector<Factor> factors_;  // touched only by round(), one at a time
};

}  // namespace hive::averaging
