#pragma once
/// @file
/// net::Simulated: peers in one process on an emulated network with latency, bandwidth,
/// message loss, partitions and crashes. The same protocol code runs on it unchanged.
///
/// Over 400 lines because the network (SimNetwork), its connections and the transport are one
/// model of delivery: each needs the others' internals to deliver, drop or partition.

#include <hive/core/log.hpp>
#include <hive/detail/event.hpp>
#include <hive/net/transport.hpp>

#include <asio/dispatch.hpp>

#include <cmath>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace hive::net {

class Simulated;

/// How the one-way latency of each frame is drawn (SimNetworkOptions::latency).
enum class LatencyDistribution {
  uniform,      ///< uniform on [min_latency, max_latency]
  fixed,        ///< always mean_latency
  normal,       ///< normal with mean_latency and latency_stddev, negative draws taken as 0
  exponential,  ///< exponential with mean mean_latency (Learning@home's delay × Weibull(1))
};

/// The name of a latency distribution ("uniform", "fixed", "normal", "exponential").
[[nodiscard]] constexpr std::string_view to_string(LatencyDistribution d) noexcept {
  switch (d) {
    case LatencyDistribution::uniform: return "uniform";
    case LatencyDistribution::fixed: return "fixed";
    case LatencyDistribution::normal: return "normal";
    case LatencyDistribution::exponential: return "exponential";
  }
  return "unknown";
}

/// The latency distribution named `name`; throws hive::InvalidArgument listing the names.
[[nodiscard]] inline LatencyDistribution parse_latency_distribution(std::string_view name) {
  for (auto d : {LatencyDistribution::uniform, LatencyDistribution::fixed, LatencyDistribution::normal,
                 LatencyDistribution::exponential})
    if (to_string(d) == name) return d;
  throw InvalidArgument(fmt::format("unknown latency distribution '{}' (known: uniform, fixed, normal, exponential)", name));
}

/// Writes a latency distribution as its name.
inline void to_json(nlohmann::json& j, LatencyDistribution d) { j = to_string(d); }

/// Reads a latency distribution from its name; throws hive::InvalidArgument otherwise.
inline void from_json(const nlohmann::json& j, LatencyDistribution& d) {
  if (!j.is_string())
    throw InvalidArgument(fmt::format("a latency distribution must be a string, got {}", j.type_name()));
  d = parse_latency_distribution(j.get_ref<const std::string&>());
}

/// Properties of the emulated network (SimNetwork::Options).
///
/// Time is the wall clock: a frame with 0.5 s of latency arrives half a second of real time
/// later (asio timers), so an experiment with long delays lasts as long as it would on a real
/// network; waiting costs no CPU, so many peers can wait at once.
struct SimNetworkOptions {
  /// How each frame's one-way latency is drawn.
  HIVE_ARG(LatencyDistribution, latency, LatencyDistribution::uniform);
  /// Smallest one-way latency of a frame (uniform only).
  HIVE_ARG(Seconds, min_latency, Seconds(0.0005));
  /// Largest one-way latency of a frame (uniform only).
  HIVE_ARG(Seconds, max_latency, Seconds(0.0005));
  /// Mean one-way latency of a frame (fixed, normal, exponential).
  HIVE_ARG(Seconds, mean_latency, Seconds(0));
  /// Standard deviation of the one-way latency (normal only).
  HIVE_ARG(Seconds, latency_stddev, Seconds(0));
  /// Probability that a frame is lost (requests then time out, as over a lossy path). The
  /// frames of the connection handshake are never lost.
  HIVE_ARG(double, loss, 0.0);
  /// Probability that a request fails: each request frame whose method starts with
  /// request_failure_prefix, once it reaches the receiving host, is refused there with
  /// this probability instead of reaching its handler (independently per request; replies and
  /// other methods are never affected).
  HIVE_ARG(double, request_failure, 0.0);
  /// Methods that can fail ("moe." for expert calls); empty means every method.
  HIVE_ARG(std::string, request_failure_prefix, "");
  /// A failed request is answered at once by an error frame (one latency later the caller sees
  /// hive::RemoteError "emulated request failure"); when false it vanishes and the caller
  /// waits until its deadline.
  HIVE_ARG(bool, request_failure_reply, true);
  /// Uplink bandwidth of each host in bytes per second; 0 means unlimited.
  HIVE_ARG(double, bandwidth, 0.0);
  /// Seed of the random source behind latency, loss and failures.
  HIVE_ARG(std::uint64_t, seed, 0);
  /// Whether connecting to a crashed or absent host fails at once (a closed port) or hangs
  /// until the caller's deadline (a host that vanished from the internet).
  HIVE_ARG(bool, refuse_dead, true);
  HIVE_OPTIONS_JSON(SimNetworkOptions, latency, min_latency, max_latency, mean_latency, latency_stddev, loss,
                    request_failure, request_failure_prefix, request_failure_reply, bandwidth, seed, refuse_dead)

 public:
  /// Throws hive::InvalidArgument naming the first option that makes no sense: a negative or
  /// non-finite latency, an empty uniform range, a parameter the chosen distribution does not
  /// read, a probability outside [0, 1], a negative bandwidth.
  void validate() const {
    auto finite_non_negative = [](Seconds s) { return std::isfinite(s.count()) && s.count() >= 0; };
    HIVE_CHECK(finite_non_negative(min_latency()) && finite_non_negative(max_latency()) && max_latency() >= min_latency(),
               "latency range must satisfy 0 <= min_latency <= max_latency, got [{}, {}]", min_latency().count(),
               max_latency().count());
    HIVE_CHECK(finite_non_negative(mean_latency()), "mean_latency must be finite and >= 0, got {}", mean_latency().count());
    HIVE_CHECK(finite_non_negative(latency_stddev()), "latency_stddev must be finite and >= 0, got {}",
               latency_stddev().count());
    HIVE_CHECK(latency() != LatencyDistribution::uniform || mean_latency().count() == 0,
               "mean_latency is not read by the uniform distribution (set min_latency and max_latency, or pick "
               "fixed, normal or exponential)");
    HIVE_CHECK(latency() == LatencyDistribution::normal || latency_stddev().count() == 0,
               "latency_stddev is read by the normal distribution only, not by {}", to_string(latency()));
    HIVE_CHECK(latency() != LatencyDistribution::normal || latency_stddev().count() > 0,
               "the normal distribution needs latency_stddev > 0 (use fixed for a constant latency)");
    HIVE_CHECK(loss() >= 0 && loss() <= 1, "loss must be a probability, got {}", loss());
    HIVE_CHECK(request_failure() >= 0 && request_failure() <= 1, "request_failure must be a probability, got {}",
               request_failure());
    HIVE_CHECK(std::isfinite(bandwidth()) && bandwidth() >= 0, "bandwidth must be >= 0, got {}", bandwidth());
  }
};


namespace detail {
struct SimLink;
struct SimListener;
}  // namespace detail

/// The emulated network that Simulated transports attach to: one per experiment.
///
/// Every frame is encoded to bytes and decoded by the receiver with the same code as on TCP.
/// Each frame is delayed by a one-way latency drawn from the options' distribution (order is
/// preserved per connection, as on TCP), may be dropped with probability `loss`, is held back
/// by the sender's uplink bandwidth when one is set, and is dropped when it would cross a
/// partition. A request may be failed by the receiving host (`request_failure`). A crashed
/// host loses its connections and listeners at once. Delays are wall-clock time.
///
/// @par Thread safety
/// Everything runs on the network's strand; the control functions (crash, revive, partition,
/// heal, stats) may be called from any thread, except from a thread that is blocked running
/// the strand's io_context in another way.
class SimNetwork : public std::enable_shared_from_this<SimNetwork> {
  struct Private {};

 public:
  /// Properties of the emulated network.
  using Options = SimNetworkOptions;

  /// Counters of what the network did.
  struct Stats {
    std::uint64_t frames_sent = 0;       ///< frames handed to the network
    std::uint64_t frames_delivered = 0;  ///< frames that reached the receiver
    std::uint64_t frames_lost = 0;       ///< frames dropped by random loss
    std::uint64_t frames_partitioned = 0;  ///< frames dropped at a partition or a dead host
    std::uint64_t bytes_sent = 0;        ///< bytes handed to the network
    std::uint64_t requests = 0;          ///< requests received whose method starts with request_failure_prefix
    std::uint64_t requests_failed = 0;   ///< of those, the ones the network failed
  };

  /// Creates a network whose events run on a strand of `executor`.
  /// Throws hive::InvalidArgument for options that make no sense (Options::validate).
  static std::shared_ptr<SimNetwork> create(const asio::any_io_executor& executor, Options options = {}) {
    options.validate();
    return std::make_shared<SimNetwork>(Private{}, executor, std::move(options));
  }
  /// Use create().
  SimNetwork(Private, const asio::any_io_executor& executor, Options options)
      : strand_(asio::make_strand(executor)), options_(std::move(options)), rng_(options_.seed()) {}

  /// The strand every simulated peer runs on.
  [[nodiscard]] asio::strand<asio::any_io_executor> get_executor() const noexcept { return strand_; }
  /// The network's properties (not to be read while set_options runs on another thread).
  [[nodiscard]] const Options& options() const noexcept { return options_; }
  /// Changes the network's properties from now on, e.g. a quick set-up followed by an
  /// experiment at a long delay; frames in flight keep their delivery times and the random
  /// source goes on (the new seed is ignored). Throws hive::InvalidArgument like create().
  void set_options(Options options) {
    options.validate();
    run([&] {
      options.seed(options_.seed());
      options_ = std::move(options);
    });
  }

  /// Crashes `host`: its connections break and its listeners vanish until revive().
  void crash(const std::string& host) {
    run([&] {
      dead_.insert(host);
      close_links_of(host);
      for (auto it = listeners_.begin(); it != listeners_.end();) {
        if (HostPort::parse(it->first).host == host) it = close_listener(it);
        else ++it;
      }
    });
  }
  /// Brings a crashed host back (its programs must listen again).
  void revive(const std::string& host) {
    run([&] { dead_.erase(host); });
  }
  /// True when `host` is crashed.
  [[nodiscard]] bool is_dead(const std::string& host) {
    bool r = false;
    run([&] { r = dead_.contains(host); });
    return r;
  }
  /// Cuts `hosts` off from every other host: frames and connection attempts across the cut are
  /// lost. Replaces any previous partition.
  void partition(std::vector<std::string> hosts) {
    run([&] { island_ = std::set<std::string>(hosts.begin(), hosts.end()); });
  }
  /// Removes the partition.
  void heal() {
    run([&] { island_.clear(); });
  }
  /// A snapshot of the counters.
  [[nodiscard]] Stats stats() {
    Stats s;
    run([&] { s = stats_; });
    return s;
  }

  /// A fresh host name ("sim-N") for a new transport.
  std::string new_host() { return fmt::format("sim-{}", next_host_.fetch_add(1)); }

 private:
  friend class Simulated;
  friend struct detail::SimLink;

  template <class F>
  void run(F&& f) {
    hive::detail::run_blocking_on(strand_, std::forward<F>(f));
  }

  Seconds draw_latency() {
    switch (options_.latency()) {
      case LatencyDistribution::uniform:
        if (options_.max_latency() == options_.min_latency()) return options_.min_latency();
        return Seconds(std::uniform_real_distribution<double>(options_.min_latency().count(),
                                                              options_.max_latency().count())(rng_));
      case LatencyDistribution::fixed: return options_.mean_latency();
      case LatencyDistribution::normal:
        return Seconds(std::max(0.0, std::normal_distribution<double>(options_.mean_latency().count(),
                                                                      options_.latency_stddev().count())(rng_)));
      case LatencyDistribution::exponential:
        if (options_.mean_latency().count() <= 0) return Seconds(0);
        return Seconds(std::exponential_distribution<double>(1.0 / options_.mean_latency().count())(rng_));
    }
    return Seconds(0);
  }
  bool draw_loss() {
    if (options_.loss() <= 0) return false;
    return std::bernoulli_distribution(options_.loss())(rng_);
  }
  /// True when the request for `method` is to fail (counts it when request_failure applies).
  bool draw_request_failure(const std::string& method) {
    if (!method.starts_with(options_.request_failure_prefix())) return false;
    stats_.requests++;
    if (options_.request_failure() <= 0 || !std::bernoulli_distribution(options_.request_failure())(rng_)) return false;
    stats_.requests_failed++;
    return true;
  }
  /// Hands `bytes` to side `to` of `link` at time `at`, unless the link broke or the hosts
  /// cannot reach each other by then.
  inline void deliver(const std::shared_ptr<detail::SimLink>& link, int to, Buffer bytes, SteadyClock::time_point at);
  bool reachable(const std::string& a, const std::string& b) const {
    if (dead_.contains(a) || dead_.contains(b)) return false;
    if (island_.empty()) return true;
    return island_.contains(a) == island_.contains(b);
  }
  inline void close_links_of(const std::string& host);
  inline std::map<std::string, std::shared_ptr<detail::SimListener>>::iterator close_listener(
      std::map<std::string, std::shared_ptr<detail::SimListener>>::iterator it);

  asio::strand<asio::any_io_executor> strand_;
  Options options_;
  std::mt19937_64 rng_;
  std::atomic<std::uint64_t> next_host_{1};
  std::set<std::string> dead_;
  std::set<std::string> island_;
  std::map<std::string, std::shared_ptr<detail::SimListener>> listeners_;
  std::unordered_map<std::string, std::vector<std::weak_ptr<detail::SimLink>>> links_;
  std::unordered_map<std::string, SteadyClock::time_point> uplink_free_;
  Stats stats_;
};

namespace detail {

/// Both directions of one emulated connection.
struct SimLink {
  std::string host[2];        // host of side 0 (the connecting side) and side 1
  std::string address[2];     // "host:port" as each side is seen by the other
  std::deque<Buffer> inbox[2];  // frames waiting to be read by side i
  // Frames on their way to side i, in delivery order (their times strictly increase).
  std::deque<std::pair<SteadyClock::time_point, Buffer>> in_flight[2];
  hive::detail::Notifier readable[2];
  SteadyClock::time_point last_delivery[2]{};
  bool closed = false;

  void close() {
    closed = true;
    for (auto& n : readable) n.notify_all();
  }
};

/// A listening address and its queue of connections not yet accepted.
struct SimListener {
  std::deque<std::shared_ptr<class SimConnectionBase>> pending;
  hive::detail::Notifier ready;
  Limits limits;  // the listening peer's limits, applied to what it receives
  bool closed = false;
};

}  // namespace detail

inline void SimNetwork::close_links_of(const std::string& host) {
  auto it = links_.find(host);
  if (it == links_.end()) return;
  for (auto& weak : it->second)
    if (auto link = weak.lock()) link->close();
  links_.erase(it);
}

inline void SimNetwork::deliver(const std::shared_ptr<detail::SimLink>& link, int to, Buffer bytes,
                                SteadyClock::time_point at) {
  // One timer per frame, but each delivers every frame that is due, oldest first: timers due
  // at once may run in any order (with several io threads, their handlers race into the
  // strand), and frames on one connection arrive in order, as on TCP.
  link->in_flight[to].emplace_back(at, std::move(bytes));
  auto timer = std::make_shared<asio::steady_timer>(strand_, at);
  timer->async_wait([timer, link, to, net = shared_from_this()](std::error_code) {
    auto& queue = link->in_flight[to];
    const auto now = SteadyClock::now();
    bool delivered = false;
    while (!queue.empty() && queue.front().first <= now) {
      Buffer bytes = std::move(queue.front().second);
      queue.pop_front();
      if (link->closed) continue;
      if (!net->reachable(link->host[0], link->host[1])) {
        net->stats_.frames_partitioned++;
        continue;
      }
      net->stats_.frames_delivered++;
      link->inbox[to].push_back(std::move(bytes));
      delivered = true;
    }
    if (delivered) link->readable[to].notify_all();
  });
}

inline std::map<std::string, std::shared_ptr<detail::SimListener>>::iterator SimNetwork::close_listener(
    std::map<std::string, std::shared_ptr<detail::SimListener>>::iterator it) {
  it->second->closed = true;
  it->second->pending.clear();
  it->second->ready.notify_all();
  return listeners_.erase(it);
}

namespace detail {
/// Common base so listeners can queue connections before Simulated is complete.
class SimConnectionBase {
 public:
  virtual ~SimConnectionBase() = default;
};
}  // namespace detail

/// Run-time knobs of a simulated peer (Simulated::Options).
struct SimulatedOptions {
  /// The network to attach to (required).
  HIVE_ARG(std::shared_ptr<SimNetwork>, network, nullptr);
  /// This peer's host name; empty picks a fresh one.
  HIVE_ARG(std::string, host, "");
  /// Bounds on what this peer accepts from the network.
  HIVE_ARG(Limits, limits, Limits{});
};

/// The simulated transport: one host on a SimNetwork.
///
/// Addresses look like "sim-7:1". listen() ignores the host part of its argument (the host is
/// the transport's own) so that code written for "127.0.0.1:0" runs unchanged.
class Simulated {
 public:
  /// Run-time knobs of a simulated peer.
  using Options = SimulatedOptions;
  /// Every simulated peer runs on the network's strand.
  using executor_type = asio::strand<asio::any_io_executor>;

  /// One end of an emulated connection.
  class Connection : public detail::SimConnectionBase {
   public:
    /// Use Simulated::connect or accept.
    Connection(std::shared_ptr<SimNetwork> net, std::shared_ptr<detail::SimLink> link, int side, Limits limits)
        : net_(std::move(net)), link_(std::move(link)), side_(side), limits_(std::move(limits)) {}
    ~Connection() override { close(); }

    /// Waits for the next frame and decodes it with the wire decoder. A request the network
    /// fails (SimNetworkOptions::request_failure) is answered by an error frame or dropped
    /// here, and the wait goes on.
    asio::awaitable<Frame> read_frame() {
      auto& inbox = link_->inbox[side_];
      for (;;) {
        while (inbox.empty()) {
          if (link_->closed) throw Error(errc::connection_closed, "simulated connection closed");
          co_await link_->readable[side_].wait(Deadline::max());
        }
        Buffer bytes = std::move(inbox.front());
        inbox.pop_front();
        Frame frame = decode_frame(bytes, limits_);
        if (frame.kind != FrameKind::request || frame.call_id == 0 || !net_->draw_request_failure(frame.method))
          co_return frame;
        if (!net_->options_.request_failure_reply()) continue;
        auto reply = Frame::make_error(frame.call_id, errc::remote_error,
                                       fmt::format("emulated request failure ({} on {})", frame.method, link_->host[side_]));
        const int to = 1 - side_;
        auto at = std::max(SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(net_->draw_latency()),
                           link_->last_delivery[to]);
        link_->last_delivery[to] = at;
        net_->stats_.frames_sent++;
        net_->deliver(link_, to, Buffer::adopt(encode_frame(reply).flatten()), at);
      }
    }

    /// Sends a frame: it arrives after the link's latency unless lost or partitioned. With a
    /// bandwidth limit the call returns once the frame has left the sender's uplink.
    asio::awaitable<void> write_frame(const EncodedFrame& f) {
      if (link_->closed) throw Error(errc::connection_closed, "simulated connection closed");
      auto& net = *net_;
      Buffer bytes = Buffer::adopt(f.flatten());
      net.stats_.frames_sent++;
      net.stats_.bytes_sent += bytes.size();
      const int to = 1 - side_;
      auto now = SteadyClock::now();
      auto leave = now;
      if (net.options_.bandwidth() > 0) {
        auto& free_at = net.uplink_free_[link_->host[side_]];
        leave = std::max(now, free_at) +
                std::chrono::duration_cast<SteadyClock::duration>(Seconds(bytes.size() / net.options_.bandwidth()));
        free_at = leave;
      }
      // The connection handshake (call id 0) is never lost: loss stands for lost messages,
      // while setting a connection up is as reliable as TCP's own handshake.
      std::uint64_t call_id = 0;
      if (f.head.size() >= 16) std::memcpy(&call_id, f.head.data() + 8, sizeof call_id);
      if (call_id != 0 && net.draw_loss()) {
        net.stats_.frames_lost++;
      } else {
        // Strictly after the previous frame: timers that expire at the same instant may fire in
        // any order, and frames on one connection arrive in order, as on TCP.
        auto at = std::max(leave + std::chrono::duration_cast<SteadyClock::duration>(net.draw_latency()),
                           link_->last_delivery[to] + SteadyClock::duration(1));
        link_->last_delivery[to] = at;
        net.deliver(link_, to, std::move(bytes), at);
      }
      if (leave > now) {
        asio::steady_timer wait(net.strand_, leave);
        co_await wait.async_wait(hive::detail::as_tuple_awaitable);
      }
    }

    /// Breaks the connection for both ends.
    void close() noexcept {
      if (!link_->closed) link_->close();
    }
    /// The other end's address.
    [[nodiscard]] std::string remote_address() const { return link_->address[1 - side_]; }

   private:
    std::shared_ptr<SimNetwork> net_;
    std::shared_ptr<detail::SimLink> link_;
    int side_;
    Limits limits_;
  };
  /// The connection type (net::Connection).
  using connection_type = Connection;

  /// A peer on `options.network()`; `executor` is unused (peers run on the network's strand)
  /// and exists so that every transport is built the same way.
  Simulated(const asio::any_io_executor& /*executor*/, Options options) : options_(std::move(options)) {
    HIVE_CHECK(options_.network() != nullptr, "Simulated::Options::network must be set");
    if (options_.host().empty()) options_.host(options_.network()->new_host());
  }
  /// Stops listening without blocking (the network forgets the address on its strand).
  ~Simulated() {
    if (!listener_ || !options_.network()) return;
    asio::post(options_.network()->strand_, [net = options_.network(), listener = listener_, address = address_] {
      auto it = net->listeners_.find(address);
      if (it != net->listeners_.end() && it->second == listener) net->close_listener(it);
    });
  }
  Simulated(Simulated&&) = default;

  /// The network's strand.
  [[nodiscard]] executor_type get_executor() const noexcept { return options_.network()->get_executor(); }
  /// The limits applied to incoming frames.
  [[nodiscard]] const Limits& limits() const noexcept { return options_.limits(); }
  /// This peer's host name.
  [[nodiscard]] const std::string& host() const noexcept { return options_.host(); }
  /// The network this peer is on.
  [[nodiscard]] const std::shared_ptr<SimNetwork>& network() const noexcept { return options_.network(); }

  /// Listens on this host at the port of `address` (0 picks one); returns "host:port".
  std::string listen(std::string_view address) {
    auto hp = HostPort::parse(address);
    auto& net = *options_.network();
    std::string bound;
    net.run([&] {
      std::uint16_t port = hp.port;
      if (port == 0) {
        port = 1;
        while (net.listeners_.contains(HostPort{host(), port}.str())) ++port;
      }
      bound = HostPort{host(), port}.str();
      if (net.listeners_.contains(bound)) throw Error(errc::invalid_argument, fmt::format("address {} is in use", bound));
      listener_ = std::make_shared<detail::SimListener>();
      listener_->limits = options_.limits();
      net.listeners_[bound] = listener_;
    });
    address_ = bound;
    return bound;
  }

  /// Waits for the next incoming connection; throws Error(shutdown) once closed.
  asio::awaitable<std::shared_ptr<Connection>> accept() {
    auto listener = listener_;
    if (!listener) throw Error(errc::invalid_argument, "accept() before listen()");
    for (;;) {
      if (listener->closed) throw Error(errc::shutdown, "listener closed");
      if (!listener->pending.empty()) {
        auto c = std::static_pointer_cast<Connection>(listener->pending.front());
        listener->pending.pop_front();
        co_return c;
      }
      co_await listener->ready.wait(Deadline::max());
    }
  }

  /// Connects to "host:port" before `deadline`, taking one emulated round trip.
  asio::awaitable<std::shared_ptr<Connection>> connect(std::string address, Deadline deadline) {
    auto net = options_.network();
    const auto target = HostPort::parse(address);
    auto sleep_until = [&](SteadyClock::time_point t) -> asio::awaitable<void> {
      asio::steady_timer timer(net->strand_, std::min(t, deadline));
      co_await timer.async_wait(hive::detail::as_tuple_awaitable);
    };
    auto one_way = [&] { return SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(net->draw_latency()); };
    co_await sleep_until(one_way());
    auto it = net->listeners_.find(target.str());
    const bool alive = it != net->listeners_.end() && !net->dead_.contains(target.host) && !net->dead_.contains(host());
    if (!alive && net->options_.refuse_dead()) {
      co_await sleep_until(one_way());
      if (SteadyClock::now() >= deadline) throw Error(errc::timeout, fmt::format("connecting to {} timed out", address));
      throw Error(errc::connection_refused, fmt::format("connection to {} refused", address));
    }
    if (!alive || !net->reachable(host(), target.host)) {
      co_await sleep_until(deadline);
      throw Error(errc::timeout, fmt::format("connecting to {} timed out", address));
    }
    auto link = std::make_shared<detail::SimLink>();
    link->host[0] = host();
    link->host[1] = target.host;
    link->address[0] = HostPort{host(), next_ephemeral_port_++}.str();
    link->address[1] = target.str();
    net->links_[host()].push_back(link);
    net->links_[target.host].push_back(link);
    auto server_side = std::make_shared<Connection>(net, link, 1, it->second->limits);
    it->second->pending.push_back(server_side);
    it->second->ready.notify_all();
    co_await sleep_until(one_way());
    if (link->closed) throw Error(errc::connection_closed, fmt::format("connection to {} broke while opening", address));
    co_return std::make_shared<Connection>(net, link, 0, options_.limits());
  }

  /// Stops listening.
  void close() {
    if (!listener_ || !options_.network()) return;
    auto& net = *options_.network();
    net.run([&] {
      auto it = net.listeners_.find(address_);
      if (it != net.listeners_.end() && it->second == listener_) net.close_listener(it);
      listener_->closed = true;
      listener_->ready.notify_all();
    });
    listener_.reset();
  }

 private:
  Options options_;
  std::shared_ptr<detail::SimListener> listener_;
  std::string address_;
  std::uint16_t next_ephemeral_port_ = 40000;
};

static_assert(Transport<Simulated>);

}  // namespace hive::net
