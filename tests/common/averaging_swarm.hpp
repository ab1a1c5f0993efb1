#pragma once
// Averaging tests' swarm on loopback and their averager options: short timeouts, so that a
// round with a dead member ends within seconds.

#include "wait.hpp"

#include <hive/averaging/averager.hpp>
#include <hive/dht/dht.hpp>

#include <asio/co_spawn.hpp>
#include <asio/use_future.hpp>

#include <memory>
#include <string>
#include <vector>

namespace hive::test {

/// `n` DHT peers on loopback: the first starts the swarm, the others join through it. Returns
/// once every peer's routing table holds the n - 1 others (or after 10 s): a peer adds a
/// newcomer only after pinging it back, and a test that starts while a table is still missing
/// peers can see a swarm split in two (a peer that trains alone, every round "no other peer").
inline std::vector<std::unique_ptr<DHT>> swarm(std::size_t n) {
  std::vector<std::unique_ptr<DHT>> peers;
  peers.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0")));
  const auto first = peers[0]->visible_addresses();
  for (std::size_t i = 1; i < n; ++i)
    peers.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0").initial_peers(first)));
  (void)wait_for([&] {
    for (const auto& p : peers)
      if (asio::co_spawn(p->executor(), p->node()->routing_table_size(), asio::use_future).get() + 1 < n) return false;
    return true;
  });
  return peers;
}

/// Averager options under `prefix` for groups of `group`, with the tests' short timeouts.
inline averaging::AveragerOptions fast(std::string prefix, std::size_t group) {
  return averaging::AveragerOptions()
      .prefix(std::move(prefix))
      .target_group_size(group)
      .matchmaking_time(Seconds(3))
      .request_timeout(Seconds(2))
      .sender_timeout(Seconds(1))
      .reducer_timeout(Seconds(5))
      .allreduce_timeout(Seconds(20));
}

}  // namespace hive::test
