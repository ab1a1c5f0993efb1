#pragma once
/// @file
/// The built-in experts (ffn, transformer, det_dropout, nop), AnyExpert (any module behind a
/// list-of-tensors call) and the registry that names expert classes for servers and the CLI.

#include <hive/moe/schema.hpp>

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace hive::moe {

/// The feed-forward expert: Linear(h, 4h) → LayerNorm → ReLU → Linear(4h, h).
class FFNImpl : public torch::nn::Cloneable<FFNImpl> {
 public:
  /// An expert on vectors of `hidden_dim` features.
  explicit FFNImpl(std::int64_t hidden_dim) : hidden_dim_(hidden_dim) { reset(); }
  /// (Re)creates the parameters.
  void reset() override {
    HIVE_CHECK(hidden_dim_ > 0, "ffn: hidden_dim must be positive, got {}", hidden_dim_);
    fc1 = register_module("fc1", torch::nn::Linear(hidden_dim_, 4 * hidden_dim_));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({4 * hidden_dim_})));
    fc2 = register_module("fc2", torch::nn::Linear(4 * hidden_dim_, hidden_dim_));
  }
  /// [batch, h] → [batch, h].
  at::Tensor forward(const at::Tensor& x) { return fc2(torch::relu(norm(fc1(x)))); }

  torch::nn::Linear fc1{nullptr};      ///< h → 4h
  torch::nn::LayerNorm norm{nullptr};  ///< over 4h
  torch::nn::Linear fc2{nullptr};      ///< 4h → h

 private:
  std::int64_t hidden_dim_;
};
/// The feed-forward expert (module holder).
TORCH_MODULE(FFN);

/// Sequence length of the transformer expert's registered input schema ([batch, 16, h]).
inline constexpr std::int64_t transformer_seq_len = 16;

/// A pre-norm transformer encoder block: x + attention(LN(x)), then + FFN(LN(·)) with a
/// 4h GELU feed-forward. Input and output [batch, seq, h]; heads: 8 when h divides by 8,
/// else 1.
class TransformerBlockImpl : public torch::nn::Cloneable<TransformerBlockImpl> {
 public:
  /// A block of width `hidden_dim`; `num_heads` 0 picks 8 (or 1 when h is not a multiple of 8).
  explicit TransformerBlockImpl(std::int64_t hidden_dim, std::int64_t num_heads = 0)
      : hidden_dim_(hidden_dim), num_heads_(num_heads > 0 ? num_heads : (hidden_dim % 8 == 0 ? 8 : 1)) {
    reset();
  }
  /// (Re)creates the parameters.
  void reset() override {
    HIVE_CHECK(hidden_dim_ > 0 && hidden_dim_ % num_heads_ == 0,
               "transformer: hidden_dim {} must be positive and divisible by num_heads {}", hidden_dim_, num_heads_);
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({hidden_dim_})));
    attention = register_module("attention", torch::nn::MultiheadAttention(hidden_dim_, num_heads_));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({hidden_dim_})));
    fc1 = register_module("fc1", torch::nn::Linear(hidden_dim_, 4 * hidden_dim_));
    fc2 = register_module("fc2", torch::nn::Linear(4 * hidden_dim_, hidden_dim_));
  }
  /// [batch, seq, h] → [batch, seq, h].
  at::Tensor forward(const at::Tensor& x) {
    // MultiheadAttention takes [seq, batch, h].
    auto y = norm1(x).transpose(0, 1);
    auto attended = std::get<0>(attention->forward(y, y, y, /*key_padding_mask=*/at::Tensor(), /*need_weights=*/false));
    auto h = x + attended.transpose(0, 1);
    return h + fc2(torch::gelu(fc1(norm2(h))));
  }

  torch::nn::LayerNorm norm1{nullptr};              ///< before attention
  torch::nn::MultiheadAttention attention{nullptr};  ///< self-attention
  torch::nn::LayerNorm norm2{nullptr};              ///< before the feed-forward
  torch::nn::Linear fc1{nullptr};                   ///< h → 4h
  torch::nn::Linear fc2{nullptr};                   ///< 4h → h

 private:
  std::int64_t hidden_dim_;
  std::int64_t num_heads_;
};
/// The transformer expert (module holder).
TORCH_MODULE(TransformerBlock);

/// Dropout whose mask is an input, so that a backward pass recomputing the forward on another
/// machine drops exactly the same units: Linear(h, 2h) → ReLU → Linear(2h, h) applied to
/// x * mask / keep_prob. Inputs: x [batch, h] and mask [batch, h] (0 or 1, float).
class DetDropoutImpl : public torch::nn::Cloneable<DetDropoutImpl> {
 public:
  /// An expert on `hidden_dim` features whose masks keep a fraction `keep_prob` of units.
  explicit DetDropoutImpl(std::int64_t hidden_dim, double keep_prob = 0.8)
      : hidden_dim_(hidden_dim), keep_prob_(keep_prob) {
    reset();
  }
  /// (Re)creates the parameters.
  void reset() override {
    HIVE_CHECK(hidden_dim_ > 0, "det_dropout: hidden_dim must be positive, got {}", hidden_dim_);
    HIVE_CHECK(keep_prob_ > 0 && keep_prob_ <= 1, "det_dropout: keep_prob must be in (0, 1], got {}", keep_prob_);
    fc1 = register_module("fc1", torch::nn::Linear(hidden_dim_, 2 * hidden_dim_));
    fc2 = register_module("fc2", torch::nn::Linear(2 * hidden_dim_, hidden_dim_));
  }
  /// (x, mask) → [batch, h]; the mask gets no gradient.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& mask) {
    return fc2(torch::relu(fc1(x * mask.detach() / keep_prob_)));
  }

  torch::nn::Linear fc1{nullptr};  ///< h → 2h
  torch::nn::Linear fc2{nullptr};  ///< 2h → h

 private:
  std::int64_t hidden_dim_;
  double keep_prob_;
};
/// The deterministic-dropout expert (module holder).
TORCH_MODULE(DetDropout);

/// The expert that returns its input: measures the framework's own overhead. Holds one empty
/// parameter so that an optimizer can be built over it.
class NopImpl : public torch::nn::Cloneable<NopImpl> {
 public:
  /// `hidden_dim` is accepted for a uniform factory signature and unused.
  explicit NopImpl(std::int64_t /*hidden_dim*/ = 0) { reset(); }
  /// (Re)creates the (empty) parameter.
  void reset() override { empty = register_parameter("empty", torch::zeros({0})); }
  /// Returns `x`.
  at::Tensor forward(const at::Tensor& x) { return x; }

  at::Tensor empty;  ///< zero elements
};
/// The no-op expert (module holder).
TORCH_MODULE(Nop);

namespace detail {

template <class T>
struct is_tensor_tuple : std::false_type {};
template <class... Ts>
struct is_tensor_tuple<std::tuple<Ts...>> : std::bool_constant<(std::is_same_v<std::decay_t<Ts>, at::Tensor> && ...)> {};

/// A forward's result as a list of tensors.
template <class R>
std::vector<at::Tensor> to_tensor_list(R&& r) {
  using D = std::decay_t<R>;
  if constexpr (std::is_same_v<D, at::Tensor>) {
    return {std::forward<R>(r)};
  } else if constexpr (std::is_same_v<D, std::vector<at::Tensor>>) {
    return std::forward<R>(r);
  } else {
    static_assert(is_tensor_tuple<D>::value, "an expert's forward must return a Tensor, a vector or a tuple of Tensors");
    return std::apply([](auto&&... ts) { return std::vector<at::Tensor>{ts...}; }, std::forward<R>(r));
  }
}

/// Calls `impl.*f` with the tensors of `inputs` as its arguments.
template <class Impl, class R, class... Args>
std::vector<at::Tensor> call_forward(Impl& impl, R (Impl::*f)(Args...), const std::vector<at::Tensor>& inputs) {
  static_assert((std::is_convertible_v<const at::Tensor&, Args> && ...),
                "an expert's forward must take only tensors (const at::Tensor& or at::Tensor)");
  if (inputs.size() != sizeof...(Args))
    throw Error(errc::bad_tensor, fmt::format("the expert takes {} tensors, got {}", sizeof...(Args), inputs.size()));
  return [&]<std::size_t... I>(std::index_sequence<I...>) {
    return to_tensor_list((impl.*f)(inputs[I]...));
  }(std::index_sequence_for<Args...>{});
}

}  // namespace detail

/// Any module behind one call signature: a list of batch tensors in, a list out.
///
/// Built from a module holder whose Impl has a single, non-overloaded `forward` taking
/// tensors and returning a Tensor, a vector or a tuple of Tensors.
struct AnyExpert {
  /// The module (parameters, train/eval, save/load).
  std::shared_ptr<torch::nn::Module> module;
  /// Runs the module's forward.
  std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)> forward;

  /// Wraps module holder `m` (FFN, or a user's TORCH_MODULE).
  template <class Holder>
  static AnyExpert from(Holder m) {
    using Impl = typename Holder::ContainedType;
    std::shared_ptr<Impl> impl = m.ptr();
    return {impl, [impl](const std::vector<at::Tensor>& inputs) { return detail::call_forward(*impl, &Impl::forward, inputs); }};
  }
};

/// How to make an expert class: a module of a given width and sample inputs that fix its
/// input schema (their dtypes and shapes after the batch dimension).
struct ExpertClass {
  /// Builds a fresh expert of width `hidden_dim`.
  std::function<AnyExpert(std::int64_t hidden_dim)> make;
  /// A batch of `batch` inputs for an expert of width `hidden_dim`.
  std::function<std::vector<at::Tensor>(std::int64_t batch, std::int64_t hidden_dim)> sample_inputs;
};

/// The expert classes known by name, shared by the process (the CLI hosts any of them).
///
/// @par Thread safety
/// add(), get() and names() may be called from any thread.
class ExpertRegistry {
 public:
  /// The process-wide registry, holding the built-in classes ffn, transformer, det_dropout, nop.
  static ExpertRegistry& global() {
    static ExpertRegistry registry(with_builtins);
    return registry;
  }

  /// Registers (or replaces) class `name`.
  void add(const std::string& name, ExpertClass cls) {
    HIVE_CHECK(!name.empty() && cls.make && cls.sample_inputs, "an expert class needs a name, make and sample_inputs");
    std::lock_guard lock(mutex_);
    classes_[name] = std::move(cls);
  }
  /// Registers module holder `Holder` (constructible from hidden_dim) as class `name`.
  template <class Holder>
  void add(const std::string& name, std::function<std::vector<at::Tensor>(std::int64_t, std::int64_t)> sample_inputs) {
    add(name, ExpertClass{[](std::int64_t h) { return AnyExpert::from(Holder(h)); }, std::move(sample_inputs)});
  }

  /// Class `name`; throws hive::InvalidArgument listing the known names when absent.
  [[nodiscard]] ExpertClass get(const std::string& name) const {
    std::lock_guard lock(mutex_);
    auto it = classes_.find(name);
    if (it == classes_.end())
      throw InvalidArgument(fmt::format("unknown expert class '{}' (known: {})", name, fmt::join(names_locked(), ", ")));
    return it->second;
  }
  /// The registered names, sorted.
  [[nodiscard]] std::vector<std::string> names() const {
    std::lock_guard lock(mutex_);
    return names_locked();
  }

  /// An empty registry (global() is the one servers use).
  ExpertRegistry() = default;

 private:
  struct WithBuiltins {};
  static constexpr WithBuiltins with_builtins{};

  explicit ExpertRegistry(WithBuiltins) {
    auto rows = [](std::int64_t batch, std::int64_t h) { return std::vector<at::Tensor>{at::randn({batch, h})}; };
    add<FFN>("ffn", rows);
    add<Nop>("nop", rows);
    add<TransformerBlock>("transformer", [](std::int64_t batch, std::int64_t h) {
      return std::vector<at::Tensor>{at::randn({batch, transformer_seq_len, h})};
    });
    add<DetDropout>("det_dropout", [](std::int64_t batch, std::int64_t h) {
      return std::vector<at::Tensor>{at::randn({batch, h}), at::bernoulli(at::full({batch, h}, 0.8))};
    });
  }

  std::vector<std::string> names_locked() const {
    std::vector<std::string> out;
    for (const auto& [name, _] : classes_) out.push_back(name);
    return out;
  }

  mutable std::mutex mutex_;
  std::map<std::string, ExpertClass> classes_;
};

}  // namespace hive::moe
