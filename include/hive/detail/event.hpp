#pragma once
/// @file
/// Event: a one-shot signal that coroutines on one strand wait for with a deadline.

#include <hive/core/clock.hpp>
#include <hive/detail/asio_compat.hpp>

#include <algorithm>
#include <memory>
#include <vector>

namespace hive::detail {

/// Timers of the coroutines waiting on an Event or a Notifier. Shared with each waiter so that
/// either side may be destroyed first (at shutdown, coroutine frames are destroyed unresumed).
class WaiterList {
 public:
  /// Cancels every registered timer and forgets them.
  void wake_all() {
    for (auto* t : *timers_) t->cancel();
    timers_->clear();
  }
  /// Waits on a fresh timer expiring at `deadline`; returns true when woken by wake_all().
  awaitable<bool> wait(Deadline deadline) {
    asio::steady_timer timer(co_await asio::this_coro::executor, deadline);
    struct Registration {
      std::shared_ptr<std::vector<asio::steady_timer*>> timers;
      asio::steady_timer* timer;
      ~Registration() { std::erase(*timers, timer); }
    } registration{timers_, &timer};
    timers_->push_back(&timer);
    auto [ec] = co_await timer.async_wait(as_tuple_awaitable);
    co_return ec == asio::error::operation_aborted;
  }

 private:
  std::shared_ptr<std::vector<asio::steady_timer*>> timers_ = std::make_shared<std::vector<asio::steady_timer*>>();
};

/// A one-shot, strand-confined signal. `wait` returns true once `set` was called, or false when
/// the deadline passed first. Not thread-safe: every call must run on the same strand.
class Event {
 public:
  /// Wakes every waiter; later waits return at once.
  void set() {
    set_ = true;
    waiters_.wake_all();
  }
  /// True once set() was called.
  [[nodiscard]] bool is_set() const noexcept { return set_; }

  /// Waits until set() or `deadline`; returns is_set().
  awaitable<bool> wait(Deadline deadline) {
    if (set_) co_return true;
    co_await waiters_.wait(deadline);
    co_return set_;
  }

 private:
  WaiterList waiters_;
  bool set_ = false;
};

/// A strand-confined condition: coroutines wait until notified or a deadline passes. Waiters
/// re-check their condition after waking, as with a condition variable.
class Notifier {
 public:
  /// Wakes every current waiter.
  void notify_all() { waiters_.wake_all(); }
  /// Waits for the next notify_all() or `deadline`; returns false when the deadline passed.
  awaitable<bool> wait(Deadline deadline) { return waiters_.wait(deadline); }

 private:
  WaiterList waiters_;
};

}  // namespace hive::detail
