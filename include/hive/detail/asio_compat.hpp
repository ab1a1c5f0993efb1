#pragma once
/// @file
/// The one place that knows which Asio names live in `experimental` in Asio 1.22.

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/dispatch.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <exception>
#include <future>

namespace hive::detail {

/// A coroutine's result type on the library's executors.
template <class T = void>
using awaitable = asio::awaitable<T>;

/// Completion token that turns errors into tuples instead of exceptions.
inline constexpr auto as_tuple_awaitable = asio::experimental::as_tuple(asio::use_awaitable);

using namespace asio::experimental::awaitable_operators;  // NOLINT: `||` and `&&` on awaitables

/// Runs `f` on `strand` and waits for it, rethrowing what it throws; runs it inline when
/// already on the strand. Must not be called from a thread that the strand's context needs.
template <class Strand, class F>
void run_blocking_on(const Strand& strand, F&& f) {
  if (strand.running_in_this_thread()) {
    f();
    return;
  }
  std::promise<void> done;
  asio::dispatch(strand, [&] {
    try {
      f();
      done.set_value();
    } catch (...) {
      done.set_exception(std::current_exception());
    }
  });
  done.get_future().get();
}

}  // namespace hive::detail
