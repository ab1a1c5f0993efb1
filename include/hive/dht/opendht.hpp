#pragma once
/// @file
/// dht::OpenDHT: the second dht::Routing model. Records are stored and looked up by OpenDHT
/// (libopendht, a deployed Kademlia over UDP) instead of hive's own dht::Node; the peer's RPC
/// port (experts, averaging) stays hive's. Link the `hive::opendht` CMake target
/// (Debian: libopendht-dev); this header is not part of <hive/hive.hpp>.

#include <hive/fwd.hpp>
#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/id.hpp>
#include <hive/detail/event.hpp>
#include <hive/dht/node.hpp>
#include <hive/dht/protocol.hpp>
#include <hive/net/address.hpp>
#include <hive/net/rpc.hpp>

#include <opendht/dhtrunner.h>
#include <opendht/value.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace hive::dht {

template <class T>
class OpenDhtNode;

/// Records through OpenDHT (the `routing` slot's second model, beside Kademlia<>).
///
/// When to pick it: a swarm that wants a DHT engine deployed and hardened elsewhere (OpenDHT
/// runs Jami's network). What changes against Kademlia<>: records travel over OpenDHT's UDP
/// protocol on the same port number as the peer's TCP port; OpenDHT stores each value on its
/// 8 nearest nodes and keeps it at most `value_lifetime` (1 h), whatever its expiration (a
/// store that asks for longer is refused). The swarm is a private OpenDHT network
/// (`network_id`), so it never mixes with the public one. NodeOptions knobs that OpenDHT
/// decides itself (num_replicas, caching, refresh, storage bounds, blacklist, reply budget)
/// must keep their defaults: OpenDhtNode::create refuses others. No client mode: every
/// OpenDHT node answers on its UDP port.
struct OpenDHT {
  /// The DHT engine of a BasicDHT<T, OpenDHT>.
  template <class T>
  using node_type = OpenDhtNode<T>;
  /// OpenDHT's network id of hive swarms ("hive"): nodes of other networks are ignored.
  static constexpr std::uint32_t network_id = 0x68697665;
  /// The OpenDHT value type hive's records are stored as.
  static constexpr std::uint16_t value_type = 0x4856;
  /// The longest a value lives on OpenDHT.
  static constexpr double value_lifetime = 3600;
};

namespace detail {

/// An OpenDHT value id per (key, subkey): 1 for a regular value, a hash with the top bit set
/// for a dictionary entry (0 would ask OpenDHT for a random id).
inline std::uint64_t opendht_value_id(const std::optional<Subkey>& subkey) {
  if (!subkey) return 1;
  // MessagePack, not JSON text: a string subkey need not be valid UTF-8.
  const auto bytes = nlohmann::json::to_msgpack(subkey_to_json(*subkey));
  const auto id = Id160::of(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  std::uint64_t out = 0;
  for (int i = 0; i < 8; ++i) out = (out << 8) | id.bytes()[static_cast<std::size_t>(i)];
  return out | (std::uint64_t{1} << 63);
}

/// A stored item as OpenDHT value data: MessagePack {"s": subkey or null, "v": bytes, "e": expiration}.
inline std::vector<std::uint8_t> opendht_value_data(const StoreItem& item) {
  nlohmann::json j{{"s", item.subkey ? subkey_to_json(*item.subkey) : nlohmann::json()},
                   {"v", nlohmann::json::binary(item.value)},
                   {"e", item.expiration}};
  return nlohmann::json::to_msgpack(j);
}

/// One decoded OpenDHT value.
struct OpenDhtEntry {
  std::optional<Subkey> subkey;
  ValueWithExpiration value;
};

/// Decodes what opendht_value_data wrote; nullopt for anything else (values of foreign
/// writers are skipped, as undecodable values are in BasicDHT::decode).
inline std::optional<OpenDhtEntry> opendht_entry(const std::vector<std::uint8_t>& data) {
  try {
    const auto j = nlohmann::json::from_msgpack(data);
    if (!j.is_object() || !j.contains("v") || !j["v"].is_binary() || !j.contains("e") || !j["e"].is_number())
      return std::nullopt;
    OpenDhtEntry out;
    if (j.contains("s") && !j["s"].is_null()) {
      out.subkey = subkey_from_json(j["s"]);
      if (!out.subkey) return std::nullopt;
    }
    out.value.value = j["v"].get_binary();
    out.value.expiration = j["e"].get<double>();
    if (!std::isfinite(out.value.expiration)) return std::nullopt;
    return out;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

/// The record that entries found under one key make at time `now`: per subkey the latest
/// unexpired entry; between a regular value and a dictionary, the later record (as merge_record).
inline std::optional<Record> opendht_record(const std::vector<OpenDhtEntry>& entries, double now) {
  std::optional<ValueWithExpiration> regular;
  Dictionary dictionary;
  for (const auto& e : entries) {
    if (!(e.value.expiration > now)) continue;
    if (!e.subkey) {
      if (!regular || e.value.expiration > regular->expiration) regular = e.value;
    } else {
      auto [it, inserted] = dictionary.emplace(*e.subkey, e.value);
      if (!inserted && e.value.expiration > it->second.expiration) it->second = e.value;
    }
  }
  double dict_expiration = 0;
  for (const auto& [k, v] : dictionary) dict_expiration = std::max(dict_expiration, v.expiration);
  if (regular && (dictionary.empty() || regular->expiration >= dict_expiration))
    return Record{*regular, regular->expiration};
  if (!dictionary.empty()) return Record{std::move(dictionary), dict_expiration};
  return std::nullopt;
}

}  // namespace detail

/// One DHT peer whose records go through OpenDHT (see dht::OpenDHT). The same operations as
/// dht::Node, so that BasicDHT, expert records and averaging run on it unchanged.
///
/// @tparam T the net::Transport of the peer's RPC port
/// @par Thread safety
/// OpenDHT runs on its own thread; its callbacks post their results to the RPC peer's
/// strand, where every coroutine operation resumes.
template <class T>
class OpenDhtNode : public std::enable_shared_from_this<OpenDhtNode<T>> {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  struct Private {};

 public:
  /// The RPC peer type.
  using rpc_type = net::Rpc<T>;

  /// Creates a peer (not listening yet). Throws hive::InvalidArgument for NodeOptions knobs
  /// OpenDHT decides itself when they differ from their defaults, and for client mode.
  static std::shared_ptr<OpenDhtNode> create(const asio::any_io_executor& executor, NodeOptions options = {},
                                             typename T::Options transport_options = {}, net::RpcOptions rpc_options = {},
                                             std::optional<Id160> id = std::nullopt) {
    HIVE_CHECK(options.wait_timeout().count() > 0, "wait_timeout must be positive");
    HIVE_CHECK(!options.client_mode(), "dht::OpenDHT has no client mode: every OpenDHT node answers on its UDP port");
    const NodeOptions d;
    auto same = [](const auto& a, const auto& b) { return nlohmann::json(a) == nlohmann::json(b); };
    const std::pair<const char*, bool> fixed[] = {
        {"num_replicas", same(options.num_replicas(), d.num_replicas())},
        {"cache_on_store", same(options.cache_on_store(), d.cache_on_store())},
        {"refresh_period", same(options.refresh_period(), d.refresh_period())},
        {"cache_refresh_before_expiry", same(options.cache_refresh_before_expiry(), d.cache_refresh_before_expiry())},
        {"storage", same(options.storage(), d.storage())},
        {"cache", same(options.cache(), d.cache())},
        {"blacklist", same(options.blacklist(), d.blacklist())},
        {"max_find_reply_bytes", same(options.max_find_reply_bytes(), d.max_find_reply_bytes())}};
    for (const auto& [name, ok] : fixed)
      HIVE_CHECK(ok, "NodeOptions::{} is decided by OpenDHT under dht::OpenDHT routing: leave it at its default", name);
    return std::make_shared<OpenDhtNode>(Private{}, executor, std::move(options), std::move(transport_options),
                                         std::move(rpc_options), id.value_or(Id160::random()));
  }
  /// Use create().
  OpenDhtNode(Private, const asio::any_io_executor& executor, NodeOptions options, typename T::Options transport_options,
              net::RpcOptions rpc_options, Id160 id)
      : options_(std::move(options)),
        id_(id),
        rpc_(rpc_type::create(executor, std::move(transport_options), std::move(rpc_options))),
        runner_(std::make_unique<::dht::DhtRunner>()) {}
  OpenDhtNode(const OpenDhtNode&) = delete;
  OpenDhtNode& operator=(const OpenDhtNode&) = delete;
  /// Stops OpenDHT's thread.
  ~OpenDhtNode() { stop_runner(); }

  /// This peer's id (also its OpenDHT node id).
  [[nodiscard]] const Id160& id() const noexcept { return id_; }
  /// The RPC peer (experts and averaging serve their methods on it).
  [[nodiscard]] const std::shared_ptr<rpc_type>& rpc() const noexcept { return rpc_; }
  /// The RPC listen address, as bound; OpenDHT's UDP socket has the same host and port.
  [[nodiscard]] std::string address() const { return rpc_->listen_address(); }
  /// The addresses other hosts reach this peer at (see net::announce_addresses).
  [[nodiscard]] std::vector<std::string> announce_addresses(std::string_view announce_host = {}) const {
    return net::announce_addresses(address(), announce_host, {});
  }
  /// Why each initial peer that did not answer the last bootstrap failed ("address: reason").
  [[nodiscard]] std::vector<std::string> bootstrap_failures() const {
    std::lock_guard lock(mutex_);
    return bootstrap_failures_;
  }
  /// The options.
  [[nodiscard]] const NodeOptions& options() const noexcept { return options_; }
  /// This peer's clock: wall_time() plus options().clock_offset().
  [[nodiscard]] double now() const noexcept { return wall_time() + options_.clock_offset().count(); }

  /// Listens for RPC on `listen_on` (TCP) and starts OpenDHT on UDP at the same host and the
  /// port TCP was given. Throws hive::Error when either cannot bind.
  void listen(std::string_view listen_on) {
    const auto bound = net::HostPort::parse(rpc_->listen(listen_on));
    ::dht::DhtRunner::Config config;
    config.threaded = true;
    config.dht_config.node_config.network = OpenDHT::network_id;
    config.dht_config.node_config.node_id = ::dht::InfoHash(id_.bytes().data(), Id160::size);
    const auto port = std::to_string(bound.port);
    try {
      auto addresses = ::dht::SockAddr::resolve(bound.host, port);
      HIVE_CHECK(!addresses.empty(), "cannot resolve '{}' for OpenDHT", bound.host);
      if (addresses.front().getFamily() == AF_INET6) config.bind6 = addresses.front();
      else config.bind4 = addresses.front();
      runner_->run(config, {});
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error(errc::connection_refused, fmt::format("OpenDHT cannot bind UDP {}: {}", bound.str(), e.what()));
    }
    // Every node of the swarm accepts the same value type: a newer expiration replaces an
    // older one of the same (key, subkey), as hive's own storage does.
    runner_->registerType(::dht::ValueType(
        OpenDHT::value_type, "hive.record", std::chrono::seconds(static_cast<long>(OpenDHT::value_lifetime)),
        [](::dht::InfoHash, std::shared_ptr<::dht::Value>& v, const ::dht::InfoHash&, const ::dht::SockAddr&) {
          return v && v->data.size() <= 64 * 1024;
        },
        [](::dht::InfoHash, const std::shared_ptr<::dht::Value>& old_value, std::shared_ptr<::dht::Value>& new_value,
           const ::dht::InfoHash&, const ::dht::SockAddr&) {
          auto o = detail::opendht_entry(old_value->data);
          auto n = detail::opendht_entry(new_value->data);
          return n && (!o || n->value.expiration > o->value.expiration);
        }));
    running_ = true;
  }

  /// Pings the initial peers' OpenDHT nodes (the same host and port as their RPC address).
  /// Returns how many answered within 4 x wait_timeout.
  asio::awaitable<std::size_t> bootstrap(std::vector<std::string> initial_peers) {
    HIVE_CHECK(running_, "listen() before bootstrap()");
    struct Pending {
      std::size_t answered = 0;
      std::vector<std::string> failures;
      std::vector<std::string> waiting;  // not heard from yet
      hive::detail::Event done;
    };
    auto pending = std::make_shared<Pending>();
    pending->waiting = initial_peers;
    if (initial_peers.empty()) pending->done.set();
    auto executor = rpc_->get_executor();
    for (const auto& peer : initial_peers) {
      auto report = [pending, executor, peer](bool ok, std::string why) {
        asio::post(executor, [pending, peer, ok, why = std::move(why)] {
          if (auto it = std::find(pending->waiting.begin(), pending->waiting.end(), peer); it != pending->waiting.end())
            pending->waiting.erase(it);
          if (ok) ++pending->answered;
          else pending->failures.push_back(fmt::format("{}: {}", peer, why));
          if (pending->waiting.empty()) pending->done.set();
        });
      };
      try {
        const auto hp = net::HostPort::parse(peer);
        auto addresses = ::dht::SockAddr::resolve(hp.host, std::to_string(hp.port));
        if (addresses.empty()) {
          report(false, "cannot resolve the host");
          continue;
        }
        runner_->bootstrap(addresses.front(), [report](bool ok) { report(ok, ok ? "" : "no OpenDHT answer"); });
      } catch (const std::exception& e) {
        report(false, e.what());
      }
    }
    const bool finished = co_await pending->done.wait(deadline_after(options_.wait_timeout() * 4));
    std::vector<std::string> failures = pending->failures;
    if (!finished)
      for (const auto& peer : pending->waiting)
        failures.push_back(fmt::format("{}: no OpenDHT answer within {:.1f} s", peer, (options_.wait_timeout() * 4).count()));
    {
      std::lock_guard lock(mutex_);
      bootstrap_failures_ = std::move(failures);
    }
    co_return pending->answered;
  }

  /// Puts each item on OpenDHT; per item, whether OpenDHT reported it stored (refused when it
  /// already expired or would outlive OpenDHT::value_lifetime).
  asio::awaitable<std::vector<bool>> store_many(std::vector<StoreItem> items) {
    HIVE_CHECK(running_, "listen() before store_many()");
    struct Pending {
      std::vector<bool> ok;
      std::size_t left = 0;
      hive::detail::Event done;
    };
    auto pending = std::make_shared<Pending>();
    pending->ok.assign(items.size(), false);
    const double t = now();
    auto executor = rpc_->get_executor();
    for (std::size_t i = 0; i < items.size(); ++i) {
      const auto& item = items[i];
      if (!(item.expiration > t) || item.expiration > t + OpenDHT::value_lifetime) continue;
      ++pending->left;
      ::dht::Value value(OpenDHT::value_type, detail::opendht_value_data(item), detail::opendht_value_id(item.subkey));
      runner_->put(::dht::InfoHash(item.key.bytes().data(), Id160::size), std::move(value),
                   [pending, executor, i](bool ok) {
                     asio::post(executor, [pending, i, ok] {
                       pending->ok[i] = ok;
                       if (--pending->left == 0) pending->done.set();
                     });
                   });
    }
    if (pending->left == 0) pending->done.set();
    co_await pending->done.wait(deadline_after(options_.wait_timeout() * 4));
    co_return pending->ok;  // a put that did not report in time counts as not stored
  }

  /// Looks `key` up on OpenDHT (which always searches the nearest nodes: `latest` changes
  /// nothing) and returns the record its unexpired values make, or nullopt.
  asio::awaitable<std::optional<Record>> get(Id160 key, bool latest = false) {
    (void)latest;
    HIVE_CHECK(running_, "listen() before get()");
    struct Pending {
      std::vector<detail::OpenDhtEntry> entries;
      hive::detail::Event done;
    };
    auto pending = std::make_shared<Pending>();
    auto executor = rpc_->get_executor();
    runner_->get(
        ::dht::InfoHash(key.bytes().data(), Id160::size),
        [pending, executor](const std::vector<std::shared_ptr<::dht::Value>>& values) {
          std::vector<detail::OpenDhtEntry> decoded;
          for (const auto& v : values)
            if (v && v->type == OpenDHT::value_type)
              if (auto e = detail::opendht_entry(v->data)) decoded.push_back(std::move(*e));
          asio::post(executor, [pending, decoded = std::move(decoded)]() mutable {
            for (auto& e : decoded) pending->entries.push_back(std::move(e));
          });
          return true;
        },
        [pending, executor](bool) { asio::post(executor, [pending] { pending->done.set(); }); });
    co_await pending->done.wait(deadline_after(options_.wait_timeout() * 4));
    co_return detail::opendht_record(pending->entries, now());
  }

  /// Nodes OpenDHT knows (good and dubious, IPv4 and IPv6).
  asio::awaitable<std::size_t> routing_table_size() {
    co_return running_ ? runner_->getNodesStats(AF_INET).getKnownNodes() + runner_->getNodesStats(AF_INET6).getKnownNodes()
                       : 0;
  }
  /// Values this node stores for the swarm, and 0 (OpenDHT keeps no separate cache).
  asio::awaitable<std::pair<std::size_t, std::size_t>> storage_size() {
    co_return std::pair<std::size_t, std::size_t>{running_ ? runner_->getStoreSize().second : 0, 0};
  }

  /// Stops the RPC peer and OpenDHT; operations in progress end by their timeouts.
  void close() {
    rpc_->close();
    stop_runner();
  }

 private:
  void stop_runner() {
    std::lock_guard lock(stop_mutex_);
    if (!runner_ || !running_) return;
    running_ = false;
    runner_->shutdown({}, true);
    runner_->join();
  }

  NodeOptions options_;
  Id160 id_;
  std::shared_ptr<rpc_type> rpc_;
  std::unique_ptr<::dht::DhtRunner> runner_;
  std::atomic<bool> running_{false};
  mutable std::mutex mutex_;  // bootstrap_failures_
  std::vector<std::string> bootstrap_failures_;
  std::mutex stop_mutex_;
};

static_assert(Routing<OpenDHT>);

}  // namespace hive::dht
