#pragma once
/// @file
/// The moe::Scheduler concept and its default model PriorityBatcher: task pools that merge the
/// rows of many requests into batches and run them on compute threads of their own.

#include <hive/fwd.hpp>
#include <hive/core/clock.hpp>
#include <hive/core/log.hpp>
#include <hive/core/options.hpp>

#include <ATen/ATen.h>

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>

#include <algorithm>
#include <concepts>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace hive::moe {

/// The computation behind a pool: a batch of inputs (tensors sharing dimension 0) in, the
/// outputs of every row out (same leading dimension).
using PoolFunction = std::function<std::vector<at::Tensor>(std::vector<at::Tensor>)>;
/// Receives a task's outputs, or the exception that its batch raised.
using TaskCallback = std::function<void(std::exception_ptr, std::vector<at::Tensor>)>;

/// Counters of one pool since the scheduler started.
struct PoolStats {
  /// The pool's name ("expert.3/forward").
  std::string name;
  /// Batches run (counted when a batch starts, before its tasks get their results).
  std::uint64_t batches = 0;
  /// Rows processed (the sum of batch sizes).
  std::uint64_t rows = 0;
  /// Largest batch run, in rows.
  std::uint64_t max_batch_rows = 0;
  /// Tasks waiting now.
  std::size_t queued_tasks = 0;
  /// Rows waiting now.
  std::uint64_t queued_rows = 0;
};

/// What a server needs from a batching scheduler.
///
/// A scheduler owns pools, one per (expert, forward/backward); submit() queues a task (the
/// tensors of one request) and calls its callback from a compute thread with the task's own
/// rows of the batch result. start() launches the compute threads; stop() joins them and
/// fails the tasks still queued with hive::Error(errc::shutdown). max_batch_size() is the most
/// rows one request may carry. See docs/concepts/scheduler.md.
template <class S>
concept Scheduler = requires(S& s, const S& cs, const typename S::Options& options, PoolFunction f,
                             std::vector<at::Tensor> inputs, TaskCallback done, std::size_t pool) {
  typename S::Options;
  requires std::constructible_from<S, const typename S::Options&>;
  { s.add_pool(std::string{}, std::move(f)) } -> std::same_as<std::size_t>;
  { s.submit(pool, std::move(inputs), std::move(done)) };
  { s.start() };
  { s.stop() };
  { cs.stats() } -> std::same_as<std::vector<PoolStats>>;
  { cs.max_batch_size() } -> std::convertible_to<std::size_t>;
};

/// Run-time knobs of PriorityBatcher.
struct BatcherOptions {
  /// Most rows in one batch; 0 uses the policy's compile-time default. A single request with
  /// more rows is refused with errc::limit_exceeded.
  HIVE_ARG(std::size_t, max_batch_size, 0);
  /// A pool with fewer rows queued waits up to max_wait for more before running anyway.
  HIVE_ARG(std::size_t, min_batch_size, 1);
  /// Longest a task waits for a pool to fill up to min_batch_size.
  HIVE_ARG(Seconds, max_wait, Seconds(0.005));
  /// Threads running batches (torch also parallelizes inside each operation).
  HIVE_ARG(int, compute_threads, 1);
  /// Tasks queued across all pools before submit() refuses more with errc::limit_exceeded.
  HIVE_ARG(std::size_t, max_queued_tasks, 65536);
  /// Log per-pool batches/s, mean batch size and queue depth this often; 0 disables.
  HIVE_ARG(Seconds, stats_report_interval, Seconds(0));
  HIVE_OPTIONS_JSON(BatcherOptions, max_batch_size, min_batch_size, max_wait, compute_threads, max_queued_tasks,
                    stats_report_interval)
};

/// The default scheduler: per-pool queues; whenever a compute thread is free it runs the pool
/// whose oldest task has waited longest among the pools that are ready (min_batch_size rows
/// queued, or max_wait elapsed), merging its queued tasks into one batch of at most
/// max_batch_size rows.
///
/// @tparam MaxBatchSize the batch size cap used when the options leave max_batch_size at 0.
/// @par Thread safety
/// add_pool() before start(); submit() and stats() from any thread; stop() is idempotent and
/// must not run on a compute thread.
template <std::size_t MaxBatchSize>
class PriorityBatcher {
 public:
  /// Run-time knobs.
  using Options = BatcherOptions;

  /// A stopped scheduler; call add_pool() then start().
  explicit PriorityBatcher(const Options& options = {}) : options_(options) {
    if (options_.max_batch_size() == 0) options_.max_batch_size(MaxBatchSize);
    HIVE_CHECK(options_.min_batch_size() >= 1 && options_.min_batch_size() <= options_.max_batch_size(),
               "min_batch_size must be in [1, max_batch_size={}], got {}", options_.max_batch_size(),
               options_.min_batch_size());
    HIVE_CHECK(options_.compute_threads() >= 1, "compute_threads must be at least 1, got {}", options_.compute_threads());
  }
  PriorityBatcher(const PriorityBatcher&) = delete;
  PriorityBatcher& operator=(const PriorityBatcher&) = delete;
  /// Stops and joins the compute threads.
  ~PriorityBatcher() { stop(); }

  /// The options in effect (max_batch_size resolved).
  [[nodiscard]] const Options& options() const noexcept { return options_; }
  /// The most rows one request may carry (the server advertises it in moe.info).
  [[nodiscard]] std::size_t max_batch_size() const noexcept { return options_.max_batch_size(); }

  /// Adds a pool running `f`; returns its index for submit().
  std::size_t add_pool(std::string name, PoolFunction f) {
    std::lock_guard lock(mutex_);
    HIVE_CHECK(threads_.empty(), "add_pool() after start()");
    pools_.push_back(std::make_unique<Pool>());
    pools_.back()->stats.name = std::move(name);
    pools_.back()->run = std::move(f);
    return pools_.size() - 1;
  }

  /// Launches the compute threads.
  void start() {
    std::lock_guard lock(mutex_);
    HIVE_CHECK(threads_.empty() && !stopping_, "start() twice, or after stop()");
    last_report_ = SteadyClock::now();
    for (int i = 0; i < options_.compute_threads(); ++i) threads_.emplace_back([this] { work(); });
  }

  /// Queues `inputs` (tensors with equal dimension 0) for pool `pool`; `done` is called once,
  /// from a compute thread (or from this call when the task is refused).
  void submit(std::size_t pool, std::vector<at::Tensor> inputs, TaskCallback done) {
    std::exception_ptr refused;
    {
      std::lock_guard lock(mutex_);
      HIVE_CHECK(pool < pools_.size(), "no pool {}", pool);
      const std::int64_t rows = inputs.empty() ? 0 : inputs.front().size(0);
      if (stopping_)
        refused = std::make_exception_ptr(Error(errc::shutdown, "the server is shutting down"));
      else if (rows < 1 || static_cast<std::size_t>(rows) > options_.max_batch_size())
        refused = std::make_exception_ptr(Error(
            errc::limit_exceeded, fmt::format("a request of {} rows is outside [1, max_batch_size={}]", rows,
                                              options_.max_batch_size())));
      else if (queued_tasks_ >= options_.max_queued_tasks())
        refused = std::make_exception_ptr(
            Error(errc::limit_exceeded, fmt::format("server busy: {} tasks queued", queued_tasks_)));
      else {
        auto& p = *pools_[pool];
        p.queue.push_back(Task{std::move(inputs), rows, std::move(done), SteadyClock::now()});
        p.stats.queued_tasks++;
        p.stats.queued_rows += static_cast<std::uint64_t>(rows);
        ++queued_tasks_;
      }
    }
    if (refused) {
      done(refused, {});
      return;
    }
    wake_.notify_one();
  }

  /// Stops: joins the compute threads, then fails every queued task with errc::shutdown.
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    std::vector<Task> orphans;
    {
      std::lock_guard lock(mutex_);
      for (auto& p : pools_) {
        for (auto& t : p->queue) orphans.push_back(std::move(t));
        p->queue.clear();
        p->stats.queued_tasks = 0;
        p->stats.queued_rows = 0;
      }
      queued_tasks_ = 0;
    }
    for (auto& t : orphans) t.done(std::make_exception_ptr(Error(errc::shutdown, "the server is shutting down")), {});
  }

  /// Counters of every pool.
  [[nodiscard]] std::vector<PoolStats> stats() const {
    std::lock_guard lock(mutex_);
    std::vector<PoolStats> out;
    for (const auto& p : pools_) out.push_back(p->stats);
    return out;
  }

 private:
  struct Task {
    std::vector<at::Tensor> inputs;
    std::int64_t rows = 0;
    TaskCallback done;
    SteadyClock::time_point arrived;
  };
  struct Pool {
    PoolFunction run;
    std::deque<Task> queue;
    PoolStats stats;
    PoolStats reported;  // stats at the last report
    bool busy = false;   // a compute thread runs this pool's batch
  };

  // Picks the ready pool whose oldest task is oldest; sets `wake` to when the next not-yet-
  // ready pool becomes ready.
  Pool* pick(SteadyClock::time_point now, SteadyClock::time_point& wake) {
    Pool* best = nullptr;
    for (auto& p : pools_) {
      if (p->busy || p->queue.empty()) continue;
      const auto oldest = p->queue.front().arrived;
      const auto ready_at = oldest + std::chrono::duration_cast<SteadyClock::duration>(options_.max_wait());
      const bool ready = p->stats.queued_rows >= options_.min_batch_size() || now >= ready_at;
      if (!ready) {
        wake = std::min(wake, ready_at);
        continue;
      }
      if (!best || oldest < best->queue.front().arrived) best = p.get();
    }
    return best;
  }

  void work() {
    std::unique_lock lock(mutex_);
    while (!stopping_) {
      const auto now = SteadyClock::now();
      auto wake = SteadyClock::time_point::max();
      maybe_report(now, wake);
      Pool* pool = pick(now, wake);
      if (!pool) {
        if (wake == SteadyClock::time_point::max()) wake_.wait(lock);
        else wake_.wait_until(lock, wake);
        continue;
      }
      std::vector<Task> batch;
      std::int64_t rows = 0;
      while (!pool->queue.empty() &&
             static_cast<std::size_t>(rows + pool->queue.front().rows) <= options_.max_batch_size()) {
        rows += pool->queue.front().rows;
        batch.push_back(std::move(pool->queue.front()));
        pool->queue.pop_front();
      }
      pool->stats.queued_tasks -= batch.size();
      pool->stats.queued_rows -= static_cast<std::uint64_t>(rows);
      queued_tasks_ -= batch.size();
      // Counted before the tasks' callbacks run, so a caller that saw its result also sees its batch.
      pool->stats.batches++;
      pool->stats.rows += static_cast<std::uint64_t>(rows);
      pool->stats.max_batch_rows = std::max<std::uint64_t>(pool->stats.max_batch_rows, static_cast<std::uint64_t>(rows));
      pool->busy = true;
      lock.unlock();
      run_batch(*pool, batch, rows);
      lock.lock();
      pool->busy = false;
      if (!pool->queue.empty()) wake_.notify_one();
    }
  }

  // Merges the tasks' rows, runs the pool, and hands each task its slice of the outputs.
  static void run_batch(Pool& pool, std::vector<Task>& batch, std::int64_t rows) {
    std::vector<at::Tensor> outputs;
    std::exception_ptr error;
    try {
      std::vector<at::Tensor> inputs;
      if (batch.size() == 1) {
        inputs = std::move(batch.front().inputs);
      } else {
        const auto n = batch.front().inputs.size();
        for (std::size_t i = 0; i < n; ++i) {
          std::vector<at::Tensor> parts;
          parts.reserve(batch.size());
          for (auto& t : batch) {
            if (t.inputs.size() != n) throw Error(errc::bad_tensor, "tasks of one pool differ in their number of tensors");
            parts.push_back(t.inputs[i]);
          }
          inputs.push_back(at::cat(parts, 0));
        }
      }
      outputs = pool.run(std::move(inputs));
      for (const auto& o : outputs)
        if (o.dim() < 1 || o.size(0) != rows)
          throw Error(errc::remote_error, fmt::format("{}: an output has {} rows for a batch of {}", pool.stats.name,
                                                      o.dim() < 1 ? 0 : o.size(0), rows));
    } catch (...) {
      error = std::current_exception();
    }
    std::int64_t offset = 0;
    for (auto& t : batch) {
      if (error) {
        t.done(error, {});
        continue;
      }
      std::vector<at::Tensor> mine;
      mine.reserve(outputs.size());
      for (const auto& o : outputs) mine.push_back(batch.size() == 1 ? o : o.narrow(0, offset, t.rows));
      offset += t.rows;
      try {
        t.done(nullptr, std::move(mine));
      } catch (const std::exception& e) {
        log::warn("moe", "{}: a task's callback threw: {}", pool.stats.name, e.what());
      }
    }
  }

  void maybe_report(SteadyClock::time_point now, SteadyClock::time_point& wake) {
    const auto interval = std::chrono::duration_cast<SteadyClock::duration>(options_.stats_report_interval());
    if (interval.count() <= 0) return;
    if (now >= last_report_ + interval) {
      const double seconds = std::chrono::duration<double>(now - last_report_).count();
      for (auto& p : pools_) {
        const auto batches = p->stats.batches - p->reported.batches;
        const auto rows = p->stats.rows - p->reported.rows;
        if (batches == 0 && p->stats.queued_tasks == 0) continue;
        log::info("moe", "{}: {:.1f} batches/s, mean batch {:.1f} rows, queue {} tasks ({} rows)", p->stats.name,
                  static_cast<double>(batches) / seconds, batches ? static_cast<double>(rows) / static_cast<double>(batches) : 0.0,
                  p->stats.queued_tasks, p->stats.queued_rows);
        p->reported = p->stats;
      }
      last_report_ = now;
    }
    wake = std::min(wake, last_report_ + interval);
  }

  Options options_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::unique_ptr<Pool>> pools_;
  std::vector<std::thread> threads_;
  std::size_t queued_tasks_ = 0;
  SteadyClock::time_point last_report_;
  bool stopping_ = false;
};

static_assert(Scheduler<PriorityBatcher<>>);

/// Submits a task to `scheduler` with an Asio completion token: `co_await async_submit(s, pool,
/// inputs, asio::use_awaitable)` resumes on the caller's executor with the task's outputs, or
/// throws what the batch threw.
template <Scheduler S, class Token>
auto async_submit(S& scheduler, std::size_t pool, std::vector<at::Tensor> inputs, Token&& token) {
  return asio::async_initiate<Token, void(std::exception_ptr, std::vector<at::Tensor>)>(
      [&scheduler, pool](auto handler, std::vector<at::Tensor> task) {
        using Handler = decltype(handler);
        auto shared = std::make_shared<Handler>(std::move(handler));
        scheduler.submit(pool, std::move(task), [shared](std::exception_ptr error, std::vector<at::Tensor> outputs) {
          // Completes on the handler's own executor (the io thread that awaits it), never here.
          auto executor = asio::get_associated_executor(*shared);
          asio::post(executor, [shared, error, outputs = std::move(outputs)]() mutable {
            (*shared)(error, std::move(outputs));
          });
        });
      },
      token, std::move(inputs));
}

}  // namespace hive::moe
