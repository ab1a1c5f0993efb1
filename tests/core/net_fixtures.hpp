#pragma once
// Shared fixtures for the network tests: one body runs over Tcp and Simulated.

#include "../common/wait.hpp"

#include <hive/net/rpc.hpp>
#include <hive/net/runtime.hpp>
#include <hive/net/simulated.hpp>
#include <hive/net/tcp.hpp>

#include <chrono>
#include <functional>
#include <thread>

namespace hive::test {

/// Peers of one transport kind, on a shared runtime.
template <class T>
struct Swarm;

template <>
struct Swarm<net::Tcp> {
  net::Runtime runtime{2};
  std::shared_ptr<net::Rpc<net::Tcp>> make(net::RpcOptions options = {}, Limits limits = {}) {
    return net::Rpc<net::Tcp>::create(runtime.executor(), net::Tcp::Options().limits(limits), options);
  }
  static constexpr const char* any_address = "127.0.0.1:0";
};

template <>
struct Swarm<net::Simulated> {
  net::Runtime runtime{1};
  std::shared_ptr<net::SimNetwork> network =
      net::SimNetwork::create(runtime.executor(), net::SimNetwork::Options().seed(42));
  std::shared_ptr<net::Rpc<net::Simulated>> make(net::RpcOptions options = {}, Limits limits = {}) {
    return net::Rpc<net::Simulated>::create(runtime.executor(),
                                            net::Simulated::Options().network(network).limits(limits), options);
  }
  static constexpr const char* any_address = "127.0.0.1:0";
};

/// An echo handler: returns the request unchanged.
inline asio::awaitable<Message> echo(net::CallContext ctx, Message m) {
  (void)ctx;
  co_return m;
}

}  // namespace hive::test
