#pragma once
// Fashion-MNIST from the Debian package dataset-fashion-mnist (gzip-compressed IDX files under
// /usr/share/datasets/fashion-mnist), read with the system's gzip: no extra library.

#include <hive/core/error.hpp>

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

namespace hive::examples {

/// Images [n, 784] (normalized floats) and labels [n] (int64, 0..9).
struct Dataset {
  at::Tensor images;
  at::Tensor labels;
};

/// Where the Debian package puts the files.
inline constexpr const char* fashion_mnist_dir = "/usr/share/datasets/fashion-mnist";

/// The decompressed bytes of gzip file `path`.
inline std::string gunzip(const std::string& path) {
  const std::string command = "gzip -dc '" + path + "'";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
  if (!pipe) throw Error(errc::invalid_argument, "cannot run " + command);
  std::string out;
  char buf[1 << 16];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, pipe.get())) > 0;) out.append(buf, n);
  if (out.empty())
    throw Error(errc::invalid_argument, fmt::format("{} is missing or empty (apt-get install dataset-fashion-mnist)", path));
  return out;
}

/// A big-endian 32-bit field of an IDX header.
inline std::uint32_t idx_u32(const std::string& data, std::size_t at) {
  HIVE_CHECK(data.size() >= at + 4, "IDX file truncated");
  const auto* p = reinterpret_cast<const unsigned char*>(data.data() + at);
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
}

/// The training (60000) or test (10000) split, its first `limit` samples when limit > 0.
inline Dataset load_fashion_mnist(bool train, std::int64_t limit = 0, const std::string& dir = fashion_mnist_dir) {
  const std::string split = train ? "train" : "t10k";
  const auto images = gunzip(dir + "/" + split + "-images-idx3-ubyte.gz");
  const auto labels = gunzip(dir + "/" + split + "-labels-idx1-ubyte.gz");
  HIVE_CHECK(idx_u32(images, 0) == 0x803 && idx_u32(labels, 0) == 0x801, "not IDX image/label files");
  auto n = static_cast<std::int64_t>(idx_u32(images, 4));
  HIVE_CHECK(n == static_cast<std::int64_t>(idx_u32(labels, 4)) && idx_u32(images, 8) == 28 && idx_u32(images, 12) == 28,
             "unexpected IDX shapes");
  HIVE_CHECK(images.size() >= 16 + static_cast<std::size_t>(n) * 784 && labels.size() >= 8 + static_cast<std::size_t>(n),
             "IDX file truncated");
  if (limit > 0 && limit < n) n = limit;
  auto x = at::from_blob(const_cast<char*>(images.data() + 16), {n, 784}, at::kByte).to(at::kFloat).div_(255.0);
  auto y = at::from_blob(const_cast<char*>(labels.data() + 8), {n}, at::kByte).to(at::kLong);
  return {x.sub_(0.2860).div_(0.3530), y};
}

}  // namespace hive::examples
