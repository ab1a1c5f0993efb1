#include <hive/dht/storage.hpp>

#include <doctest/doctest.h>

#include <limits>
#include <map>
#include <random>

using namespace hive;
using namespace hive::dht;

namespace {

Bytes bytes(std::string_view s) { return Bytes(s.begin(), s.end()); }
Bytes bytes_of_size(std::size_t n) { return Bytes(n, 0xAB); }
const Id160 k1 = Id160::of("k1"), k2 = Id160::of("k2"), k3 = Id160::of("k3"), k4 = Id160::of("k4"),
            k5 = Id160::of("k5");

}  // namespace

TEST_CASE("dht storage: a record is replaced only by a strictly later expiration") {
  Storage s;
  CHECK(s.store(k1, bytes("v1"), 100, 0) == StoreStatus::stored);
  CHECK(s.store(k1, bytes("v2"), 100, 0) == StoreStatus::not_newer);  // equal loses
  CHECK(s.store(k1, bytes("v2"), 99, 0) == StoreStatus::not_newer);
  CHECK(s.get(k1, 0)->regular() == ValueWithExpiration{bytes("v1"), 100});
  CHECK(s.store(k1, bytes("v3"), 100.5, 0) == StoreStatus::stored);
  const auto r = s.get(k1, 50);
  REQUIRE(r.has_value());
  CHECK_FALSE(r->is_dictionary());
  CHECK(r->regular().value == bytes("v3"));
  CHECK(r->expiration == 100.5);
  CHECK_THROWS_AS((void)r->dictionary(), InvalidArgument);
  CHECK(s.size() == 1);
  CHECK(s.total_bytes() == 2);
  CHECK_FALSE(s.get(k2, 0).has_value());
}

TEST_CASE("dht storage: expired, absurd and oversized stores are refused") {
  Storage s(StorageOptions().max_value_bytes(10).max_expiration_ahead(Seconds(1000)));
  CHECK(s.store(k1, bytes("v"), 10, 10) == StoreStatus::expired);
  CHECK(s.store(k1, bytes("v"), 9, 10) == StoreStatus::expired);
  CHECK(s.store(k1, bytes("v"), std::numeric_limits<double>::quiet_NaN(), 10) == StoreStatus::expired);
  CHECK(s.store(k1, bytes("v"), 1010.5, 10) == StoreStatus::too_far_ahead);
  CHECK(s.store(k1, bytes("v"), std::numeric_limits<double>::infinity(), 10) == StoreStatus::too_far_ahead);
  CHECK(s.store(k1, bytes_of_size(11), 20, 10) == StoreStatus::value_too_large);
  CHECK(s.store_subkey(k1, "abc", bytes_of_size(8), 20, 10) == StoreStatus::value_too_large);
  CHECK(s.store_subkey(k1, "a", std::vector<std::uint8_t>(8), 20, 10) == StoreStatus::stored);  // 8 + 1
  CHECK(s.store_subkey(k1, "b", bytes("v"), 9, 10) == StoreStatus::expired);
  CHECK(s.store(k2, bytes_of_size(10), 1010, 10) == StoreStatus::stored);  // both limits inclusive
  CHECK(s.size() == 2);
  CHECK_THROWS_AS((void)s.get(k1, std::numeric_limits<double>::quiet_NaN()), InvalidArgument);
  CHECK(to_string(StoreStatus::too_far_ahead) == "too_far_ahead");
}

TEST_CASE("dht storage: subkeys expire independently") {
  Storage s;
  CHECK(s.store_subkey(k1, "a", bytes("va"), 10, 0) == StoreStatus::stored);
  CHECK(s.store_subkey(k1, std::int64_t{7}, bytes("vb"), 20, 0) == StoreStatus::stored);
  auto r = s.get(k1, 5);
  REQUIRE(r.has_value());
  REQUIRE(r->is_dictionary());
  CHECK(r->expiration == 20);
  CHECK(r->dictionary().size() == 2);
  CHECK(r->dictionary().at(Subkey("a")) == ValueWithExpiration{bytes("va"), 10});
  CHECK(r->dictionary().at(Subkey(std::int64_t{7})) == ValueWithExpiration{bytes("vb"), 20});
  CHECK(s.total_bytes() == 2 + 1 + 2 + 8);

  r = s.get(k1, 10);  // "a" expires exactly now
  REQUIRE(r.has_value());
  CHECK(r->dictionary().size() == 1);
  CHECK(r->dictionary().contains(Subkey(std::int64_t{7})));
  CHECK(s.total_bytes() == 2 + 8);
  CHECK_FALSE(s.get(k1, 20).has_value());
  CHECK(s.size() == 0);
  CHECK(s.total_bytes() == 0);
}

TEST_CASE("dht storage: a subkey is replaced only by a later entry for the same subkey") {
  Storage s;
  CHECK(s.store_subkey(k1, "a", bytes("1"), 10, 0) == StoreStatus::stored);
  CHECK(s.store_subkey(k1, "a", bytes("2"), 10, 0) == StoreStatus::not_newer);
  CHECK(s.store_subkey(k1, "a", bytes("2"), 9, 0) == StoreStatus::not_newer);
  // Older than the dictionary's latest, but a different subkey: accepted.
  CHECK(s.store_subkey(k1, "b", bytes("3"), 5, 0) == StoreStatus::stored);
  CHECK(s.get(k1, 0)->expiration == 10);
  CHECK(s.store_subkey(k1, "a", bytes("4"), 30, 0) == StoreStatus::stored);
  const auto r = s.get(k1, 0);
  CHECK(r->expiration == 30);
  CHECK(r->dictionary().at(Subkey("a")).value == bytes("4"));
  CHECK(r->dictionary().at(Subkey("b")).value == bytes("3"));
  CHECK(s.total_bytes() == 4);
}

TEST_CASE("dht storage: dictionaries and regular values replace each other only when newer") {
  Storage s;
  SUBCASE("a dictionary replaces an older regular value, not a newer one") {
    CHECK(s.store(k1, bytes("reg"), 10, 0) == StoreStatus::stored);
    CHECK(s.store_subkey(k1, "a", bytes("x"), 10, 0) == StoreStatus::not_newer);
    CHECK(s.store_subkey(k1, "a", bytes("x"), 11, 0) == StoreStatus::stored);
    auto r = s.get(k1, 0);
    REQUIRE(r->is_dictionary());
    CHECK(r->dictionary().size() == 1);
    CHECK(s.total_bytes() == 2);

    CHECK(s.store(k2, bytes("reg"), 20, 0) == StoreStatus::stored);
    CHECK(s.store_subkey(k2, std::int64_t{1}, bytes("x"), 15, 0) == StoreStatus::not_newer);
    CHECK_FALSE(s.get(k2, 0)->is_dictionary());
  }
  SUBCASE("a regular value replaces a dictionary whose latest subkey is older") {
    CHECK(s.store_subkey(k1, "a", bytes("x"), 10, 0) == StoreStatus::stored);
    CHECK(s.store_subkey(k1, "b", bytes("y"), 20, 0) == StoreStatus::stored);
    CHECK(s.store(k1, bytes("reg"), 15, 0) == StoreStatus::not_newer);  // compared with the latest
    CHECK(s.store(k1, bytes("reg"), 20, 0) == StoreStatus::not_newer);
    CHECK(s.store(k1, bytes("reg"), 21, 0) == StoreStatus::stored);
    auto r = s.get(k1, 0);
    REQUIRE_FALSE(r->is_dictionary());
    CHECK(r->regular() == ValueWithExpiration{bytes("reg"), 21});
    CHECK_THROWS_AS((void)r->dictionary(), InvalidArgument);
    CHECK(s.total_bytes() == 3);
    // Nothing of the old dictionary survives to be pruned later.
    CHECK(s.get(k1, 15)->regular().value == bytes("reg"));
  }
}

TEST_CASE("dht storage: subkeys are integers or strings only") {
  CHECK(subkey_from_json("name") == Subkey("name"));
  CHECK(subkey_from_json(5) == Subkey(std::int64_t{5}));
  CHECK(subkey_from_json(-5) == Subkey(std::int64_t{-5}));
  CHECK(subkey_from_json(std::numeric_limits<std::int64_t>::max()) ==
        Subkey(std::numeric_limits<std::int64_t>::max()));
  CHECK_FALSE(subkey_from_json(std::numeric_limits<std::uint64_t>::max()).has_value());
  CHECK_FALSE(subkey_from_json(1.5).has_value());
  CHECK_FALSE(subkey_from_json(true).has_value());
  CHECK_FALSE(subkey_from_json(nullptr).has_value());
  CHECK_FALSE(subkey_from_json(nlohmann::json::array({1})).has_value());
  CHECK_FALSE(subkey_from_json(nlohmann::json::object()).has_value());
  CHECK_FALSE(subkey_from_json(nlohmann::json::binary({1, 2})).has_value());
  // The wire form round-trips through MessagePack.
  for (const Subkey& k : {Subkey("x"), Subkey(std::int64_t{-3}), Subkey(std::int64_t{1} << 40)}) {
    const auto packed = nlohmann::json::to_msgpack(subkey_to_json(k));
    CHECK(subkey_from_json(nlohmann::json::from_msgpack(packed)) == k);
  }
}

TEST_CASE("dht storage: when full, the record expiring soonest gives way") {
  Storage s(StorageOptions().max_keys(3));
  CHECK(s.store(k1, bytes("1"), 30, 0) == StoreStatus::stored);
  CHECK(s.store(k2, bytes("2"), 10, 0) == StoreStatus::stored);
  CHECK(s.store_subkey(k3, "s", bytes("3"), 20, 0) == StoreStatus::stored);
  CHECK(s.store(k4, bytes("4"), 25, 0) == StoreStatus::stored);
  CHECK_FALSE(s.get(k2, 0).has_value());  // expired soonest
  CHECK(s.size() == 3);
  // The newcomer would itself expire first: refused, nothing evicted.
  CHECK(s.store(k5, bytes("5"), 15, 0) == StoreStatus::storage_full);
  CHECK(s.store(k5, bytes("5"), 20, 0) == StoreStatus::storage_full);  // ties are not later
  CHECK(s.size() == 3);
  CHECK(s.get(k3, 0).has_value());
  // Updating a held key needs no room.
  CHECK(s.store(k3, bytes("3b"), 21, 0) == StoreStatus::stored);
  // Expired records make room before anything alive is evicted.
  CHECK(s.store(k5, bytes("5"), 22, 21) == StoreStatus::stored);
  CHECK(s.get(k1, 21).has_value());
  CHECK(s.get(k4, 21).has_value());
  CHECK(s.get(k5, 21).has_value());
  CHECK_FALSE(s.get(k3, 21).has_value());
}

TEST_CASE("dht storage: subkey and byte budgets") {
  SUBCASE("a full dictionary drops its soonest-expiring subkey for a later one") {
    Storage s(StorageOptions().max_subkeys(2));
    CHECK(s.store_subkey(k1, "a", bytes("a"), 10, 0) == StoreStatus::stored);
    CHECK(s.store_subkey(k1, "b", bytes("b"), 20, 0) == StoreStatus::stored);
    CHECK(s.store_subkey(k1, "c", bytes("c"), 15, 0) == StoreStatus::stored);
    auto d = s.get(k1, 0)->dictionary();
    CHECK(d.size() == 2);
    CHECK_FALSE(d.contains(Subkey("a")));
    CHECK(s.store_subkey(k1, "d", bytes("d"), 12, 0) == StoreStatus::too_many_subkeys);
    CHECK(s.store_subkey(k1, "b", bytes("B"), 25, 0) == StoreStatus::stored);  // update, no room needed
    CHECK(s.get(k1, 0)->dictionary().size() == 2);
    CHECK(s.total_bytes() == 4);
  }
  SUBCASE("total bytes evict soonest-expiring records, or refuse without evicting") {
    Storage s(StorageOptions().max_total_bytes(100));
    CHECK(s.store(k1, bytes_of_size(60), 10, 0) == StoreStatus::stored);
    CHECK(s.store(k2, bytes_of_size(30), 20, 0) == StoreStatus::stored);
    CHECK(s.store(k3, bytes_of_size(50), 30, 0) == StoreStatus::stored);
    CHECK_FALSE(s.get(k1, 0).has_value());
    CHECK(s.total_bytes() == 80);
    CHECK(s.store(k4, bytes_of_size(90), 25, 0) == StoreStatus::storage_full);  // k3 outlives it
    CHECK(s.get(k2, 0).has_value());
    CHECK(s.total_bytes() == 80);
    CHECK(s.store(k4, bytes_of_size(101), 40, 0) == StoreStatus::storage_full);  // can never fit
    CHECK(s.size() == 2);
    // Growing a held record counts only the growth, and never evicts the record itself.
    CHECK(s.store(k3, bytes_of_size(70), 31, 0) == StoreStatus::stored);
    CHECK(s.total_bytes() == 100);
    CHECK(s.store(k3, bytes_of_size(75), 32, 0) == StoreStatus::stored);  // 5 more bytes: k2 goes
    CHECK_FALSE(s.get(k2, 0).has_value());
    CHECK(s.total_bytes() == 75);
    CHECK(s.store(k3, bytes_of_size(101), 33, 0) == StoreStatus::storage_full);  // only k3 could go
    CHECK(s.get(k3, 0)->regular().value.size() == 75);
    CHECK(s.store_subkey(k3, "x", bytes_of_size(10), 34, 0) == StoreStatus::stored);  // 75 -> 11 bytes
    CHECK(s.total_bytes() == 11);
  }
}

TEST_CASE("dht storage: items, soonest, expiring_before, erase") {
  Storage s;
  s.store(k1, bytes("1"), 30, 0);
  s.store(k2, bytes("2"), 10, 0);
  s.store_subkey(k3, "a", bytes("3"), 5, 0);
  s.store_subkey(k3, "b", bytes("3"), 20, 0);
  CHECK(s.soonest(0) == std::pair{k2, 10.0});
  CHECK(s.expiring_before(25, 0) == std::vector<std::pair<Id160, double>>{{k2, 10.0}, {k3, 20.0}});
  auto items = s.items(6);
  CHECK(items.size() == 3);
  for (const auto& [key, record] : items)
    if (key == k3) CHECK(record.dictionary().size() == 1);
  CHECK(s.soonest(10) == std::pair{k3, 20.0});
  CHECK(s.erase(k3));
  CHECK_FALSE(s.erase(k3));
  CHECK(s.items(11).size() == 1);
  CHECK_FALSE(s.soonest(30).has_value());
  CHECK(s.empty());
}

TEST_CASE("dht storage: purge agrees with a brute-force model over many records") {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> when(1, 1000);
  Storage s;
  // The model: key -> (subkey or none) -> entry.
  std::map<Id160, std::map<std::optional<Subkey>, ValueWithExpiration>> model;
  std::vector<Id160> keys;
  for (int i = 0; i < 400; ++i) keys.push_back(Id160::of(fmt::format("key{}", i)));
  for (int i = 0; i < 6000; ++i) {
    const Id160& key = keys[rng() % keys.size()];
    const double exp = when(rng);
    Bytes value = bytes_of_size(rng() % 16);
    auto& m = model[key];
    const bool is_dict = !m.empty() && m.begin()->first.has_value();
    double latest = -1;
    for (const auto& [_, e] : m) latest = std::max(latest, e.expiration);
    if (rng() % 3 == 0) {
      const bool stored = s.store(key, value, exp, 0) == StoreStatus::stored;
      CHECK(stored == (exp > latest));
      if (stored) m = {{std::nullopt, {value, exp}}};
    } else {
      Subkey sub = rng() % 2 ? Subkey(std::int64_t(rng() % 20)) : Subkey(fmt::format("s{}", rng() % 20));
      const bool stored = s.store_subkey(key, sub, value, exp, 0) == StoreStatus::stored;
      bool expect;
      if (!is_dict) {
        expect = exp > latest;
        if (expect) m = {{sub, {value, exp}}};
      } else {
        auto it = m.find(sub);
        expect = it == m.end() || exp > it->second.expiration;
        if (expect) m[sub] = {value, exp};
      }
      CHECK(stored == expect);
    }
    if (m.empty()) model.erase(key);
  }
  // The last step, 1012.5, is past every expiration.
  for (double now = 0; now <= 1050; now += 37.5) {
    CAPTURE(now);
    s.purge(now);
    std::size_t expect_keys = 0, expect_bytes = 0;
    for (const auto& [key, m] : model) {
      std::size_t alive = 0;
      for (const auto& [sub, e] : m) {
        if (e.expiration <= now) continue;
        ++alive;
        expect_bytes += e.value.size() + (sub ? dht::detail::subkey_bytes(*sub) : 0);
      }
      expect_keys += alive > 0;
      const auto r = s.get(key, now);
      REQUIRE(r.has_value() == (alive > 0));
      if (!r) continue;
      if (r->is_dictionary()) {
        CHECK(r->dictionary().size() == alive);
        for (const auto& [sub, e] : r->dictionary()) CHECK(m.at(sub) == e);
      } else {
        CHECK(m.at(std::nullopt) == r->regular());
      }
    }
    CHECK(s.size() == expect_keys);
    CHECK(s.total_bytes() == expect_bytes);
    CHECK(s.items(now).size() == expect_keys);
  }
  CHECK(s.empty());
}

TEST_CASE("dht storage: a source at max_keys_per_source pays with its own records") {
  Storage s(StorageOptions().max_keys(100).max_keys_per_source(3));
  const double now = 1000;
  for (int i = 0; i < 3; ++i) CHECK(s.store(Id160::of(fmt::format("a{}", i)), bytes("v"), now + 10 + i, now, "a") == StoreStatus::stored);
  CHECK(s.keys_of("a") == 3);
  // A fourth key from "a": its own soonest record (a0) gives way to a later-expiring one...
  CHECK(s.store(Id160::of("a3"), bytes("v"), now + 20, now, "a") == StoreStatus::stored);
  CHECK_FALSE(s.get(Id160::of("a0"), now));
  CHECK(s.keys_of("a") == 3);
  // ...but not to one expiring sooner than all it holds.
  CHECK(s.store(Id160::of("a4"), bytes("v"), now + 5, now, "a") == StoreStatus::storage_full);
  // Replacing a key it holds, and dictionary entries under its keys, need no new key.
  CHECK(s.store(Id160::of("a3"), bytes("w"), now + 30, now, "a") == StoreStatus::stored);
  // Another source, and this peer itself, are not affected.
  for (int i = 0; i < 5; ++i)
    CHECK(s.store(Id160::of(fmt::format("b{}", i)), bytes("v"), now + 5 + i, now, "b") == StoreStatus::stored);
  CHECK(s.keys_of("b") == 3);
  for (int i = 0; i < 5; ++i) CHECK(s.store(Id160::of(fmt::format("own{}", i)), bytes("v"), now + 5, now) == StoreStatus::stored);
  CHECK(s.keys_of("") == 5);
  CHECK(s.keys_of("a") == 3);
  // 0 lifts the cap.
  Storage open(StorageOptions().max_keys(100).max_keys_per_source(0));
  for (int i = 0; i < 10; ++i) CHECK(open.store(Id160::of(fmt::format("a{}", i)), bytes("v"), now + 10, now, "a") == StoreStatus::stored);
}

TEST_CASE("dht storage: options read from JSON and are validated") {
  auto o = StorageOptions::from_json_text(R"({"max_keys": 5, "max_expiration_ahead": 60})");
  CHECK(o.max_keys() == 5);
  CHECK(o.max_expiration_ahead() == Seconds(60));
  CHECK(o.max_subkeys() == StorageOptions().max_subkeys());
  CHECK_THROWS_AS(StorageOptions::from_json_text(R"({"max_key": 5})"), InvalidArgument);
  CHECK_THROWS_AS(Storage(StorageOptions().max_keys(0)), InvalidArgument);
  CHECK_THROWS_AS(Storage(StorageOptions().max_expiration_ahead(Seconds(0))), InvalidArgument);
}
