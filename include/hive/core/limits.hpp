#pragma once
/// @file
/// Limits: the bounds every decoder checks before it allocates.

#include <hive/core/options.hpp>

#include <cstddef>
#include <cstdint>

namespace hive {

/// Bounds on what a peer accepts from the network. Each is checked before allocation, so a
/// hostile or broken peer cannot make this one allocate more than these allow.
struct Limits {
  /// Largest frame body accepted, in bytes (header plus all tensor payloads). What hive sends
  /// in bulk travels in parts well below it (averaging chunks, state parts of 8 MiB, serving
  /// snapshots); raise it for remote-expert batches above 256 MiB.
  HIVE_ARG(std::uint64_t, max_frame_bytes, std::uint64_t{256} << 20);
  /// Largest MessagePack header accepted, in bytes.
  HIVE_ARG(std::uint32_t, max_header_bytes, 4u << 20);
  /// Deepest nesting of maps and arrays accepted in a MessagePack header (and in DHT values);
  /// deeper input is refused before it is parsed, since the parser recurses.
  HIVE_ARG(std::uint32_t, max_header_depth, 64);
  /// Most payload blobs (tensors) in one frame.
  HIVE_ARG(std::uint32_t, max_blobs, 4096);
  /// Largest tensor rank accepted.
  HIVE_ARG(std::uint32_t, max_tensor_rank, 16);
  /// Most elements in one tensor.
  HIVE_ARG(std::uint64_t, max_tensor_elements, std::uint64_t{1} << 31);
  /// Longest method name accepted in a request.
  HIVE_ARG(std::uint32_t, max_method_bytes, 256);
  HIVE_OPTIONS_JSON(Limits, max_frame_bytes, max_header_bytes, max_header_depth, max_blobs, max_tensor_rank,
                    max_tensor_elements, max_method_bytes)
};

}  // namespace hive
