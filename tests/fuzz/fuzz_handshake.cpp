// Fuzzes the connection handshake (hive/net/handshake.hpp) as both sides parse it: the frame a
// stranger opens a connection with, the answer a caller gets, and the proof that follows.
//
// Input: one byte choosing the mode, then:
//   mode 0 (frames): bytes decoded as a frame (net::decode_frame), then parsed as a caller's
//                    hello, a callee's answer and a proof. Parsing must succeed or throw
//                    hive::Error; a parsed answer's signature is checked against a fixed
//                    transcript, and must fail (the fuzzer cannot sign for the key it names).
//   mode 1 (fields): a hello built from the input's key, nonce and signature bytes (right
//                    sizes), round-tripped through its frame; then (one input in eight) one of
//                    16 real answers with the input's edits to its transcript: the signature
//                    verifies exactly when nothing was edited.

#include "fuzz_common.hpp"

#include <hive/net/frame.hpp>
#include <hive/net/handshake.hpp>

#include <memory>

namespace {

using namespace hive;
using namespace hive::net;

const Identity& callee() { return fuzz::fixed_identity(7); }

Buffer owned_copy(std::span<const std::uint8_t> bytes) {
  auto storage = std::make_shared_for_overwrite<std::byte[]>(std::max<std::size_t>(bytes.size(), 1));
  if (!bytes.empty()) std::memcpy(storage.get(), bytes.data(), bytes.size());
  const std::byte* data = storage.get();
  return Buffer(std::move(storage), data, bytes.size());
}

// A frame's bytes on the wire.
std::vector<std::uint8_t> wire(const Frame& f) {
  const auto flat = encode_frame(f).flatten();
  const auto* p = reinterpret_cast<const std::uint8_t*>(flat.data());
  return {p, p + flat.size()};
}

template <std::size_t N>
std::array<std::uint8_t, N> fixed(fuzz::Input& in) {
  std::array<std::uint8_t, N> out{};
  const auto b = in.bytes(N);
  std::copy(b.begin(), b.end(), out.begin());
  return out;
}

void frames(fuzz::Input& in) {
  Frame frame;
  try {
    frame = decode_frame(owned_copy(in.rest()), Limits().max_frame_bytes(1 << 16));
  } catch (const FrameError&) {
    return;
  }
  for (const bool caller : {true, false}) {
    try {
      const Hello h = parse_hello(frame, caller);
      HIVE_FUZZ_EXPECT(caller != h.signature.has_value(), "only a callee's answer carries a signature");
      if (!caller) {
        const Nonce mine{};
        const auto transcript = handshake_transcript('S', callee().public_key(), mine, h.key, h.nonce);
        HIVE_FUZZ_EXPECT(!verify_signature(h.key, transcript, *h.signature) || h.key == callee().public_key(),
                         "a forged answer verified");
      }
      // What a parsed hello re-encodes to parses to the same hello.
      const Hello again = parse_hello(decode_frame(owned_copy(wire(hello_frame(h, caller))), Limits{}), caller);
      HIVE_FUZZ_EXPECT(again.key == h.key && again.nonce == h.nonce && again.signature == h.signature && again.kx == h.kx &&
                           again.ciphers == h.ciphers,
                       "a hello changed in a round trip");
    } catch (const Error& e) {
      HIVE_FUZZ_EXPECT(&e.code().category() == &error_category(), "parse_hello threw outside hive's errors: {}", e.what());
    }
  }
  // As a proof: the callee reads the "sig" field of a hive.auth request.
  if (frame.kind == FrameKind::request && frame.method == auth_method) {
    try {
      (void)hive::net::detail::fixed_bytes<64>(frame.message.header, "sig");
    } catch (const Error&) {
    }
  }
}

void fields(fuzz::Input& in) {
  Hello h{fixed<32>(in), fixed<32>(in), {}};
  const bool answer = in.u8() & 1;
  if (answer) h.signature = fixed<64>(in);
  const Hello back = parse_hello(decode_frame(owned_copy(wire(hello_frame(h, !answer))), Limits{}), !answer);
  HIVE_FUZZ_EXPECT(back.key == h.key && back.nonce == h.nonce && back.signature == h.signature, "a built hello did not round-trip");
  // A real answer checked against the input's edits of its transcript: the answers are signed
  // once (signing and checking are libsodium's; the transcript's layout is what is fuzzed).
  static const auto signed_answers = [] {
    std::vector<std::pair<std::vector<std::uint8_t>, Signature>> out;
    for (std::uint8_t i = 0; i < 16; ++i) {
      Nonce a{}, b{};
      a[0] = i;
      b[1] = i;
      auto t = handshake_transcript('S', callee().public_key(), a, callee().public_key(), b);
      out.emplace_back(t, callee().sign(t));
    }
    return out;
  }();
  if (in.u8() % 8 != 0) return;  // most inputs stop at the frames, which is where parsing is
  const auto& [original, signature] = signed_answers[in.below(signed_answers.size())];
  auto transcript = original;
  const int edits = in.u8() % 3;
  for (int i = 0; i < edits && !in.empty(); ++i) transcript[in.below(transcript.size())] ^= static_cast<std::uint8_t>(in.u8() | 1);
  const bool ok = verify_signature(callee().public_key(), transcript, signature);
  HIVE_FUZZ_EXPECT(ok == (transcript == original), "a signature verified for an edited transcript, or failed for its own");
}

std::vector<fuzz::Seed> seeds() {
  std::vector<fuzz::Seed> out;
  const Hello caller{callee().public_key(), Nonce{}, {}};
  auto bytes = [](const Frame& f) { return wire(f); };
  out.push_back({"hello", fuzz::join({std::vector<std::uint8_t>{0}, bytes(hello_frame(caller, true))})});
  Hello offering = caller;
  offering.kx = KxKey{};
  offering.ciphers = {"aes256gcm", "chacha20poly1305"};
  out.push_back({"hello_offer", fuzz::join({std::vector<std::uint8_t>{0}, bytes(hello_frame(offering, true))})});
  Hello answer = caller;
  answer.signature = callee().sign(handshake_transcript('S', caller.key, caller.nonce, caller.key, caller.nonce));
  out.push_back({"answer", fuzz::join({std::vector<std::uint8_t>{0}, bytes(hello_frame(answer, false))})});
  out.push_back({"auth", fuzz::join({std::vector<std::uint8_t>{0}, bytes(auth_frame(*answer.signature))})});
  out.push_back({"fields", std::vector<std::uint8_t>(1 + 32 + 32 + 1 + 64 + 64 + 3, 1)});
  out.back().bytes[0] = 1;
  return out;
}

void one_input(hive::fuzz::Input& in) {
  if (in.u8() % 2 == 0)
    frames(in);
  else
    fields(in);
}

}  // namespace

HIVE_FUZZ_TARGET(seeds, one_input)
