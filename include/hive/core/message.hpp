#pragma once
/// @file
/// Message: what an RPC carries — a JSON header (MessagePack on the wire) and raw byte blobs —
/// and the checked readers of the integers in a header.

#include <hive/core/buffer.hpp>
#include <hive/core/error.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <concepts>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

namespace hive {

/// The body of a request or a response.
///
/// `header` holds small structured data and is MessagePack-encoded on the wire. `blobs` hold
/// bulk bytes (tensor payloads) that travel after the header without being copied into it; a
/// header refers to a blob by its index (see hive/core/tensor_codec.hpp for tensors).
struct Message {
  /// Structured part; any JSON value (null when absent).
  nlohmann::json header;
  /// Bulk payloads, referenced from the header by index.
  std::vector<Buffer> blobs;

  /// Appends a blob and returns its index.
  std::size_t add_blob(Buffer b) {
    blobs.push_back(std::move(b));
    return blobs.size() - 1;
  }
  /// Total bytes in all blobs.
  [[nodiscard]] std::size_t blob_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& b : blobs) n += b.size();
    return n;
  }
};

/// The integer `j` holds when it is an integer number (a float is refused, even a whole one)
/// that T can represent; nullopt otherwise. Headers and DHT values come from other peers: read
/// their integers with this or integer_field, never with `j.get<T>()`, which converts a float
/// such as NaN or 1e300 with undefined behaviour.
template <std::integral T>
[[nodiscard]] std::optional<T> integer_of(const nlohmann::json& j) noexcept {
  if (j.is_number_unsigned()) {
    const auto u = j.get<std::uint64_t>();
    if (std::in_range<T>(u)) return static_cast<T>(u);
  } else if (j.is_number_integer()) {
    const auto v = j.get<std::int64_t>();
    if (std::in_range<T>(v)) return static_cast<T>(v);
  }
  return std::nullopt;
}

/// The integer field `key` of the header `h`, or `fallback` when `h` is an object without it
/// (without a fallback, the field is required). Throws hive::Error(errc::bad_header), naming
/// `what` (the message being read) and the key, when `h` is not an object or the field holds
/// anything but an integer that T can represent.
template <std::integral T>
[[nodiscard]] T integer_field(const nlohmann::json& h, std::string_view key, std::string_view what,
                              std::optional<T> fallback = std::nullopt) {
  if (!h.is_object()) throw Error(errc::bad_header, fmt::format("{}: the header is not a map", what));
  const auto it = h.find(key);
  if (it == h.end()) {
    if (fallback) return *fallback;
    throw Error(errc::bad_header, fmt::format("{}: '{}' is missing", what, key));
  }
  if (auto v = integer_of<T>(*it)) return *v;
  throw Error(errc::bad_header, fmt::format("{}: '{}' must be an integer from {} to {}", what, key,
                                            std::numeric_limits<T>::min(), std::numeric_limits<T>::max()));
}

}  // namespace hive
