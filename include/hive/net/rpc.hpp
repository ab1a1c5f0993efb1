#pragma once
/// @file
/// Rpc<Transport>: request/response calls by method name over any net::Transport, with many
/// calls in flight on one persistent connection, per-call timeouts and back-pressure.

#include <hive/core/log.hpp>
#include <hive/core/message.hpp>
#include <hive/detail/event.hpp>
#include <hive/net/transport.hpp>

#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
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
  HIVE_OPTIONS_JSON(RpcOptions, request_timeout, connect_timeout, reply_timeout, max_concurrent_requests,
                    max_outgoing_connections)
};

/// What a handler knows about the call it serves.
struct CallContext {
  /// The caller's address as this peer sees it (its ephemeral port, not its listen port).
  std::string remote_address;
  /// The method called.
  std::string method;
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

  /// Creates a peer on `executor` with transport options `transport_options`.
  static std::shared_ptr<Rpc> create(const asio::any_io_executor& executor,
                                     typename T::Options transport_options = {}, RpcOptions options = {}) {
    return std::make_shared<Rpc>(Private{}, executor, std::move(transport_options), std::move(options));
  }
  /// Use create().
  Rpc(Private, const asio::any_io_executor& executor, typename T::Options transport_options, RpcOptions options)
      : transport_(executor, std::move(transport_options)), options_(std::move(options)) {}

  /// The strand every operation of this peer runs on.
  [[nodiscard]] executor_type get_executor() const noexcept { return transport_.get_executor(); }
  /// The transport.
  [[nodiscard]] T& transport() noexcept { return transport_; }
  /// The RPC options.
  [[nodiscard]] const RpcOptions& options() const noexcept { return options_; }

  /// Registers (or replaces) the handler of `method`.
  void add_handler(std::string method, Handler handler) {
    std::lock_guard lock(mutex_);
    handlers_[std::move(method)] = std::move(handler);
  }

  /// Registers the handler of `method` unless one is registered; false when one was.
  bool try_add_handler(std::string method, Handler handler) {
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

 private:
  using Connection = typename T::connection_type;

  /// One connection with its pending calls and write queue.
  struct Session : std::enable_shared_from_this<Session> {
    std::shared_ptr<Connection> conn;
    std::string key;  // pool key for outgoing sessions, empty for incoming
    std::unordered_map<std::uint64_t, detail::PendingCall*> pending;
    std::deque<detail::WriteItem*> queue;
    std::uint64_t next_call_id = 1;
    std::uint64_t write_generation = 0;
    std::uint32_t active_requests = 0;
    SteadyClock::time_point last_used = SteadyClock::now();
    bool writing = false;
    bool closed = false;

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
  }

  static asio::awaitable<void> accept_loop(std::shared_ptr<Rpc> self) {
    for (;;) {
      std::shared_ptr<Connection> conn;
      try {
        conn = co_await self->transport_.accept();
      } catch (const std::exception& e) {
        if (!self->closed_) log::debug("rpc", "no longer listening on {}: {}", self->listen_address(), e.what());
        co_return;
      }
      if (self->closed_) {
        conn->close();
        co_return;
      }
      auto session = std::make_shared<Session>();
      session->conn = std::move(conn);
      self->sessions_.insert(session);
      asio::co_spawn(self->get_executor(), read_loop(self, session), asio::detached);
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
          auto reply = std::make_shared<EncodedFrame>(encode_frame(Frame::make_error(
              frame.call_id, errc::limit_exceeded, "too many concurrent requests on this connection")));
          asio::co_spawn(self->get_executor(), send_reply(self, session, reply), asio::detached);
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
    Handler handler;
    {
      std::lock_guard lock(self->mutex_);
      if (auto it = self->handlers_.find(frame.method); it != self->handlers_.end()) handler = it->second;
    }
    Frame reply;
    if (!handler) {
      reply = Frame::make_error(frame.call_id, errc::unknown_method, fmt::format("unknown method '{}'", frame.method));
    } else {
      try {
        // Named locals, not temporaries, in the co_await: GCC 12 mishandles the latter.
        CallContext ctx{session->conn->remote_address(), frame.method};
        auto op = handler(std::move(ctx), std::move(frame.message));
        Message out = co_await std::move(op);
        reply = Frame{FrameKind::response, frame.call_id, {}, std::move(out)};
      } catch (const Error& e) {
        const bool ours = &e.code().category() == &error_category();
        reply = Frame::make_error(frame.call_id, ours ? static_cast<errc>(e.code().value()) : errc::remote_error, e.what());
      } catch (const std::exception& e) {
        reply = Frame::make_error(frame.call_id, errc::remote_error, e.what());
      } catch (...) {
        reply = Frame::make_error(frame.call_id, errc::remote_error, "handler threw a non-standard exception");
      }
    }
    std::shared_ptr<EncodedFrame> encoded;
    try {
      encoded = std::make_shared<EncodedFrame>(encode_frame(reply, self->transport_.limits()));
    } catch (const std::exception& e) {
      encoded = std::make_shared<EncodedFrame>(encode_frame(
          Frame::make_error(frame.call_id, errc::limit_exceeded, fmt::format("response not sent: {}", e.what()))));
    }
    session->active_requests--;
    co_await send_reply(self, session, encoded);
  }

  void forget(const std::shared_ptr<Session>& session) {
    sessions_.erase(session);
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
      if (!session->pending.empty() || session->writing || session->active_requests > 0) continue;
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
      auto conn = co_await transport_.connect(address, std::min(deadline, deadline_after(options_.connect_timeout())));
      if (closed_) {
        conn->close();
        throw Error(errc::shutdown, "rpc peer is closed");
      }
      auto session = std::make_shared<Session>();
      session->conn = std::move(conn);
      session->key = address;
      sessions_.insert(session);
      outgoing_[address] = session;
      asio::co_spawn(get_executor(), read_loop(this->shared_from_this(), session), asio::detached);
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
    const auto deadline = deadline_after(timeout.value_or(options_.request_timeout()));
    auto keep_alive = this->shared_from_this();
    auto session = co_await get_session(address, deadline);
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
        const bool known = code >= static_cast<int>(errc::timeout) && code <= static_cast<int>(errc::invalid_argument);
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
  bool closed_ = false;
};

}  // namespace hive::net
