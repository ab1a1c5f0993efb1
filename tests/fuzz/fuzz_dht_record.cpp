// Fuzzes DHT records and dictionary values as the DHT decodes and keeps them
// (hive/dht/protocol.hpp, storage.hpp, and the dht.store / dht.find / dht.ping handlers of
// dht::Node).
//
// Input: one byte choosing the mode, then:
//   mode 0 (record):  MessagePack of a record as a dht.find reply carries it ({"v", "e"} or
//                     {"d": [[subkey, value, expiration]...]}), or an array of them. Decoded with
//                     record_from_json, then merged, fitted into a reply budget, re-encoded and
//                     decoded by BasicDHT::decode as a reader does.
//   mode 1 (storage): operations on a Storage with small bounds from the input: stores of
//                     values and subkeys from three sources under eight keys, reads, erases and
//                     the clock moving on; its accounting is checked after every operation.
//   mode 2 (node):    a MessagePack header sent as dht.store, dht.find or dht.ping (the next
//                     byte picks) to a real dht::Node over net::Simulated. Expirations of store
//                     items are taken relative to the node's clock, so seeds stay valid. The
//                     node must answer (a reply or an error, never silence) and keep serving.

#include "fuzz_common.hpp"

#include <hive/core/msgpack.hpp>
#include <hive/dht/dht.hpp>
#include <hive/dht/node.hpp>
#include <hive/dht/protocol.hpp>
#include <hive/dht/storage.hpp>
#include <hive/net/simulated.hpp>

#include <cmath>
#include <future>
#include <thread>

namespace {

using namespace hive;
using namespace hive::dht;
using nlohmann::json;

// ---- mode 0: records as a find reply carries them -------------------------------------------

void check_record(const Record& r) {
  if (!r.is_dictionary()) {
    HIVE_FUZZ_EXPECT(std::isfinite(r.expiration) && r.expiration == r.regular().expiration, "regular expiration");
    return;
  }
  double latest = -std::numeric_limits<double>::infinity();
  for (const auto& [subkey, v] : r.dictionary()) {
    HIVE_FUZZ_EXPECT(std::isfinite(v.expiration), "a subkey's expiration is not finite");
    latest = std::max(latest, v.expiration);
  }
  HIVE_FUZZ_EXPECT(r.expiration == latest, "a dictionary's expiration is not its latest subkey's");
}

void fuzz_records(std::span<const std::uint8_t> bytes, std::size_t budget_in, double now) {
  json j;
  try {
    j = parse_msgpack(bytes);
  } catch (const Error&) {
    return;
  }
  std::vector<json> wire = j.is_array() ? j.get<std::vector<json>>() : std::vector<json>{j};
  std::optional<Record> best;
  for (const auto& w : wire) {
    Record r;
    try {
      r = dht::detail::record_from_json(w);
    } catch (const Error& e) {
      HIVE_FUZZ_EXPECT(e.code() == errc::bad_header, "record_from_json failed with {}", e.what());
      continue;
    } catch (const json::out_of_range&) {
      continue;  // node.hpp's find-reply parser catches std::exception
    }
    check_record(r);
    const Record back = dht::detail::record_from_json(dht::detail::record_to_json(r));
    HIVE_FUZZ_EXPECT(back == r, "a record changed in a round trip");
    (void)BasicDHT<>::decode(r);
    dht::detail::merge_record(best, r, now);
    if (best) {
      HIVE_FUZZ_EXPECT(best->expiration > now, "merge kept an expired record");
      check_record(*best);
    }
  }
  if (!best) return;
  std::size_t budget = budget_in;
  bool truncated = false;
  auto fitted = dht::detail::fit_record(*best, budget, truncated);
  HIVE_FUZZ_EXPECT(budget <= budget_in, "fit_record grew the budget");
  if (!fitted) {
    HIVE_FUZZ_EXPECT(truncated, "nothing fitted but nothing was cut");
    return;
  }
  check_record(*fitted);
  HIVE_FUZZ_EXPECT(fitted->is_dictionary() == best->is_dictionary(), "fit_record changed the record's kind");
  if (fitted->is_dictionary()) {
    for (const auto& [subkey, v] : fitted->dictionary())
      HIVE_FUZZ_EXPECT(best->dictionary().at(subkey) == v, "fit_record changed a subkey");
    HIVE_FUZZ_EXPECT(truncated == (fitted->dictionary().size() < best->dictionary().size()), "truncated flag");
  } else {
    HIVE_FUZZ_EXPECT(*fitted == *best && !truncated, "a fitted regular value changed");
  }
  (void)BasicDHT<>::decode(*fitted);
}

// ---- mode 1: storage bookkeeping ------------------------------------------------------------

std::size_t subkey_size(const Subkey& s) {
  if (const auto* str = std::get_if<std::string>(&s)) return str->size();
  return sizeof(std::int64_t);
}

void check_storage(Storage& s, double now) {
  const auto& o = s.options();
  auto items = s.items(now);
  HIVE_FUZZ_EXPECT(items.size() == s.size(), "items() and size() disagree");
  HIVE_FUZZ_EXPECT(s.size() <= o.max_keys(), "{} keys over max_keys={}", s.size(), o.max_keys());
  HIVE_FUZZ_EXPECT(s.total_bytes() <= o.max_total_bytes(), "{} bytes over max_total_bytes={}", s.total_bytes(),
                   o.max_total_bytes());
  std::size_t bytes = 0;
  for (const auto& [key, r] : items) {
    HIVE_FUZZ_EXPECT(r.expiration > now, "an expired record is held");
    if (!r.is_dictionary()) {
      bytes += r.regular().value.size();
      continue;
    }
    HIVE_FUZZ_EXPECT(!r.dictionary().empty(), "an empty dictionary is held");
    HIVE_FUZZ_EXPECT(r.dictionary().size() <= o.max_subkeys(), "{} subkeys over max_subkeys={}", r.dictionary().size(),
                     o.max_subkeys());
    double latest = -std::numeric_limits<double>::infinity();
    for (const auto& [subkey, v] : r.dictionary()) {
      HIVE_FUZZ_EXPECT(v.expiration > now, "an expired subkey is held");
      bytes += v.value.size() + subkey_size(subkey);
      latest = std::max(latest, v.expiration);
    }
    HIVE_FUZZ_EXPECT(r.expiration == latest, "a dictionary's expiration is not its latest subkey's");
  }
  HIVE_FUZZ_EXPECT(bytes == s.total_bytes(), "total_bytes()={} but the records hold {}", s.total_bytes(), bytes);
  std::size_t charged = 0;
  for (const char* source : {"", "a", "b", "c"}) charged += s.keys_of(source);
  HIVE_FUZZ_EXPECT(charged == s.size(), "sources are charged {} keys, {} are held", charged, s.size());
  if (auto soonest = s.soonest(now)) HIVE_FUZZ_EXPECT(soonest->second > now, "soonest() is expired");
}

void fuzz_storage(fuzz::Input& in) {
  auto options = StorageOptions()
                     .max_keys(1 + in.below(8))
                     .max_subkeys(1 + in.below(8))
                     .max_value_bytes(in.below(64))
                     .max_total_bytes(in.below(512))
                     .max_expiration_ahead(Seconds(1 + in.below(100)));
  Storage s(options);
  double now = 1000;
  const char* sources[] = {"a", "b", "c", ""};
  for (int op = 0; op < 64 && !in.empty(); ++op) {
    const std::uint8_t code = in.u8();
    const Id160 key = Id160::of(std::string(1, static_cast<char>('0' + (code >> 3) % 8)));
    const char* source = sources[(code >> 6) % 4];
    auto expiration = [&] { return now + static_cast<double>(static_cast<std::int8_t>(in.u8())); };
    auto value = [&] {
      auto b = in.bytes(in.below(48));
      return Bytes(b.begin(), b.end());
    };
    switch (code % 8) {
      case 0: case 1: {
        const double e = expiration();
        Bytes v = value();
        const auto status = s.store(key, v, e, now, source);
        if (status == StoreStatus::stored) {
          auto got = s.get(key, now);
          HIVE_FUZZ_EXPECT(got && !got->is_dictionary() && got->regular().value == v && got->expiration == e,
                           "a stored value cannot be read back");
        }
        break;
      }
      case 2: case 3: {
        const std::uint8_t k = in.u8();
        Subkey subkey = k & 1 ? Subkey(std::string(k >> 5, 's')) : Subkey(static_cast<std::int64_t>(k >> 1) - 64);
        const double e = expiration();
        Bytes v = value();
        const auto status = s.store_subkey(key, subkey, v, e, now, source);
        if (status == StoreStatus::stored) {
          auto got = s.get(key, now);
          HIVE_FUZZ_EXPECT(got && got->is_dictionary(), "a stored subkey's dictionary is gone");
          auto it = got->dictionary().find(subkey);
          HIVE_FUZZ_EXPECT(it != got->dictionary().end() && it->second.value == v && it->second.expiration == e,
                           "a stored subkey cannot be read back");
        }
        break;
      }
      case 4: (void)s.get(key, now); break;
      case 5: s.erase(key); HIVE_FUZZ_EXPECT(!s.get(key, now), "an erased key is still held"); break;
      case 6: now += in.below(16); break;
      case 7: {
        // Expirations a hostile peer may send: NaN, infinities, extremes.
        const double odd[] = {std::nan(""), std::numeric_limits<double>::infinity(),
                              -std::numeric_limits<double>::infinity(), std::numeric_limits<double>::max(),
                              std::numeric_limits<double>::lowest(), now, std::nextafter(now, 1e300)};
        const double e = odd[in.below(std::size(odd))];
        const auto status = in.u8() & 1 ? s.store(key, value(), e, now, source)
                                        : s.store_subkey(key, Subkey(std::int64_t{1}), value(), e, now, source);
        if (!(e > now && e <= now + options.max_expiration_ahead().count()))
          HIVE_FUZZ_EXPECT(status == StoreStatus::expired || status == StoreStatus::too_far_ahead,
                           "an expiration of {} at {} was not refused", e, now);
        break;
      }
    }
    check_storage(s, now);
  }
}

// ---- mode 2: a real node's handlers ----------------------------------------------------------

// The peers live on an io_context that the fuzzer's thread runs (after set-up), so an input is
// replayed exactly: no other thread interleaves.
struct Swarm {
  asio::io_context context;
  std::shared_ptr<net::SimNetwork> network = net::SimNetwork::create(
      context.get_executor(), net::SimNetworkOptions().min_latency(Seconds(0)).max_latency(Seconds(0)).seed(1));
  using Node = dht::Node<net::Simulated>;
  std::shared_ptr<Node> target;
  std::vector<std::shared_ptr<Node>> others;
  std::shared_ptr<net::Rpc<net::Simulated>> client;
  std::uint64_t calls = 0;

  Swarm() {
    // Set-up uses the blocking calls, which need the context running elsewhere.
    auto work = asio::make_work_guard(context);
    std::thread thread([this] { context.run(); });
    // Small storage, so that hostile stores reach eviction; no background upkeep.
    auto options = NodeOptions()
                       .wait_timeout(Seconds(2))
                       .refresh_period(Seconds(0))
                       .storage(StorageOptions().max_keys(64).max_subkeys(16).max_total_bytes(64 << 10))
                       .cache(StorageOptions().max_keys(16).max_subkeys(8).max_total_bytes(16 << 10));
    target = Node::create(context.get_executor(), options, net::SimulatedOptions().network(network));
    target->listen("0.0.0.0:0");
    // A few peers in its routing table, so that find replies carry some.
    for (int i = 0; i < 3; ++i) {
      auto n = Node::create(context.get_executor(), options, net::SimulatedOptions().network(network));
      n->listen("0.0.0.0:0");
      asio::co_spawn(context, n->bootstrap({target->address()}), asio::use_future).get();
      others.push_back(n);
    }
    client = net::Rpc<net::Simulated>::create(context.get_executor(), net::SimulatedOptions().network(network));
    work.reset();
    context.stop();
    thread.join();
  }

  // Calls `method` on the target and runs the context until the answer (or the call's timeout),
  // then until nothing is ready; rethrows what the call threw.
  Message call(std::string_view method, json header) {
    bool done = false;
    std::exception_ptr error;
    Message reply;
    client->async_call(target->address(), std::string(method), Message{std::move(header), {}}, Seconds(30),
                       [&](std::exception_ptr e, Message m) {
                         done = true;
                         error = e;
                         reply = std::move(m);
                       });
    context.restart();
    while (!done) HIVE_FUZZ_EXPECT(context.run_one() > 0, "the swarm stopped before {} was answered", method);
    while (context.poll() > 0) {
    }
    if (error) std::rethrow_exception(error);
    return reply;
  }
};

Swarm& swarm() {
  static Swarm* s = new Swarm();  // never destroyed: static destruction order is not ours
  return *s;
}

void fuzz_node(fuzz::Input& in) {
  static constexpr std::string_view methods[] = {store_method, find_method, ping_method};
  const auto method = methods[in.below(std::size(methods))];
  json header;
  try {
    header = parse_msgpack(in.rest());
  } catch (const Error&) {
    return;
  }
  Swarm& s = swarm();
  if (method == store_method && header.is_object() && header.contains("items") && header["items"].is_array())
    for (auto& item : header["items"])
      if (item.is_array() && item.size() >= 4 && item[3].is_number())
        item[3] = s.target->now() + item[3].get<double>();
  const std::size_t items = header.is_object() && header.contains("items") && header["items"].is_array()
                                ? header["items"].size() : 0;
  try {
    Message reply = s.call(method, std::move(header));
    const auto& h = reply.header;
    HIVE_FUZZ_EXPECT(h.is_object() && h.contains(method == ping_method ? "id" : "from"), "a {} reply without its sender",
                     method);
    if (method == store_method)
      HIVE_FUZZ_EXPECT(h.contains("results") && h["results"].size() == items, "{} results for {} items",
                       h.value("results", json::array()).size(), items);
    if (method == find_method) HIVE_FUZZ_EXPECT(h.contains("results") && h["results"].is_array(), "find without results");
  } catch (const RemoteError&) {
    // Refused with an error reply: what a malformed request gets.
  } catch (const Error& e) {
    HIVE_FUZZ_EXPECT(false, "{} got no answer: {}", method, e.what());
  }
  // Still serving after whatever came in.
  if (++s.calls % 64 == 0) {
    auto pong = s.call(ping_method, json::object());
    HIVE_FUZZ_EXPECT(pong.header.is_object() && pong.header.contains("id"), "the node stopped answering pings");
  }
}

// ---- seeds ----------------------------------------------------------------------------------

std::vector<fuzz::Seed> seeds() {
  auto msgpack_seed = [](std::initializer_list<std::uint8_t> prefix, const json& j) {
    std::vector<std::uint8_t> out(prefix);
    auto body = json::to_msgpack(j);
    out.insert(out.end(), body.begin(), body.end());
    return out;
  };
  const auto value = json::binary(json::to_msgpack(json{{"deadline", 1e9}, {"schema", "abc"}}));
  const auto id = [](std::uint8_t b) { return json::binary(std::vector<std::uint8_t>(20, b)); };
  const json regular = {{"v", value}, {"e", 1e9 + 60}};
  const json dictionary = {{"d", json::array({json::array({"10.0.0.2:1000", value, 1e9 + 30}),
                                              json::array({7, json::binary({0xc0}), 1e9 + 40})})}};
  std::vector<fuzz::Seed> out;
  out.push_back({"record-regular", msgpack_seed({0, 0, 1}, regular)});
  out.push_back({"record-dictionary", msgpack_seed({0, 0, 1}, dictionary)});
  out.push_back({"records-merged", msgpack_seed({0, 64, 0}, json::array({regular, dictionary, dictionary}))});
  // Storage: bounds, then operations (see fuzz_storage).
  out.push_back({"storage-ops", {1, 3, 2, 40, 200, 50, 0x00, 20, 3, 'a', 'b', 'c', 0x4a, 30, 5, 9, 1, 2, 3, 4, 5, 0x02, 7,
                                 10, 2, 'x', 'y', 0x06, 12, 0x0c, 0x83, 50, 0, 0x07, 3, 1, 4, 'v', 'v', 'v', 'v'}});
  out.push_back({"storage-full", {1, 1, 1, 30, 60, 100, 0x00, 50, 20, 0x48, 60, 20, 0x90, 70, 20, 0xd8, 80, 20,
                                  0x02, 0x21, 90, 8, 0x42, 0x41, 95, 8, 0x06, 200}});
  const json from = {{"id", id(3)}, {"addr", "0.0.0.0:2000"}};
  out.push_back({"node-store", msgpack_seed({2, 0}, {{"from", from},
                                                     {"items", json::array({json::array({id(1), nullptr, value, 60, false}),
                                                                            json::array({id(2), "sub", value, 30, true}),
                                                                            json::array({id(2), -5, value, 30, false})})}})});
  out.push_back({"node-find", msgpack_seed({2, 1}, {{"from", from}, {"keys", json::array({id(1), id(2), id(9)})}})});
  out.push_back({"node-ping", msgpack_seed({2, 2}, {{"from", from}})});
  return out;
}

void one_input(hive::fuzz::Input& in) {
  switch (in.u8() % 3) {
    case 0: {
      const std::size_t budget = std::size_t{in.u8()} << in.below(16);
      const double now = 1e9 + in.u8();
      fuzz_records(in.rest(), budget, now);
      break;
    }
    case 1: fuzz_storage(in); break;
    case 2: fuzz_node(in); break;
  }
}

}  // namespace

HIVE_FUZZ_TARGET(seeds, one_input)
