#pragma once
/// @file
/// Error codes, the error category, RemoteError and HIVE_CHECK.

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>

namespace hive {

/// Transport, protocol and library failures, carried as `std::error_code` values.
enum class errc {
  timeout = 1,          ///< an operation did not finish before its deadline
  connection_closed,    ///< the peer closed the connection or it was reset
  connection_refused,   ///< nobody listens at the address, or the peer is down
  bad_address,          ///< an address string could not be parsed
  frame_too_large,      ///< a frame's length prefix exceeds the configured limit
  bad_frame,            ///< a frame violates the wire format (lengths, kind, version)
  bad_header,           ///< a frame's MessagePack header could not be decoded or lacks a field
  bad_tensor,           ///< a tensor descriptor is invalid (dtype, rank, shape, size)
  limit_exceeded,       ///< a count or size exceeds a configured limit
  unknown_method,       ///< the remote peer has no handler for the method
  remote_error,         ///< the remote handler failed; see RemoteError for its message
  shutdown,             ///< the component is stopping or stopped
  invalid_argument,     ///< the caller passed a value outside the documented domain
  round_failed,         ///< a group operation (an averaging round) failed on another member
};
}  // namespace hive

/// Lets hive::errc convert to std::error_code implicitly.
template <>
struct std::is_error_code_enum<hive::errc> : std::true_type {};

namespace hive {

namespace detail {
/// The category behind hive::errc.
class ErrorCategory final : public std::error_category {
 public:
  [[nodiscard]] const char* name() const noexcept override { return "hive"; }
  [[nodiscard]] std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::timeout: return "operation timed out";
      case errc::connection_closed: return "connection closed";
      case errc::connection_refused: return "connection refused";
      case errc::bad_address: return "bad address";
      case errc::frame_too_large: return "frame too large";
      case errc::bad_frame: return "malformed frame";
      case errc::bad_header: return "malformed message header";
      case errc::bad_tensor: return "malformed tensor";
      case errc::limit_exceeded: return "limit exceeded";
      case errc::unknown_method: return "unknown method";
      case errc::remote_error: return "remote error";
      case errc::shutdown: return "shut down";
      case errc::invalid_argument: return "invalid argument";
      case errc::round_failed: return "averaging round failed";
    }
    return "unknown hive error";
  }
};
}  // namespace detail

/// The category of hive::errc values.
inline const std::error_category& error_category() noexcept {
  static const detail::ErrorCategory category;
  return category;
}

/// Makes a `std::error_code` from a hive::errc (found by ADL).
inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

/// A failure with a hive::errc code and a message saying what happened.
class Error : public std::system_error {
 public:
  /// Builds the error from a code and a human-readable explanation.
  Error(errc code, const std::string& what) : std::system_error(make_error_code(code), what) {}
  /// Builds the error from any error code and an explanation.
  Error(std::error_code code, const std::string& what) : std::system_error(code, what) {}
};

/// A failure reported by a remote peer; carries the remote's own message.
class RemoteError : public Error {
 public:
  /// Builds the error from the remote's code (unknown_method or remote_error) and message.
  RemoteError(errc code, std::string remote_message)
      : Error(code, "remote: " + remote_message), remote_message_(std::move(remote_message)) {}
  /// The message the remote peer sent, without decoration.
  [[nodiscard]] const std::string& remote_message() const noexcept { return remote_message_; }

 private:
  std::string remote_message_;
};

/// Thrown by HIVE_CHECK when a caller breaks a documented precondition.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <class... Args>
[[noreturn]] void check_failed(const char* cond, const char* file, int line,
                               fmt::format_string<Args...> f, Args&&... args) {
  throw InvalidArgument(fmt::format("{} ({} failed at {}:{})", fmt::format(f, std::forward<Args>(args)...),
                                    cond, file, line));
}
[[noreturn]] inline void check_failed(const char* cond, const char* file, int line) {
  throw InvalidArgument(fmt::format("check {} failed at {}:{}", cond, file, line));
}
}  // namespace detail

}  // namespace hive

/// Throws hive::InvalidArgument with a formatted message when `cond` is false.
/// Usage: `HIVE_CHECK(n > 0, "num_experts must be positive, got {}", n);`
#define HIVE_CHECK(cond, ...)                                                   \
  do {                                                                          \
    if (!(cond)) [[unlikely]]                                                   \
      ::hive::detail::check_failed(#cond, __FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__); \
  } while (false)
