#pragma once
/// @file
/// Safe MessagePack decoding of bytes that came from the network: a structural pre-scan that
/// bounds nesting depth and element counts before nlohmann's recursive parser sees the bytes.

#include <hive/core/error.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace hive {

/// Nesting depth of MessagePack containers accepted from the network by default; hive's own
/// messages nest at most 5 deep.
inline constexpr std::uint32_t default_max_msgpack_depth = 64;

namespace detail {

/// Walks one MessagePack value in `data` without recursion. Returns an error message when the
/// bytes are not exactly one well-formed value, when containers nest deeper than `max_depth`,
/// or when a container claims more elements than bytes remain (each element takes one byte at
/// least, so the claim cannot make a parser reserve more than the input justifies).
inline std::optional<std::string> msgpack_scan(std::span<const std::uint8_t> data, std::uint32_t max_depth) {
  const std::size_t n = data.size();
  std::size_t pos = 0;
  auto be = [&](std::size_t bytes) -> std::uint64_t {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < bytes; ++i) v = (v << 8) | data[pos + i];
    return v;
  };
  // Elements still expected in each open container; the bottom entry is the one top-level value.
  std::vector<std::uint64_t> open{1};
  while (!open.empty()) {
    if (pos >= n) return std::string("truncated MessagePack value");
    const std::uint8_t t = data[pos++];
    --open.back();
    std::uint64_t skip = 0;       // payload bytes after the type byte (and its length field)
    std::uint64_t children = 0;   // elements of a container
    bool container = false;
    auto length = [&](std::size_t bytes) -> bool {
      if (n - pos < bytes) return false;
      skip = be(bytes);
      pos += bytes;
      return true;
    };
    auto count = [&](std::size_t bytes, std::uint64_t per) -> bool {
      if (n - pos < bytes) return false;
      children = be(bytes) * per;
      pos += bytes;
      container = true;
      return true;
    };
    bool ok = true;
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
      // fixint, nil, bool: the type byte is the whole value
    } else if (t >= 0x80 && t <= 0x8f) {
      children = 2ull * (t & 0x0f);
      container = true;
    } else if (t >= 0x90 && t <= 0x9f) {
      children = t & 0x0f;
      container = true;
    } else if (t >= 0xa0 && t <= 0xbf) {
      skip = t & 0x1f;
    } else {
      switch (t) {
        case 0xc4: case 0xd9: ok = length(1); break;            // bin8, str8
        case 0xc5: case 0xda: ok = length(2); break;            // bin16, str16
        case 0xc6: case 0xdb: ok = length(4); break;            // bin32, str32
        case 0xc7: ok = length(1); skip += 1; break;            // ext8: length, type, data
        case 0xc8: ok = length(2); skip += 1; break;            // ext16
        case 0xc9: ok = length(4); skip += 1; break;            // ext32
        case 0xca: skip = 4; break;                              // float32
        case 0xcb: skip = 8; break;                              // float64
        case 0xcc: case 0xd0: skip = 1; break;                   // (u)int8
        case 0xcd: case 0xd1: skip = 2; break;                   // (u)int16
        case 0xce: case 0xd2: skip = 4; break;                   // (u)int32
        case 0xcf: case 0xd3: skip = 8; break;                   // (u)int64
        case 0xd4: skip = 2; break;                              // fixext1: type + 1
        case 0xd5: skip = 3; break;                              // fixext2
        case 0xd6: skip = 5; break;                              // fixext4
        case 0xd7: skip = 9; break;                              // fixext8
        case 0xd8: skip = 17; break;                             // fixext16
        case 0xdc: ok = count(2, 1); break;                      // array16
        case 0xdd: ok = count(4, 1); break;                      // array32
        case 0xde: ok = count(2, 2); break;                      // map16
        case 0xdf: ok = count(4, 2); break;                      // map32
        default: return "invalid MessagePack type byte 0xc1";    // 0xc1: never used
      }
    }
    if (!ok || skip > n - pos) return std::string("truncated MessagePack value");
    pos += skip;
    if (container && children > 0) {
      if (children > n - pos) return "a MessagePack container claims more elements than the bytes hold";
      if (open.size() > max_depth)
        return "MessagePack nesting exceeds the depth limit of " + std::to_string(max_depth);
      open.push_back(children);
    }
    while (!open.empty() && open.back() == 0) open.pop_back();
  }
  if (pos != n) return "trailing bytes after a MessagePack value";
  return std::nullopt;
}

}  // namespace detail

/// Decodes MessagePack bytes from an untrusted source. Throws hive::Error(errc::bad_header)
/// for malformed bytes or containers nested deeper than `max_depth`, before any recursion.
inline nlohmann::json parse_msgpack(std::span<const std::uint8_t> bytes,
                                    std::uint32_t max_depth = default_max_msgpack_depth) {
  if (auto problem = detail::msgpack_scan(bytes, max_depth)) throw Error(errc::bad_header, *problem);
  try {
    return nlohmann::json::from_msgpack(bytes.begin(), bytes.end());
  } catch (const nlohmann::json::exception& e) {
    throw Error(errc::bad_header, e.what());
  }
}

}  // namespace hive
