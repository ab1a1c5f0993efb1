#pragma once
/// @file
/// DecentralizedOptimizer: a torch optimizer whose parameters (and optionally gradients) are
/// averaged with peers in the background.

#include <hive/fwd.hpp>
#include <hive/averaging/averager.hpp>

#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <sstream>
#include <thread>

namespace hive::optim {

/// A torch optimizer's state as bytes (torch serialization) in a uint8 tensor, as the
/// optimizers of this directory share it with newcomers.
inline at::Tensor optimizer_state_bytes(torch::optim::Optimizer& optimizer) {
  std::ostringstream out;
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  archive.save_to(out);
  const auto bytes = out.str();
  return at::from_blob(const_cast<char*>(bytes.data()), {static_cast<std::int64_t>(bytes.size())}, at::kByte).clone();
}

/// Loads what optimizer_state_bytes() wrote into `optimizer`; c10::Error for unreadable bytes.
inline void load_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& bytes_tensor) {
  const auto bytes = bytes_tensor.contiguous();
  std::istringstream in(std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<std::size_t>(bytes.numel())));
  torch::serialize::InputArchive archive;
  archive.load_from(in);
  optimizer.load(archive);
}

/// Run-time knobs of a DecentralizedOptimizer.
struct DecentralizedOptions {
  /// Sets the name of the run (peers with the same prefix average together); stored in
  /// averager().prefix(), its only home.
  DecentralizedOptions& prefix(const std::string& value) {
    averager_.prefix(value);
    return *this;
  }
  /// The name of the run (averager().prefix()).
  [[nodiscard]] const std::string& prefix() const noexcept { return averager_.prefix(); }
  /// Sets the members a group aims for (averager().target_group_size()).
  DecentralizedOptions& target_group_size(std::size_t value) {
    averager_.target_group_size(value);
    return *this;
  }
  /// Members a group aims for (averager().target_group_size()).
  [[nodiscard]] std::size_t target_group_size() const noexcept { return averager_.target_group_size(); }
  /// Sets the fewest members a round starts with (averager().min_group_size()).
  DecentralizedOptions& min_group_size(std::size_t value) {
    averager_.min_group_size(value);
    return *this;
  }
  /// Fewest members a round starts with (averager().min_group_size()).
  [[nodiscard]] std::size_t min_group_size() const noexcept { return averager_.min_group_size(); }
  /// Average the parameters.
  HIVE_ARG(bool, average_parameters, true);
  /// Average the gradients too (see DecentralizedOptimizer for how they are applied).
  HIVE_ARG(bool, average_gradients, false);
  /// A new round starts at most every this many local steps...
  HIVE_ARG(std::size_t, averaging_steps_period, 1);
  /// ...and at most every this many seconds (0: no time limit).
  HIVE_ARG(Seconds, averaging_time_period, Seconds(0));
  /// Share parameters, optimizer state and step with newcomers (load_state_from_peers).
  HIVE_ARG(bool, share_state, true);
  /// Log each round ("Starting a new averaging round", "Finished averaging round with N peers").
  HIVE_ARG(bool, verbose, false);
  /// The averager's knobs: prefix, group sizes, matchmaking time, timeouts, compression,
  /// group bits... (in JSON, `"averager": {"prefix": ...}`: each knob has this one home).
  HIVE_ARG(averaging::AveragerOptions, averager, averaging::AveragerOptions{});
  HIVE_OPTIONS_JSON(DecentralizedOptions, average_parameters, average_gradients, averaging_steps_period,
                    averaging_time_period, share_state, verbose, averager)
};

/// Counters of a DecentralizedOptimizer.
struct DecentralizedStats {
  /// Local optimizer steps taken.
  std::size_t local_step = 0;
  /// Rounds started, averaged, and failed (no group, or a failed all-reduce).
  std::size_t rounds = 0, averaged = 0, failed = 0;
  /// Group size of the last averaged round.
  std::size_t last_group_size = 0;
};

/// Wraps a torch optimizer: step() runs the optimizer, then, every averaging period, hands a
/// copy of the parameters (and gradients) to a background thread that averages them with
/// peers. When a round finishes, a later step() adds the change the averaging made to the
/// current tensors, so the local updates made while the round ran are kept:
/// `p ← p + (average − copy sent)`. The same rule applies to gradients (before the optimizer's
/// step), which brings the group's gradient information into the local one.
///
/// @tparam T, R, A the transport, routing and averaging Strategy policies (deduced from the DHT)
/// @par Example
/// @code
/// hive::DHT dht(hive::DHTOptions().initial_peers(peers));
/// torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
/// hive::optim::DecentralizedOptimizer opt(sgd, dht, hive::optim::DecentralizedOptions()
///     .prefix("my_run").target_group_size(16).verbose(true));
/// opt.load_state_from_peers();
/// for (...) { opt.zero_grad(); loss.backward(); opt.step(); }
/// @endcode
/// @par Thread safety
/// step(), zero_grad(), average_now(), wait_for_round() and load_state_from_peers() belong to
/// the training thread. The wrapped optimizer and the DHT must outlive this object. (Internally:
/// nothing waits for the DHT's io thread while holding the state lock, because sharing the
/// state takes that lock on the io thread.)
template <class T, class R, class A>
class DecentralizedOptimizer {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(dht::Routing<R>, "R must model dht::Routing (see docs/concepts/routing.md)");
  static_assert(averaging::Strategy<A>, "A must model averaging::Strategy (see docs/concepts/strategy.md)");
  static_assert(averaging::StrategyFor<A, T>, "A's Runner<T> must model averaging::StrategyFor<A, T>");
 public:
  /// The averager type.
  using averager_type = averaging::DecentralizedAverager<T, R, A>;

  /// Wraps `inner` (its parameters are the averaged ones) and averages through `dht`.
  DecentralizedOptimizer(torch::optim::Optimizer& inner, BasicDHT<T, R>& dht, DecentralizedOptions options)
      : inner_(inner), options_(std::move(options)) {
    HIVE_CHECK(options_.average_parameters() || options_.average_gradients(),
               "average_parameters and average_gradients are both false: nothing to average");
    HIVE_CHECK(options_.averaging_steps_period() >= 1, "averaging_steps_period must be at least 1");
    for (const auto& group : inner_.param_groups())
      for (const auto& p : group.params()) params_.push_back(p);
    HIVE_CHECK(!params_.empty(), "the optimizer has no parameters");
    for (const auto& p : params_) {
      if (options_.average_parameters()) buffers_.push_back(p.detach().clone());
      if (options_.average_gradients()) buffers_.push_back(at::zeros_like(p.detach()));
    }
    averager_ = std::make_unique<averager_type>(dht, buffers_, options_.averager());
    if (options_.share_state() && !averager_->client_mode())
      averager_->set_state_provider([this] { return current_state(); }, 0);
    worker_ = std::thread([this] { background(); });
  }
  DecentralizedOptimizer(const DecentralizedOptimizer&) = delete;
  DecentralizedOptimizer& operator=(const DecentralizedOptimizer&) = delete;
  /// Stops; see shutdown().
  ~DecentralizedOptimizer() { shutdown(); }

  /// Applies a finished round (if any), runs the wrapped optimizer's step, and starts a new
  /// round when the averaging period has passed and no round is running.
  void step() {
    std::lock_guard state_lock(state_mutex_);
    at::NoGradGuard no_grad;
    if (options_.average_gradients()) apply_finished(/*gradients=*/true);
    inner_.step();
    {
      std::lock_guard lock(mutex_);  // the state provider reads the step on the io thread
      ++stats_.local_step;
    }
    if (options_.average_parameters()) apply_finished(/*gradients=*/false);
    maybe_start_round();
  }

  /// Zeroes the wrapped optimizer's gradients (its own zero_grad()).
  void zero_grad() { inner_.zero_grad(); }

  /// Downloads parameters, optimizer state and step counter from the best peer; false when no
  /// peer shares a state. Throws hive::InvalidArgument when the state does not fit this
  /// optimizer (another parameter count or shape), c10::Error for an unreadable optimizer state.
  bool load_state_from_peers(Seconds timeout = Seconds(60)) {
    auto state = averager_->load_state_from_peers(timeout);
    if (!state) return false;
    HIVE_CHECK(state->tensors.size() == params_.size() + 1, "the peer's state has {} tensors, this optimizer needs {}",
               state->tensors.size(), params_.size() + 1);
    for (std::size_t i = 0; i < params_.size(); ++i)
      HIVE_CHECK(state->tensors[i].sizes() == params_[i].sizes(), "parameter {} of the peer's state has another shape", i);
    std::lock_guard state_lock(state_mutex_);
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < params_.size(); ++i) params_[i].detach().copy_(state->tensors[i]);
    load_optimizer_state(inner_, state->tensors.back());
    std::lock_guard lock(mutex_);
    const nlohmann::json step = state->metadata.is_object() ? state->metadata.value("step", nlohmann::json(0)) : nlohmann::json(0);
    stats_.local_step = step.is_number_unsigned() ? step.template get<std::size_t>() : 0;
    last_round_step_ = stats_.local_step;
    // A round that finished before the download averaged the old parameters: drop it.
    params_pending_ = grads_pending_ = result_ready_ = false;
    return true;
  }

  /// The wrapped optimizer.
  [[nodiscard]] torch::optim::Optimizer& inner() noexcept { return inner_; }
  /// The averager (its tensors are this optimizer's copies, not the parameters).
  [[nodiscard]] averager_type& averager() noexcept { return *averager_; }
  /// Local steps, rounds and their outcomes.
  [[nodiscard]] DecentralizedStats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  /// Local steps taken (restored by load_state_from_peers).
  [[nodiscard]] std::size_t local_step() const { return stats().local_step; }
  /// True while a round runs in the background.
  [[nodiscard]] bool round_running() const {
    std::lock_guard lock(mutex_);
    return round_requested_ || round_running_;
  }
  /// Waits until no round runs (or `timeout`), then applies a finished round's parameters
  /// (averaged gradients wait for the next step()); true when idle.
  bool wait_for_round(Seconds timeout) {
    {
      std::unique_lock lock(mutex_);
      if (!idle_cv_.wait_for(lock, timeout, [this] { return !round_requested_ && !round_running_; })) return false;
    }
    std::lock_guard state_lock(state_mutex_);
    at::NoGradGuard no_grad;
    apply_finished(false);
    return true;
  }

  /// Averages now, in the calling thread: waits for a background round to finish (applying
  /// it), then looks for a group and averages the current tensors with it, so that the
  /// parameters are the group's average when it succeeds. Useful at the end of training, when
  /// every peer calls it.
  averaging::StepResult average_now() {
    if (!wait_for_round(options_.averager().matchmaking_time() + options_.averager().allreduce_timeout())) {
      averaging::StepResult busy;
      busy.error = "a background round is still running";
      busy.code = errc::timeout;
      return busy;
    }
    // The state lock is not held while the round runs: a peer downloading this one's state
    // takes it on the DHT's io thread, which the round needs.
    {
      std::lock_guard state_lock(state_mutex_);
      at::NoGradGuard no_grad;
      apply_finished(true);  // the last round's gradients, before the buffers are reused
      std::lock_guard tensors_lock(averager_->tensors_mutex());
      copy_to_buffers();
    }
    const auto step = local_step();
    if (options_.verbose()) log::info("optim", "Starting a new averaging round with current parameters (step {})", step);
    auto r = averager_->step(1.0, nlohmann::json{{"step", step}});
    log_result(r);
    if (r.ok) {
      std::lock_guard state_lock(state_mutex_);
      std::lock_guard tensors_lock(averager_->tensors_mutex());
      at::NoGradGuard no_grad;
      std::size_t b = 0;
      for (auto& p : params_) {
        if (options_.average_parameters()) p.detach().copy_(buffers_[b++]);
        if (options_.average_gradients()) {
          if (p.grad().defined()) p.grad().copy_(buffers_[b]);
          ++b;
        }
      }
    }
    std::lock_guard lock(mutex_);
    ++stats_.rounds;
    if (r.ok) {
      ++stats_.averaged;
      stats_.last_group_size = r.group_size;
    } else {
      ++stats_.failed;
    }
    return r;
  }

  /// Stops the background thread and the averager; idempotent.
  void shutdown() {
    {
      std::lock_guard lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
    }
    averager_->shutdown();
    cv_.notify_all();
    if (worker_.joinable()) worker_.join();
  }

 private:
  // p += average - sent, for the parameters or the gradients, once per finished round.
  void apply_finished(bool gradients) {
    std::lock_guard lock(mutex_);
    bool& pending = gradients ? grads_pending_ : params_pending_;
    if (!pending) return;
    pending = false;
    if (!params_pending_ && !grads_pending_) result_ready_ = false;
    std::lock_guard tensors_lock(averager_->tensors_mutex());
    std::size_t b = 0;
    for (auto& p : params_) {
      if (options_.average_parameters()) {
        if (!gradients) p.detach().add_(buffers_[b] - sent_[b]);
        ++b;
      }
      if (options_.average_gradients()) {
        if (gradients && p.grad().defined()) p.grad().add_(buffers_[b] - sent_[b]);
        ++b;
      }
    }
  }

  void maybe_start_round() {
    const auto now = SteadyClock::now();
    std::unique_lock lock(mutex_);
    if (stopped_ || round_requested_ || round_running_ || result_ready_) return;
    if (stats_.local_step - last_round_step_ < options_.averaging_steps_period() && stats_.rounds > 0) return;
    if (options_.averaging_time_period() > Seconds(0) && stats_.rounds > 0 &&
        now - last_round_time_ < std::chrono::duration_cast<SteadyClock::duration>(options_.averaging_time_period()))
      return;
    {
      std::lock_guard tensors_lock(averager_->tensors_mutex());
      copy_to_buffers();
      sent_.clear();
      for (const auto& t : buffers_) sent_.push_back(t.clone());
    }
    last_round_step_ = stats_.local_step;
    last_round_time_ = now;
    ++stats_.rounds;
    round_requested_ = true;
    const auto step = stats_.local_step;
    lock.unlock();
    if (options_.share_state() && !averager_->client_mode()) averager_->set_state_priority(static_cast<double>(step));
    cv_.notify_all();
  }

  // The averager's tensors := the parameters (and gradients); hold its tensors_mutex.
  void copy_to_buffers() {
    std::size_t b = 0;
    for (auto& p : params_) {
      if (options_.average_parameters()) buffers_[b++].copy_(p.detach());
      if (options_.average_gradients()) {
        if (p.grad().defined()) buffers_[b].copy_(p.grad());
        else buffers_[b].zero_();
        ++b;
      }
    }
  }

  void log_result(const averaging::StepResult& r) const {
    if (!options_.verbose()) return;
    if (r.ok)
      log::info("optim", "Finished averaging round with {} peers ({:.2f} s matchmaking, {:.2f} s all-reduce)", r.group_size,
                r.matchmaking_s, r.allreduce_s);
    else
      log::info("optim", "Averaging round failed: {}", r.error);
  }

  void background() {
    std::unique_lock lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this] { return stopped_ || round_requested_; });
      if (stopped_) break;
      round_requested_ = false;
      round_running_ = true;
      const auto step = stats_.local_step;
      lock.unlock();
      if (options_.verbose()) log::info("optim", "Starting a new averaging round with current parameters (step {})", step);
      averaging::StepResult r;
      try {
        r = averager_->step(1.0, nlohmann::json{{"step", step}});
      } catch (const std::exception& e) {
        r.error = e.what();
        r.code = errc::round_failed;
      }
      log_result(r);
      lock.lock();
      round_running_ = false;
      params_pending_ = r.ok && options_.average_parameters();
      grads_pending_ = r.ok && options_.average_gradients();
      result_ready_ = params_pending_ || grads_pending_;
      if (r.ok) {
        ++stats_.averaged;
        stats_.last_group_size = r.group_size;
      } else {
        ++stats_.failed;
      }
      idle_cv_.notify_all();
    }
  }

  averaging::State current_state() {
    std::lock_guard state_lock(state_mutex_);
    averaging::State s;
    s.metadata = {{"step", stats().local_step}};
    for (const auto& p : params_) s.tensors.push_back(p.detach().clone());
    s.tensors.push_back(optimizer_state_bytes(inner_));
    return s;
  }

  torch::optim::Optimizer& inner_;
  DecentralizedOptions options_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> buffers_;  // the averager's tensors
  std::vector<at::Tensor> sent_;     // what the running round sent
  std::unique_ptr<averager_type> averager_;
  std::mutex state_mutex_;            // the parameters and the wrapped optimizer
  mutable std::mutex mutex_;          // everything below
  std::condition_variable cv_, idle_cv_;
  DecentralizedStats stats_;
  std::size_t last_round_step_ = 0;
  SteadyClock::time_point last_round_time_{};
  // result_ready_: a finished round whose averages are not all applied yet (new rounds wait).
  bool round_requested_ = false, round_running_ = false, result_ready_ = false, stopped_ = false;
  bool params_pending_ = false, grads_pending_ = false;
  std::thread worker_;
};

}  // namespace hive::optim
