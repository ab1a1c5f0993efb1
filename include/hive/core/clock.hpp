#pragma once
/// @file
/// Clocks: a monotonic clock for timeouts and a wall clock for expiration times shared
/// between peers.

#include <chrono>

namespace hive {

/// The monotonic clock behind every timeout and deadline.
using SteadyClock = std::chrono::steady_clock;

/// A point on the monotonic clock.
using Deadline = SteadyClock::time_point;

/// Seconds since the Unix epoch as a double: the time base of DHT expiration times.
///
/// Records carry absolute expiration times so that every peer can judge them; peers are
/// expected to keep their clocks roughly in sync (NTP), as in hivemind's get_dht_time().
inline double wall_time() noexcept {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

/// The deadline `timeout` from now; a non-positive timeout means "already expired".
template <class Rep, class Period>
Deadline deadline_after(std::chrono::duration<Rep, Period> timeout) noexcept {
  return SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(timeout);
}

}  // namespace hive
