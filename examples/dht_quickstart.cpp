// The quickstart of docs/dht.md: two peers, a value and a dictionary.
#include <hive/dht/dht.hpp>

int main() {
  hive::DHT first;                                           // a new swarm, listening on a free port
  auto join = first.visible_addresses();                     // e.g. {"127.0.0.1:40123"}
  hive::DHT second(hive::DHTOptions().initial_peers(join));  // joins through the first peer

  const double expiration = hive::wall_time() + 60;          // absolute time, seconds since the epoch
  second.store("answer", 42, expiration);                    // any JSON value
  auto got = first.get("answer");                            // std::optional<hive::DHTRecord>
  fmt::print("{}\n", got->value->value.dump());              // 42

  // Dictionary values: subkeys expire independently.
  second.store("team", "alice", expiration, hive::dht::Subkey(std::string("lead")));
  first.store("team", "bob", expiration, hive::dht::Subkey(std::int64_t{7}));
  auto team = first.get("team", /*latest=*/true);            // team->dictionary has both entries
}
