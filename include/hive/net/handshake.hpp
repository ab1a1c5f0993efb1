#pragma once
/// @file
/// The connection handshake (docs/protocol.md, "Handshake"): each side proves it holds the
/// Ed25519 key of the peer id it claims, by signing both sides' fresh nonces and keys. It costs
/// the caller one round trip: its first request follows its proof without waiting.

#include <hive/core/identity.hpp>
#include <hive/net/frame.hpp>
#include <hive/net/transport.hpp>

#include <asio/steady_timer.hpp>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace hive::net {

/// The method of the caller's first frame: its key and nonce.
inline constexpr std::string_view hello_method = "hive.hello";
/// The method of the caller's second frame: its signature of the transcript.
inline constexpr std::string_view auth_method = "hive.auth";
/// Version of the handshake carried in hello frames.
inline constexpr int handshake_version = 1;

/// A fresh random value each side contributes, so that no signature can be replayed.
using Nonce = std::array<std::uint8_t, 32>;

/// A random nonce from libsodium's generator.
inline Nonce random_nonce() {
  hive::detail::sodium_ready();
  Nonce n{};
  randombytes_buf(n.data(), n.size());
  return n;
}

/// What a hello carries: the sender's key, its nonce and (from the callee) its signature.
struct Hello {
  /// The sender's public key.
  PublicKey key{};
  /// The sender's nonce.
  Nonce nonce{};
  /// The callee's signature of the transcript; absent in the caller's hello.
  std::optional<Signature> signature;
};

/// The bytes a side signs: a label, its role ('C' caller, 'S' callee), then both keys and
/// nonces in a fixed order, so that a signature made for one connection or role fits no other.
inline std::vector<std::uint8_t> handshake_transcript(char role, const PublicKey& caller, const Nonce& caller_nonce,
                                                      const PublicKey& callee, const Nonce& callee_nonce) {
  static constexpr std::string_view label = "hive-handshake-v1";
  std::vector<std::uint8_t> out(label.begin(), label.end());
  out.push_back(static_cast<std::uint8_t>(role));
  for (const auto* part : {&caller, &callee}) out.insert(out.end(), part->begin(), part->end());
  out.insert(out.end(), caller_nonce.begin(), caller_nonce.end());
  out.insert(out.end(), callee_nonce.begin(), callee_nonce.end());
  return out;
}

namespace detail {

template <std::size_t N>
std::array<std::uint8_t, N> fixed_bytes(const nlohmann::json& h, const char* field) {
  if (!h.is_object() || !h.contains(field) || !h[field].is_binary() || h[field].get_binary().size() != N)
    throw Error(errc::bad_header, fmt::format("handshake: '{}' must be {} bytes", field, N));
  std::array<std::uint8_t, N> out{};
  std::copy_n(h[field].get_binary().begin(), N, out.begin());
  return out;
}

inline nlohmann::json binary(std::span<const std::uint8_t> bytes) {
  return nlohmann::json::binary(std::vector<std::uint8_t>(bytes.begin(), bytes.end()));
}

}  // namespace detail

/// The frame that carries `hello`: a request named hello_method (caller) or a response
/// (callee), call id 0.
inline Frame hello_frame(const Hello& hello, bool caller) {
  nlohmann::json h{{"v", handshake_version}, {"key", detail::binary(hello.key)}, {"nonce", detail::binary(hello.nonce)}};
  if (hello.signature) h["sig"] = detail::binary(*hello.signature);
  return Frame{caller ? FrameKind::request : FrameKind::response, 0, caller ? std::string(hello_method) : std::string(),
               Message{std::move(h), {}}};
}

/// The caller's proof: a request named auth_method with its signature.
inline Frame auth_frame(const Signature& signature) {
  return Frame{FrameKind::request, 0, std::string(auth_method), Message{nlohmann::json{{"sig", detail::binary(signature)}}, {}}};
}

/// The hello in `frame` (from the caller when `caller`, else the callee's answer). Throws
/// hive::Error: bad_header for a malformed one, connection_refused with the remote's text when
/// it answered with an error (a peer that refused the handshake).
inline Hello parse_hello(const Frame& frame, bool caller) {
  if (frame.kind == FrameKind::error) {
    const auto& h = frame.message.header;
    throw Error(errc::connection_refused,
                fmt::format("handshake refused: {}", h.is_object() ? h.value("message", std::string("?")) : std::string("?")));
  }
  const bool shape = caller ? frame.kind == FrameKind::request && frame.method == hello_method
                            : frame.kind == FrameKind::response && frame.call_id == 0;
  if (!shape)
    throw Error(errc::bad_header, caller ? "a connection starts with the handshake (hive.hello, docs/protocol.md)"
                                         : "the peer did not answer the handshake");
  const auto& h = frame.message.header;
  if (!h.is_object() || !h.contains("v") || !h["v"].is_number_integer() || h["v"].get<int>() != handshake_version)
    throw Error(errc::bad_header, fmt::format("handshake version must be {}", handshake_version));
  Hello hello{detail::fixed_bytes<std::tuple_size_v<PublicKey>>(h, "key"), detail::fixed_bytes<std::tuple_size_v<Nonce>>(h, "nonce"), {}};
  if (!caller) hello.signature = detail::fixed_bytes<std::tuple_size_v<Signature>>(h, "sig");
  return hello;
}

/// Closes `conn` at `deadline` unless disarmed: a peer that stalls mid-handshake holds nothing.
template <class C>
class HandshakeTimer {
 public:
  /// Arms the timer on `executor`.
  HandshakeTimer(const asio::any_io_executor& executor, std::shared_ptr<C> conn, Deadline deadline) : timer_(executor, deadline) {
    timer_.async_wait([conn = std::move(conn)](std::error_code ec) {
      if (!ec) conn->close();
    });
  }
  HandshakeTimer(const HandshakeTimer&) = delete;
  HandshakeTimer& operator=(const HandshakeTimer&) = delete;
  ~HandshakeTimer() { timer_.cancel(); }

 private:
  asio::steady_timer timer_;
};

/// The caller's side: sends its hello, checks the callee's signature, sends its proof. Returns
/// the callee's peer id. Throws hive::Error (connection_refused when the callee's proof is
/// wrong or it refused) or what the connection throws; `conn` is closed at `deadline`.
template <class C>
asio::awaitable<std::string> client_handshake(std::shared_ptr<C> conn, const Identity& me, Deadline deadline) {
  HandshakeTimer<C> timer(co_await asio::this_coro::executor, conn, deadline);
  const Hello mine{me.public_key(), random_nonce(), {}};
  const auto hello = encode_frame(hello_frame(mine, true));
  co_await conn->write_frame(hello);
  Frame answer = co_await conn->read_frame();
  const Hello theirs = parse_hello(answer, false);
  const auto callee_transcript = handshake_transcript('S', mine.key, mine.nonce, theirs.key, theirs.nonce);
  if (!verify_signature(theirs.key, callee_transcript, *theirs.signature))
    throw Error(errc::connection_refused, "handshake: the peer's signature does not match its key");
  const auto proof = encode_frame(auth_frame(me.sign(handshake_transcript('C', mine.key, mine.nonce, theirs.key, theirs.nonce))));
  co_await conn->write_frame(proof);
  co_return peer_id_of(theirs.key);
}

/// The callee's side: answers the caller's hello with its own signed one and checks the
/// caller's proof. Returns the caller's peer id. Throws hive::Error (bad_header for a
/// connection that does not start with the handshake, connection_refused for a wrong proof),
/// after telling the caller why in an error frame.
// GCC 12 reports asio's coroutine frame allocator (thread_info_base::allocate, paired with
// its own operator delete) as a new/delete mismatch in this function; a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
template <class C>
asio::awaitable<std::string> server_handshake(std::shared_ptr<C> conn, const Identity& me, Deadline deadline) {
  HandshakeTimer<C> timer(co_await asio::this_coro::executor, conn, deadline);
  std::optional<Error> refusal;
  std::string peer;
  try {
    Frame first = co_await conn->read_frame();
    const Hello theirs = parse_hello(first, true);
    Hello mine{me.public_key(), random_nonce(), {}};
    mine.signature = me.sign(handshake_transcript('S', theirs.key, theirs.nonce, mine.key, mine.nonce));
    const auto reply = encode_frame(hello_frame(mine, false));
    co_await conn->write_frame(reply);
    Frame proof = co_await conn->read_frame();
    if (proof.kind != FrameKind::request || proof.method != auth_method)
      throw Error(errc::bad_header, fmt::format("the handshake's second frame must be hive.auth, not a {} frame{}{}",
                                                proof.kind == FrameKind::request ? "request" : "reply",
                                                proof.method.empty() ? "" : " of ", proof.method));
    const auto signature = detail::fixed_bytes<std::tuple_size_v<Signature>>(proof.message.header, "sig");
    if (!verify_signature(theirs.key, handshake_transcript('C', theirs.key, theirs.nonce, mine.key, mine.nonce), signature))
      throw Error(errc::connection_refused, "handshake: the caller's signature does not match its key");
    peer = peer_id_of(theirs.key);
  } catch (const FrameError& e) {
    refusal = Error(static_cast<errc>(e.code().value()), e.what());
  } catch (const Error& e) {
    if (&e.code().category() != &error_category()) throw;
    refusal = e;
  }
  if (refusal) {
    try {
      const auto complaint = encode_frame(Frame::make_error(0, static_cast<errc>(refusal->code().value()), refusal->what()));
      co_await conn->write_frame(complaint);
    } catch (const std::exception&) {
    }
    throw *refusal;
  }
  co_return peer;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace hive::net
