#pragma once
/// @file
/// hive::Trainer: a training peer composed of a DHT peer, an averager and a decentralized
/// optimizer, with the transport, routing and averaging strategy chosen as policies.

#include <hive/fwd.hpp>
#include <hive/optim/decentralized.hpp>

#include <memory>
#include <string>

namespace hive {

/// Run-time knobs of a Trainer.
struct TrainerOptions {
  /// The trainer's DHT peer: where it listens, the peers it joins, client mode.
  HIVE_ARG(DHTOptions, dht, DHTOptions{});
  /// What is averaged, with whom, how often (prefix, target_group_size, averager knobs...).
  HIVE_ARG(optim::DecentralizedOptions, optimizer, optim::DecentralizedOptions{});
  HIVE_OPTIONS_JSON(TrainerOptions, dht, optimizer)
};

/// A training peer: joins the swarm's DHT, averages the wrapped optimizer's parameters with
/// peers of the same run in the background, and shares its state with newcomers.
///
/// @tparam T the net::Transport policy (net::Tcp; net::Simulated for the emulator)
/// @tparam R the dht::Routing policy
/// @tparam A the averaging::Strategy (butterfly all-reduce by default)
/// @par Example
/// @code
/// torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
/// hive::Trainer<> trainer(sgd, hive::TrainerOptions()
///     .dht(hive::DHTOptions().initial_peers({"127.0.0.1:1337"}))
///     .optimizer(hive::optim::DecentralizedOptions().prefix("my_run").target_group_size(4)));
/// trainer.load_state_from_peers();
/// for (...) { trainer.zero_grad(); loss.backward(); trainer.step(); }
/// @endcode
/// @par Thread safety
/// As DecentralizedOptimizer: step(), zero_grad() and load_state_from_peers() belong to the
/// training thread. The wrapped optimizer must outlive the trainer.
template <class T, class R, class A>
class Trainer {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(dht::Routing<R>, "R must model dht::Routing (see docs/concepts/routing.md)");
  static_assert(averaging::Strategy<A>, "A must model averaging::Strategy (see docs/concepts/strategy.md)");
  static_assert(averaging::StrategyFor<A, T>, "A's Runner<T> must model averaging::StrategyFor<A, T>");
 public:
  /// The DHT peer type.
  using dht_type = BasicDHT<T, R>;
  /// The optimizer type.
  using optimizer_type = optim::DecentralizedOptimizer<T, R, A>;

  /// Starts the DHT peer (joining `options.dht().initial_peers()`) and the averaging around
  /// `inner`. Throws hive::Error when no initial peer answers.
  explicit Trainer(torch::optim::Optimizer& inner, TrainerOptions options = {},
                   std::optional<typename T::Options> transport_options = std::nullopt)
      : options_(std::move(options)),
        dht_(std::make_unique<dht_type>(options_.dht(), std::move(transport_options))),
        optimizer_(std::make_unique<optimizer_type>(inner, *dht_, options_.optimizer())) {}
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;
  /// Stops averaging, then the DHT peer.
  ~Trainer() { shutdown(); }

  /// Runs the wrapped optimizer's step and the averaging schedule (see DecentralizedOptimizer).
  void step() { optimizer_->step(); }
  /// Clears the gradients.
  void zero_grad() { optimizer_->zero_grad(); }
  /// Downloads parameters, optimizer state and step from the best peer; false when none shares.
  bool load_state_from_peers(Seconds timeout = Seconds(60)) { return optimizer_->load_state_from_peers(timeout); }

  /// The address others join the swarm through (empty in client mode).
  [[nodiscard]] std::string address() const {
    auto a = dht_->visible_addresses();
    return a.empty() ? std::string() : a.front();
  }
  /// The DHT peer.
  [[nodiscard]] dht_type& dht() noexcept { return *dht_; }
  /// The decentralized optimizer.
  [[nodiscard]] optimizer_type& optimizer() noexcept { return *optimizer_; }
  /// The options.
  [[nodiscard]] const TrainerOptions& options() const noexcept { return options_; }

  /// Stops averaging, then the DHT peer; idempotent.
  void shutdown() {
    if (optimizer_) optimizer_->shutdown();
    optimizer_.reset();
    if (dht_) dht_->shutdown();
  }

 private:
  TrainerOptions options_;
  std::unique_ptr<dht_type> dht_;
  std::unique_ptr<optimizer_type> optimizer_;
};

}  // namespace hive
