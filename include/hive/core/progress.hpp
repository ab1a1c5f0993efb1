#pragma once
/// @file
/// Progress: how long work reports how far it got, suited to where its output goes. On a
/// terminal it redraws one line with a bar; in a log (a file or a pipe) it prints a line each
/// time another few percent are done, so a log holds tens of lines, not thousands of redraws.

#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace hive {

/// Reports the progress of `total` units of work to `out` (stderr by default): a redrawn bar
/// on a terminal, otherwise a line every `step_percent` percent (and at the end). update()
/// may be called from any thread and as often as wanted; it writes only when the display
/// changes.
///
/// ```
/// hive::Progress progress("store", 1000);
/// for (std::size_t i = 1; i <= 1000; ++i) progress.update(i, fmt::format("batch {}", i));
/// progress.finish();
/// ```
class Progress {
 public:
  /// Starts a report labelled `label` of `total` units. `terminal` overrides the check of
  /// whether `out` is a terminal (isatty), for tests.
  Progress(std::string label, std::size_t total, std::FILE* out = stderr, int step_percent = 5,
           std::optional<bool> terminal = std::nullopt)
      : label_(std::move(label)),
        total_(total),
        out_(out),
        step_(std::clamp(step_percent, 1, 100)),
        tty_(terminal.value_or(::isatty(::fileno(out)) != 0)) {}
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  /// Ends the bar's line on a terminal if finish() was not called.
  ~Progress() {
    if (tty_ && drawn_ && !finished_) std::fputc('\n', out_);
  }

  /// `done` of the total units are done; `detail` follows the figures (a loss, a rate).
  void update(std::size_t done, std::string_view detail = {}) {
    std::lock_guard lock(mutex_);
    if (finished_) return;
    done = std::min(done, total_);
    const int percent = total_ ? static_cast<int>(100 * done / total_) : 100;
    if (tty_) {
      constexpr int width = 30;
      const int filled = total_ ? static_cast<int>(width * done / total_) : width;
      if (filled == last_filled_ && done != total_ && detail == last_detail_ && percent == last_percent_) return;
      last_filled_ = filled;
      last_detail_ = detail;
      fmt::print(out_, "\r{} [{}{}] {:3d}% {}/{} {}   ", label_, std::string(static_cast<std::size_t>(filled), '#'),
                 std::string(static_cast<std::size_t>(width - filled), '.'), percent, done, total_, detail);
      std::fflush(out_);
      drawn_ = true;
    } else {
      if (percent < last_percent_ + step_ && done != total_) return;
      if (done == total_ && last_percent_ == 100) return;
      fmt::print(out_, "{} {:3d}% {}/{} {}\n", label_, percent, done, total_, detail);
      std::fflush(out_);
    }
    last_percent_ = done == total_ ? 100 : percent - percent % step_;
  }

  /// Ends the report: on a terminal, ends the bar's line.
  void finish() {
    std::lock_guard lock(mutex_);
    if (finished_) return;
    finished_ = true;
    if (tty_ && drawn_) std::fputc('\n', out_);
    std::fflush(out_);
  }

  /// Whether the report redraws (its output is a terminal).
  [[nodiscard]] bool terminal() const noexcept { return tty_; }

 private:
  std::mutex mutex_;
  std::string label_;
  std::size_t total_;
  std::FILE* out_;
  int step_;
  bool tty_;
  bool drawn_ = false;
  bool finished_ = false;
  int last_percent_ = -100;
  int last_filled_ = -1;
  std::string last_detail_;
};

}  // namespace hive
