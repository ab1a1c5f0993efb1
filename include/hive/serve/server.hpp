#pragma once
/// @file
/// serve::InferenceServer: answers prediction requests on a peer (a training peer, or a
/// replica), batching them through the scheduler policy and computing each batch from one
/// published snapshot on threads that are not the training thread.

#include <hive/fwd.hpp>
#include <hive/core/log.hpp>
#include <hive/core/tensor_codec.hpp>
#include <hive/dht/dht.hpp>
#include <hive/moe/scheduler.hpp>
#include <hive/moe/schema.hpp>
#include <hive/serve/snapshot.hpp>

#include <ATen/Parallel.h>

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace hive::serve {

/// Method that answers a batch of inputs with the model's outputs (docs/protocol.md).
inline constexpr std::string_view predict_method = "serve.predict";
/// Method that describes an endpoint: input schema, batch limit, step, mode, load.
inline constexpr std::string_view info_method = "serve.info";

/// The DHT key under which a run's inference endpoints are declared (subkey: the address).
inline std::string endpoints_key(std::string_view prefix) { return fmt::format("{}.serve", prefix); }

/// Run-time knobs of an InferenceServer.
struct InferenceOptions {
  /// The run's name: endpoints are declared under `prefix.serve` (the averaging prefix of the
  /// training swarm, so that clients and replicas find both). Required.
  HIVE_ARG(std::string, prefix, "");
  /// Where to serve ("host:port"); empty serves on the DHT peer's port.
  HIVE_ARG(std::string, listen_on, "");
  /// Batching: requests of many clients merged into batches of at most max_batch_size rows;
  /// compute_threads is the number of serving threads.
  HIVE_ARG(moe::BatcherOptions, batching, moe::BatcherOptions().max_batch_size(1024).max_wait(Seconds(0.002)));
  /// torch intra-op threads of each serving thread (at::set_num_threads on it, which with
  /// OpenMP also becomes the default of torch threads created later in the process).
  HIVE_ARG(int, intra_op_threads, 1);
  /// Niceness added to the serving threads (Linux): under contention the training thread wins.
  HIVE_ARG(int, nice, 5);
  /// Most of each serving thread's time spent computing, in (0, 1]: after a batch of c seconds
  /// the thread starts no batch for c * (1 / fraction - 1) seconds (its replies go out at once).
  /// 1: no rest.
  HIVE_ARG(double, max_busy_fraction, 1.0);
  /// Requests admitted at once (decoding, queued or computing); more get errc::limit_exceeded.
  HIVE_ARG(std::size_t, max_in_flight, 1024);
  /// What the endpoint announces itself as ("trainer", "replica"); clients may filter on it.
  HIVE_ARG(std::string, role, "trainer");
  /// How often the endpoint (with its step and load) is re-declared; each lives twice as long.
  HIVE_ARG(Seconds, declare_period, Seconds(5));
  HIVE_OPTIONS_JSON(InferenceOptions, prefix, listen_on, batching, intra_op_threads, nice, max_busy_fraction,
                    max_in_flight, role, declare_period)
};

/// Counters of an InferenceServer.
struct InferenceStats {
  /// Requests answered with predictions.
  std::uint64_t answered = 0;
  /// Requests refused or failed (bad input, busy, shutdown).
  std::uint64_t failed = 0;
  /// Rows predicted.
  std::uint64_t rows = 0;
  /// Batches computed.
  std::uint64_t batches = 0;
  /// Live-mode batches whose weights changed while they computed.
  std::uint64_t torn = 0;
  /// Requests in flight now.
  std::size_t in_flight = 0;
};

/// An inference endpoint on a peer: serves serve.predict and serve.info, declares itself in
/// the DHT under `prefix.serve` with its step and load.
///
/// A request's rows are checked against the input schema on the io thread, then queued in the
/// scheduler, which merges many requests into a batch; a serving thread takes the publisher's
/// current snapshot, binds it to its own clone of the model (no copy: the clone's parameters
/// alias the snapshot), computes, and every request of the batch gets its rows with the
/// snapshot's step and checksum. The serving threads are the scheduler's (never the training
/// thread), run `intra_op_threads` torch threads each, are niced, and rest to keep within
/// `max_busy_fraction`.
///
/// @tparam M the module holder type of the Publisher
/// @tparam T the net::Transport policy
/// @tparam R the dht::Routing policy
/// @tparam S the moe::Scheduler policy
/// @par Example
/// @code
/// hive::serve::Publisher<torch::nn::Sequential> publisher(model);
/// hive::serve::InferenceServer<torch::nn::Sequential> server(publisher, trainer.dht(),
///     hive::moe::TensorSchema{at::kFloat, {784}}, hive::serve::InferenceOptions().prefix("my_run"));
/// @endcode
/// @par Thread safety
/// The constructor starts serving; shutdown() (also the destructor) stops. The publisher and
/// the DHT peer must outlive the server.
template <class M, class T, class R, class S>
class InferenceServer {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(dht::Routing<R>, "R must model dht::Routing (see docs/concepts/routing.md)");
  static_assert(moe::Scheduler<S>, "S must model moe::Scheduler (see docs/concepts/scheduler.md)");

 public:
  /// The DHT peer type.
  using dht_type = BasicDHT<T, R>;

  /// Serves `publisher`'s snapshots of a model taking one input of schema `input`, through
  /// `dht`'s peer (or on options.listen_on()).
  InferenceServer(Publisher<M>& publisher, dht_type& dht, moe::TensorSchema input, InferenceOptions options)
    requires std::constructible_from<typename S::Options, const moe::BatcherOptions&>
      : dht_(dht), core_(std::make_shared<Core>(publisher, std::move(input), options)) {
    HIVE_CHECK(!options.prefix().empty(), "InferenceOptions::prefix (the run's name) is required");
    HIVE_CHECK(options.intra_op_threads() >= 1, "intra_op_threads must be at least 1");
    HIVE_CHECK(options.max_busy_fraction() > 0 && options.max_busy_fraction() <= 1, "max_busy_fraction must be in (0, 1]");
    HIVE_CHECK(options.declare_period() > Seconds(0), "declare_period must be positive");
    HIVE_CHECK(options.max_in_flight() >= 1, "max_in_flight must be at least 1");
    HIVE_CHECK(!dht.options().client_mode() || !options.listen_on().empty(),
               "a client-mode DHT peer accepts no connections: give InferenceOptions::listen_on");
    std::weak_ptr<Core> weak = core_;
    core_->pool = core_->scheduler.add_pool("serve/predict", [weak](std::vector<at::Tensor> in) {
      auto core = weak.lock();
      if (!core) throw Error(errc::shutdown, "the inference server is shutting down");
      return core->compute(std::move(in));
    });
    core_->scheduler.start();
    try {
      if (options.listen_on().empty()) {
        rpc_ = dht.node()->rpc();
      } else {
        own_rpc_ = true;
        rpc_ = rpc_type::create(dht.executor(), transport_options_of<T>(dht.options(), std::nullopt), dht.options().rpc());
        rpc_->listen(options.listen_on());
      }
      core_->limits = rpc_->transport().limits();
      add_handlers();
      address_ = compute_address();
      declare();
    } catch (...) {
      core_->scheduler.stop();
      throw;
    }
    background_ = std::thread([this] { declare_loop(); });
  }
  InferenceServer(const InferenceServer&) = delete;
  InferenceServer& operator=(const InferenceServer&) = delete;
  /// Stops serving; see shutdown().
  ~InferenceServer() { shutdown(); }

  /// Stops declaring and answering, fails queued requests with a shutdown error. Idempotent.
  void shutdown() {
    {
      std::lock_guard lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
    }
    stop_cv_.notify_all();
    if (background_.joinable()) background_.join();
    for (auto method : {predict_method, info_method}) rpc_->remove_handler(std::string(method));
    core_->closed = true;
    core_->scheduler.stop();
    if (own_rpc_) {
      rpc_->close();
      asio::post(rpc_->get_executor(), asio::use_future).get();  // runs after the close
    }
  }

  /// Where clients call this endpoint (the address declared in the DHT).
  [[nodiscard]] const std::string& address() const noexcept { return address_; }
  /// Counters.
  [[nodiscard]] InferenceStats stats() const {
    std::lock_guard lock(core_->stats_mutex);
    auto s = core_->stats;
    s.in_flight = core_->in_flight.load();
    return s;
  }
  /// The input schema requests must match.
  [[nodiscard]] const moe::TensorSchema& input_schema() const noexcept { return core_->input; }
  /// The options.
  [[nodiscard]] const InferenceOptions& options() const noexcept { return core_->options; }
  /// The scheduler (its pool stats).
  [[nodiscard]] S& scheduler() noexcept { return core_->scheduler; }

  /// Declares the endpoint now (also done every declare_period); true when a DHT replica took it.
  bool declare() {
    if (!dht_.node()) return false;  // the DHT peer was shut down first
    const auto& o = core_->options;
    nlohmann::json value = {{"step", core_->publisher.mode() == Mode::live ? core_->publisher.step() : latest_step()},
                            {"load", core_->in_flight.load()},
                            {"mode", mode_name(core_->publisher.mode())},
                            {"role", o.role()},
                            {"max_batch_size", core_->scheduler.max_batch_size()}};
    return dht_.store(endpoints_key(o.prefix()), value, dht_.node()->now() + 2 * o.declare_period().count(),
                      dht::Subkey(address_));
  }

 private:
  using rpc_type = typename dht_type::node_type::rpc_type;

  // A serving thread's clone of the model and the snapshot it is bound to.
  struct Worker {
    M model{nullptr};
    std::vector<at::Tensor> tensors;  // the clone's parameters then buffers
    std::shared_ptr<const Snapshot> bound;
    SteadyClock::time_point rest_until{};  // max_busy_fraction: no batch starts before
  };

  // What handlers and serving threads share; outlives the server while a request holds it.
  struct Core {
    Core(Publisher<M>& p, moe::TensorSchema in, InferenceOptions o)
        : publisher(p), input(std::move(in)), options(std::move(o)), scheduler(typename S::Options(options.batching())) {}

    Publisher<M>& publisher;
    moe::TensorSchema input;
    InferenceOptions options;
    S scheduler;
    std::size_t pool = 0;
    Limits limits;
    std::atomic<std::size_t> in_flight{0};
    std::atomic<bool> closed{false};
    mutable std::mutex stats_mutex;
    InferenceStats stats;
    std::mutex workers_mutex;
    std::map<std::thread::id, std::unique_ptr<Worker>> workers;

    Worker& worker() {
      std::lock_guard lock(workers_mutex);
      auto& w = workers[std::this_thread::get_id()];
      if (!w) {
        w = std::make_unique<Worker>();
        const auto& proto = publisher.model();
        w->model = M(std::dynamic_pointer_cast<typename M::ContainedType>(proto.ptr()->clone()));
        HIVE_CHECK(w->model.ptr() != nullptr, "cloning the model gave another module type");
        w->model->eval();
        for (const auto& p : w->model->parameters()) w->tensors.push_back(p);
        for (const auto& b : w->model->buffers()) w->tensors.push_back(b);
        at::set_num_threads(options.intra_op_threads());
        if (options.nice() != 0) {
          // Linux: a thread's id names it for setpriority; failure (no permission to raise) is harmless.
          const auto tid = static_cast<id_t>(::syscall(SYS_gettid));
          (void)::setpriority(PRIO_PROCESS, tid, ::getpriority(PRIO_PROCESS, tid) + options.nice());
        }
      }
      return *w;
    }

    // One batch, from one snapshot: outputs, then [rows, 4] int64 (step, checksum bits, torn, live).
    std::vector<at::Tensor> compute(std::vector<at::Tensor> in) {
      auto& w = worker();
      // The rest that max_busy_fraction asks for comes before the next batch, not before the
      // replies of the last one.
      if (SteadyClock::now() < w.rest_until) std::this_thread::sleep_until(w.rest_until);
      auto snapshot = publisher.current();
      if (w.bound != snapshot) {
        HIVE_CHECK(snapshot->tensors.size() == w.tensors.size(), "a snapshot of {} tensors for a model of {}",
                   snapshot->tensors.size(), w.tensors.size());
        at::NoGradGuard no_grad;
        for (std::size_t i = 0; i < w.tensors.size(); ++i) w.tensors[i].set_data(snapshot->tensors[i]);
        w.bound = snapshot;
      }
      const auto rows = in.front().size(0);
      const auto before = publisher.sequence();
      const auto live_step = publisher.step();
      const auto start = SteadyClock::now();
      at::Tensor out;
      {
        at::NoGradGuard no_grad;
        out = w.model->forward(in.front());
      }
      const auto seconds = std::chrono::duration<double>(SteadyClock::now() - start).count();
      const bool torn = snapshot->live && ((before & 1) != 0 || publisher.sequence() != before);
      HIVE_CHECK(out.dim() >= 1 && out.size(0) == rows, "the model returned {} rows for a batch of {}",
                 out.dim() >= 1 ? out.size(0) : 0, rows);
      const std::int64_t step = static_cast<std::int64_t>(snapshot->live ? live_step : snapshot->step);
      auto meta = at::tensor({step, static_cast<std::int64_t>(snapshot->checksum), std::int64_t{torn},
                              std::int64_t{snapshot->live}},
                             at::kLong)
                      .unsqueeze(0)
                      .expand({rows, 4});
      {
        std::lock_guard lock(stats_mutex);
        ++stats.batches;
        stats.torn += torn ? 1 : 0;
      }
      if (options.max_busy_fraction() < 1)
        w.rest_until = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(
                                                std::chrono::duration<double>(seconds * (1 / options.max_busy_fraction() - 1)));
      return {out.contiguous(), meta};
    }

    void count(bool ok, std::int64_t rows) {
      std::lock_guard lock(stats_mutex);
      if (ok) {
        ++stats.answered;
        stats.rows += static_cast<std::uint64_t>(rows);
      } else {
        ++stats.failed;
      }
    }
  };

  // Decrements in_flight and counts the outcome when a request ends, however it ends.
  struct Admission {
    std::shared_ptr<Core> core;
    std::int64_t rows = 0;
    bool ok = false;
    ~Admission() {
      core->in_flight.fetch_sub(1);
      core->count(ok, rows);
    }
  };

  static Compression reply_compression(const Message& m) {
    if (!m.header.is_object() || !m.header.contains("compression")) return Compression::none;
    try {
      return m.header["compression"].template get<Compression>();
    } catch (const std::exception& e) {
      throw Error(errc::bad_header, fmt::format("bad 'compression': {}", e.what()));
    }
  }

  void add_handlers() {
    std::weak_ptr<Core> weak = core_;
    rpc_->add_handler(std::string(predict_method), [weak](net::CallContext, Message m) -> asio::awaitable<Message> {
      auto core = weak.lock();
      if (!core || core->closed) throw Error(errc::shutdown, "no inference server runs on this peer");
      if (core->in_flight.fetch_add(1) >= core->options.max_in_flight()) {
        core->in_flight.fetch_sub(1);
        core->count(false, 0);
        throw Error(errc::limit_exceeded, fmt::format("busy: {} requests in flight", core->options.max_in_flight()));
      }
      Admission admission{core};
      const auto compression = reply_compression(m);
      auto inputs = get_tensors(m, core->limits);
      const auto rows = moe::check_batch(inputs, {core->input}, "serve.predict inputs");
      const auto max_rows = core->scheduler.max_batch_size();
      if (static_cast<std::size_t>(rows) > max_rows)
        throw Error(errc::limit_exceeded, fmt::format("serve.predict: a batch of {} rows exceeds max_batch_size {}: "
                                                      "send it in parts", rows, max_rows));
      moe::check_finite(inputs, "serve.predict inputs");
      auto op = moe::async_submit(core->scheduler, core->pool, std::move(inputs), asio::use_awaitable);
      auto outputs = co_await std::move(op);
      const auto meta = outputs.at(1)[0];
      Message reply;
      reply.header = {{"step", meta[0].template item<std::int64_t>()},
                      {"checksum", checksum_hex(static_cast<std::uint64_t>(meta[1].template item<std::int64_t>()))},
                      {"torn", meta[2].template item<std::int64_t>() != 0},
                      {"mode", meta[3].template item<std::int64_t>() != 0 ? "live" : "snapshot"}};
      add_tensors(reply, {outputs.at(0)}, compression);
      admission.rows = rows;
      admission.ok = true;
      co_return reply;
    });
    rpc_->add_handler(std::string(info_method), [weak](net::CallContext, Message) -> asio::awaitable<Message> {
      auto core = weak.lock();
      if (!core || core->closed) throw Error(errc::shutdown, "no inference server runs on this peer");
      const auto latest = core->publisher.latest();
      nlohmann::json info = {{"input_schema", core->input},
                             {"max_batch_size", core->scheduler.max_batch_size()},
                             {"step", core->publisher.mode() == Mode::live ? core->publisher.step() : latest->step},
                             {"mode", mode_name(core->publisher.mode())},
                             {"role", core->options.role()},
                             {"load", core->in_flight.load()}};
      co_return Message{std::move(info), {}};
    });
  }

  std::uint64_t latest_step() const { return core_->publisher.latest()->step; }

  std::string compute_address() const {
    const auto visible = dht_.visible_addresses();
    if (!own_rpc_) {
      HIVE_CHECK(!visible.empty(), "the DHT peer has no address others can reach");
      return visible.front();
    }
    const auto listen = net::HostPort::parse(rpc_->listen_address());
    if (!net::is_wildcard_host(listen.host) || visible.empty()) return listen.str();
    return net::HostPort{net::HostPort::parse(visible.front()).host, listen.port}.str();
  }

  void declare_loop() {
    std::unique_lock lock(mutex_);
    while (!stopped_) {
      const auto period = std::chrono::duration_cast<SteadyClock::duration>(core_->options.declare_period());
      if (stop_cv_.wait_for(lock, period, [this] { return stopped_; })) break;
      lock.unlock();
      try {
        if (!declare()) log::warn("serve", "declaring the inference endpoint {} found no DHT replica", address_);
      } catch (const std::exception& e) {
        log::warn("serve", "declaring the inference endpoint {} failed: {}", address_, e.what());
      }
      lock.lock();
    }
  }

  dht_type& dht_;
  std::shared_ptr<Core> core_;
  std::shared_ptr<rpc_type> rpc_;
  bool own_rpc_ = false;  // listen_on: an RPC peer of the server's own, not the DHT peer's
  std::string address_;
  std::mutex mutex_;
  std::condition_variable stop_cv_;
  bool stopped_ = false;
  std::thread background_;
};

}  // namespace hive::serve
