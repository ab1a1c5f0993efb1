#pragma once
// A hostile peer for the tests: a plain POSIX socket that speaks docs/protocol.md byte by byte
// (or not at all), optionally from a chosen loopback source address (127.0.0.2 counts as
// another machine for per-source limits).

#include <hive/net/frame.hpp>
#include <hive/net/handshake.hpp>
#include <hive/net/transport.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace hive::test {

/// The bytes of a request frame whose MessagePack header is `header` as given (not
/// re-encoded, so it may be anything a hostile peer sends).
inline std::vector<std::byte> raw_request(std::uint64_t call_id, const std::vector<std::uint8_t>& header) {
  const std::size_t head = net::prefix_bytes + header.size();
  const std::size_t total = (head + 7) / 8 * 8;
  std::vector<std::byte> out(total);
  auto put32 = [&](std::size_t at, std::uint32_t v) { std::memcpy(out.data() + at, &v, 4); };
  put32(0, static_cast<std::uint32_t>(total - 4));
  out[4] = std::byte{net::protocol_version};
  out[5] = std::byte{static_cast<std::uint8_t>(net::FrameKind::request)};
  std::memcpy(out.data() + 8, &call_id, 8);
  put32(16, static_cast<std::uint32_t>(header.size()));
  put32(20, 0);
  std::memcpy(out.data() + net::prefix_bytes, header.data(), header.size());
  return out;
}

/// The bytes of a well-formed request frame.
inline std::vector<std::byte> request_bytes(std::uint64_t call_id, std::string method, nlohmann::json header) {
  return net::encode_frame(net::Frame{net::FrameKind::request, call_id, std::move(method), Message{std::move(header), {}}})
      .flatten();
}

/// One raw TCP connection to a peer under test.
class RawClient {
 public:
  /// Connects to "host:port" (IPv4) from `source` (an IPv4 address, empty for any), with a
  /// receive buffer of `rcvbuf` bytes when positive, and completes the handshake as a new
  /// identity unless `handshake` is false. Throws std::runtime_error on failure.
  explicit RawClient(const std::string& address, const std::string& source = "", int rcvbuf = 0,
                     bool handshake = true) {
    const auto hp = net::HostPort::parse(address);
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd_ < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
    if (rcvbuf > 0) ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (!source.empty()) {
      sockaddr_in local{};
      local.sin_family = AF_INET;
      ::inet_pton(AF_INET, source.c_str(), &local.sin_addr);
      if (::bind(fd_, reinterpret_cast<sockaddr*>(&local), sizeof local) != 0) fail("bind");
    }
    sockaddr_in remote{};
    remote.sin_family = AF_INET;
    remote.sin_port = htons(hp.port);
    ::inet_pton(AF_INET, hp.host.c_str(), &remote.sin_addr);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&remote), sizeof remote) != 0) fail("connect");
    if (handshake) peer_ = this->handshake(Identity::generate());
  }

  /// Proves `me` to the peer (docs/protocol.md, "Handshake") and returns the peer's id, which
  /// its signature proved. Throws std::runtime_error when the peer's answer is missing or wrong.
  std::string handshake(const Identity& me) {
    const net::Hello mine{me.public_key(), net::random_nonce(), {}};
    send(net::encode_frame(net::hello_frame(mine, true)).flatten());
    auto answer = read_frame();
    if (!answer) throw std::runtime_error("handshake: no answer");
    const auto theirs = net::parse_hello(*answer, false);
    if (!verify_signature(theirs.key, net::handshake_transcript('S', mine.key, mine.nonce, theirs.key, theirs.nonce),
                          *theirs.signature))
      throw std::runtime_error("handshake: the peer's signature is wrong");
    send(net::encode_frame(net::auth_frame(me.sign(net::handshake_transcript('C', mine.key, mine.nonce, theirs.key, theirs.nonce))))
             .flatten());
    return peer_id_of(theirs.key);
  }

  /// The peer id the handshake proved, empty without one.
  [[nodiscard]] const std::string& peer() const noexcept { return peer_; }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;
  ~RawClient() {
    if (fd_ >= 0) ::close(fd_);
  }

  /// Sends every byte (blocking).
  void send(std::span<const std::byte> bytes) {
    std::size_t sent = 0;
    while (sent < bytes.size()) {
      const auto n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) fail("send");
      sent += static_cast<std::size_t>(n);
    }
  }

  /// The next frame within `limit`; nullopt when the peer closed the connection (closed()
  /// turns true) or the time passed.
  std::optional<net::Frame> read_frame(std::chrono::milliseconds limit = std::chrono::seconds(10)) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      if (got_.size() >= net::prefix_bytes) {
        std::uint32_t len;
        std::memcpy(&len, got_.data(), 4);
        if (got_.size() >= len + 4ull) {
          auto frame = net::decode_frame(Buffer::copy_of(std::span(got_.data(), len + 4ull)), Limits{});
          got_.erase(got_.begin(), got_.begin() + static_cast<std::ptrdiff_t>(len + 4ull));
          return frame;
        }
      }
      if (!receive(deadline)) return std::nullopt;
    }
  }

  /// True when the peer closes the connection within `limit` (bytes that arrive meanwhile are
  /// kept for read_frame).
  bool wait_closed(std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!closed_)
      if (!receive(deadline) && !closed_) return false;
    return true;
  }

  /// Closes the sending direction (the peer reads end of stream after what was sent).
  void shutdown_send() { ::shutdown(fd_, SHUT_WR); }

  /// True once the peer closed the connection (or reset it).
  [[nodiscard]] bool closed() const noexcept { return closed_; }

 private:
  // Waits for bytes until `deadline`; false on time-out or close.
  bool receive(std::chrono::steady_clock::time_point deadline) {
    if (closed_) return false;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd p{fd_, POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    std::byte chunk[65536];
    const auto n = ::recv(fd_, chunk, sizeof chunk, 0);
    if (n <= 0) {
      closed_ = true;
      return false;
    }
    got_.insert(got_.end(), chunk, chunk + n);
    return true;
  }

  [[noreturn]] void fail(const char* what) {
    const std::string message = std::string(what) + ": " + std::strerror(errno);
    ::close(fd_);
    fd_ = -1;
    throw std::runtime_error(message);
  }

  int fd_ = -1;
  std::string peer_;
  std::vector<std::byte> got_;
  bool closed_ = false;
};

}  // namespace hive::test
