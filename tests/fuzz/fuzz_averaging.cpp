// Fuzzes the averaging messages a hostile peer can send (hive/averaging/): matchmaking's join
// requests, join replies and DHT announcements, and the avg.part chunks that a butterfly
// reducer aggregates.
//
// Input: one byte choosing the message, then:
//   0 (join request):  MessagePack of an avg.join header, read by decode_join_request.
//   1 (join reply):    a flag byte (bit 0: the asking peer is in client mode; bits 1-2: how
//                      many followers it brought; bit 3: it checks its own peer id in its place),
//                      a vector size (u32) and a chunk size (u16) to
//                      partition the group's vector with, then MessagePack of the leader's reply,
//                      read by decode_join_reply; a group it accepts is then partitioned.
//   2 (announcement):  a subkey byte (even: an integer subkey, odd: a string one of the next
//                      byte's length), then MessagePack of a group key's dictionary value, read
//                      by decode_announcement.
//   3 (avg.part):      a group (members, flags, vector size, chunk size, compression,
//                      aggregation) in which this peer is an auxiliary reducer, then up to eight
//                      avg.part requests (each: a byte choosing the caller's proven peer id, one of
//                      the members' or a stranger's, then a MessagePack header with a 16-bit
//                      length, a blob count, 16-bit-length blobs), served at once by a real
//                      Butterfly::Runner on a private io_context. A reply that succeeds must carry
//                      one float vector of the chunk's length, the same for every sender of the
//                      chunk, and (uncompressed) within the range of the values sent; one from a
//                      caller that is not the member it names as sender must fail.

#include "fuzz_common.hpp"

#include <hive/averaging/butterfly.hpp>
#include <hive/averaging/group.hpp>
#include <hive/core/msgpack.hpp>
#include <hive/net/simulated.hpp>

#include <ATen/ATen.h>

#include <cmath>
#include <map>

namespace {

using namespace hive;
using namespace hive::averaging;
using nlohmann::json;

std::optional<json> msgpack_of(std::span<const std::uint8_t> bytes) {
  try {
    return parse_msgpack(bytes);
  } catch (const Error&) {
    return std::nullopt;
  }
}

void check_member(const Member& m) {
  HIVE_FUZZ_EXPECT(std::isfinite(m.bandwidth) && m.bandwidth >= 0, "a member's bandwidth {}", m.bandwidth);
  HIVE_FUZZ_EXPECT(!(m.auxiliary && m.client_mode), "an auxiliary member in client mode");
  // What a member is sent as (in a join reply) reads back the same.
  const Member back = json(m).get<Member>();
  HIVE_FUZZ_EXPECT(back.address == m.address && back.client_mode == m.client_mode && back.auxiliary == m.auxiliary &&
                       back.bandwidth == m.bandwidth,
                   "a member changed in a round trip");
}

// ---- matchmaking ----------------------------------------------------------------------------

// Fixed peer ids (hive::Identity) for the members of fuzzed groups (0..5).
std::string peer_id(std::size_t i) { return fuzz::fixed_identity(static_cast<std::uint8_t>(i + 1)).peer_id(); }

void fuzz_join_request(fuzz::Input& in) {
  auto h = msgpack_of(in.rest());
  if (!h) return;
  JoinRequest r;
  try {
    r = decode_join_request(*h, peer_id(0));
  } catch (const Error& e) {
    HIVE_FUZZ_EXPECT(e.code() == errc::bad_header, "decode_join_request failed with {}", e.what());
    return;
  }
  HIVE_FUZZ_EXPECT(!r.block.empty(), "a join request without its requester");
  HIVE_FUZZ_EXPECT(r.block[0].peer == peer_id(0), "the requester's id is not the caller's");
  for (const auto& m : r.block) {
    check_member(m);
    HIVE_FUZZ_EXPECT(m.client_mode || !m.address.empty(), "a reducing member without an address");
  }
}

void fuzz_join_reply(fuzz::Input& in) {
  const std::uint8_t flags = in.u8();
  const bool client_mode = flags & 1;
  const std::size_t brought = (flags >> 1) & 3;
  const auto total = static_cast<std::int64_t>(in.take<std::uint32_t>());
  const auto chunk = std::int64_t{1} + in.take<std::uint16_t>();
  auto h = msgpack_of(in.rest());
  if (!h) return;
  const std::string address = client_mode ? "" : "10.0.0.1:1000";
  JoinAnswer answer;
  try {
    answer = decode_join_reply(*h, address, client_mode, brought, (flags & 8) ? peer_id(1) : std::string());
  } catch (const Error& e) {
    HIVE_FUZZ_EXPECT(e.code() == errc::bad_header, "decode_join_reply failed with {}", e.what());
    return;
  }
  if (!answer.group) return;
  const GroupInfo& g = *answer.group;
  HIVE_FUZZ_EXPECT(g.size() >= 2 && g.my_index + brought < g.size(), "index {} (+{}) in a group of {}", g.my_index,
                   brought, g.size());
  HIVE_FUZZ_EXPECT(g.members[g.my_index].address == address && g.members[g.my_index].client_mode == client_mode,
                   "the group does not hold the asking peer at its index");
  for (const auto& m : g.members) check_member(m);
  // What a member does with the group next: its parts and chunks, and its next group key.
  if (g.reducers().empty()) return;
  const auto parts = partition(g, total);
  HIVE_FUZZ_EXPECT(parts.size() == g.reducers().size(), "{} parts for {} reducers", parts.size(), g.reducers().size());
  std::int64_t at = 0;
  for (const auto& p : parts) {
    HIVE_FUZZ_EXPECT(p.begin == at && p.end >= p.begin, "part [{}, {}) after {}", p.begin, p.end, at);
    at = p.end;
    if (p.size() / chunk <= 4096) {
      std::int64_t c_at = p.begin;
      for (const auto& c : chunks_of(p, chunk)) {
        HIVE_FUZZ_EXPECT(c.begin == c_at && c.size() <= chunk && (c.size() > 0 || p.size() == 0), "a bad chunk");
        c_at = c.end;
      }
      HIVE_FUZZ_EXPECT(c_at == p.end, "chunks do not cover their part");
    }
  }
  HIVE_FUZZ_EXPECT(at == total, "parts cover {} of {} elements", at, total);
  GroupKeys keys("run", "0101");
  keys.update(g.my_index, g.size());
  HIVE_FUZZ_EXPECT(keys.bits().size() == 4, "group bits changed length");
}

void fuzz_announcement(fuzz::Input& in) {
  const std::uint8_t kind = in.u8();
  dht::Subkey subkey;
  if (kind & 1) {
    const auto s = in.chunk();
    subkey = std::string(s.begin(), s.end());
  } else {
    subkey = in.take<std::int64_t>();
  }
  auto value = msgpack_of(in.rest());
  if (!value) return;
  const auto a = decode_announcement(subkey, *value);  // must not throw
  if (!a) return;
  HIVE_FUZZ_EXPECT(std::holds_alternative<std::string>(subkey) && a->address == std::get<std::string>(subkey),
                   "an announcement's address is not its subkey");
  HIVE_FUZZ_EXPECT(std::isfinite(a->deadline), "an announcement with deadline {}", a->deadline);
}

// ---- avg.part on a real reducer ------------------------------------------------------------

// One io_context run by the fuzzer's thread: every coroutine of an input runs to its end (or
// to a wait) inside poll(), so an input is replayed exactly.
struct Reducer {
  asio::io_context context;
  std::shared_ptr<net::SimNetwork> network = net::SimNetwork::create(context.get_executor());
  std::shared_ptr<net::Rpc<net::Simulated>> rpc =
      net::Rpc<net::Simulated>::create(context.get_executor(), net::SimulatedOptions().network(network));

  void drain() {
    context.restart();
    while (context.poll() > 0) {
    }
  }
};

Reducer& reducer() {
  static Reducer* r = new Reducer();  // never destroyed: static destruction order is not ours
  return *r;
}

struct Served {
  std::size_t sender = 0, chunk = 0;
  std::string caller;  // the proven peer id it came from
  std::vector<double> sent;  // the decoded chunk, when it decoded to a finite float vector
  bool done = false, ok = false;
  Message reply;
  std::string error;
};

void fuzz_part(fuzz::Input& in) {
  Reducer& red = reducer();
  GroupInfo group;
  group.group_id = "g";
  group.my_index = 0;
  const std::size_t n = 2 + in.below(3);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint8_t f = i == 0 ? 0 : in.u8();
    Member m;
    m.address = fmt::format("10.0.0.{}:1000", i);
    m.client_mode = f & 1;
    m.auxiliary = i == 0 || ((f & 2) && !m.client_mode);
    m.bandwidth = (f & 4) ? 1.0 + (f >> 3) : 0.0;
    m.peer = peer_id(i);
    group.members.push_back(m);
  }
  if (group.senders() == 0) group.members[1].auxiliary = false;
  AllReduceSettings s;
  const auto total = static_cast<std::int64_t>(in.below(49));
  s.chunk_elements = 1 + static_cast<std::int64_t>(in.below(16));
  const std::uint8_t knobs = in.u8();
  s.compression = static_cast<Compression>(knobs & 3);
  switch ((knobs >> 2) % 3) {
    case 0: break;
    case 1: s.aggregation.method(Aggregation::centered_clip).tau(0.5).max_iterations(5); break;
    case 2: s.aggregation.method(Aggregation::trimmed_mean).trim(1); break;
  }
  if (knobs & 32) s.limits = Limits().max_tensor_rank(1).max_tensor_elements(16);
  // Nothing here waits on a clock: senders that never come are cut off by close().
  s.sender_timeout = s.timeout = s.reducer_timeout = Seconds(3600);
  s.registration_timeout = Seconds(0);

  const auto parts = partition(group, total);
  const auto my_chunks = chunks_of(parts[0], s.chunk_elements);

  auto runner = std::make_shared<Butterfly::Runner<net::Simulated>>(red.rpc);
  bool run_done = false;
  asio::co_spawn(red.context, runner->run(group, at::zeros({total}, at::kFloat), 0.0, s),
                 [&](std::exception_ptr, Reduced) { run_done = true; });
  red.drain();  // the reduction is registered

  std::vector<std::unique_ptr<Served>> served;
  const std::size_t messages = in.below(9);
  for (std::size_t i = 0; i < messages && !in.empty(); ++i) {
    net::CallContext ctx;
    ctx.peer = peer_id(in.below(n + 1));  // a member, or (n) a stranger
    auto header = msgpack_of(in.chunk16());
    Message m;
    const std::size_t blobs = in.below(3);
    for (std::size_t b = 0; b < blobs; ++b) {
      const auto bytes = in.chunk16();
      m.blobs.push_back(Buffer::copy_of(std::as_bytes(std::span(bytes))));
    }
    if (!header) continue;
    m.header = std::move(*header);
    auto record = std::make_unique<Served>();
    const auto& h = m.header;
    if (h.is_object() && h.contains("sender") && h["sender"].is_number_unsigned() && h.contains("chunk") &&
        h["chunk"].is_number_unsigned()) {
      record->sender = h["sender"].get<std::size_t>();
      record->chunk = h["chunk"].get<std::size_t>();
      try {
        auto t = get_tensors(m, s.limits);
        if (t.size() == 1 && t[0].is_floating_point() && t[0].dim() == 1) {
          auto d = t[0].to(at::kDouble).contiguous();
          record->sent.assign(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
        }
      } catch (const Error&) {
      }
    }
    Served* out = record.get();
    served.push_back(std::move(record));
    out->caller = ctx.peer;
    auto op = runner->serve(std::move(ctx), std::move(m), s);
    asio::co_spawn(red.context, std::move(op), [out](std::exception_ptr e, Message reply) {
      out->done = true;
      if (!e) {
        out->ok = true;
        out->reply = std::move(reply);
        return;
      }
      try {
        std::rethrow_exception(e);
      } catch (const Error& err) {
        out->error = err.what();
      } catch (const InvalidArgument& err) {
        out->error = err.what();
      } catch (const std::exception& err) {
        HIVE_FUZZ_EXPECT(false, "avg.part failed with a non-hive exception: {}", err.what());
      }
    });
  }
  red.drain();
  runner->close();
  red.drain();
  HIVE_FUZZ_EXPECT(run_done, "the reducer's round did not end at close()");

  // What each chunk's senders got back.
  std::map<std::size_t, const Served*> first_ok;
  for (const auto& r : served) {
    HIVE_FUZZ_EXPECT(r->done, "an avg.part call did not end at close()");
    if (!r->ok) continue;
    HIVE_FUZZ_EXPECT(r->sender < group.size() && r->caller == group.members[r->sender].peer,
                     "a chunk of member {} from caller {} was taken", r->sender, r->caller);
    HIVE_FUZZ_EXPECT(r->chunk < my_chunks.size(), "chunk {} answered, the part has {}", r->chunk, my_chunks.size());
    const auto range = my_chunks[r->chunk];
    std::vector<at::Tensor> average;
    try {
      average = get_tensors(r->reply, s.limits);
    } catch (const Error& e) {
      HIVE_FUZZ_EXPECT(false, "a reducer's answer does not decode: {}", e.what());
    }
    HIVE_FUZZ_EXPECT(average.size() == 1 && average[0].is_floating_point() && average[0].numel() == range.size(),
                     "a reducer answered chunk {} with something else than one float vector of {}", r->chunk, range.size());
    auto [it, fresh] = first_ok.emplace(r->chunk, r.get());
    if (!fresh) {
      const auto& a = it->second->reply;
      const auto& b = r->reply;
      HIVE_FUZZ_EXPECT(a.header == b.header && a.blobs.size() == b.blobs.size() && a.blobs[0] == b.blobs[0],
                       "senders of chunk {} got different answers", r->chunk);
    }
    if (s.compression != Compression::none) continue;
    // The aggregate (mean, CenteredClip or trimmed mean) lies within what the senders sent.
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    bool bounded = true;
    for (const auto& other : served) {
      if (other->chunk != r->chunk || other->sent.empty()) continue;
      for (double v : other->sent) {
        bounded &= std::isfinite(v) && std::abs(v) <= 1e6;
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
    }
    if (!bounded || lo > hi) continue;
    const auto values = average[0].to(at::kDouble).contiguous();
    const double tol = 1e-4 * std::max({std::abs(lo), std::abs(hi), 1.0});
    for (std::int64_t i = 0; i < values.numel(); ++i) {
      const double v = values.data_ptr<double>()[i];
      HIVE_FUZZ_EXPECT(v >= lo - tol && v <= hi + tol, "chunk {} aggregated to {} outside [{}, {}]", r->chunk, v, lo, hi);
    }
  }
}

// ---- seeds ----------------------------------------------------------------------------------

std::vector<fuzz::Seed> seeds() {
  auto msgpack_seed = [](std::vector<std::uint8_t> prefix, const json& j) {
    auto body = json::to_msgpack(j);
    prefix.insert(prefix.end(), body.begin(), body.end());
    return prefix;
  };
  const json me = Member{"10.0.0.1:1000", false, false, 0, nullptr, {}};
  const json leader = Member{"10.0.0.9:1000", false, false, 2.5, {{"step", 3}}, {}};
  const json follower = Member{"", true, false, 0, nullptr, {}};
  std::vector<fuzz::Seed> out;
  out.push_back({"join-request", msgpack_seed({0}, {{"key", "run.0b01"}, {"schema", "abcd"}, {"compression", "none"},
                                                    {"address", "10.0.0.1:1000"}, {"client_mode", false},
                                                    {"gathered", {{"x", 1}}}, {"auxiliary", false}, {"bandwidth", 10.0},
                                                    {"followers", json::array({follower})}})});
  out.push_back({"join-reply-accepted", msgpack_seed(fuzz::join({std::vector<std::uint8_t>{1, 2}, fuzz::le(std::uint32_t{1000}),
                                                                  fuzz::le(std::uint16_t{63})}),
                                                     {{"accepted", true}, {"group_id", "abc"},
                                                      {"members", json::array({leader, me, follower})}, {"index", 1}})});
  out.push_back({"join-reply-refused", msgpack_seed({1, 0, 0, 0, 0, 0, 0, 0},
                                                    {{"accepted", false}, {"reason", "full"}, {"final", false}})});
  out.push_back({"announcement", msgpack_seed({2, 1, 13, '1', '0', '.', '0', '.', '0', '.', '2', ':', '1', '0', '0', '0'},
                                              {{"deadline", 1.7e9}, {"schema", "abcd"}})});
  out.push_back({"announcement-withdrawn", msgpack_seed({2, 1, 2, 'a', 'b'}, {{"looking", false}})});
  // Regressions: a leader's index that wrapped around the follower check (an out-of-bounds
  // read), and announcements that made step() throw or broke the candidates' ordering.
  out.push_back({"join-reply-index-overflow",
                 msgpack_seed(fuzz::join({std::vector<std::uint8_t>{1, 2}, fuzz::le(std::uint32_t{8}), fuzz::le(std::uint16_t{3})}),
                              {{"accepted", true}, {"group_id", "abc"}, {"members", json::array({leader, me})},
                               {"index", std::numeric_limits<std::uint64_t>::max()}})});
  out.push_back({"announcement-nan-deadline",
                 msgpack_seed({2, 1, 2, 'a', 'b'}, {{"deadline", std::numeric_limits<double>::quiet_NaN()}, {"schema", "abcd"}})});
  out.push_back({"announcement-bad-types", msgpack_seed({2, 1, 2, 'a', 'b'}, {{"deadline", 1.7e9}, {"schema", 5}, {"looking", "yes"}})});
  // avg.part: 3 members (flags of members 1 and 2), 12 elements (a part of 4 here), chunks of 2,
  // knobs, 4 messages: chunks 0 and 1 from each sender.
  auto part_seed = [](std::uint8_t knobs, float scale) {
    std::vector<std::uint8_t> s{3, 1, 0, 0, 12, 1, knobs, 4};
    for (std::size_t sender = 1; sender <= 2; ++sender)
      for (std::size_t chunk = 0; chunk < 2; ++chunk) {
        Message m;
        m.header = {{"group", "g"}, {"sender", sender}, {"chunk", chunk}, {"weight", 1.0 + sender}, {"compression", "none"}};
        add_tensors(m, {at::arange(2, at::kFloat).mul(scale * static_cast<float>(sender))}, Compression::none);
        const auto header = json::to_msgpack(m.header);
        s.push_back(static_cast<std::uint8_t>(sender));  // the caller: the sender itself
        auto len = fuzz::le(static_cast<std::uint16_t>(header.size()));
        s.insert(s.end(), len.begin(), len.end());
        s.insert(s.end(), header.begin(), header.end());
        s.push_back(1);
        auto bl = fuzz::le(static_cast<std::uint16_t>(m.blobs[0].size()));
        s.insert(s.end(), bl.begin(), bl.end());
        const auto* p = reinterpret_cast<const std::uint8_t*>(m.blobs[0].data());
        s.insert(s.end(), p, p + m.blobs[0].size());
      }
    return s;
  };
  out.push_back({"part-mean", part_seed(0, 1.f)});
  out.push_back({"part-centered-clip", part_seed(4, 3.f)});
  out.push_back({"part-trimmed-uniform8", part_seed(8 | 2, -2.f)});
  return out;
}

void one_input(hive::fuzz::Input& in) {
  switch (in.u8() % 4) {
    case 0: fuzz_join_request(in); break;
    case 1: fuzz_join_reply(in); break;
    case 2: fuzz_announcement(in); break;
    case 3: fuzz_part(in); break;
  }
}

}  // namespace

HIVE_FUZZ_TARGET(seeds, one_input)
