#pragma once
// Averaging tests' swarm on loopback and their averager options: short timeouts, so that a
// round with a dead member ends within seconds.

#include <hive/averaging/averager.hpp>
#include <hive/dht/dht.hpp>

#include <memory>
#include <string>
#include <vector>

namespace hive::test {

/// `n` DHT peers on loopback: the first starts the swarm, the others join through it.
inline std::vector<std::unique_ptr<DHT>> swarm(std::size_t n) {
  std::vector<std::unique_ptr<DHT>> peers;
  peers.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0")));
  const auto first = peers[0]->visible_addresses();
  for (std::size_t i = 1; i < n; ++i)
    peers.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0").initial_peers(first)));
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
