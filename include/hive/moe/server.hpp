#pragma once
/// @file
/// hive::Server: hosts experts, batches their requests, trains them on backward, and announces
/// them in the DHT.

#include <hive/fwd.hpp>
#include <hive/core/tensor_codec.hpp>
#include <hive/dht/dht.hpp>
#include <hive/dht/experts.hpp>
#include <hive/moe/backend.hpp>
#include <hive/moe/protocol.hpp>
#include <hive/moe/scheduler.hpp>

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace hive {

/// Run-time knobs of a Server.
struct ServerOptions {
  /// The server's DHT peer: where it listens, initial peers, announce_host.
  HIVE_ARG(DHTOptions, dht, DHTOptions{});
  /// Where the experts are served ("host:port"); empty serves them on the DHT peer's port.
  /// A separate port lets a firewall open the two independently (hive-server's --dht_port).
  HIVE_ARG(std::string, listen_on, "");
  /// Batching knobs, used when the scheduler policy takes moe::BatcherOptions.
  HIVE_ARG(moe::BatcherOptions, batching, moe::BatcherOptions{});
  /// How often the experts are re-announced in the DHT.
  HIVE_ARG(Seconds, update_period, Seconds(30));
  /// How long an announcement lives; 0 means twice update_period.
  HIVE_ARG(Seconds, expiration, Seconds(0));
  /// Directory of checkpoints: the newest is restored at start, a new one written every
  /// checkpoint_period and at shutdown. Empty disables checkpoints.
  HIVE_ARG(std::string, checkpoint_dir, "");
  /// Time between checkpoints.
  HIVE_ARG(Seconds, checkpoint_period, Seconds(300));
  HIVE_OPTIONS_JSON(ServerOptions, dht, listen_on, batching, update_period, expiration, checkpoint_dir,
                    checkpoint_period)
};

/// A peer that hosts experts (the class is declared above with its default policies).
///
/// It serves three methods on its DHT port, or on a port of their own (ServerOptions::listen_on):
/// moe.info, moe.forward and moe.backward (see docs/protocol.md). Requests are checked against
/// the expert's schemas (and for finite values) on the io thread, then
/// queued in the scheduler, which merges rows from many clients into batches and runs them on
/// its compute threads; every backward updates the expert. The experts are announced in the
/// DHT at start and every update_period.
///
/// @tparam T the net::Transport policy
/// @tparam R the dht::Routing policy
/// @tparam S the moe::Scheduler policy (batching and compute threads)
/// @tparam B the moe::Backend policy (the computation behind each expert)
/// @par Example
/// @code
/// hive::Server<> server(hive::moe::make_backends("ffn", {"expert.0", "expert.1"}, 512),
///                       hive::ServerOptions().dht(hive::DHTOptions().listen_on("127.0.0.1:1337")));
/// fmt::print("serving at {}\n", server.address());
/// @endcode
/// @par Thread safety
/// The constructor starts serving; shutdown() (also run by the destructor) stops. Accessors
/// may be called from any thread except the server's own io and compute threads.
template <class T, class R, class S, class B>
class Server {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(dht::Routing<R>, "R must model dht::Routing (see docs/concepts/routing.md)");
  static_assert(moe::Scheduler<S>, "S must model moe::Scheduler (see docs/concepts/scheduler.md)");
  static_assert(moe::Backend<B>, "B must model moe::Backend (see docs/concepts/backend.md)");
 public:
  /// The DHT peer type.
  using dht_type = BasicDHT<T, R>;
  /// The scheduler type.
  using scheduler_type = S;
  /// The backend type.
  using backend_type = B;

  /// Serves `backends` (each named by its expert uid) with batching options from `options`.
  explicit Server(std::vector<B> backends, ServerOptions options = {},
                  std::optional<typename T::Options> transport_options = std::nullopt)
    requires std::constructible_from<typename S::Options, const moe::BatcherOptions&>
      : Server(std::move(backends), options, typename S::Options(options.batching()), std::move(transport_options)) {}

  /// Serves `backends` with a scheduler built from `scheduler_options`.
  Server(std::vector<B> backends, ServerOptions options, const typename S::Options& scheduler_options,
         std::optional<typename T::Options> transport_options)
      : options_(std::move(options)), scheduler_(scheduler_options) {
    HIVE_CHECK(!backends.empty(), "a server needs at least one expert");
    HIVE_CHECK(options_.update_period() > Seconds(0), "update_period must be positive");
    for (auto& b : backends) {
      const std::string uid = b.name();
      dht::parse_uid(uid);
      HIVE_CHECK(!entries_.contains(uid), "expert uid '{}' appears twice", uid);
      backends_.push_back(std::move(b));
      B* backend = &backends_.back();
      Entry e{backend, 0, 0};
      e.forward_pool = scheduler_.add_pool(uid + "/forward", [backend](std::vector<at::Tensor> in) {
        return backend->forward(in);
      });
      e.backward_pool = scheduler_.add_pool(uid + "/backward", [backend](std::vector<at::Tensor> in) {
        const auto n = static_cast<std::ptrdiff_t>(backend->input_schema().size());
        std::vector<at::Tensor> inputs(in.begin(), in.begin() + n), grad_outputs(in.begin() + n, in.end());
        return backend->backward(inputs, grad_outputs);
      });
      entries_.emplace(uid, e);
      uids_.push_back(uid);
    }
    if (!options_.checkpoint_dir().empty())
      for (auto& b : backends_) b.load(options_.checkpoint_dir());
    HIVE_CHECK(!options_.dht().client_mode(), "a server must accept connections: dht.client_mode must be false");
    scheduler_.start();
    try {
      auto expert_transport = transport_options_of<T>(options_.dht(), transport_options);
      dht_ = std::make_unique<dht_type>(options_.dht(), std::move(transport_options));
      if (options_.listen_on().empty()) {
        rpc_ = dht_->node()->rpc();
      } else {
        // The experts' port proves the same identity as the DHT peer.
        rpc_ = rpc_type::create(dht_->executor(), std::move(expert_transport), options_.dht().rpc(), dht_->identity());
        rpc_->listen(options_.listen_on());
      }
      limits_ = rpc_->transport().limits();
      serve();
      declare();
    } catch (...) {
      scheduler_.stop();
      dht_.reset();
      throw;
    }
    background_ = std::thread([this] { background_loop(); });
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  /// Stops serving; see shutdown().
  ~Server() { shutdown(); }

  /// Stops announcing, fails queued requests with a shutdown error, writes a last checkpoint
  /// (when enabled), then closes the DHT peer and joins its threads. Idempotent.
  void shutdown() {
    {
      std::lock_guard lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
    }
    stop_cv_.notify_all();
    if (background_.joinable()) background_.join();
    scheduler_.stop();
    if (!options_.checkpoint_dir().empty()) save_checkpoints();
    if (rpc_ && dht_ && rpc_ != dht_->node()->rpc()) {
      rpc_->close();
      asio::post(rpc_->get_executor(), asio::use_future).get();  // runs after the close
    }
    if (dht_) dht_->shutdown();
  }

  /// The address clients call the experts at, the one declared in the DHT (the DHT peer's
  /// address when the experts share its port).
  /// Behind NAT (the DHT peer is unreachable) this is its relayed address; throws
  /// hive::Error(connection_refused) when it holds no relay reservation.
  [[nodiscard]] std::string address() const {
    if (rpc_ == dht_->node()->rpc()) return dht_address();
    const auto listen = net::HostPort::parse(rpc_->listen_address());
    if (!net::is_wildcard_host(listen.host)) return listen.str();
    // A wildcard: the host other peers reach this machine at, with the experts' port.
    const auto dht = dht_address();
    if (net::RelayedAddress::is_relayed(dht))
      throw Error(errc::connection_refused, "this server is behind NAT and its experts listen on their own port, which no "
                                            "relay forwards to: serve them on the DHT peer's port (no separate listen_on)");
    return net::HostPort{net::HostPort::parse(dht).host, listen.port}.str();
  }
  /// The address other peers join the swarm through (the DHT peer's first visible address).
  /// Throws hive::Error(connection_refused) when it has none (behind NAT, no relay).
  [[nodiscard]] std::string dht_address() const {
    auto visible = dht_->visible_addresses();
    if (visible.empty())
      throw Error(errc::connection_refused, "other peers cannot reach this server: it is behind NAT and holds no relay "
                                            "reservation (see docs/multihost.md, \"Behind NAT\")");
    return visible.front();
  }
  /// The server's DHT peer (other peers join the swarm through it).
  [[nodiscard]] dht_type& dht() noexcept { return *dht_; }
  /// The uids served, in the order given.
  [[nodiscard]] const std::vector<std::string>& uids() const noexcept { return uids_; }
  /// The backend of expert `uid`; throws hive::InvalidArgument when not served here.
  [[nodiscard]] B& backend(const std::string& uid) { return *find(uid).backend; }
  /// The scheduler (for its stats).
  [[nodiscard]] S& scheduler() noexcept { return scheduler_; }
  /// The options.
  [[nodiscard]] const ServerOptions& options() const noexcept { return options_; }

  /// Announces every expert now (the server also does so every update_period); completes
  /// `token` (for `void(std::exception_ptr, std::vector<bool>)`, a std::future by default) with,
  /// per uid, whether a DHT replica accepted it.
  template <class Token = asio::use_future_t<>>
  auto async_declare(Token&& token = {}) {
    return dht::async_declare_experts(*dht_, uids_, address(), dht_->node()->now() + expiration().count(),
                                      std::forward<Token>(token));
  }
  /// Blocking async_declare().
  std::vector<bool> declare() { return async_declare(asio::use_future).get(); }

  /// Writes a checkpoint of every expert under checkpoint_dir (a no-op when it is empty).
  void save_checkpoints() {
    if (options_.checkpoint_dir().empty()) return;
    for (auto& b : backends_) {
      try {
        b.save(options_.checkpoint_dir());
      } catch (const std::exception& e) {
        log::error("moe", "checkpoint of {} failed: {}", b.name(), e.what());
      }
    }
  }

 private:
  struct Entry {
    B* backend;
    std::size_t forward_pool;
    std::size_t backward_pool;
  };

  [[nodiscard]] Seconds expiration() const {
    return options_.expiration() > Seconds(0) ? options_.expiration() : 2 * options_.update_period();
  }

  const Entry& find(const std::string& uid) const {
    auto it = entries_.find(uid);
    if (it == entries_.end()) throw InvalidArgument(fmt::format("no expert '{}' is served here", uid));
    return it->second;
  }

  // The expert a request names, or a clear error for the client.
  const Entry& entry_of(const Message& m) const {
    if (!m.header.is_object() || !m.header.contains("uid") || !m.header["uid"].is_string())
      throw Error(errc::bad_header, "request needs 'uid': the expert's uid as a string");
    const auto& uid = m.header["uid"].template get_ref<const std::string&>();
    auto it = entries_.find(uid);
    if (it == entries_.end()) throw Error(errc::invalid_argument, fmt::format("no expert '{}' is served here", uid));
    return it->second;
  }

  static Compression reply_compression(const Message& m) {
    if (!m.header.contains("compression")) return Compression::none;
    try {
      return m.header["compression"].template get<Compression>();
    } catch (const std::exception& e) {
      throw Error(errc::bad_header, fmt::format("bad 'compression': {}", e.what()));
    }
  }

  void serve() {
    auto& rpc = rpc_;
    rpc->add_handler(std::string(moe::info_method), [this](net::CallContext, Message m) -> asio::awaitable<Message> {
      const auto& e = entry_of(m);
      auto info = e.backend->info();
      info["max_batch_size"] = scheduler_.max_batch_size();
      co_return Message{std::move(info), {}};
    });
    rpc->add_handler(std::string(moe::forward_method), [this](net::CallContext, Message m) -> asio::awaitable<Message> {
      const auto& e = entry_of(m);
      const auto compression = reply_compression(m);
      auto inputs = get_tensors(m, limits_);
      moe::check_batch(inputs, e.backend->input_schema(), fmt::format("{} inputs", e.backend->name()));
      moe::check_finite(inputs, fmt::format("{} inputs", e.backend->name()));
      auto op = moe::async_submit(scheduler_, e.forward_pool, std::move(inputs), asio::use_awaitable);
      auto outputs = co_await std::move(op);
      Message reply;
      add_tensors(reply, outputs, compression);
      co_return reply;
    });
    rpc->add_handler(std::string(moe::backward_method), [this](net::CallContext, Message m) -> asio::awaitable<Message> {
      const auto& e = entry_of(m);
      const auto compression = reply_compression(m);
      auto tensors = get_tensors(m, limits_);
      const auto& in_schema = e.backend->input_schema();
      const auto& out_schema = e.backend->output_schema();
      if (tensors.size() != in_schema.size() + out_schema.size())
        throw Error(errc::bad_tensor, fmt::format("{} backward: expected {} inputs and {} grad_outputs, got {} tensors",
                                                  e.backend->name(), in_schema.size(), out_schema.size(), tensors.size()));
      const auto n = static_cast<std::ptrdiff_t>(in_schema.size());
      const std::vector<at::Tensor> inputs(tensors.begin(), tensors.begin() + n), grad_outputs(tensors.begin() + n, tensors.end());
      const auto rows = moe::check_batch(inputs, in_schema, fmt::format("{} inputs", e.backend->name()));
      const auto grad_rows = moe::check_batch(grad_outputs, out_schema, fmt::format("{} grad_outputs", e.backend->name()));
      if (rows != grad_rows)
        throw Error(errc::bad_tensor, fmt::format("{} backward: {} input rows but {} grad_output rows",
                                                  e.backend->name(), rows, grad_rows));
      // Checked per request, before batching: a poisoned request fails alone.
      moe::check_finite(inputs, fmt::format("{} inputs", e.backend->name()));
      moe::check_finite(grad_outputs, fmt::format("{} grad_outputs", e.backend->name()));
      auto op = moe::async_submit(scheduler_, e.backward_pool, std::move(tensors), asio::use_awaitable);
      auto grads = co_await std::move(op);
      Message reply;
      add_tensors(reply, grads, compression);
      co_return reply;
    });
  }

  // Re-announces every update_period and checkpoints every checkpoint_period until shutdown.
  void background_loop() {
    auto next_declare = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(options_.update_period());
    auto next_checkpoint =
        SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(options_.checkpoint_period());
    std::unique_lock lock(mutex_);
    while (!stopped_) {
      const auto wake = options_.checkpoint_dir().empty() ? next_declare : std::min(next_declare, next_checkpoint);
      if (stop_cv_.wait_until(lock, wake, [this] { return stopped_; })) break;
      lock.unlock();
      const auto now = SteadyClock::now();
      try {
        if (now >= next_declare) {
          // Set first: a declaration that throws (behind NAT with no relay yet) waits its turn too.
          next_declare = now + std::chrono::duration_cast<SteadyClock::duration>(options_.update_period());
          auto ok = declare();
          const auto stored = std::count(ok.begin(), ok.end(), true);
          if (stored < static_cast<std::ptrdiff_t>(ok.size()))
            log::warn("moe", "announced {} of {} experts", stored, ok.size());
        }
        if (!options_.checkpoint_dir().empty() && now >= next_checkpoint) {
          save_checkpoints();
          next_checkpoint = now + std::chrono::duration_cast<SteadyClock::duration>(options_.checkpoint_period());
        }
      } catch (const std::exception& e) {
        log::warn("moe", "announcing experts failed: {}", e.what());
      }
      lock.lock();
    }
  }

  ServerOptions options_;
  S scheduler_;
  std::deque<B> backends_;  // stable addresses: pools and entries point into it
  std::map<std::string, Entry> entries_;
  std::vector<std::string> uids_;
  std::unique_ptr<dht_type> dht_;
  Limits limits_;
  using rpc_type = typename dht_type::node_type::rpc_type;
  std::shared_ptr<rpc_type> rpc_;  // serves the experts: the DHT peer's, or one of its own
  std::mutex mutex_;
  std::condition_variable stop_cv_;
  bool stopped_ = false;
  std::thread background_;
};

/// The server over TCP with the default DHT, batching and backend policies.
using DefaultServer = Server<>;

}  // namespace hive
