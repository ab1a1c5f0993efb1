// Compiled against an installed hive by the consumer tests; exits nonzero when the install
// tree gives a wrong answer.
#include <hive/core/error.hpp>
#include <hive/core/id.hpp>

#ifdef HIVE_CONSUMER_TORCH
// The cheapest headers that still make the program load and call libtorch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/ones.h>
#endif

#include <cstdio>
#include <string>

int main() {
  const std::string expected = "a9993e364706816aba3e25717850c26c9cd0d89d";  // FIPS 180 SHA-1("abc")
  const std::string got = hive::Id160::of("abc").hex();
  std::printf("hive::Id160::of(\"abc\") = %s\n", got.c_str());
  if (got != expected) {
    std::fprintf(stderr, "expected %s\n", expected.c_str());
    return 1;
  }
  std::error_code ec = hive::errc::timeout;
  if (std::string(ec.category().name()) != "hive") {
    std::fprintf(stderr, "hive::errc has category '%s', expected 'hive'\n", ec.category().name());
    return 1;
  }
#ifdef HIVE_CONSUMER_TORCH
  const auto n = at::ones({2, 3}).numel();
  std::printf("at::ones({2, 3}).numel() = %lld\n", static_cast<long long>(n));
  if (n != 6) return 1;
#endif
  return 0;
}
