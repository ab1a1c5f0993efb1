#pragma once
// Bounded waits on state that offers no event to wait on.

#include <chrono>
#include <functional>
#include <thread>

namespace hive::test {

/// Polls `cond` until it holds or `timeout` passes; returns its last value. Only for state
/// inside another peer that offers no event to wait on (what a peer holds after a background
/// hand-over or cache refresh); anything the test can be signalled about waits on a signal.
inline bool wait_for(const std::function<bool()>& cond, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() >= deadline) return cond();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // ok-sleep: poll interval of a bounded wait on a remote peer's state
  }
  return true;
}

}  // namespace hive::test
