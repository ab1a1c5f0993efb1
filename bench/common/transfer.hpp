#pragma once
// What the RPC transfer benchmarks (bench_rpc, bench_relay) share: their flags (sequential
// echo calls, then bulk one-way calls) and percentiles of the round trips.

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace hive::bench {

/// The flags of a transfer benchmark.
struct TransferArgs {
  /// Sequential echo calls of the latency run.
  int calls = 5000;
  /// Bytes each echo call carries.
  int payload_bytes = 4096;
  /// MiB each bulk call carries.
  int bulk_mib = 64;
  /// Bulk calls.
  int bulk_rounds = 8;
};

/// Parses --calls, --payload_bytes, --bulk_mib and --bulk_rounds over `a`'s defaults (each a
/// positive integer); prints the usage of `program` for --help; exits 2 on a bad flag.
inline TransferArgs parse_transfer_args(int argc, char** argv, const char* program, TransferArgs a) {
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> int {
      if (i + 1 >= argc) {
        fmt::print(stderr, "missing value for {}\n", k);
        std::exit(2);
      }
      const int v = std::atoi(argv[++i]);
      if (v <= 0) {
        fmt::print(stderr, "{} must be a positive integer\n", k);
        std::exit(2);
      }
      return v;
    };
    if (k == "--calls") a.calls = next();
    else if (k == "--payload_bytes") a.payload_bytes = next();
    else if (k == "--bulk_mib") a.bulk_mib = next();
    else if (k == "--bulk_rounds") a.bulk_rounds = next();
    else if (k == "--help" || k == "-h") {
      fmt::print("usage: {} [--calls N] [--payload_bytes B] [--bulk_mib M] [--bulk_rounds R]\n", program);
      std::exit(0);
    } else {
      fmt::print(stderr, "unknown flag {} (see --help)\n", k);
      std::exit(2);
    }
  }
  return a;
}

/// The p-quantile (0..1) of `v`, the nearest rank.
inline double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

}  // namespace hive::bench
