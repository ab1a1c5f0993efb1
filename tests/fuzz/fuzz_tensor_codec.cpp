// Fuzzes the tensor codec (hive/core/tensor_codec.hpp) with every compression it supports.
//
// Input: one byte; bits 0-1 pick the compression (none, float16, uniform8, quantile8), bits 2-3
// the mode:
//   0, 1 (descriptor): dtype byte, rank byte, flag byte, one byte per dimension, then the
//        payload. Flags: 1 sizes the last dimension from the payload (so that most inputs are
//        well-formed), 2 misaligns the payload, 4 drops its owner (both force the copying
//        path), 8 uses small limits. decode_tensor must throw hive::Error or return a
//        contiguous tensor of the described dtype and shape, whose values are the payload's
//        bytes (none) or finite (the 8-bit codecs); the result then round-trips.
//   2 (message): a MessagePack header (16-bit length), a blob count and 16-bit-length blobs,
//        decoded by get_tensors as the RPC handlers do: anything but hive::Error is a bug.
//   3 (values): a dtype byte, a layout byte, then raw element bytes (NaNs, infinities and
//        subnormals included) encoded with the compression and decoded again; the error is
//        checked against each codec's documented bound.

#include "fuzz_common.hpp"

#include <hive/core/msgpack.hpp>
#include <hive/core/tensor_codec.hpp>

#include <ATen/ATen.h>

#include <cmath>

namespace {

using namespace hive;
using nlohmann::json;

constexpr Compression compressions[] = {Compression::none, Compression::float16, Compression::uniform8,
                                        Compression::quantile8};

Buffer owned_copy(std::span<const std::uint8_t> bytes, std::size_t offset = 0) {
  auto storage = std::make_shared_for_overwrite<std::byte[]>(bytes.size() + offset + 1);
  if (!bytes.empty()) std::memcpy(storage.get() + offset, bytes.data(), bytes.size());
  const std::byte* data = storage.get() + offset;
  return Buffer(std::move(storage), data, bytes.size());
}

// The values of a decoded floating tensor as doubles.
std::vector<double> values_of(const at::Tensor& t) {
  // A lazily negated view holds un-negated bytes: resolve it before reading them.
  auto d = t.resolve_neg().to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  return {p, p + d.numel()};
}

// Smallest positive value of a floating dtype: the absolute rounding error near zero.
double denorm_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return std::ldexp(1.0, -24);
    case at::kBFloat16: return std::ldexp(1.0, -133);
    case at::kFloat: return std::ldexp(1.0, -149);
    default: return std::numeric_limits<double>::denorm_min();
  }
}

// Relative precision of a floating dtype.
double epsilon_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return std::ldexp(1.0, -11);
    case at::kBFloat16: return std::ldexp(1.0, -8);
    case at::kFloat: return std::ldexp(1.0, -24);
    default: return std::ldexp(1.0, -52);
  }
}

void check_decoded(const at::Tensor& t, const hive::detail::TensorSpec& spec, const Buffer& payload) {
  HIVE_FUZZ_EXPECT(t.defined() && t.device().is_cpu() && t.is_contiguous(), "decoded tensor is not a contiguous CPU one");
  HIVE_FUZZ_EXPECT(t.scalar_type() == spec.dtype, "decoded dtype {} instead of {}", c10::toString(t.scalar_type()),
                   c10::toString(spec.dtype));
  HIVE_FUZZ_EXPECT(t.sizes().vec() == spec.shape, "decoded shape differs");
  HIVE_FUZZ_EXPECT(static_cast<std::uint64_t>(t.numel()) == spec.numel, "decoded numel differs");
  if (spec.codec == Compression::none) {
    HIVE_FUZZ_EXPECT(t.nbytes() == payload.size(), "{} bytes decoded from {}", t.nbytes(), payload.size());
    if (payload.size())
      HIVE_FUZZ_EXPECT(std::memcmp(t.data_ptr(), payload.data(), payload.size()) == 0, "codec none changed the bytes");
  }
  if (spec.codec == Compression::uniform8 || spec.codec == Compression::quantile8)
    for (double v : values_of(t)) HIVE_FUZZ_EXPECT(std::isfinite(v), "an 8-bit codec decoded {}", v);
}

// Encodes `x` with `c`, decodes, and checks the codec's error bound.
void round_trip(const at::Tensor& x, Compression c) {
  EncodedTensor e;
  try {
    e = encode_tensor(x, c);
  } catch (const Error& err) {
    HIVE_FUZZ_EXPECT(err.code() == errc::bad_tensor, "encode failed with {}", err.what());
    // Only the 8-bit codecs refuse, and only for values they cannot represent.
    const bool eight_bit = hive::detail::is_compressible(x.scalar_type()) &&
                           (c == Compression::uniform8 || c == Compression::quantile8);
    HIVE_FUZZ_EXPECT(eight_bit, "encode refused a {} tensor with {}: {}", c10::toString(x.scalar_type()), to_string(c),
                     err.what());
    bool representable = true;
    for (double v : values_of(x)) representable &= std::abs(v) <= std::numeric_limits<float>::max();
    HIVE_FUZZ_EXPECT(!representable, "encode refused finite values: {}", err.what());
    return;
  }
  const auto codec = e.descriptor.at("codec").get<Compression>();
  at::Tensor y;
  try {
    y = decode_tensor(e.descriptor, e.payload);
  } catch (const Error& err) {
    HIVE_FUZZ_EXPECT(false, "an encoded tensor does not decode: {}", err.what());
  }
  HIVE_FUZZ_EXPECT(y.scalar_type() == x.scalar_type() && y.sizes() == x.sizes(), "round trip changed dtype or shape");
  if (codec == Compression::none) {
    HIVE_FUZZ_EXPECT(y.nbytes() == x.nbytes(), "round trip changed the size");
    const auto xc = x.resolve_neg().contiguous();
    if (x.nbytes()) HIVE_FUZZ_EXPECT(std::memcmp(y.data_ptr(), xc.data_ptr(), x.nbytes()) == 0, "codec none is lossy");
    return;
  }
  const auto xs = values_of(x);
  const auto ys = values_of(y);
  if (xs.empty()) return;
  const double eps = epsilon_of(x.scalar_type());
  const double tiny = denorm_of(x.scalar_type());
  if (codec == Compression::float16) {
    const double eps16 = std::max(eps, std::ldexp(1.0, -11));
    for (std::size_t i = 0; i < xs.size(); ++i) {
      const double a = xs[i], b = ys[i];
      if (std::isnan(a)) {
        HIVE_FUZZ_EXPECT(std::isnan(b), "float16 turned NaN into {}", b);
      } else if (std::abs(a) > hive::detail::half_max) {
        HIVE_FUZZ_EXPECT(std::abs(b) >= hive::detail::half_max * (1 - eps) && std::abs(b) <= hive::detail::half_max * (1 + eps) &&
                             std::signbit(a) == std::signbit(b),
                         "float16 clamped {} to {}", a, b);
      } else {
        HIVE_FUZZ_EXPECT(std::abs(a - b) <= std::abs(a) * 2 * eps16 + std::ldexp(1.0, -24), "float16 decoded {} as {}", a, b);
      }
    }
    return;
  }
  const double lo = *std::min_element(xs.begin(), xs.end()), hi = *std::max_element(xs.begin(), xs.end());
  // Levels are float32: relative error 2^-24, and up to float32's smallest step near zero.
  const double eps_out = std::max(eps, std::ldexp(1.0, -23));
  const double tiny_out = std::max(tiny, std::ldexp(1.0, -149));
  if (codec == Compression::uniform8) {
    float scale = 0;
    std::memcpy(&scale, e.payload.data() + sizeof(float), sizeof scale);
    for (std::size_t i = 0; i < xs.size(); ++i)
      HIVE_FUZZ_EXPECT(std::abs(xs[i] - ys[i]) <= 0.5 * scale + (std::abs(xs[i]) + scale) * eps_out + tiny_out,
                       "uniform8 decoded {} as {} (step {})", xs[i], ys[i], scale);
  } else {
    const double slack = std::max(std::abs(lo), std::abs(hi)) * eps_out + tiny_out;
    std::vector<double> distinct = xs;
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    for (std::size_t i = 0; i < xs.size(); ++i) {
      HIVE_FUZZ_EXPECT(ys[i] >= lo - slack && ys[i] <= hi + slack, "quantile8 decoded {} outside [{}, {}]", ys[i], lo, hi);
      // Up to 256 distinct values are each their own level (exactly, when they are floats).
      if (distinct.size() <= hive::detail::quantile8_levels)
        HIVE_FUZZ_EXPECT(std::abs(xs[i] - ys[i]) <=
                             (x.scalar_type() == at::kDouble ? std::abs(xs[i]) * eps_out + tiny_out : 0.0),
                         "quantile8 decoded {} as {} with {} distinct values", xs[i], ys[i], distinct.size());
    }
  }
}

void fuzz_descriptor(fuzz::Input& in, Compression c) {
  const auto& dtype = hive::detail::dtype_names[in.below(std::size(hive::detail::dtype_names))];
  const std::size_t rank = in.below(6);
  const std::uint8_t flags = in.u8();
  const Limits limits = flags & 8 ? Limits().max_tensor_rank(2).max_tensor_elements(64) : Limits{};
  std::vector<std::int64_t> shape;
  for (std::size_t i = 0; i < rank; ++i) shape.push_back(in.u8());
  auto payload_bytes = in.rest();
  if ((flags & 1) && rank > 0) {
    std::uint64_t per = c == Compression::none ? c10::elementSize(dtype.type) : c == Compression::float16 ? 2 : 1;
    const std::uint64_t head = c == Compression::uniform8    ? hive::detail::uniform8_header_bytes
                               : c == Compression::quantile8 ? hive::detail::quantile8_header_bytes
                                                             : 0;
    for (std::size_t i = 0; i + 1 < rank; ++i) per *= std::max<std::int64_t>(shape[i], 1);
    const std::uint64_t body = payload_bytes.size() > head ? payload_bytes.size() - head : 0;
    shape.back() = static_cast<std::int64_t>(body / per);
    const bool empty = std::find(shape.begin(), shape.end() - 1, 0) != shape.end() - 1;
    payload_bytes = payload_bytes.first(std::min<std::size_t>(payload_bytes.size(), head + (empty ? 0 : shape.back() * per)));
  }
  if (dtype.type == at::kBool && c == Compression::none && (flags & 16)) {
    // Mostly valid bools, so that decoding gets past the byte check.
    static thread_local std::vector<std::uint8_t> fixed;
    fixed.assign(payload_bytes.begin(), payload_bytes.end());
    for (auto& b : fixed) b &= 1;
    payload_bytes = fixed;
  }
  const json descriptor = {{"dtype", dtype.name}, {"shape", shape}, {"codec", to_string(c)}};
  Buffer used;
  if (flags & 4) {
    // A Buffer without an owner (the bytes live in `kept` meanwhile): decode_tensor must copy.
    static thread_local std::vector<std::uint8_t> kept;
    kept.assign(payload_bytes.begin(), payload_bytes.end());
    used = Buffer(nullptr, reinterpret_cast<const std::byte*>(kept.data()), kept.size());
  } else {
    used = owned_copy(payload_bytes, flags & 2 ? 1 : 0);
  }
  at::Tensor t;
  try {
    t = decode_tensor(descriptor, used, limits);
  } catch (const Error& e) {
    HIVE_FUZZ_EXPECT(e.code() == errc::bad_tensor || e.code() == errc::limit_exceeded, "decode failed with {}", e.what());
    return;
  }
  const auto spec = hive::detail::parse_descriptor(descriptor, limits);
  check_decoded(t, spec, used);
  if (t.numel() <= 4096) {
    if (flags & 32) round_trip(t.clone(), c);
    else if (t.dim() >= 2 && t.size(0) > 1) round_trip(t.transpose(0, 1), c);  // non-contiguous
    else round_trip(t, c);
  }
}

void fuzz_message(fuzz::Input& in) {
  const auto limits = in.u8() & 1 ? Limits().max_tensor_rank(2).max_tensor_elements(64) : Limits{};
  Message m;
  try {
    m.header = parse_msgpack(in.chunk16());
  } catch (const Error&) {
    return;
  }
  const std::size_t blobs = in.below(5);
  for (std::size_t i = 0; i < blobs; ++i) m.blobs.push_back(owned_copy(in.chunk16(), in.u8() & 1));
  try {
    for (const auto& t : get_tensors(m, limits))
      HIVE_FUZZ_EXPECT(t.defined() && t.is_contiguous(), "get_tensors returned a bad tensor");
  } catch (const Error& e) {
    HIVE_FUZZ_EXPECT(e.code() == errc::bad_tensor || e.code() == errc::limit_exceeded, "get_tensors failed with {}",
                     e.what());
  }
}

void fuzz_values(fuzz::Input& in, Compression c) {
  const auto& dtype = hive::detail::dtype_names[in.below(std::size(hive::detail::dtype_names))];
  const std::uint8_t layout = in.u8();
  auto raw = in.rest();
  const std::size_t size = c10::elementSize(dtype.type);
  const auto n = static_cast<std::int64_t>(std::min<std::size_t>(raw.size() / size, 4096));
  at::Tensor x = at::empty({n}, at::TensorOptions().dtype(dtype.type));
  if (n) std::memcpy(x.data_ptr(), raw.data(), static_cast<std::size_t>(n) * size);
  if (dtype.type == at::kBool) x = x.view(at::kByte).bitwise_and(1).view(at::kBool);
  if ((layout & 1) && n >= 2) x = x.slice(0, 0, n, 2);              // strided
  if ((layout & 2) && x.numel() % 2 == 0 && x.numel() >= 4) x = x.view({2, -1}).t();  // transposed
  if ((layout & 4) && x.is_floating_point()) x = x.neg()._neg_view();  // a lazy negation
  round_trip(x, c);
}

std::vector<fuzz::Seed> seeds() {
  std::vector<fuzz::Seed> out;
  // Descriptor mode: [compression | mode << 2, dtype, rank, flags, dims..., payload]
  auto payload = [](std::size_t n, std::uint8_t start) {
    std::vector<std::uint8_t> p(n);
    for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::uint8_t>(start + 37 * i);
    return p;
  };
  auto descriptor_seed = [&](std::uint8_t codec, std::uint8_t dtype, std::vector<std::uint8_t> dims, std::uint8_t flags,
                             std::vector<std::uint8_t> body) {
    std::vector<std::uint8_t> s{codec, dtype, static_cast<std::uint8_t>(dims.size()), flags};
    s.insert(s.end(), dims.begin(), dims.end());
    s.insert(s.end(), body.begin(), body.end());
    return s;
  };
  // float32 [2, 3] with each codec, last dimension sized from the payload.
  out.push_back({"descriptor-none-float32", descriptor_seed(0, 0, {2, 3}, 1, fuzz::join({fuzz::le(1.5f), fuzz::le(-2.f),
      fuzz::le(0.f), fuzz::le(3.25f), fuzz::le(1e-3f), fuzz::le(-7.f)}))});
  out.push_back({"descriptor-float16", descriptor_seed(1, 0, {2, 3}, 1, payload(12, 60))});
  out.push_back({"descriptor-uniform8", descriptor_seed(2, 0, {2, 3}, 1, fuzz::join({fuzz::le(-1.f), fuzz::le(0.01f), payload(6, 0)}))});
  out.push_back({"descriptor-quantile8", descriptor_seed(3, 0, {2, 3}, 1, [&] {
    std::vector<std::uint8_t> body;
    for (int k = 0; k < 256; ++k) {
      auto f = fuzz::le(static_cast<float>(k) / 16);
      body.insert(body.end(), f.begin(), f.end());
    }
    auto codes = payload(6, 3);
    body.insert(body.end(), codes.begin(), codes.end());
    return body;
  }())});
  out.push_back({"descriptor-int64-misaligned", descriptor_seed(0, 7, {3}, 1 | 2, payload(24, 5))});
  out.push_back({"descriptor-bool", descriptor_seed(0, 9, {4}, 1 | 16, {0, 1, 1, 0})});
  out.push_back({"descriptor-bfloat16-copied", descriptor_seed(1, 3, {1, 4}, 1 | 4 | 32, payload(8, 64))});
  out.push_back({"descriptor-small-limits", descriptor_seed(0, 0, {9, 9, 9}, 8, payload(16, 1))});
  // Message mode: [2 << 2, flags, header length (u16), header, blob count, (length u16, misalign, bytes)...]
  {
    Message m;
    add_tensors(m, {at::arange(6, at::kFloat).view({2, 3}), at::ones({2}, at::kDouble)}, Compression::none);
    auto header = json::to_msgpack(m.header);
    std::vector<std::uint8_t> s{8, 0};
    auto len = fuzz::le(static_cast<std::uint16_t>(header.size()));
    s.insert(s.end(), len.begin(), len.end());
    s.insert(s.end(), header.begin(), header.end());
    s.push_back(2);
    for (const auto& b : m.blobs) {
      auto bl = fuzz::le(static_cast<std::uint16_t>(b.size()));
      s.insert(s.end(), bl.begin(), bl.end());
      s.push_back(0);
      auto bytes = reinterpret_cast<const std::uint8_t*>(b.data());
      s.insert(s.end(), bytes, bytes + b.size());
    }
    out.push_back({"message-two-tensors", s});
  }
  // Values mode: [codec | 3 << 2, dtype, layout, elements...]
  const auto floats = fuzz::join({fuzz::le(0.5f), fuzz::le(-1.25f), fuzz::le(100.f), fuzz::le(1e-20f), fuzz::le(3e4f),
                                  fuzz::le(-3e4f), fuzz::le(7.f), fuzz::le(7.f)});
  for (std::uint8_t c = 0; c < 4; ++c) {
    std::vector<std::uint8_t> s{static_cast<std::uint8_t>(c | 12), 0, static_cast<std::uint8_t>(c)};
    s.insert(s.end(), floats.begin(), floats.end());
    out.push_back({fmt::format("values-float32-{}", to_string(compressions[c])), s});
  }
  out.push_back({"values-float64-uniform8", fuzz::join({std::vector<std::uint8_t>{2 | 12, 1, 2}, fuzz::le(1.0), fuzz::le(-3.5),
                                                       fuzz::le(1e10), fuzz::le(2.0)})});
  out.push_back({"values-half-quantile8", fuzz::join({std::vector<std::uint8_t>{3 | 12, 2, 0}, payload(32, 9)})});
  return out;
}

void one_input(hive::fuzz::Input& in) {
  const std::uint8_t head = in.u8();
  const Compression c = compressions[head & 3];
  switch ((head >> 2) & 3) {
    case 0: case 1: fuzz_descriptor(in, c); break;
    case 2: fuzz_message(in); break;
    case 3: fuzz_values(in, c); break;
  }
}

}  // namespace

HIVE_FUZZ_TARGET(seeds, one_input)
