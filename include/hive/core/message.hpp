#pragma once
/// @file
/// Message: what an RPC carries — a JSON header (MessagePack on the wire) and raw byte blobs.

#include <hive/core/buffer.hpp>

#include <nlohmann/json.hpp>

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

}  // namespace hive
