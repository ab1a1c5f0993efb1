#pragma once
/// @file
/// The connection handshake (docs/protocol.md, "Handshake"): each side proves it holds the
/// Ed25519 key of the peer id it claims, by signing both sides' fresh nonces and keys. It costs
/// the caller one round trip: its first request follows its proof without waiting. When both
/// sides offer it and the connection can, the handshake also agrees on session keys and the
/// connection encrypts everything after it (docs/protocol.md, "Encryption").

#include <hive/core/identity.hpp>
#include <hive/net/frame.hpp>
#include <hive/net/transport.hpp>

#include <asio/steady_timer.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hive::net {

/// The method of the caller's first frame: its key and nonce.
inline constexpr std::string_view hello_method = "hive.hello";
/// The method of the caller's second frame: its signature of the transcript.
inline constexpr std::string_view auth_method = "hive.auth";
/// Version of the handshake carried in hello frames (2: hellos may offer encryption).
inline constexpr int handshake_version = 2;

/// A fresh random value each side contributes, so that no signature can be replayed.
using Nonce = std::array<std::uint8_t, 32>;

/// A random nonce from libsodium's generator.
inline Nonce random_nonce() {
  hive::detail::sodium_ready();
  Nonce n{};
  randombytes_buf(n.data(), n.size());
  return n;
}

/// An ephemeral X25519 public key, the sender's half of the session key exchange.
using KxKey = std::array<std::uint8_t, crypto_kx_PUBLICKEYBYTES>;

/// An AEAD cipher for sealed records (docs/protocol.md, "Encryption").
enum class Cipher : std::uint8_t {
  aes256gcm,         ///< AES-256-GCM (libsodium's, where the CPU has AES-NI and CLMUL)
  chacha20poly1305,  ///< ChaCha20-Poly1305 (IETF variant, 96-bit nonce)
};

/// The name of `cipher` in a hello's "ciphers" list.
constexpr std::string_view cipher_name(Cipher cipher) noexcept {
  return cipher == Cipher::aes256gcm ? "aes256gcm" : "chacha20poly1305";
}

/// The ciphers this machine can run, in hive's order of preference (AES-256-GCM first, only
/// where libsodium finds the CPU instructions it needs).
inline std::vector<std::string> local_ciphers() {
  hive::detail::sodium_ready();
  std::vector<std::string> out;
  if (crypto_aead_aes256gcm_is_available()) out.emplace_back(cipher_name(Cipher::aes256gcm));
  out.emplace_back(cipher_name(Cipher::chacha20poly1305));
  return out;
}

/// Most ciphers a hello may list, and longest name, accepted from the network.
inline constexpr std::size_t max_offered_ciphers = 8, max_cipher_name_bytes = 32;

/// What a hello carries: the sender's key, its nonce, (from the callee) its signature, and
/// (when the sender offers encryption) its key-exchange key and ciphers.
struct Hello {
  /// The sender's public key.
  PublicKey key{};
  /// The sender's nonce.
  Nonce nonce{};
  /// The callee's signature of the transcript; absent in the caller's hello.
  std::optional<Signature> signature{};
  /// The sender's ephemeral X25519 key; present exactly when it offers encryption.
  std::optional<KxKey> kx{};
  /// The ciphers the sender offers (names as cipher_name writes them), with `kx`.
  std::vector<std::string> ciphers{};
};

/// The cipher a connection uses when its two hellos are `a` and `b`: the first in hive's
/// preference order (Cipher) that both offer; none when either side offers no encryption.
inline std::optional<Cipher> agreed_cipher(const Hello& a, const Hello& b) {
  if (!a.kx || !b.kx) return std::nullopt;
  for (const Cipher c : {Cipher::aes256gcm, Cipher::chacha20poly1305}) {
    const auto offered = [&](const Hello& h) {
      return std::find(h.ciphers.begin(), h.ciphers.end(), cipher_name(c)) != h.ciphers.end();
    };
    if (offered(a) && offered(b)) return c;
  }
  return std::nullopt;
}

/// The keys of an encrypted connection, one per direction (libsodium crypto_kx), wiped when
/// destroyed.
struct SessionKeys {
  /// The cipher both sides agreed on.
  Cipher cipher = Cipher::chacha20poly1305;
  /// Key of the bytes this side receives.
  std::array<std::uint8_t, crypto_kx_SESSIONKEYBYTES> rx{};
  /// Key of the bytes this side sends.
  std::array<std::uint8_t, crypto_kx_SESSIONKEYBYTES> tx{};
  SessionKeys() = default;
  SessionKeys(const SessionKeys&) = default;
  SessionKeys& operator=(const SessionKeys&) = default;
  ~SessionKeys() {
    sodium_memzero(rx.data(), rx.size());
    sodium_memzero(tx.data(), tx.size());
  }
};

/// Connections that can encrypt (net::Tcp's can, net::Simulated's cannot): start_encryption
/// switches both directions to sealed records, encrypted() tells whether it happened.
template <class C>
concept EncryptingConnection = requires(C& c, const C& cc, const SessionKeys& keys) {
  c.start_encryption(keys);
  { cc.encrypted() } -> std::convertible_to<bool>;
};

/// What one side of a connection wants from encryption (RpcOptions::encrypt and
/// RpcOptions::require_encryption).
struct EncryptionPolicy {
  /// Offer encryption in the hello (only where the connection type can encrypt).
  bool offer = true;
  /// Refuse a connection that would not be encrypted.
  bool require = false;
};

/// The bytes a side signs: a label, its role ('C' caller, 'S' callee), both keys and nonces in
/// a fixed order, then both sides' encryption offers, so that a signature made for one
/// connection or role fits no other and nobody in between can change an offer unseen.
inline std::vector<std::uint8_t> handshake_transcript(char role, const Hello& caller, const Hello& callee) {
  static constexpr std::string_view label = "hive-handshake-v2";
  std::vector<std::uint8_t> out(label.begin(), label.end());
  out.push_back(static_cast<std::uint8_t>(role));
  for (const auto* part : {&caller.key, &callee.key}) out.insert(out.end(), part->begin(), part->end());
  out.insert(out.end(), caller.nonce.begin(), caller.nonce.end());
  out.insert(out.end(), callee.nonce.begin(), callee.nonce.end());
  for (const Hello* h : {&caller, &callee}) {
    out.push_back(h->kx ? 1 : 0);
    if (!h->kx) continue;
    out.insert(out.end(), h->kx->begin(), h->kx->end());
    out.push_back(static_cast<std::uint8_t>(h->ciphers.size()));
    for (const auto& name : h->ciphers) {
      out.push_back(static_cast<std::uint8_t>(name.size()));
      out.insert(out.end(), name.begin(), name.end());
    }
  }
  return out;
}

/// The transcript of two hellos that offer no encryption.
inline std::vector<std::uint8_t> handshake_transcript(char role, const PublicKey& caller, const Nonce& caller_nonce,
                                                      const PublicKey& callee, const Nonce& callee_nonce) {
  return handshake_transcript(role, Hello{caller, caller_nonce}, Hello{callee, callee_nonce});
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

// An ephemeral X25519 key pair for one handshake; the secret half is wiped when it goes.
struct KxKeyPair {
  KxKey pk{};
  std::array<std::uint8_t, crypto_kx_SECRETKEYBYTES> sk{};
  KxKeyPair() = default;
  KxKeyPair(const KxKeyPair&) = delete;
  KxKeyPair& operator=(const KxKeyPair&) = delete;
  ~KxKeyPair() { sodium_memzero(sk.data(), sk.size()); }
  void generate() {
    hive::detail::sodium_ready();
    crypto_kx_keypair(pk.data(), sk.data());
  }
};

// The encryption offer of a hello header, if any: "kx" and "ciphers" come together.
inline void parse_offer(const nlohmann::json& h, Hello& hello) {
  const bool has_kx = h.contains("kx"), has_ciphers = h.contains("ciphers");
  if (!has_kx && !has_ciphers) return;
  if (has_kx != has_ciphers) throw Error(errc::bad_header, "handshake: 'kx' and 'ciphers' come together");
  hello.kx = fixed_bytes<std::tuple_size_v<KxKey>>(h, "kx");
  const auto& ciphers = h["ciphers"];
  if (!ciphers.is_array() || ciphers.size() > max_offered_ciphers)
    throw Error(errc::bad_header, fmt::format("handshake: 'ciphers' must be a list of at most {} names", max_offered_ciphers));
  for (const auto& name : ciphers) {
    if (!name.is_string() || name.get_ref<const std::string&>().empty() ||
        name.get_ref<const std::string&>().size() > max_cipher_name_bytes)
      throw Error(errc::bad_header, fmt::format("handshake: a cipher name is a string of 1 to {} bytes", max_cipher_name_bytes));
    hello.ciphers.push_back(name.get<std::string>());
  }
}

}  // namespace detail

/// The frame that carries `hello`: a request named hello_method (caller) or a response
/// (callee), call id 0.
inline Frame hello_frame(const Hello& hello, bool caller) {
  nlohmann::json h{{"v", handshake_version}, {"key", detail::binary(hello.key)}, {"nonce", detail::binary(hello.nonce)}};
  if (hello.signature) h["sig"] = detail::binary(*hello.signature);
  if (hello.kx) {
    h["kx"] = detail::binary(*hello.kx);
    h["ciphers"] = hello.ciphers;
  }
  return Frame{caller ? FrameKind::request : FrameKind::response, 0, caller ? std::string(hello_method) : std::string(),
               Message{std::move(h), {}}};
}

/// The caller's proof: a request named auth_method with its signature.
inline Frame auth_frame(const Signature& signature) {
  return Frame{FrameKind::request, 0, std::string(auth_method), Message{nlohmann::json{{"sig", detail::binary(signature)}}, {}}};
}

/// The hello in `frame` (from the caller when `caller`, else the callee's answer), with its
/// encryption offer when it makes one. Throws
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
  detail::parse_offer(h, hello);
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

namespace detail {

// Why a connection under `policy` cannot be encrypted, or nothing when it will be (or need not).
inline std::optional<std::string> encryption_refusal(const EncryptionPolicy& policy, bool can, const Hello& mine,
                                                     const Hello& theirs, bool caller) {
  if (!policy.require || agreed_cipher(mine, theirs)) return std::nullopt;
  if (!can) return "encryption is required (RpcOptions::require_encryption) but this transport's connections cannot encrypt";
  if (!policy.offer) return "encryption is required (RpcOptions::require_encryption) but RpcOptions::encrypt is off";
  if (!theirs.kx)
    return fmt::format("encryption is required (RpcOptions::require_encryption) and the {} does not offer it "
                       "(its RpcOptions::encrypt is off, or its transport cannot encrypt)", caller ? "callee" : "caller");
  return std::string("encryption is required (RpcOptions::require_encryption) and the peers have no cipher in common");
}

}  // namespace detail

// GCC 12 reports asio's coroutine frame allocator (thread_info_base::allocate, paired with
// its own operator delete) as a new/delete mismatch in the two handshake coroutines; a false
// positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

/// The caller's side: sends its hello (with an encryption offer under `policy`, where C can
/// encrypt), checks the callee's signature, sends its proof, and from then on encrypts the
/// connection when both sides offered it. Returns the callee's peer id. Throws hive::Error
/// (connection_refused when the callee's proof is wrong, it refused, or `policy` requires an
/// encryption the callee does not offer) or what the connection throws; `conn` is closed at
/// `deadline`.
template <class C>
asio::awaitable<std::string> client_handshake(std::shared_ptr<C> conn, const Identity& me, Deadline deadline,
                                              EncryptionPolicy policy = {}) {
  HandshakeTimer<C> timer(co_await asio::this_coro::executor, conn, deadline);
  constexpr bool can = EncryptingConnection<C>;
  if (policy.require && (!can || !policy.offer))
    throw Error(errc::connection_refused, detail::encryption_refusal(policy, can, Hello{}, Hello{}, true).value());
  detail::KxKeyPair kx;
  Hello mine{me.public_key(), random_nonce()};
  if (can && policy.offer) {
    kx.generate();
    mine.kx = kx.pk;
    mine.ciphers = local_ciphers();
  }
  const auto hello = encode_frame(hello_frame(mine, true));
  co_await conn->write_frame(hello);
  Frame answer = co_await conn->read_frame();
  const Hello theirs = parse_hello(answer, false);
  if (!verify_signature(theirs.key, handshake_transcript('S', mine, theirs), *theirs.signature))
    throw Error(errc::connection_refused, "handshake: the peer's signature does not match its key");
  if (auto why = detail::encryption_refusal(policy, can, mine, theirs, true)) throw Error(errc::connection_refused, *why);
  const auto cipher = agreed_cipher(mine, theirs);
  SessionKeys keys;
  if (cipher) {
    keys.cipher = *cipher;
    if (crypto_kx_client_session_keys(keys.rx.data(), keys.tx.data(), kx.pk.data(), kx.sk.data(), theirs.kx->data()) != 0)
      throw Error(errc::connection_refused, "handshake: the peer's key-exchange key is unusable");
  }
  const auto proof = encode_frame(auth_frame(me.sign(handshake_transcript('C', mine, theirs))));
  co_await conn->write_frame(proof);
  if constexpr (can) {
    if (cipher) conn->start_encryption(keys);
  }
  co_return peer_id_of(theirs.key);
}

/// The callee's side: answers the caller's hello with its own signed one (with an encryption
/// offer under `policy`, where C can encrypt and the caller offered), checks the caller's
/// proof, and from then on encrypts the connection when both sides offered it. Returns the
/// caller's peer id. Throws hive::Error (bad_header for a connection that does not start with
/// the handshake, connection_refused for a wrong proof or when `policy` requires an encryption
/// the caller does not offer), after telling the caller why in an error frame.
template <class C>
asio::awaitable<std::string> server_handshake(std::shared_ptr<C> conn, const Identity& me, Deadline deadline,
                                              EncryptionPolicy policy = {}) {
  HandshakeTimer<C> timer(co_await asio::this_coro::executor, conn, deadline);
  constexpr bool can = EncryptingConnection<C>;
  std::optional<Error> refusal;
  std::string peer;
  SessionKeys keys;
  std::optional<Cipher> cipher;
  try {
    Frame first = co_await conn->read_frame();
    const Hello theirs = parse_hello(first, true);
    detail::KxKeyPair kx;
    Hello mine{me.public_key(), random_nonce()};
    // The answer offers only to a caller that offered: a caller without an offer gets the
    // answer of a version-2 handshake without encryption.
    if (can && policy.offer && theirs.kx) {
      kx.generate();
      mine.kx = kx.pk;
      mine.ciphers = local_ciphers();
    }
    if (auto why = detail::encryption_refusal(policy, can, mine, theirs, false)) throw Error(errc::connection_refused, *why);
    cipher = agreed_cipher(theirs, mine);
    if (cipher) {
      keys.cipher = *cipher;
      if (crypto_kx_server_session_keys(keys.rx.data(), keys.tx.data(), kx.pk.data(), kx.sk.data(), theirs.kx->data()) != 0)
        throw Error(errc::connection_refused, "handshake: the caller's key-exchange key is unusable");
    }
    mine.signature = me.sign(handshake_transcript('S', theirs, mine));
    const auto reply = encode_frame(hello_frame(mine, false));
    co_await conn->write_frame(reply);
    Frame proof = co_await conn->read_frame();
    if (proof.kind != FrameKind::request || proof.method != auth_method)
      throw Error(errc::bad_header, fmt::format("the handshake's second frame must be hive.auth, not a {} frame{}{}",
                                                proof.kind == FrameKind::request ? "request" : "reply",
                                                proof.method.empty() ? "" : " of ", proof.method));
    const auto signature = detail::fixed_bytes<std::tuple_size_v<Signature>>(proof.message.header, "sig");
    if (!verify_signature(theirs.key, handshake_transcript('C', theirs, mine), signature))
      throw Error(errc::connection_refused, "handshake: the caller's signature does not match its key");
    peer = peer_id_of(theirs.key);
    // What the caller sent after hive.auth (perhaps already read ahead) is encrypted.
    if constexpr (can) {
      if (cipher) conn->start_encryption(keys);
    }
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
