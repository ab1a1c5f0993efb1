#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/id.hpp>
#include <hive/core/limits.hpp>
#include <hive/core/log.hpp>
#include <hive/core/message.hpp>
#include <hive/core/blas.hpp>
#include <hive/core/buffer.hpp>
#include <hive/core/progress.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

using namespace hive;

TEST_CASE("errc maps to its category and RemoteError keeps the remote message") {
  std::error_code ec = errc::timeout;
  CHECK(ec.category().name() == std::string("hive"));
  CHECK(ec.message() == "operation timed out");
  CHECK(ec == make_error_code(errc::timeout));
  RemoteError e(errc::remote_error, "division by zero");
  CHECK(e.remote_message() == "division by zero");
  CHECK(e.code() == make_error_code(errc::remote_error));
  CHECK(std::string(e.what()).find("division by zero") != std::string::npos);
}

TEST_CASE("HIVE_CHECK throws InvalidArgument with the formatted message") {
  auto f = [](int n) { HIVE_CHECK(n > 0, "n must be positive, got {}", n); return n; };
  CHECK(f(3) == 3);
  try {
    f(-2);
    FAIL("no throw");
  } catch (const InvalidArgument& e) {
    CHECK(std::string(e.what()).find("n must be positive, got -2") != std::string::npos);
    CHECK(std::string(e.what()).find("n > 0") != std::string::npos);
  }
}

TEST_CASE("sha1 matches FIPS 180 test vectors") {
  CHECK(Id160::of("").hex() == "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  CHECK(Id160::of("abc").hex() == "a9993e364706816aba3e25717850c26c9cd0d89d");
  CHECK(Id160::of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq").hex() ==
        "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
  CHECK(Id160::of(std::string(1000000, 'a')).hex() == "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
}

TEST_CASE("Id160 xor metric, ordering, hex round trip") {
  auto a = Id160::random(), b = Id160::random();
  CHECK(Id160::from_hex(a.hex()) == a);
  CHECK((a ^ a) == Id160{});
  CHECK((a ^ b) == (b ^ a));
  CHECK((a ^ a).leading_zeros() == 160);
  CHECK_THROWS_AS(Id160::from_hex("zz"), InvalidArgument);
  CHECK_THROWS_AS(Id160::from_hex(std::string(40, 'g')), InvalidArgument);
  std::array<std::uint8_t, 20> hi{};
  hi[0] = 0x80;
  CHECK(Id160(hi) > Id160{});
  CHECK(Id160(hi).leading_zeros() == 0);
  CHECK(Id160(hi).bit(0));
}

TEST_CASE("options read from JSON, keep defaults, and reject unknown keys") {
  Limits l = nlohmann::json::parse(R"({"max_blobs": 7})").get<Limits>();
  CHECK(l.max_blobs() == 7);
  CHECK(l.max_tensor_rank() == Limits().max_tensor_rank());
  nlohmann::json j = l;
  CHECK(j["max_blobs"] == 7);
  CHECK_THROWS_AS(Limits::from_json_text(R"({"max_blob": 7})"), InvalidArgument);
  CHECK_THROWS_AS(Limits::from_json_text(R"({"max_blobs": "seven"})"), InvalidArgument);
  CHECK(Limits().max_blobs(3).max_header_bytes(10).max_blobs() == 3);
}

TEST_CASE("log level parsing") {
  CHECK(log::parse_level("debug") == log::Level::debug);
  CHECK(log::parse_level("nonsense", log::Level::warn) == log::Level::warn);
  auto old = log::level();
  log::set_level(log::Level::error);
  CHECK_FALSE(log::enabled(log::Level::info));
  log::set_level(old);
}

TEST_CASE("Buffer slices share their owner") {
  auto b = Buffer::copy_of(std::string_view("hello world"));
  auto s = b.slice(6, 5);
  CHECK(s == Buffer::copy_of(std::string_view("world")));
  CHECK(s.owner() == b.owner());
  CHECK(Buffer::adopt(std::vector<std::byte>(3)).size() == 3);
}

TEST_CASE("progress: a log gets a line every few percent, a terminal one redrawn line") {
  auto read_all = [](std::FILE* f) {
    std::rewind(f);
    std::string text;
    for (int c; (c = std::fgetc(f)) != EOF;) text.push_back(static_cast<char>(c));
    return text;
  };
  {
    std::FILE* log = std::tmpfile();
    REQUIRE(log);
    hive::Progress progress("store", 1000, log, 5, /*terminal=*/false);
    for (std::size_t i = 0; i <= 1000; ++i) progress.update(i, "x");
    progress.update(1000);  // the end again: no second final line
    progress.finish();
    const auto text = read_all(log);
    CHECK(text.find('\r') == std::string::npos);
    CHECK(std::count(text.begin(), text.end(), '\n') == 21);  // 0%, 5%, ..., 100%
    CHECK(text.find("store   0% 0/1000 x\n") == 0);
    CHECK(text.find("store 100% 1000/1000 x\n") != std::string::npos);
    std::fclose(log);
  }
  {
    std::FILE* tty = std::tmpfile();
    REQUIRE(tty);
    {
      hive::Progress progress("get", 10, tty, 5, /*terminal=*/true);
      for (std::size_t i = 0; i <= 10; ++i) progress.update(i);
      // finish() not called: the destructor ends the line.
    }
    const auto text = read_all(tty);
    CHECK(std::count(text.begin(), text.end(), '\r') == 11);
    CHECK(std::count(text.begin(), text.end(), '\n') == 1);
    CHECK(text.back() == '\n');
    CHECK(text.find("[##############################] 100% 10/10") != std::string::npos);
    std::fclose(tty);
  }
}

TEST_CASE("blas: advice names the OPENBLAS_CORETYPE when the kernels are older than the CPU") {
  // This machine's case: OpenBLAS 0.3.21 did not recognise the CPU and fell back to Prescott.
  const auto advice = hive::blas_advice("Prescott", 3);
  CHECK(advice.find("OPENBLAS_CORETYPE=SkylakeX") != std::string::npos);
  CHECK(advice.find("AVX-512") != std::string::npos);
  CHECK(hive::blas_advice("Prescott", 2).find("OPENBLAS_CORETYPE=Haswell") != std::string::npos);
  CHECK(hive::blas_advice("Nehalem", 1).find("OPENBLAS_CORETYPE=Sandybridge") != std::string::npos);
  CHECK(hive::blas_advice("Sandybridge", 3).find("OPENBLAS_CORETYPE=SkylakeX") != std::string::npos);
  // Kernels as wide as the CPU's vectors, or wider: nothing to say.
  CHECK(hive::blas_advice("Haswell", 2).empty());
  CHECK(hive::blas_advice("Zen", 2).empty());
  CHECK(hive::blas_advice("SkylakeX", 3).empty());
  CHECK(hive::blas_advice("SkylakeX", 2).empty());
  CHECK(hive::blas_advice("Prescott", 0).empty());
  // No OpenBLAS, a name it does not know, or a level out of range: no advice.
  CHECK(hive::blas_advice("", 3).empty());
  CHECK(hive::blas_advice("SomeFutureCore", 3).empty());
  CHECK(hive::blas_advice("Prescott", 4).empty());
  CHECK(hive::blas_advice("Prescott", -1).empty());
  // This process does not load libtorch, so no OpenBLAS: the runtime check has nothing to say.
  CHECK(hive::blas_core().empty());
  CHECK(hive::blas_advice().empty());
  const int level = hive::cpu_vector_level();
  CHECK((level >= 0 && level <= 3));
}

TEST_CASE("integer_of and integer_field: integers in range only, never a float (NaN, 1e300, even 1.0)") {
  using nlohmann::json;
  CHECK(integer_of<std::size_t>(json(7)) == 7U);
  CHECK(integer_of<std::int64_t>(json(-3)) == -3);
  CHECK(integer_of<std::uint16_t>(json(65535)) == 65535);
  CHECK_FALSE(integer_of<std::uint16_t>(json(65536)));
  CHECK_FALSE(integer_of<std::size_t>(json(-1)));
  CHECK_FALSE(integer_of<std::int64_t>(json(std::numeric_limits<std::uint64_t>::max())));
  for (const json& j : {json(std::nan("")), json(1e300), json(-1e300), json(1.0), json("1"), json(true), json(nullptr),
                        json::array({1}), json::object()})
    CHECK_FALSE(integer_of<std::size_t>(j));
  // What the MessagePack of another peer decodes to: a float64 NaN where an index belongs.
  const auto nan_index = json::from_msgpack(std::vector<std::uint8_t>{0x81, 0xa5, 'i', 'n', 'd', 'e', 'x', 0xcb, 0xff, 0xff,
                                                                     0xff, 0xff, 0xff, 0xff, 0xff, 0xff});
  // The reason, with errc::bad_header, of what `read` throws.
  const auto refusal = [](auto read) -> std::string {
    try {
      (void)read();
    } catch (const Error& e) {
      CHECK(e.code() == errc::bad_header);
      return e.what();
    }
    return "(read)";
  };
  CHECK(refusal([&] { return integer_field<std::size_t>(nan_index, "index", "avg.join reply"); })
            .starts_with("avg.join reply: 'index' must be an integer from 0 to 18446744073709551615"));
  CHECK(refusal([&] { return integer_field<int>(json::object(), "index", "x"); }).starts_with("x: 'index' is missing"));
  CHECK(refusal([&] { return integer_field<int>(json::array(), "index", "x"); }).starts_with("x: the header is not a map"));
  CHECK(refusal([&] { return integer_field<int>(json{{"index", 0.5}}, "index", "x", 5); }).starts_with("x: 'index' must be"));
  CHECK(integer_field<int>(json::object(), "index", "x", 5) == 5);
  CHECK(integer_field<int>(json{{"index", 2}}, "index", "x", 5) == 2);
}
