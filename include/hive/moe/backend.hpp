#pragma once
/// @file
/// The moe::Backend concept (what a server calls to compute an expert) and its default model,
/// ModuleBackend: a torch module with its optimizer, schemas and checkpoints.

#include <hive/fwd.hpp>
#include <hive/core/log.hpp>
#include <hive/core/options.hpp>
#include <hive/core/tensor_codec.hpp>
#include <hive/moe/experts.hpp>

#include <torch/autograd.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <concepts>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace hive::moe {

/// What a server needs from the computation behind one expert.
///
/// `forward` and `backward` receive whole batches (the scheduler has merged the rows of many
/// requests) already checked against `input_schema()` / `output_schema()`; `backward` gets
/// the inputs and the gradients of the outputs, returns the gradients of the inputs and
/// applies the update. `save`/`load` read and write checkpoints under a directory.
template <class B>
concept Backend = std::move_constructible<B> &&
    requires(B& b, const B& cb, std::vector<at::Tensor> tensors, const std::filesystem::path& dir) {
      { cb.name() } -> std::convertible_to<std::string>;
      { cb.input_schema() } -> std::convertible_to<std::vector<TensorSchema>>;
      { cb.output_schema() } -> std::convertible_to<std::vector<TensorSchema>>;
      { cb.info() } -> std::same_as<nlohmann::json>;
      { b.forward(tensors) } -> std::same_as<std::vector<at::Tensor>>;
      { b.backward(tensors, tensors) } -> std::same_as<std::vector<at::Tensor>>;
      { b.save(dir) };
      { b.load(dir) } -> std::same_as<bool>;
    };

/// Run-time knobs of a ModuleBackend.
struct BackendOptions {
  /// "sgd", "adam", or "none" (no update: the expert is frozen).
  HIVE_ARG(std::string, optimizer, "sgd");
  /// Learning rate of the optimizer.
  HIVE_ARG(double, learning_rate, 0.01);
  /// Momentum of SGD.
  HIVE_ARG(double, momentum, 0.0);
  /// Clip the gradient norm of each update to this value; 0 disables clipping.
  HIVE_ARG(double, clip_grad_norm, 0.0);
  /// Checkpoint files kept per expert (older ones are deleted after a save).
  HIVE_ARG(int, keep_checkpoints, 2);
  HIVE_OPTIONS_JSON(BackendOptions, optimizer, learning_rate, momentum, clip_grad_norm, keep_checkpoints)
};

/// A torch module served as an expert: forward without grad, backward that recomputes the
/// forward with grad, returns the input gradients and takes one optimizer step.
///
/// @tparam M the module: AnyExpert (the default, any registered class), or a user's
///           TORCH_MODULE holder whose Impl has one `forward` over tensors.
/// @par Thread safety
/// forward(), backward(), save() and load() may be called from any thread; they serialize on
/// the backend's own lock (a forward never sees a half-applied update).
template <class M>
class ModuleBackend {
 public:
  /// The module type.
  using module_type = M;

  /// Serves `module` as expert `name`, taking inputs like `sample_inputs` (only their dtypes and
  /// shapes after the batch dimension matter). Runs one forward on the samples to learn the
  /// output schema.
  ModuleBackend(std::string name, M module, const std::vector<at::Tensor>& sample_inputs, BackendOptions options = {})
      : name_(std::move(name)), module_(std::move(module)), options_(std::move(options)) {
    HIVE_CHECK(!name_.empty(), "an expert needs a name (its uid)");
    HIVE_CHECK(!sample_inputs.empty(), "expert {}: needs at least one sample input", name_);
    if constexpr (std::is_same_v<M, AnyExpert>) expert_ = module_;
    else expert_ = AnyExpert::from(module_);
    HIVE_CHECK(expert_.module && expert_.forward, "expert {}: the module is empty", name_);
    inputs_ = TensorSchema::of(sample_inputs);
    {
      torch::NoGradGuard no_grad;
      std::vector<at::Tensor> one_row;
      for (const auto& s : inputs_) one_row.push_back(sample_row(s));
      outputs_ = TensorSchema::of(expert_.forward(one_row));
    }
    make_optimizer();
  }
  ModuleBackend(ModuleBackend&&) noexcept = default;
  ModuleBackend& operator=(ModuleBackend&&) noexcept = default;

  /// The expert's uid.
  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  /// What each request must send.
  [[nodiscard]] const std::vector<TensorSchema>& input_schema() const noexcept { return inputs_; }
  /// What forward returns (and what backward's grad_outputs must look like).
  [[nodiscard]] const std::vector<TensorSchema>& output_schema() const noexcept { return outputs_; }
  /// The module.
  [[nodiscard]] M& module() noexcept { return module_; }
  /// The optimizer (nullptr when options().optimizer() is "none" or the module has no parameters).
  [[nodiscard]] torch::optim::Optimizer* optimizer() noexcept { return optimizer_.get(); }
  /// Replaces the optimizer (built over module().parameters() by the caller).
  void set_optimizer(std::unique_ptr<torch::optim::Optimizer> optimizer) {
    std::lock_guard lock(*mutex_);
    optimizer_ = std::move(optimizer);
  }
  /// The options.
  [[nodiscard]] const BackendOptions& options() const noexcept { return options_; }
  /// Optimizer steps taken so far (restored from checkpoints).
  [[nodiscard]] std::int64_t updates() const noexcept { return updates_->load(); }

  /// {"name", "input_schema", "output_schema", "parameters", "optimizer", "learning_rate",
  /// "updates"}: what clients learn from the info method.
  [[nodiscard]] nlohmann::json info() const {
    std::int64_t parameters = 0;
    for (const auto& p : expert_.module->parameters()) parameters += p.numel();
    return {{"name", name_},
            {"input_schema", inputs_},
            {"output_schema", outputs_},
            {"parameters", parameters},
            {"optimizer", options_.optimizer()},
            {"learning_rate", options_.learning_rate()},
            {"updates", updates()}};
  }

  /// Runs the module without grad on a batch.
  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs) {
    std::lock_guard lock(*mutex_);
    torch::NoGradGuard no_grad;
    auto outputs = expert_.forward(inputs);
    check_outputs(outputs);
    return outputs;
  }

  /// Recomputes the forward with grad, back-propagates `grad_outputs`, returns the gradients of
  /// the inputs (zeros for inputs that get none) and takes one optimizer step.
  std::vector<at::Tensor> backward(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& grad_outputs) {
    std::lock_guard lock(*mutex_);
    torch::AutoGradMode grad_mode(true);
    std::vector<at::Tensor> leaves;
    leaves.reserve(inputs.size());
    for (const auto& x : inputs) {
      auto leaf = x.detach();
      if (at::isFloatingType(leaf.scalar_type())) leaf.requires_grad_(true);
      leaves.push_back(std::move(leaf));
    }
    auto outputs = expert_.forward(leaves);
    check_outputs(outputs);
    std::vector<at::Tensor> roots, grads;
    for (std::size_t i = 0; i < outputs.size(); ++i) {
      if (!outputs[i].requires_grad()) continue;
      roots.push_back(outputs[i]);
      grads.push_back(grad_outputs.at(i));
    }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    std::vector<at::Tensor> grad_inputs;
    grad_inputs.reserve(leaves.size());
    for (auto& leaf : leaves) {
      auto g = leaf.grad();
      grad_inputs.push_back(g.defined() ? g : at::zeros_like(leaf));
    }
    // Gradients set to none rather than zeroed (libtorch 1.13's zero_grad): the next backward
    // then writes fresh gradients instead of adding into zeros, 25% faster for small batches.
    auto clear_grads = [&] {
      for (auto& p : expert_.module->parameters()) p.mutable_grad() = at::Tensor();
    };
    if (optimizer_) {
      // Finite inputs can still overflow into infinite gradients (values near 1e30 in float32):
      // such an update is refused whole, so one hostile batch cannot wreck the expert.
      const double norm = gradient_norm();
      if (!std::isfinite(norm)) {
        clear_grads();
        throw Error(errc::bad_tensor, fmt::format("expert {}: the gradient overflowed (norm {}); update refused", name_, norm));
      }
      for (const auto& g : grad_inputs)
        if (!all_finite(g)) {
          clear_grads();
          throw Error(errc::bad_tensor, fmt::format("expert {}: the input gradient overflowed; update refused", name_));
        }
      if (options_.clip_grad_norm() > 0) torch::nn::utils::clip_grad_norm_(expert_.module->parameters(), options_.clip_grad_norm());
      optimizer_->step();
      ++*updates_;
    }
    clear_grads();
    return grad_inputs;
  }

  /// Writes a checkpoint (parameters, buffers, optimizer state, update count) to
  /// `dir`/<name>/checkpoint_<time>.pt, atomically, and deletes all but the newest
  /// options().keep_checkpoints().
  void save(const std::filesystem::path& dir) {
    namespace fs = std::filesystem;
    const fs::path folder = dir / name_;
    fs::create_directories(folder);
    torch::serialize::OutputArchive archive;
    {
      std::lock_guard lock(*mutex_);
      expert_.module->save(archive);
      if (optimizer_) {
        torch::serialize::OutputArchive optimizer;
        optimizer_->save(optimizer);
        archive.write("hive.optimizer", optimizer);
      }
      archive.write("hive.updates", at::tensor(updates_->load()));
    }
    const auto millis = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch()).count();
    const fs::path file = folder / fmt::format("checkpoint_{:015d}.pt", millis);
    const fs::path tmp = folder / fmt::format(".checkpoint_{:015d}.pt.tmp", millis);
    archive.save_to(tmp.string());
    fs::rename(tmp, file);
    auto files = checkpoints(folder);
    const auto keep = static_cast<std::size_t>(std::max(1, options_.keep_checkpoints()));
    for (std::size_t i = 0; i + keep < files.size(); ++i) fs::remove(files[i]);
  }

  /// Restores the newest checkpoint under `dir`/<name>/; false when there is none.
  bool load(const std::filesystem::path& dir) {
    auto files = checkpoints(dir / name_);
    if (files.empty()) return false;
    torch::serialize::InputArchive archive;
    archive.load_from(files.back().string());
    std::lock_guard lock(*mutex_);
    expert_.module->load(archive);
    torch::serialize::InputArchive optimizer;
    if (optimizer_ && archive.try_read("hive.optimizer", optimizer)) optimizer_->load(optimizer);
    at::Tensor updates;
    if (archive.try_read("hive.updates", updates)) updates_->store(updates.item<std::int64_t>());
    log::info("moe", "expert {}: restored {} ({} updates)", name_, files.back().filename().string(), updates_->load());
    return true;
  }

 private:
  static at::Tensor sample_row(const TensorSchema& s) {
    auto t = s.make(1);
    if (at::isFloatingType(t.scalar_type())) t.normal_();
    return t;
  }

  // The 2-norm of all parameter gradients, summed in each gradient's own dtype (as torch's
  // clip_grad_norm_ does), so that an overflow shows as infinity rather than being hidden.
  double gradient_norm() const {
    double total = 0;
    for (const auto& p : expert_.module->parameters()) {
      const auto& g = p.grad();
      if (!g.defined()) continue;
      const bool blas = g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble;
      const auto flat = g.reshape({-1});
      total += (blas ? flat.dot(flat) : flat.mul(flat).sum()).template item<double>();
    }
    return std::sqrt(total);
  }

  static std::vector<std::filesystem::path> checkpoints(const std::filesystem::path& folder) {
    std::vector<std::filesystem::path> files;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(folder, ec)) {
      const auto name = entry.path().filename().string();
      if (name.starts_with("checkpoint_") && name.ends_with(".pt")) files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());  // zero-padded times sort by age
    return files;
  }

  void make_optimizer() {
    const auto& kind = options_.optimizer();
    HIVE_CHECK(kind == "sgd" || kind == "adam" || kind == "none", "expert {}: optimizer must be sgd, adam or none, got '{}'",
               name_, kind);
    HIVE_CHECK(options_.learning_rate() >= 0, "expert {}: learning_rate must be non-negative", name_);
    auto params = expert_.module->parameters();
    if (kind == "none" || params.empty()) return;
    if (kind == "sgd")
      optimizer_ = std::make_unique<torch::optim::SGD>(
          params, torch::optim::SGDOptions(options_.learning_rate()).momentum(options_.momentum()));
    else
      optimizer_ = std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(options_.learning_rate()));
  }

  void check_outputs(const std::vector<at::Tensor>& outputs) const {
    if (outputs.size() != outputs_.size())
      throw Error(errc::remote_error, fmt::format("expert {} returned {} tensors, its schema says {}", name_,
                                                  outputs.size(), outputs_.size()));
  }

  std::string name_;
  M module_;
  AnyExpert expert_;
  BackendOptions options_;
  std::vector<TensorSchema> inputs_, outputs_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();
  std::unique_ptr<std::atomic<std::int64_t>> updates_ = std::make_unique<std::atomic<std::int64_t>>(0);
};

static_assert(Backend<ModuleBackend<>>);

/// Backends for `uids`, each a fresh expert of registered class `expert_cls` and width
/// `hidden_dim`. Throws hive::InvalidArgument for an unknown class.
inline std::vector<ModuleBackend<>> make_backends(const std::string& expert_cls, const std::vector<std::string>& uids,
                                                  std::int64_t hidden_dim, const BackendOptions& options = {},
                                                  const ExpertRegistry& registry = ExpertRegistry::global()) {
  auto cls = registry.get(expert_cls);
  std::vector<ModuleBackend<>> out;
  out.reserve(uids.size());
  for (const auto& uid : uids) out.emplace_back(uid, cls.make(hidden_dim), cls.sample_inputs(2, hidden_dim), options);
  return out;
}

}  // namespace hive::moe
