#pragma once
/// @file
/// DiLoCoOptimizer: each peer takes H local steps of its inner optimizer, then the peers
/// average their parameter change since the last outer step (the pseudo-gradient) and an outer
/// optimizer applies it (Douillard et al., "DiLoCo", 2023; OpenDiLoCo). Communication happens
/// once per H steps instead of once per step.

#include <hive/fwd.hpp>
#include <hive/averaging/averager.hpp>
#include <hive/core/message.hpp>
#include <hive/optim/decentralized.hpp>

#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <memory>
#include <mutex>

namespace hive::optim {

/// Run-time knobs of a DiLoCoOptimizer.
struct DiLoCoOptions {
  /// Name of the run; the averager's prefix is `<run_id>_diloco`.
  HIVE_ARG(std::string, run_id, "");
  /// Inner steps between two outer steps (H; DiLoCo's 500).
  HIVE_ARG(std::size_t, local_steps, 500);
  /// Or, when > 0, an outer step at every multiple of this many seconds of wall time (every
  /// peer at the same moments, whatever its speed); local_steps is then ignored.
  HIVE_ARG(Seconds, local_time, Seconds(0));
  /// Learning rate of the default outer optimizer (SGD with Nesterov momentum, DiLoCo's 0.7).
  HIVE_ARG(double, outer_lr, 0.7);
  /// Momentum of the default outer optimizer (DiLoCo's 0.9).
  HIVE_ARG(double, outer_momentum, 0.9);
  /// Log each outer step.
  HIVE_ARG(bool, verbose, false);
  /// The averager's knobs (group sizes, matchmaking time, timeouts, compression of the
  /// pseudo-gradients: float16 and 8-bit codecs work as for any averaging); its prefix is set
  /// from run_id.
  HIVE_ARG(averaging::AveragerOptions, averager, averaging::AveragerOptions().target_group_size(256));
  HIVE_OPTIONS_JSON(DiLoCoOptions, run_id, local_steps, local_time, outer_lr, outer_momentum, verbose, averager)
};

/// Counters of a DiLoCoOptimizer.
struct DiLoCoStats {
  /// Inner steps taken, and those since the last outer step.
  std::size_t inner_steps = 0, since_outer = 0;
  /// Outer steps: all, those whose pseudo-gradient was averaged with peers (completely or
  /// partly), and those applied with this peer's own (no group formed).
  std::size_t outer_steps = 0, averaged = 0, alone = 0;
  /// Group size of the last outer step.
  std::size_t last_group_size = 0;
};

/// Wraps an inner torch optimizer with DiLoCo's outer loop.
///
/// step() runs the inner optimizer; every local_steps steps (or local_time seconds) it looks
/// for a group, averages the pseudo-gradient Δ = θ_outer − θ (the parameters at the last
/// outer step minus the current ones), resets the parameters to θ_outer and lets the outer
/// optimizer step with Δ as the gradient: θ_outer ← outer(θ_outer, Δ̄). The outer optimizer is
/// SGD with Nesterov momentum (outer_lr, outer_momentum) unless one is given (any torch
/// optimizer over the same parameters). Newcomers download the parameters, θ_outer, both
/// optimizers' states and the step counters (load_state_from_peers).
///
/// @tparam T, R, A the transport, routing and all-reduce Strategy
/// @par Example
/// @code
/// torch::optim::AdamW adamw(model->parameters(), torch::optim::AdamWOptions(1e-3));
/// hive::optim::DiLoCoOptimizer diloco(adamw, dht, hive::optim::DiLoCoOptions().run_id("my_run").local_steps(500));
/// diloco.load_state_from_peers();
/// for (auto& batch : data) { diloco.zero_grad(); loss(batch).backward(); diloco.step(); }
/// @endcode
/// @par Thread safety
/// step(), zero_grad(), outer_step() and load_state_from_peers() belong to the training
/// thread; stats() may be called from any. The optimizers and the DHT must outlive it.
template <class T, class R, class A>
class DiLoCoOptimizer {
  static_assert(averaging::StrategyFor<A, T>, "A's Runner<T> must model averaging::StrategyFor<A, T>");

 public:
  /// The averager type.
  using averager_type = averaging::DecentralizedAverager<T, R, A>;

  /// Wraps `inner`; `outer` (optional) is the outer optimizer, over the same parameters.
  /// Throws hive::InvalidArgument for bad options or an outer optimizer over other tensors.
  DiLoCoOptimizer(torch::optim::Optimizer& inner, BasicDHT<T, R>& dht, DiLoCoOptions options,
                  torch::optim::Optimizer* outer = nullptr)
      : inner_(inner), options_(std::move(options)) {
    HIVE_CHECK(!options_.run_id().empty(), "a DiLoCo run needs a run_id");
    HIVE_CHECK(options_.local_steps() >= 1 || options_.local_time() > Seconds(0), "local_steps must be at least 1");
    for (const auto& group : inner_.param_groups())
      for (const auto& p : group.params()) params_.push_back(p);
    HIVE_CHECK(!params_.empty(), "the inner optimizer has no parameters");
    if (outer) {
      std::size_t n = 0;
      for (const auto& group : outer->param_groups())
        for (const auto& p : group.params()) {
          HIVE_CHECK(n < params_.size() && p.is_same(params_[n]), "the outer optimizer must hold the inner one's parameters, in order");
          ++n;
        }
      HIVE_CHECK(n == params_.size(), "the outer optimizer holds {} parameters, the inner one {}", n, params_.size());
      outer_ = outer;
    } else {
      HIVE_CHECK(options_.outer_lr() > 0 && options_.outer_momentum() >= 0, "outer_lr must be > 0 and outer_momentum >= 0");
      own_outer_ = std::make_unique<torch::optim::SGD>(
          params_, torch::optim::SGDOptions(options_.outer_lr()).momentum(options_.outer_momentum()).nesterov(true));
      outer_ = own_outer_.get();
    }
    for (const auto& p : params_) {
      anchor_.push_back(p.detach().clone());
      delta_.push_back(at::zeros_like(p.detach(), at::kFloat));
    }
    auto averager = options_.averager();
    averager_ = std::make_unique<averager_type>(dht, delta_, averager.prefix(options_.run_id() + "_diloco"));
    if (!averager_->client_mode()) averager_->set_state_provider([this] { return current_state(); }, 0);
    next_outer_time_ = next_boundary(wall_time());
  }
  DiLoCoOptimizer(const DiLoCoOptimizer&) = delete;
  DiLoCoOptimizer& operator=(const DiLoCoOptimizer&) = delete;
  /// Stops; see shutdown().
  ~DiLoCoOptimizer() { shutdown(); }

  /// One inner step; an outer step (outer_step()) when local_steps steps (or the local_time
  /// boundary) have passed. True when an outer step ran.
  bool step() {
    {
      std::lock_guard state_lock(state_mutex_);
      inner_.step();
      std::lock_guard lock(mutex_);
      ++stats_.inner_steps;
      ++stats_.since_outer;
    }
    const bool due = options_.local_time() > Seconds(0) ? wall_time() >= next_outer_time_
                                                        : stats().since_outer >= options_.local_steps();
    if (!due) return false;
    outer_step();
    return true;
  }

  /// Zeroes the inner optimizer's gradients.
  void zero_grad() { inner_.zero_grad(); }

  /// The outer step now: averages the pseudo-gradient with a group (this peer's own when none
  /// forms), resets the parameters to the outer ones and steps the outer optimizer.
  averaging::StepResult outer_step() {
    {
      std::lock_guard state_lock(state_mutex_);
      std::lock_guard tensors_lock(averager_->tensors_mutex());
      at::NoGradGuard no_grad;
      for (std::size_t i = 0; i < params_.size(); ++i) delta_[i].copy_(anchor_[i] - params_[i].detach());
    }
    std::size_t outer_step_index = 0;
    {
      std::lock_guard lock(mutex_);
      outer_step_index = stats_.outer_steps;
    }
    // The state lock is not held while averaging: a newcomer's download takes it on the io thread.
    auto r = averager_->step(1.0, nlohmann::json{{"outer_step", outer_step_index}});
    {
      std::lock_guard state_lock(state_mutex_);
      std::lock_guard tensors_lock(averager_->tensors_mutex());
      at::NoGradGuard no_grad;
      std::vector<at::Tensor> kept;
      for (std::size_t i = 0; i < params_.size(); ++i) {
        params_[i].detach().copy_(anchor_[i]);
        kept.push_back(params_[i].grad());
        params_[i].mutable_grad() = delta_[i].to(params_[i].scalar_type()).clone();
      }
      outer_->step();
      for (std::size_t i = 0; i < params_.size(); ++i) {
        params_[i].mutable_grad() = kept[i];
        anchor_[i].copy_(params_[i].detach());
      }
    }
    std::lock_guard lock(mutex_);
    ++stats_.outer_steps;
    stats_.since_outer = 0;
    if (r.ok) {
      ++stats_.averaged;
      stats_.last_group_size = r.group_size;
    } else {
      ++stats_.alone;
    }
    next_outer_time_ = next_boundary(wall_time());
    if (options_.verbose())
      log::info("optim", "{}: outer step {} after {} inner steps: {}", options_.run_id(), stats_.outer_steps, stats_.inner_steps,
                r.ok ? fmt::format("pseudo-gradient averaged with {}{}", r.group_size, r.complete() ? "" : " (partly)")
                     : fmt::format("own pseudo-gradient ({})", r.error));
    return r;
  }

  /// Downloads parameters, outer parameters, both optimizers' states and the counters from the
  /// best peer; false when no peer shares a state. Throws hive::InvalidArgument when the state
  /// does not fit (another model).
  bool load_state_from_peers(Seconds timeout = Seconds(600)) {
    auto state = averager_->load_state_from_peers(timeout);
    if (!state) return false;
    const auto n = params_.size();
    HIVE_CHECK(state->tensors.size() == 2 * n + 2, "the peer's state has {} tensors, this optimizer needs {}", state->tensors.size(),
               2 * n + 2);
    for (std::size_t i = 0; i < n; ++i)
      HIVE_CHECK(state->tensors[i].sizes() == params_[i].sizes() && state->tensors[n + i].sizes() == params_[i].sizes(),
                 "parameter {} of the peer's state has another shape", i);
    std::lock_guard state_lock(state_mutex_);
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < n; ++i) {
      params_[i].detach().copy_(state->tensors[i]);
      anchor_[i].copy_(state->tensors[n + i]);
    }
    load_optimizer_state(inner_, state->tensors[2 * n]);
    load_optimizer_state(*outer_, state->tensors[2 * n + 1]);
    const auto& m = state->metadata;
    std::lock_guard lock(mutex_);
    if (m.is_object()) {
      // Another peer's counters: absent or malformed ones count from 0.
      const auto count = [&m](const char* key) {
        const auto it = m.find(key);
        return it == m.end() ? std::size_t{0} : integer_of<std::size_t>(*it).value_or(0);
      };
      stats_.inner_steps = count("inner_steps");
      stats_.since_outer = count("since_outer");
      stats_.outer_steps = count("outer_steps");
    }
    return true;
  }

  /// The parameters at the last outer step (θ_outer).
  [[nodiscard]] const std::vector<at::Tensor>& outer_parameters() const noexcept { return anchor_; }
  /// The outer optimizer.
  [[nodiscard]] torch::optim::Optimizer& outer() noexcept { return *outer_; }
  /// The averager of the pseudo-gradients.
  [[nodiscard]] averager_type& averager() noexcept { return *averager_; }
  /// Counters.
  [[nodiscard]] DiLoCoStats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  /// Stops the averager; idempotent.
  void shutdown() {
    if (averager_) averager_->shutdown();
  }

 private:
  double next_boundary(double now) const {
    const double t = options_.local_time().count();
    return t > 0 ? (std::floor(now / t) + 1) * t : 0;
  }

  averaging::State current_state() {
    std::lock_guard state_lock(state_mutex_);
    averaging::State s;
    {
      std::lock_guard lock(mutex_);
      s.metadata = {{"inner_steps", stats_.inner_steps}, {"since_outer", stats_.since_outer}, {"outer_steps", stats_.outer_steps}};
    }
    for (const auto& p : params_) s.tensors.push_back(p.detach().clone());
    for (const auto& a : anchor_) s.tensors.push_back(a.clone());
    s.tensors.push_back(optimizer_state_bytes(inner_));
    s.tensors.push_back(optimizer_state_bytes(*outer_));
    return s;
  }

  torch::optim::Optimizer& inner_;
  DiLoCoOptions options_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> anchor_;  // θ_outer
  std::vector<at::Tensor> delta_;   // the averager's tensors: the pseudo-gradients
  std::unique_ptr<torch::optim::Optimizer> own_outer_;
  torch::optim::Optimizer* outer_ = nullptr;
  std::unique_ptr<averager_type> averager_;
  std::mutex state_mutex_;    // the parameters, θ_outer and the optimizers
  mutable std::mutex mutex_;  // the counters
  DiLoCoStats stats_;
  double next_outer_time_ = 0;
};

}  // namespace hive::optim
