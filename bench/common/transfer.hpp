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
  /// The transports' TcpOptions::receive_cache_bytes in MiB; -1 keeps its default.
  int receive_cache_mib = -1;

  /// `o` with receive_cache_mib applied.
  template <class TcpOptions>
  [[nodiscard]] TcpOptions apply(TcpOptions o) const {
    if (receive_cache_mib >= 0) o.receive_cache_bytes(static_cast<std::size_t>(receive_cache_mib) << 20);
    return o;
  }
};

/// Parses --calls, --payload_bytes, --bulk_mib and --bulk_rounds over `a`'s defaults (each a
/// positive integer) and --receive_cache_mib (0 or more); prints the usage of `program` for
/// --help; exits 2 on a bad flag.
inline TransferArgs parse_transfer_args(int argc, char** argv, const char* program, TransferArgs a) {
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&](int least = 1) -> int {
      if (i + 1 >= argc) {
        fmt::print(stderr, "missing value for {}\n", k);
        std::exit(2);
      }
      const std::string text = argv[++i];
      const int v = std::atoi(text.c_str());
      if (v < least || text.find_first_not_of("0123456789") != std::string::npos) {
        fmt::print(stderr, "{} must be an integer of at least {}\n", k, least);
        std::exit(2);
      }
      return v;
    };
    if (k == "--calls") a.calls = next();
    else if (k == "--payload_bytes") a.payload_bytes = next();
    else if (k == "--bulk_mib") a.bulk_mib = next();
    else if (k == "--bulk_rounds") a.bulk_rounds = next();
    else if (k == "--receive_cache_mib") a.receive_cache_mib = next(0);
    else if (k == "--help" || k == "-h") {
      fmt::print("usage: {} [--calls N] [--payload_bytes B] [--bulk_mib M] [--bulk_rounds R] [--receive_cache_mib C]\n",
                 program);
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
