// Peer identities and the connection handshake (docs/security.md): keys, key files, proofs,
// and what a connection that skips or fakes its proof gets.
#include "../common/error_of.hpp"
#include "../common/raw_client.hpp"
#include "../common/wait.hpp"
#include "net_fixtures.hpp"

#include <hive/core/identity.hpp>
#include <hive/dht/dht.hpp>

#include <doctest/doctest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <random>

using namespace hive;
using namespace std::chrono_literals;

namespace {

/// A directory of its own under the system's temporary directory, removed afterwards.
struct TempDir {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               fmt::format("hive-trust-{}-{}", ::getpid(), std::random_device{}());
  TempDir() { std::filesystem::create_directories(path); }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

std::vector<std::uint8_t> bytes_of(std::string_view s) { return {s.begin(), s.end()}; }

}  // namespace

TEST_CASE("identity: the peer id names the public key, and a signature verifies only for its message and key") {
  const auto alice = Identity::generate();
  const auto bob = Identity::generate();
  CHECK(alice.peer_id() != bob.peer_id());
  CHECK(alice.peer_id().size() == 43);
  CHECK(net::RelayedAddress::valid_peer_id(alice.peer_id()));
  REQUIRE(public_key_of(alice.peer_id()));
  CHECK(*public_key_of(alice.peer_id()) == alice.public_key());
  CHECK_FALSE(public_key_of("not a peer id"));
  CHECK_FALSE(public_key_of(alice.peer_id().substr(1)));
  CHECK_FALSE(public_key_of(alice.peer_id() + "A"));

  const auto message = bytes_of("store k=v until 17");
  const auto signature = alice.sign(message);
  CHECK(verify_signature(alice.public_key(), message, signature));
  CHECK_FALSE(verify_signature(bob.public_key(), message, signature));
  CHECK_FALSE(verify_signature(alice.public_key(), bytes_of("store k=w until 17"), signature));
  auto flipped = signature;
  flipped[5] ^= 1;
  CHECK_FALSE(verify_signature(alice.public_key(), message, flipped));
  CHECK(alice.owner_marker() == "[owner:" + alice.peer_id() + "]");
}

TEST_CASE("identity: a key file is created with mode 0600 and gives the same id again, and a bad one is refused clearly") {
  TempDir dir;
  const auto path = dir.path / "keys" / "peer.key";
  const auto first = Identity::load_or_create(path);
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(Identity::load_or_create(path).peer_id() == first.peer_id());
  CHECK(Identity::load(path).peer_id() == first.peer_id());

  ::chmod(path.c_str(), 0644);
  CHECK(test::error_of([&] { Identity::load(path); }).find("chmod 600") != std::string::npos);
  ::chmod(path.c_str(), 0600);

  const auto garbage = dir.path / "garbage.key";
  {
    std::ofstream(garbage) << "this is not a key\n";
  }
  ::chmod(garbage.c_str(), 0600);
  CHECK(test::error_of([&] { Identity::load(garbage); }).find("does not hold a key") != std::string::npos);
  CHECK_THROWS_AS(Identity::load(dir.path / "missing.key"), InvalidArgument);

  // An Rpc peer with the file keeps its id across restarts.
  net::Runtime runtime(1);
  auto a = net::Rpc<net::Tcp>::create(runtime.executor(), {}, net::RpcOptions().identity_path(path.string()));
  auto b = net::Rpc<net::Tcp>::create(runtime.executor(), {}, net::RpcOptions().identity_path(path.string()));
  CHECK(a->peer_id() == first.peer_id());
  CHECK(b->peer_id() == first.peer_id());
  a->close();
  b->close();
}

TEST_CASE_TEMPLATE("handshake: a handler sees the caller's proven id and the caller learns who answers", T, net::Tcp,
                   net::Simulated) {
  test::Swarm<T> swarm;
  auto server = swarm.make();
  auto client = swarm.make();
  server->add_handler("who", [](net::CallContext ctx, Message) -> asio::awaitable<Message> {
    co_return Message{nlohmann::json{{"peer", ctx.peer}}, {}};
  });
  const auto address = server->listen(swarm.any_address);
  CHECK(client->call(address, "who", Message{}, Seconds(10)).header["peer"] == client->peer_id());
  const auto answered =
      asio::co_spawn(swarm.runtime.executor(), client->co_peer_at(address), asio::use_future).get();
  CHECK(answered == server->peer_id());
  server->close();
  client->close();
}

TEST_CASE("handshake: a connection that skips it, or proves a key it does not hold, is refused, and others are served") {
  net::Runtime runtime(1);
  auto server = net::Rpc<net::Tcp>::create(runtime.executor());
  server->add_handler("echo", test::echo);
  const auto address = server->listen("127.0.0.1:0");

  // A request before any handshake: an error frame that says why, then the connection closes.
  {
    test::RawClient rude(address, "", 0, false);
    rude.send(test::request_bytes(1, "echo", nlohmann::json::object()));
    auto answer = rude.read_frame(10s);
    REQUIRE(answer);
    CHECK(answer->kind == net::FrameKind::error);
    CHECK(answer->message.header["message"].get<std::string>().find("handshake") != std::string::npos);
    CHECK(rude.wait_closed(10s));
  }
  // A hello with Alice's key, then a proof signed by Mallory: refused.
  {
    const auto alice = Identity::generate();
    const auto mallory = Identity::generate();
    test::RawClient forger(address, "", 0, false);
    const net::Hello hello{alice.public_key(), net::random_nonce(), {}};
    forger.send(net::encode_frame(net::hello_frame(hello, true)).flatten());
    auto answer = forger.read_frame(10s);
    REQUIRE(answer);
    const auto theirs = net::parse_hello(*answer, false);
    CHECK(peer_id_of(theirs.key) == server->peer_id());
    forger.send(net::encode_frame(net::auth_frame(mallory.sign(
                                      net::handshake_transcript('C', hello.key, hello.nonce, theirs.key, theirs.nonce))))
                    .flatten());
    forger.send(test::request_bytes(1, "echo", nlohmann::json::object()));
    auto refusal = forger.read_frame(10s);
    REQUIRE(refusal);
    CHECK(refusal->kind == net::FrameKind::error);
    CHECK(forger.wait_closed(10s));
  }
  // A replayed proof from another connection does not fit this one's nonces.
  {
    const auto alice = Identity::generate();
    test::RawClient first(address, "", 0, false);
    const net::Hello hello{alice.public_key(), net::random_nonce(), {}};
    first.send(net::encode_frame(net::hello_frame(hello, true)).flatten());
    auto answer = first.read_frame(10s);
    REQUIRE(answer);
    const auto theirs = net::parse_hello(*answer, false);
    const auto proof = alice.sign(net::handshake_transcript('C', hello.key, hello.nonce, theirs.key, theirs.nonce));
    test::RawClient replay(address, "", 0, false);
    replay.send(net::encode_frame(net::hello_frame(hello, true)).flatten());
    REQUIRE(replay.read_frame(10s));
    replay.send(net::encode_frame(net::auth_frame(proof)).flatten());
    auto refusal = replay.read_frame(10s);
    REQUIRE(refusal);
    CHECK(refusal->kind == net::FrameKind::error);
    CHECK(replay.wait_closed(10s));
  }
  // An honest raw client is served.
  test::RawClient honest(address);
  CHECK(honest.peer() == server->peer_id());
  honest.send(test::request_bytes(1, "echo", {{"x", 1}}));
  auto reply = honest.read_frame(10s);
  REQUIRE(reply);
  CHECK(reply->kind == net::FrameKind::response);
  server->close();
}

// ---- signed records and validators ---------------------------------------------------------

namespace {

DHTOptions peer_options() { return DHTOptions().listen_on("127.0.0.1:0").require_bootstrap(false); }

/// Stores `items` through `dht`'s protocol peer as given (no signing): what a hostile peer
/// running its own code sends.
std::vector<bool> store_raw(DHT& dht, std::vector<dht::StoreItem> items) {
  return asio::co_spawn(dht.executor(), dht.node()->store_many(std::move(items)), asio::use_future).get();
}

dht::Bytes msgpack_of(const nlohmann::json& j) { return nlohmann::json::to_msgpack(j); }

}  // namespace

TEST_CASE("signed records: a subkey naming an owner takes only the owner's signed values, refused at store, ignored at read") {
  DHT alice(peer_options());
  DHT mallory(peer_options().initial_peers({alice.node()->address()}));
  DHT reader(peer_options().initial_peers({alice.node()->address()}));
  const double expiration = wall_time() + 60;
  const dht::Subkey mine = alice.owner_marker();

  REQUIRE(alice.store("progress", {{"step", 10}}, expiration, mine));
  // Through the API, a peer cannot even try to write under another's marker.
  CHECK(test::error_of([&] { mallory.store("progress", {{"step", 99}}, expiration + 1, mine); }).find("owned by") !=
        std::string::npos);
  // Running its own code, it gets every store refused: unsigned, signed by itself, or alice's
  // signature moved to another value, expiration or subkey.
  const Id160 key = Id160::of("progress");
  const auto honest = asio::co_spawn(alice.executor(), alice.node()->get(key), asio::use_future).get();
  REQUIRE(honest);
  const auto signed_value = honest->dictionary().at(mine).value;
  const auto wrapped = dht::SignatureValidator::unwrap(signed_value);
  REQUIRE(wrapped);
  nlohmann::json forged = nlohmann::json::from_msgpack(signed_value);
  forged[dht::SignatureValidator::wrapper_field] = nlohmann::json::binary(msgpack_of({{"step", 99}}));
  const auto mallory_signed = [&] {
    nlohmann::json j{{dht::SignatureValidator::wrapper_field, nlohmann::json::binary(msgpack_of({{"step", 99}}))}};
    const auto sig = mallory.identity().sign(dht::SignatureValidator::signed_bytes(key, &mine, expiration + 1, msgpack_of({{"step", 99}})));
    j["sig"] = nlohmann::json::binary(std::vector<std::uint8_t>(sig.begin(), sig.end()));
    return msgpack_of(j);
  }();
  const auto results = store_raw(mallory, {
      {key, mine, msgpack_of({{"step", 99}}), expiration + 1},  // unsigned
      {key, mine, mallory_signed, expiration + 1},               // signed by the wrong key
      {key, mine, msgpack_of(forged), expiration},               // alice's signature, another value
      {key, mine, signed_value, expiration + 1},                 // alice's value, a later expiration
      {key, dht::Subkey(mallory.owner_marker() + "x" + alice.owner_marker()), signed_value, expiration},  // two markers
  });
  for (bool ok : results) CHECK_FALSE(ok);
  // A raw dht.store gets "invalid" per item.
  test::RawClient raw(alice.node()->address());
  raw.send(test::request_bytes(1, "dht.store",
                               {{"items", nlohmann::json::array({nlohmann::json::array(
                                              {nlohmann::json::binary(std::vector<std::uint8_t>(key.bytes().begin(), key.bytes().end())),
                                               std::get<std::string>(mine), nlohmann::json::binary(msgpack_of(1)), expiration + 5,
                                               false})})}}));
  auto reply = raw.read_frame(10s);
  REQUIRE(reply);
  CHECK(reply->message.header["results"][0] == "invalid");

  // Readers get alice's value; other subkeys stay open to anyone.
  CHECK(mallory.store("progress", {{"step", 1}}, expiration, dht::Subkey("anyone")));
  const auto got = reader.get("progress", true);
  REQUIRE(got);
  CHECK(got->dictionary.at(mine).value == nlohmann::json{{"step", 10}});
  CHECK(got->dictionary.count(dht::Subkey("anyone")) == 1);
  // The owner replaces its own value.
  CHECK(alice.store("progress", {{"step", 11}}, expiration + 2, mine));
  CHECK(reader.get("progress", true)->dictionary.at(mine).value == nlohmann::json{{"step", 11}});
}

TEST_CASE("signed records: a key naming an owner is replaced only by the owner, and a reader ignores forgeries") {
  DHT alice(peer_options());
  DHT mallory(peer_options().initial_peers({alice.node()->address()}));
  DHT reader(peer_options().initial_peers({alice.node()->address()}));
  const double expiration = wall_time() + 60;
  const std::string key = "weights" + alice.owner_marker();
  // A storer refuses the forgery below only if it holds alice's signed value, so alice's store
  // must reach all three peers: wait until alice's table holds the two that joined through it.
  REQUIRE(test::wait_for([&] {
    return asio::co_spawn(alice.executor(), alice.node()->routing_table_size(), asio::use_future).get() == 2;
  }));
  REQUIRE(alice.store(key, "v1", expiration));
  // A later-expiring unsigned value: storers that hold alice's signed one refuse it, and a
  // reader that knows the key ignores it wherever it landed.
  const auto results = store_raw(mallory, {{Id160::of(key), std::nullopt, msgpack_of("forged"), expiration + 30}});
  CHECK_FALSE(results.at(0));
  const auto got = reader.get(key, true);
  REQUIRE(got);
  REQUIRE(got->value);
  CHECK(got->value->value == "v1");
  // A peer whose storage holds only the forgery still returns nothing forged to a reader.
  DHT lonely(peer_options());
  REQUIRE(store_raw(lonely, {{Id160::of(key), std::nullopt, msgpack_of("forged"), expiration + 30}}).at(0));
  CHECK_FALSE(lonely.get(key).has_value());
  CHECK(alice.store(key, "v2", expiration + 1));
  CHECK(reader.get(key, true)->value->value == "v2");
}

TEST_CASE("signed records: a validator remembers signatures it verified, never a forgery") {
  auto owner = std::make_shared<const Identity>(Identity::generate());
  const dht::SignatureValidator signer(owner);
  const dht::SignatureValidator checker;
  const Id160 key = Id160::of("remembered");
  const dht::Subkey subkey = owner->owner_marker();
  const auto value = msgpack_of({{"step", 1}});
  const auto signed_value = signer.sign(dht::RecordView{key, {}, &subkey, value, 1e9});
  for (int i = 0; i < 3; ++i) CHECK(checker.validate(dht::RecordView{key, {}, &subkey, signed_value, 1e9}));
  // The same signature over anything else (expiration, subkey, value) was never verified.
  CHECK_FALSE(checker.validate(dht::RecordView{key, {}, &subkey, signed_value, 1e9 + 1}));
  const dht::Subkey other = owner->owner_marker() + "x";
  CHECK_FALSE(checker.validate(dht::RecordView{key, {}, &other, signed_value, 1e9}));
  auto forged = nlohmann::json::from_msgpack(signed_value);
  forged[dht::SignatureValidator::wrapper_field] = nlohmann::json::binary(msgpack_of({{"step", 2}}));
  const auto forged_bytes = nlohmann::json::to_msgpack(forged);
  for (int i = 0; i < 2; ++i) CHECK_FALSE(checker.validate(dht::RecordView{key, {}, &subkey, forged_bytes, 1e9}));
  // Past verified_cache_entries others, it is verified again, and still valid.
  for (std::size_t i = 0; i <= dht::SignatureValidator::verified_cache_entries; ++i) {
    const auto v = signer.sign(dht::RecordView{key, {}, &subkey, value, 2e9 + static_cast<double>(i)});
    REQUIRE(checker.validate(dht::RecordView{key, {}, &subkey, v, 2e9 + static_cast<double>(i)}));
  }
  CHECK(checker.validate(dht::RecordView{key, {}, &subkey, signed_value, 1e9}));
}

TEST_CASE("validators: a schema types the values of known keys at every peer, and validators compose with signatures") {
  auto schema = std::make_shared<dht::SchemaValidator>();
  schema->field("peers", {dht::ValueType::object, {{"addr", dht::ValueType::string}, {"port", dht::ValueType::integer}}, true, true});
  schema->field("epoch", {dht::ValueType::integer, {}, false, std::nullopt});
  DHT a(peer_options());
  DHT b(peer_options().initial_peers({a.node()->address()}));
  a.add_validator(schema);
  b.add_validator(schema);
  const double expiration = wall_time() + 60;
  CHECK(a.store("peers", {{"addr", "10.0.0.1"}, {"port", 5000}}, expiration, dht::Subkey("x")));
  CHECK_FALSE(a.store("peers", {{"addr", 7}, {"port", 5000}}, expiration, dht::Subkey("y")));   // wrong field type
  CHECK_FALSE(a.store("peers", {{"addr", "10.0.0.1"}}, expiration, dht::Subkey("z")));          // missing field
  CHECK_FALSE(a.store("peers", {{"addr", "10.0.0.1"}, {"port", 1}}, expiration, dht::Subkey(5)));  // integer subkey
  CHECK_FALSE(a.store("peers", {{"addr", "10.0.0.1"}, {"port", 1}}, expiration));               // not a dictionary
  CHECK(b.store("epoch", 3, expiration));
  CHECK_FALSE(b.store("epoch", "three", expiration));
  CHECK(b.store("anything else", "is free", expiration));
  // Signed values are typed by what they carry, inside the signature.
  CHECK(a.store("peers", {{"addr", "10.0.0.2"}, {"port", 1}}, expiration, dht::Subkey(a.owner_marker())));
  CHECK_FALSE(a.store("peers", {{"addr", 2}, {"port", 1}}, expiration + 1, dht::Subkey(a.owner_marker())));
  const auto got = b.get("peers", true);
  REQUIRE(got);
  CHECK(got->dictionary.size() == 2);

  auto strict = std::make_shared<dht::SchemaValidator>();
  strict->field("epoch", {dht::ValueType::integer, {}, false, std::nullopt}).allow_extra_keys(false);
  DHT c(peer_options());
  c.add_validator(strict);
  CHECK(c.store("epoch", 1, expiration));
  CHECK_FALSE(c.store("unknown", 1, expiration));
}
