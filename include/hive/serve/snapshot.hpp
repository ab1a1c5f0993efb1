#pragma once
/// @file
/// Consistent weight snapshots for serving while training: the training loop publishes an
/// immutable copy of its model's parameters and buffers; readers hold the copy they started
/// with until they finish, so every prediction comes from exactly one training step.

#include <hive/fwd.hpp>
#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/options.hpp>

#include <torch/nn/module.h>

#include <fmt/ranges.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace hive::serve {

/// Where predictions read the weights from.
enum class Mode {
  /// An immutable copy published after an optimizer step: never a torn read.
  snapshot,
  /// The training tensors themselves: no copy, but a prediction may mix two steps' weights.
  live,
};

/// "snapshot" or "live".
inline void to_json(nlohmann::json& j, Mode m) { j = m == Mode::live ? "live" : "snapshot"; }
/// Reads "snapshot" or "live"; throws hive::InvalidArgument otherwise.
inline void from_json(const nlohmann::json& j, Mode& m) {
  const auto s = j.get<std::string>();
  HIVE_CHECK(s == "snapshot" || s == "live", "a serving mode is \"snapshot\" or \"live\", got \"{}\"", s);
  m = s == "live" ? Mode::live : Mode::snapshot;
}
/// The name of `m` ("snapshot", "live").
inline std::string mode_name(Mode m) { return m == Mode::live ? "live" : "snapshot"; }
/// Parses a mode name; throws hive::InvalidArgument for anything else.
inline Mode parse_mode(const std::string& s) {
  Mode m{};
  from_json(nlohmann::json(s), m);
  return m;
}

namespace detail {

/// Four 32-bit lanes (GCC and Clang vector extensions: SSE2 on x86-64, NEON on ARM).
using U32x4 = std::uint32_t __attribute__((vector_size(16)));

inline std::uint64_t mix64(std::uint64_t h) noexcept {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h;
}

/// The checksum of `n` bytes at `src` continuing from `seed`, copying them to `dst` on the way
/// when Copy: eight Fletcher lanes (sums and sums of sums of 32-bit words, modulo 2^32) folded
/// with a multiply-xorshift. One pass over the bytes, so copying and checksumming together cost
/// about what memcpy costs.
template <bool Copy>
std::uint64_t copy_checksum(unsigned char* dst, const unsigned char* src, std::size_t n, std::uint64_t seed) noexcept {
  U32x4 a0{}, a1{}, b0{}, b1{};
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    U32x4 w0, w1;
    std::memcpy(&w0, src + i, 16);
    std::memcpy(&w1, src + i + 16, 16);
    if constexpr (Copy) {
      std::memcpy(dst + i, &w0, 16);
      std::memcpy(dst + i + 16, &w1, 16);
    }
    a0 += w0;
    a1 += w1;
    b0 += a0;
    b1 += a1;
  }
  std::uint64_t h = mix64(seed ^ (n * 0x9e3779b97f4a7c15ULL));
  for (int j = 0; j < 4; ++j) {
    h = mix64(mix64(h ^ a0[j]) ^ b0[j]);
    h = mix64(mix64(h ^ a1[j]) ^ b1[j]);
  }
  for (; i < n; ++i) {
    if constexpr (Copy) dst[i] = src[i];
    h = mix64(h ^ src[i]);
  }
  return h;
}

}  // namespace detail

/// A 64-bit checksum of `n` bytes continuing from `seed` (see detail::copy_checksum). Not
/// cryptographic: it tells two versions of the same weights apart.
inline std::uint64_t checksum_bytes(const void* data, std::size_t n, std::uint64_t seed = 0) noexcept {
  return detail::copy_checksum<false>(nullptr, static_cast<const unsigned char*>(data), n, seed);
}

/// The checksum of every byte of `tensors` (each made contiguous), in order.
inline std::uint64_t checksum(const std::vector<at::Tensor>& tensors) {
  std::uint64_t h = 0x6869766500000000ULL;  // "hive"
  for (const auto& t : tensors) {
    const auto c = t.contiguous();
    h = checksum_bytes(c.data_ptr(), c.nbytes(), h);
  }
  return h;
}

/// A checksum as it travels in replies: 16 lower-case hex digits.
inline std::string checksum_hex(std::uint64_t c) { return fmt::format("{:016x}", c); }

/// Immutable weights of one training step: the model's parameters then its buffers, in the
/// order of Module::parameters() and Module::buffers().
struct Snapshot {
  /// The training step these weights are from.
  std::uint64_t step = 0;
  /// checksum() of `tensors` (0 for a live view, whose bytes change under it).
  std::uint64_t checksum = 0;
  /// Parameters, then buffers. Never written once published.
  std::vector<at::Tensor> tensors;
  /// When it was published.
  SteadyClock::time_point published{};
  /// True for the live view of the training tensors (Mode::live): no copy, not immutable.
  bool live = false;
};

/// Run-time knobs of a Publisher.
struct PublisherOptions {
  /// Snapshot (a copy per publication) or live (the training tensors, no copy).
  HIVE_ARG(Mode, mode, Mode::snapshot);
  /// Publish after every N-th step; 0: not by step count.
  HIVE_ARG(std::uint64_t, every_steps, 0);
  /// Publish after a step when this long has passed since the last publication; 0: not by time.
  /// Either condition publishes: set the other to 0 for one schedule only.
  HIVE_ARG(Seconds, every_seconds, Seconds(1));
  HIVE_OPTIONS_JSON(PublisherOptions, mode, every_steps, every_seconds)
};

/// Counters of a Publisher.
struct PublisherStats {
  /// Snapshots published.
  std::uint64_t published = 0;
  /// Seconds the last publication took (copy and checksum).
  double last_publish_seconds = 0;
  /// Seconds all publications took.
  double total_publish_seconds = 0;
  /// Bytes of one snapshot.
  std::int64_t bytes = 0;
};

/// Publishes snapshots of a model that trains, for readers on other threads.
///
/// The training thread wraps its optimizer step in step(): the update runs as the only writer
/// (a sequence counter is odd meanwhile, which is how live readers detect a torn read), then
/// the step is counted and, when due (every_steps, every_seconds), the parameters and buffers
/// are copied into one buffer that no reader holds and published. A reader takes current()
/// (a shared pointer: it keeps the snapshot alive while it computes, and no lock is held
/// meanwhile). Buffers of snapshots that no reader holds any more are reused, so publishing
/// costs about one memcpy of the weights and a checksum pass.
///
/// @tparam M a libtorch module holder (torch::nn::Sequential, or a TORCH_MODULE type whose
///         Impl is Cloneable): servers clone it to compute on snapshots.
/// @par Example
/// @code
/// hive::serve::Publisher<torch::nn::Sequential> publisher(
///     model, hive::serve::PublisherOptions().every_steps(10).every_seconds(hive::Seconds(0)));
/// for (auto& [x, y] : batches) {
///   sgd.zero_grad();
///   torch::nn::functional::cross_entropy(model->forward(x), y).backward();
///   publisher.step([&] { sgd.step(); });   // publishes every 10th step
/// }
/// @endcode
/// @par Thread safety
/// step(), begin_update()/end_update() and set_step() on the training thread; publish(),
/// current(), sequence() and the accessors from any thread (publish() waits for a running
/// update to finish).
template <class M>
class Publisher {
 public:
  /// The module holder type.
  using model_type = M;

  /// Publishes snapshots of `model` (shares its tensors; the model must not be moved to another
  /// device or dtype afterwards). Publishes step 0 now, so readers never find nothing.
  explicit Publisher(M model, PublisherOptions options = {}) : model_(std::move(model)), options_(options) {
    HIVE_CHECK(options_.every_seconds() >= Seconds(0), "every_seconds must not be negative");
    for (const auto& p : model_->parameters()) tensors_.push_back(p.detach());
    for (const auto& b : model_->buffers()) tensors_.push_back(b.detach());
    HIVE_CHECK(!tensors_.empty(), "the model has no parameters or buffers to publish");
    for (const auto& t : tensors_) {
      HIVE_CHECK(t.device().is_cpu(), "serve::Publisher copies CPU tensors; a tensor is on {}", t.device().str());
      bytes_ += aligned(static_cast<std::int64_t>(t.nbytes()));
    }
    pool_ = std::make_shared<BufferPool>();
    stats_.bytes = bytes_;
    live_ = std::make_shared<Snapshot>();
    live_->tensors = tensors_;
    live_->live = true;
    mode_.store(options_.mode());
    publish();
  }
  Publisher(const Publisher&) = delete;
  Publisher& operator=(const Publisher&) = delete;

  /// Runs `update` (the optimizer step) as the writer, counts a step, and publishes when due.
  template <class F>
  void step(F&& update) {
    begin_update();
    try {
      std::forward<F>(update)();
    } catch (...) {
      end_update(false);
      throw;
    }
    end_update(true);
  }
  /// Marks the start of an update of the weights (step() calls it): live readers that overlap
  /// it count their reply as torn, publish() waits until end_update().
  void begin_update() {
    update_mutex_.lock();
    sequence_.fetch_add(1, std::memory_order_acq_rel);  // odd: an update runs
  }
  /// Ends an update; `counted` adds a step and publishes when due.
  void end_update(bool counted = true) {
    sequence_.fetch_add(1, std::memory_order_acq_rel);  // even: weights are still
    bool due = false;
    if (counted) {
      const auto s = step_.fetch_add(1, std::memory_order_acq_rel) + 1;
      const auto since = std::chrono::duration<double>(SteadyClock::now() - last_publish_.load()).count();
      due = (options_.every_steps() > 0 && s % options_.every_steps() == 0) ||
            (options_.every_seconds() > Seconds(0) && since >= options_.every_seconds().count());
    }
    if (due && mode() == Mode::snapshot) publish_locked();
    update_mutex_.unlock();
  }
  /// Sets the step counter (after load_state_from_peers, say); publishes nothing.
  void set_step(std::uint64_t step) noexcept { step_.store(step); }

  /// Publishes the current weights now (waits for a running update) and returns the snapshot.
  std::shared_ptr<const Snapshot> publish() {
    std::lock_guard lock(update_mutex_);
    return publish_locked();
  }

  /// Publishes weights that were obtained elsewhere (a replica's download): `parameters` in the
  /// order of Module::parameters(), which this publisher keeps and never writes; the buffers
  /// are copied from the model. Throws hive::InvalidArgument when they do not fit the model.
  std::shared_ptr<const Snapshot> install(std::uint64_t step, std::vector<at::Tensor> parameters) {
    const auto n_params = model_->parameters().size();
    HIVE_CHECK(parameters.size() == n_params, "{} parameters given, the model has {}", parameters.size(), n_params);
    for (std::size_t i = 0; i < n_params; ++i)
      HIVE_CHECK(parameters[i].sizes() == tensors_[i].sizes() && parameters[i].scalar_type() == tensors_[i].scalar_type(),
                 "parameter {} is {}{}, the model's is {}{}", i, c10::toString(parameters[i].scalar_type()),
                 parameters[i].sizes(), c10::toString(tensors_[i].scalar_type()), tensors_[i].sizes());
    auto s = std::make_shared<Snapshot>();
    s->step = step;
    s->tensors = std::move(parameters);
    for (std::size_t i = n_params; i < tensors_.size(); ++i) s->tensors.push_back(tensors_[i].clone());
    s->checksum = hive::serve::checksum(s->tensors);
    s->published = SteadyClock::now();
    std::lock_guard lock(update_mutex_);
    step_.store(step);
    return install_locked(std::move(s), 0);
  }

  /// What a reader computes from now: the newest snapshot, or the live view in Mode::live.
  [[nodiscard]] std::shared_ptr<const Snapshot> current() const {
    if (mode() == Mode::live) return live_;
    std::lock_guard lock(current_mutex_);
    return current_;
  }
  /// The newest published snapshot, whatever the mode.
  [[nodiscard]] std::shared_ptr<const Snapshot> latest() const {
    std::lock_guard lock(current_mutex_);
    return current_;
  }
  /// Even while the weights are still, odd while an update runs; changes with every update.
  [[nodiscard]] std::uint64_t sequence() const noexcept { return sequence_.load(std::memory_order_acquire); }
  /// Steps counted so far.
  [[nodiscard]] std::uint64_t step() const noexcept { return step_.load(std::memory_order_acquire); }
  /// The serving mode.
  [[nodiscard]] Mode mode() const noexcept { return mode_.load(); }
  /// Switches between snapshot and live serving (takes effect with the next batch); switching
  /// to snapshots publishes the current weights first (waiting for a running update).
  void set_mode(Mode mode) {
    if (mode == Mode::snapshot && mode_.load() == Mode::live) {
      std::lock_guard lock(update_mutex_);
      publish_locked();
    }
    mode_.store(mode);
  }
  /// The model (shared with the training loop).
  [[nodiscard]] const M& model() const noexcept { return model_; }
  /// Bytes of one snapshot.
  [[nodiscard]] std::int64_t bytes() const noexcept { return bytes_; }
  /// Publications and their cost.
  [[nodiscard]] PublisherStats stats() const {
    std::lock_guard lock(current_mutex_);
    return stats_;
  }
  /// Calls `f` with every snapshot published from now on (on the publishing thread, so keep it
  /// short); tests and benchmarks record checksums with it.
  void on_publish(std::function<void(const std::shared_ptr<const Snapshot>&)> f) {
    std::lock_guard lock(update_mutex_);
    on_publish_ = std::move(f);
  }

 private:
  // One snapshot's storage: a flat byte buffer and the tensors that view it (made once).
  struct Buffer {
    at::Tensor flat;
    std::vector<at::Tensor> views;
  };
  // Buffers of snapshots that no reader holds any more, ready for the next publication.
  struct BufferPool {
    std::mutex mutex;
    std::vector<Buffer> free;
  };

  static std::int64_t aligned(std::int64_t n) { return (n + 63) / 64 * 64; }

  std::shared_ptr<const Snapshot> publish_locked() {
    const auto start = SteadyClock::now();
    Buffer buffer;
    {
      std::lock_guard lock(pool_->mutex);
      if (!pool_->free.empty()) {
        buffer = std::move(pool_->free.back());
        pool_->free.pop_back();
      }
    }
    auto* base = buffer.flat.defined() ? static_cast<unsigned char*>(buffer.flat.data_ptr()) : nullptr;
    if (!base) {
      buffer.flat = at::empty({std::max<std::int64_t>(bytes_, 1)}, at::kByte);
      base = static_cast<unsigned char*>(buffer.flat.data_ptr());
      std::int64_t offset = 0;
      for (const auto& t : tensors_) {
        // Views only: the buffer outlives them (it returns to the pool after its snapshot).
        buffer.views.push_back(at::from_blob(base + offset, t.sizes(), [](void*) {}, t.options()));
        offset += aligned(static_cast<std::int64_t>(t.nbytes()));
      }
    }
    auto s = std::make_shared<Snapshot>();
    s->step = step_.load();
    std::int64_t offset = 0;
    std::uint64_t h = 0x6869766500000000ULL;
    for (const auto& t : tensors_) {
      const auto src = t.contiguous();
      const auto n = static_cast<std::size_t>(src.nbytes());
      h = detail::copy_checksum<true>(base + offset, static_cast<const unsigned char*>(src.data_ptr()), n, h);
      offset += aligned(static_cast<std::int64_t>(n));
    }
    s->tensors = buffer.views;
    s->checksum = h;
    s->published = SteadyClock::now();
    const double seconds = std::chrono::duration<double>(s->published - start).count();
    return install_locked(std::move(s), seconds, std::move(buffer));
  }

  // Publishes `s`; when it lives in `buffer`, the buffer returns to the pool once no reader holds it.
  std::shared_ptr<const Snapshot> install_locked(std::shared_ptr<Snapshot> s, double seconds, Buffer buffer = {}) {
    std::shared_ptr<const Snapshot> published;
    if (buffer.flat.defined()) {
      std::weak_ptr<BufferPool> pool = pool_;
      auto* raw = s.get();
      // The aliasing deleter: the views die with the snapshot, then the buffer goes back.
      published = std::shared_ptr<const Snapshot>(raw, [keep = std::move(s), buffer = std::move(buffer), pool](const Snapshot*) mutable {
        keep.reset();
        if (auto p = pool.lock()) {
          std::lock_guard lock(p->mutex);
          if (p->free.size() < 4) p->free.push_back(std::move(buffer));
        }
      });
    } else {
      published = std::move(s);
    }
    last_publish_.store(published->published);
    {
      std::lock_guard lock(current_mutex_);
      current_ = published;
      ++stats_.published;
      stats_.last_publish_seconds = seconds;
      stats_.total_publish_seconds += seconds;
    }
    if (on_publish_) on_publish_(published);
    return published;
  }

  M model_;
  PublisherOptions options_;
  std::vector<at::Tensor> tensors_;  // the training tensors (detached aliases)
  std::int64_t bytes_ = 0;
  std::shared_ptr<BufferPool> pool_;
  std::shared_ptr<Snapshot> live_;
  std::atomic<Mode> mode_{Mode::snapshot};
  std::atomic<std::uint64_t> sequence_{0};
  std::atomic<std::uint64_t> step_{0};
  std::atomic<SteadyClock::time_point> last_publish_{SteadyClock::time_point{}};
  std::mutex update_mutex_;  // the writer: an update, or a publication
  mutable std::mutex current_mutex_;
  std::shared_ptr<const Snapshot> current_;
  PublisherStats stats_;
  std::function<void(const std::shared_ptr<const Snapshot>&)> on_publish_;
};

}  // namespace hive::serve
