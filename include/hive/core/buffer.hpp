#pragma once
/// @file
/// Buffer: an immutable, shared view of bytes that keeps its storage alive.

#include <cstddef>
#include <cstring>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

namespace hive {

/// An immutable view of bytes plus shared ownership of whatever holds them.
///
/// Frames are read into one allocation and each tensor payload is a Buffer into it, so a
/// decoded tensor can alias the receive buffer without a copy. Copying a Buffer is cheap.
/// @par Thread safety
/// Distinct Buffers may be used concurrently; the bytes are never written through a Buffer.
class Buffer {
 public:
  /// An empty buffer.
  Buffer() = default;
  /// A view of `size` bytes at `data`, kept alive by `owner`.
  Buffer(std::shared_ptr<const void> owner, const std::byte* data, std::size_t size) noexcept
      : owner_(std::move(owner)), data_(data), size_(size) {}

  /// Copies `bytes` into a new buffer.
  static Buffer copy_of(std::span<const std::byte> bytes) {
    auto storage = std::make_shared<std::vector<std::byte>>(bytes.begin(), bytes.end());
    const std::byte* p = storage->data();
    return {std::move(storage), p, bytes.size()};
  }
  /// Copies a string's characters into a new buffer.
  static Buffer copy_of(std::string_view s) {
    return copy_of(std::as_bytes(std::span<const char>(s.data(), s.size())));
  }
  /// Takes ownership of a vector of bytes without copying them.
  static Buffer adopt(std::vector<std::byte> bytes) {
    auto storage = std::make_shared<std::vector<std::byte>>(std::move(bytes));
    const std::byte* p = storage->data();
    const std::size_t n = storage->size();
    return {std::move(storage), p, n};
  }

  /// The first byte (may be null when empty).
  [[nodiscard]] const std::byte* data() const noexcept { return data_; }
  /// The number of bytes.
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  /// True when the buffer holds no bytes.
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  /// The bytes as a span.
  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  /// The owner that keeps the bytes alive (share it to extend their lifetime).
  [[nodiscard]] const std::shared_ptr<const void>& owner() const noexcept { return owner_; }
  /// A sub-view sharing this buffer's owner; `offset + length` must not exceed size().
  [[nodiscard]] Buffer slice(std::size_t offset, std::size_t length) const noexcept {
    return {owner_, data_ + offset, length};
  }
  /// Byte-wise equality of the viewed contents.
  friend bool operator==(const Buffer& a, const Buffer& b) noexcept {
    return a.size_ == b.size_ && (a.size_ == 0 || std::memcmp(a.data_, b.data_, a.size_) == 0);
  }

 private:
  std::shared_ptr<const void> owner_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace hive
