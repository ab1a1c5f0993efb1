#pragma once
// Models built from a seed in threads that build theirs at once (the peers of an in-process
// swarm): seeding torch's global generator and drawing the weights must be one step, or a peer
// gets weights drawn partly after another peer's seed.

#include <ATen/Context.h>

#include <cstdint>
#include <mutex>

namespace hive::examples {

/// `make()` with torch's global generator seeded by `seed`, under a lock shared by every caller,
/// so the same seed gives the same weights whichever threads build models meanwhile.
template <class F>
auto seeded(std::uint64_t seed, F&& make) {
  static std::mutex generator;
  std::lock_guard lock(generator);
  at::manual_seed(seed);
  return make();
}

}  // namespace hive::examples
