// Hostile input: each attack of issue 11 run against a real peer on loopback by a raw client
// speaking docs/protocol.md, then a well-formed call from a new connection must succeed.
#include "../common/raw_client.hpp"
#include "../common/wait.hpp"

#include <hive/core/msgpack.hpp>
#include <hive/dht/dht.hpp>

#include <doctest/doctest.h>

#include <sys/resource.h>

#include <dirent.h>
#include <fstream>

using namespace hive;
using namespace std::chrono_literals;

namespace {

/// A DHT peer on loopback with the given knobs.
DHTOptions victim_options() { return DHTOptions().listen_on("127.0.0.1:0").require_bootstrap(false); }

std::string address_of(const DHT& dht) { return dht.node()->address(); }

/// A dht.ping from a fresh connection gets its answer: the peer still serves newcomers.
bool answers_ping(const std::string& address, const std::string& source = "") {
  try {
    test::RawClient c(address, source);
    c.send(test::request_bytes(1, "dht.ping", nlohmann::json::object()));
    auto f = c.read_frame(10s);
    return f && f->kind == net::FrameKind::response;
  } catch (const std::exception&) {
    return false;  // refused or reset
  }
}

nlohmann::json bin_id(const Id160& id) {
  return nlohmann::json::binary(std::vector<std::uint8_t>(id.bytes().begin(), id.bytes().end()));
}

/// A dht.store request of `items` ([key, subkey|null, value, expiration, in_cache] each).
std::vector<std::byte> store_request(std::uint64_t call_id, nlohmann::json items) {
  return test::request_bytes(call_id, "dht.store", {{"items", std::move(items)}});
}

nlohmann::json store_item(const Id160& key, nlohmann::json subkey, std::size_t value_bytes, double expiration) {
  return nlohmann::json::array({bin_id(key), std::move(subkey),
                                nlohmann::json::binary(std::vector<std::uint8_t>(value_bytes, 0xab)), expiration, false});
}

/// The per-item statuses of a dht.store reply.
std::vector<std::string> store_results(test::RawClient& c) {
  auto f = c.read_frame(10s);
  REQUIRE(f);
  REQUIRE(f->kind == net::FrameKind::response);
  return f->message.header.at("results").get<std::vector<std::string>>();
}

std::size_t open_descriptors() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d)) ++n;
    ::closedir(d);
  }
  return n;
}

/// The process's virtual memory size in KiB (/proc/self/status VmSize).
std::size_t vm_size_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmSize:", 0) == 0) return std::stoul(line.substr(7));
  return 0;
}

}  // namespace

// ---- 1. nesting depth -------------------------------------------------------------------

TEST_CASE("hostile msgpack: the pre-scan bounds depth and refuses malformed bytes before parsing") {
  auto nested = [](std::size_t depth) {
    std::vector<std::uint8_t> b(depth, 0x91);  // fixarray of one element, depth times
    b.push_back(0xc0);
    return b;
  };
  CHECK_NOTHROW((void)parse_msgpack(nested(64), 64));
  CHECK_THROWS_AS((void)parse_msgpack(nested(65), 64), Error);
  CHECK_THROWS_AS((void)parse_msgpack(nested(100000), 64), Error);
  // A fixarray of 3 with two elements: truncated; an array32 claiming 2^32-1 elements in 5 bytes.
  CHECK_THROWS_AS((void)parse_msgpack(std::vector<std::uint8_t>{0x93, 0x01, 0x02}), Error);
  CHECK_THROWS_AS((void)parse_msgpack(std::vector<std::uint8_t>{0xdd, 0xff, 0xff, 0xff, 0xff}), Error);
  CHECK_THROWS_AS((void)parse_msgpack(std::vector<std::uint8_t>{0x01, 0x02}), Error);  // trailing byte
  CHECK_THROWS_AS((void)parse_msgpack(std::vector<std::uint8_t>{0xc1}), Error);
  // Everything nlohmann writes scans clean.
  const nlohmann::json sample = {{"a", {1, -2, 3.5, "x", nullptr, true}}, {"b", nlohmann::json::binary({1, 2, 3})},
                                 {"c", std::string(70000, 'y')}, {"d", std::vector<int>(70000, 7)},
                                 {"e", {{"f", {{"g", std::int64_t{-1} << 40}}}}}, {"h", std::uint64_t{1} << 63}};
  CHECK(parse_msgpack(nlohmann::json::to_msgpack(sample)) == sample);
}

TEST_CASE("hostile header: deeply nested MessagePack gets an error reply and the peer keeps serving") {
  DHT victim(victim_options());
  const auto address = address_of(victim);
  // {"m": "dht.ping", "h": [[[...90 000 levels...]]]}: about 90 KB, far below max_header_bytes.
  std::vector<std::uint8_t> header{0x82, 0xa1, 'm', 0xa8, 'd', 'h', 't', '.', 'p', 'i', 'n', 'g', 0xa1, 'h'};
  header.insert(header.end(), 90000, 0x91);
  header.push_back(0xc0);
  test::RawClient attacker(address);
  attacker.send(test::raw_request(7, header));
  auto reply = attacker.read_frame(10s);
  REQUIRE(reply);
  CHECK(reply->kind == net::FrameKind::error);
  CHECK(reply->call_id == 7);
  CHECK(reply->message.header["code"] == static_cast<int>(errc::bad_header));
  CHECK(reply->message.header["message"].get<std::string>().find("depth") != std::string::npos);
  CHECK(answers_ping(address));

  // A stored value nested too deep is skipped by readers instead of crashing them.
  std::vector<std::uint8_t> deep(5000, 0x91);
  deep.push_back(0xc0);
  dht::Record record;
  record.content = dht::ValueWithExpiration{deep, wall_time() + 60};
  record.expiration = wall_time() + 60;
  CHECK_FALSE(DHT::decode(record).has_value());
}

// ---- 2. stalled frames, idle connections, descriptor exhaustion, per-source caps -------

TEST_CASE("hostile connections: a sender that stalls mid-frame or idles is cut off, others are served") {
  DHT victim(victim_options()
                 .transport(net::TcpOptions().frame_timeout(Seconds(0.5)).min_receive_rate(1e9))
                 .rpc(net::RpcOptions().idle_timeout(Seconds(1)).handshake_timeout(Seconds(1))));
  const auto address = address_of(victim);
  const auto ping = test::request_bytes(3, "dht.ping", nlohmann::json::object());

  test::RawClient prefix_only(address);  // 10 bytes of a 24-byte prefix, then nothing
  prefix_only.send(std::span(ping).first(10));
  test::RawClient body_stalled(address);  // a whole prefix claiming 1 MiB, 100 KiB of it, then nothing
  auto big = test::raw_request(4, std::vector<std::uint8_t>(200, 0xc0));
  const std::uint32_t claimed = (1u << 20) - 4;
  std::memcpy(big.data(), &claimed, 4);
  body_stalled.send(std::span(big).first(net::prefix_bytes));
  body_stalled.send(std::vector<std::byte>(100 * 1024));
  test::RawClient idle(address);  // proves its identity, then sends nothing
  test::RawClient silent(address, "", 0, false);  // connects and never starts the handshake

  CHECK(prefix_only.wait_closed(10s));
  CHECK(body_stalled.wait_closed(10s));
  CHECK(idle.wait_closed(10s));
  CHECK(silent.wait_closed(10s));
  CHECK(answers_ping(address));
}

TEST_CASE("hostile connections: the listener survives descriptor exhaustion and serves again afterwards") {
  DHT victim(victim_options());
  const auto address = address_of(victim);
  const auto hp = net::HostPort::parse(address);
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  rlimit low = saved;
  low.rlim_cur = open_descriptors() + 40;
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);

  std::vector<int> held;
  auto release = [&] {
    for (int fd : held) ::close(fd);
    held.clear();
  };
  // Two spare descriptors, given back one at a time once the table is full, so that a
  // connection waits in the backlog while the victim has no descriptor to accept it with.
  int spare = ::open("/dev/null", O_RDONLY);
  REQUIRE(spare >= 0);
  auto connect_one = [&]() -> bool {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return false;
    held.push_back(fd);
    sockaddr_in remote{};
    remote.sin_family = AF_INET;
    remote.sin_port = htons(hp.port);
    ::inet_pton(AF_INET, hp.host.c_str(), &remote.sin_addr);
    return ::connect(fd, reinterpret_cast<sockaddr*>(&remote), sizeof remote) == 0;
  };
  for (int i = 0; i < 200 && connect_one(); ++i) {
  }
  ::close(spare);
  connect_one();
  const bool failed_accepts = test::wait_for([&] { return victim.node()->rpc()->accept_failures() > 0; }, 10s);
  release();
  ::setrlimit(RLIMIT_NOFILE, &saved);
  CHECK(failed_accepts);
  CHECK(answers_ping(address));
}

TEST_CASE("hostile connections: connections beyond the per-source cap are closed, other sources still served") {
  DHT victim(victim_options().rpc(net::RpcOptions().max_connections_per_source(4).limit_loopback(true)));
  const auto address = address_of(victim);
  std::vector<std::unique_ptr<test::RawClient>> flood;
  for (int i = 0; i < 8; ++i) flood.push_back(std::make_unique<test::RawClient>(address, "127.0.0.2", 0, false));
  std::size_t closed = 0;
  for (auto& c : flood) closed += c->wait_closed(300ms) ? 1 : 0;
  CHECK(closed == 4);
  CHECK(victim.node()->rpc()->refused_connections() == 4);
  CHECK(answers_ping(address, "127.0.0.1"));
  // Once the source's connections close, it may connect again.
  flood.clear();
  CHECK(test::wait_for([&] { return answers_ping(address, "127.0.0.2"); }, 10s));
}

// ---- 3. (remote experts: tests/torch/test_moe.cpp) ---------------------------------------

// ---- 4. storage pinned by one source -------------------------------------------------------

TEST_CASE("hostile dht: one source cannot pin a peer's storage or a dictionary with far-future records") {
  DHT victim(victim_options().node(
      dht::NodeOptions().storage(dht::StorageOptions().max_keys(100).max_subkeys(16))));
  const auto address = address_of(victim);
  const double far = wall_time() + 86000;  // just within max_expiration_ahead (a day)

  test::RawClient attacker(address, "127.0.0.2");
  nlohmann::json flood = nlohmann::json::array();
  for (int i = 0; i < 150; ++i) flood.push_back(store_item(Id160::of(fmt::format("junk.{}", i)), nullptr, 8, far));
  attacker.send(store_request(1, flood));
  (void)store_results(attacker);

  test::RawClient user(address, "127.0.0.1");
  const Id160 mine = Id160::of("expert.7");
  user.send(store_request(2, nlohmann::json::array({store_item(mine, nullptr, 8, wall_time() + 60)})));
  CHECK(store_results(user) == std::vector<std::string>{"stored"});

  // More from the attacker evicts its own records, not the user's.
  nlohmann::json more = nlohmann::json::array();
  for (int i = 150; i < 300; ++i) more.push_back(store_item(Id160::of(fmt::format("junk.{}", i)), nullptr, 8, far));
  attacker.send(store_request(3, more));
  const auto refused = store_results(attacker);
  CHECK(std::count(refused.begin(), refused.end(), "storage_full") == 150);
  user.send(test::request_bytes(4, "dht.find", {{"keys", nlohmann::json::array({bin_id(mine)})}}));
  auto found = user.read_frame(10s);
  REQUIRE(found);
  REQUIRE(found->kind == net::FrameKind::response);
  CHECK(found->message.header["results"][0].contains("r"));

}

TEST_CASE("hostile dht: a source holds at most max_keys_per_source keys, and others store freely") {
  DHT victim(victim_options().node(
      dht::NodeOptions().storage(dht::StorageOptions().max_keys(1000).max_keys_per_source(50))));
  const auto address = address_of(victim);
  const double far = wall_time() + 86000;

  test::RawClient attacker(address, "127.0.0.2");
  nlohmann::json flood = nlohmann::json::array();
  for (int i = 0; i < 150; ++i) flood.push_back(store_item(Id160::of(fmt::format("junk.{}", i)), nullptr, 8, far));
  attacker.send(store_request(1, flood));
  const auto results = store_results(attacker);
  CHECK(std::count(results.begin(), results.end(), "stored") == 50);
  CHECK(std::count(results.begin(), results.end(), "storage_full") == 100);

  // The storage is far from full: another source stores as many keys as it may.
  test::RawClient user(address, "127.0.0.1");
  nlohmann::json mine = nlohmann::json::array();
  for (int i = 0; i < 50; ++i) mine.push_back(store_item(Id160::of(fmt::format("expert.{}", i)), nullptr, 8, wall_time() + 60));
  user.send(store_request(2, mine));
  const auto stored = store_results(user);
  CHECK(std::count(stored.begin(), stored.end(), "stored") == 50);
}

TEST_CASE("hostile dht: one source cannot lock others out of a shared dictionary with far-future subkeys") {
  DHT victim(victim_options().node(dht::NodeOptions().storage(dht::StorageOptions().max_subkeys(16))));
  const auto address = address_of(victim);
  const double far = wall_time() + 86000;
  // The experts' prefix dictionary, every subkey slot taken by one source.
  const Id160 prefix = Id160::of("expert.");
  test::RawClient attacker(address, "127.0.0.2");
  nlohmann::json subkeys = nlohmann::json::array();
  for (int i = 0; i < 20; ++i) subkeys.push_back(store_item(prefix, fmt::format("junk{}", i), 8, far));
  attacker.send(store_request(1, subkeys));
  const auto flooded = store_results(attacker);
  CHECK(std::count(flooded.begin(), flooded.end(), "stored") == 16);
  test::RawClient user(address, "127.0.0.1");
  user.send(store_request(2, nlohmann::json::array({store_item(prefix, "expert.7", 8, wall_time() + 60)})));
  CHECK(store_results(user) == std::vector<std::string>{"stored"});
  // The attacker's next subkeys replace its own, never the user's.
  attacker.send(store_request(3, nlohmann::json::array({store_item(prefix, "junk99", 8, far + 1)})));
  CHECK(store_results(attacker) == std::vector<std::string>{"stored"});
  user.send(test::request_bytes(4, "dht.find", {{"keys", nlohmann::json::array({bin_id(prefix)})}}));
  auto found = user.read_frame(10s);
  REQUIRE(found);
  REQUIRE(found->kind == net::FrameKind::response);
  bool kept = false;
  for (const auto& item : found->message.header["results"][0]["r"]["d"]) kept = kept || item[0] == "expert.7";
  CHECK(kept);
}

// ---- 5. amplification and unbounded memory ------------------------------------------------

TEST_CASE("hostile dht: find refuses repeated keys, and a dictionary larger than a frame stays readable") {
  DHT victim(victim_options().transport(net::TcpOptions().limits(Limits().max_frame_bytes(256 * 1024))));
  const auto address = address_of(victim);
  test::RawClient c(address);
  const Id160 key = Id160::of("big");
  c.send(test::request_bytes(1, "dht.find", {{"keys", nlohmann::json::array({bin_id(key), bin_id(key), bin_id(key)})}}));
  auto refused = c.read_frame(10s);
  REQUIRE(refused);
  CHECK(refused->kind == net::FrameKind::error);
  CHECK(refused->message.header["message"].get<std::string>().find("distinct") != std::string::npos);

  // 20 subkeys of 30 KB: 600 KB in all, more than one 256 KiB frame can carry.
  for (int i = 0; i < 20; ++i) {
    c.send(store_request(10 + i, nlohmann::json::array({store_item(key, i, 30000, wall_time() + 60 + i)})));
    REQUIRE(store_results(c) == std::vector<std::string>{"stored"});
  }
  c.send(test::request_bytes(2, "dht.find", {{"keys", nlohmann::json::array({bin_id(key)})}}));
  auto found = c.read_frame(10s);
  REQUIRE(found);
  REQUIRE(found->kind == net::FrameKind::response);
  const auto& r = found->message.header["results"][0];
  CHECK(r.value("t", false));
  REQUIRE(r.contains("r"));
  const auto kept = r["r"]["d"].size();
  CHECK(kept >= 2);
  CHECK(kept < 20);
  // The latest-expiring subkeys are the ones kept.
  for (const auto& item : r["r"]["d"]) CHECK(item[0].get<int>() >= static_cast<int>(20 - kept));
}

TEST_CASE("hostile frames: a claimed frame size costs memory only as its bytes arrive") {
  // Frames up to 2 GiB allowed here (the default is 256 MiB), to claim much more than is sent.
  DHT victim(victim_options().transport(net::TcpOptions().limits(Limits().max_frame_bytes(std::uint64_t{1} << 31))));
  const auto address = address_of(victim);
  const auto before = vm_size_kib();
  std::vector<std::unique_ptr<test::RawClient>> claims;
  for (int i = 0; i < 2; ++i) {
    auto frame = test::raw_request(5, std::vector<std::uint8_t>(200, 0xc0));
    const std::uint32_t claimed = (3u << 29) - 4;  // 1.5 GiB each, within max_frame_bytes
    std::memcpy(frame.data(), &claimed, 4);
    claims.push_back(std::make_unique<test::RawClient>(address));
    claims.back()->send(std::span(frame).first(net::prefix_bytes + 64));
  }
  // Round trips on another connection: the victim has read both prefixes by then.
  CHECK(answers_ping(address));
  CHECK(answers_ping(address));
  const auto grown_mib = (vm_size_kib() - std::min(before, vm_size_kib())) / 1024;
  INFO("virtual memory grew by ", grown_mib, " MiB");
  CHECK(grown_mib < 512);
}

TEST_CASE("hostile rpc: a caller that never reads its replies holds at most max_concurrent_requests of them") {
  net::Runtime runtime(1);
  auto victim = net::Rpc<net::Tcp>::create(runtime.executor(), net::Tcp::Options().socket_buffer_bytes(16 * 1024),
                                           net::RpcOptions().max_concurrent_requests(4));
  std::atomic<int> served{0};
  victim->add_handler("big", [&](net::CallContext, Message) -> asio::awaitable<Message> {
    served++;
    Message m;
    const std::vector<std::byte> payload(1 << 20);
    m.blobs.push_back(Buffer::copy_of(payload));
    co_return m;
  });
  const auto address = victim->listen("127.0.0.1:0");
  test::RawClient reader_never(address, "", 16 * 1024);
  for (std::uint64_t id = 1; id <= 4; ++id) reader_never.send(test::request_bytes(id, "big", nullptr));
  REQUIRE(test::wait_for([&] { return served.load() == 4; }, 10s));
  // Their 4 MiB of replies cannot be written to a caller that does not read: the next
  // requests are refused instead of building more.
  for (std::uint64_t id = 5; id <= 8; ++id) reader_never.send(test::request_bytes(id, "big", nullptr));
  CHECK(test::wait_for([&] { return victim->refused_requests() >= 4; }, 10s));
  CHECK(served.load() == 4);
  // Another caller is served meanwhile.
  test::RawClient other(address);
  other.send(test::request_bytes(1, "big", nullptr));
  auto reply = other.read_frame(10s);
  REQUIRE(reply);
  CHECK(reply->kind == net::FrameKind::response);
  victim->close();
}
