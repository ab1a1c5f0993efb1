#pragma once
// What every fuzz target shares: a reader that takes typed values off the fuzzer's bytes, a
// check that aborts with a message (libFuzzer then saves the input), and the seed generator mode
// (HIVE_FUZZ_WRITE_SEEDS=<dir> makes a target write its seeds there and exit).

#include <hive/core/identity.hpp>
#include <hive/core/log.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace hive::fuzz {

/// Typed values taken from the front of the fuzzer's input; past its end, zeros.
class Input {
 public:
  /// Reads `bytes`.
  explicit Input(std::span<const std::uint8_t> bytes) noexcept : bytes_(bytes) {}
  /// Reads libFuzzer's (data, size).
  Input(const std::uint8_t* data, std::size_t size) noexcept : bytes_(data, size) {}

  /// Bytes not consumed yet.
  [[nodiscard]] std::size_t remaining() const noexcept { return bytes_.size() - pos_; }
  /// True when everything was consumed.
  [[nodiscard]] bool empty() const noexcept { return remaining() == 0; }

  /// The next byte (0 past the end).
  std::uint8_t u8() noexcept { return pos_ < bytes_.size() ? bytes_[pos_++] : 0; }
  /// The next `sizeof(T)` bytes as a little-endian integer or a float (zero-padded past the end).
  template <class T>
  T take() noexcept {
    unsigned char raw[sizeof(T)] = {};
    const std::size_t n = std::min(sizeof(T), remaining());
    if (n) std::memcpy(raw, bytes_.data() + pos_, n);
    pos_ += n;
    T v;
    std::memcpy(&v, raw, sizeof(T));
    return v;
  }
  /// A value in [0, n) (0 when n is 0), from one byte when n <= 256, else from four.
  std::size_t below(std::size_t n) noexcept {
    if (n == 0) return 0;
    return n <= 256 ? u8() % n : take<std::uint32_t>() % n;
  }
  /// The next `n` bytes, or fewer at the end.
  std::span<const std::uint8_t> bytes(std::size_t n) noexcept {
    n = std::min(n, remaining());
    auto out = bytes_.subspan(pos_, n);
    pos_ += n;
    return out;
  }
  /// A length-prefixed (one byte) slice.
  std::span<const std::uint8_t> chunk() noexcept { return bytes(u8()); }
  /// A slice with a 16-bit length prefix.
  std::span<const std::uint8_t> chunk16() noexcept { return bytes(take<std::uint16_t>()); }
  /// Everything left.
  std::span<const std::uint8_t> rest() noexcept { return bytes(remaining()); }

 private:
  std::span<const std::uint8_t> bytes_;
  std::size_t pos_ = 0;
};

/// Reports a broken invariant and aborts, so that libFuzzer keeps the input as a crash.
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "hive fuzz: invariant broken: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

/// One seed: a file name in corpus/<target>/ and its bytes.
struct Seed {
  std::string name;
  std::vector<std::uint8_t> bytes;
};

/// Concatenates byte sequences into one input.
inline std::vector<std::uint8_t> join(std::initializer_list<std::span<const std::uint8_t>> parts) {
  std::vector<std::uint8_t> out;
  for (auto p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

/// The bytes of a little-endian integer or float.
template <class T>
std::vector<std::uint8_t> le(T v) {
  std::vector<std::uint8_t> out(sizeof v);
  std::memcpy(out.data(), &v, sizeof v);
  return out;
}

/// A fixed identity (its seed is `n` followed by zeros), the same in every run, so that inputs
/// that carry its id or signatures stay meaningful across runs. Made once per `n`.
inline const Identity& fixed_identity(std::uint8_t n) {
  static const std::array<Identity, 8> ids = [] {
    auto make = [](std::uint8_t k) {
      std::array<std::uint8_t, 32> seed{};
      seed[0] = k;
      return Identity::from_seed(seed);
    };
    return std::array<Identity, 8>{make(0), make(1), make(2), make(3), make(4), make(5), make(6), make(7)};
  }();
  return ids.at(n);
}

/// Called from LLVMFuzzerInitialize: quiets the library's log unless HIVE_LOG_LEVEL asks for
/// it, and with HIVE_FUZZ_WRITE_SEEDS=<dir> writes `make_seeds()` there and exits.
template <class F>
void initialize(F make_seeds) {
  if (!std::getenv("HIVE_LOG_LEVEL")) log::set_level(log::Level::off);
  const char* dir = std::getenv("HIVE_FUZZ_WRITE_SEEDS");
  if (!dir) return;
  std::filesystem::create_directories(dir);
  std::vector<Seed> seeds = make_seeds();
  for (const auto& s : seeds) {
    std::ofstream f(std::filesystem::path(dir) / s.name, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(s.bytes.data()), static_cast<std::streamsize>(s.bytes.size()));
    if (!f) {
      std::fprintf(stderr, "hive fuzz: cannot write %s/%s\n", dir, s.name.c_str());
      std::exit(1);
    }
  }
  std::fprintf(stderr, "hive fuzz: wrote %zu seeds to %s\n", seeds.size(), dir);
  std::exit(0);
}

}  // namespace hive::fuzz

/// Defines libFuzzer's two entry points: LLVMFuzzerInitialize calls hive::fuzz::initialize with
/// `make_seeds`, and LLVMFuzzerTestOneInput runs `one_input(hive::fuzz::Input&)` on each input.
#define HIVE_FUZZ_TARGET(make_seeds, one_input)                                     \
  extern "C" int LLVMFuzzerInitialize(int*, char***) {                              \
    hive::fuzz::initialize(make_seeds);                                             \
    return 0;                                                                       \
  }                                                                                 \
  extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) { \
    hive::fuzz::Input in(data, size);                                               \
    one_input(in);                                                                  \
    return 0;                                                                       \
  }

/// Checks an invariant of the code under test; aborts with the formatted message when false.
#define HIVE_FUZZ_EXPECT(cond, ...)                                                              \
  do {                                                                                           \
    if (!(cond)) [[unlikely]]                                                                    \
      ::hive::fuzz::fail(fmt::format("{} ({}:{}): {}", #cond, __FILE__, __LINE__, fmt::format(__VA_ARGS__))); \
  } while (false)
