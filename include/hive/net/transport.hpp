#pragma once
/// @file
/// The net::Transport concept, the policy slot that decides how peers exchange frames, and
/// the address syntax shared by every transport.

#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/limits.hpp>
#include <hive/detail/asio_compat.hpp>
#include <hive/net/frame.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/ip/address.hpp>
#include <asio/strand.hpp>

#include <algorithm>
#include <charconv>
#include <concepts>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace hive::net {

/// A "host:port" address split in two; IPv6 hosts are written in brackets ("[::1]:1337").
struct HostPort {
  /// Host name or literal address, without brackets.
  std::string host;
  /// Port number; 0 asks the system to pick a free one when listening.
  std::uint16_t port = 0;

  /// Parses "host:port" or "[v6]:port"; throws hive::Error(errc::bad_address) otherwise.
  static HostPort parse(std::string_view address) {
    auto bad = [&](std::string_view why) {
      return Error(errc::bad_address, fmt::format("bad address '{}': {} (expected host:port or [v6]:port)", address, why));
    };
    std::string_view host, port;
    if (address.starts_with('[')) {
      const auto close = address.find(']');
      if (close == std::string_view::npos) throw bad("unclosed '['");
      host = address.substr(1, close - 1);
      if (address.size() < close + 2 || address[close + 1] != ':') throw bad("missing ':port' after ']'");
      port = address.substr(close + 2);
    } else {
      const auto colon = address.rfind(':');
      if (colon == std::string_view::npos) throw bad("missing ':port'");
      host = address.substr(0, colon);
      if (host.find(':') != std::string_view::npos) throw bad("IPv6 hosts must be written in brackets");
      port = address.substr(colon + 1);
    }
    if (host.empty()) throw bad("empty host");
    unsigned value = 0;
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc{} || end != port.data() + port.size() || port.empty() || value > 65535)
      throw bad("port must be a number in 0..65535");
    return {std::string(host), static_cast<std::uint16_t>(value)};
  }
  /// Formats back to "host:port", bracketing IPv6 hosts.
  [[nodiscard]] std::string str() const {
    return host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port) : fmt::format("{}:{}", host, port);
  }
};

/// An address reached through a relay: "relay-host:port/relay/peer-id". Calls to it go to the
/// relay, which forwards them over the connection the peer keeps open to it (a peer behind NAT
/// that nobody can dial). Peer ids are Rpc::peer_id(): 1 to 64 characters of [0-9a-zA-Z_-].
struct RelayedAddress {
  /// The relay's own address ("host:port").
  std::string relay;
  /// The id of the peer the relay forwards to.
  std::string peer;

  /// The separator between the relay's address and the peer id.
  static constexpr std::string_view separator = "/relay/";

  /// True when `address` has the relayed form (it may still fail to parse).
  static bool is_relayed(std::string_view address) { return address.find(separator) != std::string_view::npos; }

  /// True for a valid peer id.
  static bool valid_peer_id(std::string_view id) {
    if (id.empty() || id.size() > 64) return false;
    return std::all_of(id.begin(), id.end(), [](char c) {
      return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-';
    });
  }

  /// Parses "host:port/relay/peer"; throws hive::Error(errc::bad_address) when it is not one.
  static RelayedAddress parse(std::string_view address) {
    const auto at = address.find(separator);
    if (at == std::string_view::npos)
      throw Error(errc::bad_address, fmt::format("bad address '{}': not a relayed address (host:port/relay/peer)", address));
    RelayedAddress r{std::string(address.substr(0, at)), std::string(address.substr(at + separator.size()))};
    const auto relay = HostPort::parse(r.relay);  // throws with the reason
    if (relay.port == 0) throw Error(errc::bad_address, fmt::format("bad address '{}': the relay's port is 0", address));
    if (!valid_peer_id(r.peer))
      throw Error(errc::bad_address, fmt::format("bad address '{}': the peer id must be 1 to 64 of [0-9a-zA-Z_-]", address));
    return r;
  }
  /// Formats back to "host:port/relay/peer".
  [[nodiscard]] std::string str() const { return relay + std::string(separator) + peer; }
};

/// Who an address belongs to, for per-source limits: the host of "host:port", with an IPv6
/// address cut to its /64 prefix (one home or one cloud machine gets a whole /64), and
/// `loopback` set for 127.0.0.0/8 and ::1. A host that is not an IP address stands for itself.
struct AddressSource {
  /// The host, or "v6prefix/64" for IPv6.
  std::string key;
  /// True for loopback addresses.
  bool loopback = false;

  /// The source of "host:port" (or of a bare host).
  static AddressSource of(std::string_view address) {
    if (const auto at = address.find(RelayedAddress::separator); at != std::string_view::npos) address = address.substr(0, at);
    std::string host(address);
    try {
      host = HostPort::parse(address).host;
    } catch (const Error&) {
    }
    std::error_code ec;
    const auto ip = asio::ip::make_address(host, ec);
    if (ec) return {host, false};
    if (ip.is_v4()) return {host, ip.is_loopback()};
    auto v6 = ip.to_v6();
    if (v6.is_v4_mapped()) {
      const auto v4 = asio::ip::make_address_v4(asio::ip::v4_mapped, v6);
      return {v4.to_string(), v4.is_loopback()};
    }
    auto bytes = v6.to_bytes();
    std::fill(bytes.begin() + 8, bytes.end(), 0);
    return {asio::ip::address_v6(bytes).to_string() + "/64", v6.is_loopback()};
  }
};

/// A transport connection: a reliable, ordered channel of frames between two peers.
///
/// `read_frame` throws FrameError for a frame it could not decode (fatal() says whether the
/// stream is still usable) and std::system_error when the connection fails. At most one
/// read_frame and one write_frame are in flight at a time (the RPC layer serializes writes).
template <class C>
concept Connection = requires(C& c, const C& cc, const EncodedFrame& f) {
  { c.read_frame() } -> std::same_as<asio::awaitable<Frame>>;
  { c.write_frame(f) } -> std::same_as<asio::awaitable<void>>;
  { c.close() } noexcept;
  { cc.remote_address() } -> std::convertible_to<std::string>;
};

/// The transport policy slot: how a peer listens, accepts and connects.
///
/// A model provides an `Options` type, a `connection_type` satisfying net::Connection, and an
/// `executor_type` (a strand) on which every operation of the peer runs. Models: net::Tcp
/// (real sockets) and net::Simulated (an emulated in-process network).
template <class T>
concept Transport = requires(T& t, const T& ct, std::string address, Deadline deadline) {
  typename T::Options;
  typename T::connection_type;
  typename T::executor_type;
  requires Connection<typename T::connection_type>;
  { ct.get_executor() } -> std::convertible_to<typename T::executor_type>;
  { ct.limits() } -> std::convertible_to<const Limits&>;
  { t.listen(address) } -> std::convertible_to<std::string>;
  { t.accept() } -> std::same_as<asio::awaitable<std::shared_ptr<typename T::connection_type>>>;
  { t.connect(address, deadline) } -> std::same_as<asio::awaitable<std::shared_ptr<typename T::connection_type>>>;
  { t.close() };
};

/// Types that model a concept and do nothing else, for checking generic code against the
/// concept alone (Boost's archetypes): their members are declared, never defined, so they exist
/// only in unevaluated contexts such as a `requires` expression.
namespace archetype {

/// Models net::Connection and nothing more.
struct Connection {
  /// Declared only.
  asio::awaitable<Frame> read_frame();
  /// Declared only.
  asio::awaitable<void> write_frame(const EncodedFrame& frame);
  /// Declared only.
  void close() noexcept;
  /// Declared only.
  [[nodiscard]] std::string remote_address() const;
};

/// Models net::Transport and nothing more: strategies and other policies that take a transport
/// parameter are checked against it, so their concept does not depend on net::Tcp.
struct Transport {
  /// Empty options.
  struct Options {};
  /// The connection archetype.
  using connection_type = Connection;
  /// Any strand.
  using executor_type = asio::strand<asio::any_io_executor>;
  /// Declared only.
  [[nodiscard]] executor_type get_executor() const;
  /// Declared only.
  [[nodiscard]] const Limits& limits() const;
  /// Declared only.
  std::string listen(std::string address);
  /// Declared only.
  asio::awaitable<std::shared_ptr<Connection>> accept();
  /// Declared only.
  asio::awaitable<std::shared_ptr<Connection>> connect(std::string address, Deadline deadline);
  /// Declared only.
  void close();
};

}  // namespace archetype

static_assert(Transport<archetype::Transport>);

}  // namespace hive::net
