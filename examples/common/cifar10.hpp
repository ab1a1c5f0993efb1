#pragma once
/// @file
/// CIFAR-10 from its binary version (the files of cifar-10-batches-bin, as distributed in
/// cifar-10-binary.tar.gz), read with std::ifstream: no extra library.

#include "fashion_mnist.hpp"

#include <hive/core/error.hpp>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace hive::examples {

/// Bytes of one CIFAR-10 record: 1 label byte, then 1024 red, 1024 green and 1024 blue bytes
/// (each plane a row-major 32x32 image).
inline constexpr std::int64_t cifar10_record_bytes = 1 + 3 * 32 * 32;

/// Per-channel (R, G, B) mean of CIFAR-10's training images, on pixels scaled to [0, 1].
inline constexpr float cifar10_mean[3] = {0.4914f, 0.4822f, 0.4465f};

/// Per-channel (R, G, B) standard deviation of CIFAR-10's training images, on pixels scaled to [0, 1].
inline constexpr float cifar10_std[3] = {0.2470f, 0.2435f, 0.2616f};

/// True when `dir` holds CIFAR-10's binary version: dir/data_batch_1.bin and dir/test_batch.bin exist.
inline bool is_cifar10_dir(const std::string& dir) {
  std::error_code ec;
  const std::filesystem::path root(dir);
  return std::filesystem::is_regular_file(root / "data_batch_1.bin", ec) &&
         std::filesystem::is_regular_file(root / "test_batch.bin", ec);
}

/// The training split (data_batch_1.bin, data_batch_2.bin, ... up to data_batch_5.bin, read in
/// order and stopping at the first missing one; data_batch_1.bin must exist) or the test split
/// (test_batch.bin) of CIFAR-10's binary version in `dir`, its first `limit` samples when
/// limit > 0. Images are float32 [n, 3, 32, 32] (R, G, B), scaled to [0, 1] then normalized
/// per channel with cifar10_mean and cifar10_std; labels are int64 [n] in 0..9.
/// Throws hive::Error (errc::invalid_argument) when a file is missing or unreadable, when a
/// file's size is not a positive multiple of 3073 bytes, or when a label byte of a record read
/// is above 9.
inline Dataset load_cifar10(const std::string& dir, bool train, std::int64_t limit = 0) {
  namespace fs = std::filesystem;
  const fs::path root(dir);

  // The files of the split, each with its number of records.
  std::vector<fs::path> names;
  if (train) {
    for (int i = 1; i <= 5; ++i) names.push_back(root / fmt::format("data_batch_{}.bin", i));
  } else {
    names.push_back(root / "test_batch.bin");
  }
  std::vector<std::pair<fs::path, std::int64_t>> files;
  std::int64_t total = 0;
  for (const auto& path : names) {
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) {
      if (!files.empty()) break;  // train: the batches that exist, in order
      throw Error(errc::invalid_argument,
                  fmt::format("{} not found: expected CIFAR-10's binary version (the files of cifar-10-batches-bin, "
                              "from cifar-10-binary.tar.gz) in {}",
                              path.string(), dir));
    }
    const auto size = fs::file_size(path, ec);
    if (ec) throw Error(errc::invalid_argument, fmt::format("cannot read the size of {}: {}", path.string(), ec.message()));
    const auto bytes = static_cast<std::int64_t>(size);
    if (bytes == 0 || bytes % cifar10_record_bytes != 0)
      throw Error(errc::invalid_argument,
                  fmt::format("{} has {} bytes, not a positive multiple of {} (1 label byte + 3072 pixel bytes per "
                              "record): truncated, or not CIFAR-10's binary version",
                              path.string(), bytes, cifar10_record_bytes));
    files.emplace_back(path, bytes / cifar10_record_bytes);
    total += bytes / cifar10_record_bytes;
  }
  const std::int64_t n = limit > 0 && limit < total ? limit : total;

  // The raw records, [n, 3073] bytes, read file by file until n records are in.
  auto raw = at::empty({n, cifar10_record_bytes}, at::kByte);
  auto* out = raw.data_ptr<std::uint8_t>();
  std::int64_t done = 0;
  for (const auto& [path, count] : files) {
    if (done == n) break;
    const std::int64_t take = std::min(count, n - done);
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(errc::invalid_argument, fmt::format("cannot open {}", path.string()));
    auto* dst = out + done * cifar10_record_bytes;
    in.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(take * cifar10_record_bytes));
    if (in.gcount() != static_cast<std::streamsize>(take * cifar10_record_bytes))
      throw Error(errc::invalid_argument, fmt::format("cannot read {} records from {}", take, path.string()));
    for (std::int64_t r = 0; r < take; ++r) {
      const unsigned label = dst[r * cifar10_record_bytes];
      if (label > 9)
        throw Error(errc::invalid_argument,
                    fmt::format("{}: record {} has label {}, expected 0..9 (not CIFAR-10's binary version?)",
                                path.string(), r, label));
    }
    done += take;
  }

  auto labels = raw.select(1, 0).to(at::kLong);
  auto images = raw.narrow(1, 1, cifar10_record_bytes - 1).contiguous().view({n, 3, 32, 32}).to(at::kFloat).div_(255.0);
  const auto mean = at::tensor(at::ArrayRef<float>(cifar10_mean, 3)).view({1, 3, 1, 1});
  const auto stdev = at::tensor(at::ArrayRef<float>(cifar10_std, 3)).view({1, 3, 1, 1});
  return {images.sub_(mean).div_(stdev), labels};
}

}  // namespace hive::examples
