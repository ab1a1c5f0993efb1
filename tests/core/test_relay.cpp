// Relays and reachability checks of the RPC layer, over Tcp (loopback) and Simulated: a peer
// that listens nowhere reserves at a relay and is called at its relayed address; the relay's
// bounds; a target that goes away; dial-backs. The NAT itself is in tests/multihost.
#include "../common/error_of.hpp"
#include "net_fixtures.hpp"

#include <doctest/doctest.h>

using namespace hive;
using namespace std::chrono_literals;

namespace {

template <class F>
errc error_code_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return static_cast<errc>(e.code().value());
  }
  return errc{};
}

}  // namespace

TEST_CASE_TEMPLATE("net relay: a peer that listens nowhere is called through its relay, blobs and errors intact", T,
                   net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto relay = swarm.make();
  const auto relay_address = relay->listen(swarm.any_address);
  auto hidden = swarm.make();  // never listens: reachable only through the relay
  net::CallContext seen;
  hidden->add_handler("echo", [&](net::CallContext ctx, Message m) -> asio::awaitable<Message> {
    seen = ctx;
    co_return m;
  });
  hidden->add_handler("fail", [](net::CallContext, Message) -> asio::awaitable<Message> {
    throw Error(errc::invalid_argument, "no such thing");
    co_return Message{};
  });
  auto reservation = asio::co_spawn(swarm.runtime.executor(), hidden->co_reserve(relay_address), asio::use_future).get();
  CHECK(reservation.relay == relay_address);
  CHECK(reservation.address == relay_address + "/relay/" + hidden->peer_id());
  CHECK(reservation.ttl > Seconds(0));
  CHECK(relay->relay_reservations() == 1);

  auto caller = swarm.make();
  Message request{nlohmann::json{{"n", 7}}, {}};
  request.add_blob(Buffer::copy_of(std::string(100000, 'x')));
  auto reply = caller->call(reservation.address, "echo", request, Seconds(10));
  CHECK(reply.header["n"] == 7);
  REQUIRE(reply.blobs.size() == 1);
  CHECK(reply.blobs[0].size() == 100000);
  CHECK(seen.relay == relay_address);
  CHECK(seen.method == "echo");
  CHECK_FALSE(seen.remote_address.empty());
  CHECK(relay->relayed_calls() == 1);

  // The callee's own errors reach the caller as a direct call's would.
  auto direct_peer = swarm.make();
  const auto direct_address = direct_peer->listen(swarm.any_address);
  const auto relayed_unknown = test::error_of([&] { caller->call(reservation.address, "nope", Message{}, Seconds(10)); });
  const auto direct_unknown = test::error_of([&] { caller->call(direct_address, "nope", Message{}, Seconds(10)); });
  CHECK(relayed_unknown == direct_unknown);
  CHECK(error_code_of([&] { caller->call(reservation.address, "nope", Message{}, Seconds(10)); }) == errc::unknown_method);
  CHECK(error_code_of([&] { caller->call(reservation.address, "fail", Message{}, Seconds(10)); }) == errc::invalid_argument);
  CHECK(test::error_of([&] { caller->call(reservation.address, "fail", Message{}, Seconds(10)); }).find("no such thing") !=
        std::string::npos);
  // A malformed relayed address is a clear error before anything is sent.
  CHECK(error_code_of([&] { caller->call(relay_address + "/relay/", "echo", Message{}, Seconds(10)); }) == errc::bad_address);
  CHECK(error_code_of([&] { caller->call("nowhere/relay/abc", "echo", Message{}, Seconds(10)); }) == errc::bad_address);

  // The reservation keeps its connection open: it is not an idle one.
  CHECK(asio::co_spawn(swarm.runtime.executor(), hidden->co_connected(relay_address), asio::use_future).get());
  for (auto& p : {relay, hidden, caller, direct_peer}) p->close();
}

TEST_CASE_TEMPLATE("net relay: bounded reservations and calls, no takeover of a held peer id, reserved method names", T,
                   net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto relay = swarm.make(net::RpcOptions().max_relay_reservations(1).max_relayed_calls(1));
  const auto relay_address = relay->listen(swarm.any_address);
  auto first = swarm.make();
  auto second = swarm.make();
  auto reserve = [&](auto& peer) {
    return asio::co_spawn(swarm.runtime.executor(), peer->co_reserve(relay_address), asio::use_future).get();
  };
  const auto reservation = reserve(first);
  // Renewing is fine; a second peer beyond the limit is refused with a clear error.
  CHECK(reserve(first).address == reservation.address);
  const auto full = test::error_of([&] { reserve(second); });
  CHECK(full.find("max_relay_reservations") != std::string::npos);
  CHECK(error_code_of([&] { reserve(second); }) == errc::limit_exceeded);

  // Another connection cannot take over the id that the first peer holds.
  auto intruder = swarm.make();
  const auto taken = [&] {
    intruder->call(relay_address, "relay.reserve", Message{nlohmann::json{{"peer", first->peer_id()}}, {}}, Seconds(10));
  };
  CHECK(error_code_of(taken) == errc::invalid_argument);
  // The relay knows who the intruder is from its handshake: an id it did not prove is refused.
  CHECK(test::error_of(taken).find("proved peer id") != std::string::npos);
  // Nor can anyone hand a peer calls as if a relay sent them.
  auto server = swarm.make();
  const auto server_address = server->listen(swarm.any_address);
  CHECK(error_code_of([&] {
          intruder->call(server_address, "relay.deliver",
                         Message{nlohmann::json{{"from", "1.2.3.4:5"}, {"method", "x"}, {"header", nullptr}}, {}}, Seconds(10));
        }) == errc::invalid_argument);
  // relay.* and nat.* are the RPC layer's own names.
  CHECK_THROWS_AS(server->add_handler("relay.echo", test::echo), InvalidArgument);
  CHECK_THROWS_AS(server->add_handler("nat.echo", test::echo), InvalidArgument);

  // One relayed call at a time: a second while the first is held is refused.
  hive::detail::Event release;
  first->add_handler("hold", [&](net::CallContext, Message m) -> asio::awaitable<Message> {
    co_await release.wait(deadline_after(Seconds(20)));
    co_return m;
  });
  auto caller = swarm.make();
  auto held = caller->async_call(reservation.address, "hold", Message{}, Seconds(30), asio::use_future);
  REQUIRE(test::wait_for([&] { return relay->relayed_calls() >= 1; }));
  CHECK(error_code_of([&] { caller->call(reservation.address, "hold", Message{}, Seconds(10)); }) == errc::limit_exceeded);
  asio::post(first->get_executor(), [&] { release.set(); });
  CHECK_NOTHROW(held.get());
  for (auto& p : {relay, first, second, intruder, server, caller}) p->close();
}

TEST_CASE_TEMPLATE("net relay: relayed frames obey the relay's limits, and a target that is gone costs an error, not a hang", T,
                   net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto relay = swarm.make(net::RpcOptions(), Limits().max_frame_bytes(64 * 1024));
  const auto relay_address = relay->listen(swarm.any_address);
  auto hidden = swarm.make();
  hidden->add_handler("echo", test::echo);
  hive::detail::Event never;
  hidden->add_handler("stall", [&](net::CallContext, Message m) -> asio::awaitable<Message> {
    co_await never.wait(deadline_after(Seconds(60)));
    co_return m;
  });
  const auto address = asio::co_spawn(swarm.runtime.executor(), hidden->co_reserve(relay_address), asio::use_future).get().address;
  auto caller = swarm.make();
  // A frame over the relay's limit does not pass, whatever the target would accept.
  Message big{nlohmann::json::object(), {}};
  big.add_blob(Buffer::copy_of(std::string(200 * 1024, 'x')));
  CHECK_THROWS(caller->call(address, "echo", big, Seconds(10)));
  CHECK(caller->call(address, "echo", Message{nlohmann::json{{"ok", 1}}, {}}, Seconds(10)).header["ok"] == 1);

  // The target dies while a call waits on it: the caller gets an error well within its timeout.
  auto stalled = caller->async_call(address, "stall", Message{}, Seconds(30), asio::use_future);
  REQUIRE(test::wait_for([&] { return relay->relayed_calls() >= 2; }));
  const auto t0 = std::chrono::steady_clock::now();
  hidden->close();
  CHECK_THROWS_AS(stalled.get(), Error);
  CHECK(std::chrono::steady_clock::now() - t0 < 20s);
  // Later calls are refused at once: nobody holds that reservation any more.
  CHECK(test::wait_for([&] { return relay->relay_reservations() == 0; }));
  const auto gone = [&] { caller->call(address, "echo", Message{}, Seconds(10)); };
  CHECK(error_code_of(gone) == errc::connection_refused);
  CHECK(test::error_of(gone).find("holds no reservation") != std::string::npos);
  // A peer that does not relay says so.
  auto plain = swarm.make(net::RpcOptions().relay(false));
  const auto plain_address = plain->listen(swarm.any_address);
  auto other = swarm.make();
  CHECK(error_code_of([&] {
          asio::co_spawn(swarm.runtime.executor(), other->co_reserve(plain_address), asio::use_future).get();
        }) == errc::unknown_method);
  for (auto& p : {relay, caller, plain, other}) p->close();
}

TEST_CASE_TEMPLATE("net reachability: a dial-back finds a listening peer, and not a port where it does not listen", T,
                   net::Tcp, net::Simulated) {
  test::Swarm<T> swarm;
  auto helper = swarm.make();
  const auto helper_address = helper->listen(swarm.any_address);
  auto asker = swarm.make();
  const auto asker_port = net::HostPort::parse(asker->listen(swarm.any_address)).port;
  auto check = [&](std::uint16_t port) {
    return asio::co_spawn(swarm.runtime.executor(), asker->co_check_reachable(helper_address, port), asio::use_future).get();
  };
  const auto yes = check(asker_port);
  CHECK(yes.reachable);
  CHECK(yes.error.empty());
  CHECK(net::HostPort::parse(yes.address).port == asker_port);
  // Nobody listens there (a simulated host numbers its ports from 1, so the asker's next one).
  auto bystander = swarm.make();
  const auto bystander_port = net::HostPort::parse(bystander->listen(swarm.any_address)).port;
  bystander->close();
  const auto no = check(std::is_same_v<T, net::Tcp> ? bystander_port : static_cast<std::uint16_t>(asker_port + 1));
  CHECK_FALSE(no.reachable);
  CHECK_FALSE(no.error.empty());
  auto other = swarm.make();
  if constexpr (std::is_same_v<T, net::Tcp>) {
    // Someone else listens there (loopback is one host for all): not this peer.
    const auto other_port = net::HostPort::parse(other->listen(swarm.any_address)).port;
    const auto impostor = check(other_port);
    CHECK_FALSE(impostor.reachable);
    CHECK(impostor.error.find("another peer") != std::string::npos);
  }
  // Malformed requests get an error reply.
  CHECK(error_code_of([&] { asker->call(helper_address, "nat.dial_back", Message{nlohmann::json{{"port", 0}}, {}}, Seconds(10)); }) ==
        errc::bad_header);
  for (auto& p : {helper, asker, other}) p->close();
}
