#pragma once
/// @file
/// Logging through fmt, filtered by a level read once from the HIVE_LOG_LEVEL environment
/// variable (trace, debug, info, warn, error, off; default info).

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string_view>

namespace hive::log {

/// Severity of a log line; lines below the current level are skipped before formatting.
enum class Level { trace = 0, debug, info, warn, error, off };

/// Parses a level name (case-sensitive, as listed in Level); unknown names give `fallback`.
inline Level parse_level(std::string_view s, Level fallback = Level::info) noexcept {
  if (s == "trace") return Level::trace;
  if (s == "debug") return Level::debug;
  if (s == "info") return Level::info;
  if (s == "warn" || s == "warning") return Level::warn;
  if (s == "error") return Level::error;
  if (s == "off") return Level::off;
  return fallback;
}

namespace detail {
inline std::atomic<Level>& level_ref() noexcept {
  static std::atomic<Level> level{[] {
    const char* env = std::getenv("HIVE_LOG_LEVEL");
    return env ? parse_level(env) : Level::info;
  }()};
  return level;
}
inline std::mutex& sink_mutex() noexcept {
  static std::mutex m;
  return m;
}
inline constexpr std::string_view level_name(Level l) noexcept {
  constexpr std::string_view names[] = {"TRACE", "DEBUG", "INFO", "WARN", "ERROR", "OFF"};
  return names[static_cast<int>(l)];
}
}  // namespace detail

/// The current level (from HIVE_LOG_LEVEL unless set_level was called).
inline Level level() noexcept { return detail::level_ref().load(std::memory_order_relaxed); }
/// Changes the level for the whole process.
inline void set_level(Level l) noexcept { detail::level_ref().store(l, std::memory_order_relaxed); }
/// True when a line at `l` would be printed.
inline bool enabled(Level l) noexcept { return l >= level() && l != Level::off; }

/// Writes one line to stderr: time, level, component, message.
template <class... Args>
void write(Level l, std::string_view component, fmt::format_string<Args...> f, Args&&... args) {
  if (!enabled(l)) return;
  const auto now = std::chrono::system_clock::now();
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()) % 1000;
  std::string line = fmt::format("[{:%H:%M:%S}.{:03d}] {:<5} {}: {}\n",
                                 fmt::localtime(std::chrono::system_clock::to_time_t(now)),
                                 static_cast<int>(ms.count()), detail::level_name(l), component,
                                 fmt::format(f, std::forward<Args>(args)...));
  std::lock_guard lock(detail::sink_mutex());
  std::fwrite(line.data(), 1, line.size(), stderr);
}

/// Logs at trace level.
template <class... Args>
void trace(std::string_view c, fmt::format_string<Args...> f, Args&&... a) { write(Level::trace, c, f, std::forward<Args>(a)...); }
/// Logs at debug level.
template <class... Args>
void debug(std::string_view c, fmt::format_string<Args...> f, Args&&... a) { write(Level::debug, c, f, std::forward<Args>(a)...); }
/// Logs at info level.
template <class... Args>
void info(std::string_view c, fmt::format_string<Args...> f, Args&&... a) { write(Level::info, c, f, std::forward<Args>(a)...); }
/// Logs at warn level.
template <class... Args>
void warn(std::string_view c, fmt::format_string<Args...> f, Args&&... a) { write(Level::warn, c, f, std::forward<Args>(a)...); }
/// Logs at error level.
template <class... Args>
void error(std::string_view c, fmt::format_string<Args...> f, Args&&... a) { write(Level::error, c, f, std::forward<Args>(a)...); }

}  // namespace hive::log
