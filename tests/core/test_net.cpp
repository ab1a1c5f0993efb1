// The RPC layer over both transports, and the TCP transport against malformed frames.
#include "../common/raw_client.hpp"
#include "net_fixtures.hpp"

#include <asio/read.hpp>
#include <asio/write.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <condition_variable>
#include <future>
#include <mutex>

#include <poll.h>

using namespace hive;
using namespace std::chrono_literals;

namespace {

struct Add {
  int a = 0, b = 0;
  NLOHMANN_DEFINE_TYPE_INTRUSIVE(Add, a, b)
};
struct Sum {
  int sum = 0;
  NLOHMANN_DEFINE_TYPE_INTRUSIVE(Sum, sum)
};
constexpr net::Method<Add, Sum> add_method{"test.add"};

std::error_code call_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return e.code();
  }
  return {};
}

}  // namespace

TEST_CASE_TEMPLATE("net rpc: echo, typed calls, unknown method, handler errors", T, net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto server = swarm.make();
  auto client = swarm.make();
  server->add_handler("echo", test::echo);
  server->add_handler("boom", [](net::CallContext, Message) -> asio::awaitable<Message> {
    throw std::runtime_error("the handler failed on purpose");
    co_return Message{};
  });
  server->serve(add_method, [](net::CallContext, Add r) -> asio::awaitable<Sum> { co_return Sum{r.a + r.b}; });
  const auto address = server->listen(swarm.any_address);

  Message m;
  m.header = {{"hello", "world"}, {"n", 7}};
  m.add_blob(Buffer::copy_of(std::string_view("payload bytes")));
  m.add_blob(Buffer{});
  auto reply = client->call(address, "echo", m, 5s);
  CHECK(reply.header == m.header);
  REQUIRE(reply.blobs.size() == 2);
  CHECK(reply.blobs[0] == m.blobs[0]);
  CHECK(reply.blobs[1].empty());

  CHECK(client->call(address, add_method, Add{2, 40}, 5s).sum == 42);

  try {
    client->call(address, "no.such.method", Message{}, 5s);
    FAIL("unknown method did not fail");
  } catch (const RemoteError& e) {
    CHECK(e.code() == make_error_code(errc::unknown_method));
    CHECK(e.remote_message().find("no.such.method") != std::string::npos);
  }
  try {
    client->call(address, "boom", Message{}, 5s);
    FAIL("throwing handler did not fail");
  } catch (const RemoteError& e) {
    CHECK(e.code() == make_error_code(errc::remote_error));
    CHECK(e.remote_message() == "the handler failed on purpose");
  }
  // A request the typed handler cannot decode is refused with the reason.
  try {
    client->call(address, "test.add", Message{nlohmann::json{{"a", "two"}}, {}}, 5s);
    FAIL("bad typed request did not fail");
  } catch (const RemoteError& e) {
    CHECK(e.remote_message().find("bad request for test.add") != std::string::npos);
  }
  // The same peer still serves afterwards, on the same connection.
  CHECK(client->call(address, add_method, Add{1, 1}, 5s).sum == 2);
  CHECK(client->connection_count() == 1);
  client->close();
  server->close();
}

TEST_CASE_TEMPLATE("net rpc: 1000 concurrent calls multiplexed on one connection", T, net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto server = swarm.make();
  auto client = swarm.make();
  std::atomic<int> in_flight{0}, max_in_flight{0};
  // Each handler waits a little so that calls overlap on the server.
  server->add_handler("slow_echo", [&](net::CallContext, Message m) -> asio::awaitable<Message> {
    int now = ++in_flight;
    int seen = max_in_flight.load();
    while (now > seen && !max_in_flight.compare_exchange_weak(seen, now)) {
    }
    asio::steady_timer t(co_await asio::this_coro::executor, 20ms);
    co_await t.async_wait(asio::use_awaitable);
    --in_flight;
    co_return m;
  });
  const auto address = server->listen(swarm.any_address);

  constexpr int n = 1000;
  std::vector<std::future<Message>> futures;
  futures.reserve(n);
  for (int i = 0; i < n; ++i)
    futures.push_back(client->async_call(address, "slow_echo", Message{nlohmann::json(i), {}}, 30s, asio::use_future));
  int correct = 0;
  for (int i = 0; i < n; ++i) correct += futures[i].get().header == nlohmann::json(i);
  CHECK(correct == n);
  CHECK(max_in_flight.load() > 100);  // they really were in flight together
  CHECK(client->connection_count() == 1);
  client->close();
  server->close();
}

TEST_CASE_TEMPLATE("net rpc: timeouts and a peer that dies mid-call", T, net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto server = swarm.make();
  auto client = swarm.make();
  // Counts the "hang" calls that reached the server; the test thread waits on it.
  std::mutex entered_mutex;
  std::condition_variable entered_cv;
  int entered = 0;
  server->add_handler("hang", [&](net::CallContext, Message) -> asio::awaitable<Message> {
    {
      std::lock_guard lock(entered_mutex);
      ++entered;
    }
    entered_cv.notify_all();
    asio::steady_timer t(co_await asio::this_coro::executor, 1h);
    co_await t.async_wait(asio::use_awaitable);
    co_return Message{};
  });
  const auto address = server->listen(swarm.any_address);

  auto t0 = std::chrono::steady_clock::now();
  CHECK(call_error([&] { client->call(address, "hang", Message{}, 0.2s); }) == make_error_code(errc::timeout));
  auto waited = std::chrono::steady_clock::now() - t0;
  CHECK(waited >= 0.2s);
  CHECK(waited < 5s);

  // The server dies while a call is in flight: the caller hears of it long before its timeout.
  auto pending = client->async_call(address, "hang", Message{}, 60s, asio::use_future);
  {
    std::unique_lock lock(entered_mutex);
    REQUIRE(entered_cv.wait_for(lock, 10s, [&] { return entered == 2; }));
  }
  t0 = std::chrono::steady_clock::now();
  server->close();
  REQUIRE(pending.wait_for(10s) == std::future_status::ready);
  CHECK(call_error([&] { pending.get(); }) == make_error_code(errc::connection_closed));
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);

  // Calls to a dead address fail fast or by their timeout, never hang.
  auto code = call_error([&] { client->call(address, "hang", Message{}, 2s); });
  CHECK((code == make_error_code(errc::connection_refused) || code == make_error_code(errc::timeout)));
  client->close();
}

TEST_CASE_TEMPLATE("net rpc: closed peers refuse calls and fail pending ones", T, net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto server = swarm.make();
  auto client = swarm.make();
  server->add_handler("echo", test::echo);
  const auto address = server->listen(swarm.any_address);
  CHECK(client->call(address, "echo", Message{nlohmann::json(1), {}}, 5s).header == 1);
  client->close();
  CHECK(call_error([&] { client->call(address, "echo", Message{}, 5s); }) == make_error_code(errc::shutdown));
  server->close();
}

TEST_CASE_TEMPLATE("net rpc: large payloads and frame limits", T, net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto server = swarm.make({}, Limits().max_frame_bytes(8u << 20));
  auto client = swarm.make();
  server->add_handler("size", [](net::CallContext, Message m) -> asio::awaitable<Message> {
    co_return Message{nlohmann::json(m.blob_bytes()), {}};
  });
  const auto address = server->listen(swarm.any_address);
  std::vector<std::byte> big(6u << 20);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::byte>(i * 7);
  Message m;
  m.add_blob(Buffer::adopt(big));
  CHECK(client->call(address, "size", m, 20s).header == big.size());
  // Over the server's limit: refused with an error (and the connection closed), server lives on.
  Message huge;
  huge.add_blob(Buffer::adopt(std::vector<std::byte>(9u << 20)));
  auto code = call_error([&] { client->call(address, "size", huge, 20s); });
  CHECK((code == make_error_code(errc::frame_too_large) || code == make_error_code(errc::connection_closed)));
  CHECK(client->call(address, "size", m, 20s).header == big.size());
  client->close();
  server->close();
}

TEST_CASE("net tcp: a body larger than preallocate_bytes arrives intact whatever its growth factor") {
  // The server's buffer starts at 4 KiB and grows as bytes arrive; factors outside 2..64 are
  // clamped. The handler answers a checksum of every byte, so a byte lost or misplaced while
  // the buffer grew changes the answer.
  net::Runtime runtime{2};
  std::vector<std::byte> big((3u << 20) + 7);
  std::uint64_t expected = 0;
  for (std::size_t i = 0; i < big.size(); ++i) {
    big[i] = static_cast<std::byte>((i * 131) ^ (i >> 11));
    expected = expected * 1099511628211ull + static_cast<std::uint64_t>(big[i]);
  }
  // Each case also runs without the receive cache, with one too small for a body (every
  // buffer is freed), and with the default.
  for (const bool encrypt : {false, true})
    for (const std::size_t growth : {std::size_t{0}, std::size_t{2}, std::size_t{8}, std::size_t{64}, std::size_t{1000}})
      for (const std::size_t cache : {std::size_t{0}, std::size_t{1} << 20, net::Tcp::Options().receive_cache_bytes()}) {
        CAPTURE(encrypt);
        CAPTURE(growth);
        CAPTURE(cache);
        const auto options = net::RpcOptions().encrypt(encrypt);
        auto server = net::Rpc<net::Tcp>::create(
            runtime.executor(), net::Tcp::Options().preallocate_bytes(4096).growth_factor(growth).receive_cache_bytes(cache),
            options);
        auto client = net::Rpc<net::Tcp>::create(runtime.executor(), net::Tcp::Options(), options);
        server->add_handler("checksum", [](net::CallContext, Message m) -> asio::awaitable<Message> {
          std::uint64_t h = 0;
          for (const auto& blob : m.blobs)
            for (std::byte b : blob.bytes()) h = h * 1099511628211ull + static_cast<std::uint64_t>(b);
          co_return Message{nlohmann::json(h), {}};
        });
        const auto address = server->listen("127.0.0.1:0");
        for (int call = 0; call < 2; ++call) {  // the second reuses the connection
          Message m;
          m.add_blob(Buffer::adopt(std::vector<std::byte>(big)));
          CHECK(client->call(address, "checksum", m, 20s).header.get<std::uint64_t>() == expected);
        }
        // The default cache keeps a body's buffers once the server drops its message: the last
        // one (at most 12.5% over 3 MiB) and those it grew through (under twice that), for at
        // most the two bodies. A smaller cache keeps what fits; none keeps nothing.
        const auto held = [&] { return server->transport().cached_receive_bytes(); };
        if (cache == net::Tcp::Options().receive_cache_bytes()) {
          CHECK(test::wait_for([&] { return held() >= big.size(); }));
          CHECK(held() <= 8 * big.size());
        } else {
          CHECK(held() <= cache);
        }
        client->close();
        server->close();
      }
}

TEST_CASE("net tcp: the receive cache hands buffers of a size class back out, and keeps no more than its capacity") {
  using net::detail::BodyCache;
  // Size classes: at most 12.5% above the request, never below it, equal for equal requests.
  for (const std::size_t n : {std::size_t{1}, std::size_t{17}, std::size_t{65537}, std::size_t{1} << 20, (std::size_t{1} << 20) + 1,
                              std::size_t{9} << 20, (std::size_t{64} << 20) + 12345}) {
    CAPTURE(n);
    const std::size_t c = BodyCache::size_class(n);
    CHECK(c >= n);
    if (n > 16) CHECK(static_cast<double>(c) <= 1.125 * static_cast<double>(n));
    CHECK(BodyCache::size_class(c) == c);
  }
  CHECK(BodyCache::size_class(std::size_t{64} << 20) == std::size_t{64} << 20);

  auto cache = std::make_shared<BodyCache>(std::size_t{3} << 20);
  std::byte* first = nullptr;
  {
    auto a = cache->get(std::size_t{1} << 20);
    first = a.get();
    CHECK(reinterpret_cast<std::uintptr_t>(first) % 64 == 0);
    std::memset(first, 0x5a, std::size_t{1} << 20);  // all of it is usable
    CHECK(cache->cached_bytes() == 0);
  }
  CHECK(cache->cached_bytes() == std::size_t{1} << 20);
  {
    auto again = cache->get((std::size_t{1} << 20) - 100);  // same class: the same buffer
    CHECK(again.get() == first);
    CHECK(cache->cached_bytes() == 0);
    auto other = cache->get(std::size_t{2} << 20);  // another class: a new one
    CHECK(other.get() != first);
    auto third = cache->get(std::size_t{2} << 20);
  }
  // 1 + 2 MiB fit under the 3 MiB capacity; the second 2 MiB buffer was freed.
  CHECK(cache->cached_bytes() == std::size_t{3} << 20);
  // A buffer outlives the cache's last other owner, and frees through it.
  auto kept = cache->get(std::size_t{5} << 20);
  std::weak_ptr<BodyCache> weak = cache;
  cache.reset();
  CHECK_FALSE(weak.expired());
  kept[0] = std::byte{1};
  kept.reset();
  CHECK(weak.expired());
}

TEST_CASE("net tcp: IPv6 loopback") {
  test::Swarm<net::Tcp> swarm;
  auto server = swarm.make();
  auto client = swarm.make();
  server->add_handler("echo", test::echo);
  const auto address = server->listen("[::1]:0");
  CHECK(address.starts_with("[::1]:"));
  CHECK(client->call(address, "echo", Message{nlohmann::json("v6"), {}}, 5s).header == "v6");
  client->close();
  server->close();
}

TEST_CASE("net address parsing") {
  CHECK(net::HostPort::parse("127.0.0.1:1337").port == 1337);
  CHECK(net::HostPort::parse("[::1]:80").host == "::1");
  CHECK(net::HostPort::parse("[::1]:80").str() == "[::1]:80");
  CHECK(net::HostPort::parse("localhost:0").str() == "localhost:0");
  for (const char* bad : {"", "nohost", ":80", "host:", "host:99999", "host:8x", "::1:80", "[::1", "[::1]80"})
    CHECK_THROWS_AS(net::HostPort::parse(bad), Error);
}

// ---- malformed frames sent over a raw socket -------------------------------------------

namespace {

std::vector<std::byte> good_request_bytes(std::uint64_t call_id) {
  net::Frame f{net::FrameKind::request, call_id, "echo", Message{nlohmann::json("ok"), {}}};
  return net::encode_frame(f).flatten();
}

/// Sends `bytes` on a fresh connection, then reads the replies until `want` frames arrived,
/// the server closed the connection (sets `closed`), or `limit` passed.
std::vector<net::Frame> send_raw(const std::string& address, const std::vector<std::byte>& bytes, bool& closed,
                                 std::size_t want, std::chrono::milliseconds limit = 3000ms) {
  // After the handshake (a connection that skips it is refused whatever it sends).
  test::RawClient c(address);
  c.send(bytes);
  // Half-close: a frame cut short is then visibly truncated rather than merely slow.
  c.shutdown_send();
  std::vector<net::Frame> frames;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (frames.size() < want) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    auto f = c.read_frame(left);
    if (!f) break;
    frames.push_back(std::move(*f));
  }
  closed = c.closed() || c.wait_closed(0ms);
  return frames;
}

}  // namespace

TEST_CASE("net tcp: every malformed frame class gets an error or a closed connection, and the peer keeps serving") {
  test::Swarm<net::Tcp> swarm;
  auto server = swarm.make({}, Limits().max_frame_bytes(1u << 20).max_blobs(16));
  server->add_handler("echo", test::echo);
  const auto address = server->listen("127.0.0.1:0");
  auto client = swarm.make();

  const auto good = good_request_bytes(9);
  auto patch32 = [](std::vector<std::byte> b, std::size_t at, std::uint32_t v) {
    std::memcpy(b.data() + at, &v, 4);
    return b;
  };
  struct Case {
    std::string name;
    std::vector<std::byte> bytes;
    bool may_keep_open;  // non-fatal classes answer with an error and keep the connection
  };
  std::vector<Case> cases;
  cases.push_back({"truncated frame", std::vector<std::byte>(good.begin(), good.begin() + 30), false});
  cases.push_back({"oversized length prefix", patch32(good, 0, 0xFFFFFFF0u), false});
  cases.push_back({"length shorter than prefix", patch32(good, 0, 3), false});
  {
    auto b = good;
    b[5] = std::byte{77};
    cases.push_back({"unknown kind", b, true});
  }
  {
    auto b = good;
    b[4] = std::byte{9};
    cases.push_back({"bad version", b, false});
  }
  cases.push_back({"too many blobs", patch32(good, 20, 100000), false});
  cases.push_back({"header longer than frame", patch32(good, 16, 60000), false});
  {
    // Garbage where the MessagePack header should be.
    auto b = good;
    for (std::size_t i = net::prefix_bytes; i < b.size(); ++i) b[i] = std::byte{0xc1};
    cases.push_back({"garbage header", b, true});
  }
  {
    // A blob whose declared length runs past the end of the frame (payload shorter than said).
    net::Frame f{net::FrameKind::request, 5, "echo", Message{nlohmann::json("x"), {}}};
    f.message.add_blob(Buffer::copy_of(std::string_view("12345678")));
    auto b = net::encode_frame(f).flatten();
    std::uint64_t huge = 1u << 19;
    std::memcpy(b.data() + net::prefix_bytes, &huge, 8);
    cases.push_back({"blob overruns frame", b, true});
  }
  {
    // A request whose header lacks the method name.
    net::Frame f{net::FrameKind::response, 6, "", Message{nlohmann::json("x"), {}}};
    auto b = net::encode_frame(f).flatten();
    b[5] = std::byte{1};  // claim it is a request
    cases.push_back({"request without method", b, true});
  }

  for (auto& c : cases) {
    CAPTURE(c.name);
    bool closed = false;
    // Fatal classes must end in a closed connection; others may just answer with an error.
    auto frames = send_raw(address, c.bytes, closed, c.may_keep_open ? 1 : 1000);
    const bool got_error = !frames.empty() && frames[0].kind == net::FrameKind::error;
    CHECK((got_error || closed));
    if (!c.may_keep_open) CHECK(closed);
    // The same peer still answers a good call.
    CHECK(client->call(address, "echo", Message{nlohmann::json("alive"), {}}, 5s).header == "alive");
  }
  // A non-fatal error keeps the connection usable: a good frame after it is answered.
  {
    auto b = good;
    b[5] = std::byte{77};
    b.insert(b.end(), good.begin(), good.end());
    bool closed = false;
    auto frames = send_raw(address, b, closed, 2);
    REQUIRE(frames.size() == 2);
    CHECK(frames[0].kind == net::FrameKind::error);
    CHECK(frames[1].kind == net::FrameKind::response);
    CHECK(frames[1].message.header == "ok");
  }
  client->close();
  server->close();
}

TEST_CASE("net frame: decoder validates before allocating") {
  Limits limits;
  net::Frame f{net::FrameKind::request, 3, "m", Message{nlohmann::json{{"k", 1}}, {}}};
  f.message.add_blob(Buffer::copy_of(std::string_view("abc")));
  f.message.add_blob(Buffer::copy_of(std::string_view("defghijklmn")));
  auto bytes = net::encode_frame(f).flatten();
  CHECK(bytes.size() % 8 == 0);
  auto d = net::decode_frame(Buffer::adopt(bytes), limits);
  CHECK(d.method == "m");
  CHECK(d.call_id == 3);
  CHECK(d.message.header == f.message.header);
  REQUIRE(d.message.blobs.size() == 2);
  CHECK(d.message.blobs[1] == f.message.blobs[1]);
  CHECK(reinterpret_cast<std::uintptr_t>(d.message.blobs[1].data()) % 8 ==
        reinterpret_cast<std::uintptr_t>(d.message.blobs[0].data()) % 8);

  auto expect = [&](std::vector<std::byte> b, errc code, bool fatal) {
    try {
      net::decode_frame(Buffer::adopt(std::move(b)), limits);
      FAIL("decoded a bad frame");
    } catch (const net::FrameError& e) {
      CHECK(e.code() == make_error_code(code));
      CHECK(e.fatal() == fatal);
    }
  };
  expect(std::vector<std::byte>(bytes.begin(), bytes.begin() + 10), errc::bad_frame, true);
  auto b = bytes;
  b.pop_back();
  expect(b, errc::bad_frame, true);  // declared length disagrees with bytes received
  b = bytes;
  std::uint32_t n = 0x7FFFFFFF;
  std::memcpy(b.data(), &n, 4);
  limits.max_frame_bytes(1024);
  expect(b, errc::frame_too_large, true);
  limits = Limits{};
  b = bytes;
  b[5] = std::byte{0};
  expect(b, errc::bad_frame, false);
  b = bytes;
  b[6] = std::byte{1};
  expect(b, errc::bad_frame, true);  // reserved flags
  // Sender-side limits are checked too.
  Message many;
  for (int i = 0; i < 5; ++i) many.add_blob({});
  CHECK_THROWS_AS(net::encode_frame(net::Frame{net::FrameKind::request, 1, "m", many}, Limits().max_blobs(4)), Error);
}

TEST_CASE("net frame: the header is the MessagePack map {h, m}, byte for byte, for every method length") {
  // encode_frame writes the map around the message's header instead of building a new tree;
  // its bytes must be what nlohmann writes for that map, whatever the string length class.
  const nlohmann::json header{{"from", {{"id", "abc"}, {"addr", "127.0.0.1:1"}}}, {"n", {1, 2.5, nullptr}}};
  for (std::size_t length : {0, 1, 31, 32, 255, 256, 65535, 65536}) {
    const std::string method(length, 'x');
    const auto head_of = [](const net::EncodedFrame& e) {
      std::uint32_t header_length = 0;
      std::memcpy(&header_length, e.head.data() + 16, 4);
      const auto* p = reinterpret_cast<const std::uint8_t*>(e.head.data()) + net::prefix_bytes;
      return std::vector<std::uint8_t>(p, p + header_length);
    };
    const auto request = net::encode_frame(net::Frame{net::FrameKind::request, 7, method, Message{header, {}}});
    CHECK(head_of(request) == nlohmann::json::to_msgpack(nlohmann::json{{"m", method}, {"h", header}}));
    const auto response = net::encode_frame(net::Frame{net::FrameKind::response, 7, {}, Message{header, {}}});
    CHECK(head_of(response) == nlohmann::json::to_msgpack(nlohmann::json{{"h", header}}));
    if (length <= Limits{}.max_method_bytes()) {
      const auto d = net::decode_frame(Buffer::adopt(request.flatten()), Limits{});
      CHECK(d.method == method);
      CHECK(d.message.header == header);
    }
  }
  // A message without a header travels as nil, as before.
  const auto bare = net::encode_frame(net::Frame{net::FrameKind::response, 1, {}, Message{}});
  CHECK(net::decode_frame(Buffer::adopt(bare.flatten()), Limits{}).message.header.is_null());
}

TEST_CASE("net simulated: latency, loss, partitions and crashes") {
  net::Runtime runtime{1};
  auto network = net::SimNetwork::create(
      runtime.executor(), net::SimNetwork::Options().min_latency(0.01s).max_latency(0.02s).seed(7));
  auto make = [&] {
    return net::Rpc<net::Simulated>::create(runtime.executor(), net::Simulated::Options().network(network));
  };
  auto a = make(), b = make(), c = make();
  for (auto& p : {a, b, c}) p->add_handler("echo", test::echo);
  const auto addr_b = b->listen("0.0.0.0:0");
  const auto addr_c = c->listen("0.0.0.0:0");
  CHECK(addr_b.starts_with("sim-"));

  // One call over a fresh connection takes at least the handshake and the request round trip.
  auto t0 = std::chrono::steady_clock::now();
  a->call(addr_b, "echo", Message{}, 5s);
  CHECK(std::chrono::steady_clock::now() - t0 >= 40ms);
  t0 = std::chrono::steady_clock::now();
  a->call(addr_b, "echo", Message{}, 5s);
  CHECK(std::chrono::steady_clock::now() - t0 >= 20ms);

  // A partition makes calls across it time out; healing restores them.
  network->partition({net::HostPort::parse(addr_b).host});
  CHECK(call_error([&] { a->call(addr_b, "echo", Message{}, 0.3s); }) == make_error_code(errc::timeout));
  CHECK(a->call(addr_c, "echo", Message{nlohmann::json(1), {}}, 5s).header == 1);
  network->heal();
  CHECK(a->call(addr_b, "echo", Message{nlohmann::json(2), {}}, 5s).header == 2);

  // A crash breaks connections at once and refuses new ones.
  network->crash(net::HostPort::parse(addr_c).host);
  auto code = call_error([&] { a->call(addr_c, "echo", Message{}, 5s); });
  CHECK((code == make_error_code(errc::connection_closed) || code == make_error_code(errc::connection_refused)));
  CHECK(network->is_dead(net::HostPort::parse(addr_c).host));
  CHECK(network->stats().frames_delivered > 0);
  for (auto& p : {a, b, c}) p->close();
}

TEST_CASE("net simulated: frames of a connection arrive in order with several io threads") {
  // A new connection's hive.auth and first request leave back to back; with fixed latency
  // their delivery timers fall due together, and with several io threads their handlers used
  // to race: the request could arrive first and the callee refused the handshake.
  net::Runtime runtime{4};
  auto network = net::SimNetwork::create(
      runtime.executor(),
      net::SimNetwork::Options().latency(net::LatencyDistribution::fixed).mean_latency(Seconds(0.001)).seed(3));
  auto server = net::Rpc<net::Simulated>::create(runtime.executor(), net::Simulated::Options().network(network));
  server->add_handler("echo", test::echo);
  const auto address = server->listen("0.0.0.0:0");
  std::vector<std::shared_ptr<net::Rpc<net::Simulated>>> callers;
  std::vector<std::future<Message>> calls;
  for (int i = 0; i < 200; ++i) {
    callers.push_back(net::Rpc<net::Simulated>::create(runtime.executor(), net::Simulated::Options().network(network)));
    calls.push_back(asio::co_spawn(callers.back()->get_executor(),
                                   callers.back()->co_call(address, "echo", Message{nlohmann::json(i), {}}, Seconds(10)),
                                   asio::use_future));
  }
  int answered = 0;
  for (int i = 0; i < 200; ++i) {
    try {
      answered += calls[static_cast<std::size_t>(i)].get().header == i ? 1 : 0;
    } catch (const std::exception& e) {
      MESSAGE("call ", i, ": ", e.what());
    }
  }
  CHECK(answered == 200);
  for (auto& c : callers) c->close();
  server->close();
}

TEST_CASE("net simulated: message loss is seeded and costs timeouts, not hangs") {
  net::Runtime runtime{1};
  auto network = net::SimNetwork::create(runtime.executor(), net::SimNetwork::Options().loss(0.3).seed(1));
  auto a = net::Rpc<net::Simulated>::create(runtime.executor(), net::Simulated::Options().network(network));
  auto b = net::Rpc<net::Simulated>::create(runtime.executor(), net::Simulated::Options().network(network));
  b->add_handler("echo", test::echo);
  const auto addr = b->listen("0.0.0.0:0");
  int ok = 0, timeouts = 0;
  std::vector<std::future<Message>> calls;
  for (int i = 0; i < 200; ++i) calls.push_back(a->async_call(addr, "echo", Message{}, 0.5s, asio::use_future));
  for (auto& f : calls) {
    auto code = call_error([&] { f.get(); });
    if (!code) ++ok;
    else if (code == make_error_code(errc::timeout)) ++timeouts;
  }
  CHECK(ok + timeouts == 200);
  CHECK(ok > 60);        // ~0.7^2 of round trips survive
  CHECK(timeouts > 40);  // and the rest time out
  CHECK(network->stats().frames_lost > 0);
  a->close();
  b->close();
}

TEST_CASE("net transport concept rejects a type lacking members") {
  struct NotATransport {
    struct Options {};
  };
  static_assert(!net::Transport<NotATransport>);
  static_assert(net::Transport<net::Tcp>);
  static_assert(net::Transport<net::Simulated>);
  CHECK(true);
}

// ---- a peer process killed for real -------------------------------------------------------

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

TEST_CASE("net tcp: a server process killed mid-call gives the caller an error, not a hang") {
  int to_child[2], from_child[2];
  REQUIRE(pipe(to_child) == 0);
  REQUIRE(pipe(from_child) == 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, to_child[0], 0);
  posix_spawn_file_actions_adddup2(&actions, from_child[1], 1);
  posix_spawn_file_actions_addclose(&actions, to_child[1]);
  posix_spawn_file_actions_addclose(&actions, from_child[0]);
  std::vector<std::string> env_storage;
  for (char** e = environ; *e; ++e) env_storage.emplace_back(*e);
  env_storage.emplace_back("HIVE_TEST_CHILD=serve");
  std::vector<char*> envp;
  for (auto& s : env_storage) envp.push_back(s.data());
  envp.push_back(nullptr);
  char exe[] = "/proc/self/exe";
  char* child_argv[] = {exe, nullptr};
  pid_t pid = 0;
  REQUIRE(posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, child_argv, envp.data()) == 0);
  posix_spawn_file_actions_destroy(&actions);
  close(to_child[0]);
  close(from_child[1]);

  // Read the child's address line (bounded: the child prints it at start).
  std::string address;
  char c;
  while (address.size() < 100 && read(from_child[0], &c, 1) == 1 && c != '\n') address += c;
  REQUIRE(address.starts_with("127.0.0.1:"));

  test::Swarm<net::Tcp> swarm;
  auto client = swarm.make();
  CHECK(client->call(address, "echo", Message{nlohmann::json("hi"), {}}, 5s).header == "hi");
  auto pending = client->async_call(address, "hang", Message{}, 60s, asio::use_future);
  // The call is in flight once the child has answered an echo sent after it on the same connection.
  CHECK(client->call(address, "echo", Message{nlohmann::json(2), {}}, 5s).header == 2);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(kill(pid, SIGKILL) == 0);
  REQUIRE(pending.wait_for(10s) == std::future_status::ready);
  CHECK(call_error([&] { pending.get(); }) == make_error_code(errc::connection_closed));
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFSIGNALED(status));
  close(to_child[1]);
  close(from_child[0]);
  client->close();
}
