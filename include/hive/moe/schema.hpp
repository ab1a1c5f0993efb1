#pragma once
/// @file
/// TensorSchema: what an expert accepts and returns (dtype and shape after the batch
/// dimension), checked on every request before any compute.

#include <hive/core/message.hpp>
#include <hive/core/tensor_codec.hpp>

#include <ATen/ops/all.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros.h>

#include <fmt/ranges.h>

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace hive::moe {

/// One tensor of a batch: its dtype and its shape after the leading batch dimension.
struct TensorSchema {
  /// Element type.
  at::ScalarType dtype = at::kFloat;
  /// Sizes after the batch dimension ({512} for a batch of 512-vectors).
  std::vector<std::int64_t> shape;

  /// The schema of `t`'s rows (its dtype and t.sizes()[1:]); `t` needs at least one dimension.
  static TensorSchema of(const at::Tensor& t) {
    HIVE_CHECK(t.dim() >= 1, "a batch tensor needs a leading batch dimension, got a 0-d tensor");
    return {t.scalar_type(), std::vector<std::int64_t>(t.sizes().begin() + 1, t.sizes().end())};
  }
  /// The schemas of several tensors.
  static std::vector<TensorSchema> of(const std::vector<at::Tensor>& ts) {
    std::vector<TensorSchema> out;
    out.reserve(ts.size());
    for (const auto& t : ts) out.push_back(of(t));
    return out;
  }
  /// An empty batch of `batch` rows with this schema.
  [[nodiscard]] at::Tensor make(std::int64_t batch) const {
    std::vector<std::int64_t> sizes{batch};
    sizes.insert(sizes.end(), shape.begin(), shape.end());
    return at::zeros(sizes, at::TensorOptions().dtype(dtype));
  }
  /// "float32[*, 512]".
  [[nodiscard]] std::string str() const { return fmt::format("{}[*, {}]", hive::detail::dtype_name(dtype), fmt::join(shape, ", ")); }

  friend bool operator==(const TensorSchema&, const TensorSchema&) = default;
  /// Prints str().
  friend std::ostream& operator<<(std::ostream& os, const TensorSchema& s) { return os << s.str(); }

  /// {"dtype": "float32", "shape": [512]}.
  friend void to_json(nlohmann::json& j, const TensorSchema& s) {
    j = {{"dtype", hive::detail::dtype_name(s.dtype)}, {"shape", s.shape}};
  }
  /// Reads {"dtype", "shape"}; throws hive::InvalidArgument on an unknown dtype or a size that
  /// is not an integer.
  friend void from_json(const nlohmann::json& j, TensorSchema& s) {
    auto dtype = hive::detail::dtype_from_name(j.at("dtype").get<std::string>());
    // A peer sent it: replace invalid UTF-8 in the message rather than throw while reporting it.
    HIVE_CHECK(dtype.has_value(), "unknown dtype {}", j.at("dtype").dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    s.dtype = *dtype;
    const auto& shape = j.at("shape");
    HIVE_CHECK(shape.is_array(), "a tensor schema's shape must be a list");
    s.shape.clear();
    for (const auto& size : shape) {
      const auto v = hive::integer_of<std::int64_t>(size);
      HIVE_CHECK(v.has_value(), "a tensor schema's sizes must be integers, got {}",
                 size.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      s.shape.push_back(*v);
    }
  }
};

/// Checks that `tensors` match `schemas` (count, dtype, rank, trailing sizes) and share one
/// batch size of at least one row; returns that batch size. Throws hive::Error(bad_tensor)
/// naming the first mismatch, prefixed by `what` ("inputs", "grad_outputs").
inline std::int64_t check_batch(const std::vector<at::Tensor>& tensors, const std::vector<TensorSchema>& schemas,
                                std::string_view what) {
  auto fail = [&](const std::string& why) { throw Error(errc::bad_tensor, fmt::format("{}: {}", what, why)); };
  if (tensors.size() != schemas.size()) fail(fmt::format("expected {} tensors, got {}", schemas.size(), tensors.size()));
  std::int64_t batch = -1;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    const auto& s = schemas[i];
    auto got = [&] {
      return fmt::format("{}{}", hive::detail::dtype_name(t.scalar_type()), t.sizes());
    };
    if (t.scalar_type() != s.dtype)
      fail(fmt::format("tensor {} should be {}, got {}", i, s.str(), got()));
    if (t.dim() != static_cast<std::int64_t>(s.shape.size()) + 1)
      fail(fmt::format("tensor {} should be {} (rank {}), got {}", i, s.str(), s.shape.size() + 1, got()));
    for (std::size_t d = 0; d < s.shape.size(); ++d)
      if (t.size(static_cast<std::int64_t>(d) + 1) != s.shape[d])
        fail(fmt::format("tensor {} should be {}, got {}", i, s.str(), got()));
    if (batch < 0) batch = t.size(0);
    if (t.size(0) != batch) fail(fmt::format("tensor {} has {} rows but tensor 0 has {}", i, t.size(0), batch));
  }
  if (batch == 0) fail("empty batch (0 rows)");
  return batch;
}

/// Checks that every floating-point tensor in `tensors` holds only finite values (no NaN, no
/// infinity): one such request would otherwise poison an expert for every later caller.
/// Throws hive::Error(bad_tensor) naming the tensor, prefixed by `what`.
inline void check_finite(const std::vector<at::Tensor>& tensors, std::string_view what) {
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0) continue;
    if (!all_finite(t))
      throw Error(errc::bad_tensor, fmt::format("{}: tensor {} holds non-finite values (NaN or infinity)", what, i));
  }
}

}  // namespace hive::moe
