// Fuzzes the frame decoder (hive/net/frame.hpp) the way the transports drive it.
//
// Input: one configuration byte, then the bytes a peer sent.
//   bits 0-1: the limits: hive::Limits{} (twice as likely), small ones, or tiny ones
//   bit 2:    Simulated's way (each message one whole frame: decode_frame) instead of Tcp's
//             (a byte stream: parse_prefix on 24 bytes, then decode_frame_rest on the rest,
//             frame after frame until a fatal error or the end of the bytes)
// A bad frame must end in a FrameError (and the RPC layer's error reply must encode); a good one
// must keep its blobs inside the frame and re-encode to a frame that decodes to the same thing.

#include "fuzz_common.hpp"

#include <hive/net/frame.hpp>

#include <memory>

namespace {

using namespace hive;
using namespace hive::net;

Limits limits_for(std::uint8_t config) {
  switch (config & 3) {
    case 1: return Limits().max_frame_bytes(4096).max_header_bytes(256).max_header_depth(4).max_blobs(4).max_method_bytes(16);
    case 2: return Limits().max_frame_bytes(64).max_header_bytes(16).max_header_depth(1).max_blobs(1).max_method_bytes(1);
    default: return Limits{};
  }
}

// What the RPC layer does with a FrameError: answer it with an error frame (rpc.hpp read_loop).
void complain(const FrameError& e) {
  HIVE_FUZZ_EXPECT(&e.code().category() == &error_category(), "a FrameError carries hive's category");
  const auto reply = encode_frame(Frame::make_error(e.call_id(), static_cast<errc>(e.code().value()), e.what()));
  HIVE_FUZZ_EXPECT(reply.size() >= prefix_bytes, "the error reply is a frame");
}

// An exactly sized heap copy, as the transports read frames: ASan sees any read past it.
Buffer owned_copy(std::span<const std::uint8_t> bytes) {
  auto storage = std::make_shared_for_overwrite<std::byte[]>(std::max<std::size_t>(bytes.size(), 1));
  if (!bytes.empty()) std::memcpy(storage.get(), bytes.data(), bytes.size());
  const std::byte* data = storage.get();
  return Buffer(std::move(storage), data, bytes.size());
}

std::vector<std::uint8_t> header_bytes(const nlohmann::json& j) { return nlohmann::json::to_msgpack(j); }

// Checks a decoded frame whose body (everything after the prefix) is `rest`.
void check_frame(const Frame& f, const Buffer& rest, const FramePrefix& prefix, const Limits& limits) {
  HIVE_FUZZ_EXPECT(f.kind == FrameKind::request || f.kind == FrameKind::response || f.kind == FrameKind::error,
                   "kind {}", static_cast<int>(f.kind));
  HIVE_FUZZ_EXPECT(f.call_id == prefix.call_id, "call id");
  HIVE_FUZZ_EXPECT(f.message.blobs.size() == prefix.blob_count, "{} blobs decoded, {} declared",
                   f.message.blobs.size(), prefix.blob_count);
  HIVE_FUZZ_EXPECT(f.method.size() <= limits.max_method_bytes(), "method of {} bytes", f.method.size());
  if (f.kind != FrameKind::request) HIVE_FUZZ_EXPECT(f.method.empty(), "a method outside a request");
  const std::byte* begin = rest.data();
  const std::byte* end = begin + rest.size();
  std::uint64_t blob_total = 0;
  for (const auto& b : f.message.blobs) {
    HIVE_FUZZ_EXPECT(b.size() == 0 || (b.data() >= begin && b.data() + b.size() <= end), "a blob outside its frame");
    if (b.size() > 0)
      HIVE_FUZZ_EXPECT((static_cast<std::size_t>(b.data() - begin) + prefix_bytes) % blob_alignment == 0,
                       "a blob off its 8-byte boundary");
    blob_total += b.size();
  }
  HIVE_FUZZ_EXPECT(blob_total <= rest.size(), "blobs larger than the frame");
  if (f.kind == FrameKind::error) {
    // The caller's side of an error frame (rpc.hpp: RemoteError from "code" and "message").
    const auto& h = f.message.header;
    const int code = h["code"].get<int>();
    const auto text = h["message"].get<std::string>();
    (void)code;
    (void)text;
  }

  // Whatever decoded re-encodes, within the same limits unless the header grew.
  EncodedFrame again;
  try {
    again = encode_frame(f, limits);
  } catch (const Error& e) {
    HIVE_FUZZ_EXPECT(e.code() == errc::limit_exceeded, "re-encoding failed with {}", e.what());
    return;
  }
  Frame back;
  try {
    back = decode_frame(Buffer::adopt(again.flatten()), limits);
  } catch (const FrameError& e) {
    HIVE_FUZZ_EXPECT(false, "a re-encoded frame does not decode: {}", e.what());
  }
  HIVE_FUZZ_EXPECT(back.kind == f.kind && back.call_id == f.call_id && back.method == f.method, "round trip changed the frame");
  HIVE_FUZZ_EXPECT(back.message.blobs.size() == f.message.blobs.size(), "round trip changed the blob count");
  for (std::size_t i = 0; i < f.message.blobs.size(); ++i)
    HIVE_FUZZ_EXPECT(back.message.blobs[i] == f.message.blobs[i], "round trip changed blob {}", i);
  HIVE_FUZZ_EXPECT(header_bytes(back.message.header) == header_bytes(f.message.header), "round trip changed the header");
}

// Tcp's way: frames one after another in a byte stream.
void stream(std::span<const std::uint8_t> bytes, const Limits& limits) {
  std::size_t pos = 0;
  while (bytes.size() - pos >= prefix_bytes) {
    std::array<std::byte, prefix_bytes> raw;
    std::memcpy(raw.data(), bytes.data() + pos, prefix_bytes);
    FramePrefix prefix;
    try {
      prefix = parse_prefix(raw, limits);
    } catch (const FrameError& e) {
      HIVE_FUZZ_EXPECT(e.fatal(), "a prefix error must close the connection");
      complain(e);
      return;
    }
    HIVE_FUZZ_EXPECT(prefix.frame_bytes >= prefix_bytes && prefix.frame_bytes <= limits.max_frame_bytes(),
                     "prefix accepted a frame of {} bytes", prefix.frame_bytes);
    HIVE_FUZZ_EXPECT(prefix.header_length <= limits.max_header_bytes() && prefix.blob_count <= limits.max_blobs(),
                     "prefix accepted a header of {} bytes and {} blobs", prefix.header_length, prefix.blob_count);
    pos += prefix_bytes;
    const std::uint64_t rest_bytes = prefix.rest_bytes();
    if (rest_bytes > bytes.size() - pos) return;  // the peer stalls mid-frame; Tcp's watchdog ends it
    const Buffer rest = owned_copy(bytes.subspan(pos, rest_bytes));
    pos += rest_bytes;
    try {
      const Frame f = decode_frame_rest(prefix, rest, limits);
      check_frame(f, rest, prefix, limits);
    } catch (const FrameError& e) {
      HIVE_FUZZ_EXPECT(!e.fatal(), "a frame read whole must not break the stream: {}", e.what());
      HIVE_FUZZ_EXPECT(e.call_id() == prefix.call_id, "the error answers another call");
      complain(e);
    }
  }
}

// Simulated's way: the whole message is one frame.
void message(std::span<const std::uint8_t> bytes, const Limits& limits) {
  const Buffer whole = owned_copy(bytes);
  try {
    const Frame f = decode_frame(whole, limits);
    std::array<std::byte, prefix_bytes> raw;
    std::memcpy(raw.data(), bytes.data(), prefix_bytes);
    check_frame(f, whole.slice(prefix_bytes, whole.size() - prefix_bytes), parse_prefix(raw, limits), limits);
  } catch (const FrameError& e) {
    complain(e);
  }
}

std::vector<std::byte> frame_bytes(const Frame& f) { return encode_frame(f).flatten(); }

std::vector<fuzz::Seed> seeds() {
  auto as_u8 = [](const std::vector<std::byte>& b) {
    return std::vector<std::uint8_t>(reinterpret_cast<const std::uint8_t*>(b.data()),
                                     reinterpret_cast<const std::uint8_t*>(b.data()) + b.size());
  };
  auto with_config = [&](std::uint8_t config, std::initializer_list<std::vector<std::uint8_t>> frames) {
    std::vector<std::uint8_t> out{config};
    for (const auto& f : frames) out.insert(out.end(), f.begin(), f.end());
    return out;
  };
  Frame ping{FrameKind::request, 1, "dht.ping", Message{{{"from", {{"id", nlohmann::json::binary({1, 2, 3})}}}}, {}}};
  Frame blobs{FrameKind::response, 2, {}, Message{{{"tensors", {{{"blob", 0}}, {{"blob", 1}}}}}, {}}};
  blobs.message.blobs.push_back(Buffer::copy_of(std::string_view("0123456789abc")));
  blobs.message.blobs.push_back(Buffer::copy_of(std::string_view("")));
  const Frame error = Frame::make_error(3, errc::unknown_method, "unknown method 'x'");
  Frame tiny{FrameKind::request, 4, "m", Message{nullptr, {}}};
  std::vector<fuzz::Seed> out;
  out.push_back({"stream-ping", with_config(0, {as_u8(frame_bytes(ping))})});
  out.push_back({"stream-three-frames", with_config(0, {as_u8(frame_bytes(ping)), as_u8(frame_bytes(blobs)), as_u8(frame_bytes(error))})});
  out.push_back({"stream-small-limits", with_config(1, {as_u8(frame_bytes(tiny)), as_u8(frame_bytes(blobs))})});
  out.push_back({"stream-tiny-limits", with_config(2, {as_u8(frame_bytes(tiny))})});
  out.push_back({"message-blobs", with_config(4, {as_u8(frame_bytes(blobs))})});
  out.push_back({"message-error", with_config(4, {as_u8(frame_bytes(error))})});
  return out;
}

void one_input(hive::fuzz::Input& in) {
  const std::uint8_t config = in.u8();
  const hive::Limits limits = limits_for(config);
  const auto bytes = in.rest();
  if (config & 4) {
    if (bytes.size() >= hive::net::prefix_bytes) message(bytes, limits);
    else {
      try {
        (void)hive::net::decode_frame(owned_copy(bytes), limits);
        HIVE_FUZZ_EXPECT(false, "a frame shorter than its prefix decoded");
      } catch (const hive::net::FrameError& e) {
        complain(e);
      }
    }
  } else {
    stream(bytes, limits);
  }
}

}  // namespace

HIVE_FUZZ_TARGET(seeds, one_input)
