#pragma once
/// @file
/// The wire format: one framed binary protocol for every hive message (see docs/protocol.md).
///
/// A frame is a fixed 24-byte prefix, a table of blob lengths, a MessagePack header and the
/// blobs, each blob starting on an 8-byte boundary. Decoding validates every length and count
/// against Limits before it allocates.

#include <hive/core/buffer.hpp>
#include <hive/core/error.hpp>
#include <hive/core/limits.hpp>
#include <hive/core/message.hpp>
#include <hive/core/msgpack.hpp>

#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace hive::net {

static_assert(std::endian::native == std::endian::little,
              "hive's wire format is little-endian; big-endian hosts are not supported yet");

/// What a frame carries.
enum class FrameKind : std::uint8_t {
  request = 1,   ///< a call: method name plus a Message
  response = 2,  ///< the successful result of a call
  error = 3,     ///< the failed result of a call: an errc code and a message
};

/// Wire-format version written in every frame; a peer refuses other versions.
inline constexpr std::uint8_t protocol_version = 1;
/// Bytes in the fixed prefix of every frame.
inline constexpr std::size_t prefix_bytes = 24;
/// Alignment of blobs inside a frame, so decoded tensors can alias the receive buffer.
inline constexpr std::size_t blob_alignment = 8;

/// One decoded frame.
struct Frame {
  /// Request, response or error.
  FrameKind kind = FrameKind::request;
  /// Matches a response or error to its request on a connection.
  std::uint64_t call_id = 0;
  /// The method called (requests only).
  std::string method;
  /// The body; for an error frame the header is {"code": int, "message": str}.
  Message message;

  /// An error frame answering call `call_id`.
  static Frame make_error(std::uint64_t call_id, errc code, std::string text) {
    Frame f{FrameKind::error, call_id, {}, {}};
    f.message.header = {{"code", static_cast<int>(code)}, {"message", std::move(text)}};
    return f;
  }
};

/// The fixed part of a frame, validated.
struct FramePrefix {
  /// Total bytes of the frame, prefix included (the length field plus 4).
  std::uint64_t frame_bytes = 0;
  /// Kind byte as received (validated later so that an unknown kind can still be answered).
  std::uint8_t kind = 0;
  /// Call id.
  std::uint64_t call_id = 0;
  /// Bytes of MessagePack header.
  std::uint32_t header_length = 0;
  /// Number of blobs.
  std::uint32_t blob_count = 0;
  /// Bytes following the 24-byte prefix.
  [[nodiscard]] std::uint64_t rest_bytes() const noexcept { return frame_bytes - prefix_bytes; }
};

/// A decoding failure; `fatal` means the byte stream can no longer be trusted and the
/// connection must close, otherwise the frame was skipped whole and the stream goes on.
class FrameError : public Error {
 public:
  /// Builds the failure; `call_id` is the id to answer, when the prefix could be read.
  FrameError(errc code, const std::string& what, std::uint64_t call_id, bool fatal)
      : Error(code, what), call_id_(call_id), fatal_(fatal) {}
  /// The call id of the offending frame (0 if unknown).
  [[nodiscard]] std::uint64_t call_id() const noexcept { return call_id_; }
  /// True when the connection must be closed.
  [[nodiscard]] bool fatal() const noexcept { return fatal_; }

 private:
  std::uint64_t call_id_;
  bool fatal_;
};

namespace detail {

template <class T>
inline T load_le(const std::byte* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class T>
inline void store_le(std::byte* p, T v) noexcept {
  std::memcpy(p, &v, sizeof v);
}
constexpr std::uint64_t pad_to(std::uint64_t n, std::uint64_t a) noexcept { return (n + a - 1) / a * a; }

inline const std::array<std::byte, blob_alignment> zero_padding{};

// Appends `s` as a MessagePack string (the shortest of fixstr, str8, str16, str32, as
// nlohmann writes it).
inline void append_msgpack_string(std::vector<std::uint8_t>& out, std::string_view s) {
  const auto n = s.size();
  if (n < 32) {
    out.push_back(static_cast<std::uint8_t>(0xa0 | n));
  } else if (n <= 0xff) {
    out.push_back(0xd9);
    out.push_back(static_cast<std::uint8_t>(n));
  } else if (n <= 0xffff) {
    out.push_back(0xda);
    for (int shift = 8; shift >= 0; shift -= 8) out.push_back(static_cast<std::uint8_t>(n >> shift));
  } else {
    if (n > 0xffffffffull) throw Error(errc::limit_exceeded, "a string over 4 GiB cannot be written as MessagePack");
    out.push_back(0xdb);
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<std::uint8_t>(n >> shift));
  }
  out.insert(out.end(), s.begin(), s.end());
}

}  // namespace detail

/// A frame ready to send: `head` (prefix, blob table, header, padding) then the blobs, each
/// followed by `padding[i]` zero bytes. The blobs are not copied.
struct EncodedFrame {
  /// Prefix, blob-length table, MessagePack header and the padding after it.
  std::vector<std::byte> head;
  /// The payloads, sent as they are.
  std::vector<Buffer> blobs;
  /// Zero bytes after each blob.
  std::vector<std::uint8_t> padding;
  /// Total bytes on the wire.
  [[nodiscard]] std::uint64_t size() const noexcept {
    std::uint64_t n = head.size();
    for (std::size_t i = 0; i < blobs.size(); ++i) n += blobs[i].size() + padding[i];
    return n;
  }
  /// Copies everything into one contiguous byte vector (used by the simulated network).
  [[nodiscard]] std::vector<std::byte> flatten() const {
    std::vector<std::byte> out;
    out.reserve(size());
    out.insert(out.end(), head.begin(), head.end());
    for (std::size_t i = 0; i < blobs.size(); ++i) {
      out.insert(out.end(), blobs[i].data(), blobs[i].data() + blobs[i].size());
      out.insert(out.end(), padding[i], std::byte{0});
    }
    return out;
  }
};

/// Encodes a frame. Throws hive::Error(limit_exceeded) when the frame would break `limits`,
/// so a sender learns of an oversized message before the receiver refuses it.
inline EncodedFrame encode_frame(const Frame& f, const Limits& limits = {}) {
  // The header is the map {"h": header, "m": method} ("m" in requests only), written around
  // the message's own header rather than copying it into a new tree: the same bytes as
  // to_msgpack of that map (keys in order), without a deep copy of every reply. It is written
  // into a per-thread scratch buffer that keeps its capacity (up to 1 MiB), so a header costs
  // no allocation besides the frame's own.
  thread_local std::vector<std::uint8_t> header;
  if (header.capacity() > (std::size_t{1} << 20)) header = {};
  header.clear();
  header.push_back(f.kind == FrameKind::request ? 0x82 : 0x81);  // fixmap of 2 or 1
  header.push_back(0xa1);                                         // fixstr "h"
  header.push_back('h');
  nlohmann::json::to_msgpack(f.message.header, header);
  if (f.kind == FrameKind::request) {
    header.push_back(0xa1);  // fixstr "m"
    header.push_back('m');
    detail::append_msgpack_string(header, f.method);
  }
  if (header.size() > limits.max_header_bytes())
    throw Error(errc::limit_exceeded, fmt::format("message header of {} bytes exceeds max_header_bytes={}",
                                                  header.size(), limits.max_header_bytes()));
  if (f.message.blobs.size() > limits.max_blobs())
    throw Error(errc::limit_exceeded, fmt::format("{} blobs exceed max_blobs={}", f.message.blobs.size(),
                                                  limits.max_blobs()));
  const std::uint64_t table = 8 * f.message.blobs.size();
  const std::uint64_t head_len = detail::pad_to(prefix_bytes + table + header.size(), blob_alignment);
  EncodedFrame out;
  out.head.resize(head_len);
  std::uint64_t total = head_len;
  out.blobs = f.message.blobs;
  out.padding.reserve(out.blobs.size());
  for (const auto& b : out.blobs) {
    const auto pad = detail::pad_to(b.size(), blob_alignment) - b.size();
    out.padding.push_back(static_cast<std::uint8_t>(pad));
    total += b.size() + pad;
  }
  if (total > limits.max_frame_bytes())
    throw Error(errc::limit_exceeded,
                fmt::format("frame of {} bytes exceeds max_frame_bytes={}", total, limits.max_frame_bytes()));
  // The length field is 32 bits: frames over 4 GiB are not representable.
  if (total - 4 > 0xFFFFFFFFull) throw Error(errc::limit_exceeded, "frames over 4 GiB are not supported");
  std::byte* p = out.head.data();
  detail::store_le<std::uint32_t>(p + 0, static_cast<std::uint32_t>(total - 4));
  detail::store_le<std::uint8_t>(p + 4, protocol_version);
  detail::store_le<std::uint8_t>(p + 5, static_cast<std::uint8_t>(f.kind));
  detail::store_le<std::uint16_t>(p + 6, 0);
  detail::store_le<std::uint64_t>(p + 8, f.call_id);
  detail::store_le<std::uint32_t>(p + 16, static_cast<std::uint32_t>(header.size()));
  detail::store_le<std::uint32_t>(p + 20, static_cast<std::uint32_t>(f.message.blobs.size()));
  for (std::size_t i = 0; i < f.message.blobs.size(); ++i)
    detail::store_le<std::uint64_t>(p + prefix_bytes + 8 * i, f.message.blobs[i].size());
  std::memcpy(p + prefix_bytes + table, header.data(), header.size());
  if (header.capacity() > (std::size_t{1} << 20)) header = {};
  return out;
}

/// Parses and validates the 24-byte prefix. Throws FrameError (fatal) when the lengths cannot
/// be trusted; an unknown kind is reported later by decode_frame_rest, non-fatally.
inline FramePrefix parse_prefix(std::span<const std::byte, prefix_bytes> p, const Limits& limits) {
  FramePrefix x;
  const auto length = detail::load_le<std::uint32_t>(p.data());
  x.frame_bytes = std::uint64_t{length} + 4;
  const auto version = detail::load_le<std::uint8_t>(p.data() + 4);
  x.kind = detail::load_le<std::uint8_t>(p.data() + 5);
  const auto flags = detail::load_le<std::uint16_t>(p.data() + 6);
  x.call_id = detail::load_le<std::uint64_t>(p.data() + 8);
  x.header_length = detail::load_le<std::uint32_t>(p.data() + 16);
  x.blob_count = detail::load_le<std::uint32_t>(p.data() + 20);
  auto fatal = [&](errc code, std::string what) -> FrameError { return {code, what, x.call_id, true}; };
  if (x.frame_bytes < prefix_bytes)
    throw fatal(errc::bad_frame, fmt::format("frame length {} is shorter than the prefix", x.frame_bytes));
  if (x.frame_bytes > limits.max_frame_bytes())
    throw fatal(errc::frame_too_large,
                fmt::format("frame of {} bytes exceeds max_frame_bytes={}", x.frame_bytes, limits.max_frame_bytes()));
  if (version != protocol_version)
    throw fatal(errc::bad_frame, fmt::format("unsupported protocol version {} (expected {})", version, protocol_version));
  if (flags != 0) throw fatal(errc::bad_frame, fmt::format("reserved flags {:#x} must be zero", flags));
  if (x.header_length > limits.max_header_bytes())
    throw fatal(errc::limit_exceeded,
                fmt::format("header of {} bytes exceeds max_header_bytes={}", x.header_length, limits.max_header_bytes()));
  if (x.blob_count > limits.max_blobs())
    throw fatal(errc::limit_exceeded, fmt::format("{} blobs exceed max_blobs={}", x.blob_count, limits.max_blobs()));
  const std::uint64_t need = prefix_bytes + 8ull * x.blob_count + x.header_length;
  if (need > x.frame_bytes)
    throw fatal(errc::bad_frame,
                fmt::format("frame of {} bytes is shorter than its blob table and header ({})", x.frame_bytes, need));
  return x;
}

/// Decodes the rest of a frame (everything after the prefix) held in `rest`, whose size must
/// be prefix.rest_bytes(). Blobs alias `rest`. Throws a non-fatal FrameError for a bad kind, an
/// inconsistent blob table or a bad header: the frame was consumed whole, the stream is intact.
inline Frame decode_frame_rest(const FramePrefix& prefix, const Buffer& rest, const Limits& limits) {
  auto fail = [&](errc code, std::string what) -> FrameError { return {code, what, prefix.call_id, false}; };
  if (prefix.kind < 1 || prefix.kind > 3) throw fail(errc::bad_frame, fmt::format("unknown frame kind {}", prefix.kind));
  const std::byte* p = rest.data();
  const std::uint64_t table = 8ull * prefix.blob_count;
  const std::uint64_t head_end = detail::pad_to(prefix_bytes + table + prefix.header_length, blob_alignment);
  const std::uint64_t total = prefix.frame_bytes;
  if (head_end > total) throw fail(errc::bad_frame, "frame is shorter than its padded header");
  std::uint64_t offset = head_end;
  Frame f;
  f.kind = static_cast<FrameKind>(prefix.kind);
  f.call_id = prefix.call_id;
  f.message.blobs.reserve(prefix.blob_count);
  for (std::uint32_t i = 0; i < prefix.blob_count; ++i) {
    const auto len = detail::load_le<std::uint64_t>(p + 8ull * i);
    if (len > total - offset) throw fail(errc::bad_frame, fmt::format("blob {} of {} bytes overruns the frame", i, len));
    const auto padded = detail::pad_to(len, blob_alignment);
    if (padded > total - offset) throw fail(errc::bad_frame, fmt::format("blob {} padding overruns the frame", i));
    f.message.blobs.push_back(rest.slice(offset - prefix_bytes, len));
    offset += padded;
  }
  if (offset != total)
    throw fail(errc::bad_frame, fmt::format("frame has {} bytes after its last blob", total - offset));
  const std::byte* header = p + table;
  nlohmann::json wire;
  try {
    wire = parse_msgpack({reinterpret_cast<const std::uint8_t*>(header), prefix.header_length},
                         limits.max_header_depth());
  } catch (const Error& e) {
    throw fail(errc::bad_header, fmt::format("header is not valid MessagePack: {}", e.what()));
  }
  if (!wire.is_object()) throw fail(errc::bad_header, "header must be a map");
  if (auto h = wire.find("h"); h != wire.end()) f.message.header = std::move(*h);
  if (f.kind == FrameKind::request) {
    auto m = wire.find("m");
    if (m == wire.end() || !m->is_string()) throw fail(errc::bad_header, "request header lacks a method name");
    f.method = m->get<std::string>();
    if (f.method.size() > limits.max_method_bytes())
      throw fail(errc::limit_exceeded, fmt::format("method name of {} bytes exceeds max_method_bytes", f.method.size()));
  } else if (f.kind == FrameKind::error) {
    const auto& h = f.message.header;
    if (!h.is_object() || !h.contains("code") || !h["code"].is_number_integer() || !h.contains("message") ||
        !h["message"].is_string())
      throw fail(errc::bad_header, "error frame lacks an integer code and a string message");
  }
  return f;
}

/// Decodes one whole frame from contiguous bytes (prefix included). Blobs alias `bytes`.
inline Frame decode_frame(const Buffer& bytes, const Limits& limits) {
  if (bytes.size() < prefix_bytes) throw FrameError(errc::bad_frame, "truncated frame prefix", 0, true);
  const auto prefix = parse_prefix(std::span<const std::byte, prefix_bytes>(bytes.data(), prefix_bytes), limits);
  if (bytes.size() != prefix.frame_bytes)
    throw FrameError(errc::bad_frame, fmt::format("frame declares {} bytes but {} were received",
                                                  prefix.frame_bytes, bytes.size()), prefix.call_id, true);
  return decode_frame_rest(prefix, bytes.slice(prefix_bytes, bytes.size() - prefix_bytes), limits);
}

}  // namespace hive::net
