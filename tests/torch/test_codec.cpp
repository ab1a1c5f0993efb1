// Tests for the tensor codec (hive/core/tensor_codec.hpp): exact round trips, zero-copy paths,
// validation of hostile descriptors and payloads, and the compression error bounds.
#include <hive/core/tensor_codec.hpp>

#include <ATen/ATen.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

using hive::Buffer;
using hive::Compression;
using hive::errc;
using hive::Limits;
using hive::Message;
using nlohmann::json;

namespace {

const std::vector<at::ScalarType> all_dtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kChar,
                                                at::kShort, at::kInt,    at::kLong, at::kByte,     at::kBool};

at::Tensor random_tensor(at::IntArrayRef shape, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16: return (at::randn(shape, at::kDouble) * 100).to(dtype);
    case at::kBool: return at::randint(0, 2, shape, at::kLong).to(at::kBool);
    case at::kByte: return at::randint(0, 256, shape, at::kLong).to(at::kByte);
    case at::kChar: return at::randint(-128, 128, shape, at::kLong).to(at::kChar);
    case at::kShort: return at::randint(-32768, 32768, shape, at::kLong).to(at::kShort);
    case at::kInt: return at::randint(-(1ll << 31), 1ll << 31, shape, at::kLong).to(at::kInt);
    default: return at::randint(-(1ll << 62), 1ll << 62, shape, at::kLong);
  }
}

/// The tensors of one dtype that cover every layout the codec must handle.
std::vector<std::pair<std::string, at::Tensor>> shape_classes(at::ScalarType dtype) {
  return {
      {"0-d", random_tensor({}, dtype)},
      {"empty {0}", random_tensor({0}, dtype)},
      {"empty {0,3}", random_tensor({0, 3}, dtype)},
      {"empty {2,0,5}", random_tensor({2, 0, 5}, dtype)},
      {"1-d", random_tensor({7}, dtype)},
      {"4-d", random_tensor({2, 3, 4, 5}, dtype)},
      {"transposed", random_tensor({3, 5}, dtype).t()},
      {"sliced with stride 3", random_tensor({10, 4}, dtype).slice(0, 0, 10, 3)},
      {"expanded (stride 0)", random_tensor({1, 4}, dtype).expand({3, 4})},
      {"view with storage offset", random_tensor({10}, dtype).slice(0, 3, 8)},
      {"1M elements", random_tensor({1 << 20}, dtype)},
  };
}

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  return ca.nbytes() == cb.nbytes() && (ca.nbytes() == 0 || std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0);
}

bool points_into(const void* p, const Buffer& b) {
  const auto* q = static_cast<const std::byte*>(p);
  return q >= b.data() && q < b.data() + b.size();
}

/// The hive::errc an operation fails with, or nullopt when it does not throw hive::Error.
std::optional<errc> error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const hive::Error& e) {
    if (e.code().category() == hive::error_category()) return static_cast<errc>(e.code().value());
    return std::nullopt;
  }
  return std::nullopt;
}

/// Simulates the wire: the header goes through MessagePack and the blobs are copied into a
/// fresh receive buffer, as a socket would deliver them.
Message over_the_wire(const Message& m) {
  Message r;
  r.header = json::from_msgpack(json::to_msgpack(m.header));
  for (const auto& b : m.blobs) r.add_blob(Buffer::copy_of(b.bytes()));
  return r;
}

Buffer floats_then(std::vector<float> head, std::size_t codes) {
  std::vector<std::byte> bytes(head.size() * sizeof(float) + codes, std::byte{7});
  std::memcpy(bytes.data(), head.data(), head.size() * sizeof(float));
  return Buffer::adopt(std::move(bytes));
}

/// Relative half-ulp of round-to-nearest into a dtype: the slack for storing a result in it.
double rounding_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return std::ldexp(1.0, -24);
    case at::kHalf: return std::ldexp(1.0, -11);
    case at::kBFloat16: return std::ldexp(1.0, -8);
    default: return std::ldexp(1.0, -52);
  }
}

std::vector<double> as_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  return {p, p + d.numel()};
}

std::vector<std::uint8_t> codes_of(const Buffer& payload, std::size_t header) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(payload.data()) + header;
  return {p, p + (payload.size() - header)};
}

float float_at(const Buffer& payload, std::size_t index) {
  float f;
  std::memcpy(&f, payload.data() + index * sizeof(float), sizeof f);
  return f;
}

/// The data sets the compression bounds are checked on.
std::vector<std::pair<std::string, at::Tensor>> value_classes(at::ScalarType dtype) {
  return {
      {"normal", at::randn({20000}, at::kDouble).to(dtype)},
      {"normal 2-d transposed", at::randn({100, 50}, at::kDouble).t().to(dtype)},
      {"uniform [-5, 20)", (at::rand({20000}, at::kDouble) * 25 - 5).to(dtype)},
      {"wide normal", (at::randn({5000}, at::kDouble) * 1000).to(dtype)},
      {"constant", at::full({1000}, 3.25, at::kDouble).to(dtype)},
      {"constant 0.1", at::full({64}, 0.1, at::kDouble).to(dtype)},
      {"single value", at::full({1}, -7.5, at::kDouble).to(dtype)},
      {"tiny", at::randn({5}, at::kDouble).to(dtype)},
      {"300 values", at::randn({300}, at::kDouble).to(dtype)},
      {"0-d", at::randn({}, at::kDouble).to(dtype)},
      {"empty", at::randn({0, 4}, at::kDouble).to(dtype)},
  };
}

}  // namespace

TEST_CASE("codec: compression names round-trip through strings and JSON") {
  for (auto c : {Compression::none, Compression::float16, Compression::uniform8, Compression::quantile8}) {
    CHECK(hive::parse_compression(hive::to_string(c)) == c);
    CHECK(json(c).get<Compression>() == c);
  }
  CHECK(json(Compression::quantile8) == "quantile8");
  CHECK_FALSE(hive::compression_from_string("gzip").has_value());
  CHECK_THROWS_AS((void)hive::parse_compression("gzip"), hive::InvalidArgument);
  CHECK_THROWS_AS((void)json(3).get<Compression>(), hive::InvalidArgument);
}

TEST_CASE("codec: every dtype and layout round-trips bit for bit with codec none") {
  for (auto dtype : all_dtypes) {
    for (const auto& [name, t] : shape_classes(dtype)) {
      CAPTURE(c10::toString(dtype));
      CAPTURE(name);
      auto e = hive::encode_tensor(t);
      CHECK(e.descriptor["codec"] == "none");
      CHECK(e.descriptor["dtype"] == hive::detail::dtype_name(dtype));
      CHECK(e.descriptor["shape"].get<std::vector<std::int64_t>>() == t.sizes().vec());
      CHECK(e.payload.size() == static_cast<std::size_t>(t.numel() * t.element_size()));
      const at::Tensor d = hive::decode_tensor(e.descriptor, e.payload);
      CHECK(d.is_contiguous());
      CHECK(same_bytes(d, t));

      Message m;
      hive::add_tensors(m, {t, t});
      const auto back = hive::get_tensors(over_the_wire(m));
      REQUIRE(back.size() == 2);
      CHECK(same_bytes(back[0], t));
      CHECK(same_bytes(back[1], t));
    }
  }
}

TEST_CASE("codec: non-finite floats, negative views and tensors that require grad round-trip exactly") {
  const float inf = std::numeric_limits<float>::infinity();
  const at::Tensor special = at::tensor({0.0f, -0.0f, inf, -inf, std::nanf(""), 1e-45f, 3.4e38f});
  CHECK(same_bytes(hive::decode_tensor(hive::encode_tensor(special).descriptor, hive::encode_tensor(special).payload),
                   special));

  const at::Tensor x = at::randn({4, 3});
  const at::Tensor negated = at::_neg_view(x);
  REQUIRE(negated.is_neg());
  auto e = hive::encode_tensor(negated);
  CHECK(at::equal(hive::decode_tensor(e.descriptor, e.payload), -x));
  auto q = hive::encode_tensor(negated, Compression::quantile8);
  CHECK(at::allclose(hive::decode_tensor(q.descriptor, q.payload), -x, 0, 0.2));

  const at::Tensor w = at::randn({5}).set_requires_grad(true);
  auto g = hive::encode_tensor(w);
  CHECK(at::equal(hive::decode_tensor(g.descriptor, g.payload), w.detach()));
}

TEST_CASE("codec: encoding a contiguous tensor aliases its storage and keeps it alive") {
  at::Tensor t = at::arange(1000, at::kFloat).slice(0, 10, 510);  // contiguous, with an offset
  auto e = hive::encode_tensor(t);
  CHECK(static_cast<const void*>(e.payload.data()) == t.data_ptr());
  const at::Tensor expected = t.clone();
  t = at::Tensor();  // drop the caller's reference: the payload alone keeps the bytes
  CHECK(e.payload.size() == 500 * sizeof(float));
  CHECK(at::equal(hive::decode_tensor(e.descriptor, e.payload), expected));

  // A non-contiguous tensor has to be packed, so its payload is a fresh copy.
  const at::Tensor nc = at::randn({6, 7}).t();
  auto p = hive::encode_tensor(nc);
  CHECK_FALSE(points_into(nc.data_ptr(), p.payload));
  CHECK(at::equal(hive::decode_tensor(p.descriptor, p.payload), nc));
}

TEST_CASE("codec: decoding an aligned payload aliases it and keeps it alive") {
  bool freed = false;
  at::Tensor decoded;
  const at::Tensor source = at::randn({64, 3}, at::kDouble);
  {
    auto bytes = std::shared_ptr<std::vector<std::byte>>(
        new std::vector<std::byte>(source.nbytes()), [&freed](std::vector<std::byte>* v) {
          freed = true;
          delete v;
        });
    std::memcpy(bytes->data(), source.data_ptr(), source.nbytes());
    Message m;
    m.header = json::object();
    const std::byte* data = bytes->data();
    m.add_blob(Buffer(std::move(bytes), data, source.nbytes()));
    const json d = {{"dtype", "float64"}, {"shape", {64, 3}}, {"codec", "none"}, {"blob", 0}};
    decoded = hive::get_tensor(m, d);
    CHECK(points_into(decoded.data_ptr(), m.blobs[0]));
  }
  CHECK_FALSE(freed);  // the Message is gone; the tensor's storage holds the receive buffer
  CHECK(at::equal(decoded, source));
  decoded = at::Tensor();
  CHECK(freed);
}

TEST_CASE("codec: a misaligned or ownerless payload is copied") {
  const at::Tensor source = at::randn({100});
  std::vector<std::byte> bytes(source.nbytes() + 1);
  std::memcpy(bytes.data() + 1, source.data_ptr(), source.nbytes());
  const Buffer whole = Buffer::adopt(std::move(bytes));
  const Buffer misaligned = whole.slice(1, source.nbytes());
  const json d = {{"dtype", "float32"}, {"shape", {100}}, {"codec", "none"}};
  const at::Tensor a = hive::decode_tensor(d, misaligned);
  CHECK_FALSE(points_into(a.data_ptr(), whole));
  CHECK(at::equal(a, source));

  const Buffer ownerless(nullptr, static_cast<const std::byte*>(source.data_ptr()), source.nbytes());
  const at::Tensor b = hive::decode_tensor(d, ownerless);
  CHECK(b.data_ptr() != source.data_ptr());
  CHECK(at::equal(b, source));
}

TEST_CASE("codec: bad descriptors and payloads are rejected with bad_tensor or limit_exceeded") {
  const Buffer six_floats = Buffer::copy_of(std::string(24, '\0'));
  const json good = {{"dtype", "float32"}, {"shape", {2, 3}}, {"codec", "none"}};
  REQUIRE_FALSE(error_of([&] { (void)hive::decode_tensor(good, six_floats); }).has_value());
  const json huge_but_empty = {{"dtype", "float32"}, {"shape", {0, 1ll << 62}}, {"codec", "none"}};
  CHECK(hive::decode_tensor(huge_but_empty, Buffer()).sizes() == at::IntArrayRef({0, 1ll << 62}));

  auto with = [&](const char* key, json value) {
    json d = good;
    d[key] = std::move(value);
    return d;
  };
  auto without = [&](const char* key) {
    json d = good;
    d.erase(key);
    return d;
  };
  struct Case {
    std::string what;
    json descriptor;
    Buffer payload;
    errc expected;
    Limits limits = {};
  };
  const std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();
  const std::string invalid_utf8 = "\xff\xfe float";
  std::vector<Case> cases = {
      {"descriptor is an array", json::array({1, 2}), six_floats, errc::bad_tensor},
      {"descriptor is a string", "float32", six_floats, errc::bad_tensor},
      {"descriptor is null", json(), six_floats, errc::bad_tensor},
      {"dtype missing", without("dtype"), six_floats, errc::bad_tensor},
      {"dtype not a string", with("dtype", 6), six_floats, errc::bad_tensor},
      {"unknown dtype", with("dtype", "float128"), six_floats, errc::bad_tensor},
      {"complex dtype", with("dtype", "complex64"), six_floats, errc::bad_tensor},
      {"dtype of invalid UTF-8", with("dtype", invalid_utf8), six_floats, errc::bad_tensor},
      {"shape missing", without("shape"), six_floats, errc::bad_tensor},
      {"shape is a string", with("shape", "2x3"), six_floats, errc::bad_tensor},
      {"shape is an object", with("shape", {{"rows", 2}}), six_floats, errc::bad_tensor},
      {"negative dimension", with("shape", {-2, -3}), six_floats, errc::bad_tensor},
      {"fractional dimension", with("shape", {1.5, 4}), six_floats, errc::bad_tensor},
      {"float-typed whole dimension", with("shape", {2.0, 3}), six_floats, errc::bad_tensor},
      {"string dimension", with("shape", {"2", 3}), six_floats, errc::bad_tensor},
      {"bool dimension", with("shape", {true, 6}), six_floats, errc::bad_tensor},
      {"null dimension", with("shape", {nullptr, 6}), six_floats, errc::bad_tensor},
      {"dimension above int64", with("shape", {u64_max}), six_floats, errc::bad_tensor},
      {"element count overflows 64 bits", with("shape", {1ull << 40, 1ull << 40}), six_floats, errc::bad_tensor},
      {"empty but with overflowing strides", with("shape", {0, 1ull << 62, 1ull << 62}), Buffer(), errc::bad_tensor},
      {"elements over the limit", with("shape", {1ull << 31, 1ull << 31}), six_floats, errc::limit_exceeded},
      {"elements over a tight limit", with("shape", {7}), six_floats, errc::limit_exceeded,
       Limits().max_tensor_elements(6)},
      {"rank over the default limit", with("shape", json(std::vector<int>(17, 1))), six_floats, errc::limit_exceeded},
      {"rank over a tight limit", with("shape", {1, 2, 3}), six_floats, errc::limit_exceeded, Limits().max_tensor_rank(2)},
      {"payload size overflows with the limit lifted", with("shape", {1ull << 31, 1ull << 31}), six_floats,
       errc::bad_tensor, Limits().max_tensor_elements(u64_max)},
      {"huge shape with a tiny payload", with("shape", {1 << 30}), six_floats, errc::bad_tensor},
      {"payload one byte short", good, Buffer::copy_of(std::string(23, '\0')), errc::bad_tensor},
      {"payload one byte long", good, Buffer::copy_of(std::string(25, '\0')), errc::bad_tensor},
      {"payload empty", good, Buffer(), errc::bad_tensor},
      {"codec missing", without("codec"), six_floats, errc::bad_tensor},
      {"codec not a string", with("codec", 0), six_floats, errc::bad_tensor},
      {"unknown codec", with("codec", "gzip"), six_floats, errc::bad_tensor},
      {"uniform8 on int32",
       {{"dtype", "int32"}, {"shape", {6}}, {"codec", "uniform8"}}, floats_then({0, 1}, 6), errc::bad_tensor},
      {"float16 on bool", {{"dtype", "bool"}, {"shape", {6}}, {"codec", "float16"}}, Buffer::copy_of(std::string(12, '\0')),
       errc::bad_tensor},
      {"quantile8 on uint8",
       {{"dtype", "uint8"}, {"shape", {6}}, {"codec", "quantile8"}}, floats_then(std::vector<float>(256), 6),
       errc::bad_tensor},
      {"bool byte other than 0 or 1", {{"dtype", "bool"}, {"shape", {3}}, {"codec", "none"}},
       Buffer::copy_of(std::string("\x01\x00\x02", 3)), errc::bad_tensor},
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const json u8 = {{"dtype", "float32"}, {"shape", {6}}, {"codec", "uniform8"}};
  const json q8 = {{"dtype", "float64"}, {"shape", {6}}, {"codec", "quantile8"}};
  cases.push_back({"uniform8 lo is NaN", u8, floats_then({nan, 1}, 6), errc::bad_tensor});
  cases.push_back({"uniform8 lo is -inf", u8, floats_then({-inf, 1}, 6), errc::bad_tensor});
  cases.push_back({"uniform8 scale is inf", u8, floats_then({0, inf}, 6), errc::bad_tensor});
  cases.push_back({"uniform8 scale is negative", u8, floats_then({0, -1}, 6), errc::bad_tensor});
  cases.push_back({"uniform8 payload without its header", u8, Buffer::copy_of(std::string(6, '\0')), errc::bad_tensor});
  std::vector<float> codebook(256, 1.0f);
  codebook[17] = nan;
  cases.push_back({"quantile8 codebook holds NaN", q8, floats_then(codebook, 6), errc::bad_tensor});
  codebook[17] = 1;
  codebook[255] = inf;
  cases.push_back({"quantile8 codebook holds inf", q8, floats_then(codebook, 6), errc::bad_tensor});
  cases.push_back({"quantile8 codebook truncated", q8, floats_then(std::vector<float>(255), 6), errc::bad_tensor});

  for (const auto& c : cases) {
    CAPTURE(c.what);
    const auto code = error_of([&] { (void)hive::decode_tensor(c.descriptor, c.payload, c.limits); });
    CHECK(code == c.expected);
  }
}

TEST_CASE("codec: message helpers reject bad blob references and headers") {
  Message m;
  hive::add_tensors(m, {at::ones({2})});
  json d = m.header["tensors"][0];
  CHECK(at::equal(hive::get_tensor(m, d), at::ones({2})));
  for (const json& blob : {json(1), json(-1), json("0"), json(0.0), json()}) {
    CAPTURE(blob.dump());
    json bad = d;
    bad["blob"] = blob;
    CHECK(error_of([&] { (void)hive::get_tensor(m, bad); }) == errc::bad_tensor);
  }
  d.erase("blob");
  CHECK(error_of([&] { (void)hive::get_tensor(m, d); }) == errc::bad_tensor);
  CHECK(error_of([&] { (void)hive::get_tensor(m, json::array()); }) == errc::bad_tensor);

  Message no_header;
  CHECK(error_of([&] { (void)hive::get_tensors(no_header); }) == errc::bad_tensor);
  Message no_list;
  no_list.header = {{"method", "forward"}};
  CHECK(error_of([&] { (void)hive::get_tensors(no_list); }) == errc::bad_tensor);
  Message not_a_list = m;
  not_a_list.header["tensors"] = {{"0", 1}};
  CHECK(error_of([&] { (void)hive::get_tensors(not_a_list); }) == errc::bad_tensor);
  Message too_many = m;
  too_many.header["tensors"].push_back(too_many.header["tensors"][0]);
  CHECK(error_of([&] { (void)hive::get_tensors(too_many); }) == errc::bad_tensor);

  // The failing entry is named, and the code is kept.
  Message second_bad;
  hive::add_tensors(second_bad, {at::ones({2}), at::ones({3})});
  second_bad.header["tensors"][1]["shape"] = {-3};
  try {
    (void)hive::get_tensors(second_bad);
    FAIL("expected hive::Error");
  } catch (const hive::Error& e) {
    CHECK(e.code() == hive::make_error_code(errc::bad_tensor));
    CHECK(std::string(e.what()).starts_with("tensors[1]: tensor: negative dimension -3"));
  }

  // A failed add leaves the message as it was; a header that cannot hold tensors is misuse.
  Message partial;
  CHECK(error_of([&] { hive::add_tensors(partial, {at::ones({2}), at::Tensor()}); }) == errc::bad_tensor);
  CHECK(partial.header.is_null());
  CHECK(partial.blobs.empty());
  Message array_header;
  array_header.header = json::array();
  CHECK_THROWS_AS(hive::add_tensors(array_header, {at::ones({2})}), hive::InvalidArgument);
  Message empty_list;
  hive::add_tensors(empty_list, std::vector<at::Tensor>{});
  CHECK(hive::get_tensors(empty_list).empty());
  hive::add_tensors(empty_list, {at::ones({1})});
  hive::add_tensors(empty_list, {at::zeros({1})});
  const auto two = hive::get_tensors(empty_list);
  REQUIRE(two.size() == 2);
  CHECK(two[1].item<float>() == 0);
}

TEST_CASE("codec: tensors the codec cannot carry are rejected at encode") {
  CHECK(error_of([] { (void)hive::encode_tensor(at::Tensor()); }) == errc::bad_tensor);
  CHECK(error_of([] { (void)hive::encode_tensor(at::randn({2}, at::kComplexFloat)); }) == errc::bad_tensor);
  CHECK(error_of([] { (void)hive::encode_tensor(at::empty({2}, at::TensorOptions().device(at::kMeta))); }) ==
        errc::bad_tensor);
  CHECK(error_of([] { (void)hive::encode_tensor(at::eye(3).to_sparse()); }) == errc::bad_tensor);

  // The 8-bit codecs have float32 levels: non-finite or out-of-range values cannot be coded.
  const double dnan = std::numeric_limits<double>::quiet_NaN();
  const double dinf = std::numeric_limits<double>::infinity();
  for (auto c : {Compression::uniform8, Compression::quantile8}) {
    CAPTURE(hive::to_string(c));
    CHECK(error_of([&] { (void)hive::encode_tensor(at::tensor({1.0, dnan, 2.0}).to(at::kFloat), c); }) ==
          errc::bad_tensor);
    CHECK(error_of([&] { (void)hive::encode_tensor(at::tensor({1.0, -dinf}), c); }) == errc::bad_tensor);
    CHECK(error_of([&] { (void)hive::encode_tensor(at::tensor({1.0, 1e300}), c); }) == errc::bad_tensor);
    CHECK(error_of([&] { (void)hive::encode_tensor(at::tensor({1.0, 3e38}), c); }) == std::nullopt);
  }
}

TEST_CASE("codec: compression falls back to none where it does not apply") {
  for (auto dtype : {at::kChar, at::kShort, at::kInt, at::kLong, at::kByte, at::kBool}) {
    const at::Tensor t = random_tensor({50}, dtype);
    for (auto c : {Compression::float16, Compression::uniform8, Compression::quantile8}) {
      CAPTURE(c10::toString(dtype));
      CAPTURE(hive::to_string(c));
      auto e = hive::encode_tensor(t, c);
      CHECK(e.descriptor["codec"] == "none");
      CHECK(same_bytes(hive::decode_tensor(e.descriptor, e.payload), t));
    }
  }
  // float16 would save nothing on a 16-bit tensor, and would clip bfloat16's range.
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    const at::Tensor t = random_tensor({50}, dtype);
    auto e = hive::encode_tensor(t, Compression::float16);
    CHECK(e.descriptor["codec"] == "none");
    CHECK(static_cast<const void*>(e.payload.data()) == t.data_ptr());
  }
  // Another implementation may still send bfloat16 as float16; it decodes to bfloat16.
  const at::Tensor b = at::tensor({1.5, -2.25, 100.0}).to(at::kBFloat16);
  const at::Tensor h = b.to(at::kHalf);
  const json d = {{"dtype", "bfloat16"}, {"shape", {3}}, {"codec", "float16"}};
  const at::Tensor back = hive::decode_tensor(d, Buffer::copy_of({static_cast<const std::byte*>(h.data_ptr()), 6}));
  CHECK((back.scalar_type() == at::kBFloat16));
  CHECK(same_bytes(back, b));
}

TEST_CASE("codec: float16 keeps |x - y| <= 2^-11 |x| + 2^-24 and clamps to +-65504") {
  double worst_relative = 0;
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (const auto& [name, t] : value_classes(dtype)) {
      CAPTURE(c10::toString(dtype));
      CAPTURE(name);
      auto e = hive::encode_tensor(t, Compression::float16);
      CHECK(e.descriptor["codec"] == "float16");
      CHECK(e.payload.size() == 2 * static_cast<std::size_t>(t.numel()));
      const at::Tensor y = hive::decode_tensor(e.descriptor, e.payload);
      REQUIRE((y.scalar_type() == dtype));
      REQUIRE(y.sizes() == t.sizes());
      const auto xs = as_doubles(t), ys = as_doubles(y);
      for (std::size_t i = 0; i < xs.size(); ++i) {
        const double err = std::abs(xs[i] - ys[i]);
        CHECK(err <= std::ldexp(std::abs(xs[i]), -11) + std::ldexp(1.0, -24));
        if (std::abs(xs[i]) > 1e-3) worst_relative = std::max(worst_relative, err / std::abs(xs[i]));
      }
    }
  }
  MESSAGE("float16 worst relative error on values above 1e-3: " << worst_relative);

  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor big = at::tensor({1e6, -1e6, 65504.0, 65519.0, inf, -inf, std::nan("")});
  auto e = hive::encode_tensor(big, Compression::float16);
  const auto ys = as_doubles(hive::decode_tensor(e.descriptor, e.payload));
  CHECK(ys[0] == 65504);
  CHECK(ys[1] == -65504);
  CHECK(ys[2] == 65504);
  CHECK(ys[3] == 65504);
  CHECK(ys[4] == 65504);
  CHECK(ys[5] == -65504);
  CHECK(std::isnan(ys[6]));
}

TEST_CASE("codec: uniform8 keeps every value within half a step of its level") {
  double worst_steps = 0;
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (const auto& [name, t] : value_classes(dtype)) {
      CAPTURE(c10::toString(dtype));
      CAPTURE(name);
      auto e = hive::encode_tensor(t, Compression::uniform8);
      CHECK(e.descriptor["codec"] == "uniform8");
      CHECK(e.payload.size() == 8 + static_cast<std::size_t>(t.numel()));
      const float lo = float_at(e.payload, 0), scale = float_at(e.payload, 1);
      const at::Tensor y = hive::decode_tensor(e.descriptor, e.payload);
      REQUIRE((y.scalar_type() == dtype));
      REQUIRE(y.sizes() == t.sizes());
      const auto xs = as_doubles(t), ys = as_doubles(y);
      for (std::size_t i = 0; i < xs.size(); ++i) {
        const double err = std::abs(xs[i] - ys[i]);
        const double slack = rounding_of(dtype) * std::max(std::abs(xs[i]), std::abs(ys[i])) +
                             1e-12 * (std::abs(xs[i]) + std::abs(lo));
        CHECK(err <= scale / 2 + slack);
        if (scale > 0) worst_steps = std::max(worst_steps, (err - slack) / scale);
      }
      if (name.starts_with("constant") || name == "single value" || name == "0-d") {
        CHECK(scale <= std::ldexp(std::abs(xs[0]), -24));
        if (dtype != at::kDouble) CHECK(same_bytes(y, t.contiguous()));
      }
    }
  }
  MESSAGE("uniform8 worst error in steps (bound 0.5): " << worst_steps);
}

TEST_CASE("codec: quantile8 keeps every value within its bucket's width") {
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    auto classes = value_classes(dtype);
    classes.emplace_back("1M normal (subsampled)", at::randn({1 << 20}, at::kDouble).to(dtype));
    for (const auto& [name, t] : classes) {
      CAPTURE(c10::toString(dtype));
      CAPTURE(name);
      auto e = hive::encode_tensor(t, Compression::quantile8);
      CHECK(e.descriptor["codec"] == "quantile8");
      CHECK(e.payload.size() == 1024 + static_cast<std::size_t>(t.numel()));
      const at::Tensor y = hive::decode_tensor(e.descriptor, e.payload);
      REQUIRE((y.scalar_type() == dtype));
      REQUIRE(y.sizes() == t.sizes());
      const auto xs = as_doubles(t.contiguous()), ys = as_doubles(y);
      const auto codes = codes_of(e.payload, 1024);
      std::vector<double> lo(256, std::numeric_limits<double>::infinity()), hi(256, -lo[0]);
      for (std::size_t i = 0; i < xs.size(); ++i) {
        lo[codes[i]] = std::min(lo[codes[i]], xs[i]);
        hi[codes[i]] = std::max(hi[codes[i]], xs[i]);
      }
      // Buckets are disjoint intervals in code order.
      double previous_hi = -std::numeric_limits<double>::infinity();
      for (std::size_t k = 0; k < 256; ++k) {
        if (lo[k] > hi[k]) continue;
        CHECK(lo[k] > previous_hi);
        previous_hi = hi[k];
      }
      // The codebook entry is the bucket mean, so it lies inside the bucket; float64 inputs
      // also lose the rounding of that mean to float32.
      const double mean_rounding = dtype == at::kDouble ? std::ldexp(1.0, -24) : 0.0;
      bool all_within = true;
      for (std::size_t i = 0; i < xs.size(); ++i) {
        const double width = hi[codes[i]] - lo[codes[i]];
        const double slack = (rounding_of(dtype) + mean_rounding) * std::abs(ys[i]) + 1e-300;
        all_within = all_within && std::abs(xs[i] - ys[i]) <= width + slack;
      }
      CHECK(all_within);
      if (t.numel() <= 256 && dtype != at::kDouble) CHECK(same_bytes(y, t.contiguous()));
    }
  }
}

TEST_CASE("codec: quantile8 is deterministic, exact on few distinct values, and beats uniform8") {
  const at::Tensor big = at::randn({1 << 20});
  const auto a = hive::encode_tensor(big, Compression::quantile8);
  const auto b = hive::encode_tensor(big, Compression::quantile8);
  CHECK(a.payload == b.payload);

  // Data with few distinct values, even unevenly spaced and in a tensor too big to be sampled
  // whole, is coded exactly.
  const at::Tensor values = at::tensor({-1000.0f, -1.0f, -1e-3f, 0.0f, 1e-6f, 1.0f, 1000.0f});
  const at::Tensor levels = values.index_select(0, at::randint(0, 7, {1 << 20}, at::kLong));
  const auto q = hive::encode_tensor(levels, Compression::quantile8);
  CHECK(at::equal(hive::decode_tensor(q.descriptor, q.payload), levels));

  auto rms = [](const at::Tensor& x, Compression c) {
    auto e = hive::encode_tensor(x, c);
    return hive::decode_tensor(e.descriptor, e.payload).sub(x).pow(2).mean().sqrt().item<double>();
  };
  const at::Tensor normal = at::randn({200000}, at::kFloat);
  const double rms_h = rms(normal, Compression::float16), rms_u = rms(normal, Compression::uniform8),
               rms_q = rms(normal, Compression::quantile8);
  MESSAGE("RMS error on N(0,1), 200k values: float16 " << rms_h << ", uniform8 " << rms_u << ", quantile8 "
                                                       << rms_q);
  CHECK(rms_q < rms_u);
  CHECK(rms_h < rms_q);

  // A few outliers stretch uniform8's grid over all values; quantile8 gives them their own levels.
  at::Tensor spiky = at::randn({200000}, at::kFloat);
  spiky.slice(0, 0, 200000, 10000).mul_(1000);
  const double spiky_u = rms(spiky, Compression::uniform8), spiky_q = rms(spiky, Compression::quantile8);
  MESSAGE("RMS error on N(0,1) with 20 values scaled by 1000: uniform8 " << spiky_u << ", quantile8 " << spiky_q);
  CHECK(spiky_q * 10 < spiky_u);
}

TEST_CASE("codec: compressed payload sizes") {
  const at::Tensor f = at::randn({4096});
  const at::Tensor d = at::randn({4096}, at::kDouble);
  auto size = [](const at::Tensor& t, Compression c) { return hive::encode_tensor(t, c).payload.size(); };
  CHECK(size(f, Compression::none) == 16384);
  CHECK(size(f, Compression::float16) == 8192);
  CHECK(size(f, Compression::uniform8) == 4096 + 8);
  CHECK(size(f, Compression::quantile8) == 4096 + 1024);
  CHECK(size(d, Compression::none) == 32768);
  CHECK(size(d, Compression::float16) == 8192);
  CHECK(size(d, Compression::uniform8) == 4096 + 8);
  CHECK(size(d, Compression::quantile8) == 4096 + 1024);

  Message m;
  hive::add_tensors(m, {f, f.to(at::kBFloat16)}, Compression::uniform8);
  CHECK(m.blob_bytes() == 2 * (4096 + 8));
  const auto back = hive::get_tensors(over_the_wire(m));
  REQUIRE(back.size() == 2);
  CHECK((back[0].scalar_type() == at::kFloat));
  CHECK((back[1].scalar_type() == at::kBFloat16));
}

TEST_CASE("codec: hostile but finite 8-bit levels decode to finite values of the original dtype") {
  const json d = {{"dtype", "float16"}, {"shape", {4}}, {"codec", "uniform8"}};
  Buffer payload = floats_then({1e30f, 1e30f}, 4);
  const at::Tensor y = hive::decode_tensor(d, payload);
  CHECK((y.scalar_type() == at::kHalf));
  CHECK(at::isfinite(y).all().item<bool>());
  CHECK(y.max().item<double>() == 65504);

  const json q = {{"dtype", "bfloat16"}, {"shape", {4}}, {"codec", "quantile8"}};
  const at::Tensor z = hive::decode_tensor(q, floats_then(std::vector<float>(256, 3.4e38f), 4));
  CHECK(at::isfinite(z).all().item<bool>());
}

TEST_CASE("codec: all_finite finds every NaN and infinity, and agrees with at::isfinite") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    CAPTURE(c10::toString(dtype));
    // Sizes around the scan's 4096-element blocks; bad values at the edges of blocks.
    for (const std::int64_t n : {1, 4095, 4096, 4097, 3 * 4096 + 5}) {
      auto t = at::randn({n}, at::kDouble).mul(1e3).to(dtype);
      CHECK(hive::all_finite(t));
      for (const std::int64_t at_index : {std::int64_t{0}, n / 2, std::min<std::int64_t>(n - 1, 4096), n - 1})
        for (const float bad : {nan, inf, -inf}) {
          auto u = t.clone();
          u[at_index] = bad;
          CAPTURE(n);
          CAPTURE(at_index);
          CAPTURE(bad);
          CHECK_FALSE(hive::all_finite(u));
          CHECK(hive::all_finite(u) == at::isfinite(u).all().item<bool>());
        }
    }
  }
  // The largest finite values and the smallest subnormals are finite.
  CHECK(hive::all_finite(at::tensor({std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                                     std::numeric_limits<float>::denorm_min(), -0.0f})));
  CHECK(hive::all_finite(at::tensor({std::numeric_limits<double>::max(), std::numeric_limits<double>::denorm_min()})));
  // A view with an offset, a non-contiguous one and a negated one.
  auto m = at::randn({64, 64});
  m[10][20] = nan;
  CHECK_FALSE(hive::all_finite(m.slice(0, 5, 15)));
  CHECK(hive::all_finite(m.slice(0, 11, 64)));
  CHECK_FALSE(hive::all_finite(m.t()));
  CHECK(hive::all_finite(m.slice(1, 21, 64).t()));
  CHECK_FALSE(hive::all_finite(m._neg_view()));
  // Integer and bool tensors, and empty ones, are always finite.
  CHECK(hive::all_finite(at::arange(100, at::kLong)));
  CHECK(hive::all_finite(at::ones({3}, at::kBool)));
  CHECK(hive::all_finite(at::empty({0}, at::kFloat)));
}
