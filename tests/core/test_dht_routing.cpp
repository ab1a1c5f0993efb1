#include <hive/dht/blacklist.hpp>
#include <hive/dht/routing.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

using namespace hive;
using namespace hive::dht;
using namespace std::chrono_literals;

namespace {

/// An id whose leading bytes are `head` and the rest `fill`.
Id160 make_id(std::initializer_list<std::uint8_t> head, std::uint8_t fill = 0) {
  std::array<std::uint8_t, 20> b{};
  b.fill(fill);
  std::size_t i = 0;
  for (auto x : head) b[i++] = x;
  return Id160(b);
}

/// id + 1, wrapping; used to check that consecutive bucket ranges touch.
Id160 successor(const Id160& id) {
  auto b = id.bytes();
  for (int i = 19; i >= 0; --i)
    if (++b[i] != 0) break;
  return Id160(b);
}

std::string addr(const Id160& id) { return "10.0.0.1:" + id.hex().substr(0, 8); }

/// Every live node of the table, from its buckets.
std::vector<NodeInfo> all_nodes(const RoutingTable& t) {
  std::vector<NodeInfo> out;
  for (const auto& b : t.buckets())
    for (const auto& e : b.nodes()) out.push_back({e.id, e.address});
  return out;
}

/// Checks every structural invariant of the table.
void check_invariants(const RoutingTable& t, std::size_t max_replacements) {
  const auto& buckets = t.buckets();
  REQUIRE(!buckets.empty());
  CHECK(buckets.front().lower() == Id160{});
  CHECK(buckets.back().last() == make_id({}, 0xFF));
  std::size_t live = 0;
  std::set<Id160> seen;
  std::set<std::string> addresses;
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    const KBucket& b = buckets[i];
    CHECK(b.lower() <= b.last());
    if (i + 1 < buckets.size()) CHECK(successor(b.last()) == buckets[i + 1].lower());
    CHECK(b.nodes().size() <= t.bucket_size());
    CHECK(b.replacements().size() <= max_replacements);
    if (!b.replacements().empty()) CHECK(b.full());
    if (b.depth() > 0) {
      // A bucket at depth d exists only because its parent at depth d-1 was allowed to split.
      const int parent = b.depth() - 1;
      const bool parent_had_own = dht::detail::keep_prefix(t.own_id(), parent) == dht::detail::keep_prefix(b.lower(), parent);
      CHECK((parent_had_own || parent % t.depth_modulo() != 0));
    }
    for (const auto* list : {&b.nodes(), &b.replacements()}) {
      for (const auto& e : *list) {
        CHECK(b.contains(e.id));
        CHECK(t.bucket_index(e.id) == i);
        CHECK(e.id != t.own_id());
        CHECK(seen.insert(e.id).second);
        CHECK(addresses.insert(e.address).second);
      }
    }
    for (const auto& e : b.nodes()) {
      CHECK(t.find(e.id) == NodeInfo{e.id, e.address});
      CHECK(t.id_of(e.address) == e.id);
    }
    for (const auto& e : b.replacements()) {
      CHECK_FALSE(t.contains(e.id));
      CHECK_FALSE(t.id_of(e.address).has_value());
    }
    live += b.nodes().size();
  }
  CHECK(live == t.size());
  CHECK_FALSE(t.contains(t.own_id()));
}

std::vector<Id160> brute_nearest(const RoutingTable& t, const Id160& q, std::size_t count,
                                 std::optional<Id160> exclude) {
  std::vector<Id160> ids;
  for (const auto& n : all_nodes(t))
    if (!exclude || n.id != *exclude) ids.push_back(n.id);
  std::sort(ids.begin(), ids.end(), [&](const Id160& a, const Id160& b) { return (a ^ q) < (b ^ q); });
  if (ids.size() > count) ids.resize(count);
  return ids;
}

}  // namespace

TEST_CASE("dht routing: bucket ranges partition the space and invariants hold under churn") {
  std::mt19937_64 rng(42);
  for (auto [k, modulo] : {std::pair<std::size_t, int>{20, 5}, {4, 1}, {2, 3}, {8, 200}}) {
    CAPTURE(k);
    CAPTURE(modulo);
    RoutingTable t(Id160::random(rng), k, modulo);
    std::vector<Id160> inserted;
    for (int i = 0; i < 1500; ++i) {
      const Id160 id = Id160::random(rng);
      inserted.push_back(id);
      t.add_or_update(id, addr(id));
      if (i % 7 == 0) t.remove(inserted[rng() % inserted.size()]);
      if (i % 11 == 0) t.mark_stale(inserted[rng() % inserted.size()]);
      if (i % 13 == 0) t.add_or_update(inserted[rng() % inserted.size()], addr(id) + "x");  // moves
    }
    check_invariants(t, k);
    CHECK(t.size() > 0);
    for (const auto& b : t.buckets()) CHECK(b.contains(b.random_id(rng)));
  }
}

TEST_CASE("dht routing: nearest() equals brute force over the whole table") {
  std::mt19937_64 rng(7);
  // modulo 200 lets every bucket split, so the table keeps (almost) all 1500 nodes.
  for (auto [k, modulo] : {std::pair<std::size_t, int>{20, 5}, {20, 200}, {3, 1}}) {
    CAPTURE(modulo);
    RoutingTable t(Id160::random(rng), k, modulo);
    std::vector<Id160> ids;
    for (int i = 0; i < 1500; ++i) {
      ids.push_back(Id160::random(rng));
      t.add_or_update(ids.back(), addr(ids.back()));
    }
    if (modulo == 200) CHECK(t.size() > 1000);
    const auto nodes = all_nodes(t);
    for (int trial = 0; trial < 300; ++trial) {
      const Id160 q = trial % 3 == 0 ? nodes[rng() % nodes.size()].id : Id160::random(rng);
      const std::size_t count = std::vector<std::size_t>{1, 3, 20, 100, t.size() + 5}[trial % 5];
      std::optional<Id160> exclude;
      if (trial % 2) exclude = trial % 3 == 0 ? q : nodes[rng() % nodes.size()].id;
      const auto got = t.nearest(q, count, exclude);
      std::vector<Id160> got_ids;
      for (const auto& n : got) {
        got_ids.push_back(n.id);
        CHECK(t.find(n.id)->address == n.address);
      }
      REQUIRE(got_ids == brute_nearest(t, q, count, exclude));
    }
    CHECK(t.nearest(Id160::random(rng), 0).empty());
  }
}

TEST_CASE("dht routing: the own id is never stored") {
  const Id160 own = make_id({0x12, 0x34});
  RoutingTable t(own, 2);
  CHECK_FALSE(t.add_or_update(own, "1.2.3.4:5").has_value());
  CHECK(t.size() == 0);
  CHECK_FALSE(t.contains(own));
  CHECK_FALSE(t.id_of("1.2.3.4:5").has_value());
  CHECK(t.nearest(own, 10).empty());
  CHECK_THROWS_AS(t.add_or_update(make_id({1}), ""), InvalidArgument);
  CHECK_THROWS_AS(RoutingTable(own, 0), InvalidArgument);
  CHECK_THROWS_AS(RoutingTable(own, 2, 0), InvalidArgument);
}

TEST_CASE("dht routing: splits happen only when allowed") {
  const Id160 own = make_id({0x00});
  // Three ids sharing the 5-bit prefix 10000 but not a 6-bit one beyond it.
  const Id160 a = make_id({0x80, 0x01}), b = make_id({0x84, 0x02}), c = make_id({0x80, 0x03});

  SUBCASE("classic Kademlia (depth_modulo 1): only the bucket holding the own id splits") {
    RoutingTable t(own, 2, 1);
    t.add_or_update(a, "a:1");
    t.add_or_update(b, "b:1");
    CHECK(t.buckets().size() == 1);
    const auto ping = t.add_or_update(c, "c:1");
    REQUIRE(t.buckets().size() == 2);  // the root split once: [0...] and [1...]
    CHECK(t.buckets()[1].depth() == 1);
    CHECK(t.buckets()[1].nodes().size() == 2);
    CHECK(t.buckets()[1].replacements().size() == 1);
    REQUIRE(ping.has_value());
    CHECK(*ping == NodeInfo{a, "a:1"});
    check_invariants(t, 2);
  }
  SUBCASE("hivemind's relaxation (depth_modulo 5): foreign buckets split down to depth 5") {
    RoutingTable t(own, 2, 5);
    t.add_or_update(a, "a:1");
    t.add_or_update(b, "b:1");
    const auto ping = t.add_or_update(c, "c:1");
    // Root (holds own id) and depths 1..4 split; the depth-5 bucket 10000 is full and stops.
    CHECK(t.buckets().size() == 6);
    const KBucket& full = t.bucket_of(a);
    CHECK(full.depth() == 5);
    CHECK(full.nodes().size() == 2);
    CHECK(full.replacements().size() == 1);
    CHECK(*ping == NodeInfo{a, "a:1"});
    check_invariants(t, 2);
  }
  SUBCASE("a bucket with room never splits") {
    RoutingTable t(own, 3, 1);
    t.add_or_update(a, "a:1");
    t.add_or_update(b, "b:1");
    t.add_or_update(c, "c:1");
    CHECK(t.buckets().size() == 1);
    CHECK(t.size() == 3);
  }
}

TEST_CASE("dht routing: least-recently-seen ping-out, replacements and promotion") {
  const Id160 own = make_id({0x00});
  RoutingTable t(own, 3, 1);
  auto id = [](std::uint8_t n) { return make_id({0x80, n}); };
  auto name = [](std::uint8_t n) { return fmt::format("n{}:1", n); };
  for (std::uint8_t n = 1; n <= 3; ++n) CHECK_FALSE(t.add_or_update(id(n), name(n)).has_value());
  // Full bucket [1...] that may not split: newcomers wait and the oldest nodes get pinged.
  CHECK(t.add_or_update(id(4), name(4)) == NodeInfo{id(1), name(1)});
  CHECK(t.add_or_update(id(5), name(5)) == NodeInfo{id(2), name(2)});  // 1 is already out
  CHECK(t.mark_alive(id(1)));                                          // 1 answered: now newest
  CHECK(t.add_or_update(id(6), name(6)) == NodeInfo{id(3), name(3)});
  CHECK(t.add_or_update(id(7), name(7)) == NodeInfo{id(1), name(1)});  // its ping was answered
  CHECK_FALSE(t.add_or_update(id(8), name(8)).has_value());  // every node is out for a ping
  check_invariants(t, 3);
  const KBucket& b = t.bucket_of(id(1));
  // Replacements are bounded by k: 4 and 5 were the oldest and are gone, with their addresses.
  std::vector<Id160> repl;
  for (const auto& e : b.replacements()) repl.push_back(e.id);
  CHECK(repl == std::vector<Id160>{id(6), id(7), id(8)});
  CHECK_FALSE(t.id_of(name(4)).has_value());
  CHECK_FALSE(t.id_of(name(5)).has_value());

  // 2 failed its ping: the freshest replacement (8) takes its slot.
  CHECK(t.remove(id(2)));
  CHECK_FALSE(t.contains(id(2)));
  CHECK(t.contains(id(8)));
  CHECK(t.id_of(name(8)) == id(8));
  CHECK(t.bucket_of(id(1)).replacements().size() == 2);
  CHECK_FALSE(t.remove(id(2)));
  // Removing a replacement does not touch the live nodes.
  CHECK(t.remove(id(6)));
  CHECK(t.size() == 3);
  check_invariants(t, 3);
}

TEST_CASE("dht routing: a refreshed node moves to the most-recent end") {
  RoutingTable t(make_id({0x00}), 3, 1);
  auto id = [](std::uint8_t n) { return make_id({0x80, n}); };
  for (std::uint8_t n = 1; n <= 3; ++n) t.add_or_update(id(n), fmt::format("n{}:1", n));
  t.add_or_update(id(1), "n1:1");
  std::vector<Id160> order;
  for (const auto& e : t.bucket_of(id(1)).nodes()) order.push_back(e.id);
  CHECK(order == std::vector<Id160>{id(2), id(3), id(1)});
  CHECK(t.add_or_update(id(9), "n9:1") == NodeInfo{id(2), "n2:1"});
}

TEST_CASE("dht routing: a stale node stays until a replacement or newcomer takes its slot") {
  RoutingTable t(make_id({0x00}), 2, 1);
  auto id = [](std::uint8_t n) { return make_id({0x80, n}); };
  t.add_or_update(id(1), "n1:1");
  t.add_or_update(id(2), "n2:1");
  t.add_or_update(make_id({0x01}), "own-side:1");  // forces the root to split
  REQUIRE(t.bucket_of(id(1)).depth() == 1);
  CHECK_FALSE(t.mark_stale(id(1)));  // no replacement: kept, flagged
  CHECK(t.contains(id(1)));
  CHECK(t.bucket_of(id(1)).nodes().front().stale);
  // A newcomer takes the stale node's slot at once, no ping needed.
  CHECK_FALSE(t.add_or_update(id(3), "n3:1").has_value());
  CHECK_FALSE(t.contains(id(1)));
  CHECK(t.contains(id(3)));
  // With a replacement waiting, a failing node is replaced at once.
  CHECK(t.add_or_update(id(4), "n4:1") == NodeInfo{id(2), "n2:1"});
  CHECK(t.mark_stale(id(2)));
  CHECK_FALSE(t.contains(id(2)));
  CHECK(t.contains(id(4)));
  CHECK_FALSE(t.mark_stale(make_id({0x90})));  // unknown
  check_invariants(t, 2);
}

TEST_CASE("dht routing: address changes keep both maps consistent") {
  RoutingTable t(make_id({0x00}), 2, 1);
  const Id160 a = make_id({0x80, 1}), b = make_id({0x80, 2}), c = make_id({0x80, 3});
  t.add_or_update(a, "h:1");
  t.add_or_update(a, "h:2");  // a moved
  CHECK(t.find(a)->address == "h:2");
  CHECK_FALSE(t.id_of("h:1").has_value());
  CHECK(t.id_of("h:2") == a);
  t.add_or_update(b, "h:1");  // someone else now uses the old address
  CHECK(t.id_of("h:1") == b);
  CHECK(t.id_of("h:2") == a);
  // A new id at a's address: a restarted with a fresh id and disappears.
  t.add_or_update(c, "h:2");
  CHECK_FALSE(t.contains(a));
  CHECK(t.id_of("h:2") == c);
  CHECK(t.size() == 2);
  check_invariants(t, 2);
  // A replacement that changes address is re-indexed too.
  t.add_or_update(make_id({0x01}), "own-side:1");
  const Id160 d = make_id({0x80, 4});
  t.add_or_update(d, "h:4");
  REQUIRE(t.bucket_of(d).replacements().size() == 1);
  t.add_or_update(d, "h:5");
  CHECK(t.bucket_of(d).replacements().front().address == "h:5");
  check_invariants(t, 2);
  CHECK(t.remove(b));  // d is promoted with its new address
  CHECK(t.id_of("h:5") == d);
  CHECK_FALSE(t.id_of("h:4").has_value());
  check_invariants(t, 2);
}

TEST_CASE("dht routing: bucket refresh bookkeeping follows the caller's clock") {
  const auto t0 = Deadline{} + 100s;
  RoutingTable t(make_id({0x00}), 2, 1, std::nullopt, t0);
  CHECK(t.buckets()[0].last_updated() == t0);
  t.add_or_update(make_id({0x80}), "x:1", t0 + 5s);
  CHECK(t.buckets()[0].last_updated() == t0 + 5s);
}

TEST_CASE("dht blacklist: exponential back-off, expiry and success") {
  Blacklist bl;  // 5 s, x2
  const auto t0 = Deadline{} + 1000s;
  CHECK_FALSE(bl.is_banned("p:1", t0));
  CHECK(bl.register_failure("p:1", t0) == Seconds(5));
  CHECK(bl.is_banned("p:1", t0 + 4900ms));
  CHECK_FALSE(bl.is_banned("p:1", t0 + 5s));
  CHECK_FALSE(bl.is_banned("p:2", t0));
  // Failures while banned are the same outage, not new ones.
  CHECK(bl.register_failure("p:1", t0 + 1s) == Seconds(0));
  CHECK(bl.failures("p:1") == 1);
  CHECK(bl.register_failure("p:1", t0 + 5s) == Seconds(10));
  CHECK(bl.is_banned("p:1", t0 + 14s));
  CHECK_FALSE(bl.is_banned("p:1", t0 + 15s));
  CHECK(bl.register_failure("p:1", t0 + 15s) == Seconds(20));
  CHECK(bl.failures("p:1") == 3);
  CHECK(bl.banned_until("p:1") == t0 + 35s);
  bl.register_success("p:1");
  CHECK_FALSE(bl.is_banned("p:1", t0 + 16s));
  CHECK(bl.failures("p:1") == 0);
  CHECK(bl.register_failure("p:1", t0 + 16s) == Seconds(5));
}

TEST_CASE("dht blacklist: options, cap, disabled, bounded size") {
  const auto t0 = Deadline{} + 1000s;
  Blacklist capped(BlacklistOptions().base_time(Seconds(1)).backoff_rate(3.0).max_ban_time(Seconds(5)));
  CHECK(capped.register_failure("a:1", t0) == Seconds(1));
  CHECK(capped.register_failure("a:1", t0 + 1s) == Seconds(3));
  CHECK(capped.register_failure("a:1", t0 + 4s) == Seconds(5));  // 9 s capped
  for (int i = 0; i < 2000; ++i) capped.register_failure("a:1", t0 + 10s + std::chrono::seconds(6 * i));
  CHECK(capped.is_banned("a:1", t0 + 10s + std::chrono::seconds(6 * 1999) + 4s));  // no overflow at 3^2000

  Blacklist off(BlacklistOptions().base_time(Seconds(0)));
  off.register_failure("a:1", t0);
  CHECK_FALSE(off.is_banned("a:1", t0));

  Blacklist small(BlacklistOptions().max_size(3));
  for (const char* p : {"a:1", "b:1", "c:1", "d:1"}) small.register_failure(p, t0);
  CHECK(small.size() == 3);
  CHECK(small.failures("a:1") == 0);  // oldest forgotten
  small.register_failure("b:1", t0 + 6s);  // b is now the most recent failure
  small.register_failure("e:1", t0 + 7s);
  CHECK(small.failures("c:1") == 0);
  CHECK(small.failures("b:1") == 2);
  CHECK(small.is_banned("e:1", t0 + 7s));

  CHECK_THROWS_AS(Blacklist(BlacklistOptions().backoff_rate(0.5)), InvalidArgument);
  CHECK_THROWS_AS(Blacklist(BlacklistOptions().base_time(Seconds(-1))), InvalidArgument);
  auto opts = BlacklistOptions::from_json_text(R"({"base_time": 2.5, "backoff_rate": 1.5})");
  CHECK(opts.base_time() == Seconds(2.5));
  CHECK(opts.backoff_rate() == 1.5);
  CHECK_THROWS_AS(BlacklistOptions::from_json_text(R"({"base": 2})"), InvalidArgument);
}
