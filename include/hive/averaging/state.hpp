#pragma once
/// @file
/// StateSharing: a peer announces that it shares its state (parameters, optimizer statistics,
/// counters) under a DHT key, serves it in parts, and downloads the best-ranked peer's state.
/// The DecentralizedAverager owns one under `prefix.all_averagers`; newcomers use it to start
/// from the swarm's state instead of from scratch.

#include <hive/fwd.hpp>
#include <hive/averaging/group.hpp>
#include <hive/core/log.hpp>
#include <hive/core/options.hpp>
#include <hive/core/tensor_codec.hpp>
#include <hive/detail/asio_compat.hpp>
#include <hive/dht/dht.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hive::averaging {

/// Method that downloads a part of a peer's shared state.
inline constexpr std::string_view state_method = "avg.state";

/// A peer's state as shared with newcomers: JSON metadata and tensors.
struct State {
  /// Anything small (step counters, names).
  nlohmann::json metadata;
  /// The tensors, in an order both sides agree on.
  std::vector<at::Tensor> tensors;
};

/// Knobs of a StateSharing (AveragerOptions::declare_state_period and state_part_bytes set
/// them for an averager's).
struct StateSharingOptions {
  /// How often the shared state is re-announced; each announcement lives twice as long.
  HIVE_ARG(Seconds, declare_period, Seconds(10));
  /// Most tensor bytes in one avg.state reply (a tensor larger than this goes alone).
  HIVE_ARG(std::int64_t, part_bytes, std::int64_t{8} << 20);
  HIVE_OPTIONS_JSON(StateSharingOptions, declare_period, part_bytes)
};

/// Shares a peer's state with others and downloads theirs, over the DHT peer's RPC.
///
/// A sharing peer (set_provider) is announced under `key` as the subkey `address` with a
/// priority, every declare_period. A download takes the announced peers by priority, highest
/// first, and fetches one snapshot of the chosen peer's state in parts of at most part_bytes
/// (several downloads that start within a second share a snapshot; a snapshot lives 120 s).
/// serve() is the avg.state handler; its owner registers it.
///
/// @tparam T the net::Transport policy
/// @tparam R the dht::Routing policy
/// @par Thread safety
/// Everything but set_priority() runs on the RPC peer's strand: set_provider() and close()
/// post there, serve() and download() are coroutines started there.
template <class T, class R>
class StateSharing : public std::enable_shared_from_this<StateSharing<T, R>> {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(dht::Routing<R>, "R must model dht::Routing (see docs/concepts/routing.md)");

 public:
  /// The DHT peer type.
  using dht_type = BasicDHT<T, R>;
  /// What set_provider() takes: builds the state to share (called on an io thread).
  using Provider = std::function<State()>;

  /// Shares and downloads under DHT `key` through `node`; `address` is where others reach this
  /// peer (empty for a peer nobody can connect to, which can only download). `method` is the
  /// RPC method of the sharing peers (an averager's is method_for(state_method, prefix)).
  StateSharing(std::shared_ptr<typename dht_type::node_type> node, std::string key, std::string address,
               StateSharingOptions options = {}, std::string method = std::string(state_method))
      : options_(std::move(options)),
        method_(std::move(method)),
        node_(std::move(node)),
        rpc_(node_->rpc()),
        key_(std::move(key)),
        address_(std::move(address)),
        timer_(rpc_->get_executor()) {
    HIVE_CHECK(options_.declare_period() > Seconds(0), "declare_period must be positive");
    HIVE_CHECK(options_.part_bytes() >= 1, "part_bytes must be positive");
  }

  /// Starts sharing: `provider` builds the state when a download begins; the peer is
  /// announced now with `priority`, and again every declare_period.
  void set_provider(Provider provider, double priority = 0) {
    HIVE_CHECK(!address_.empty(), "a peer nobody can connect to cannot share its state");
    priority_.store(priority);
    auto self = this->shared_from_this();
    hive::detail::run_blocking_on(rpc_->get_executor(), [&] { provider_ = std::move(provider); });
    asio::co_spawn(rpc_->get_executor(), [self]() -> asio::awaitable<void> { co_await self->declare_loop(); },
                   asio::detached);
  }
  /// Changes the announced priority (higher is preferred); a changed priority is announced at
  /// once (in the background). Any thread.
  void set_priority(double priority) {
    if (priority_.exchange(priority) == priority) return;
    // Wakes the announcement loop, which stores the new priority and waits again.
    asio::post(rpc_->get_executor(), [self = this->shared_from_this()] { self->timer_.cancel(); });
  }

  /// Stops announcing and answering (on the strand); drops the snapshots. Idempotent.
  void close() {
    closed_ = true;
    timer_.cancel();
    snapshots_.clear();
  }

  /// The avg.state handler: a part of a snapshot of this peer's state.
  asio::awaitable<Message> serve(Message m) {
    if (!provider_ || closed_) throw Error(errc::invalid_argument, "this peer does not share its state");
    const auto& h = m.header;
    if (!h.is_object() || !h.contains("offset") || !h["offset"].is_number_unsigned())
      throw Error(errc::bad_header, "avg.state needs 'offset' (unsigned)");
    const auto offset = h["offset"].get<std::size_t>();
    std::string id = h.contains("snapshot") && h["snapshot"].is_string() ? h["snapshot"].get<std::string>() : std::string();
    const auto now = SteadyClock::now();
    std::erase_if(snapshots_, [&](const auto& kv) { return now - kv.second->created > std::chrono::seconds(120); });
    if (id.empty()) {
      if (offset != 0) throw Error(errc::bad_header, "avg.state: a download starts at offset 0");
      // One snapshot serves every download that starts within a second.
      for (const auto& [sid, s] : snapshots_)
        if (now - s->created < std::chrono::seconds(1)) id = sid;
      if (id.empty()) {
        auto s = std::make_shared<Snapshot>();
        s->created = now;
        s->state = provider_();
        for (auto& t : s->state.tensors) t = t.detach().clone();
        id = Id160::random().hex().substr(0, 16);
        while (snapshots_.size() >= 4) snapshots_.erase(snapshots_.begin());
        snapshots_[id] = std::move(s);
      }
    }
    auto it = snapshots_.find(id);
    if (it == snapshots_.end()) throw Error(errc::invalid_argument, "the state snapshot expired; start the download again");
    const auto& state = it->second->state;
    if (offset > state.tensors.size())
      throw Error(errc::invalid_argument, fmt::format("offset {} beyond {} tensors", offset, state.tensors.size()));
    Message reply;
    reply.header = {{"snapshot", id}, {"total", state.tensors.size()}, {"offset", offset}};
    if (offset == 0) reply.header["metadata"] = state.metadata;
    std::vector<at::Tensor> part;
    std::int64_t bytes = 0;
    for (auto i = offset; i < state.tensors.size(); ++i) {
      const auto n = static_cast<std::int64_t>(state.tensors[i].nbytes());
      if (!part.empty() && bytes + n > options_.part_bytes()) break;
      part.push_back(state.tensors[i]);
      bytes += n;
    }
    add_tensors(reply, part);
    co_return reply;
  }

  /// Downloads the state of the announced peer with the highest priority (trying the next one
  /// when a download fails) within `timeout`; nullopt when nobody shares or every download
  /// failed. Completes `token` for `void(std::exception_ptr, std::optional<State>)`.
  template <class Token = asio::use_future_t<>>
  auto async_download(Seconds timeout, Token&& token = {}) {
    auto self = this->shared_from_this();
    return asio::co_spawn(
        rpc_->get_executor(), [self, timeout]() -> asio::awaitable<std::optional<State>> { co_return co_await self->download(timeout); },
        std::forward<Token>(token));
  }

  /// The peers that announce a shared state, best first: (priority, address), this peer left out.
  asio::awaitable<std::vector<std::pair<double, std::string>>> sharing_peers() {
    auto op = node_->get(Id160::of(key_), true);
    auto record = co_await std::move(op);
    std::vector<std::pair<double, std::string>> peers;
    if (record)
      if (auto decoded = dht_type::decode(*record))
        for (const auto& [subkey, v] : decoded->dictionary) {
          // Signed entries ("[owner:<id>]host:port", as group announcements); where records are
          // signed, an unsigned one names a peer that did not write it.
          const auto* text = std::get_if<std::string>(&subkey);
          const auto owned = text ? dht::split_owned(*text) : std::nullopt;
          if (!owned || owned->second.empty() || owned->second == address_ || owned->first == rpc_->peer_id() ||
              (owned->first.empty() && dht::signs_records<typename dht_type::node_type>) || !v.value.is_object() ||
              !v.value.contains("priority") || !v.value["priority"].is_number() ||
              !std::isfinite(v.value["priority"].template get<double>()))  // a NaN would break the sort
            continue;
          peers.emplace_back(v.value["priority"].template get<double>(), owned->second);
        }
    std::sort(peers.begin(), peers.end(), std::greater<>());
    co_return peers;
  }

 private:
  struct Snapshot {
    Deadline created;
    State state;
  };

  asio::awaitable<void> declare_loop() {
    if (declaring_) co_return;
    declaring_ = true;
    while (!closed_ && provider_) {
      const double expiration = node_->now() + 2 * options_.declare_period().count();
      const auto marker = dht::signs_records<typename dht_type::node_type> ? rpc_->identity().owner_marker() : std::string();
      std::vector<dht::StoreItem> items{{Id160::of(key_), dht::Subkey(announcement_subkey(marker, address_)),
                                         nlohmann::json::to_msgpack(nlohmann::json{{"priority", priority_.load()}}), expiration}};
      dht::sign_items(*node_, items);
      try {
        auto op = node_->store_many(std::move(items));
        co_await std::move(op);
      } catch (const std::exception& e) {
        log::warn("averaging", "announcing the shared state failed: {}", e.what());
      }
      timer_.expires_after(std::chrono::duration_cast<SteadyClock::duration>(options_.declare_period()));
      auto [ec] = co_await timer_.async_wait(hive::detail::as_tuple_awaitable);
      (void)ec;
    }
    declaring_ = false;
  }

  asio::awaitable<std::optional<State>> download(Seconds timeout) {
    const auto end = deadline_after(timeout);
    const auto peers = co_await sharing_peers();
    const auto limits = rpc_->transport().limits();
    for (const auto& [priority, peer] : peers) {
      if (closed_ || SteadyClock::now() >= end) break;
      try {
        State state;
        std::string snapshot;
        std::size_t total = 0;
        std::size_t offset = 0;
        do {
          Message request;
          request.header = {{"offset", offset}};
          if (!snapshot.empty()) request.header["snapshot"] = snapshot;
          const auto left = std::chrono::duration_cast<Seconds>(end - SteadyClock::now());
          auto op = rpc_->co_call(peer, method_, std::move(request), std::max(left, Seconds(0.001)));
          Message reply = co_await std::move(op);
          const auto& h = reply.header;
          if (!h.is_object() || !h.contains("snapshot") || !h["snapshot"].is_string() || !h.contains("total") ||
              !h["total"].is_number_unsigned())
            throw Error(errc::bad_header, "avg.state reply lacks 'snapshot' or 'total'");
          if (offset == 0) {
            snapshot = h["snapshot"].get<std::string>();
            total = h["total"].get<std::size_t>();
            state.metadata = h.value("metadata", nlohmann::json());
          }
          auto part = get_tensors(reply, limits);
          if (part.empty() && offset < total) throw Error(errc::bad_header, "avg.state reply carries no tensor");
          for (auto& t : part) state.tensors.push_back(std::move(t));
          offset += part.size();
          if (offset > total) throw Error(errc::bad_header, "avg.state sent more tensors than announced");
        } while (offset < total);
        log::info("averaging", "downloaded the state of {} (priority {}): {} tensors", peer, priority, total);
        co_return state;
      } catch (const std::exception& e) {
        log::warn("averaging", "downloading the state of {} failed: {}", peer, e.what());
      }
    }
    co_return std::nullopt;
  }

  StateSharingOptions options_;
  std::string method_;
  std::shared_ptr<typename dht_type::node_type> node_;
  std::shared_ptr<net::Rpc<T>> rpc_;
  std::string key_;
  std::string address_;
  Provider provider_;
  std::atomic<double> priority_{0};
  bool closed_ = false;
  bool declaring_ = false;
  asio::steady_timer timer_;
  std::map<std::string, std::shared_ptr<Snapshot>> snapshots_;
};

}  // namespace hive::averaging
