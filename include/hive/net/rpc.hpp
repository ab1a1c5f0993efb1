#pragma once
/// @file
/// Rpc<Transport>: request/response calls by method name over any net::Transport, with many
/// calls in flight on one persistent connection, per-call timeouts and back-pressure.
///
/// Over 400 lines because the connection table, the accept loop with its caps, the call
/// multiplexer, the error mapping, and relaying (reservations pinned to connections, calls
/// forwarded over them, dial-backs) share one strand, one set of sessions and one set of limits.

#include <hive/core/log.hpp>
#include <hive/core/message.hpp>
#include <hive/detail/event.hpp>
#include <hive/net/handshake.hpp>
#include <hive/net/transport.hpp>

#include <atomic>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <unordered_map>

namespace hive::net {

/// Run-time knobs of the RPC layer.
struct RpcOptions {
  /// Timeout of a call when the caller gives none.
  HIVE_ARG(Seconds, request_timeout, Seconds(30));
  /// Longest time spent opening a connection (also bounded by the call's own timeout).
  HIVE_ARG(Seconds, connect_timeout, Seconds(5));
  /// Time a reply may take to be written before its connection is dropped.
  HIVE_ARG(Seconds, reply_timeout, Seconds(60));
  /// Requests handled at once per connection; beyond it callers get errc::limit_exceeded.
  HIVE_ARG(std::uint32_t, max_concurrent_requests, 4096);
  /// Outgoing connections kept open; opening one more first closes the least recently used
  /// idle one (so a peer that talks to thousands of others stays within its file limit).
  HIVE_ARG(std::uint32_t, max_outgoing_connections, 1024);
  /// Incoming connections kept open in all; a newcomer beyond it takes the place of the
  /// least recently active idle one, or is closed when none is idle.
  HIVE_ARG(std::uint32_t, max_incoming_connections, 4096);
  /// Incoming connections from one source (an IPv4 address, an IPv6 /64) at once; more are
  /// closed as they arrive. Loopback is not counted unless limit_loopback is set.
  HIVE_ARG(std::uint32_t, max_connections_per_source, 64);
  /// Apply max_connections_per_source to loopback addresses too (many peers of one machine
  /// share them, so by default they are exempt).
  HIVE_ARG(bool, limit_loopback, false);
  /// A connection with no call in flight either way and no frame for this long is closed:
  /// incoming ones after idle_timeout, outgoing ones after half of it (so that the caller,
  /// not the server, closes first and no call races a closing socket). 0 keeps them forever.
  HIVE_ARG(Seconds, idle_timeout, Seconds(300));
  /// Longest pause between accept() retries after the system refused one (for example, out
  /// of file descriptors); the pause starts at 10 ms and doubles up to this.
  HIVE_ARG(Seconds, accept_backoff_max, Seconds(1));
  /// Serve as a relay for peers that others cannot reach (behind NAT): hold their
  /// reservations and forward calls to them (docs/multihost.md, "Behind NAT").
  HIVE_ARG(bool, relay, true);
  /// Peers this relay holds reservations for at once; one more is refused with
  /// errc::limit_exceeded.
  HIVE_ARG(std::uint32_t, max_relay_reservations, 64);
  /// Calls this relay forwards at once; one more is refused with errc::limit_exceeded.
  HIVE_ARG(std::uint32_t, max_relayed_calls, 256);
  /// How long a reservation lasts unless renewed; holders renew every third of it. At most a day:
  /// holders refuse a longer one as malformed.
  HIVE_ARG(Seconds, relay_reservation_ttl, Seconds(120));
  /// Longest time a dial-back (checking whether another peer is reachable) may take.
  HIVE_ARG(Seconds, dial_back_timeout, Seconds(5));
  /// Dial-backs served at once; one more is refused with errc::limit_exceeded.
  HIVE_ARG(std::uint32_t, max_dial_backs, 8);
  /// File holding this peer's Ed25519 key (created with mode 0600 when missing, see
  /// hive::Identity::load_or_create); empty generates a new identity for this run. The peer id
  /// derives from the key, so a peer that keeps its file keeps its id and its DHT records.
  HIVE_ARG(std::string, identity_path, "");
  /// Longest time a new incoming connection may take to complete the handshake (prove its
  /// identity) before it is closed.
  HIVE_ARG(Seconds, handshake_timeout, Seconds(10));
  /// Offer to encrypt connections (docs/security.md, "Encryption"): a connection is encrypted
  /// when both sides offer it and the transport can (net::Tcp can, net::Simulated cannot).
  HIVE_ARG(bool, encrypt, true);
  /// Refuse a connection that would not be encrypted, with an error that says so (needs
  /// encrypt and a transport that can encrypt).
  HIVE_ARG(bool, require_encryption, false);
  HIVE_OPTIONS_JSON(RpcOptions, request_timeout, connect_timeout, reply_timeout, max_concurrent_requests,
                    max_outgoing_connections, max_incoming_connections, max_connections_per_source,
                    limit_loopback, idle_timeout, accept_backoff_max, relay, max_relay_reservations,
                    max_relayed_calls, relay_reservation_ttl, dial_back_timeout, max_dial_backs, identity_path,
                    handshake_timeout, encrypt, require_encryption)
};

/// What a handler knows about the call it serves.
struct CallContext {
  /// The caller's address as this peer sees it (its ephemeral port, not its listen port); for
  /// a call that came through a relay, as the relay saw it.
  std::string remote_address;
  /// The method called.
  std::string method;
  /// The relay the call came through ("host:port"), empty for a direct call.
  std::string relay;
  /// The caller's peer id, proven by the connection's handshake (hive::Identity). For a call
  /// that came through a relay, the id the relay's own handshake with the caller proved: the
  /// relay vouches for it.
  std::string peer;
};

/// The answer to a reachability check (Rpc::co_check_reachable).
struct DialBack {
  /// True when the helper connected to the address and found this peer there.
  bool reachable = false;
  /// The address the helper dialled: the host it sees this peer at, with the port asked.
  std::string address;
  /// Why the dial failed, empty when it worked.
  std::string error;
};

/// A reservation at a relay (Rpc::co_reserve).
struct Reservation {
  /// The relay's address.
  std::string relay;
  /// The address others call this peer at through the relay ("relay-host:port/relay/peer-id").
  std::string address;
  /// How long the reservation lasts unless renewed.
  Seconds ttl{0};
};

/// A typed method: a name plus the request and response types. Requests and responses
/// convert through MessageTraits (JSON by default).
template <class Request, class Response>
struct Method {
  /// The method's name on the wire.
  std::string_view name;
};

/// How a type becomes a Message and back. The default puts the value's JSON in the header;
/// specialize it for types that carry blobs (tensors).
template <class T>
struct MessageTraits {
  /// Encodes `value` as a message.
  static Message encode(const T& value) { return Message{nlohmann::json(value), {}}; }
  /// Decodes a message; throws on a mismatch.
  static T decode(Message&& m) { return m.header.template get<T>(); }
};
/// Messages pass through unchanged.
template <>
struct MessageTraits<Message> {
  /// Identity.
  static Message encode(const Message& m) { return m; }
  /// Identity.
  static Message decode(Message&& m) { return std::move(m); }
};

namespace detail {

/// A call waiting for its response.
struct PendingCall {
  hive::detail::Event done;
  std::optional<Frame> response;
  std::error_code error;
};

/// An error whose code and text reach the caller exactly as given (no "what(): code" suffix):
/// unknown methods, and a relayed callee's own error passed on by the relay.
struct ExactError {
  errc code;
  std::string text;
};

/// Counts one operation in flight for as long as it lives (strand-confined counters).
struct InFlight {
  std::uint32_t& n;
  explicit InFlight(std::uint32_t& counter) : n(counter) { ++n; }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;
  ~InFlight() { --n; }
};

/// A frame waiting to be written, with its completion.
struct WriteItem {
  const EncodedFrame* frame = nullptr;
  Deadline deadline;
  hive::detail::Event done;
  std::error_code error;
  bool started = false;
};

}  // namespace detail

/// Request/response calls over a transport.
///
/// Each peer has one Rpc. It listens (optionally), serves the handlers registered by method
/// name, and calls other peers, keeping one persistent connection per remote address with any
/// number of calls multiplexed on it. Handlers run as coroutines on the transport's strand:
/// move heavy work elsewhere and co_await it.
///
/// An unknown method, an undecodable frame or an exception thrown by a handler reaches the
/// caller as hive::RemoteError with the remote's message; the serving peer keeps serving.
///
/// @tparam T the net::Transport policy (net::Tcp, net::Simulated).
/// @par Thread safety
/// call(), async_call(), add_handler() and close() may be called from any thread; co_call()
/// from any coroutine. Create with Rpc::create() and call close() when done: coroutines keep
/// the object alive until they finish.
template <Transport T>
class Rpc : public std::enable_shared_from_this<Rpc<T>> {
  struct Private {};

 public:
  /// The transport policy.
  using transport_type = T;
  /// The strand this peer runs on.
  using executor_type = typename T::executor_type;
  /// A handler: takes the call's context and request, returns the response.
  using Handler = std::function<asio::awaitable<Message>(CallContext, Message)>;

  /// Creates a peer on `executor` with transport options `transport_options`, whose identity
  /// comes from options.identity_path() (a new one when empty). Throws hive::InvalidArgument
  /// when the identity file is unusable.
  static std::shared_ptr<Rpc> create(const asio::any_io_executor& executor,
                                     typename T::Options transport_options = {}, RpcOptions options = {}) {
    auto identity = options.identity_path().empty() ? Identity::generate() : Identity::load_or_create(options.identity_path());
    return create(executor, std::move(transport_options), std::move(options), std::move(identity));
  }
  /// Creates a peer with the given identity (options.identity_path() is ignored).
  static std::shared_ptr<Rpc> create(const asio::any_io_executor& executor, typename T::Options transport_options,
                                     RpcOptions options, Identity identity) {
    return std::make_shared<Rpc>(Private{}, executor, std::move(transport_options), std::move(options), std::move(identity));
  }
  /// Use create().
  Rpc(Private, const asio::any_io_executor& executor, typename T::Options transport_options, RpcOptions options,
      Identity identity)
      : transport_(executor, std::move(transport_options)),
        options_(std::move(options)),
        identity_(std::move(identity)),
        peer_id_(identity_.peer_id()) {
    HIVE_CHECK(!options_.require_encryption() || options_.encrypt(),
               "RpcOptions::require_encryption needs RpcOptions::encrypt (otherwise every connection is refused)");
    HIVE_CHECK(!options_.require_encryption() || EncryptingConnection<typename T::connection_type>,
               "RpcOptions::require_encryption needs a transport whose connections encrypt (net::Tcp's do, this one's do not)");
  }

  /// The strand every operation of this peer runs on.
  [[nodiscard]] executor_type get_executor() const noexcept { return transport_.get_executor(); }
  /// The transport.
  [[nodiscard]] T& transport() noexcept { return transport_; }
  /// The RPC options.
  [[nodiscard]] const RpcOptions& options() const noexcept { return options_; }

  /// Registers (or replaces) the handler of `method`.
  void add_handler(std::string method, Handler handler) {
    check_not_reserved(method);
    std::lock_guard lock(mutex_);
    handlers_[std::move(method)] = std::move(handler);
  }

  /// Registers the handler of `method` unless one is registered; false when one was.
  bool try_add_handler(std::string method, Handler handler) {
    check_not_reserved(method);
    std::lock_guard lock(mutex_);
    return handlers_.try_emplace(std::move(method), std::move(handler)).second;
  }

  /// Unregisters the handler of `method` (later calls get errc::unknown_method).
  void remove_handler(const std::string& method) {
    std::lock_guard lock(mutex_);
    handlers_.erase(method);
  }

  /// Registers a typed handler `f(CallContext, Request) -> awaitable<Response>`.
  template <class Request, class Response, class F>
  void serve(Method<Request, Response> method, F f) {
    add_handler(std::string(method.name), [f = std::move(f), name = method.name](CallContext ctx, Message m) -> asio::awaitable<Message> {
      Request request;
      try {
        request = MessageTraits<Request>::decode(std::move(m));
      } catch (const std::exception& e) {
        throw Error(errc::bad_header, fmt::format("bad request for {}: {}", name, e.what()));
      }
      auto op = f(std::move(ctx), std::move(request));
      Response response = co_await std::move(op);
      co_return MessageTraits<Response>::encode(response);
    });
  }

  /// Listens on "host:port" (port 0 picks one) and starts serving; returns the bound address.
  std::string listen(std::string_view address) {
    std::string bound;
    run_on_strand([&] {
      HIVE_CHECK(!closed_, "listen() after close()");
      bound = transport_.listen(address);
      {
        std::lock_guard lock(mutex_);
        listen_address_ = bound;
      }
      asio::co_spawn(get_executor(), accept_loop(this->shared_from_this()), asio::detached);
      start_sweeper();
    });
    return bound;
  }
  /// The address given by listen(), or empty.
  [[nodiscard]] std::string listen_address() const {
    std::lock_guard lock(mutex_);
    return listen_address_;
  }

  /// Calls `method` at `address` from a coroutine running anywhere; resumes on the caller's
  /// executor. Throws hive::Error (timeout, connection_*), hive::RemoteError.
  asio::awaitable<Message> co_call(std::string address, std::string method, Message request,
                                   std::optional<Seconds> timeout = std::nullopt) {
    auto here = co_await asio::this_coro::executor;
    if (here == asio::any_io_executor(get_executor()))
      co_return co_await call_on_strand(std::move(address), std::move(method), std::move(request), timeout);
    co_return co_await asio::co_spawn(get_executor(),
                                      call_on_strand(std::move(address), std::move(method), std::move(request), timeout),
                                      asio::use_awaitable);
  }

  /// Typed form of co_call.
  template <class Request, class Response>
  asio::awaitable<Response> co_call(std::string address, Method<Request, Response> method, const Request& request,
                                    std::optional<Seconds> timeout = std::nullopt) {
    Message reply = co_await co_call(std::move(address), std::string(method.name),
                                     MessageTraits<Request>::encode(request), timeout);
    try {
      co_return MessageTraits<Response>::decode(std::move(reply));
    } catch (const std::exception& e) {
      throw Error(errc::bad_header, fmt::format("bad response from {}: {}", method.name, e.what()));
    }
  }

  /// Initiates a call with a completion token (asio::use_future, asio::use_awaitable, a callback).
  template <class Token>
  auto async_call(std::string address, std::string method, Message request, std::optional<Seconds> timeout,
                  Token&& token) {
    return asio::co_spawn(get_executor(),
                          call_on_strand(std::move(address), std::move(method), std::move(request), timeout),
                          std::forward<Token>(token));
  }

  /// Blocking call; must not run on this peer's own threads.
  Message call(std::string address, std::string method, Message request, std::optional<Seconds> timeout = std::nullopt) {
    return async_call(std::move(address), std::move(method), std::move(request), timeout, asio::use_future).get();
  }

  /// Blocking typed call.
  template <class Request, class Response>
  Response call(std::string address, Method<Request, Response> method, const Request& request,
                std::optional<Seconds> timeout = std::nullopt) {
    return asio::co_spawn(get_executor(), co_call(std::move(address), method, request, timeout), asio::use_future).get();
  }

  /// This peer's id: its public key in base64url (hive::peer_id_of), proven to every peer it
  /// connects to by the handshake, named in its relayed addresses.
  [[nodiscard]] const std::string& peer_id() const noexcept { return peer_id_; }
  /// This peer's key pair.
  [[nodiscard]] const Identity& identity() const noexcept { return identity_; }

  /// The peer id proven by the connection to `address` (opened if needed): who answers there.
  /// Throws what connecting throws.
  asio::awaitable<std::string> co_peer_at(std::string address, std::optional<Seconds> timeout = std::nullopt) {
    auto op = [self = this->shared_from_this(), address = std::move(address), timeout]() -> asio::awaitable<std::string> {
      auto session = co_await self->get_session(address, deadline_after(timeout.value_or(self->options_.connect_timeout())));
      co_return session->peer;
    };
    auto spawned = asio::co_spawn(get_executor(), std::move(op), asio::use_awaitable);
    co_return co_await std::move(spawned);
  }

  /// Asks the peer at `helper` to dial this one back, on a fresh connection, at the host the
  /// helper sees it at with `port`, and to check that this peer's id answers there (AutoNAT's
  /// idea): whether peers elsewhere can reach this one. Throws what a call to `helper` throws.
  asio::awaitable<DialBack> co_check_reachable(std::string helper, std::uint16_t port) {
    const Seconds timeout = options_.dial_back_timeout() + options_.connect_timeout();
    Message request{nlohmann::json{{"port", port}, {"peer", peer_id_}}, {}};
    auto op = co_call(std::move(helper), std::string(dial_back_method), std::move(request), timeout);
    Message reply = co_await std::move(op);
    const auto& h = reply.header;
    if (!h.is_object() || !h.contains("reachable") || !h["reachable"].is_boolean())
      throw Error(errc::bad_header, "nat.dial_back's reply lacks 'reachable'");
    co_return DialBack{h["reachable"].get<bool>(), h.value("address", std::string()), h.value("error", std::string())};
  }

  /// Reserves at the relay at `relay` ("host:port"), or renews the reservation held there:
  /// the relay then forwards calls made to the returned address over this peer's connection
  /// to it, which stays open (never closed as idle) until release(). Renew within the ttl.
  /// Throws RemoteError(limit_exceeded) when the relay is full, RemoteError(unknown_method)
  /// when it does not relay, RemoteError(invalid_argument) when another connection holds
  /// this peer id there, and what any call to `relay` throws.
  asio::awaitable<Reservation> co_reserve(std::string relay) {
    auto op = [self = this->shared_from_this(), relay = std::move(relay)]() -> asio::awaitable<Reservation> {
      const auto token = self->reservation_tokens_[relay];
      Message request{nlohmann::json{{"peer", self->peer_id_}, {"token", token}}, {}};
      auto call = self->call_on_strand(relay, std::string(reserve_method), std::move(request), std::nullopt);
      Message reply = co_await std::move(call);
      const auto& h = reply.header;
      if (!h.is_object() || !h.contains("token") || !h["token"].is_string() || !h.contains("ttl") || !h["ttl"].is_number())
        throw Error(errc::bad_header, fmt::format("relay {} sent a reservation without 'token' and 'ttl'", relay));
      // Renewals are scheduled from the ttl: a NaN or an absurd one would overflow the clock.
      if (const double ttl = h["ttl"].get<double>(); !(ttl > 0 && ttl <= max_reservation_ttl_s))
        throw Error(errc::bad_header, fmt::format("relay {} sent a reservation ttl of {} s (0 to {} s expected)", relay, ttl,
                                                  max_reservation_ttl_s));
      self->reservation_tokens_[relay] = h["token"].get<std::string>();
      if (auto it = self->outgoing_.find(relay); it != self->outgoing_.end()) it->second->pinned = true;
      co_return Reservation{relay, RelayedAddress{relay, self->peer_id_}.str(), Seconds(h["ttl"].get<double>())};
    };
    auto spawned = asio::co_spawn(get_executor(), std::move(op), asio::use_awaitable);
    co_return co_await std::move(spawned);
  }

  /// Forgets the reservation at `relay`: its connection may again close when idle.
  void release(std::string relay) {
    asio::dispatch(get_executor(), [self = this->shared_from_this(), relay = std::move(relay)] {
      self->reservation_tokens_.erase(relay);
      if (auto it = self->outgoing_.find(relay); it != self->outgoing_.end()) it->second->pinned = false;
    });
  }

  /// True while this peer has an open connection to `address` that it opened itself (to a
  /// relay it reserved at, for one).
  asio::awaitable<bool> co_connected(std::string address) {
    auto op = [self = this->shared_from_this(), address = std::move(address)]() -> asio::awaitable<bool> {
      auto it = self->outgoing_.find(address);
      co_return it != self->outgoing_.end() && !it->second->closed;
    };
    auto spawned = asio::co_spawn(get_executor(), std::move(op), asio::use_awaitable);
    co_return co_await std::move(spawned);
  }

  /// Peers that hold a reservation at this relay now, for tests and stats.
  [[nodiscard]] std::size_t relay_reservations() {
    std::size_t n = 0;
    run_on_strand([&] {
      purge_reservations();
      n = reservations_.size();
    });
    return n;
  }
  /// Calls this peer forwarded as a relay, for tests and stats.
  [[nodiscard]] std::uint64_t relayed_calls() const noexcept { return relayed_calls_.load(); }

  /// Stops listening, closes every connection and fails pending calls with errc::shutdown.
  /// Idempotent; returns without waiting for coroutines to unwind.
  void close() {
    asio::dispatch(get_executor(), [self = this->shared_from_this()] { self->close_on_strand(); });
  }

  /// Number of open connections (incoming and outgoing), for tests and stats.
  [[nodiscard]] std::size_t connection_count() {
    std::size_t n = 0;
    run_on_strand([&] { n = sessions_.size(); });
    return n;
  }

  /// Times accept() failed and was retried (descriptor exhaustion, for one), for tests and stats.
  [[nodiscard]] std::uint64_t accept_failures() const noexcept { return accept_failures_.load(); }
  /// Incoming connections closed on arrival by max_connections_per_source or
  /// max_incoming_connections, for tests and stats.
  [[nodiscard]] std::uint64_t refused_connections() const noexcept { return refused_connections_.load(); }
  /// Requests refused by max_concurrent_requests, for tests and stats.
  [[nodiscard]] std::uint64_t refused_requests() const noexcept { return refused_requests_.load(); }

 private:
  using Connection = typename T::connection_type;

  EncryptionPolicy encryption_policy() const noexcept { return {options_.encrypt(), options_.require_encryption()}; }

  /// One connection with its pending calls and write queue.
  struct Session : std::enable_shared_from_this<Session> {
    std::shared_ptr<Connection> conn;
    std::string key;  // pool key for outgoing sessions, empty for incoming
    std::unordered_map<std::uint64_t, detail::PendingCall*> pending;
    std::deque<detail::WriteItem*> queue;
    std::uint64_t next_call_id = 1;
    std::uint64_t write_generation = 0;
    std::uint32_t active_requests = 0;  // requests being served or whose reply is unwritten
    std::uint32_t refusals = 0;         // "too many requests" replies not yet written
    std::string source;                 // AddressSource key of an incoming connection
    std::string peer;                   // the remote's peer id, proven by the handshake
    SteadyClock::time_point last_used = SteadyClock::now();
    SteadyClock::time_point last_activity = SteadyClock::now();  // last frame read or written
    bool writing = false;
    bool closed = false;
    bool pinned = false;  // carries a relay reservation (either side): never closed as idle

    bool idle() const noexcept {
      if (pinned) return false;
      if constexpr (requires { conn->receiving(); })
        if (conn->receiving()) return false;
      return pending.empty() && !writing && queue.empty() && active_requests == 0;
    }

    void fail(std::error_code ec) {
      if (closed) return;
      closed = true;
      conn->close();
      for (auto& [id, call] : pending) {
        call->error = ec;
        call->done.set();
      }
      pending.clear();
      for (auto* item : queue) {
        item->error = ec;
        item->done.set();
      }
      queue.clear();
    }

    // Writes `frame`; concurrent senders queue behind the one writing. A write that outlives
    // its deadline breaks the connection, since a partial frame cannot be taken back.
    asio::awaitable<void> send(const EncodedFrame& frame, Deadline deadline) {
      if (closed) throw Error(errc::connection_closed, "connection closed");
      detail::WriteItem item;
      item.frame = &frame;
      item.deadline = deadline;
      queue.push_back(&item);
      if (writing) {
        const bool done = co_await item.done.wait(deadline);
        if (!done && !item.started) {
          std::erase(queue, &item);
          throw Error(errc::timeout, "timed out waiting to send");
        }
        if (!done) co_await item.done.wait(Deadline::max());  // the writer's watchdog bounds this
      } else {
        writing = true;
        auto self = this->shared_from_this();
        while (!queue.empty() && !closed) {
          auto* next = queue.front();
          queue.pop_front();
          next->started = true;
          const auto generation = ++write_generation;
          asio::steady_timer watchdog(co_await asio::this_coro::executor, next->deadline);
          watchdog.async_wait([self, generation](std::error_code ec) {
            if (!ec && self->write_generation == generation && self->writing)
              self->fail(make_error_code(errc::timeout));
          });
          try {
            co_await conn->write_frame(*next->frame);
          } catch (const std::system_error& e) {
            next->error = closed ? make_error_code(errc::connection_closed) : e.code();
          }
          ++write_generation;
          watchdog.cancel();
          last_activity = SteadyClock::now();
          if (next->error) fail(next->error);
          next->done.set();
        }
        writing = false;
      }
      if (item.error == errc::timeout) throw Error(errc::timeout, "timed out while sending");
      if (item.error) throw Error(errc::connection_closed, fmt::format("connection closed while sending: {}", item.error.message()));
    }
  };

  template <class F>
  void run_on_strand(F&& f) {
    hive::detail::run_blocking_on(get_executor(), std::forward<F>(f));
  }

  void close_on_strand() {
    if (closed_) return;
    closed_ = true;
    sweeper_wake_.notify_all();
    transport_.close();
    auto sessions = sessions_;
    for (auto& s : sessions) s->fail(make_error_code(errc::shutdown));
    sessions_.clear();
    outgoing_.clear();
    for (auto& [address, c] : connecting_) {
      c->error = make_error_code(errc::shutdown);
      c->done.set();
    }
    connecting_.clear();
    reservations_.clear();
  }

  // Accepts until close(). A refused accept (EMFILE, ENFILE, ENOBUFS, ...) is retried after a
  // pause that doubles up to accept_backoff_max: the listener must outlive a burst that
  // exhausted descriptors, or the peer would be alive and unreachable for good.
  static asio::awaitable<void> accept_loop(std::shared_ptr<Rpc> self) {
    const Seconds first_pause(0.01);
    Seconds pause = first_pause;
    auto last_warning = SteadyClock::time_point{};
    for (;;) {
      std::shared_ptr<Connection> conn;
      try {
        conn = co_await self->transport_.accept();
        pause = first_pause;
      } catch (const std::exception& e) {
        if (self->closed_) co_return;
        // A listener that is gone (closed, or a simulated host that crashed) ends the loop;
        // anything else is a refusal of the moment.
        if (const auto* se = dynamic_cast<const std::system_error*>(&e);
            se && (se->code() == asio::error::operation_aborted || se->code() == asio::error::bad_descriptor ||
                   se->code() == errc::shutdown || se->code() == errc::invalid_argument))
          co_return;
        self->accept_failures_++;
        if (SteadyClock::now() - last_warning > std::chrono::seconds(10)) {
          last_warning = SteadyClock::now();
          log::warn("rpc", "accepting a connection on {} failed ({}); retrying", self->listen_address(), e.what());
        }
      }
      if (self->closed_) {
        if (conn) conn->close();
        co_return;
      }
      if (!conn) {
        co_await self->sweeper_wake_.wait(deadline_after(pause));
        pause = std::min(pause * 2, self->options_.accept_backoff_max());
        continue;
      }
      if (!self->admit(*conn)) {
        self->refused_connections_++;
        conn->close();
        continue;
      }
      auto session = std::make_shared<Session>();
      session->source = AddressSource::of(conn->remote_address()).key;
      session->conn = std::move(conn);
      self->incoming_per_source_[session->source]++;
      self->sessions_.insert(session);
      asio::co_spawn(self->get_executor(), serve_connection(self, session), asio::detached);
    }
  }

  // An incoming connection: the caller proves its identity first, then its calls are served.
  static asio::awaitable<void> serve_connection(std::shared_ptr<Rpc> self, std::shared_ptr<Session> session) {
    try {
      auto op = server_handshake(session->conn, self->identity_, deadline_after(self->options_.handshake_timeout()),
                                 self->encryption_policy());
      session->peer = co_await std::move(op);
      session->last_activity = SteadyClock::now();
    } catch (const std::exception& e) {
      log::debug("rpc", "closing a connection from {}: {}", session->conn->remote_address(), e.what());
      session->fail(make_error_code(errc::connection_refused));
      self->forget(session);
      co_return;
    }
    co_await read_loop(self, session);
  }

  // Whether a newly accepted connection may stay: within its source's share, and within the
  // total (making room by closing the least recently active idle incoming connection).
  bool admit(const Connection& conn) {
    const auto source = AddressSource::of(conn.remote_address());
    if (!source.loopback || options_.limit_loopback()) {
      auto it = incoming_per_source_.find(source.key);
      if (it != incoming_per_source_.end() && it->second >= options_.max_connections_per_source()) {
        log::debug("rpc", "closing a connection from {}: {} connections from that source already", conn.remote_address(),
                   it->second);
        return false;
      }
    }
    std::size_t incoming = 0;
    std::shared_ptr<Session> victim;
    for (const auto& session : sessions_) {
      if (!session->key.empty()) continue;
      ++incoming;
      if (session->idle() && (!victim || session->last_activity < victim->last_activity)) victim = session;
    }
    if (incoming < options_.max_incoming_connections()) return true;
    if (!victim) {
      log::debug("rpc", "closing a connection from {}: {} incoming connections, none idle", conn.remote_address(), incoming);
      return false;
    }
    victim->fail(make_error_code(errc::connection_closed));
    forget(victim);
    return true;
  }

  // Closes connections that stayed idle past idle_timeout (outgoing: half of it).
  void start_sweeper() {
    if (sweeper_started_ || options_.idle_timeout().count() <= 0) return;
    sweeper_started_ = true;
    asio::co_spawn(get_executor(), sweep(this->weak_from_this(), options_.idle_timeout()), asio::detached);
  }

  static asio::awaitable<void> sweep(std::weak_ptr<Rpc> weak, Seconds idle_timeout) {
    const Seconds tick = std::min(Seconds(5), idle_timeout / 4);
    for (;;) {
      {
        auto self = weak.lock();
        if (!self || self->closed_) co_return;
        const auto now = SteadyClock::now();
        std::vector<std::shared_ptr<Session>> expired;
        for (const auto& session : self->sessions_) {
          const Seconds limit = session->key.empty() ? idle_timeout : idle_timeout / 2;
          if (session->idle() && now - session->last_activity > limit) expired.push_back(session);
        }
        for (auto& session : expired) {
          log::debug("rpc", "closing idle connection with {}", session->conn->remote_address());
          session->fail(make_error_code(errc::connection_closed));
          self->forget(session);
        }
      }
      // No strong reference while waiting: an Rpc nobody holds is destroyed, and the next tick
      // ends this loop.
      asio::steady_timer timer(co_await asio::this_coro::executor, deadline_after(tick));
      co_await timer.async_wait(hive::detail::as_tuple_awaitable);
    }
  }

  static asio::awaitable<void> read_loop(std::shared_ptr<Rpc> self, std::shared_ptr<Session> session) {
    std::error_code reason = make_error_code(errc::connection_closed);
    while (!session->closed) {
      Frame frame;
      std::shared_ptr<EncodedFrame> complaint;
      bool fatal = false;
      try {
        frame = co_await session->conn->read_frame();
        session->last_activity = SteadyClock::now();
      } catch (const FrameError& e) {
        log::debug("rpc", "bad frame from {}: {}", session->conn->remote_address(), e.what());
        // Tell the sender what was wrong; on a fatal error the stream is then closed.
        complaint = std::make_shared<EncodedFrame>(
            encode_frame(Frame::make_error(e.call_id(), static_cast<errc>(e.code().value()), e.what())));
        fatal = e.fatal();
        reason = e.code();
      } catch (const std::system_error& e) {
        reason = e.code() == asio::error::eof ? make_error_code(errc::connection_closed) : e.code();
        break;
      } catch (const std::exception& e) {
        // std::bad_alloc above all: this connection's frame could not be held; others go on.
        log::debug("rpc", "closing connection with {}: {}", session->conn->remote_address(), e.what());
        reason = make_error_code(errc::limit_exceeded);
        break;
      }
      if (complaint && fatal) {
        // A last word before closing; short, since a hostile peer may not read it.
        co_await send_reply(self, session, complaint, Seconds(1));
        break;
      }
      if (complaint) {
        asio::co_spawn(self->get_executor(), send_reply(self, session, complaint), asio::detached);
        continue;
      }
      if (frame.kind == FrameKind::request) {
        if (session->active_requests >= self->options_.max_concurrent_requests()) {
          // A caller that keeps sending while its replies pile up unread is not reading them:
          // refusals are bounded too, then the connection closes.
          if (session->refusals >= self->options_.max_concurrent_requests()) {
            log::debug("rpc", "closing connection with {}: it does not read its replies", session->conn->remote_address());
            reason = make_error_code(errc::limit_exceeded);
            break;
          }
          auto reply = std::make_shared<EncodedFrame>(encode_frame(Frame::make_error(
              frame.call_id, errc::limit_exceeded, "too many concurrent requests on this connection")));
          session->refusals++;
          self->refused_requests_++;
          asio::co_spawn(self->get_executor(), [self, session, reply]() -> asio::awaitable<void> {
            co_await send_reply(self, session, reply);
            session->refusals--;
          }, asio::detached);
          continue;
        }
        session->active_requests++;
        asio::co_spawn(self->get_executor(), serve_request(self, session, std::move(frame)), asio::detached);
      } else {
        auto it = session->pending.find(frame.call_id);
        if (it == session->pending.end()) continue;  // the caller gave up (timeout) before it came
        it->second->response = std::move(frame);
        it->second->done.set();
        session->pending.erase(it);
      }
    }
    session->fail(reason);
    self->forget(session);
  }

  static asio::awaitable<void> send_reply(std::shared_ptr<Rpc> self, std::shared_ptr<Session> session,
                                          std::shared_ptr<EncodedFrame> reply,
                                          std::optional<Seconds> timeout = std::nullopt) {
    try {
      co_await session->send(*reply, deadline_after(timeout.value_or(self->options_.reply_timeout())));
    } catch (const std::exception& e) {
      log::debug("rpc", "could not send a reply to {}: {}", session->conn->remote_address(), e.what());
    }
  }

  static asio::awaitable<void> serve_request(std::shared_ptr<Rpc> self, std::shared_ptr<Session> session, Frame frame) {
    Frame reply;
    try {
      // Named locals, not temporaries, in the co_await: GCC 12 mishandles the latter.
      CallContext ctx{session->conn->remote_address(), frame.method, {}, session->peer};
      auto op = self->dispatch(session, std::move(ctx), std::move(frame.message));
      Message out = co_await std::move(op);
      reply = Frame{FrameKind::response, frame.call_id, {}, std::move(out)};
    } catch (const detail::ExactError& e) {
      reply = Frame::make_error(frame.call_id, e.code, e.text);
    } catch (const Error& e) {
      const bool ours = &e.code().category() == &error_category();
      reply = Frame::make_error(frame.call_id, ours ? static_cast<errc>(e.code().value()) : errc::remote_error, e.what());
    } catch (const std::exception& e) {
      reply = Frame::make_error(frame.call_id, errc::remote_error, e.what());
    } catch (...) {
      reply = Frame::make_error(frame.call_id, errc::remote_error, "handler threw a non-standard exception");
    }
    std::shared_ptr<EncodedFrame> encoded;
    try {
      encoded = std::make_shared<EncodedFrame>(encode_frame(reply, self->transport_.limits()));
    } catch (const std::exception& e) {
      encoded = std::make_shared<EncodedFrame>(encode_frame(
          Frame::make_error(frame.call_id, errc::limit_exceeded, fmt::format("response not sent: {}", e.what()))));
    }
    // The request counts until its reply is written: a caller that does not read its replies
    // holds at most max_concurrent_requests of them in this peer's memory.
    co_await send_reply(self, session, encoded);
    session->active_requests--;
  }

  // The handler of ctx.method, or this peer's own relay and reachability methods.
  asio::awaitable<Message> dispatch(std::shared_ptr<Session> session, CallContext ctx, Message m) {
    if (reserved(ctx.method)) {
      auto op = builtin(std::move(session), std::move(ctx), std::move(m));
      co_return co_await std::move(op);
    }
    Handler handler;
    {
      std::lock_guard lock(mutex_);
      if (auto it = handlers_.find(ctx.method); it != handlers_.end()) handler = it->second;
    }
    if (!handler) throw detail::ExactError{errc::unknown_method, fmt::format("unknown method '{}'", ctx.method)};
    auto op = handler(std::move(ctx), std::move(m));
    co_return co_await std::move(op);
  }

  // ---- relays and reachability (docs/multihost.md, "Behind NAT") ------------------------------

  static constexpr std::string_view dial_back_method = "nat.dial_back", whoami_method = "nat.whoami",
                                    reserve_method = "relay.reserve", forward_method = "relay.forward",
                                    deliver_method = "relay.deliver";
  /// The longest reservation ttl a relay may grant (a day); a longer one is refused as malformed.
  static constexpr double max_reservation_ttl_s = 86400;

  static bool reserved(std::string_view method) { return method.starts_with("relay.") || method.starts_with("nat."); }
  static void check_not_reserved(std::string_view method) {
    HIVE_CHECK(!reserved(method), "method names starting with 'relay.' or 'nat.' are the RPC layer's own, got '{}'", method);
  }
  static std::string string_field(const nlohmann::json& h, const char* name, std::string_view method) {
    if (!h.is_object() || !h.contains(name) || !h[name].is_string())
      throw Error(errc::bad_header, fmt::format("{} needs '{}' (a string)", method, name));
    return h[name].get<std::string>();
  }

  asio::awaitable<Message> builtin(std::shared_ptr<Session> session, CallContext ctx, Message m) {
    if (ctx.method == whoami_method) co_return Message{nlohmann::json{{"peer", peer_id_}}, {}};
    if (ctx.method == dial_back_method) {
      auto op = serve_dial_back(std::move(ctx), std::move(m.header));
      co_return co_await std::move(op);
    }
    if (ctx.method == reserve_method) co_return serve_reserve(session, m.header);
    if (ctx.method == forward_method) {
      auto op = serve_forward(std::move(ctx), std::move(m));
      co_return co_await std::move(op);
    }
    if (ctx.method == deliver_method) {
      // Calls a relay forwards arrive over a connection this peer opened to it; anyone else
      // could claim any caller address with them.
      if (session->key.empty()) throw Error(errc::invalid_argument, "relay.deliver comes only from a relay this peer called");
      auto method = string_field(m.header, "method", deliver_method);
      if (method.starts_with("relay.")) throw Error(errc::bad_header, "a relayed call cannot name a relay method");
      CallContext inner{string_field(m.header, "from", deliver_method), std::move(method), session->key,
                        m.header.value("from_peer", std::string())};
      Message request{std::move(m.header["header"]), std::move(m.blobs)};
      auto op = dispatch(session, std::move(inner), std::move(request));
      co_return co_await std::move(op);
    }
    throw detail::ExactError{errc::unknown_method, fmt::format("unknown method '{}'", ctx.method)};
  }

  // Dials the caller back on a fresh connection, at the host it called from with the port it
  // names (never another host: a dial-back cannot be aimed at third parties), and asks who
  // answers there.
  asio::awaitable<Message> serve_dial_back(CallContext ctx, nlohmann::json h) {
    if (!h.is_object() || !h.contains("port") || !h["port"].is_number_unsigned() || h["port"].get<std::uint64_t>() == 0 ||
        h["port"].get<std::uint64_t>() > 65535)
      throw Error(errc::bad_header, "nat.dial_back needs 'port' (1..65535)");
    const auto peer = string_field(h, "peer", dial_back_method);
    if (dial_backs_ >= options_.max_dial_backs())
      throw Error(errc::limit_exceeded, fmt::format("{} dial-backs in progress, the limit", dial_backs_));
    const auto address = HostPort{HostPort::parse(ctx.remote_address).host, h["port"].get<std::uint16_t>()}.str();
    const detail::InFlight counted{dial_backs_};
    nlohmann::json reply{{"reachable", false}, {"address", address}};
    std::shared_ptr<Connection> conn;
    try {
      const auto deadline = deadline_after(options_.dial_back_timeout());
      conn = co_await transport_.connect(address, deadline);
      // The handshake proves who answers there; nothing else is asked.
      auto op = client_handshake(conn, identity_, deadline, encryption_policy());
      const auto answered = co_await std::move(op);
      if (answered == peer)
        reply["reachable"] = true;
      else
        reply["error"] = "another peer answers at that address";
    } catch (const std::exception& e) {
      reply["error"] = e.what();
    }
    if (conn) conn->close();
    co_return Message{std::move(reply), {}};
  }

  Message serve_reserve(const std::shared_ptr<Session>& session, const nlohmann::json& h) {
    if (!options_.relay()) throw Error(errc::unknown_method, "this peer does not relay (its RpcOptions::relay is off)");
    if (!session->key.empty()) throw Error(errc::invalid_argument, "reserve over a connection you opened to the relay");
    const auto peer = string_field(h, "peer", reserve_method);
    if (!RelayedAddress::valid_peer_id(peer)) throw Error(errc::bad_header, "relay.reserve: a peer id is 1 to 64 of [0-9a-zA-Z_-]");
    if (peer != session->peer)
      throw Error(errc::invalid_argument, fmt::format("relay.reserve: this connection proved peer id {}, not {}", session->peer, peer));
    const auto token = h.is_object() && h.contains("token") && h["token"].is_string() ? h["token"].get<std::string>() : "";
    purge_reservations();
    auto it = reservations_.find(peer);
    if (it != reservations_.end()) {
      auto holder = it->second.session.lock();
      if (holder && holder != session) {
        // Its owner on a new connection (it proves so with the token) takes over; nobody else.
        if (token.empty() || token != it->second.token)
          throw Error(errc::invalid_argument, fmt::format("peer id {} is reserved here by another connection", peer));
        holder->pinned = false;
      }
    } else {
      if (reservations_.size() >= options_.max_relay_reservations())
        throw Error(errc::limit_exceeded,
                    fmt::format("this relay holds {} reservations, its limit (max_relay_reservations)", reservations_.size()));
      it = reservations_.emplace(peer, RelaySlot{{}, random_hex(16), {}}).first;
    }
    it->second.session = session;
    it->second.expires = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(options_.relay_reservation_ttl());
    session->pinned = true;
    return Message{nlohmann::json{{"token", it->second.token}, {"ttl", options_.relay_reservation_ttl().count()}}, {}};
  }

  // Drops reservations that expired or whose connection closed.
  void purge_reservations() {
    const auto now = SteadyClock::now();
    std::erase_if(reservations_, [&](const auto& entry) {
      auto holder = entry.second.session.lock();
      if (holder && !holder->closed && entry.second.expires > now) return false;
      if (holder) holder->pinned = false;
      return true;
    });
  }

  asio::awaitable<Message> serve_forward(CallContext ctx, Message m) {
    if (!options_.relay()) throw Error(errc::unknown_method, "this peer does not relay (its RpcOptions::relay is off)");
    auto to = string_field(m.header, "to", forward_method);
    auto method = string_field(m.header, "method", forward_method);
    if (method.starts_with("relay.")) throw Error(errc::bad_header, "a relayed call cannot name a relay method");
    purge_reservations();
    auto it = reservations_.find(to);
    auto target = it == reservations_.end() ? nullptr : it->second.session.lock();
    if (!target) throw Error(errc::connection_refused, fmt::format("peer {} holds no reservation at this relay", to));
    if (relayed_in_flight_ >= options_.max_relayed_calls())
      throw Error(errc::limit_exceeded,
                  fmt::format("this relay carries {} calls, its limit (max_relayed_calls)", relayed_in_flight_));
    Seconds timeout = options_.request_timeout();
    if (m.header.contains("timeout") && m.header["timeout"].is_number() && m.header["timeout"].get<double>() > 0)
      timeout = std::min(timeout, Seconds(m.header["timeout"].get<double>()));
    const detail::InFlight counted{relayed_in_flight_};
    ++relayed_calls_;
    Message inner{nlohmann::json{{"from", ctx.remote_address},
                                 {"from_peer", ctx.peer},
                                 {"method", std::move(method)},
                                 {"header", std::move(m.header["header"])}},
                  std::move(m.blobs)};
    try {
      auto op = call_over(target, fmt::format("peer {} through this relay", to), std::string(deliver_method),
                          std::move(inner), deadline_after(timeout));
      co_return co_await std::move(op);
    } catch (const RemoteError& e) {
      // The target's own answer reaches the caller as a direct call's would.
      throw detail::ExactError{static_cast<errc>(e.code().value()), e.remote_message()};
    }
  }

  // Hex of `bytes` bytes from the system's entropy source (getrandom): peer ids are public and
  // reservation tokens must not be guessable from them, so no seeded generator.
  static std::string random_hex(std::size_t bytes) {
    std::random_device entropy;
    std::string out;
    for (std::size_t i = 0; i < bytes; ++i) out += fmt::format("{:02x}", entropy() & 0xffu);
    return out;
  }

  void forget(const std::shared_ptr<Session>& session) {
    if (sessions_.erase(session) && session->key.empty()) {
      if (auto it = incoming_per_source_.find(session->source); it != incoming_per_source_.end() && --it->second == 0)
        incoming_per_source_.erase(it);
    }
    if (!session->key.empty()) {
      auto it = outgoing_.find(session->key);
      if (it != outgoing_.end() && it->second == session) outgoing_.erase(it);
    }
  }

  // Closes the least recently used idle outgoing connection when at the cap.
  void evict_idle_outgoing() {
    if (outgoing_.size() < options_.max_outgoing_connections()) return;
    std::shared_ptr<Session> victim;
    for (auto& [address, session] : outgoing_) {
      if (session->pinned || !session->pending.empty() || session->writing || session->active_requests > 0) continue;
      if (!victim || session->last_used < victim->last_used) victim = session;
    }
    if (!victim) return;  // all busy: go over the cap rather than fail calls
    victim->fail(make_error_code(errc::connection_closed));
    forget(victim);
  }

  struct Connecting {
    hive::detail::Event done;
    std::shared_ptr<Session> session;
    std::error_code error;
    std::string message;
  };

  asio::awaitable<std::shared_ptr<Session>> get_session(const std::string& address, Deadline deadline) {
    if (closed_) throw Error(errc::shutdown, "rpc peer is closed");
    if (auto it = outgoing_.find(address); it != outgoing_.end() && !it->second->closed) {
      it->second->last_used = SteadyClock::now();
      co_return it->second;
    }
    if (auto it = connecting_.find(address); it != connecting_.end()) {
      auto c = it->second;
      if (!co_await c->done.wait(deadline)) throw Error(errc::timeout, fmt::format("connecting to {} timed out", address));
      if (c->session) co_return c->session;
      throw Error(c->error, c->message);
    }
    auto c = std::make_shared<Connecting>();
    connecting_[address] = c;
    evict_idle_outgoing();
    try {
      const auto connect_deadline = std::min(deadline, deadline_after(options_.connect_timeout()));
      auto conn = co_await transport_.connect(address, connect_deadline);
      if (closed_) {
        conn->close();
        throw Error(errc::shutdown, "rpc peer is closed");
      }
      auto handshake = client_handshake(conn, identity_, connect_deadline, encryption_policy());
      std::string peer;
      try {
        peer = co_await std::move(handshake);
      } catch (const std::system_error& e) {
        conn->close();
        if (&e.code().category() == &error_category()) throw;
        throw Error(errc::connection_closed, fmt::format("handshake with {} failed: {}", address, e.what()));
      }
      if (closed_) {
        conn->close();
        throw Error(errc::shutdown, "rpc peer is closed");
      }
      auto session = std::make_shared<Session>();
      session->peer = std::move(peer);
      session->conn = std::move(conn);
      session->key = address;
      sessions_.insert(session);
      outgoing_[address] = session;
      asio::co_spawn(get_executor(), read_loop(this->shared_from_this(), session), asio::detached);
      start_sweeper();
      c->session = session;
    } catch (const std::system_error& e) {
      c->error = e.code();
      c->message = e.what();
    }
    if (auto it = connecting_.find(address); it != connecting_.end() && it->second == c) connecting_.erase(it);
    c->done.set();
    if (!c->session) throw Error(c->error, c->message);
    co_return c->session;
  }

  asio::awaitable<Message> call_on_strand(std::string address, std::string method, Message request,
                                          std::optional<Seconds> timeout) {
    const Seconds limit = timeout.value_or(options_.request_timeout());
    const auto deadline = deadline_after(limit);
    auto keep_alive = this->shared_from_this();
    std::string label = address;
    if (RelayedAddress::is_relayed(address)) {
      // A peer behind a relay: the relay forwards the call over the peer's connection to it.
      auto relayed = RelayedAddress::parse(address);
      request.header = nlohmann::json{{"to", std::move(relayed.peer)},
                                      {"method", std::move(method)},
                                      {"header", std::move(request.header)},
                                      {"timeout", limit.count()}};
      method = std::string(forward_method);
      address = std::move(relayed.relay);
    }
    auto session = co_await get_session(address, deadline);
    auto op = call_over(std::move(session), label, std::move(method), std::move(request), deadline);
    co_return co_await std::move(op);
  }

  // Sends a request over `session` and waits for its response; `address` names the callee in
  // errors.
  asio::awaitable<Message> call_over(std::shared_ptr<Session> session, std::string address, std::string method,
                                     Message request, Deadline deadline) {
    const std::uint64_t id = session->next_call_id++;
    const EncodedFrame encoded = encode_frame(Frame{FrameKind::request, id, std::move(method), std::move(request)},
                                              transport_.limits());
    detail::PendingCall call;
    session->pending[id] = &call;
    struct Forget {
      Session& s;
      std::uint64_t id;
      ~Forget() { s.pending.erase(id); }
    } forget{*session, id};
    co_await session->send(encoded, deadline);
    if (!call.done.is_set()) co_await call.done.wait(deadline);
    if (call.response) {
      Frame& f = *call.response;
      if (f.kind == FrameKind::error) {
        int code = f.message.header["code"].template get<int>();
        auto text = f.message.header["message"].template get<std::string>();
        const bool known = code >= static_cast<int>(errc::timeout) && code <= static_cast<int>(errc::round_failed);
        throw RemoteError(known ? static_cast<errc>(code) : errc::remote_error, std::move(text));
      }
      co_return std::move(f.message);
    }
    if (call.error == errc::shutdown) throw Error(errc::shutdown, "rpc peer is closed");
    if (call.error) throw Error(errc::connection_closed, fmt::format("connection to {} lost: {}", address, call.error.message()));
    throw Error(errc::timeout, fmt::format("call to {} timed out", address));
  }

  T transport_;
  RpcOptions options_;
  mutable std::mutex mutex_;  // guards handlers_ and listen_address_, read from any thread
  std::unordered_map<std::string, Handler> handlers_;
  std::string listen_address_;
  std::set<std::shared_ptr<Session>> sessions_;
  std::unordered_map<std::string, std::shared_ptr<Session>> outgoing_;
  std::unordered_map<std::string, std::shared_ptr<Connecting>> connecting_;
  std::unordered_map<std::string, std::size_t> incoming_per_source_;
  hive::detail::Notifier sweeper_wake_;  // wakes the accept back-off at close()
  std::atomic<std::uint64_t> accept_failures_{0};
  std::atomic<std::uint64_t> refused_connections_{0};
  std::atomic<std::uint64_t> refused_requests_{0};
  // Relaying: the reservations this peer holds for others, and (as a reserving peer) the
  // token each relay gave it, to take its reservation over to a new connection.
  struct RelaySlot {
    std::weak_ptr<Session> session;
    std::string token;
    SteadyClock::time_point expires;
  };
  std::unordered_map<std::string, RelaySlot> reservations_;
  std::unordered_map<std::string, std::string> reservation_tokens_;
  std::uint32_t relayed_in_flight_ = 0;
  std::uint32_t dial_backs_ = 0;
  std::atomic<std::uint64_t> relayed_calls_{0};
  const Identity identity_;
  const std::string peer_id_;
  bool sweeper_started_ = false;
  bool closed_ = false;
};

}  // namespace hive::net
