#pragma once
/// @file
/// ProgressTracker: each peer of a collaborative run reports its epoch, the samples it has
/// accumulated towards the next one and its samples/s under one DHT key; every peer derives
/// from those reports the global epoch, the samples the swarm has accumulated and when the
/// next epoch will arrive (hivemind's ProgressTracker).

#include <hive/fwd.hpp>
#include <hive/core/clock.hpp>
#include <hive/core/log.hpp>
#include <hive/core/message.hpp>
#include <hive/core/options.hpp>
#include <hive/dht/dht.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace hive::optim {

/// Knobs of a ProgressTracker.
struct ProgressOptions {
  /// The DHT key of the run's reports (CollaborativeOptimizer: `<run_id>_progress`).
  HIVE_ARG(std::string, key, "");
  /// Samples the swarm accumulates per epoch.
  HIVE_ARG(std::int64_t, target_batch_size, 0);
  /// Shortest time between two refreshes (publish this peer's report, fetch the others').
  HIVE_ARG(Seconds, min_refresh_period, Seconds(0.5));
  /// Longest time between two refreshes; in between, the period follows the ETA of the next
  /// epoch (a fifth of it).
  HIVE_ARG(Seconds, max_refresh_period, Seconds(10));
  /// How long a report lives in the DHT: a peer that left stops counting this long after its
  /// last report.
  HIVE_ARG(Seconds, expiration, Seconds(60));
  HIVE_OPTIONS_JSON(ProgressOptions, key, target_batch_size, min_refresh_period, max_refresh_period, expiration)
};

/// One peer's report.
struct PeerProgress {
  /// The reporting peer's id (hex).
  std::string peer;
  /// Its epoch: optimizer steps the swarm made while it took part.
  std::int64_t epoch = 0;
  /// Samples it accumulated towards the next epoch.
  std::int64_t samples = 0;
  /// Its recent rate.
  double samples_per_second = 0;
  /// Wall time of the report.
  double time = 0;
  /// Wall time at which the peer entered its epoch.
  double epoch_started = 0;
  /// Wall time at which it last published (from the record's expiration); a peer that has
  /// not published for 3 × max_refresh_period + 1 s counts as gone.
  double published = 0;
  /// True for a peer that trains nobody can connect to, or an auxiliary one (trains nothing).
  bool client_mode = false, auxiliary = false;
  /// Fingerprint of the model it trains (averaging::schema_hash).
  std::string schema;
};

/// What a peer knows of the swarm.
struct GlobalProgress {
  /// The swarm's epoch (see ProgressTracker for how one peer's report is bounded).
  std::int64_t epoch = 0;
  /// Samples accumulated towards the next epoch by the peers at the global epoch, extrapolated
  /// to now with their rates.
  std::int64_t samples = 0;
  /// Samples per epoch.
  std::int64_t target_batch_size = 0;
  /// Wall time at which the first peer entered the global epoch (this peer's start when it
  /// is alone).
  double epoch_started = 0;
  /// Sum of the rates of the peers at the global epoch.
  double samples_per_second = 0;
  /// Peers whose reports are alive (auxiliary ones included), and those of them that train.
  std::size_t peers = 0, trainers = 0;
  /// Estimated seconds until the next epoch (0 when it is due; infinity when nobody trains).
  double eta_s = 0;
  /// Reports that were clamped (negative samples or rates, a clock far ahead, an epoch out of
  /// reach) and reports of another model under the same key (ignored), in the last refresh.
  std::size_t clamped = 0, mismatched = 0;
  /// True when the swarm has accumulated target_batch_size samples.
  [[nodiscard]] bool ready() const noexcept { return target_batch_size > 0 && samples >= target_batch_size; }
};

/// Reports this peer's progress and tracks the swarm's, through the DHT.
///
/// Each peer stores its report under `key` (subkey: its peer id) whenever its epoch changes,
/// and at least every refresh period; a background thread fetches the others'. The global
/// epoch is the highest reported epoch, but a single peer cannot move it: no report counts
/// beyond one epoch past the second-highest one. Negative samples, rates or epochs count as
/// 0 (each such report is logged once per peer), samples as at most target_batch_size.
/// Reports of a different model (schema) are ignored with a warning; a peer that stopped
/// publishing for 3 × max_refresh_period + 1 s counts as gone.
///
/// @par Thread safety
/// Every member function may be called from any thread but the DHT's io threads.
template <class T, class R>
class ProgressTracker {
 public:
  /// Tracks the run under `options.key()` on `dht` (which must outlive it); this peer trains
  /// a model of fingerprint `schema`. Throws hive::InvalidArgument for bad options.
  ProgressTracker(BasicDHT<T, R>& dht, ProgressOptions options, std::string schema, bool client_mode = false,
                  bool auxiliary = false)
      : dht_(dht), options_(std::move(options)) {
    HIVE_CHECK(!options_.key().empty(), "a progress tracker needs a key");
    HIVE_CHECK(options_.target_batch_size() > 0, "target_batch_size must be positive, got {}", options_.target_batch_size());
    HIVE_CHECK(options_.min_refresh_period() > Seconds(0) && options_.max_refresh_period() >= options_.min_refresh_period(),
               "refresh periods must be positive, min <= max");
    HIVE_CHECK(options_.expiration() > options_.max_refresh_period(), "expiration must exceed max_refresh_period");
    local_.peer = dht.peer_id().hex();
    local_.schema = std::move(schema);
    local_.client_mode = client_mode;
    local_.auxiliary = auxiliary;
    local_.time = local_.epoch_started = epoch_started_ = wall_time();
    worker_ = std::thread([this] { loop(); });
  }
  ProgressTracker(const ProgressTracker&) = delete;
  ProgressTracker& operator=(const ProgressTracker&) = delete;
  /// Stops; see shutdown().
  ~ProgressTracker() { shutdown(); }

  /// This peer's progress: its epoch and the samples accumulated towards the next one. A new
  /// epoch is published at once (in the background); samples with the next refresh. The
  /// samples/s this peer announces is the average rate between consecutive reports over the
  /// last seconds: report again (with the same samples) after a pause that should not count.
  void report(std::int64_t epoch, std::int64_t samples) {
    std::lock_guard lock(mutex_);
    const double now = wall_time();
    if (epoch != local_.epoch) {
      local_.epoch_started = epoch_started_ = now;
      publish_due_ = true;
    } else if (samples > local_.samples) {
      // The rate between two reports, smoothed (an exponential moving average of samples over
      // time, so that short and long steps weigh by their duration). A caller that paused
      // (averaging) reports again when it resumes, so that the pause is not counted.
      const double dt = std::max(1e-4, now - local_.time);
      const double weight = std::min(1.0, dt / rate_window_);
      const double rate = static_cast<double>(samples - local_.samples) / dt;
      local_.samples_per_second =
          local_.samples_per_second > 0 ? (1 - weight) * local_.samples_per_second + weight * rate : rate;
    }
    local_.epoch = epoch;
    local_.samples = samples;
    local_.time = now;
    if (publish_due_) cv_.notify_all();
  }

  /// The swarm's progress as of the last refresh, with this peer's latest report and every
  /// peer's samples extrapolated to now.
  [[nodiscard]] GlobalProgress progress() const {
    std::lock_guard lock(mutex_);
    return compute(wall_time());
  }

  /// Publishes this peer's report and fetches the others' now (blocking); the new progress.
  GlobalProgress refresh() {
    publish_and_fetch();
    return progress();
  }

  /// The reports of the last refresh (this peer's included), as they were read.
  [[nodiscard]] std::vector<PeerProgress> reports() const {
    std::lock_guard lock(mutex_);
    auto out = others_;
    out.push_back(local_);
    return out;
  }

  /// The options.
  [[nodiscard]] const ProgressOptions& options() const noexcept { return options_; }

  /// Stops the background thread; idempotent.
  void shutdown() {
    {
      std::lock_guard lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
    }
    cv_.notify_all();
    if (worker_.joinable()) worker_.join();
  }

 private:
  void loop() {
    std::unique_lock lock(mutex_);
    while (!stopped_) {
      lock.unlock();
      publish_and_fetch();
      lock.lock();
      const auto g = compute(wall_time());
      double period = g.eta_s / 5;
      if (!std::isfinite(period)) period = options_.max_refresh_period().count();
      period = std::clamp(period, options_.min_refresh_period().count(), options_.max_refresh_period().count());
      cv_.wait_for(lock, std::chrono::duration<double>(period), [this] { return stopped_ || publish_due_; });
    }
  }

  void publish_and_fetch() {
    PeerProgress mine;
    {
      std::lock_guard lock(mutex_);
      mine = local_;
      publish_due_ = false;
    }
    const nlohmann::json value = {{"epoch", mine.epoch},
                                  {"samples", mine.samples},
                                  {"samples_per_second", mine.samples_per_second},
                                  {"time", mine.time},
                                  {"started", mine.epoch_started},
                                  {"client_mode", mine.client_mode},
                                  {"auxiliary", mine.auxiliary},
                                  {"schema", mine.schema}};
    try {
      dht_.store(options_.key(), value, wall_time() + options_.expiration().count(), dht::Subkey(mine.peer));
      const std::optional<DHTRecord> record = dht_.get(options_.key(), true);
      std::vector<PeerProgress> others;
      if (record)
        for (const auto& [subkey, v] : record->dictionary) {
          const auto* id = std::get_if<std::string>(&subkey);
          if (!id || *id == mine.peer || !v.value.is_object()) continue;
          PeerProgress p;
          p.peer = *id;
          const auto malformed = [&](std::string_view why) {
            std::lock_guard lock(mutex_);  // warned_
            warn_once(p.peer, fmt::format("progress report of peer {} is malformed ({}): ignored", p.peer, why));
          };
          try {
            p.epoch = integer_field<std::int64_t>(v.value, "epoch", "progress report");
            p.samples = integer_field<std::int64_t>(v.value, "samples", "progress report");
            p.samples_per_second = v.value.at("samples_per_second").template get<double>();
            p.time = v.value.at("time").template get<double>();
            p.epoch_started = v.value.value("started", p.time);
            p.published = v.expiration - options_.expiration().count();
            p.client_mode = v.value.value("client_mode", false);
            p.auxiliary = v.value.value("auxiliary", false);
            p.schema = v.value.value("schema", std::string());
            // The estimates sum and compare these: one NaN or infinity would spoil everyone's.
            if (!std::isfinite(p.samples_per_second) || !std::isfinite(p.time) || !std::isfinite(p.epoch_started))
              throw Error(errc::bad_header, "progress report: a rate or time is not finite");
          } catch (const nlohmann::json::exception& e) {
            malformed(e.what());
            continue;
          } catch (const Error& e) {
            malformed(e.what());
            continue;
          }
          others.push_back(std::move(p));
        }
      std::lock_guard lock(mutex_);
      others_ = std::move(others);
    } catch (const std::exception& e) {
      log::debug("optim", "refreshing the progress of {} failed: {}", options_.key(), e.what());
    }
  }

  // The global view from others_ and local_; holds mutex_.
  GlobalProgress compute(double now) const {
    GlobalProgress g;
    g.target_batch_size = options_.target_batch_size();
    const auto target = options_.target_batch_size();
    std::vector<PeerProgress> all;
    const double gone = now - 3 * options_.max_refresh_period().count() - 1;
    for (auto p : others_) {
      if (p.published < gone) continue;
      if (p.schema != local_.schema) {
        ++g.mismatched;
        warn_once(p.peer, fmt::format("peer {} reports progress under '{}' for another model (schema {}, this peer's {}): "
                                      "ignored; give each model its own run_id",
                                      p.peer, options_.key(), p.schema, local_.schema));
        continue;
      }
      bool clamped = false;
      if (p.epoch < 0) p.epoch = 0, clamped = true;
      if (p.samples < 0) p.samples = 0, clamped = true;
      // More than an epoch's samples: an honest peer that went on training while the others
      // caught up; counted as one epoch's, and not worth a warning.
      p.samples = std::min(p.samples, target);
      if (!std::isfinite(p.samples_per_second) || p.samples_per_second < 0) p.samples_per_second = 0, clamped = true;
      if (!std::isfinite(p.time) || p.time > now + 60) p.time = now, clamped = true;  // a clock far ahead
      if (!std::isfinite(p.epoch_started) || p.epoch_started > p.time) p.epoch_started = p.time, clamped = true;
      if (clamped) {
        ++g.clamped;
        warn_once(p.peer, fmt::format("peer {} reports absurd progress under '{}': clamped", p.peer, options_.key()));
      }
      all.push_back(std::move(p));
    }
    all.push_back(local_);
    // The global epoch: no report counts beyond one past the second-highest epoch.
    std::vector<std::int64_t> epochs;
    for (const auto& p : all)
      if (!p.auxiliary) epochs.push_back(p.epoch);
    std::sort(epochs.begin(), epochs.end(), std::greater<>());
    if (epochs.empty()) {
      g.epoch = local_.epoch;
    } else if (epochs.size() == 1) {
      g.epoch = epochs[0];
    } else {
      g.epoch = std::min(epochs[0], epochs[1] + 1);
      if (epochs[0] > epochs[1] + 1) {
        ++g.clamped;
        warn_once("epoch", fmt::format("a peer under '{}' reports epoch {}, beyond the others' {}: counted as {}", options_.key(),
                                       epochs[0], epochs[1], g.epoch));
      }
    }
    g.epoch = std::max(g.epoch, local_.epoch);
    double samples = 0;
    g.epoch_started = INFINITY;
    for (const auto& p : all) {
      ++g.peers;
      if (p.auxiliary) continue;
      ++g.trainers;
      if (p.epoch != g.epoch) continue;
      g.epoch_started = std::min(g.epoch_started, p.epoch_started);
      const double age = std::clamp(now - p.time, 0.0, options_.expiration().count());
      samples += std::min<double>(static_cast<double>(target), static_cast<double>(p.samples) + p.samples_per_second * age);
      g.samples_per_second += p.samples_per_second;
    }
    if (!std::isfinite(g.epoch_started)) g.epoch_started = local_.epoch_started;
    g.samples = static_cast<std::int64_t>(std::min(samples, 9e18));
    const double left = static_cast<double>(std::max<std::int64_t>(0, target - g.samples));
    g.eta_s = left == 0 ? 0 : g.samples_per_second > 0 ? left / g.samples_per_second : INFINITY;
    return g;
  }

  void warn_once(const std::string& who, const std::string& what) const {
    if (warned_.insert(who).second) log::warn("optim", "{}", what);
  }

  BasicDHT<T, R>& dht_;
  ProgressOptions options_;
  mutable std::mutex mutex_;  // everything below
  std::condition_variable cv_;
  PeerProgress local_;
  double epoch_started_ = 0;
  double rate_window_ = 2.0;  // seconds the samples/s average spans
  std::vector<PeerProgress> others_;
  mutable std::set<std::string> warned_;
  bool publish_due_ = true, stopped_ = false;
  std::thread worker_;
};

}  // namespace hive::optim
