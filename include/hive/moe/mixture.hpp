#pragma once
/// @file
/// RemoteMixtureOfExperts and RemoteSwitchMixtureOfExperts: layers whose experts live on other
/// machines, chosen per sample by a gating function and beam search over the DHT, that keep
/// working when some experts are slow or dead.
///
/// Over 400 lines because both layers share the dispatch (one batched call per expert, the
/// k_min / timeout rule) and its autograd function; beam search itself is in dht/experts.hpp.

#include <hive/dht/experts.hpp>
#include <hive/moe/remote_expert.hpp>

#include <torch/nn/modules/linear.h>

#include <condition_variable>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace hive::moe {

/// Run-time knobs of a mixture of remote experts.
struct MixtureOptions {
  /// Default options; set in_features, uid_prefix and grid before use.
  MixtureOptions() = default;
  /// A mixture over inputs of `in_features` and experts `uid_prefix`.c1.c2… on `grid`.
  MixtureOptions(std::int64_t in_features, std::string uid_prefix, std::vector<std::int64_t> grid) {
    this->in_features(in_features).uid_prefix(std::move(uid_prefix)).grid(std::move(grid));
  }

  /// Features of each input row (and of each expert's input).
  HIVE_ARG(std::int64_t, in_features, 0);
  /// Features of each expert's output; 0 means in_features.
  HIVE_ARG(std::int64_t, out_features, 0);
  /// Experts' uid prefix.
  HIVE_ARG(std::string, uid_prefix, "expert");
  /// Grid sizes; the gating function scores each dimension's coordinates.
  HIVE_ARG(std::vector<std::int64_t>, grid, {});
  /// Experts asked per sample.
  HIVE_ARG(int, k_best, 2);
  /// Beam width of the search; 0 means k_best. Wider finds better experts in a sparse grid.
  HIVE_ARG(int, beam_size, 0);
  /// Answers needed per sample before the layer stops waiting for the slow experts.
  HIVE_ARG(int, k_min, 1);
  /// Longest wait for the forward answers (k_min per sample).
  HIVE_ARG(Seconds, forward_timeout, Seconds(30));
  /// Once k_min experts answered for every sample, wait at most this for the others.
  HIVE_ARG(Seconds, timeout_after_k_min, Seconds(1));
  /// Backward answers needed per sample (of the experts that answered its forward).
  HIVE_ARG(int, backward_k_min, 1);
  /// Longest wait for the backward answers.
  HIVE_ARG(Seconds, backward_timeout, Seconds(60));
  /// A sample that no expert answers gets a zero output instead of an error.
  HIVE_ARG(bool, allow_zero_outputs, false);
  /// Treat non-finite outputs and gradients from an expert as a failure of that expert.
  HIVE_ARG(bool, detect_anomalies, false);
  /// Most rows in one call; an expert chosen by more samples gets several calls. A server that
  /// takes fewer (its max_batch_size, read from its moe.info in the background the first time
  /// the mixture meets it) gets calls of at most that many rows from the next pass on.
  HIVE_ARG(std::int64_t, max_rows_per_call, 4096);
  /// Compression of the tensors sent to experts and of their replies.
  HIVE_ARG(Compression, compression, Compression::none);
  /// Caching of the DHT's prefix dictionaries.
  HIVE_ARG(dht::ExpertDirectoryOptions, directory, dht::ExpertDirectoryOptions{});
  HIVE_OPTIONS_JSON(MixtureOptions, in_features, out_features, uid_prefix, grid, k_best, beam_size, k_min, forward_timeout,
                    timeout_after_k_min, backward_k_min, backward_timeout, allow_zero_outputs, detect_anomalies,
                    max_rows_per_call, compression, directory)


 public:
  /// out_features, or in_features when it is 0.
  [[nodiscard]] std::int64_t output_features() const noexcept { return out_features_ > 0 ? out_features_ : in_features_; }
};

/// What the last forward pass of a mixture saw (for progress bars and tests).
struct MixtureStats {
  /// Distinct experts chosen by beam search.
  std::size_t experts_found = 0;
  /// Distinct experts that answered in time.
  std::size_t experts_answered = 0;
  /// Calls that failed or came too late (an expert with more rows than max_rows_per_call gets
  /// several calls).
  std::size_t calls_failed = 0;
  /// Last failure messages (a few).
  std::vector<std::string> errors;
};

namespace detail {

/// One forward pass's routing: per distinct expert, the samples sent to it and the slot each
/// occupies in its sample's list of experts; and what came back.
struct Dispatch : torch::CustomClassHolder {
  struct Group {
    std::string uid, address;
    std::vector<std::int64_t> rows;   // sample indices
    std::vector<std::int64_t> slots;  // position in the sample's list, parallel to rows
    bool answered = false;
  };
  std::vector<Group> groups;
  std::int64_t batch = 0, k = 0, out_features = 0;
  MixtureOptions options;
  std::shared_ptr<ExpertClient> client;
  MixtureStats stats;
};

/// Runs one call per group listed in `which` (with `requests[i]` for `which[i]`) in parallel
/// and waits as the mixture's fault tolerance says: until `need` answers per row (or all calls
/// end, or `timeout`), then at most `grace` longer for the rest. Returns, per listed group,
/// its tensors, or nullopt for a failure or a late answer; appends failures to `errors`.
inline std::vector<std::optional<std::vector<at::Tensor>>> call_groups(
    Dispatch& d, std::string_view method, const std::vector<std::size_t>& which, std::vector<Message> requests,
    std::int64_t need, Seconds timeout, Seconds grace, std::vector<std::string>& errors) {
  struct Shared {
    std::mutex mutex;
    std::condition_variable cv;
    std::vector<std::optional<std::vector<at::Tensor>>> results;
    std::vector<bool> done;
    std::vector<std::string> errors;
    std::size_t finished = 0;
  };
  auto shared = std::make_shared<Shared>();
  shared->results.resize(which.size());
  shared->done.assign(which.size(), false);
  const auto check_finite = d.options.detect_anomalies();
  for (std::size_t i = 0; i < which.size(); ++i) {
    const auto& g = d.groups[which[i]];
    const auto expected_rows = static_cast<std::int64_t>(g.rows.size());
    d.client->start_call(g.address, method, std::move(requests[i]), timeout,
                         [shared, i, uid = g.uid, expected_rows, check_finite](std::exception_ptr error, Message reply) {
                           std::optional<std::vector<at::Tensor>> result;
                           std::string why;
                           try {
                             if (error) std::rethrow_exception(error);
                             auto tensors = get_tensors(reply);
                             for (const auto& t : tensors) {
                               if (t.dim() < 1 || t.size(0) != expected_rows)
                                 throw Error(errc::bad_tensor, "reply has the wrong number of rows");
                               if (check_finite && !all_finite(t))
                                 throw Error(errc::bad_tensor, "reply holds non-finite values");
                             }
                             result = std::move(tensors);
                           } catch (const std::exception& e) {
                             why = fmt::format("{}: {}", uid, e.what());
                           }
                           std::lock_guard lock(shared->mutex);
                           shared->results[i] = std::move(result);
                           if (!why.empty()) shared->errors.push_back(std::move(why));
                           shared->done[i] = true;
                           ++shared->finished;
                           shared->cv.notify_all();
                         });
  }
  // Answers each row needs: `need`, or fewer when fewer calls carry the row.
  std::vector<std::int64_t> wanted(static_cast<std::size_t>(d.batch), 0);
  for (auto g : which)
    for (auto r : d.groups[g].rows) wanted[static_cast<std::size_t>(r)]++;
  for (auto& w : wanted) w = std::min(need, w);
  auto satisfied = [&] {
    std::vector<std::int64_t> answers(static_cast<std::size_t>(d.batch), 0);
    for (std::size_t i = 0; i < which.size(); ++i)
      if (shared->results[i])
        for (auto r : d.groups[which[i]].rows) answers[static_cast<std::size_t>(r)]++;
    for (std::size_t r = 0; r < answers.size(); ++r)
      if (answers[r] < wanted[r]) return false;
    return true;
  };
  std::unique_lock lock(shared->mutex);
  const auto deadline = deadline_after(timeout);
  shared->cv.wait_until(lock, deadline, [&] { return shared->finished == which.size() || satisfied(); });
  if (shared->finished < which.size()) {
    const auto after = std::min(deadline, deadline_after(grace));
    shared->cv.wait_until(lock, after, [&] { return shared->finished == which.size(); });
  }
  for (std::size_t i = 0; i < which.size(); ++i)
    if (!shared->done[i]) errors.push_back(fmt::format("{}: no answer in time", d.groups[which[i]].uid));
  errors.insert(errors.end(), shared->errors.begin(), shared->errors.end());
  // Late answers land in `shared` (kept alive by their callbacks) and are ignored.
  return shared->results;
}

/// The autograd function of a mixture's expert calls: x [batch, in] → expert outputs
/// [batch, k, out] (zeros where an expert did not answer) and a mask [batch, k] of answers.
struct DispatchCall : torch::autograd::Function<DispatchCall> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& dummy,
                                                c10::intrusive_ptr<Dispatch> d, const at::Tensor& x) {
    (void)dummy;
    auto& o = d->options;
    std::vector<std::size_t> all(d->groups.size());
    std::iota(all.begin(), all.end(), std::size_t{0});
    std::vector<Message> requests;
    requests.reserve(all.size());
    for (const auto& g : d->groups) {
      auto rows = at::tensor(g.rows, at::kLong);
      requests.push_back(expert_request(g.uid, {x.index_select(0, rows)}, o.compression()));
    }
    auto results = call_groups(*d, forward_method, all, std::move(requests), o.k_min(), o.forward_timeout(),
                               o.timeout_after_k_min(), d->stats.errors);
    auto outputs = at::zeros({d->batch, d->k, d->out_features}, x.options());
    auto mask = at::zeros({d->batch, d->k}, at::kBool);
    for (std::size_t i = 0; i < results.size(); ++i) {
      auto& g = d->groups[i];
      if (!results[i] || results[i]->size() != 1 || results[i]->front().dim() != 2 ||
          results[i]->front().size(1) != d->out_features) {
        if (results[i]) d->stats.errors.push_back(fmt::format("{}: output is not [rows, {}]", g.uid, d->out_features));
        d->stats.calls_failed++;
        continue;
      }
      g.answered = true;
      auto rows = at::tensor(g.rows, at::kLong), slots = at::tensor(g.slots, at::kLong);
      outputs.index_put_({rows, slots}, results[i]->front().to(x.scalar_type()));
      mask.index_put_({rows, slots}, true);
    }
    std::set<std::string> answered_uids;
    for (const auto& g : d->groups)
      if (g.answered) answered_uids.insert(g.uid);
    d->stats.experts_answered = answered_uids.size();
    if (!o.allow_zero_outputs()) {
      auto answered = mask.any(1);
      if (!answered.all().item<bool>()) {
        const auto sample = (~answered).nonzero()[0][0].item<std::int64_t>();
        throw Error(errc::remote_error,
                    fmt::format("no expert answered for sample {} ({} of {} calls failed{}{})", sample, d->stats.calls_failed,
                                d->groups.size(), d->stats.errors.empty() ? "" : "; first: ",
                                d->stats.errors.empty() ? "" : d->stats.errors.front()));
      }
    }
    ctx->saved_data["dispatch"] = c10::IValue::make_capsule(c10::intrusive_ptr<torch::CustomClassHolder>(d));
    ctx->save_for_backward({x});
    ctx->mark_non_differentiable({mask});
    return {outputs, mask};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto d = c10::static_intrusive_pointer_cast<Dispatch>(ctx->saved_data["dispatch"].toCapsule());
    auto x = ctx->get_saved_variables()[0].detach();
    auto grad = grad_outputs[0].detach();  // [batch, k, out]
    auto& o = d->options;
    std::vector<std::size_t> answered;
    std::vector<Message> requests;
    for (std::size_t i = 0; i < d->groups.size(); ++i) {
      const auto& g = d->groups[i];
      if (!g.answered) continue;
      auto rows = at::tensor(g.rows, at::kLong), slots = at::tensor(g.slots, at::kLong);
      answered.push_back(i);
      requests.push_back(expert_request(g.uid, {x.index_select(0, rows), grad.index({rows, slots})}, o.compression()));
    }
    std::vector<std::string> errors;
    auto results = call_groups(*d, backward_method, answered, std::move(requests), o.backward_k_min(), o.backward_timeout(),
                               o.timeout_after_k_min(), errors);
    auto grad_x = at::zeros_like(x);
    std::vector<std::int64_t> got(static_cast<std::size_t>(d->batch), 0), wanted(static_cast<std::size_t>(d->batch), 0);
    for (std::size_t j = 0; j < answered.size(); ++j) {
      const auto& g = d->groups[answered[j]];
      for (auto r : g.rows) wanted[static_cast<std::size_t>(r)]++;
      const auto& r = results[j];
      if (!r || r->size() != 1 || r->front().dim() != 2 || r->front().size(0) != static_cast<std::int64_t>(g.rows.size()) ||
          r->front().size(1) != x.size(1))
        continue;
      for (auto r : g.rows) got[static_cast<std::size_t>(r)]++;
      grad_x.index_add_(0, at::tensor(g.rows, at::kLong), results[j]->front().to(x.scalar_type()));
    }
    if (!o.allow_zero_outputs())
      for (std::size_t r = 0; r < got.size(); ++r)
        if (got[r] < std::min<std::int64_t>(o.backward_k_min(), wanted[r]))
          throw Error(errc::remote_error, fmt::format("only {} of {} experts of sample {} answered the backward pass{}{}",
                                                      got[r], wanted[r], r, errors.empty() ? "" : "; first: ",
                                                      errors.empty() ? "" : errors.front()));
    return {at::Tensor(), at::Tensor(), grad_x};
  }
};

/// What the two mixture modules share: options, the gate, the directory and the dispatch.
class MixtureCore {
 public:
  MixtureCore(MixtureOptions options, std::shared_ptr<dht::ExpertDirectory> directory, std::shared_ptr<ExpertClient> client)
      : options_(std::move(options)), directory_(std::move(directory)), client_(client ? std::move(client) : default_client()) {
    HIVE_CHECK(options_.in_features() > 0, "in_features must be positive");
    HIVE_CHECK(!options_.grid().empty(), "the grid needs at least one dimension");
    HIVE_CHECK(options_.k_best() >= 1 && options_.k_min() >= 1 && options_.backward_k_min() >= 1,
               "k_best, k_min and backward_k_min must be at least 1");
    HIVE_CHECK(options_.beam_size() == 0 || options_.beam_size() >= options_.k_best(), "beam_size must be 0 or >= k_best");
    HIVE_CHECK(options_.max_rows_per_call() >= 1, "max_rows_per_call must be at least 1");
    HIVE_CHECK(directory_ && directory_->grid() == options_.grid(), "the directory must cover the mixture's grid");
    for (auto g : options_.grid()) width_ += g;
  }

  [[nodiscard]] const MixtureOptions& options() const noexcept { return options_; }
  [[nodiscard]] std::int64_t gate_width() const noexcept { return width_; }
  [[nodiscard]] MixtureStats last_stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  [[nodiscard]] const std::shared_ptr<dht::ExpertDirectory>& directory() const noexcept { return directory_; }

  /// Routes the rows of `x` by `logits` [batch, gate_width] and calls the experts. Returns
  /// expert outputs [batch, k, out], the answer mask [batch, k] and, per slot, the flat gate
  /// index of each coordinate [batch, k, dims] (0 where no expert was found).
  /// Throws hive::InvalidArgument unless `x` is [batch, in_features].
  void check_input(const at::Tensor& x) const {
    HIVE_CHECK(x.dim() == 2 && x.size(1) == options_.in_features(), "a mixture takes [batch, {}], got [{}]",
               options_.in_features(), fmt::join(x.sizes(), ", "));
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch(const at::Tensor& x, const at::Tensor& logits) {
    check_input(x);
    const auto batch = x.size(0);
    const auto k = static_cast<std::int64_t>(options_.k_best());
    const auto dims = static_cast<std::int64_t>(options_.grid().size());
    auto scores = logits.detach().to(at::kFloat).contiguous();
    auto found = directory_->find_best(std::span<const float>(scores.data_ptr<float>(), static_cast<std::size_t>(scores.numel())),
                                       static_cast<std::size_t>(batch), static_cast<std::size_t>(k),
                                       static_cast<std::size_t>(options_.beam_size()));
    auto d = c10::make_intrusive<Dispatch>();
    d->batch = batch;
    d->k = k;
    d->out_features = options_.output_features();
    d->options = options_;
    d->client = client_;
    auto index = at::zeros({batch, k, dims}, at::kLong);
    auto index_a = index.accessor<std::int64_t, 3>();
    std::map<std::string, std::size_t> group_of;
    std::map<std::string, std::int64_t> rows_per_call;  // per server: max_rows_per_call, or less if it takes less
    for (std::int64_t b = 0; b < batch; ++b) {
      const auto& experts = found[static_cast<std::size_t>(b)];
      for (std::size_t j = 0; j < experts.size(); ++j) {
        const auto& e = experts[j];
        auto [cap, new_server] = rows_per_call.try_emplace(e.address, options_.max_rows_per_call());
        if (new_server)  // never waits: an unknown server is asked in the background, for the next pass
          if (auto limit = client_->max_batch_size(e.address, e.uid, options_.forward_timeout()))
            cap->second = std::min(cap->second, *limit);
        auto [it, added] = group_of.try_emplace(e.uid, d->groups.size());
        if (!added && static_cast<std::int64_t>(d->groups[it->second].rows.size()) >= cap->second) {
          it->second = d->groups.size();  // this expert's call is full: start another
          added = true;
        }
        if (added) d->groups.push_back({e.uid, e.address, {}, {}, false});
        d->groups[it->second].rows.push_back(b);
        d->groups[it->second].slots.push_back(static_cast<std::int64_t>(j));
        std::int64_t offset = 0;
        for (std::int64_t dim = 0; dim < dims; ++dim) {
          index_a[b][static_cast<std::int64_t>(j)][dim] = offset + e.coords[static_cast<std::size_t>(dim)];
          offset += options_.grid()[static_cast<std::size_t>(dim)];
        }
      }
    }
    d->stats.experts_found = group_of.size();
    if (d->groups.empty() && !options_.allow_zero_outputs())
      throw Error(errc::remote_error, fmt::format("no alive experts found under '{}.' in the DHT", options_.uid_prefix()));
    torch::autograd::variable_list out;
    if (d->groups.empty()) {
      out = {at::zeros({batch, k, d->out_features}, x.options()), at::zeros({batch, k}, at::kBool)};
    } else {
      // Experts that failed are left out of the next searches, whether or not this pass survives.
      auto report = [&] {
        for (const auto& g : d->groups)
          if (!g.answered) directory_->report_failure(g.uid);
      };
      try {
        out = DispatchCall::apply(at::empty({0}).requires_grad_(), d, x);
      } catch (...) {
        report();
        throw;
      }
      report();
    }
    {
      std::lock_guard lock(mutex_);
      stats_ = d->stats;
      if (stats_.errors.size() > 8) stats_.errors.resize(8);
    }
    return {out[0], out[1], index};
  }

 private:
  MixtureOptions options_;
  std::shared_ptr<dht::ExpertDirectory> directory_;
  std::shared_ptr<ExpertClient> client_;
  std::int64_t width_ = 0;
  mutable std::mutex mutex_;
  MixtureStats stats_;
};

/// Per-slot sums of the gate's logits over the coordinates of each chosen expert.
inline at::Tensor expert_scores(const at::Tensor& logits, const at::Tensor& index) {
  const auto batch = index.size(0), k = index.size(1), dims = index.size(2);
  return logits.gather(1, index.view({batch, k * dims})).view({batch, k, dims}).sum(2);
}

}  // namespace detail

/// A mixture of remote experts (Learning@home's DMoE layer): a linear gate scores every grid
/// coordinate, beam search over the DHT picks each sample's k_best alive experts, one batched
/// call per expert carries all the samples routed to it, and the answers are averaged with a
/// softmax over the scores of the experts that answered. The backward pass goes only to those.
///
/// @par Example
/// @code
/// hive::moe::RemoteMixtureOfExperts dmoe(hive::moe::MixtureOptions(512, "expert", {4, 4}).k_best(4), dht);
/// auto y = dmoe(torch::randn({32, 512}));   // [32, 512]
/// @endcode
/// @par Failures
/// Once k_min experts answered for every sample, it waits at most timeout_after_k_min for the
/// rest; an expert that fails, answers late or (with detect_anomalies) answers non-finite
/// values is left out. A sample no expert answered raises unless allow_zero_outputs.
class RemoteMixtureOfExpertsImpl : public torch::nn::Cloneable<RemoteMixtureOfExpertsImpl> {
 public:
  /// Finds experts through `dht` (which must outlive this module); calls them through
  /// `client` (default_client() when null).
  template <net::Transport T, dht::Routing R>
  RemoteMixtureOfExpertsImpl(MixtureOptions options, BasicDHT<T, R>& dht, std::shared_ptr<ExpertClient> client = nullptr)
      : RemoteMixtureOfExpertsImpl(options, dht::ExpertDirectory::over(dht, options.uid_prefix(), options.grid(), options.directory()),
                                   std::move(client)) {}
  /// Finds experts through `directory`.
  RemoteMixtureOfExpertsImpl(MixtureOptions options, std::shared_ptr<dht::ExpertDirectory> directory,
                             std::shared_ptr<ExpertClient> client = nullptr)
      : core_(std::make_shared<detail::MixtureCore>(std::move(options), std::move(directory), std::move(client))) {
    reset();
  }
  /// (Re)creates the gate.
  void reset() override {
    gate = register_module("gate", torch::nn::Linear(core_->options().in_features(), core_->gate_width()));
  }

  /// [batch, in_features] → [batch, out_features].
  at::Tensor forward(const at::Tensor& x) {
    core_->check_input(x);
    auto logits = gate(x);
    auto [outputs, mask, index] = core_->dispatch(x, logits);
    auto scores = detail::expert_scores(logits, index).masked_fill(~mask, -std::numeric_limits<float>::infinity());
    // A row without answers (allow_zero_outputs) would be all -inf: give it zero weights.
    auto weights = at::softmax(scores, 1).masked_fill(~mask, 0.0);
    return (weights.unsqueeze(2) * outputs).sum(1);
  }

  /// What the last forward saw: experts found, answered, failures.
  [[nodiscard]] MixtureStats last_stats() const { return core_->last_stats(); }
  /// The options.
  [[nodiscard]] const MixtureOptions& options() const noexcept { return core_->options(); }
  /// The beam searcher (to inspect or clear its cache).
  [[nodiscard]] const std::shared_ptr<dht::ExpertDirectory>& directory() const noexcept { return core_->directory(); }

  /// The gating function: in_features → sum(grid) scores.
  torch::nn::Linear gate{nullptr};

 private:
  std::shared_ptr<detail::MixtureCore> core_;
};
/// A mixture of remote experts (module holder).
TORCH_MODULE(RemoteMixtureOfExperts);

/// Knobs of the switch variant beyond MixtureOptions.
struct SwitchOptions {
  /// Multiplicative jitter on the gate's input while training: x · U(1 - eps, 1 + eps).
  HIVE_ARG(double, jitter_eps, 1e-2);
  /// Decay of the exponential average of each coordinate's utilization.
  HIVE_ARG(double, utilization_alpha, 0.9);
  HIVE_OPTIONS_JSON(SwitchOptions, jitter_eps, utilization_alpha)
};

/// The switch mixture: top-1 routing by default (k_best 1). The output of each answering
/// expert is scaled by its gate probability (the product over dimensions of the softmax of
/// each dimension's scores), and forward also returns a load-balancing loss,
/// Σ_d g_d Σ_c u_d[c] · mean_b p_d[b, c], where u_d is an exponential average of how often
/// coordinate c of dimension d was chosen: add it (times a small factor) to the training loss
/// to spread samples over the experts.
class RemoteSwitchMixtureOfExpertsImpl : public torch::nn::Cloneable<RemoteSwitchMixtureOfExpertsImpl> {
 public:
  /// Finds experts through `dht` (which must outlive this module).
  template <net::Transport T, dht::Routing R>
  RemoteSwitchMixtureOfExpertsImpl(MixtureOptions options, BasicDHT<T, R>& dht, SwitchOptions switch_options = {},
                                   std::shared_ptr<ExpertClient> client = nullptr)
      : RemoteSwitchMixtureOfExpertsImpl(options,
                                         dht::ExpertDirectory::over(dht, options.uid_prefix(), options.grid(), options.directory()),
                                         std::move(switch_options), std::move(client)) {}
  /// Finds experts through `directory`.
  RemoteSwitchMixtureOfExpertsImpl(MixtureOptions options, std::shared_ptr<dht::ExpertDirectory> directory,
                                   SwitchOptions switch_options = {}, std::shared_ptr<ExpertClient> client = nullptr)
      : core_(std::make_shared<detail::MixtureCore>(std::move(options), std::move(directory), std::move(client))),
        switch_(std::move(switch_options)) {
    HIVE_CHECK(switch_.jitter_eps() >= 0 && switch_.jitter_eps() < 1, "jitter_eps must be in [0, 1)");
    HIVE_CHECK(switch_.utilization_alpha() >= 0 && switch_.utilization_alpha() < 1, "utilization_alpha must be in [0, 1)");
    reset();
  }
  /// (Re)creates the gate and the utilization averages.
  void reset() override {
    gate = register_module("gate", torch::nn::Linear(core_->options().in_features(), core_->gate_width()));
    utilization.clear();
    for (auto g : core_->options().grid())
      utilization.push_back(register_buffer(fmt::format("utilization_{}", utilization.size()), at::full({g}, 1.0 / static_cast<double>(g))));
  }

  /// [batch, in_features] → (output [batch, out_features], balancing loss, a scalar).
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x) {
    core_->check_input(x);
    auto gate_input = x;
    if (is_training() && switch_.jitter_eps() > 0)
      gate_input = x * at::empty_like(x).uniform_(1.0 - switch_.jitter_eps(), 1.0 + switch_.jitter_eps());
    auto logits = gate(gate_input);
    // Per-dimension log-probabilities: an expert's score is its log-probability under the gate.
    std::vector<at::Tensor> log_probs;
    std::int64_t offset = 0;
    for (auto g : core_->options().grid()) {
      log_probs.push_back(at::log_softmax(logits.narrow(1, offset, g), 1));
      offset += g;
    }
    auto flat = at::cat(log_probs, 1);
    auto [outputs, mask, index] = core_->dispatch(x, flat);
    auto probs = at::exp(detail::expert_scores(flat, index)).masked_fill(~mask, 0.0);
    auto out = (probs.unsqueeze(2) * outputs).sum(1);

    // Utilization: how often each coordinate was chosen (by the answering top experts).
    at::Tensor loss = at::zeros({}, x.options());
    const auto dims = static_cast<std::int64_t>(core_->options().grid().size());
    offset = 0;
    for (std::int64_t d = 0; d < dims; ++d) {
      const auto g = core_->options().grid()[static_cast<std::size_t>(d)];
      {
        torch::NoGradGuard no_grad;
        auto chosen = (index.select(2, d) - offset).masked_select(mask);
        if (chosen.numel() > 0) {
          auto counts = at::bincount(chosen, {}, g).to(at::kFloat);
          auto share = counts / counts.sum();
          const double a = switch_.utilization_alpha();
          utilization[static_cast<std::size_t>(d)].mul_(a).add_(share * (1.0 - a));
        }
      }
      auto mean_probs = at::exp(log_probs[static_cast<std::size_t>(d)]).mean(0);
      loss = loss + static_cast<double>(g) * (utilization[static_cast<std::size_t>(d)] * mean_probs).sum();
      offset += g;
    }
    return {out, loss};
  }

  /// What the last forward saw.
  [[nodiscard]] MixtureStats last_stats() const { return core_->last_stats(); }
  /// The options.
  [[nodiscard]] const MixtureOptions& options() const noexcept { return core_->options(); }

  /// The gating function.
  torch::nn::Linear gate{nullptr};
  /// Per dimension, the exponential average of each coordinate's share of the samples.
  std::vector<at::Tensor> utilization;

 private:
  std::shared_ptr<detail::MixtureCore> core_;
  SwitchOptions switch_;
};
/// The switch mixture of remote experts (module holder).
TORCH_MODULE(RemoteSwitchMixtureOfExperts);

}  // namespace hive::moe
