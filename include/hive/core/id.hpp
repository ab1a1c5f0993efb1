#pragma once
/// @file
/// Id160: the 160-bit identifiers of peers and keys (SHA-1 of a key), with the XOR metric.

#include <hive/core/error.hpp>

#include <fmt/format.h>

#include <array>
#include <bit>
#include <compare>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <string_view>

namespace hive {

namespace detail {

/// SHA-1 (FIPS 180-4). Used to map keys onto the id space, not for security.
inline std::array<std::uint8_t, 20> sha1(std::span<const std::uint8_t> msg) {
  std::uint32_t h[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
  const std::uint64_t bit_len = static_cast<std::uint64_t>(msg.size()) * 8;
  auto block = [&h](const std::uint8_t* p) {
    std::uint32_t w[80];
    for (int i = 0; i < 16; ++i)
      w[i] = (std::uint32_t(p[4 * i]) << 24) | (std::uint32_t(p[4 * i + 1]) << 16) |
             (std::uint32_t(p[4 * i + 2]) << 8) | std::uint32_t(p[4 * i + 3]);
    for (int i = 16; i < 80; ++i) w[i] = std::rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; ++i) {
      std::uint32_t f, k;
      if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999u;
      else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1u;
      else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDCu;
      else f = b ^ c ^ d, k = 0xCA62C1D6u;
      const std::uint32_t t = std::rotl(a, 5) + f + e + k + w[i];
      e = d, d = c, c = std::rotl(b, 30), b = a, a = t;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
  };
  std::size_t full = msg.size() / 64;
  for (std::size_t i = 0; i < full; ++i) block(msg.data() + 64 * i);
  std::uint8_t tail[128] = {};
  const std::size_t rem = msg.size() - full * 64;
  if (rem) std::memcpy(tail, msg.data() + full * 64, rem);
  tail[rem] = 0x80;
  const std::size_t tail_len = rem + 9 <= 64 ? 64 : 128;
  for (int i = 0; i < 8; ++i) tail[tail_len - 1 - i] = static_cast<std::uint8_t>(bit_len >> (8 * i));
  block(tail);
  if (tail_len == 128) block(tail + 64);
  std::array<std::uint8_t, 20> out{};
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<std::uint8_t>(h[i] >> (24 - 8 * j));
  return out;
}

}  // namespace detail

/// A 160-bit identifier, ordered as a big-endian unsigned integer.
///
/// Peers pick a random one; keys map to `Id160::of(key)` (SHA-1). The distance between two ids
/// is their XOR (Kademlia's metric).
class Id160 {
 public:
  /// Number of bytes in an id.
  static constexpr std::size_t size = 20;
  /// Number of bits in an id.
  static constexpr std::size_t bits = 160;

  /// The all-zero id.
  constexpr Id160() = default;
  /// An id from its 20 big-endian bytes.
  explicit constexpr Id160(const std::array<std::uint8_t, size>& bytes) : bytes_(bytes) {}

  /// The SHA-1 of `key`: where a key lives in the id space.
  static Id160 of(std::string_view key) {
    return Id160(detail::sha1({reinterpret_cast<const std::uint8_t*>(key.data()), key.size()}));
  }
  /// A uniformly random id drawn from `rng`.
  template <class Rng>
  static Id160 random(Rng& rng) {
    std::array<std::uint8_t, size> b{};
    std::uniform_int_distribution<unsigned> byte(0, 255);
    for (auto& x : b) x = static_cast<std::uint8_t>(byte(rng));
    return Id160(b);
  }
  /// A random id from a process-wide generator seeded by the OS.
  static Id160 random() {
    thread_local std::mt19937_64 rng{std::random_device{}()};
    return random(rng);
  }
  /// Parses 40 hexadecimal digits; throws hive::InvalidArgument otherwise.
  static Id160 from_hex(std::string_view hex) {
    HIVE_CHECK(hex.size() == 2 * size, "an Id160 is 40 hex digits, got {} characters", hex.size());
    std::array<std::uint8_t, size> b{};
    auto nibble = [&](char c) -> std::uint8_t {
      if (c >= '0' && c <= '9') return static_cast<std::uint8_t>(c - '0');
      if (c >= 'a' && c <= 'f') return static_cast<std::uint8_t>(c - 'a' + 10);
      if (c >= 'A' && c <= 'F') return static_cast<std::uint8_t>(c - 'A' + 10);
      HIVE_CHECK(false, "'{}' is not a hex digit in Id160 '{}'", c, hex);
    };
    for (std::size_t i = 0; i < size; ++i)
      b[i] = static_cast<std::uint8_t>(nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]));
    return Id160(b);
  }
  /// An id from exactly 20 raw bytes; throws hive::InvalidArgument for any other length.
  static Id160 from_bytes(std::span<const std::uint8_t> raw) {
    HIVE_CHECK(raw.size() == size, "an Id160 is 20 bytes, got {}", raw.size());
    std::array<std::uint8_t, size> b{};
    std::memcpy(b.data(), raw.data(), size);
    return Id160(b);
  }

  /// The 20 big-endian bytes.
  [[nodiscard]] constexpr const std::array<std::uint8_t, size>& bytes() const noexcept { return bytes_; }
  /// Lower-case hexadecimal, 40 digits.
  [[nodiscard]] std::string hex() const {
    std::string s;
    s.reserve(2 * size);
    for (auto b : bytes_) s += fmt::format("{:02x}", b);
    return s;
  }
  /// The XOR distance to `other`, itself an id.
  [[nodiscard]] constexpr Id160 operator^(const Id160& other) const noexcept {
    Id160 r;
    for (std::size_t i = 0; i < size; ++i) r.bytes_[i] = bytes_[i] ^ other.bytes_[i];
    return r;
  }
  /// Number of leading zero bits (160 for the zero id): the length of a shared prefix when
  /// applied to a distance.
  [[nodiscard]] constexpr int leading_zeros() const noexcept {
    for (std::size_t i = 0; i < size; ++i)
      if (bytes_[i]) return static_cast<int>(8 * i) + std::countl_zero(bytes_[i]);
    return bits;
  }
  /// Bit `i` counted from the most significant (0) to the least (159).
  [[nodiscard]] constexpr bool bit(std::size_t i) const noexcept {
    return (bytes_[i / 8] >> (7 - i % 8)) & 1u;
  }
  /// Ordering as a big-endian unsigned integer.
  friend constexpr auto operator<=>(const Id160&, const Id160&) = default;

 private:
  std::array<std::uint8_t, size> bytes_{};
};

/// The identity of a peer in the swarm.
using PeerId = Id160;

}  // namespace hive

/// Hashing so ids can key unordered containers.
template <>
struct std::hash<hive::Id160> {
  std::size_t operator()(const hive::Id160& id) const noexcept {
    std::size_t h;
    std::memcpy(&h, id.bytes().data(), sizeof h);
    return h;
  }
};

/// Formats an id as 40 hex digits.
template <>
struct fmt::formatter<hive::Id160> : fmt::formatter<std::string> {
  auto format(const hive::Id160& id, format_context& ctx) const {
    return fmt::formatter<std::string>::format(id.hex(), ctx);
  }
};
