#pragma once
/// @file
/// CollaborativeOptimizer: the swarm makes one optimizer step each time all peers together
/// have processed target_batch_size samples (hivemind's Optimizer), so that training matches
/// large-batch training however many peers come and go.
///
/// Over 400 lines because the epoch's end has four forms (in step(), delayed to a background
/// averaging, an optimizer step on offloaded parameters, or an auxiliary peer's loop) that
/// share the same buffers and locks.

#include <hive/fwd.hpp>
#include <hive/averaging/averager.hpp>
#include <hive/averaging/powersgd.hpp>
#include <hive/optim/decentralized.hpp>
#include <hive/optim/progress.hpp>

#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace hive::optim {

/// Run-time knobs of a CollaborativeOptimizer (hivemind's Optimizer arguments and defaults).
struct CollaborativeOptions {
  /// Name of the run: the DHT keys are `<run_id>_progress`, `<run_id>_grad_averager` (or
  /// `<run_id>_powersgd_grad_averager`) and `<run_id>_state_averager`.
  HIVE_ARG(std::string, run_id, "");
  /// Samples the whole swarm processes per optimizer step (a global epoch).
  HIVE_ARG(std::int64_t, target_batch_size, 4096);
  /// Samples of one step() call when step() is called without a batch size (0: pass it).
  HIVE_ARG(std::int64_t, batch_size_per_step, 0);
  /// How long peers look for each other to average, at each epoch's end.
  HIVE_ARG(Seconds, matchmaking_time, Seconds(15));
  /// Bound on one all-reduce.
  HIVE_ARG(Seconds, averaging_timeout, Seconds(60));
  /// Bound on downloading the state of a peer when this one is behind (or new).
  HIVE_ARG(Seconds, load_state_timeout, Seconds(600));
  /// Average the parameters with peers every this many epochs, in the background, after the
  /// step (0: never; the gradients are averaged at every epoch regardless).
  HIVE_ARG(std::size_t, average_state_every, 1);
  /// Average the gradients in the background while training goes on; the optimizer step
  /// happens in the first step() after the round finished, so each step applies gradients
  /// computed on parameters one step old (as in hivemind). Stale gradients need a gentler
  /// optimizer: one machine with one-step-old gradients reaches 22.8% instead of 81.25% at
  /// lr 0.2 and momentum 0.9, 81.4% instead of 82.9% at lr 0.05 and momentum 0.5.
  HIVE_ARG(bool, delay_grad_averaging, false);
  /// Run the wrapped optimizer's step in the background, on an offloaded copy of the
  /// parameters (the optimizer is moved onto the copy at construction, so it must not have
  /// stepped yet); the next step() adds the change to the model's parameters. With
  /// delay_grad_averaging the round and the step both overlap the next epoch's compute.
  HIVE_ARG(bool, delay_optimizer_step, false);
  /// Compression of the averaged gradients (with power_sgd_rank > 0: of the P and Q factors).
  HIVE_ARG(Compression, grad_compression, Compression::none);
  /// Compression of the averaged parameters.
  HIVE_ARG(Compression, state_compression, Compression::none);
  /// Average the gradients with PowerSGD of this rank (0: plain averaging).
  HIVE_ARG(std::int64_t, power_sgd_rank, 0);
  /// Train without accepting connections (send and receive only; implied by a client-mode DHT).
  HIVE_ARG(bool, client_mode, false);
  /// Train nothing: only reduce parts of the others' gradient rounds (call run_auxiliary()).
  HIVE_ARG(bool, auxiliary, false);
  /// Log each epoch: global epoch, peers, swarm samples/s, the round, the ETA of the next.
  HIVE_ARG(bool, verbose, false);
  /// The averagers' other knobs (group sizes, timeouts, part size, bandwidth, ...); their
  /// prefix, matchmaking_time, allreduce_timeout, compression, client_mode and auxiliary are
  /// set from the options above.
  HIVE_ARG(averaging::AveragerOptions, averager, averaging::AveragerOptions().target_group_size(256));
  /// The progress tracker's refresh periods and expiration (its key and target are set from
  /// run_id and target_batch_size).
  HIVE_ARG(ProgressOptions, progress, ProgressOptions{});
  HIVE_OPTIONS_JSON(CollaborativeOptions, run_id, target_batch_size, batch_size_per_step, matchmaking_time, averaging_timeout,
                    load_state_timeout, average_state_every, delay_grad_averaging, delay_optimizer_step, grad_compression, state_compression,
                    power_sgd_rank, client_mode, auxiliary, verbose, averager, progress)
};

/// Counters of a CollaborativeOptimizer.
struct CollaborativeStats {
  /// This peer's epoch (optimizer steps of the swarm it took part in or loaded).
  std::int64_t epoch = 0;
  /// Samples accumulated towards the next epoch.
  std::int64_t samples = 0;
  /// Gradient rounds: averaged (completely or partly), failed (local gradients were used).
  std::size_t grad_rounds = 0, grad_averaged = 0, grad_failed = 0;
  /// Parameter rounds averaged and failed.
  std::size_t state_averaged = 0, state_failed = 0;
  /// States downloaded from peers (a newcomer, or a peer that fell behind).
  std::size_t states_loaded = 0;
  /// Group size of the last gradient round.
  std::size_t last_group_size = 0;
};

/// Wraps a torch optimizer so that a swarm takes one step per target_batch_size samples.
///
/// step(batch_size) accumulates the gradients (weighted by samples) and reports the samples to
/// a ProgressTracker. When the swarm's samples reach target_batch_size, every peer averages its
/// mean gradient with the others, weighted by its samples (the exact large-batch gradient when
/// all take part), runs the wrapped optimizer's step and the scheduler, and enters the next
/// epoch. A peer whose epoch is behind the swarm's downloads the state (parameters, optimizer
/// state, epoch) from a peer before going on; a round that fails uses the local gradients.
///
/// @tparam T, R, A the transport, routing and all-reduce Strategy (deduced from the DHT)
/// @par Example
/// @code
/// torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
/// hive::optim::CollaborativeOptimizer opt(sgd, dht, hive::optim::CollaborativeOptions()
///     .run_id("my_run").target_batch_size(4096).batch_size_per_step(32).verbose(true));
/// for (auto& batch : data) { opt.zero_grad(); loss(batch).backward(); opt.step(); }
/// @endcode
/// @par Thread safety
/// step(), zero_grad(), load_state_from_peers() and run_auxiliary() belong to one thread;
/// progress() and stats() may be called from any. The wrapped optimizer and the DHT must
/// outlive this object.
template <class T, class R, class A>
class CollaborativeOptimizer {
  static_assert(averaging::StrategyFor<A, T>, "A's Runner<T> must model averaging::StrategyFor<A, T>");

 public:
  /// The plain gradient and state averager type.
  using averager_type = averaging::DecentralizedAverager<T, R, A>;

  /// Wraps `inner` (its parameters are the model's) and trains through `dht`. `on_epoch` (if
  /// any) is called with the new epoch after each step, as a learning-rate schedule would be.
  /// Throws hive::InvalidArgument for bad options.
  CollaborativeOptimizer(torch::optim::Optimizer& inner, BasicDHT<T, R>& dht, CollaborativeOptions options,
                         std::function<void(std::int64_t)> on_epoch = {})
      : inner_(inner), options_(std::move(options)), on_epoch_(std::move(on_epoch)) {
    HIVE_CHECK(!options_.run_id().empty(), "a collaborative run needs a run_id");
    HIVE_CHECK(options_.target_batch_size() > 0, "target_batch_size must be positive");
    HIVE_CHECK(options_.batch_size_per_step() >= 0, "batch_size_per_step must be >= 0");
    HIVE_CHECK(options_.power_sgd_rank() >= 0, "power_sgd_rank must be >= 0");
    HIVE_CHECK(!(options_.auxiliary() && options_.client_mode()), "an auxiliary peer cannot be in client mode");
    for (const auto& group : inner_.param_groups())
      for (const auto& p : group.params()) params_.push_back(p);
    HIVE_CHECK(!params_.empty(), "the optimizer has no parameters");
    for (const auto& p : params_) {
      accumulated_.push_back(at::zeros_like(p.detach(), at::kFloat));
      grads_.push_back(at::zeros_like(p.detach(), at::kFloat));
      state_.push_back(p.detach().clone());
    }
    if (options_.delay_optimizer_step()) offload();
    const auto& run = options_.run_id();
    auto base = options_.averager();
    base.matchmaking_time(options_.matchmaking_time())
        .allreduce_timeout(options_.averaging_timeout())
        .client_mode(options_.client_mode() || dht.options().client_mode())
        .auxiliary(options_.auxiliary());
    auto grad_options = base;
    // A gradient round is weighted by the samples of one epoch: a peer's rarely exceed the
    // swarm's target, so the bound on the weight others may claim grows with the target.
    grad_options.compression(options_.grad_compression())
        .max_weight(std::max(base.max_weight(), 4.0 * static_cast<double>(options_.target_batch_size())));
    grad_max_weight_ = grad_options.max_weight();
    if (options_.power_sgd_rank() > 0)
      powersgd_ = std::make_unique<averaging::PowerSGDAverager<T, R, A>>(
          dht, grads_, grad_options.prefix(run + "_powersgd_grad_averager"),
          averaging::PowerSGDOptions().rank(options_.power_sgd_rank()));
    else
      grad_averager_ = std::make_unique<averager_type>(dht, grads_, grad_options.prefix(run + "_grad_averager"));
    auto state_options = base;
    state_averager_ = std::make_unique<averager_type>(
        dht, state_, state_options.prefix(run + "_state_averager").compression(options_.state_compression()).auxiliary(false));
    client_mode_ = state_averager_->client_mode();
    auto progress = options_.progress();
    progress.key(run + "_progress").target_batch_size(options_.target_batch_size());
    tracker_ = std::make_unique<ProgressTracker<T, R>>(dht, progress, averaging::schema_hash(params_), client_mode_,
                                                       options_.auxiliary());
    if (!client_mode_ && !options_.auxiliary()) state_averager_->set_state_provider([this] { return current_state(); }, 0);
    worker_ = std::thread([this] { background(); });
    // Delayed gradient rounds and offloaded steps get a thread of their own: behind a
    // parameter round they would miss the others' matchmaking.
    if (options_.delay_grad_averaging() || options_.delay_optimizer_step())
      grad_worker_ = std::thread([this] { background_grads(); });
  }
  CollaborativeOptimizer(const CollaborativeOptimizer&) = delete;
  CollaborativeOptimizer& operator=(const CollaborativeOptimizer&) = delete;
  /// Stops; see shutdown().
  ~CollaborativeOptimizer() { shutdown(); }

  /// Steps the learning-rate `scheduler` once per epoch (after each optimizer step).
  void attach_scheduler(torch::optim::LRScheduler& scheduler) {
    auto previous = on_epoch_;
    on_epoch_ = [previous, &scheduler](std::int64_t epoch) {
      scheduler.step();
      if (previous) previous(epoch);
    };
  }

  /// Accumulates this step's gradients for `batch_size` samples (batch_size_per_step when
  /// -1) and, when the swarm has accumulated target_batch_size, ends the epoch: averages the
  /// gradients with the peers and steps. A peer behind the swarm first loads its state.
  void step(std::int64_t batch_size = -1) {
    HIVE_CHECK(!options_.auxiliary(), "an auxiliary peer trains nothing: call run_auxiliary()");
    if (batch_size < 0) batch_size = options_.batch_size_per_step();
    HIVE_CHECK(batch_size > 0, "step() needs a batch size: pass it, or set batch_size_per_step");
    {
      std::lock_guard state_lock(state_mutex_);
      at::NoGradGuard no_grad;
      for (std::size_t i = 0; i < params_.size(); ++i)
        if (params_[i].grad().defined()) accumulated_[i].add_(params_[i].grad().to(at::kFloat), static_cast<double>(batch_size));
      std::lock_guard lock(mutex_);
      stats_.samples += batch_size;
    }
    apply_finished();
    load_if_missed();
    const auto global = tracker_->progress();
    const auto mine = epoch();
    // One epoch behind while the others average: join them. Further behind, or too late for
    // their round: load their state.
    const bool joining = global.epoch == mine + 1 && wall_time() - global.epoch_started < options_.matchmaking_time().count();
    // A download that did not bring this peer forward is not retried at once (the peer it
    // chose may be behind too, or not yet announce its new epoch).
    if (global.epoch > mine && !joining && SteadyClock::now() >= next_load_) {
      log::info("optim", "{}: this peer is at epoch {}, the swarm at {}: loading the state from peers", options_.run_id(), mine,
                global.epoch);
      load_state_from_peers();
      return;
    }
    tracker_->report(mine, samples());
    if (joining || tracker_->progress().ready()) end_epoch();
  }

  /// Zeroes the gradients of the model's parameters (the wrapped optimizer's own, unless
  /// delay_optimizer_step moved it onto offloaded copies).
  void zero_grad() {
    if (offloaded_.empty()) {
      inner_.zero_grad();
      return;
    }
    for (auto& p : params_)
      if (p.grad().defined()) {
        p.mutable_grad().detach_();
        p.mutable_grad().zero_();
      }
  }

  /// Downloads parameters, optimizer state and epoch from the best peer (within
  /// load_state_timeout); drops the samples accumulated here. False when no peer shares a
  /// state. Throws hive::InvalidArgument when the state does not fit (another model).
  bool load_state_from_peers() {
    wait_background(/*state_too=*/true);  // a parameter round applied later would undo the download
    auto state = state_averager_->load_state_from_peers(options_.load_state_timeout());
    if (!state) {
      log::warn("optim", "{}: no peer shared its state", options_.run_id());
      std::lock_guard lock(mutex_);
      next_load_ = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(2 * options_.matchmaking_time());
      return false;
    }
    HIVE_CHECK(state->tensors.size() == params_.size() + 1, "the peer's state has {} tensors, this optimizer needs {}",
               state->tensors.size(), params_.size() + 1);
    for (std::size_t i = 0; i < params_.size(); ++i)
      HIVE_CHECK(state->tensors[i].sizes() == params_[i].sizes(), "parameter {} of the peer's state has another shape", i);
    const nlohmann::json e = state->metadata.is_object() ? state->metadata.value("epoch", nlohmann::json(0)) : nlohmann::json(0);
    std::lock_guard state_lock(state_mutex_);
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < params_.size(); ++i) params_[i].detach().copy_(state->tensors[i]);
    {
      std::lock_guard optimizer_lock(optimizer_mutex_);
      load_optimizer_state(inner_, state->tensors.back());
    }
    for (auto& a : accumulated_) a.zero_();
    std::lock_guard lock(mutex_);
    const auto before = stats_.epoch;
    stats_.epoch = applied_epoch_ = e.is_number_integer() ? std::max<std::int64_t>(0, e.template get<std::int64_t>()) : 0;
    if (stats_.epoch <= before) next_load_ = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(2 * options_.matchmaking_time());
    stats_.samples = 0;
    ++stats_.states_loaded;
    grad_pending_ = state_pending_ = step_pending_ = false;
    tracker_->report(stats_.epoch, 0);
    return true;
  }

  /// An auxiliary peer's work: follows the swarm's epochs and reduces a part of each gradient
  /// round, until `until` returns true (checked between rounds) or shutdown().
  void run_auxiliary(const std::function<bool()>& until = {}) {
    HIVE_CHECK(options_.auxiliary(), "run_auxiliary() is for an auxiliary peer (CollaborativeOptions::auxiliary)");
    std::int64_t served = -1;  // the last epoch whose round it joined
    while (!stopped() && !(until && until())) {
      const auto g = tracker_->refresh();
      // The round of epoch e runs when the swarm's samples are due, or just after the first
      // peers moved on to e + 1.
      const bool due = g.ready() && served < g.epoch;
      const bool just_ended = served < g.epoch - 1 && wall_time() - g.epoch_started < options_.matchmaking_time().count();
      if (due || just_ended) {
        if (grad_averager_) grad_averager_->set_target_group_size(g.peers);
        if (powersgd_) powersgd_->averager().set_target_group_size(g.peers);
        served = due ? g.epoch : g.epoch - 1;
        const auto r = average_gradients(0, served);
        std::lock_guard lock(mutex_);
        ++stats_.grad_rounds;
        ++(r.ok ? stats_.grad_averaged : stats_.grad_failed);
        if (options_.verbose())
          log::info("optim", "{}: auxiliary round of epoch {}: {}", options_.run_id(), served,
                    r.ok ? fmt::format("averaged with {}", r.group_size) : r.error);
      }
      tracker_->report(g.epoch, 0);
      std::unique_lock lock(mutex_);
      cv_.wait_for(lock, std::chrono::duration<double>(options_.progress().min_refresh_period().count()),
                   [this] { return stopped_; });
    }
  }

  /// The swarm's progress as this peer sees it.
  [[nodiscard]] GlobalProgress progress() const { return tracker_->progress(); }
  /// This peer's counters.
  [[nodiscard]] CollaborativeStats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  /// This peer's epoch.
  [[nodiscard]] std::int64_t epoch() const { return stats().epoch; }
  /// Samples accumulated towards the next epoch.
  [[nodiscard]] std::int64_t samples() const { return stats().samples; }
  /// The wrapped optimizer.
  [[nodiscard]] torch::optim::Optimizer& inner() noexcept { return inner_; }
  /// The progress tracker.
  [[nodiscard]] ProgressTracker<T, R>& tracker() noexcept { return *tracker_; }
  /// The options.
  [[nodiscard]] const CollaborativeOptions& options() const noexcept { return options_; }

  /// Waits for background rounds, stops them, the averagers and the tracker; idempotent.
  void shutdown() {
    {
      std::lock_guard lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
    }
    cv_.notify_all();
    if (grad_averager_) grad_averager_->shutdown();
    if (powersgd_) powersgd_->shutdown();
    state_averager_->shutdown();
    if (worker_.joinable()) worker_.join();
    if (grad_worker_.joinable()) grad_worker_.join();
    tracker_->shutdown();
  }

 private:
  bool stopped() const {
    std::lock_guard lock(mutex_);
    return stopped_;
  }

  // The gradients' round of epoch `ended`: grads_ (the mean gradient) averaged with weight
  // `samples`, only with peers that end the same epoch.
  averaging::StepResult average_gradients(double samples, std::int64_t ended) {
    const nlohmann::json gather = {{"epoch", ended}};
    auto& averager = powersgd_ ? powersgd_->averager() : *grad_averager_;
    averager.set_round_tag(std::to_string(ended));
    return powersgd_ ? powersgd_->step(samples, gather) : grad_averager_->step(samples, gather);
  }
  std::mutex& grads_mutex() { return powersgd_ ? powersgd_->tensors_mutex() : grad_averager_->tensors_mutex(); }

  // The epoch is due: average the mean gradient (here, or on the background thread), step.
  void end_epoch() {
    wait_background(/*state_too=*/false);  // a delayed gradient round of the previous epoch first
    double samples = 0;
    {
      std::lock_guard state_lock(state_mutex_);
      std::lock_guard optimizer_lock(optimizer_mutex_);
      std::lock_guard grads_lock(grads_mutex());
      std::lock_guard lock(mutex_);
      samples = static_cast<double>(stats_.samples);
      for (std::size_t i = 0; i < params_.size(); ++i) {
        grads_[i].copy_(accumulated_[i]);
        if (samples > 0) grads_[i].div_(samples);
        accumulated_[i].zero_();
      }
      // The offloaded step starts from the parameters as they are now; the change it makes is
      // added to them later, whatever a parameter round adds meanwhile.
      for (std::size_t i = 0; i < offloaded_.size(); ++i) {
        offloaded_[i].detach().copy_(params_[i].detach());
        step_base_[i].copy_(params_[i].detach());
      }
      stats_.samples = 0;
      round_epoch_ = stats_.epoch;
      ++stats_.epoch;  // this peer is committed to the step: its new samples count for the next epoch
      round_weight_ = samples;
      round_started_ = SteadyClock::now();
      round_started_wall_ = wall_time();
    }
    const auto global = tracker_->progress();
    round_alone_ = global.peers <= 1;
    // Everyone alive is expected: the round starts as soon as they joined.
    if (grad_averager_) grad_averager_->set_target_group_size(global.peers);
    if (powersgd_) powersgd_->averager().set_target_group_size(global.peers);
    state_averager_->set_target_group_size(global.trainers);
    tracker_->report(epoch(), 0);
    if (options_.delay_grad_averaging()) {
      std::lock_guard lock(mutex_);
      grad_requested_ = true;
      cv_.notify_all();
      return;
    }
    run_grad_round();
    if (!offloaded_.empty()) {
      std::lock_guard lock(mutex_);
      step_requested_ = true;
      cv_.notify_all();
      return;
    }
    {
      std::lock_guard lock(mutex_);
      grad_pending_ = true;
    }
    apply_finished();
    tracker_->report(epoch(), stats().samples);  // the round was a pause, not slow training
    load_if_missed();
  }

  // A failed round whose epoch the others had already ended without this peer: its parameters
  // would now differ from the swarm's, so it loads theirs instead of stepping alone.
  [[nodiscard]] bool missed_round() const {
    const auto g = tracker_->progress();
    return g.trainers > 1 && g.epoch >= epoch() && g.epoch_started < round_started_wall_;
  }
  void load_if_missed() {
    bool load = false;
    {
      std::lock_guard lock(mutex_);
      std::swap(load, load_pending_);
    }
    if (!load) return;
    log::info("optim", "{}: the swarm ended epoch {} without this peer: loading its state", options_.run_id(), round_epoch_);
    load_state_from_peers();
  }

  // Runs the gradient round of the ended epoch (on whichever thread) and records its result.
  void run_grad_round() {
    averaging::StepResult r;
    if (round_alone_) {
      r.error = "no other peer is training";
    } else {
      // Past the bound (a peer far ahead of a slow swarm), it counts as the bound: every member
      // would refuse more.
      if (round_weight_ > grad_max_weight_)
        log::warn("collaborative", "this peer's {} samples of epoch {} count as {} (the averager's max_weight)",
                  round_weight_, round_epoch_, grad_max_weight_);
      r = average_gradients(std::min(round_weight_, grad_max_weight_), round_epoch_);
    }
    std::lock_guard lock(mutex_);
    ++stats_.grad_rounds;
    if (r.ok) {
      ++stats_.grad_averaged;
      stats_.last_group_size = r.group_size;
    } else {
      ++stats_.grad_failed;
    }
    last_round_ = r;
  }

  // delay_optimizer_step: the wrapped optimizer steps the offloaded parameters with the
  // round's gradients (on the background thread); the next step() applies the change.
  void run_offloaded_step() {
    averaging::StepResult round;
    {
      std::lock_guard lock(mutex_);
      round = last_round_;
    }
    if (!round.ok && !round_alone_ && missed_round()) {
      std::lock_guard lock(mutex_);
      load_pending_ = true;  // step() loads the swarm's state instead of stepping alone
      return;
    }
    {
      std::lock_guard optimizer_lock(optimizer_mutex_);
      std::lock_guard grads_lock(grads_mutex());
      at::NoGradGuard no_grad;
      for (std::size_t i = 0; i < offloaded_.size(); ++i)
        offloaded_[i].mutable_grad() = grads_[i].to(offloaded_[i].scalar_type()).clone();
      inner_.step();
    }
    std::lock_guard lock(mutex_);
    step_pending_ = true;
  }

  // Moves the wrapped optimizer onto copies of the parameters (delay_optimizer_step).
  void offload() {
    HIVE_CHECK(inner_.state().empty(),
               "delay_optimizer_step moves the optimizer onto copies of the parameters: give it one that has not stepped yet");
    for (auto& group : inner_.param_groups())
      for (auto& p : group.params()) {
        auto copy = p.detach().clone().requires_grad_(p.requires_grad());
        offloaded_.push_back(copy);
        step_base_.push_back(p.detach().clone());
        p = copy;
      }
  }

  // The optimizer step of a finished gradient round, and the parameters of a finished state
  // round (p += average - sent); on the training thread.
  void apply_finished() {
    bool grads = false, state = false, stepped = false;
    averaging::StepResult round;
    {
      std::lock_guard lock(mutex_);
      std::swap(grads, grad_pending_);
      std::swap(state, state_pending_);
      std::swap(stepped, step_pending_);
      round = last_round_;
    }
    if (grads && !round.ok && !round_alone_ && missed_round()) {
      std::lock_guard lock(mutex_);
      load_pending_ = true;  // step() loads the swarm's state instead of stepping alone
      grads = false;
    }
    if (grads) {
      {
        std::lock_guard state_lock(state_mutex_);
        std::lock_guard optimizer_lock(optimizer_mutex_);
        std::lock_guard grads_lock(grads_mutex());
        at::NoGradGuard no_grad;
        std::vector<at::Tensor> kept;
        for (std::size_t i = 0; i < params_.size(); ++i) {
          kept.push_back(params_[i].grad());
          params_[i].mutable_grad() = grads_[i].to(params_[i].scalar_type()).clone();
        }
        inner_.step();
        for (std::size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = kept[i];
      }
      after_step(round);
    }
    if (stepped) {
      {
        std::lock_guard state_lock(state_mutex_);
        std::lock_guard optimizer_lock(optimizer_mutex_);
        at::NoGradGuard no_grad;
        for (std::size_t i = 0; i < params_.size(); ++i) params_[i].detach().add_(offloaded_[i].detach() - step_base_[i]);
      }
      after_step(round);
    }
    if (state) {
      std::lock_guard state_lock(state_mutex_);
      std::lock_guard tensors_lock(state_averager_->tensors_mutex());
      at::NoGradGuard no_grad;
      for (std::size_t i = 0; i < params_.size(); ++i) params_[i].detach().add_(state_[i] - state_sent_[i]);
    }
  }

  // What follows an optimizer step of the epoch: the state's priority, the schedule, the log
  // line and the parameter round.
  void after_step(const averaging::StepResult& round) {
    const auto e = epoch();
    {
      std::lock_guard lock(mutex_);
      applied_epoch_ = e;
    }
    // Newcomers and peers that fell behind load from the most advanced peer.
    if (!client_mode_) state_averager_->set_state_priority(static_cast<double>(e));
    if (on_epoch_) on_epoch_(e);
    log_epoch(e, round);
    if (options_.average_state_every() > 0 && e % static_cast<std::int64_t>(options_.average_state_every()) == 0 &&
        !round_alone_)
      request_state_round();
  }

  void request_state_round() {
    std::lock_guard state_lock(state_mutex_);
    std::lock_guard tensors_lock(state_averager_->tensors_mutex());
    std::lock_guard lock(mutex_);
    if (state_requested_ || state_running_) return;
    state_sent_.clear();
    for (std::size_t i = 0; i < params_.size(); ++i) {
      state_[i].copy_(params_[i].detach());
      state_sent_.push_back(state_[i].clone());
    }
    state_requested_ = true;
    cv_.notify_all();
  }

  void log_epoch(std::int64_t e, const averaging::StepResult& r) const {
    if (!options_.verbose()) return;
    const auto g = tracker_->progress();
    const double took = std::chrono::duration<double>(SteadyClock::now() - round_started_).count();
    log::info("optim", "{}: epoch {} (swarm {}): {} peers, {:.0f} samples/s, {}, {:.2f} s; next epoch in ~{:.1f} s",
              options_.run_id(), e, g.epoch, g.peers, g.samples_per_second,
              r.ok ? fmt::format("averaged with {}{}", r.group_size, r.complete() ? "" : " (partly)")
                   : fmt::format("local gradients ({})", r.error),
              took, std::isfinite(g.eta_s) ? g.eta_s : -1.0);
  }

  // The delay_grad_averaging and delay_optimizer_step thread: the requested gradient rounds
  // and offloaded steps.
  void background_grads() {
    std::unique_lock lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this] { return stopped_ || grad_requested_ || step_requested_; });
      if (stopped_) break;
      const bool round = grad_requested_;
      lock.unlock();
      if (round) run_grad_round();
      if (!offloaded_.empty()) run_offloaded_step();
      lock.lock();
      if (offloaded_.empty()) grad_pending_ = true;  // the training thread steps
      grad_requested_ = step_requested_ = false;
      idle_cv_.notify_all();
    }
    idle_cv_.notify_all();
  }

  // The background thread: parameter rounds.
  void background() {
    std::unique_lock lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this] { return stopped_ || state_requested_; });
      if (stopped_) break;
      state_requested_ = false;
      state_running_ = true;
      lock.unlock();
      auto r = state_averager_->step(1.0, nlohmann::json{{"epoch", epoch()}});
      lock.lock();
      state_running_ = false;
      if (r.ok) {
        ++stats_.state_averaged;
        state_pending_ = true;
      } else {
        ++stats_.state_failed;
      }
      idle_cv_.notify_all();
    }
    idle_cv_.notify_all();
  }

  // Waits (bounded) until no background gradient round (and, with `state_too`, no parameter
  // round) runs, then applies what finished.
  void wait_background(bool state_too) {
    std::unique_lock lock(mutex_);
    const auto bound = options_.matchmaking_time() + options_.averaging_timeout() + Seconds(5);
    idle_cv_.wait_for(lock, bound, [&] {
      return stopped_ || (!grad_requested_ && !step_requested_ && !(state_too && (state_requested_ || state_running_)));
    });
    lock.unlock();
    apply_finished();
  }

  averaging::State current_state() {
    std::lock_guard state_lock(state_mutex_);
    averaging::State s;
    {
      std::lock_guard lock(mutex_);
      s.metadata = {{"epoch", applied_epoch_}};  // the epoch these parameters are at
    }
    for (const auto& p : params_) s.tensors.push_back(p.detach().clone());
    std::lock_guard optimizer_lock(optimizer_mutex_);
    s.tensors.push_back(optimizer_state_bytes(inner_));
    return s;
  }

 private:
  torch::optim::Optimizer& inner_;
  CollaborativeOptions options_;
  std::function<void(std::int64_t)> on_epoch_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> accumulated_;  // Σ batch_size × gradient, this epoch
  std::vector<at::Tensor> grads_;        // the gradient averager's tensors
  std::vector<at::Tensor> state_;        // the state averager's tensors
  std::vector<at::Tensor> state_sent_;   // what the running state round sent
  std::vector<at::Tensor> offloaded_;    // delay_optimizer_step: the parameters the optimizer steps
  std::vector<at::Tensor> step_base_;    // ... and what they were before its step
  std::unique_ptr<averager_type> grad_averager_;
  std::unique_ptr<averaging::PowerSGDAverager<T, R, A>> powersgd_;
  std::unique_ptr<averager_type> state_averager_;
  std::unique_ptr<ProgressTracker<T, R>> tracker_;
  bool client_mode_ = false;
  std::mutex state_mutex_;      // the parameters and accumulators
  std::mutex optimizer_mutex_;  // the wrapped optimizer and the offloaded parameters
  mutable std::mutex mutex_;  // everything below
  std::condition_variable cv_, idle_cv_;
  CollaborativeStats stats_;
  std::int64_t applied_epoch_ = 0;  // the epoch whose step the parameters hold
  averaging::StepResult last_round_;
  double round_weight_ = 0;
  double grad_max_weight_ = 0;  // the gradient averager's max_weight
  bool round_alone_ = false;
  SteadyClock::time_point round_started_{};
  double round_started_wall_ = 0;
  std::int64_t round_epoch_ = 0;  // the epoch the running gradient round ends
  bool load_pending_ = false;
  SteadyClock::time_point next_load_{};  // no state download before this (after one that brought nothing)
  bool grad_requested_ = false, grad_pending_ = false;
  bool step_requested_ = false, step_pending_ = false;  // delay_optimizer_step
  bool state_requested_ = false, state_running_ = false, state_pending_ = false;
  bool stopped_ = false;
  std::thread worker_, grad_worker_;
};

}  // namespace hive::optim
