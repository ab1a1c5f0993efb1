// Fuzzes the MessagePack decoding of untrusted headers (hive/core/msgpack.hpp), as the RPC
// layer (frame headers, limited by Limits::max_header_depth) and the DHT (values, the default
// depth) use it.
//
// Input: one byte choosing the depth limit, then MessagePack bytes.
//   byte 0 < 128:  depth (byte 0) % 8, to reach the limit with small inputs
//   byte 0 < 192:  Limits{}.max_header_depth() (the RPC layer's default)
//   otherwise:     default_max_msgpack_depth (the DHT's)
// parse_msgpack must either throw hive::Error(bad_header) or return a value whose non-empty
// containers nest no deeper than the limit, that re-encodes and decodes to the same bytes, and
// that dumps as text the way error messages do. Small inputs are also given to nlohmann's
// parser alone: what it accepts, the pre-scan may refuse for depth only.

#include "fuzz_common.hpp"

#include <hive/core/limits.hpp>
#include <hive/core/msgpack.hpp>

namespace {

using namespace hive;
using nlohmann::json;

// Depth of nested non-empty containers (what the pre-scan limits), without recursion.
std::size_t nonempty_depth(const json& root) {
  std::size_t deepest = 0;
  std::vector<std::pair<const json*, std::size_t>> todo{{&root, 0}};
  while (!todo.empty()) {
    auto [j, depth] = todo.back();
    todo.pop_back();
    if (!j->is_structured() || j->empty()) continue;
    deepest = std::max(deepest, depth + 1);
    for (const auto& child : *j) todo.emplace_back(&child, depth + 1);
  }
  return deepest;
}

std::uint32_t depth_for(std::uint8_t b) {
  if (b < 128) return b % 8;
  if (b < 192) return Limits{}.max_header_depth();
  return default_max_msgpack_depth;
}

void check(std::span<const std::uint8_t> bytes, std::uint32_t max_depth) {
  json j;
  bool parsed = false;
  try {
    j = parse_msgpack(bytes, max_depth);
    parsed = true;
  } catch (const Error& e) {
    HIVE_FUZZ_EXPECT(e.code() == errc::bad_header, "parse_msgpack failed with {}", e.what());
  }
  // Anything else escaping parse_msgpack (a nlohmann exception, bad_alloc) aborts the fuzzer.

  if (parsed) {
    HIVE_FUZZ_EXPECT(nonempty_depth(j) <= max_depth, "a value nested {} deep passed a limit of {}", nonempty_depth(j),
                     max_depth);
    const auto encoded = json::to_msgpack(j);
    json back;
    try {
      back = parse_msgpack(encoded, max_depth);
    } catch (const Error& e) {
      HIVE_FUZZ_EXPECT(false, "a re-encoded value does not decode: {}", e.what());
    }
    HIVE_FUZZ_EXPECT(json::to_msgpack(back) == encoded, "re-encoding is not stable");
    // How error messages quote a hostile value (tensor_codec.hpp's brief()): never throws.
    (void)j.dump(-1, ' ', false, json::error_handler_t::replace);
    // How the RPC layer reads a frame header (frame.hpp decode_frame_rest).
    if (j.is_object()) {
      if (auto m = j.find("m"); m != j.end() && m->is_string()) (void)m->get_ref<const std::string&>();
      if (auto h = j.find("h"); h != j.end()) (void)h->type_name();
    }
  }

  // Differential: nlohmann alone (bounded input, so its recursion cannot exhaust the stack).
  if (bytes.size() <= 512) {
    json direct;
    bool ok = false;
    try {
      direct = json::from_msgpack(bytes.begin(), bytes.end());
      ok = true;
    } catch (const json::exception&) {
    }
    if (ok) {
      // Well-formed bytes pass the scan's structure checks; a refusal at this depth limit is
      // then about depth. (The decoded value may nest less than the bytes: a duplicate key
      // replaces a deep value.)
      const auto structure = hive::detail::msgpack_scan(bytes, std::numeric_limits<std::uint32_t>::max());
      HIVE_FUZZ_EXPECT(!structure, "the pre-scan refused {} bytes nlohmann decodes: {}", bytes.size(), *structure);
      if (!parsed) {
        const auto why = hive::detail::msgpack_scan(bytes, max_depth);
        HIVE_FUZZ_EXPECT(why && why->find("depth") != std::string::npos, "refused for something else than depth: {}",
                         why.value_or("nothing"));
      } else {
        HIVE_FUZZ_EXPECT(json::to_msgpack(direct) == json::to_msgpack(j), "the two decodings differ");
      }
    }
  }
}

std::vector<fuzz::Seed> seeds() {
  auto with = [](std::uint8_t depth_byte, const json& j) {
    auto body = json::to_msgpack(j);
    body.insert(body.begin(), depth_byte);
    return body;
  };
  const json request = {{"m", "dht.find"},
                        {"h", {{"from", {{"id", json::binary(std::vector<std::uint8_t>(20, 7))}, {"addr", "10.0.0.1:1337"}}},
                               {"keys", json::array({json::binary(std::vector<std::uint8_t>(20, 9))})}}}};
  const json error = {{"h", {{"code", 10}, {"message", "unknown method 'x'"}}}};
  const json scalars = json::array({nullptr, true, false, 0, -1, 127, -32, 255, 65536, -70000, 1ll << 40, -(1ll << 40),
                                    18446744073709551615ull, 1.5, -0.0, 3.4e38, 1e300, "", "text",
                                    json::binary({1, 2, 3}), json::binary({4, 5}, 42)});
  json nested = 1;
  for (int i = 0; i < 6; ++i) nested = json::array({nested});
  std::vector<fuzz::Seed> out;
  out.push_back({"rpc-request", with(150, request)});
  out.push_back({"rpc-error", with(150, error)});
  out.push_back({"dht-scalars", with(200, scalars)});
  out.push_back({"nested-6", with(6, nested)});
  out.push_back({"nested-over-limit", with(3, nested)});
  out.push_back({"empty-map", with(0, json::object())});
  return out;
}

void one_input(hive::fuzz::Input& in) {
  const auto depth = depth_for(in.u8());
  check(in.rest(), depth);
}

}  // namespace

HIVE_FUZZ_TARGET(seeds, one_input)
