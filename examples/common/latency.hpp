#pragma once
// Latency percentiles for the programs that report them (hive-infer, live_inference,
// benchmark_inference).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace hive::examples {

/// The q-quantile (0 <= q <= 1) of `values` by the nearest-rank method; 0 for no values.
inline double percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  const auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(values.size())));
  const auto k = std::min(values.size() - 1, rank == 0 ? 0 : rank - 1);
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(k), values.end());
  return values[k];
}

}  // namespace hive::examples
