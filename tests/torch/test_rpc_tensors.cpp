// Tensors over the RPC layer, on both transports.
#include "../core/net_fixtures.hpp"

#include <hive/core/tensor_codec.hpp>

#include <ATen/ATen.h>

#include <doctest/doctest.h>

using namespace hive;
using namespace std::chrono_literals;

TEST_CASE_TEMPLATE("rpc tensors: round trip with every compression, and a bad descriptor is a remote error", T,
                   net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto server = swarm.make();
  auto client = swarm.make();
  server->add_handler("double", [](net::CallContext, Message m) -> asio::awaitable<Message> {
    auto ts = get_tensors(m);
    Message reply;
    std::vector<at::Tensor> doubled;
    for (auto& t : ts) doubled.push_back(t * 2);
    add_tensors(reply, doubled);
    co_return reply;
  });
  const auto address = server->listen(swarm.any_address);

  auto x = at::randn({64, 33});
  auto y = at::randn({3, 4, 5}).transpose(0, 2);  // non-contiguous
  for (auto c : {Compression::none, Compression::float16, Compression::uniform8, Compression::quantile8}) {
    CAPTURE(to_string(c));
    Message request;
    add_tensors(request, {x, y}, c);
    auto out = get_tensors(client->call(address, "double", request, 10s));
    REQUIRE(out.size() == 2);
    CHECK(out[0].sizes() == x.sizes());
    CHECK(out[1].sizes() == y.sizes());
    if (c == Compression::none) {
      CHECK(at::equal(out[0], x * 2));
      CHECK(at::equal(out[1], y * 2));
    } else {
      CHECK(at::allclose(out[0], x * 2, /*rtol=*/0.05, /*atol=*/0.1));
    }
  }

  // A descriptor whose shape disagrees with its payload fails in the handler, not the server.
  Message bad;
  add_tensors(bad, {x});
  bad.header["tensors"][0]["shape"] = nlohmann::json::array({64, 34});
  try {
    client->call(address, "double", bad, 10s);
    FAIL("bad tensor accepted");
  } catch (const RemoteError& e) {
    CHECK(e.code() == make_error_code(errc::bad_tensor));
  }
  Message good;
  add_tensors(good, {x});
  CHECK(at::equal(get_tensors(client->call(address, "double", good, 10s)).at(0), x * 2));
  client->close();
  server->close();
}
