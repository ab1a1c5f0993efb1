#pragma once
/// @file
/// net::Tcp: the transport over real TCP sockets (IPv4 and IPv6) on standalone Asio.

#include <hive/core/log.hpp>
#include <hive/net/transport.hpp>

#include <asio/connect.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/ip/v6_only.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/write.hpp>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace hive::net {

/// Run-time knobs of the TCP transport (Tcp::Options).
struct TcpOptions {
  /// Bounds on what this peer accepts from the network.
  HIVE_ARG(Limits, limits, Limits{});
  /// Size of each connection's read-ahead buffer; frames smaller than this need one read.
  HIVE_ARG(std::size_t, read_buffer_bytes, 64 * 1024);
  /// Kernel socket buffer size (SO_SNDBUF/SO_RCVBUF) in bytes; 0 keeps the system default.
  HIVE_ARG(int, socket_buffer_bytes, 0);
  /// Listen backlog.
  HIVE_ARG(int, backlog, 1024);
  /// Once a frame's first byte has arrived, the whole frame must arrive within this time plus
  /// its size at min_receive_rate; otherwise the connection closes (a sender that stalls
  /// mid-frame holds nothing for long).
  HIVE_ARG(Seconds, frame_timeout, Seconds(30));
  /// Slowest sending rate tolerated within a frame, in bytes per second (see frame_timeout).
  HIVE_ARG(double, min_receive_rate, 16.0 * 1024);
  /// A frame body larger than this is received into a buffer that grows as its bytes arrive
  /// (doubling), so a size claimed in a frame prefix costs memory only once it is sent.
  HIVE_ARG(std::size_t, preallocate_bytes, std::size_t{1} << 20);
  HIVE_OPTIONS_JSON(TcpOptions, limits, read_buffer_bytes, socket_buffer_bytes, backlog, frame_timeout,
                    min_receive_rate, preallocate_bytes)
};


/// The TCP transport: frames over persistent TCP connections (TCP_NODELAY), with a read-ahead
/// buffer so that small frames cost one system call and large payloads are read straight into
/// their final buffer. Send buffers are written with scatter-gather I/O, without copying blobs.
///
/// @par Thread safety
/// All operations must run on get_executor() (the RPC layer does so).
class Tcp {
 public:
  /// Run-time knobs of the TCP transport.
  using Options = TcpOptions;

  /// The strand every operation of this transport runs on.
  using executor_type = asio::strand<asio::any_io_executor>;

  /// One TCP connection carrying frames.
  class Connection : public std::enable_shared_from_this<Connection> {
   public:
    /// Wraps a connected socket.
    Connection(asio::ip::tcp::socket socket, const Options& options)
        : socket_(std::move(socket)),
          limits_(options.limits()),
          frame_timeout_(options.frame_timeout()),
          min_rate_(options.min_receive_rate()),
          preallocate_(std::max<std::size_t>(options.preallocate_bytes(), 1)),
          rbuf_(std::max<std::size_t>(options.read_buffer_bytes(), prefix_bytes)),
          watchdog_(socket_.get_executor()) {
      std::error_code ec;
      socket_.set_option(asio::ip::tcp::no_delay(true), ec);
      if (options.socket_buffer_bytes() > 0) {
        socket_.set_option(asio::socket_base::send_buffer_size(options.socket_buffer_bytes()), ec);
        socket_.set_option(asio::socket_base::receive_buffer_size(options.socket_buffer_bytes()), ec);
      }
      auto ep = socket_.remote_endpoint(ec);
      if (!ec) remote_ = HostPort{ep.address().to_string(), ep.port()}.str();
    }

    /// Reads and decodes the next frame. Waiting for a frame to start has no time limit (the
    /// RPC layer closes idle connections); once it started it must end within frame_timeout
    /// plus its size at min_receive_rate, or this throws hive::Error(errc::timeout).
    asio::awaitable<Frame> read_frame() {
      co_await fill(1);
      arm_watchdog(prefix_bytes);
      try {
        co_await fill(prefix_bytes);
        const auto prefix = parse_prefix(std::span<const std::byte, prefix_bytes>(rbuf_.data() + begin_, prefix_bytes), limits_);
        begin_ += prefix_bytes;
        const std::uint64_t rest = prefix.rest_bytes();
        arm_watchdog(prefix.frame_bytes);
        const std::size_t have = std::min<std::uint64_t>(rest, end_ - begin_);
        // Small bodies get their final buffer at once; a large one grows as its bytes arrive.
        std::uint64_t capacity = rest <= preallocate_ ? rest : std::max<std::uint64_t>(preallocate_, have);
        auto storage = std::make_shared_for_overwrite<std::byte[]>(std::max<std::uint64_t>(capacity, 1));
        std::memcpy(storage.get(), rbuf_.data() + begin_, have);
        begin_ += have;
        std::uint64_t got = have;
        while (got < rest) {
          if (got == capacity) {
            const std::uint64_t grown = std::min<std::uint64_t>(rest, capacity * 2);
            auto bigger = std::make_shared_for_overwrite<std::byte[]>(grown);
            std::memcpy(bigger.get(), storage.get(), got);
            storage = std::move(bigger);
            capacity = grown;
          }
          got += co_await socket_.async_read_some(asio::buffer(storage.get() + got, capacity - got), asio::use_awaitable);
        }
        disarm_watchdog();
        const std::byte* data = storage.get();
        co_return decode_frame_rest(prefix, Buffer(std::move(storage), data, rest), limits_);
      } catch (const std::system_error&) {
        disarm_watchdog();
        if (!timed_out_) throw;
        throw Error(errc::timeout, fmt::format("{}: a frame did not arrive within its time limit", remote_));
      }
    }

    /// Writes one encoded frame with a single gathered write.
    asio::awaitable<void> write_frame(const EncodedFrame& f) {
      std::vector<asio::const_buffer> bufs;
      bufs.reserve(1 + 2 * f.blobs.size());
      bufs.emplace_back(f.head.data(), f.head.size());
      for (std::size_t i = 0; i < f.blobs.size(); ++i) {
        if (!f.blobs[i].empty()) bufs.emplace_back(f.blobs[i].data(), f.blobs[i].size());
        if (f.padding[i]) bufs.emplace_back(detail::zero_padding.data(), f.padding[i]);
      }
      co_await asio::async_write(socket_, bufs, asio::use_awaitable);
    }

    /// Closes the socket, failing any read or write in flight.
    void close() noexcept {
      std::error_code ec;
      socket_.shutdown(asio::socket_base::shutdown_both, ec);
      socket_.close(ec);
    }

    /// The remote endpoint as "host:port".
    [[nodiscard]] std::string remote_address() const { return remote_; }

    /// True while a frame is partly received (the RPC layer does not close such a connection
    /// as idle; the frame's own time limit bounds it).
    [[nodiscard]] bool receiving() const noexcept { return receiving_; }

   private:
    // Closes the socket unless the frame being read ends within its allowance.
    void arm_watchdog(std::uint64_t frame_bytes) {
      receiving_ = true;
      const double allowance = std::min(1e7, frame_timeout_.count() + (min_rate_ > 0 ? static_cast<double>(frame_bytes) / min_rate_ : 0.0));
      watchdog_.expires_at(deadline_after(Seconds(allowance)));
      const auto generation = ++watchdog_generation_;
      watchdog_.async_wait([weak = this->weak_from_this(), generation](std::error_code ec) {
        auto self = weak.lock();
        if (ec || !self || self->watchdog_generation_ != generation) return;
        self->timed_out_ = true;
        std::error_code ignored;
        self->socket_.close(ignored);
      });
    }
    void disarm_watchdog() {
      receiving_ = false;
      ++watchdog_generation_;
      watchdog_.cancel();
    }

    asio::awaitable<void> fill(std::size_t n) {
      if (end_ - begin_ >= n) co_return;
      if (begin_ > 0) {
        std::memmove(rbuf_.data(), rbuf_.data() + begin_, end_ - begin_);
        end_ -= begin_;
        begin_ = 0;
      }
      while (end_ < n)
        end_ += co_await socket_.async_read_some(asio::buffer(rbuf_.data() + end_, rbuf_.size() - end_), asio::use_awaitable);
    }

    asio::ip::tcp::socket socket_;
    Limits limits_;
    Seconds frame_timeout_;
    double min_rate_;
    std::uint64_t preallocate_;
    std::vector<std::byte> rbuf_;
    std::size_t begin_ = 0, end_ = 0;
    std::string remote_;
    asio::steady_timer watchdog_;
    std::uint64_t watchdog_generation_ = 0;
    bool timed_out_ = false;
    bool receiving_ = false;
  };
  /// The connection type (net::Connection).
  using connection_type = Connection;

  /// A transport whose operations run on a new strand of `executor`.
  explicit Tcp(const asio::any_io_executor& executor, Options options = {})
      : strand_(asio::make_strand(executor)), options_(std::move(options)), acceptor_(strand_) {}

  /// The strand this transport runs on.
  [[nodiscard]] executor_type get_executor() const noexcept { return strand_; }
  /// The limits applied to incoming frames.
  [[nodiscard]] const Limits& limits() const noexcept { return options_.limits(); }
  /// The options this transport was built with.
  [[nodiscard]] const Options& options() const noexcept { return options_; }

  /// Binds and listens on "host:port" (port 0 picks a free port); returns the bound address.
  /// Throws hive::Error(bad_address) or std::system_error.
  std::string listen(std::string_view address) {
    auto hp = HostPort::parse(address);
    asio::ip::tcp::resolver resolver(strand_);
    auto results = resolver.resolve(hp.host, std::to_string(hp.port), asio::ip::resolver_base::passive);
    const asio::ip::tcp::endpoint ep = *results.begin();
    acceptor_.open(ep.protocol());
    acceptor_.set_option(asio::socket_base::reuse_address(true));
    if (ep.address().is_v6()) {
      std::error_code ignored;  // dual-stack where the system allows it; plain v6 otherwise
      acceptor_.set_option(asio::ip::v6_only(false), ignored);
    }
    acceptor_.bind(ep);
    acceptor_.listen(options_.backlog());
    auto local = acceptor_.local_endpoint();
    return HostPort{local.address().to_string(), local.port()}.str();
  }

  /// Waits for the next incoming connection.
  asio::awaitable<std::shared_ptr<Connection>> accept() {
    auto socket = co_await acceptor_.async_accept(asio::use_awaitable);
    co_return std::make_shared<Connection>(std::move(socket), options_);
  }

  /// Connects to "host:port" before `deadline`; throws hive::Error(timeout) or std::system_error.
  asio::awaitable<std::shared_ptr<Connection>> connect(std::string address, Deadline deadline) {
    using namespace hive::detail;
    auto hp = HostPort::parse(address);
    asio::ip::tcp::resolver resolver(strand_);
    auto endpoints = co_await resolver.async_resolve(hp.host, std::to_string(hp.port), asio::use_awaitable);
    asio::ip::tcp::socket socket(strand_);
    asio::steady_timer timer(strand_, deadline);
    auto result = co_await (asio::async_connect(socket, endpoints, as_tuple_awaitable) ||
                            timer.async_wait(as_tuple_awaitable));
    if (result.index() == 1) throw Error(errc::timeout, fmt::format("connecting to {} timed out", address));
    auto [ec, ep] = std::get<0>(result);
    if (ec == asio::error::connection_refused) throw Error(errc::connection_refused, fmt::format("connection to {} refused", address));
    if (ec) throw std::system_error(ec, fmt::format("connecting to {}", address));
    co_return std::make_shared<Connection>(std::move(socket), options_);
  }

  /// Stops accepting connections.
  void close() {
    std::error_code ec;
    acceptor_.close(ec);
  }

 private:
  executor_type strand_;
  Options options_;
  asio::ip::tcp::acceptor acceptor_;
};

static_assert(Transport<Tcp>);

}  // namespace hive::net
