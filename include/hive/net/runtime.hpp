#pragma once
/// @file
/// Runtime: an io_context with its own threads, shared by any number of peers.

#include <hive/core/error.hpp>

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <thread>
#include <vector>

namespace hive::net {

/// Raises this process's soft limit on open descriptors to its hard limit and returns the new
/// soft limit. Debian's default soft limit (1024) is too low for a peer that many others
/// connect to; programs call this at start (the library never changes process limits itself).
/// With `wanted` above the hard limit, first tries to raise the hard limit to it (at most the
/// kernel's fs.nr_open); that takes privilege (CAP_SYS_RESOURCE), and without it the hard
/// limit stays.
inline rlim_t raise_file_limit(rlim_t wanted = 0) noexcept {
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) != 0) return 0;
  if (wanted > r.rlim_max && r.rlim_max != RLIM_INFINITY) {
    rlim_t ceiling = wanted;
    if (std::FILE* f = std::fopen("/proc/sys/fs/nr_open", "r")) {
      unsigned long long nr_open = 0;
      if (std::fscanf(f, "%llu", &nr_open) == 1 && nr_open > 0) ceiling = std::min<rlim_t>(wanted, nr_open);
      std::fclose(f);
    }
    rlimit higher{ceiling, ceiling};
    if (ceiling > r.rlim_max && ::setrlimit(RLIMIT_NOFILE, &higher) == 0) r = higher;
  }
  r.rlim_cur = r.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &r);
  ::getrlimit(RLIMIT_NOFILE, &r);
  return r.rlim_cur;
}

/// An `asio::io_context` run by a small pool of threads. Peers built on its executor run their
/// coroutines there; many peers may share one runtime (tests put hundreds on one).
///
/// Destroy the peers before their runtime. The destructor stops the context and joins its
/// threads; handlers still queued are destroyed without running.
class Runtime {
 public:
  /// Starts `threads` threads (at least one) running the context.
  explicit Runtime(int threads = 1) : context_(threads), work_(asio::make_work_guard(context_)) {
    HIVE_CHECK(threads >= 1, "a Runtime needs at least one thread, got {}", threads);
    threads_.reserve(static_cast<std::size_t>(threads));
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { context_.run(); });
  }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;
  ~Runtime() { stop(); }

  /// The executor to build peers on.
  [[nodiscard]] asio::any_io_executor executor() noexcept { return context_.get_executor(); }
  /// The underlying context.
  [[nodiscard]] asio::io_context& context() noexcept { return context_; }

  /// Stops the threads and joins them; idempotent. Must not be called from a runtime thread.
  void stop() {
    work_.reset();
    context_.stop();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

 private:
  asio::io_context context_;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_;
  std::vector<std::thread> threads_;
};

}  // namespace hive::net
