// Tests for the CIFAR-10 binary-format reader (examples/common/cifar10.hpp), on small files
// written here in CIFAR-10's exact format with known labels and pixels: no real dataset.
#include "../../examples/common/cifar10.hpp"

#include <ATen/ATen.h>
#include <doctest/doctest.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

using hive::examples::load_cifar10;

namespace {

namespace fs = std::filesystem;

constexpr std::int64_t record_bytes = 3073;
constexpr std::array<double, 3> mean = {0.4914, 0.4822, 0.4465};
constexpr std::array<double, 3> stdev = {0.2470, 0.2435, 0.2616};

/// A fresh directory under the system's temporary directory, removed with everything in it.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    path = fs::temp_directory_path() / fmt::format("hive_test_cifar10_{}_{:x}", stamp, rd());
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] std::string str() const { return path.string(); }
};

/// The label of record `r` of a file seeded with `seed`.
std::uint8_t label_of(int seed, std::int64_t r) { return static_cast<std::uint8_t>((r * 3 + seed) % 10); }

/// The byte of pixel (row, col) of channel c (0 R, 1 G, 2 B) of record r of a file seeded with `seed`.
std::uint8_t pixel_of(int seed, std::int64_t r, int c, int row, int col) {
  return static_cast<std::uint8_t>((seed * 101 + r * 31 + c * 85 + row * 7 + col * 3) % 256);
}

/// The bytes of a CIFAR-10 batch file with `n` records: label, then R, G, B planes, row-major.
std::string batch_bytes(int seed, std::int64_t n) {
  std::string out;
  for (std::int64_t r = 0; r < n; ++r) {
    out.push_back(static_cast<char>(label_of(seed, r)));
    for (int c = 0; c < 3; ++c)
      for (int row = 0; row < 32; ++row)
        for (int col = 0; col < 32; ++col) out.push_back(static_cast<char>(pixel_of(seed, r, c, row, col)));
  }
  return out;
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

/// What the reader should make of a byte of channel c.
double normalized(std::uint8_t byte, int c) { return (byte / 255.0 - mean[c]) / stdev[c]; }

/// The images the reader should return for records [0, n) of a file seeded with `seed`, as doubles.
at::Tensor expected_images(int seed, std::int64_t n) {
  auto t = at::empty({n, 3, 32, 32}, at::kDouble);
  auto a = t.accessor<double, 4>();
  for (std::int64_t r = 0; r < n; ++r)
    for (int c = 0; c < 3; ++c)
      for (int row = 0; row < 32; ++row)
        for (int col = 0; col < 32; ++col) a[r][c][row][col] = normalized(pixel_of(seed, r, c, row, col), c);
  return t;
}

at::Tensor expected_labels(int seed, std::int64_t n) {
  auto t = at::empty({n}, at::kLong);
  for (std::int64_t r = 0; r < n; ++r) t[r] = static_cast<std::int64_t>(label_of(seed, r));
  return t;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

/// The message of the hive::Error that `f` throws, or "" when it throws none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const hive::Error& e) {
    return e.what();
  }
  return "";
}

constexpr int train_seed = 1;
constexpr int test_seed = 2;
constexpr std::int64_t train_n = 7;
constexpr std::int64_t test_n = 3;

/// A directory with data_batch_1.bin (7 records) and test_batch.bin (3 records).
void write_small_cifar(const TempDir& dir) {
  write_file(dir.path / "data_batch_1.bin", batch_bytes(train_seed, train_n));
  write_file(dir.path / "test_batch.bin", batch_bytes(test_seed, test_n));
}

}  // namespace

TEST_CASE("cifar10 decodes shapes, labels and pixels of both splits") {
  TempDir dir;
  write_small_cifar(dir);
  CHECK(hive::examples::is_cifar10_dir(dir.str()));

  const auto train = load_cifar10(dir.str(), true);
  REQUIRE(train.images.sizes() == at::IntArrayRef({train_n, 3, 32, 32}));
  REQUIRE(train.labels.sizes() == at::IntArrayRef({train_n}));
  CHECK((train.images.scalar_type() == at::kFloat));
  CHECK((train.labels.scalar_type() == at::kLong));
  CHECK(train.labels.equal(expected_labels(train_seed, train_n)));
  CHECK(max_abs_diff(train.images, expected_images(train_seed, train_n)) < 1e-5);

  // One pixel by hand: record 4, blue channel, row 5, column 17.
  const std::uint8_t byte = pixel_of(train_seed, 4, 2, 5, 17);
  CHECK(std::abs(train.images[4][2][5][17].item<double>() - (byte / 255.0 - 0.4465) / 0.2616) < 1e-5);
  CHECK(train.labels[4].item<std::int64_t>() == (4 * 3 + train_seed) % 10);

  const auto test = load_cifar10(dir.str(), false);
  REQUIRE(test.images.sizes() == at::IntArrayRef({test_n, 3, 32, 32}));
  REQUIRE(test.labels.sizes() == at::IntArrayRef({test_n}));
  CHECK(test.labels.equal(expected_labels(test_seed, test_n)));
  CHECK(max_abs_diff(test.images, expected_images(test_seed, test_n)) < 1e-5);
}

TEST_CASE("cifar10 reads the red, green and blue planes in that order") {
  TempDir dir;
  // Record 0: red all 255, green all 0, blue all 128, label 9. Record 1: a gradient in red only.
  std::string bytes(2 * record_bytes, '\0');
  bytes[0] = 9;
  for (int i = 0; i < 1024; ++i) {
    bytes[1 + i] = static_cast<char>(255);
    bytes[1 + 2048 + i] = static_cast<char>(128);
    bytes[record_bytes + 1 + i] = static_cast<char>(i % 256);  // red of record 1: byte (row * 32 + col) % 256
  }
  bytes[record_bytes] = 0;
  write_file(dir.path / "data_batch_1.bin", bytes);

  const auto d = load_cifar10(dir.str(), true);
  REQUIRE(d.images.size(0) == 2);
  CHECK(d.labels.equal(at::tensor(std::vector<std::int64_t>{9, 0})));
  for (int c = 0; c < 3; ++c) {
    const double want = normalized(c == 0 ? 255 : c == 1 ? 0 : 128, c);
    const auto plane = d.images[0][c];
    CHECK(plane.min().item<double>() == doctest::Approx(want).epsilon(1e-6));
    CHECK(plane.max().item<double>() == doctest::Approx(want).epsilon(1e-6));
  }
  // Row-major within a plane: (row 2, col 5) is byte 2 * 32 + 5 = 69.
  CHECK(std::abs(d.images[1][0][2][5].item<double>() - normalized(69, 0)) < 1e-5);
  CHECK(std::abs(d.images[1][0][5][2].item<double>() - normalized(162, 0)) < 1e-5);
  CHECK(std::abs(d.images[1][1][2][5].item<double>() - normalized(0, 1)) < 1e-5);
  CHECK(std::abs(d.images[1][2][2][5].item<double>() - normalized(0, 2)) < 1e-5);
}

TEST_CASE("cifar10 keeps the first limit samples") {
  TempDir dir;
  write_small_cifar(dir);
  const auto all = load_cifar10(dir.str(), true);

  const auto first = load_cifar10(dir.str(), true, 5);
  REQUIRE(first.images.sizes() == at::IntArrayRef({5, 3, 32, 32}));
  REQUIRE(first.labels.sizes() == at::IntArrayRef({5}));
  CHECK(first.images.equal(all.images.slice(0, 0, 5)));
  CHECK(first.labels.equal(all.labels.slice(0, 0, 5)));

  CHECK(load_cifar10(dir.str(), true, 100).labels.size(0) == train_n);  // a limit beyond n keeps all
  CHECK(load_cifar10(dir.str(), true, 0).labels.size(0) == train_n);
  CHECK(load_cifar10(dir.str(), false, 1).labels.size(0) == 1);
  CHECK(load_cifar10(dir.str(), false, 1).labels[0].item<std::int64_t>() == label_of(test_seed, 0));
}

TEST_CASE("cifar10 train reads the batch files that exist in order and stops at the first missing one") {
  TempDir dir;
  write_small_cifar(dir);
  // data_batch_3.bin without data_batch_2.bin: only data_batch_1.bin is read.
  write_file(dir.path / "data_batch_3.bin", batch_bytes(5, 2));
  const auto only_first = load_cifar10(dir.str(), true);
  CHECK(only_first.labels.size(0) == train_n);
  CHECK(only_first.labels.equal(expected_labels(train_seed, train_n)));

  // With data_batch_2.bin (4 records), batches 1, 2 and 3 follow each other.
  constexpr int seed2 = 3;
  write_file(dir.path / "data_batch_2.bin", batch_bytes(seed2, 4));
  const auto three = load_cifar10(dir.str(), true);
  REQUIRE(three.labels.size(0) == train_n + 4 + 2);
  const auto want_images = at::cat({expected_images(train_seed, train_n), expected_images(seed2, 4), expected_images(5, 2)});
  const auto want_labels = at::cat({expected_labels(train_seed, train_n), expected_labels(seed2, 4), expected_labels(5, 2)});
  CHECK(three.labels.equal(want_labels));
  CHECK(max_abs_diff(three.images, want_images) < 1e-5);

  // A limit that ends inside data_batch_2.bin.
  const auto nine = load_cifar10(dir.str(), true, 9);
  CHECK(nine.labels.equal(want_labels.slice(0, 0, 9)));
  CHECK(max_abs_diff(nine.images, want_images.slice(0, 0, 9)) < 1e-5);
}

TEST_CASE("cifar10 is_cifar10_dir needs data_batch_1.bin and test_batch.bin") {
  TempDir dir;
  CHECK_FALSE(hive::examples::is_cifar10_dir(dir.str()));
  write_file(dir.path / "data_batch_1.bin", batch_bytes(train_seed, 1));
  CHECK_FALSE(hive::examples::is_cifar10_dir(dir.str()));
  write_file(dir.path / "test_batch.bin", batch_bytes(test_seed, 1));
  CHECK(hive::examples::is_cifar10_dir(dir.str()));
  CHECK_FALSE(hive::examples::is_cifar10_dir((dir.path / "no-such-dir").string()));
}

TEST_CASE("cifar10 rejects missing files, truncated files and bad labels with hive::Error") {
  TempDir dir;

  SUBCASE("missing directory") {
    const auto missing = (dir.path / "no-such-dir").string();
    CHECK_THROWS_AS(load_cifar10(missing, true), hive::Error);
    CHECK_THROWS_AS(load_cifar10(missing, false), hive::Error);
    const auto msg = error_of([&] { load_cifar10(missing, true); });
    CHECK(msg.find("data_batch_1.bin") != std::string::npos);
    CHECK(msg.find("cifar-10-batches-bin") != std::string::npos);
  }

  SUBCASE("missing test_batch.bin") {
    write_file(dir.path / "data_batch_1.bin", batch_bytes(train_seed, 2));
    const auto msg = error_of([&] { load_cifar10(dir.str(), false); });
    CHECK(msg.find("test_batch.bin") != std::string::npos);
    CHECK(msg.find("binary version") != std::string::npos);
  }

  SUBCASE("truncated file") {
    auto bytes = batch_bytes(train_seed, 3);
    bytes.resize(bytes.size() - 100);
    write_file(dir.path / "data_batch_1.bin", bytes);
    CHECK_THROWS_AS(load_cifar10(dir.str(), true), hive::Error);
    CHECK_THROWS_AS(load_cifar10(dir.str(), true, 1), hive::Error);  // checked even when the limit stops earlier
    const auto msg = error_of([&] { load_cifar10(dir.str(), true); });
    CHECK(msg.find("data_batch_1.bin") != std::string::npos);
    CHECK(msg.find("3073") != std::string::npos);
  }

  SUBCASE("truncated later batch") {
    write_file(dir.path / "data_batch_1.bin", batch_bytes(train_seed, 2));
    write_file(dir.path / "data_batch_2.bin", batch_bytes(train_seed, 2).substr(0, 5000));
    const auto msg = error_of([&] { load_cifar10(dir.str(), true); });
    CHECK(msg.find("data_batch_2.bin") != std::string::npos);
  }

  SUBCASE("empty file") {
    write_file(dir.path / "test_batch.bin", "");
    CHECK_THROWS_AS(load_cifar10(dir.str(), false), hive::Error);
  }

  SUBCASE("bad label") {
    auto bytes = batch_bytes(test_seed, 3);
    bytes[2 * record_bytes] = 10;  // the label of record 2
    write_file(dir.path / "test_batch.bin", bytes);
    CHECK_THROWS_AS(load_cifar10(dir.str(), false), hive::Error);
    const auto msg = error_of([&] { load_cifar10(dir.str(), false); });
    CHECK(msg.find("test_batch.bin") != std::string::npos);
    CHECK(msg.find("record 2") != std::string::npos);
    CHECK(msg.find("10") != std::string::npos);
    CHECK(load_cifar10(dir.str(), false, 2).labels.size(0) == 2);  // the records before it are fine
  }
}

#ifdef HIVE_AVERAGING_PEER
#include <cstdlib>
#include <sstream>

TEST_CASE("cifar10: the averaging peer trains on a directory in CIFAR-10's format") {
  TempDir dir;
  write_file(dir.path / "data_batch_1.bin", batch_bytes(1, 96));
  write_file(dir.path / "test_batch.bin", batch_bytes(2, 40));
  const auto log = dir.path / "peer.log";
  const auto command = fmt::format("{} --alone --data_dir {} --train_samples 0 --test_samples 0 --epochs 1 --batch 16 > {}",
                                   HIVE_AVERAGING_PEER, dir.str(), log.string());
  CHECK(std::system(command.c_str()) == 0);
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  CHECK(text.str().find("CIFAR-10: training on 96 samples") != std::string::npos);
  CHECK(text.str().find("test accuracy:") != std::string::npos);
  // A directory without CIFAR-10's files is refused with a clear message, not misread.
  const auto missing = fmt::format("{} --alone --data_dir {} 2> {}", HIVE_AVERAGING_PEER, (dir.path / "none").string(),
                                   log.string());
  CHECK(std::system(missing.c_str()) != 0);
  std::ifstream err(log);
  std::stringstream message;
  message << err.rdbuf();
  CHECK(message.str().find("does not hold CIFAR-10's binary files") != std::string::npos);
}
#endif
