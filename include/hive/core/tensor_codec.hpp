#pragma once
/// @file
/// The tensor codec: tensors to (JSON descriptor, raw little-endian payload) and back, with
/// optional lossy compression, plus helpers that carry tensors in a Message.
///
/// This is the only header in core/ that includes ATen, and it includes the cheapest ATen
/// headers that do the job (see docs/tensors.md for the user guide).
///
/// Over 400 lines because every dtype, rank and codec (float16, uniform8, quantile8) shares one
/// descriptor format and one set of checks against Limits.

#include <hive/core/buffer.hpp>
#include <hive/core/error.hpp>
#include <hive/core/limits.hpp>
#include <hive/core/message.hpp>

#include <ATen/core/Tensor.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty_ops.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isfinite.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

static_assert(std::endian::native == std::endian::little,
              "hive's tensor codec puts the host's raw tensor bytes on the wire, and the wire "
              "format is little-endian: big-endian hosts are not supported");

namespace hive {

/// How a floating-point tensor's values are packed on the wire (integer and bool tensors are
/// always sent as they are).
enum class Compression {
  none,      ///< the raw bytes of the tensor's own dtype; lossless
  float16,   ///< IEEE half precision, values clamped to ±65504; half the bytes of float32
  uniform8,  ///< 8-bit codes on a uniform grid from min to max; a quarter of float32
  quantile8, ///< 8-bit codes into a 256-entry codebook of buckets fitted to the data; a quarter of float32
};

/// The wire name of a compression: "none", "float16", "uniform8" or "quantile8".
[[nodiscard]] constexpr std::string_view to_string(Compression c) noexcept {
  switch (c) {
    case Compression::none: return "none";
    case Compression::float16: return "float16";
    case Compression::uniform8: return "uniform8";
    case Compression::quantile8: return "quantile8";
  }
  return "unknown";
}

/// The compression with wire name `name`, or nullopt when there is none.
[[nodiscard]] constexpr std::optional<Compression> compression_from_string(std::string_view name) noexcept {
  for (auto c : {Compression::none, Compression::float16, Compression::uniform8, Compression::quantile8})
    if (to_string(c) == name) return c;
  return std::nullopt;
}

/// The compression with wire name `name`; throws hive::InvalidArgument for an unknown name.
[[nodiscard]] inline Compression parse_compression(std::string_view name) {
  if (auto c = compression_from_string(name)) return *c;
  throw InvalidArgument(fmt::format(
      "unknown compression '{}' (known: none, float16, uniform8, quantile8)", name));
}

/// Writes a compression as its wire name.
inline void to_json(nlohmann::json& j, Compression c) { j = to_string(c); }

/// Reads a compression from its wire name; throws hive::InvalidArgument otherwise.
inline void from_json(const nlohmann::json& j, Compression& c) {
  if (!j.is_string())
    throw InvalidArgument(fmt::format("a compression must be a string, got {}", j.type_name()));
  c = parse_compression(j.get_ref<const std::string&>());
}

/// A tensor as it travels: a small JSON descriptor and the bytes it describes.
struct EncodedTensor {
  /// {"dtype": "float32", "shape": [2, 3], "codec": "none"}.
  nlohmann::json descriptor;
  /// The payload; for an uncompressed contiguous tensor, a view of the tensor's own storage.
  Buffer payload;
};

namespace detail {

/// The dtypes the codec carries, with their wire names.
struct DtypeName {
  at::ScalarType type;
  std::string_view name;
};
inline constexpr DtypeName dtype_names[] = {
    {at::kFloat, "float32"}, {at::kDouble, "float64"}, {at::kHalf, "float16"},
    {at::kBFloat16, "bfloat16"}, {at::kChar, "int8"},  {at::kShort, "int16"},
    {at::kInt, "int32"},     {at::kLong, "int64"},     {at::kByte, "uint8"},
    {at::kBool, "bool"},
};

/// The wire name of a dtype, or an empty view when the codec does not carry it.
[[nodiscard]] inline std::string_view dtype_name(at::ScalarType t) noexcept {
  for (const auto& d : dtype_names)
    if (d.type == t) return d.name;
  return {};
}

/// The dtype with wire name `name`, or nullopt.
[[nodiscard]] inline std::optional<at::ScalarType> dtype_from_name(std::string_view name) noexcept {
  for (const auto& d : dtype_names)
    if (d.name == name) return d.type;
  return std::nullopt;
}

/// True for the dtypes that compression applies to.
[[nodiscard]] constexpr bool is_compressible(at::ScalarType t) noexcept {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

/// Throws hive::Error(errc::bad_tensor) saying what was wrong.
[[noreturn]] inline void bad_tensor(const std::string& what) {
  throw Error(errc::bad_tensor, "tensor: " + what);
}

/// A JSON value as short text for an error message; a hostile peer's value may be huge or
/// hold invalid UTF-8, so dumping must neither throw nor flood the log.
[[nodiscard]] inline std::string brief(const nlohmann::json& j) {
  std::string s = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 64) {
    // Cut at a character boundary: the message may travel back to the peer inside JSON.
    std::size_t cut = 61;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
    s = s.substr(0, cut) + "...";
  }
  return s;
}

/// `a * b`, or nullopt when it does not fit in 64 bits.
[[nodiscard]] constexpr std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) noexcept {
  if (b != 0 && a > std::numeric_limits<std::uint64_t>::max() / b) return std::nullopt;
  return a * b;
}

/// Bytes in front of the codes: float32 lo and scale for uniform8, the codebook for quantile8.
inline constexpr std::size_t uniform8_header_bytes = 2 * sizeof(float);
inline constexpr std::size_t quantile8_levels = 256;
inline constexpr std::size_t quantile8_header_bytes = quantile8_levels * sizeof(float);
/// Quantile boundaries come from at most this many values, so big tensors encode fast.
inline constexpr std::size_t quantile8_max_sample = std::size_t{1} << 16;
/// Largest magnitude float16 can hold; bigger values would become infinities.
inline constexpr double half_max = 65504.0;

/// A descriptor after validation: everything needed to decode, all sizes checked.
struct TensorSpec {
  at::ScalarType dtype = at::kFloat;
  std::vector<std::int64_t> shape;
  std::uint64_t numel = 0;
  Compression codec = Compression::none;
  std::uint64_t payload_bytes = 0;
};

/// Validates a descriptor against `limits` before anything is allocated from it.
[[nodiscard]] inline TensorSpec parse_descriptor(const nlohmann::json& d, const Limits& limits) {
  if (!d.is_object()) bad_tensor(fmt::format("descriptor must be a JSON object, got {}", d.type_name()));
  TensorSpec spec;

  auto dtype_it = d.find("dtype");
  if (dtype_it == d.end() || !dtype_it->is_string())
    bad_tensor("descriptor needs 'dtype' as a string such as \"float32\"");
  auto dtype = dtype_from_name(dtype_it->get_ref<const std::string&>());
  if (!dtype) bad_tensor(fmt::format("unknown dtype {}", brief(*dtype_it)));
  spec.dtype = *dtype;

  auto codec_it = d.find("codec");
  if (codec_it == d.end() || !codec_it->is_string())
    bad_tensor("descriptor needs 'codec' as a string such as \"none\"");
  auto codec = compression_from_string(codec_it->get_ref<const std::string&>());
  if (!codec) bad_tensor(fmt::format("unknown codec {}", brief(*codec_it)));
  if (*codec != Compression::none && !is_compressible(spec.dtype))
    bad_tensor(fmt::format("codec '{}' does not apply to dtype '{}'", to_string(*codec), dtype_name(spec.dtype)));
  spec.codec = *codec;

  auto shape_it = d.find("shape");
  if (shape_it == d.end() || !shape_it->is_array())
    bad_tensor("descriptor needs 'shape' as an array of dimension sizes");
  if (shape_it->size() > limits.max_tensor_rank())
    throw Error(errc::limit_exceeded, fmt::format("tensor: rank {} exceeds the limit of {}",
                                                  shape_it->size(), limits.max_tensor_rank()));
  spec.shape.reserve(shape_it->size());
  constexpr auto int64_max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  // The product of the nonzero sizes bounds the strides ATen computes, so it must fit in int64
  // even when a zero size makes the tensor empty.
  std::uint64_t extent = 1;
  std::uint64_t numel = 1;
  for (const auto& dim : *shape_it) {
    std::uint64_t size = 0;
    if (dim.is_number_unsigned()) {
      size = dim.get<std::uint64_t>();
      if (size > int64_max) bad_tensor(fmt::format("dimension {} does not fit in int64", size));
    } else if (dim.is_number_integer()) {
      const auto v = dim.get<std::int64_t>();
      if (v < 0) bad_tensor(fmt::format("negative dimension {}", v));
      size = static_cast<std::uint64_t>(v);
    } else {
      bad_tensor(fmt::format("dimension must be a non-negative integer, got {}", brief(dim)));
    }
    auto e = checked_mul(extent, std::max<std::uint64_t>(size, 1));
    if (!e || *e > int64_max) bad_tensor(fmt::format("shape {} overflows int64", brief(*shape_it)));
    extent = *e;
    numel *= size;  // cannot overflow: numel is 0 or at most extent
    spec.shape.push_back(static_cast<std::int64_t>(size));
  }
  if (numel > limits.max_tensor_elements())
    throw Error(errc::limit_exceeded, fmt::format("tensor: {} elements exceed the limit of {}", numel,
                                                  limits.max_tensor_elements()));
  spec.numel = numel;

  std::optional<std::uint64_t> bytes;
  switch (spec.codec) {
    case Compression::none: bytes = checked_mul(numel, c10::elementSize(spec.dtype)); break;
    case Compression::float16: bytes = checked_mul(numel, 2); break;
    case Compression::uniform8: bytes = numel + uniform8_header_bytes; break;
    case Compression::quantile8: bytes = numel + quantile8_header_bytes; break;
  }
  if (!bytes || *bytes < numel) bad_tensor(fmt::format("payload size of shape {} overflows", brief(*shape_it)));
  spec.payload_bytes = *bytes;
  return spec;
}

/// A new uninitialized CPU tensor.
[[nodiscard]] inline at::Tensor empty_cpu(at::IntArrayRef shape, at::ScalarType dtype) {
  // at::empty's header pulls in ATen/Context.h (about 2 s more per translation unit); the
  // operator it forwards to is declared in the light _ops header.
  return at::_ops::empty_memory_format::call(c10::fromIntArrayRef(shape), dtype, at::kStrided,
                                             at::Device(at::kCPU), c10::nullopt, c10::nullopt);
}

/// A payload Buffer viewing a contiguous tensor's bytes and keeping its storage alive.
[[nodiscard]] inline Buffer alias_bytes(const at::Tensor& contiguous) {
  auto owner = std::make_shared<const at::Tensor>(contiguous);
  const auto* data = static_cast<const std::byte*>(owner->data_ptr());
  const auto size = owner->nbytes();
  return {std::move(owner), data, size};
}

/// A tensor over `bytes` without a copy when they have an owner and are aligned for `dtype`,
/// otherwise a copy. `bytes.size()` must already equal the tensor's size in bytes.
[[nodiscard]] inline at::Tensor view_or_copy(const Buffer& bytes, at::IntArrayRef shape, at::ScalarType dtype) {
  const auto address = reinterpret_cast<std::uintptr_t>(bytes.data());
  if (!bytes.empty() && bytes.owner() && address % c10::elementSize(dtype) == 0) {
    // from_blob wants a mutable pointer. hive never writes to or reuses a payload once it is
    // handed over, so a writable tensor over it is safe (docs/tensors.md: who owns the bytes).
    return at::from_blob(const_cast<std::byte*>(bytes.data()), shape,
                         [owner = bytes.owner()](void*) mutable { owner.reset(); },
                         at::TensorOptions().dtype(dtype));
  }
  at::Tensor t = empty_cpu(shape, dtype);
  if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

/// Calls `f(std::type_identity<T>{})` with the C++ type of a compressible dtype.
template <class F>
decltype(auto) visit_floating(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(std::type_identity<float>{});
    case at::kDouble: return f(std::type_identity<double>{});
    case at::kHalf: return f(std::type_identity<c10::Half>{});
    case at::kBFloat16: return f(std::type_identity<c10::BFloat16>{});
    default: bad_tensor(fmt::format("dtype '{}' cannot be compressed", c10::toString(dtype)));
  }
}

/// `v` converted to T, saturated to T's finite range so a decoded value is never infinite.
template <class T>
[[nodiscard]] T saturate(double v) noexcept {
  const auto hi = static_cast<double>(std::numeric_limits<T>::max());
  v = std::clamp(v, -hi, hi);
  if constexpr (std::is_same_v<T, double>) return v;
  else return static_cast<T>(static_cast<float>(v));
}

/// The nearest float at or below `v`.
[[nodiscard]] inline float float_at_or_below(double v) noexcept {
  auto f = static_cast<float>(v);
  return static_cast<double>(f) > v ? std::nextafter(f, -std::numeric_limits<float>::infinity()) : f;
}

/// The nearest float at or above `v`.
[[nodiscard]] inline float float_at_or_above(double v) noexcept {
  auto f = static_cast<float>(v);
  return static_cast<double>(f) < v ? std::nextafter(f, std::numeric_limits<float>::infinity()) : f;
}

/// The smallest and largest value of a non-empty array. Rejects values the 8-bit codecs cannot
/// represent: their levels are float32, so every value must be finite and within its range.
template <class T>
[[nodiscard]] std::pair<double, double> codable_range(const T* x, std::size_t n, Compression c) {
  constexpr double float_max = std::numeric_limits<float>::max();
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (std::size_t i = 0; i < n; ++i) {
    const auto v = static_cast<double>(x[i]);
    if (!(std::abs(v) <= float_max))  // also true for NaN
      throw Error(errc::bad_tensor,
                  fmt::format("tensor: {} needs finite values within float32 range, got {} at flat index {}",
                              to_string(c), v, i));
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  return {lo, hi};
}

/// A tiny deterministic generator (splitmix64), so an encoding depends only on the tensor.
struct SplitMix64 {
  std::uint64_t state;
  std::uint64_t operator()() noexcept {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

template <class T>
void encode_uniform8(const T* x, std::size_t n, std::byte* out) {
  auto [lo_d, hi_d] = n > 0 ? codable_range(x, n, Compression::uniform8) : std::pair{0.0, 0.0};
  // lo is rounded down and the step up, so the 256 levels cover [min, max] and every value is
  // within half a step of its level.
  const float lo = float_at_or_below(lo_d);
  const float scale = float_at_or_above((hi_d - static_cast<double>(lo)) / 255.0);
  std::memcpy(out, &lo, sizeof lo);
  std::memcpy(out + sizeof lo, &scale, sizeof scale);
  auto* codes = reinterpret_cast<std::uint8_t*>(out + uniform8_header_bytes);
  if (scale == 0) {
    std::memset(codes, 0, n);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const double level = std::floor((static_cast<double>(x[i]) - lo) / scale + 0.5);
    codes[i] = static_cast<std::uint8_t>(std::clamp(level, 0.0, 255.0));
  }
}

/// Fills the 255 bucket boundaries for quantile8 from a sorted, non-empty sample; bucket k
/// then holds the values in (bounds[k-1], bounds[k]].
inline void quantile8_bounds(const std::vector<double>& s, double (&bounds)[quantile8_levels - 1]) {
  constexpr std::size_t nb = quantile8_levels - 1;
  // Up to 256 distinct values get a bucket each, so they are coded exactly.
  std::vector<double> distinct;
  for (double v : s) {
    if (distinct.empty() || v != distinct.back()) distinct.push_back(v);
    if (distinct.size() > quantile8_levels) break;
  }
  if (distinct.size() <= quantile8_levels) {
    for (std::size_t k = 0; k < nb; ++k) bounds[k] = distinct[std::min(k, distinct.size() - 1)];
    return;
  }
  // Levels as dense as density^(1/3), the rule that minimizes mean squared error for a smooth
  // density (Panter-Dite). The density comes from the sample's quantiles: G intervals between
  // equally spaced order statistics hold equal mass, so interval j of width w_j deserves a share
  // of levels proportional to w_j * (1/w_j)^(1/3) = w_j^(2/3). Equal-count buckets would
  // instead put the extreme 1/256 of the values into one wide bucket each side, which on
  // Gaussian data has 2.7 times uniform8's RMS error.
  const std::size_t m = s.size();
  const std::size_t intervals = std::min<std::size_t>(m - 1, 4096);
  std::vector<double> edge(intervals + 1), mass(intervals + 1, 0.0);
  for (std::size_t j = 0; j <= intervals; ++j) edge[j] = s[j * (m - 1) / intervals];
  for (std::size_t j = 0; j < intervals; ++j) {
    const double w = edge[j + 1] - edge[j];
    mass[j + 1] = mass[j] + std::cbrt(w * w);
  }
  for (std::size_t k = 0; k < nb; ++k) {
    const double target = mass[intervals] * static_cast<double>(k + 1) / quantile8_levels;
    auto j = static_cast<std::size_t>(std::upper_bound(mass.begin(), mass.end(), target) - mass.begin());
    j = std::clamp<std::size_t>(j, 1, intervals);
    const double span = mass[j] - mass[j - 1];
    const double f = span > 0 ? std::clamp((target - mass[j - 1]) / span, 0.0, 1.0) : 0.0;
    bounds[k] = edge[j - 1] + f * (edge[j] - edge[j - 1]);
  }
}

template <class T>
void encode_quantile8(const T* x, std::size_t n, std::byte* out) {
  float codebook[quantile8_levels] = {};
  auto* codes = reinterpret_cast<std::uint8_t*>(out + quantile8_header_bytes);
  if (n > 0) {
    const auto [lo, hi] = codable_range(x, n, Compression::quantile8);
    std::vector<double> sample;
    if (n <= quantile8_max_sample) {
      sample.assign(x, x + n);
    } else {
      sample.resize(quantile8_max_sample);
      SplitMix64 rng{0x68697665ull};
      for (auto& v : sample) v = static_cast<double>(x[rng() % n]);
      // The extremes shape the outer buckets; a sample would usually miss them.
      sample[0] = lo;
      sample[1] = hi;
    }
    std::sort(sample.begin(), sample.end());
    double bounds[quantile8_levels - 1];
    quantile8_bounds(sample, bounds);
    double sums[quantile8_levels] = {};
    std::uint64_t counts[quantile8_levels] = {};
    for (std::size_t i = 0; i < n; ++i) {
      const auto v = static_cast<double>(x[i]);
      const auto k = static_cast<std::size_t>(std::lower_bound(std::begin(bounds), std::end(bounds), v) -
                                              std::begin(bounds));
      codes[i] = static_cast<std::uint8_t>(k);
      sums[k] += v;
      ++counts[k];
    }
    // The level is the bucket's mean, so it lies between the bucket's extreme values. An empty
    // bucket is never referenced; its lower boundary keeps the codebook sorted.
    for (std::size_t k = 0; k < quantile8_levels; ++k) {
      if (counts[k]) codebook[k] = static_cast<float>(sums[k] / static_cast<double>(counts[k]));
      else codebook[k] = static_cast<float>(k > 0 ? bounds[k - 1] : lo);
    }
  }
  std::memcpy(out, codebook, sizeof codebook);
}

/// Decodes 8-bit codes through a table of 256 levels into a new tensor of `dtype`.
[[nodiscard]] inline at::Tensor decode_levels(const double (&levels)[256], const std::uint8_t* codes,
                                              const TensorSpec& spec) {
  at::Tensor out = empty_cpu(spec.shape, spec.dtype);
  visit_floating(spec.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T table[256];
    for (std::size_t c = 0; c < 256; ++c) table[c] = saturate<T>(levels[c]);
    T* y = static_cast<T*>(out.data_ptr());
    for (std::uint64_t i = 0; i < spec.numel; ++i) y[i] = table[codes[i]];
  });
  return out;
}

}  // namespace detail

/// True when no element of `t` is NaN or infinite (always true for integer and bool tensors).
/// A contiguous float32 or float64 CPU tensor is checked in one pass over its bits, without
/// the temporary that `at::isfinite(t).all()` allocates; others go through at::isfinite.
[[nodiscard]] inline bool all_finite(const at::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0) return true;
  // An exponent of all ones is an infinity or a NaN: for IEEE bits x, (x & exp) == exp.
  auto scan = [n = static_cast<std::size_t>(t.numel())](const auto* p, auto exp) {
    constexpr std::size_t block = 4096;
    for (std::size_t i = 0; i < n; i += block) {
      bool bad = false;
      for (std::size_t j = i, end = std::min(n, i + block); j < end; ++j) bad |= (p[j] & exp) == exp;
      if (bad) return false;
    }
    return true;
  };
  if (t.device().is_cpu() && t.is_contiguous()) {
    if (t.scalar_type() == at::kFloat)
      return scan(static_cast<const std::uint32_t*>(t.data_ptr()), std::uint32_t{0x7f800000});
    if (t.scalar_type() == at::kDouble)
      return scan(static_cast<const std::uint64_t*>(t.data_ptr()), std::uint64_t{0x7ff0000000000000});
  }
  return at::isfinite(t).all().item<bool>();
}

/// Encodes a CPU tensor as a descriptor and a little-endian payload.
///
/// With Compression::none a contiguous tensor is not copied: the payload views its storage and
/// keeps it alive, so do not modify the tensor in place until the payload has been sent.
/// Compression applies to float32/float64/float16/bfloat16 only; for other dtypes it falls
/// back to none, and float16 on a 16-bit tensor is sent as none too (it would save nothing).
/// The descriptor's "codec" says what was used. Throws hive::Error(errc::bad_tensor) for an
/// undefined, non-CPU, non-dense or unsupported-dtype tensor, and for non-finite values (or
/// values beyond float32's range) with uniform8/quantile8.
[[nodiscard]] inline EncodedTensor encode_tensor(const at::Tensor& tensor, Compression c = Compression::none) {
  if (!tensor.defined()) detail::bad_tensor("cannot encode an undefined tensor");
  if (!tensor.device().is_cpu())
    detail::bad_tensor(fmt::format("only CPU tensors can be encoded, got one on {}; call .cpu() first",
                                   tensor.device().str()));
  if (tensor.layout() != at::kStrided)
    detail::bad_tensor("only dense (strided) tensors can be encoded; call .to_dense() first");
  const at::ScalarType dtype = tensor.scalar_type();
  const std::string_view name = detail::dtype_name(dtype);
  if (name.empty())
    detail::bad_tensor(fmt::format("dtype {} is not supported (supported: float32, float64, float16, "
                                   "bfloat16, int8, int16, int32, int64, uint8, bool)",
                                   c10::toString(dtype)));
  if (!detail::is_compressible(dtype)) c = Compression::none;
  if (c == Compression::float16 && c10::elementSize(dtype) == 2) c = Compression::none;

  // A negative view keeps un-negated bytes and flips them lazily, so its bytes are not its values.
  at::Tensor t = tensor.detach();
  if (t.is_neg()) t = t.resolve_neg();

  EncodedTensor e;
  e.descriptor = {{"dtype", name}, {"shape", t.sizes().vec()}, {"codec", to_string(c)}};
  switch (c) {
    case Compression::none:
      e.payload = detail::alias_bytes(t.contiguous());
      break;
    case Compression::float16:
      e.payload = detail::alias_bytes(
          t.clamp(at::Scalar(-detail::half_max), at::Scalar(detail::half_max)).to(at::kHalf).contiguous());
      break;
    case Compression::uniform8:
    case Compression::quantile8: {
      const at::Tensor src = t.contiguous();
      const auto n = static_cast<std::size_t>(src.numel());
      const std::size_t header =
          c == Compression::uniform8 ? detail::uniform8_header_bytes : detail::quantile8_header_bytes;
      std::vector<std::byte> bytes(header + n);
      detail::visit_floating(dtype, [&](auto tag) {
        using T = typename decltype(tag)::type;
        const T* x = static_cast<const T*>(src.data_ptr());
        if (c == Compression::uniform8) detail::encode_uniform8(x, n, bytes.data());
        else detail::encode_quantile8(x, n, bytes.data());
      });
      e.payload = Buffer::adopt(std::move(bytes));
      break;
    }
  }
  return e;
}

/// Decodes a tensor from its descriptor and payload, validating both against `limits` first.
///
/// The result has the descriptor's dtype and shape and is contiguous. For codec "none" it
/// aliases the payload when the bytes are suitably aligned and have an owner (it then keeps
/// them alive); it is writable, and writes show through to other tensors decoded from the same
/// bytes. Throws hive::Error with errc::bad_tensor for a malformed descriptor or payload
/// (including non-finite or negative uniform8 lo/scale, a non-finite quantile8 codebook, and
/// bool bytes other than 0 and 1), or errc::limit_exceeded when the rank or element count
/// exceeds `limits`.
[[nodiscard]] inline at::Tensor decode_tensor(const nlohmann::json& descriptor, const Buffer& payload,
                                              const Limits& limits = {}) {
  const detail::TensorSpec spec = detail::parse_descriptor(descriptor, limits);
  if (payload.size() != spec.payload_bytes)
    detail::bad_tensor(fmt::format("payload has {} bytes but a {} {} tensor of shape {} needs {}",
                                   payload.size(), to_string(spec.codec), detail::dtype_name(spec.dtype),
                                   detail::brief(descriptor.at("shape")), spec.payload_bytes));
  switch (spec.codec) {
    case Compression::none:
      if (spec.dtype == at::kBool) {
        // Any other byte is not a valid C++ bool.
        for (std::byte b : payload.bytes())
          if (static_cast<unsigned char>(b) > 1) detail::bad_tensor("bool payload holds a byte other than 0 or 1");
      }
      return detail::view_or_copy(payload, spec.shape, spec.dtype);
    case Compression::float16: {
      at::Tensor half = detail::view_or_copy(payload, spec.shape, at::kHalf);
      return spec.dtype == at::kHalf ? half : half.to(spec.dtype);
    }
    case Compression::uniform8: {
      float lo = 0, scale = 0;
      std::memcpy(&lo, payload.data(), sizeof lo);
      std::memcpy(&scale, payload.data() + sizeof lo, sizeof scale);
      if (!std::isfinite(lo) || !std::isfinite(scale) || scale < 0)
        detail::bad_tensor(fmt::format("uniform8 needs a finite lo and a finite non-negative scale, got {} and {}",
                                       lo, scale));
      double levels[256];
      for (std::size_t c = 0; c < 256; ++c) levels[c] = static_cast<double>(lo) + static_cast<double>(c) * scale;
      return detail::decode_levels(
          levels, reinterpret_cast<const std::uint8_t*>(payload.data() + detail::uniform8_header_bytes), spec);
    }
    case Compression::quantile8: {
      float codebook[detail::quantile8_levels];
      std::memcpy(codebook, payload.data(), sizeof codebook);
      double levels[256];
      for (std::size_t c = 0; c < 256; ++c) {
        if (!std::isfinite(codebook[c]))
          detail::bad_tensor(fmt::format("quantile8 codebook entry {} is {}", c, codebook[c]));
        levels[c] = codebook[c];
      }
      return detail::decode_levels(
          levels, reinterpret_cast<const std::uint8_t*>(payload.data() + detail::quantile8_header_bytes), spec);
    }
  }
  detail::bad_tensor("unreachable codec");
}

/// Encodes `t`, appends its payload to `m` as a blob, and returns the descriptor with the
/// blob's index under "blob"; put the descriptor wherever the message's header wants it.
inline nlohmann::json add_tensor(Message& m, const at::Tensor& t, Compression c = Compression::none) {
  EncodedTensor e = encode_tensor(t, c);
  e.descriptor["blob"] = m.add_blob(std::move(e.payload));
  return std::move(e.descriptor);
}

/// Decodes the tensor a descriptor from add_tensor() describes; validates the blob index too.
[[nodiscard]] inline at::Tensor get_tensor(const Message& m, const nlohmann::json& descriptor,
                                           const Limits& limits = {}) {
  if (!descriptor.is_object())
    detail::bad_tensor(fmt::format("descriptor must be a JSON object, got {}", descriptor.type_name()));
  auto it = descriptor.find("blob");
  if (it == descriptor.end() || !it->is_number_integer())
    detail::bad_tensor("descriptor needs 'blob' as the index of its payload");
  const bool in_range = it->is_number_unsigned() ? it->get<std::uint64_t>() < m.blobs.size()
                                                 : it->get<std::int64_t>() >= 0 &&
                                                       static_cast<std::uint64_t>(it->get<std::int64_t>()) < m.blobs.size();
  if (!in_range)
    detail::bad_tensor(fmt::format("blob index {} is out of range (the message has {} blobs)", detail::brief(*it),
                                   m.blobs.size()));
  return decode_tensor(descriptor, m.blobs[it->get<std::size_t>()], limits);
}

/// Appends tensors to `m`: payloads as blobs, descriptors to the array `m.header["tensors"]`
/// (created when absent; a null header becomes an object). All tensors are encoded before
/// `m` changes, so a failure leaves it as it was. Throws hive::InvalidArgument when the header
/// is neither null nor an object, or its "tensors" is not an array.
inline void add_tensors(Message& m, std::span<const at::Tensor> tensors, Compression c = Compression::none) {
  HIVE_CHECK(m.header.is_null() || m.header.is_object(), "message header must be an object to hold tensors, got {}",
             m.header.type_name());
  if (m.header.is_object() && m.header.contains("tensors"))
    HIVE_CHECK(m.header["tensors"].is_array(), "message header's 'tensors' must be an array, got {}",
               m.header["tensors"].type_name());
  std::vector<EncodedTensor> encoded;
  encoded.reserve(tensors.size());
  for (const auto& t : tensors) encoded.push_back(encode_tensor(t, c));
  auto& list = m.header["tensors"];
  if (list.is_null()) list = nlohmann::json::array();
  for (auto& e : encoded) {
    e.descriptor["blob"] = m.add_blob(std::move(e.payload));
    list.push_back(std::move(e.descriptor));
  }
}

/// Appends tensors to `m`; see the span overload.
inline void add_tensors(Message& m, std::initializer_list<at::Tensor> tensors, Compression c = Compression::none) {
  add_tensors(m, std::span<const at::Tensor>(tensors.begin(), tensors.size()), c);
}

/// Decodes every tensor listed in `m.header["tensors"]`, in order. Throws hive::Error
/// (errc::bad_tensor or errc::limit_exceeded) naming the first bad entry.
[[nodiscard]] inline std::vector<at::Tensor> get_tensors(const Message& m, const Limits& limits = {}) {
  if (!m.header.is_object()) detail::bad_tensor("message header is not an object, so it lists no tensors");
  auto it = m.header.find("tensors");
  if (it == m.header.end() || !it->is_array()) detail::bad_tensor("message header has no 'tensors' array");
  if (it->size() > m.blobs.size())
    detail::bad_tensor(fmt::format("header lists {} tensors but the message has {} blobs", it->size(), m.blobs.size()));
  std::vector<at::Tensor> out;
  out.reserve(it->size());
  for (std::size_t i = 0; i < it->size(); ++i) {
    try {
      out.push_back(get_tensor(m, (*it)[i], limits));
    } catch (const Error& e) {
      // what() ends with the category's text, which the rethrown Error appends again.
      std::string what = e.what();
      const std::string suffix = ": " + e.code().message();
      if (what.ends_with(suffix)) what.resize(what.size() - suffix.size());
      throw Error(e.code(), fmt::format("tensors[{}]: {}", i, what));
    }
  }
  return out;
}

}  // namespace hive
