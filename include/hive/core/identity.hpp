#pragma once
/// @file
/// Identity: a peer's Ed25519 key pair (libsodium), its peer id (the public key in base64url),
/// signatures, and the key file that keeps an identity across runs.

#include <hive/core/error.hpp>

#include <sodium.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace hive {

namespace detail {

/// Initializes libsodium once (thread-safe); throws when the library cannot start.
inline void sodium_ready() {
  static const int status = sodium_init();
  if (status < 0) throw Error(errc::invalid_argument, "libsodium failed to initialize");
}

/// `bytes` in base64url without padding (RFC 4648 §5), as libsodium writes it.
inline std::string base64url(std::span<const std::uint8_t> bytes) {
  std::string out(sodium_base64_ENCODED_LEN(bytes.size(), sodium_base64_VARIANT_URLSAFE_NO_PADDING), '\0');
  sodium_bin2base64(out.data(), out.size(), bytes.data(), bytes.size(), sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  out.resize(std::strlen(out.c_str()));
  return out;
}

}  // namespace detail

/// An Ed25519 public key: what a peer id and an `[owner:…]` marker stand for.
using PublicKey = std::array<std::uint8_t, crypto_sign_PUBLICKEYBYTES>;
/// An Ed25519 signature (64 bytes).
using Signature = std::array<std::uint8_t, crypto_sign_BYTES>;

/// The peer id of `key`: its 32 bytes in base64url without padding (43 characters of
/// [A-Za-z0-9_-]), so the id itself is the key a signature is checked against.
inline std::string peer_id_of(const PublicKey& key) { return detail::base64url(key); }

/// The public key a peer id names, or nullopt when `id` is not a well-formed peer id.
inline std::optional<PublicKey> public_key_of(std::string_view id) {
  detail::sodium_ready();
  PublicKey key{};
  std::size_t length = 0;
  const char* end = nullptr;
  if (id.size() != sodium_base64_ENCODED_LEN(key.size(), sodium_base64_VARIANT_URLSAFE_NO_PADDING) - 1) return std::nullopt;
  if (sodium_base642bin(key.data(), key.size(), id.data(), id.size(), nullptr, &length, &end,
                        sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0 ||
      length != key.size() || end != id.data() + id.size())
    return std::nullopt;
  return key;
}

/// True when `signature` is `key`'s signature of `message`.
inline bool verify_signature(const PublicKey& key, std::span<const std::uint8_t> message, const Signature& signature) {
  detail::sodium_ready();
  return crypto_sign_verify_detached(signature.data(), message.data(), message.size(), key.data()) == 0;
}

/// A peer's Ed25519 key pair. Every hive peer has one: its peer id is derived from the public
/// key, connections start by proving it (net::Rpc's handshake), and DHT records under an
/// `[owner:<peer id>]` key or subkey must carry its signature (dht::SignatureValidator).
///
/// @par Thread safety
/// Immutable after construction; sign() may be called from any thread.
class Identity {
 public:
  /// A new random identity (for one run).
  static Identity generate() {
    detail::sodium_ready();
    Identity id;
    crypto_sign_keypair(id.public_.data(), id.secret_.data());
    return id;
  }

  /// The identity whose 32-byte seed is `seed` (deterministic; for tests and key files).
  static Identity from_seed(std::span<const std::uint8_t, crypto_sign_SEEDBYTES> seed) {
    detail::sodium_ready();
    Identity id;
    crypto_sign_seed_keypair(id.public_.data(), id.secret_.data(), seed.data());
    return id;
  }

  /// The identity kept at `path`: read when the file exists, otherwise generated and written
  /// there (mode 0600, parent directories created). The file holds one line, the key's seed in
  /// base64url. Throws hive::InvalidArgument when the file is malformed or readable by others
  /// (its mode must leave out group and other), and hive::Error when it cannot be written.
  static Identity load_or_create(const std::filesystem::path& path) {
    detail::sodium_ready();
    std::error_code ec;
    if (std::filesystem::exists(path, ec)) return load(path);
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ec);
    Identity id = generate();
    std::array<std::uint8_t, crypto_sign_SEEDBYTES> seed{};
    crypto_sign_ed25519_sk_to_seed(seed.data(), id.secret_.data());
    const std::string line = detail::base64url(seed) + "\n";
    sodium_memzero(seed.data(), seed.size());
    // O_EXCL: two peers starting at once with the same path must not both write a key.
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
      if (errno == EEXIST) return load(path);
      throw Error(errc::invalid_argument, fmt::format("cannot create identity file {}: {}", path.string(), std::strerror(errno)));
    }
    const auto written = ::write(fd, line.data(), line.size());
    const bool ok = written == static_cast<ssize_t>(line.size()) && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok) throw Error(errc::invalid_argument, fmt::format("cannot write identity file {}", path.string()));
    return id;
  }

  /// The identity kept at `path`, which must exist (see load_or_create for the format).
  static Identity load(const std::filesystem::path& path) {
    detail::sodium_ready();
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
      throw InvalidArgument(fmt::format("cannot read identity file {}: {}", path.string(), std::strerror(errno)));
    if ((st.st_mode & 077) != 0)
      throw InvalidArgument(fmt::format("identity file {} is readable by others (mode {:o}); run: chmod 600 {}", path.string(),
                                        st.st_mode & 0777, path.string()));
    std::string text(128, '\0');
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw InvalidArgument(fmt::format("cannot open identity file {}: {}", path.string(), std::strerror(errno)));
    const auto n = ::read(fd, text.data(), text.size());
    ::close(fd);
    text.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
    std::array<std::uint8_t, crypto_sign_SEEDBYTES> seed{};
    std::size_t length = 0;
    const char* end = nullptr;
    if (sodium_base642bin(seed.data(), seed.size(), text.data(), text.size(), nullptr, &length, &end,
                          sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0 ||
        length != seed.size() || end != text.data() + text.size())
      throw InvalidArgument(fmt::format("identity file {} does not hold a key (one line: a 32-byte seed in base64url)", path.string()));
    Identity id = from_seed(seed);
    sodium_memzero(seed.data(), seed.size());
    sodium_memzero(text.data(), text.size());
    return id;
  }

  Identity(const Identity&) = default;
  Identity& operator=(const Identity&) = default;
  ~Identity() { sodium_memzero(secret_.data(), secret_.size()); }

  /// The public key.
  [[nodiscard]] const PublicKey& public_key() const noexcept { return public_; }
  /// The peer id: peer_id_of(public_key()).
  [[nodiscard]] std::string peer_id() const { return peer_id_of(public_); }
  /// The `[owner:<peer id>]` marker that makes a DHT key or subkey this peer's alone.
  [[nodiscard]] std::string owner_marker() const { return "[owner:" + peer_id() + "]"; }

  /// This identity's signature of `message`.
  [[nodiscard]] Signature sign(std::span<const std::uint8_t> message) const {
    Signature signature{};
    crypto_sign_detached(signature.data(), nullptr, message.data(), message.size(), secret_.data());
    return signature;
  }

 private:
  Identity() = default;
  PublicKey public_{};
  std::array<std::uint8_t, crypto_sign_SECRETKEYBYTES> secret_{};
};

}  // namespace hive
