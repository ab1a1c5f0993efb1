#pragma once
/// @file
/// serve::Replica: an inference-only peer that follows a training swarm. It downloads the
/// swarm's newest state (the averaging layer's state transfer) every few seconds or when the
/// swarm's step has moved on, swaps it in as a snapshot, and serves it.

#include <hive/fwd.hpp>
#include <hive/averaging/group.hpp>
#include <hive/averaging/state.hpp>
#include <hive/serve/server.hpp>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

namespace hive::serve {

/// Run-time knobs of a Replica.
struct ReplicaOptions {
  /// The replica's DHT peer: it joins the swarm through initial_peers and must accept
  /// connections (clients call it).
  HIVE_ARG(DHTOptions, dht, DHTOptions{});
  /// The endpoint: prefix (the swarm's averaging prefix, required), batching, threads. Its
  /// role is always "replica".
  HIVE_ARG(InferenceOptions, serving, InferenceOptions{});
  /// Download the swarm's state at least this often.
  HIVE_ARG(Seconds, every_seconds, Seconds(10));
  /// Also download when the swarm's training endpoints declare a step this many ahead of the
  /// replica's; 0: by time only.
  HIVE_ARG(std::uint64_t, every_steps, 0);
  /// How often the swarm's declared step is read (every_steps) and the schedule checked.
  HIVE_ARG(Seconds, poll_period, Seconds(1));
  /// Longest one download may take.
  HIVE_ARG(Seconds, download_timeout, Seconds(30));
  HIVE_OPTIONS_JSON(ReplicaOptions, dht, serving, every_seconds, every_steps, poll_period, download_timeout)
};

/// Counters of a Replica.
struct ReplicaStats {
  /// States downloaded and installed.
  std::uint64_t downloads = 0;
  /// Downloads that failed or found no sharing peer.
  std::uint64_t failed = 0;
  /// The step served now.
  std::uint64_t step = 0;
  /// The highest step the swarm's training endpoints declared at the last poll.
  std::uint64_t swarm_step = 0;
  /// Seconds the last download took.
  double last_download_seconds = 0;
};

/// An inference-only peer of a training swarm.
///
/// It owns a DHT peer, a Publisher over its own copy of the model and an InferenceServer
/// (role "replica"), and follows the swarm: at start, every every_seconds, and whenever the
/// training endpoints under `prefix.serve` declare a step every_steps ahead, it downloads the
/// state that the swarm's peers share under `prefix.all_averagers` (parameters, in the order
/// of Module::parameters()) and installs it as a snapshot; requests in flight finish on the
/// snapshot they started with. Buffers (batch-norm statistics) are not part of the shared
/// state: the replica keeps its own.
///
/// @tparam M the module holder type (the same architecture the swarm trains)
/// @tparam T the net::Transport policy
/// @tparam R the dht::Routing policy
/// @tparam S the moe::Scheduler policy
/// @par Example
/// @code
/// hive::serve::Replica<torch::nn::Sequential> replica(fashion_model(), hive::moe::TensorSchema{at::kFloat, {784}},
///     hive::serve::ReplicaOptions()
///         .dht(hive::DHTOptions().initial_peers({"10.0.0.1:4000"}).listen_on("0.0.0.0:5000"))
///         .serving(hive::serve::InferenceOptions().prefix("averaging_peer"))
///         .every_seconds(hive::Seconds(5)));
/// @endcode
/// @par Thread safety
/// The constructor starts following and serving; shutdown() (also the destructor) stops.
/// update() and the accessors from any thread but the replica's own.
template <class M, class T, class R, class S>
class Replica {
 public:
  /// The DHT peer type.
  using dht_type = BasicDHT<T, R>;
  /// The endpoint type.
  using server_type = InferenceServer<M, T, R, S>;

  /// Joins the swarm, downloads its state once (serving the model's own weights as step 0
  /// when no peer shares one yet), and starts serving and following.
  Replica(M model, moe::TensorSchema input, ReplicaOptions options,
          std::optional<typename T::Options> transport_options = std::nullopt)
      : options_(std::move(options)) {
    HIVE_CHECK(!options_.serving().prefix().empty(), "ReplicaOptions::serving().prefix (the swarm's name) is required");
    HIVE_CHECK(!options_.dht().client_mode(), "a replica serves clients: dht.client_mode must be false");
    HIVE_CHECK(options_.every_seconds() > Seconds(0), "every_seconds must be positive");
    HIVE_CHECK(options_.poll_period() > Seconds(0), "poll_period must be positive");
    options_.serving().role("replica");
    dht_ = std::make_unique<dht_type>(options_.dht(), std::move(transport_options));
    publisher_ = std::make_unique<Publisher<M>>(std::move(model), PublisherOptions().every_steps(0).every_seconds(Seconds(0)));
    sharing_ = std::make_shared<averaging::StateSharing<T, R>>(
        dht_->node(), averaging::GroupKeys(options_.serving().prefix(), "").state_key(), std::string(),
        averaging::StateSharingOptions(), averaging::method_for(averaging::state_method, options_.serving().prefix()));
    update();
    server_ = std::make_unique<server_type>(*publisher_, *dht_, std::move(input), options_.serving());
    follower_ = std::thread([this] { follow(); });
  }
  Replica(const Replica&) = delete;
  Replica& operator=(const Replica&) = delete;
  /// Stops; see shutdown().
  ~Replica() { shutdown(); }

  /// Stops following and serving, then the DHT peer. Idempotent.
  void shutdown() {
    {
      std::lock_guard lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
    }
    stop_cv_.notify_all();
    if (follower_.joinable()) follower_.join();
    if (server_) server_->shutdown();
    if (sharing_) hive::detail::run_blocking_on(dht_->node()->rpc()->get_executor(), [&] { sharing_->close(); });
    if (dht_) dht_->shutdown();
  }

  /// Downloads the swarm's state now and installs it; false when no peer shares one, the
  /// download failed, or the state does not fit the model (each logged).
  bool update() {
    std::lock_guard update_lock(update_mutex_);
    const auto start = SteadyClock::now();
    last_attempt_ = start;
    std::optional<averaging::State> state;
    try {
      state = sharing_->async_download(options_.download_timeout(), asio::use_future).get();
    } catch (const std::exception& e) {
      log::warn("serve", "replica: downloading the swarm's state failed: {}", e.what());
    }
    bool installed = false;
    if (state) {
      const auto n = publisher_->model()->parameters().size();
      try {
        HIVE_CHECK(state->tensors.size() >= n, "the swarm's state has {} tensors, the model {} parameters",
                   state->tensors.size(), n);
        const nlohmann::json step = state->metadata.is_object() ? state->metadata.value("step", nlohmann::json(0)) : nlohmann::json(0);
        state->tensors.resize(n);  // parameters first; the optimizer's state follows
        auto s = publisher_->install(step.is_number_unsigned() ? step.get<std::uint64_t>() : 0, std::move(state->tensors));
        installed = true;
        log::info("serve", "replica: serving the swarm's state of step {}", s->step);
      } catch (const std::exception& e) {
        log::error("serve", "replica: the swarm's state does not fit this model: {}", e.what());
      }
    } else {
      log::warn("serve", "replica: no peer of '{}' shares its state yet", options_.serving().prefix());
    }
    std::lock_guard lock(mutex_);
    if (installed) {
      ++stats_.downloads;
      stats_.last_download_seconds = std::chrono::duration<double>(SteadyClock::now() - start).count();
    } else {
      ++stats_.failed;
    }
    stats_.step = publisher_->step();
    return installed;
  }

  /// Where clients call the replica.
  [[nodiscard]] const std::string& address() const { return server_->address(); }
  /// The address other peers join the swarm through.
  [[nodiscard]] std::string dht_address() const { return dht_->visible_addresses().at(0); }
  /// Downloads and the steps served.
  [[nodiscard]] ReplicaStats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  /// The DHT peer.
  [[nodiscard]] dht_type& dht() noexcept { return *dht_; }
  /// The publisher of the downloaded snapshots.
  [[nodiscard]] Publisher<M>& publisher() noexcept { return *publisher_; }
  /// The endpoint.
  [[nodiscard]] server_type& server() noexcept { return *server_; }
  /// The options.
  [[nodiscard]] const ReplicaOptions& options() const noexcept { return options_; }

 private:
  // The highest step the swarm's training endpoints declare (0 when none does).
  std::uint64_t swarm_step() {
    std::uint64_t best = 0;
    if (auto record = dht_->get(endpoints_key(options_.serving().prefix()), true))
      for (const auto& [subkey, v] : record->dictionary) {
        if (!v.value.is_object() || v.value.value("role", std::string()) == "replica") continue;
        const auto step = v.value.value("step", nlohmann::json(0));
        if (step.is_number_unsigned()) best = std::max(best, step.template get<std::uint64_t>());
      }
    return best;
  }

  void follow() {
    const auto poll = std::chrono::duration_cast<SteadyClock::duration>(options_.poll_period());
    const auto every = std::chrono::duration_cast<SteadyClock::duration>(options_.every_seconds());
    std::unique_lock lock(mutex_);
    while (!stopped_) {
      if (stop_cv_.wait_for(lock, poll, [this] { return stopped_; })) break;
      lock.unlock();
      try {
        bool due = SteadyClock::now() - last_attempt_.load() >= every;
        if (options_.every_steps() > 0) {
          const auto swarm = swarm_step();
          {
            std::lock_guard stats_lock(mutex_);
            stats_.swarm_step = swarm;
          }
          // At most one such download a second: a sharing peer serves every download that
          // starts within a second of another from the same copy of its state.
          due = due || (swarm >= publisher_->step() + options_.every_steps() &&
                        SteadyClock::now() - last_attempt_.load() >= std::chrono::seconds(1));
        }
        if (due) update();
      } catch (const std::exception& e) {
        log::warn("serve", "replica: following the swarm failed: {}", e.what());
      }
      lock.lock();
    }
  }

  ReplicaOptions options_;
  std::unique_ptr<dht_type> dht_;
  std::unique_ptr<Publisher<M>> publisher_;
  std::shared_ptr<averaging::StateSharing<T, R>> sharing_;
  std::unique_ptr<server_type> server_;
  mutable std::mutex mutex_;
  std::mutex update_mutex_;
  std::condition_variable stop_cv_;
  bool stopped_ = false;
  std::atomic<SteadyClock::time_point> last_attempt_{SteadyClock::time_point{}};
  ReplicaStats stats_;
  std::thread follower_;
};

}  // namespace hive::serve
