#pragma once
/// @file
/// dht::Node: one Kademlia peer — the ping/store/find protocol, iterative lookups with Alpha
/// requests in flight, replication, caching and routing-table upkeep — over any net::Transport.
///
/// Over 400 lines because it is one strand-confined state machine: the handlers, lookups,
/// replication and upkeep all read and write the same routing table, storage, cache and
/// blacklist without locks. The wire codec is in protocol.hpp, the iterative lookup in
/// lookup.hpp, the table in routing.hpp, the storage in storage.hpp; the Routing concept sits
/// at the end of this file.

#include <hive/core/clock.hpp>
#include <hive/core/id.hpp>
#include <hive/core/log.hpp>
#include <hive/detail/event.hpp>
#include <hive/fwd.hpp>
#include <hive/dht/blacklist.hpp>
#include <hive/dht/lookup.hpp>
#include <hive/dht/protocol.hpp>
#include <hive/dht/routing.hpp>
#include <hive/dht/storage.hpp>
#include <hive/dht/validation.hpp>
#include <hive/net/address.hpp>
#include <hive/net/nat.hpp>
#include <hive/net/rpc.hpp>

#include <algorithm>
#include <concepts>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <type_traits>
#include <string>
#include <unordered_map>
#include <vector>

namespace hive::dht {

/// What dht::Node reads from its routing policy: Kademlia's compile-time constants.
template <class R>
concept KademliaConstants = requires {
  { R::bucket_size } -> std::convertible_to<std::size_t>;
  { R::alpha } -> std::convertible_to<std::size_t>;
  { R::depth_modulo } -> std::convertible_to<int>;
} && (R::bucket_size >= 1) && (R::alpha >= 1);

/// Kademlia with buckets of K nodes and Alpha requests in flight per lookup.
/// @tparam K bucket size, also the number of nearest peers a lookup converges on
/// @tparam Alpha parallel requests per lookup
/// @tparam DepthModulo hivemind's relaxation: full buckets at depths not divisible by it split
template <std::size_t K, std::size_t Alpha, int DepthModulo>
struct Kademlia {
  /// k: bucket size.
  static constexpr std::size_t bucket_size = K;
  /// Requests in flight per lookup.
  static constexpr std::size_t alpha = Alpha;
  /// Split relaxation.
  static constexpr int depth_modulo = DepthModulo;
  /// The DHT engine of a BasicDHT<T, Kademlia>: hive's own peer, which owns the routing table
  /// and the lookups.
  template <class T>
  using node_type = Node<T, Kademlia>;
};
static_assert(KademliaConstants<Kademlia<>>);

/// Run-time knobs of a DHT peer.
struct NodeOptions {
  /// Replicas each value is stored on (the nearest peers to its key, this one included).
  HIVE_ARG(std::size_t, num_replicas, 5);
  /// Timeout of one request to another peer.
  HIVE_ARG(Seconds, wait_timeout, Seconds(3));
  /// A peer that queries and stores but accepts no connections and is not put in routing tables.
  HIVE_ARG(bool, client_mode, false);
  /// Cache values found by get() on the nearest queried peer that lacked them.
  HIVE_ARG(bool, cache_on_store, true);
  /// Buckets not refreshed for this long are refreshed by a lookup of a random id in them;
  /// stored records are also purged this often. 0 disables the background upkeep.
  HIVE_ARG(Seconds, refresh_period, Seconds(600));
  /// Cached keys that were read are fetched again this long before they expire.
  HIVE_ARG(Seconds, cache_refresh_before_expiry, Seconds(5));
  /// Bounds of the peer's own storage.
  HIVE_ARG(StorageOptions, storage, StorageOptions{});
  /// Bounds of the peer's cache.
  HIVE_ARG(StorageOptions, cache, StorageOptions{}.max_keys(10000));
  /// Back-off for peers that did not answer.
  HIVE_ARG(BlacklistOptions, blacklist, BlacklistOptions{});
  /// Added to this machine's clock wherever this peer reads or writes an absolute time
  /// (record expirations, averaging deadlines): emulates machines whose clocks disagree, in
  /// tests, or corrects a machine known to be off. Peers tolerate clocks that are each up to
  /// 3 s off (6 s apart).
  HIVE_ARG(Seconds, clock_offset, Seconds(0));
  /// Bytes of records one dht.find reply carries at most; past it, records are left out or
  /// dictionaries cut to their latest subkeys (flagged "t"), so that no reply outgrows a frame.
  HIVE_ARG(std::size_t, max_find_reply_bytes, std::size_t{8} << 20);
  /// Reachability checks and, behind NAT, relays (docs/multihost.md, "Behind NAT").
  HIVE_ARG(net::NatOptions, nat, net::NatOptions{});
  HIVE_OPTIONS_JSON(NodeOptions, num_replicas, wait_timeout, client_mode, cache_on_store, refresh_period,
                    cache_refresh_before_expiry, storage, cache, blacklist, max_find_reply_bytes, clock_offset, nat)
};

/// One DHT peer.
///
/// Values live on the `num_replicas` peers nearest to their key's id. A lookup keeps Alpha
/// requests in flight to the nearest peers not yet asked until the K nearest have answered;
/// get() returns the freshest record among them and caches it on the nearest peer that lacked
/// it. A peer seen for the first time is checked with a ping before it enters the routing
/// table, and is handed the keys it is now among the nearest to. Unresponsive peers leave the
/// table and are banned with exponential back-off.
///
/// @tparam T the net::Transport policy
/// @tparam R the dht::Routing policy
/// @par Thread safety
/// All state lives on the RPC peer's strand; the coroutine operations may be awaited from any
/// executor (they hop to the strand), the blocking facade is hive::DHT.
template <class T, class R>
class Node : public std::enable_shared_from_this<Node<T, R>> {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(KademliaConstants<R>, "dht::Node needs R's Kademlia constants (bucket_size, alpha, depth_modulo)");
  struct Private {};

 public:
  /// The RPC peer type.
  using rpc_type = net::Rpc<T>;

  /// Creates a peer; call start() to listen (unless client_mode) and bootstrap.
  static std::shared_ptr<Node> create(const asio::any_io_executor& executor, NodeOptions options = {},
                                      typename T::Options transport_options = {}, net::RpcOptions rpc_options = {},
                                      std::optional<Id160> id = std::nullopt) {
    HIVE_CHECK(options.num_replicas() >= 1, "num_replicas must be at least 1, got {}", options.num_replicas());
    HIVE_CHECK(options.wait_timeout().count() > 0, "wait_timeout must be positive");
    return std::make_shared<Node>(Private{}, executor, std::move(options), std::move(transport_options),
                                  std::move(rpc_options), id.value_or(Id160::random()));
  }
  /// Use create().
  Node(Private, const asio::any_io_executor& executor, NodeOptions options, typename T::Options transport_options,
       net::RpcOptions rpc_options, Id160 id)
      : options_(std::move(options)),
        id_(id),
        rpc_(rpc_type::create(executor, std::move(transport_options), std::move(rpc_options))),
        table_(id, R::bucket_size, R::depth_modulo),
        storage_(options_.storage()),
        cache_(options_.cache()),
        blacklist_(options_.blacklist()),
        rng_(std::random_device{}()),
        nat_(rpc_, options_.nat()) {
    signatures_ = std::make_shared<SignatureValidator>(std::make_shared<const Identity>(rpc_->identity()));
    validators_ = make_chain({});
  }

  /// Adds a record validator (a SchemaValidator, say), inside the signature check that every
  /// peer runs: stores that it refuses get StoreStatus::invalid, and records that fail it are
  /// dropped from what peers return. Every peer of a swarm should run the same validators.
  /// Thread-safe.
  void add_validator(std::shared_ptr<const RecordValidator> validator) {
    HIVE_CHECK(validator != nullptr, "a validator must not be null");
    std::lock_guard lock(validators_mutex_);
    user_validators_.push_back(std::move(validator));
    validators_ = make_chain(user_validators_);
  }
  /// The validator chain in force: the added validators, then the signature check outermost.
  /// Thread-safe.
  [[nodiscard]] std::shared_ptr<const Validators> validators() const {
    std::lock_guard lock(validators_mutex_);
    return validators_;
  }

  /// This peer's id.
  [[nodiscard]] const Id160& id() const noexcept { return id_; }
  /// The underlying RPC peer (to serve more methods on the same port).
  [[nodiscard]] const std::shared_ptr<rpc_type>& rpc() const noexcept { return rpc_; }
  /// The address this peer listens at, as bound (may be a wildcard; empty in client mode or
  /// before listen()). Peers on other hosts need announce_addresses().
  [[nodiscard]] std::string address() const { return rpc_->listen_address(); }

  /// The addresses other hosts reach this peer at, best first (see net::announce_addresses):
  /// the listen address when it is specific; for a wildcard, `announce_host`, or the hosts
  /// other peers observed this one at, then the interface addresses. Empty in client mode.
  /// Thread-safe.
  /// A peer that others cannot dial (reachability() is unreachable) announces its relayed
  /// addresses instead, or nothing when it holds no reservation.
  [[nodiscard]] std::vector<std::string> announce_addresses(std::string_view announce_host = {}) const {
    if (options_.client_mode()) return {};
    if (announce_host.empty() && nat_.reachability() == net::Reachability::unreachable) return nat_.relayed_addresses();
    return net::announce_addresses(address(), announce_host, observed_.ranked());
  }

  /// Whether other peers can connect to this one, as the last check found (unknown before
  /// one, or when it is not checked: client mode, a specific listen address,
  /// nat.check_reachability off). Thread-safe.
  [[nodiscard]] net::Reachability reachability() const { return nat_.reachability(); }
  /// The addresses others reach this peer at through relays (while unreachable). Thread-safe.
  [[nodiscard]] std::vector<std::string> relayed_addresses() const { return nat_.relayed_addresses(); }

  /// Why each initial peer that did not answer the last bootstrap failed ("address: reason").
  [[nodiscard]] std::vector<std::string> bootstrap_failures() const {
    std::lock_guard lock(failures_mutex_);
    return bootstrap_failures_;
  }
  /// The options.
  [[nodiscard]] const NodeOptions& options() const noexcept { return options_; }
  /// This peer's clock: wall_time() plus options().clock_offset(); the time base of every
  /// expiration and deadline it reads or writes.
  [[nodiscard]] double now() const noexcept { return wall_time() + options_.clock_offset().count(); }

  /// Registers the protocol handlers and listens on `listen_on` unless in client mode.
  void listen(std::string_view listen_on) {
    register_handlers();
    if (!options_.client_mode()) rpc_->listen(listen_on);
  }

  /// Pings the initial peers, then looks up its own id to fill the routing table; starts the
  /// background upkeep. Returns the number of initial peers that answered.
  asio::awaitable<std::size_t> bootstrap(std::vector<std::string> initial_peers) {
    auto op = [self = this->shared_from_this(), peers = std::move(initial_peers)]() -> asio::awaitable<std::size_t> {
      auto count = std::make_shared<std::size_t>(0);
      auto pending = std::make_shared<std::size_t>(peers.size());
      auto all = std::make_shared<hive::detail::Event>();
      if (peers.empty()) all->set();
      auto failures = std::make_shared<std::vector<std::string>>();
      for (const auto& address : peers) {
        asio::co_spawn(self->executor(), [self, address, count, pending, all, failures]() -> asio::awaitable<void> {
          if (co_await self->ping(address)) {
            ++*count;
          } else {
            auto why = self->last_failures_.find(address);
            failures->push_back(fmt::format("{}: {}", address,
                                            why == self->last_failures_.end() ? "no answer" : why->second));
          }
          if (--*pending == 0) all->set();
        }, asio::detached);
      }
      if (!co_await all->wait(deadline_after(self->options_.wait_timeout() * 2)))
        failures->push_back("some initial peers did not answer in time");
      {
        std::lock_guard lock(self->failures_mutex_);
        self->bootstrap_failures_ = *failures;
      }
      const std::size_t answered = *count;
      if (answered > 0) co_await self->lookup(self->id_, /*want_value=*/false, /*latest=*/false);
      self->initial_peers_ = peers;
      // Settled before bootstrap returns, so that what the peer announces next is right.
      if (answered > 0) {
        auto nat = self->update_nat(/*force=*/true);
        co_await std::move(nat);
      }
      self->start_upkeep();
      co_return answered;
    };
    co_return co_await on_strand(std::move(op));
  }

  /// Pings `address`; on an answer the peer enters the routing table. Returns its id.
  asio::awaitable<std::optional<Id160>> ping(std::string address) {
    auto op = [self = this->shared_from_this(), address = std::move(address)]() -> asio::awaitable<std::optional<Id160>> {
      co_return co_await self->ping_on_strand(address);
    };
    co_return co_await on_strand(std::move(op));
  }

  /// Stores items on the replicas of their keys (looked up first, all keys in one batched
  /// lookup; each replica gets one request with all its items). Returns, per item, whether
  /// at least one replica (this peer included) accepted it.
  asio::awaitable<std::vector<bool>> store_many(std::vector<StoreItem> items) {
    auto op = [self = this->shared_from_this(), items = std::move(items)]() mutable -> asio::awaitable<std::vector<bool>> {
      co_return co_await self->store_on_strand(std::move(items));
    };
    co_return co_await on_strand(std::move(op));
  }

  /// Looks `key` up; with `latest`, asks all K nearest peers and returns the freshest record,
  /// otherwise returns the first found. Local storage and cache are consulted first. With
  /// `raw_key` (the key `key` is the id of), values the validators refuse knowing it (a key
  /// owner's forged value) are dropped before they can displace valid ones.
  asio::awaitable<std::optional<Record>> get(Id160 key, bool latest = false, std::string raw_key = {}) {
    auto op = [self = this->shared_from_this(), key, latest, raw_key = std::move(raw_key)]() mutable -> asio::awaitable<std::optional<Record>> {
      auto many = self->get_many_on_strand({key}, latest, {std::move(raw_key)});
      auto records = co_await std::move(many);
      co_return std::move(records.at(0));
    };
    co_return co_await on_strand(std::move(op));
  }

  /// get() of many keys at once: one lookup serves them all, and the keys that want the same
  /// peer share one request to it (at most 256 keys each). Returns one record per key, in
  /// order. `raw_keys`, when not empty, holds the string each key is the id of (as get()'s
  /// `raw_key`; an empty string where unknown).
  asio::awaitable<std::vector<std::optional<Record>>> get_many(std::vector<Id160> keys, bool latest = false,
                                                               std::vector<std::string> raw_keys = {}) {
    HIVE_CHECK(raw_keys.empty() || raw_keys.size() == keys.size(), "get_many: {} keys but {} raw keys", keys.size(),
               raw_keys.size());
    auto op = [self = this->shared_from_this(), keys = std::move(keys), latest,
               raw_keys = std::move(raw_keys)]() mutable -> asio::awaitable<std::vector<std::optional<Record>>> {
      co_return co_await self->get_many_on_strand(std::move(keys), latest, std::move(raw_keys));
    };
    co_return co_await on_strand(std::move(op));
  }

  /// The `count` nearest alive peers to `key` found by a lookup (this peer not included).
  asio::awaitable<std::vector<NodeInfo>> find_nearest(Id160 key, std::size_t count = R::bucket_size) {
    auto op = [self = this->shared_from_this(), key, count]() -> asio::awaitable<std::vector<NodeInfo>> {
      auto result = co_await self->lookup(key, false, false);
      if (result.nearest.size() > count) result.nearest.resize(count);
      co_return result.nearest;
    };
    co_return co_await on_strand(std::move(op));
  }

  /// Number of peers in the routing table.
  asio::awaitable<std::size_t> routing_table_size() {
    auto op = [self = this->shared_from_this()]() -> asio::awaitable<std::size_t> {
      co_return self->table_.size();
    };
    co_return co_await on_strand(std::move(op));
  }

  /// Keys held in this peer's own storage and cache.
  asio::awaitable<std::pair<std::size_t, std::size_t>> storage_size() {
    auto op = [self = this->shared_from_this()]() -> asio::awaitable<std::pair<std::size_t, std::size_t>> {
      const double now = self->now();
      self->storage_.purge(now);
      self->cache_.purge(now);
      co_return std::pair{self->storage_.size(), self->cache_.size()};
    };
    co_return co_await on_strand(std::move(op));
  }

  /// Stops serving and the background upkeep; pending operations fail with errc::shutdown.
  void close() {
    asio::dispatch(executor(), [self = this->shared_from_this()] {
      self->closed_ = true;
      self->upkeep_wake_.notify_all();
      self->rpc_->close();
    });
  }

 private:
  static constexpr std::size_t K = R::bucket_size;
  // Keys per dht.find and items per dht.store: a find reply carries up to K peers per key
  // (about 1.3 KB), so 256 keys stay far below any frame limit.
  static constexpr std::size_t max_keys_per_request = 256;
  static constexpr std::size_t max_items_per_store = 512;

  auto executor() const { return rpc_->get_executor(); }

  // Runs the coroutine lambda `op` on the strand; the caller resumes on its own executor.
  // Callers name the lambda first: GCC 12 mishandles closure temporaries inside co_await
  // expressions and closures passed by value to coroutines (docs/architecture.md).
  template <class F>
  auto on_strand(F&& op) {
    return asio::co_spawn(executor(), std::forward<F>(op), asio::use_awaitable);
  }

  nlohmann::json sender() const {
    nlohmann::json j{{"id", detail::id_to_json(id_)}};
    if (options_.client_mode()) return j;
    if (nat_.reachability() != net::Reachability::unreachable) {
      j["addr"] = rpc_->listen_address();
    } else if (auto relayed = nat_.relayed_addresses(); !relayed.empty()) {
      j["addr"] = relayed.front();  // others reach this peer only through a relay
    }
    return j;
  }

  // ---- serving ------------------------------------------------------------------------------

  void register_handlers() {
    std::weak_ptr<Node> weak = this->shared_from_this();
    auto guard = [weak](auto body) {
      return [weak, body](net::CallContext ctx, Message m) -> asio::awaitable<Message> {
        auto self = weak.lock();
        if (!self) throw Error(errc::shutdown, "dht peer is gone");
        auto op = body(std::move(self), std::move(ctx), std::move(m));
        co_return co_await std::move(op);
      };
    };
    // A ping's reply tells the caller the host it was seen at ("you"), so that a peer on a
    // wildcard address learns what others reach it at.
    rpc_->add_handler(std::string(ping_method), guard([](std::shared_ptr<Node> self, net::CallContext ctx, Message m) -> asio::awaitable<Message> {
      self->learn_sender(m.header, ctx.remote_address);
      auto reply = self->sender();
      try {
        reply["you"] = net::HostPort::parse(ctx.remote_address).host;
      } catch (const Error&) {
      }
      co_return Message{std::move(reply), {}};
    }));
    rpc_->add_handler(std::string(store_method), guard([](std::shared_ptr<Node> self, net::CallContext ctx, Message m) -> asio::awaitable<Message> {
      co_return self->serve_store(m, ctx.remote_address);
    }));
    rpc_->add_handler(std::string(find_method), guard([](std::shared_ptr<Node> self, net::CallContext ctx, Message m) -> asio::awaitable<Message> {
      co_return self->serve_find(m, ctx.remote_address);
    }));
  }

  // A requester that gives an address is checked with a ping before it enters the table:
  // anyone can claim any address. The address kept is the one it called from (`remote`'s
  // host) with the port it claims to listen on: a wildcard, loopback or foreign host in the
  // claim never reaches the table.
  void learn_sender(const nlohmann::json& header, const std::string& remote) {
    if (!header.is_object()) return;
    auto from = header.find("from");
    if (from == header.end() || !from->is_object() || !from->contains("addr") || !(*from)["addr"].is_string()) return;
    Id160 id;
    try {
      id = detail::id_from_json(from->at("id"));
    } catch (const std::exception&) {
      return;
    }
    const auto address = net::reachable_address((*from)["addr"].template get<std::string>(), remote);
    if (id == id_ || address.empty()) return;
    if (auto known = table_.find(id); known && known->address == address) {
      table_.mark_alive(id);
      return;
    }
    if (verifying_.contains(address) || verifying_.size() > 1024) return;
    verifying_.insert(address);
    asio::co_spawn(executor(), [self = this->shared_from_this(), address]() -> asio::awaitable<void> {
      co_await self->ping_on_strand(address);
      self->verifying_.erase(address);
    }, asio::detached);
  }

  // The user's validators, then the signature check outermost.
  std::shared_ptr<const Validators> make_chain(const std::vector<std::shared_ptr<const RecordValidator>>& inner) const {
    auto chain = std::make_shared<Validators>();
    for (const auto& v : inner) chain->add(v);
    chain->add(signatures_);
    return chain;
  }

  // Whether a store of (key, subkey, value) may enter `target`: the validators accept it,
  // and it may replace what `target` holds there (an owner's record only by the owner's).
  bool acceptable(const Storage& target, const Id160& key, const std::optional<Subkey>& subkey, const Bytes& value,
                  double expiration, double now) const {
    const Subkey* sk = subkey ? &*subkey : nullptr;
    if (!acceptable_value(key, sk, value, expiration)) return false;
    if (const auto* held = target.find(key, sk, now))
      return validators()->may_replace(RecordView{key, {}, sk, held->value, held->expiration},
                                       RecordView{key, {}, sk, value, expiration});
    return true;
  }

  // `record` without the values the validators refuse (knowing `raw_key` when given);
  // nullopt when nothing is left.
  std::optional<Record> valid_part(const Id160& key, Record record, std::string_view raw_key = {}) const {
    auto ok = [&](const Subkey* subkey, const ValueWithExpiration& v) {
      return validators()->validate(RecordView{key, raw_key, subkey, v.value, v.expiration});
    };
    if (!record.is_dictionary()) {
      if (!ok(nullptr, record.regular())) return std::nullopt;
      return record;
    }
    auto& dict = std::get<Dictionary>(record.content);
    std::erase_if(dict, [&](const auto& entry) { return !ok(&entry.first, entry.second); });
    if (dict.empty()) return std::nullopt;
    record.expiration = 0;
    for (const auto& [subkey, v] : dict) record.expiration = std::max(record.expiration, v.expiration);
    return record;
  }

  bool acceptable_value(const Id160& key, const Subkey* subkey, const Bytes& value, double expiration) const {
    return validators()->validate(RecordView{key, {}, subkey, value, expiration});
  }

  // Stores are charged to the caller's source (its IP, or IPv6 /64), so that one caller
  // filling this peer's storage gives way to others before they are refused (Storage).
  Message serve_store(const Message& m, const std::string& remote) {
    const auto& h = m.header;
    if (!h.is_object() || !h.contains("items") || !h["items"].is_array())
      throw Error(errc::bad_header, "dht.store needs an array of items");
    learn_sender(h, remote);
    const auto source = net::AddressSource::of(remote).key;
    const double now = this->now();
    nlohmann::json results = nlohmann::json::array();
    for (const auto& item : h["items"]) {
      // [key, subkey|null, value, expiration, in_cache]
      std::string status;
      try {
        if (!item.is_array() || item.size() != 5) throw Error(errc::bad_header, "an item is [key, subkey, value, expiration, in_cache]");
        const Id160 key = detail::id_from_json(item[0]);
        Bytes value = detail::bytes_from_json(item[2]);
        const double expiration = detail::finite_number(item[3]);
        if (!item[4].is_boolean()) throw Error(errc::bad_header, "in_cache must be a boolean");
        Storage& target = item[4].template get<bool>() ? cache_ : storage_;
        std::optional<Subkey> subkey;
        if (!item[1].is_null()) {
          subkey = subkey_from_json(item[1]);
          if (!subkey) throw Error(errc::bad_header, "a subkey must be an integer or a string");
        }
        StoreStatus s;
        if (!acceptable(target, key, subkey, value, expiration, now))
          s = StoreStatus::invalid;
        else if (!subkey)
          s = target.store(key, std::move(value), expiration, now, source);
        else
          s = target.store_subkey(key, std::move(*subkey), std::move(value), expiration, now, source);
        status = std::string(to_string(s));
      } catch (const Error& e) {
        status = e.what();
      }
      results.push_back(std::move(status));
    }
    return Message{nlohmann::json{{"from", sender()}, {"results", std::move(results)}}, {}};
  }

  Message serve_find(const Message& m, const std::string& remote) {
    const auto& h = m.header;
    if (!h.is_object() || !h.contains("keys") || !h["keys"].is_array())
      throw Error(errc::bad_header, "dht.find needs an array of keys");
    if (h["keys"].size() > 4096) throw Error(errc::limit_exceeded, "dht.find takes at most 4096 keys");
    // "k": how many nearest peers the requester wants per key (K when absent).
    std::size_t wanted = K;
    if (auto k = h.find("k"); k != h.end()) {
      if (!k->is_number_unsigned() || k->template get<std::uint64_t>() < 1)
        throw Error(errc::bad_header, "dht.find: k must be a positive integer");
      wanted = static_cast<std::size_t>(std::min<std::uint64_t>(k->template get<std::uint64_t>(), K));
    }
    // "v": false when the requester wants only peers (a store's lookup, a refresh): records
    // are then left out of the reply (true when absent).
    bool with_records = true;
    if (auto v = h.find("v"); v != h.end()) {
      if (!v->is_boolean()) throw Error(errc::bad_header, "dht.find: v must be a boolean");
      with_records = v->template get<bool>();
    }
    learn_sender(h, remote);
    std::optional<Id160> requester;
    if (h.contains("from") && h["from"].is_object() && h["from"].contains("id")) {
      try {
        requester = detail::id_from_json(h["from"]["id"]);
      } catch (const std::exception&) {
      }
    }
    // Distinct keys only: the same key asked many times would multiply the reply.
    std::vector<Id160> keys;
    keys.reserve(h["keys"].size());
    {
      std::set<Id160> seen;
      for (const auto& k : h["keys"]) {
        keys.push_back(detail::id_from_json(k));
        if (!seen.insert(keys.back()).second) throw Error(errc::bad_header, "dht.find keys must be distinct");
      }
    }
    // Records go into the reply while its budget lasts; a dictionary that does not fit whole
    // sends its latest-expiring subkeys that fit and the flag "t" (truncated), so a large
    // dictionary stays readable instead of making every reply fail.
    std::size_t budget = static_cast<std::size_t>(
        std::min<std::uint64_t>(options_.max_find_reply_bytes(), rpc_->transport().limits().max_frame_bytes() / 2));
    const double now = this->now();
    nlohmann::json results = nlohmann::json::array();
    for (const auto& key : keys) {
      nlohmann::json r = nlohmann::json::object();
      std::optional<Record> found;
      if (with_records) {
        if (auto own = storage_.get(key, now)) detail::merge_record(found, *own, now);
        if (auto cached = cache_.get(key, now)) detail::merge_record(found, *cached, now);
      }
      if (found) {
        bool truncated = false;
        if (auto fitted = detail::fit_record(*found, budget, truncated)) r["r"] = detail::record_to_json(*fitted);
        if (truncated) r["t"] = true;
      }
      nlohmann::json peers = nlohmann::json::array();
      for (const auto& n : table_.nearest(key, wanted, requester)) {
        budget -= std::min(budget, n.address.size() + 32);
        peers.push_back({detail::id_to_json(n.id), n.address});
      }
      r["n"] = std::move(peers);
      results.push_back(std::move(r));
    }
    return Message{nlohmann::json{{"from", sender()}, {"results", std::move(results)}}, {}};
  }

  // ---- talking to peers ---------------------------------------------------------------------

  // Called after a peer answered: it is alive at `address`.
  void saw_alive(const Id160& id, const std::string& address) {
    if (id == id_ || address.empty()) return;
    blacklist_.register_success(address);
    const bool is_new = !table_.contains(id);
    if (auto to_ping = table_.add_or_update(id, address)) {
      asio::co_spawn(executor(), [self = this->shared_from_this(), n = *to_ping]() -> asio::awaitable<void> {
        auto answered = co_await self->ping_on_strand(n.address);
        if (answered && *answered == n.id) self->table_.mark_alive(n.id);
        else self->table_.remove(n.id);
      }, asio::detached);
    }
    if (is_new && table_.contains(id)) hand_over_keys(NodeInfo{id, address});
  }

  // A peer that did not answer gives way to a replacement, or is marked stale so the next
  // newcomer takes its slot (one timeout must not empty a bucket).
  void saw_dead(const std::optional<Id160>& id, const std::string& address) {
    blacklist_.register_failure(address);
    if (id) table_.mark_stale(*id);
    else if (auto known = table_.id_of(address)) table_.mark_stale(*known);
  }

  // A peer that just joined may now be among the nearest to keys we hold: give it a copy when
  // we are the nearest holder we know of, so that only one peer sends each key.
  void hand_over_keys(const NodeInfo& newcomer) {
    if (options_.client_mode()) return;
    const double now = this->now();
    std::vector<StoreItem> items;
    for (auto& [key, record] : storage_.items(now)) {
      // The newcomer is a replica if fewer than num_replicas peers we know (this one included)
      // are nearer to the key; of the holders, only the nearest sends.
      const auto newcomer_distance = newcomer.id ^ key;
      const auto own_distance = id_ ^ key;
      std::size_t nearer = own_distance < newcomer_distance ? 1 : 0;
      bool we_are_nearest = true;
      for (const auto& n : table_.nearest(key, options_.num_replicas() + 1)) {
        if (n.id == newcomer.id) continue;
        if ((n.id ^ key) < newcomer_distance) ++nearer;
        if ((n.id ^ key) < own_distance) we_are_nearest = false;
      }
      if (nearer < options_.num_replicas() && we_are_nearest) append_items(items, key, record);
    }
    if (items.empty()) return;
    asio::co_spawn(executor(), [self = this->shared_from_this(), newcomer, items = std::move(items)]() -> asio::awaitable<void> {
      co_await self->send_store(newcomer, items, false);
    }, asio::detached);
  }

  static void append_items(std::vector<StoreItem>& items, const Id160& key, const Record& record) {
    if (!record.is_dictionary()) {
      items.push_back(StoreItem{key, std::nullopt, record.regular().value, record.regular().expiration});
      return;
    }
    for (const auto& [subkey, v] : record.dictionary()) items.push_back(StoreItem{key, subkey, v.value, v.expiration});
  }

  // Calls `method` at `address` and parses the reply with `parse` (which throws on a malformed
  // one). The peer counts as alive only when the reply parses; otherwise it is marked dead.
  template <class Parse>
  asio::awaitable<std::optional<std::invoke_result_t<Parse, const Message&>>> call_peer(
      std::optional<Id160> id, std::string address, std::string method, Message request, Parse parse) {
    std::optional<std::invoke_result_t<Parse, const Message&>> out;
    std::string failure;
    try {
      auto op = rpc_->co_call(address, method, std::move(request), options_.wait_timeout());
      Message reply = co_await std::move(op);
      out = parse(reply);
    } catch (const std::exception& e) {
      failure = e.what();
    }
    if (!out) {
      log::debug("dht", "{} on {} failed: {}", method, address, failure);
      if (last_failures_.size() >= 1024) last_failures_.clear();
      last_failures_[address] = failure.empty() ? "malformed reply" : failure;
      saw_dead(id, address);
    }
    co_return out;
  }

  asio::awaitable<std::optional<Id160>> ping_on_strand(const std::string& address) {
    if (blacklist_.is_banned(address)) co_return std::nullopt;
    Message request{nlohmann::json{{"from", sender()}}, {}};
    auto op = call_peer(std::nullopt, address, std::string(ping_method), std::move(request), [this](const Message& m) {
      auto id = detail::id_from_json(m.header.at("id"));
      if (auto you = m.header.find("you");
          you != m.header.end() && you->is_string() && you->template get_ref<const std::string&>().size() <= 64)
        observed_.add(you->template get<std::string>());
      return id;
    });
    auto id = co_await std::move(op);
    if (id) saw_alive(*id, address);
    co_return id;
  }

  // Sends items to one peer; returns per-item acceptance.
  asio::awaitable<std::vector<bool>> send_store(const NodeInfo& peer, const std::vector<StoreItem>& items, bool in_cache) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& it : items)
      list.push_back({detail::id_to_json(it.key), it.subkey ? subkey_to_json(*it.subkey) : nlohmann::json(),
                      nlohmann::json::binary(it.value), it.expiration, in_cache});
    const std::size_t n = items.size();
    Message request{nlohmann::json{{"from", sender()}, {"items", std::move(list)}}, {}};
    auto op = call_peer(peer.id, peer.address, std::string(store_method), std::move(request), [n](const Message& m) {
      const auto& results = m.header.at("results");
      std::vector<bool> accepted(n, false);
      for (std::size_t i = 0; i < n && i < results.size(); ++i) accepted[i] = results[i] == "stored";
      return accepted;
    });
    auto ok = co_await std::move(op);
    if (!ok) co_return std::vector<bool>(n, false);
    saw_alive(peer.id, peer.address);
    co_return std::move(*ok);
  }

  // Asks `peer` for `keys` in one request, and for the `wanted` (at most K) nearest peers it
  // knows to each; one reply per key, in order, with the records it holds when `records`.
  // `raw_keys` (key -> the string it is the id of) lets the validators drop an owner's forged
  // values; shared, as a lookup may return while this request is still in flight.
  asio::awaitable<std::optional<std::vector<FindReply>>> send_find(
      const NodeInfo& peer, std::vector<Id160> keys, std::shared_ptr<const std::map<Id160, std::string>> raw_keys,
      std::size_t wanted, bool records = true) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& key : keys) list.push_back(detail::id_to_json(key));
    Message request{nlohmann::json{{"from", sender()}, {"keys", std::move(list)}}, {}};
    if (wanted < K) request.header["k"] = wanted;
    if (!records) request.header["v"] = false;
    auto op = call_peer(peer.id, peer.address, std::string(find_method), std::move(request), [this, &keys, &raw_keys, records](const Message& m) {
      const auto& results = m.header.at("results");
      if (!results.is_array() || results.size() != keys.size())
        throw Error(errc::bad_header, fmt::format("dht.find answered {} keys of {}", results.size(), keys.size()));
      std::vector<FindReply> replies(keys.size());
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const auto& r = results[i];
        FindReply& reply = replies[i];
        // What fails validation is dropped here, before it can displace a valid record. Records
        // not asked for (from a peer that sends them anyway) are not even checked.
        if (records && r.contains("r")) {
          std::string_view raw;
          if (raw_keys)
            if (auto it = raw_keys->find(keys[i]); it != raw_keys->end()) raw = it->second;
          reply.record = valid_part(keys[i], detail::record_from_json(r["r"]), raw);
        }
        for (const auto& n : r.at("n")) {
          if (!n.is_array() || n.size() != 2 || !n[1].is_string()) continue;
          reply.peers.push_back(NodeInfo{detail::id_from_json(n[0]), n[1].template get<std::string>()});
          if (reply.peers.size() >= K) break;
        }
      }
      return replies;
    });
    auto found = co_await std::move(op);
    if (found) saw_alive(peer.id, peer.address);
    co_return found;
  }

  // ---- lookups ------------------------------------------------------------------------------

  // Kademlia's iterative lookup (lookup.hpp) of many keys from this peer's table: Alpha
  // requests in flight per key, keys that want the same peer sharing a request, until the
  // `converge` (default K) nearest known peers of each key have all answered (or, when
  // `latest` is false and a value was wanted, until one is found).
  asio::awaitable<std::vector<LookupResult>> lookup_many(std::vector<Id160> keys, bool want_value, bool latest,
                                                         std::size_t converge = K,
                                                         std::shared_ptr<const std::map<Id160, std::string>> raw_keys = {}) {
    LookupSettings settings;
    settings.want_value = want_value;
    settings.latest = latest;
    settings.converge = converge;
    settings.alpha = R::alpha;
    settings.deadline = deadline_after(options_.wait_timeout() * 10);
    settings.now = this->now();
    auto self = this->shared_from_this();
    // Each answer needs only the `converge` nearest peers it knows, and records only when a
    // value is wanted.
    auto ask = [self, raw_keys, converge, want_value](const NodeInfo& peer, std::vector<Id160> asked) {
      return self->send_find(peer, std::move(asked), raw_keys, converge, want_value);
    };
    auto skip = [self](const NodeInfo& peer) { return self->blacklist_.is_banned(peer.address); };
    auto stopped = [self] { return self->closed_; };
    std::vector<std::vector<NodeInfo>> start;
    start.reserve(keys.size());
    for (const auto& key : keys) start.push_back(table_.nearest(key, K));
    // Named locals, not temporaries, in the co_await: GCC 12 mishandles the latter.
    auto op = iterative_lookup_many(std::move(keys), std::move(start), id_, settings, std::move(ask), std::move(skip),
                                    std::move(stopped), max_keys_per_request);
    co_return co_await std::move(op);
  }

  // One key's lookup_many.
  asio::awaitable<LookupResult> lookup(Id160 key, bool want_value, bool latest, std::size_t converge = K,
                                       std::string raw_key = {}) {
    std::shared_ptr<const std::map<Id160, std::string>> raw_keys;
    if (!raw_key.empty()) raw_keys = std::make_shared<const std::map<Id160, std::string>>(
        std::map<Id160, std::string>{{key, std::move(raw_key)}});
    auto op = lookup_many({key}, want_value, latest, converge, std::move(raw_keys));
    auto results = co_await std::move(op);
    co_return std::move(results.at(0));
  }

  // Gets many keys: local storage and cache first, then one batched lookup of the rest (all
  // of them with `latest`). A found value is cached at the nearest peer that lacked it.
  asio::awaitable<std::vector<std::optional<Record>>> get_many_on_strand(std::vector<Id160> keys, bool latest,
                                                                         std::vector<std::string> raw_keys) {
    const double now = this->now();
    std::vector<std::optional<Record>> out(keys.size());
    std::vector<std::size_t> wanted;  // indices to look up
    std::vector<Id160> wanted_keys;
    std::map<Id160, std::string> raw_map;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const Id160& key = keys[i];
      const std::string raw = i < raw_keys.size() ? raw_keys[i] : std::string{};
      std::optional<Record>& local = out[i];
      if (auto own = storage_.get(key, now)) detail::merge_record(local, *own, now);
      if (auto cached = cache_.get(key, now)) {
        detail::merge_record(local, *cached, now);
        watched_cache_keys_.insert(key);
      }
      if (local && !raw.empty()) local = valid_part(key, std::move(*local), raw);
      if (local && !latest) continue;
      if (!raw.empty()) raw_map.emplace(key, raw);
      wanted.push_back(i);
      wanted_keys.push_back(key);
    }
    if (wanted.empty()) co_return out;
    auto raw_shared = raw_map.empty() ? nullptr : std::make_shared<const std::map<Id160, std::string>>(std::move(raw_map));
    auto op = lookup_many(wanted_keys, true, latest, K, std::move(raw_shared));
    auto results = co_await std::move(op);
    std::map<Id160, std::pair<NodeInfo, std::vector<StoreItem>>> to_cache;  // nearest lacking peer -> items
    for (std::size_t j = 0; j < wanted.size(); ++j) {
      auto& result = results[j];
      std::optional<Record>& record = out[wanted[j]];
      if (record) detail::merge_record(result.record, *record, this->now());
      if (result.record && options_.cache_on_store() && !result.lacking.empty()) {
        auto& entry = to_cache[result.lacking.front().id];
        entry.first = result.lacking.front();
        append_items(entry.second, wanted_keys[j], *result.record);
      }
      record = std::move(result.record);
    }
    for (auto& [id, entry] : to_cache) {
      asio::co_spawn(executor(), [self = this->shared_from_this(), peer = entry.first, items = std::move(entry.second)]() -> asio::awaitable<void> {
        co_await self->send_store(peer, items, true);
      }, asio::detached);
    }
    co_return out;
  }

  // Stores items: one batched lookup of their distinct keys, then one store request per
  // replica carrying all the items it is a replica for.
  asio::awaitable<std::vector<bool>> store_on_strand(std::vector<StoreItem> items) {
    std::map<Id160, std::vector<std::size_t>> by_key;
    for (std::size_t i = 0; i < items.size(); ++i) by_key[items[i].key].push_back(i);
    std::vector<bool> results(items.size(), false);
    if (by_key.empty()) co_return results;
    std::vector<Id160> keys;
    keys.reserve(by_key.size());
    for (const auto& [key, indices] : by_key) keys.push_back(key);
    // The replicas are the num_replicas nearest: converging on twice as many keeps the answer
    // exact in practice at a fraction of a full K-lookup's requests.
    const std::size_t converge = std::min(K, std::max<std::size_t>(2 * options_.num_replicas(), R::alpha));
    auto lookup_op = lookup_many(keys, false, false, converge);
    auto found = co_await std::move(lookup_op);
    // Replicas of each key: the num_replicas nearest among the peers found and this one. Items
    // are grouped by replica peer.
    const double now = this->now();
    std::map<Id160, std::pair<NodeInfo, std::vector<std::size_t>>> per_peer;
    for (std::size_t k = 0; k < keys.size(); ++k) {
      const Id160& key = keys[k];
      std::vector<std::pair<Id160, std::optional<NodeInfo>>> all;  // nullopt = this peer
      for (auto& n : found[k].nearest) all.emplace_back(n.id ^ key, n);
      if (!options_.client_mode()) all.emplace_back(id_ ^ key, std::nullopt);
      std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      if (all.size() > options_.num_replicas()) all.resize(options_.num_replicas());
      for (auto& [distance, replica] : all) {
        if (replica) {
          auto& entry = per_peer[replica->id];
          entry.first = *replica;
          entry.second.insert(entry.second.end(), by_key[key].begin(), by_key[key].end());
          continue;
        }
        for (auto i : by_key[key]) {
          const auto& it = items[i];
          if (!acceptable(storage_, it.key, it.subkey, it.value, it.expiration, now)) continue;
          StoreStatus s = it.subkey ? storage_.store_subkey(it.key, *it.subkey, it.value, it.expiration, now)
                                    : storage_.store(it.key, it.value, it.expiration, now);
          if (s == StoreStatus::stored) results[i] = true;
        }
      }
    }
    auto shared_items = std::make_shared<const std::vector<StoreItem>>(std::move(items));
    auto accepted = std::make_shared<std::vector<bool>>(std::move(results));
    auto remaining = std::make_shared<std::size_t>(0);
    auto done = std::make_shared<hive::detail::Event>();
    for (auto& [id, entry] : per_peer) {
      for (std::size_t from = 0; from < entry.second.size(); from += max_items_per_store) {
        std::vector<std::size_t> which(entry.second.begin() + static_cast<std::ptrdiff_t>(from),
                                       entry.second.begin() + static_cast<std::ptrdiff_t>(
                                                                  std::min(entry.second.size(), from + max_items_per_store)));
        ++*remaining;
        asio::co_spawn(executor(), [self = this->shared_from_this(), peer = entry.first, which = std::move(which), shared_items,
                                    accepted, remaining, done]() -> asio::awaitable<void> {
          std::vector<StoreItem> mine;
          mine.reserve(which.size());
          for (auto i : which) mine.push_back((*shared_items)[i]);
          auto ok = co_await self->send_store(peer, mine, false);
          for (std::size_t j = 0; j < ok.size() && j < which.size(); ++j)
            if (ok[j]) (*accepted)[which[j]] = true;
          if (--*remaining == 0) done->set();
        }, asio::detached);
      }
    }
    if (*remaining > 0) co_await done->wait(Deadline::max());  // each send_store is bounded by wait_timeout
    co_return *accepted;
  }

  // ---- background upkeep --------------------------------------------------------------------

  void start_upkeep() {
    if (!nat_started_ && nat_checked()) {
      nat_started_ = true;
      asio::co_spawn(executor(), nat_loop(this->shared_from_this()), asio::detached);
    }
    if (upkeep_started_ || options_.refresh_period().count() <= 0) return;
    upkeep_started_ = true;
    asio::co_spawn(executor(), upkeep(this->shared_from_this()), asio::detached);
  }

  // ---- reachability and relays (net::Nat) ---------------------------------------------------

  // Checked for a serving peer on a wildcard address: a specific one is what the user chose.
  bool nat_checked() const {
    if (options_.client_mode() || !options_.nat().check_reachability()) return false;
    const auto listen = address();
    if (listen.empty()) return false;
    try {
      return net::is_wildcard_host(net::HostPort::parse(listen).host);
    } catch (const Error&) {
      return false;
    }
  }

  // Peers to ask for dial-backs and to reserve at: the routing table's nearest, then the
  // initial peers; direct addresses only.
  std::vector<std::string> nat_candidates() {
    std::vector<std::string> out;
    auto add = [&](const std::string& a) {
      if (!a.empty() && !net::RelayedAddress::is_relayed(a) && std::find(out.begin(), out.end(), a) == out.end())
        out.push_back(a);
    };
    for (const auto& peer : table_.nearest(id_, 2 * K)) add(peer.address);
    for (const auto& peer : initial_peers_) add(peer);
    std::shuffle(out.begin(), out.end(), rng_);
    return out;
  }

  // Checks reachability when due (or `force`d), then keeps the relays that an unreachable
  // peer needs.
  asio::awaitable<void> update_nat(bool force) {
    if (!nat_checked() || nat_busy_ || closed_) co_return;
    nat_busy_ = true;
    try {
      const auto direct = net::announce_addresses(address(), {}, observed_.ranked());
      if (force || nat_.due(direct)) {
        auto check = nat_.check(nat_candidates(), net::HostPort::parse(address()).port, direct);
        co_await std::move(check);
      }
      auto maintain = nat_.maintain(nat_candidates());
      co_await std::move(maintain);
    } catch (const std::exception& e) {
      log::debug("nat", "reachability upkeep failed: {}", e.what());
    }
    nat_busy_ = false;
  }

  static asio::awaitable<void> nat_loop(std::shared_ptr<Node> self) {
    while (!self->closed_) {
      co_await self->upkeep_wake_.wait(deadline_after(self->options_.nat().check_period()));
      if (self->closed_) break;
      auto op = self->update_nat(false);
      co_await std::move(op);
    }
  }

  static asio::awaitable<void> upkeep(std::shared_ptr<Node> self) {
    const auto period = self->options_.refresh_period();
    const auto tick = std::min(period, std::max(Seconds(0.5), self->options_.cache_refresh_before_expiry() / 2));
    auto next_refresh = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(period);
    while (!self->closed_) {
      co_await self->upkeep_wake_.wait(deadline_after(tick));
      if (self->closed_) break;
      const double now = self->now();
      // Re-fetch watched cache entries that are about to expire.
      std::vector<Id160> refresh;
      for (auto it = self->watched_cache_keys_.begin(); it != self->watched_cache_keys_.end();) {
        auto record = self->cache_.get(*it, now);
        if (!record) {
          it = self->watched_cache_keys_.erase(it);
          continue;
        }
        if (record->expiration - now <= self->options_.cache_refresh_before_expiry().count()) {
          refresh.push_back(*it);
          it = self->watched_cache_keys_.erase(it);
        } else {
          ++it;
        }
      }
      for (const auto& key : refresh) {
        try {
          auto result = co_await self->lookup(key, true, true);
          if (result.record) {
            std::vector<StoreItem> items;
            append_items(items, key, *result.record);
            for (const auto& it : items)
              (it.subkey ? self->cache_.store_subkey(it.key, *it.subkey, it.value, it.expiration, self->now())
                         : self->cache_.store(it.key, it.value, it.expiration, self->now()));
          }
        } catch (const std::exception& e) {
          log::debug("dht", "cache refresh failed: {}", e.what());
        }
      }
      if (SteadyClock::now() < next_refresh) continue;
      next_refresh = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(period);
      self->storage_.purge(now);
      self->cache_.purge(now);
      std::vector<Id160> stale_buckets;
      for (const auto& b : self->table_.buckets())
        if (SteadyClock::now() - b.last_updated() > period) stale_buckets.push_back(b.random_id(self->rng_));
      for (const auto& target : stale_buckets) {
        try {
          co_await self->lookup(target, false, false);
        } catch (const std::exception& e) {
          log::debug("dht", "bucket refresh failed: {}", e.what());
        }
      }
    }
  }

  NodeOptions options_;
  Id160 id_;
  std::shared_ptr<rpc_type> rpc_;
  RoutingTable table_;
  Storage storage_;
  Storage cache_;
  // Record validation: the signature check every peer runs, outermost, and what the user added.
  std::shared_ptr<const SignatureValidator> signatures_;
  mutable std::mutex validators_mutex_;
  std::vector<std::shared_ptr<const RecordValidator>> user_validators_;
  std::shared_ptr<const Validators> validators_;
  Blacklist blacklist_;
  std::mt19937_64 rng_;
  std::set<std::string> verifying_;
  net::ObservedHosts observed_;                          // thread-safe
  std::map<std::string, std::string> last_failures_;     // address -> why the last call failed
  std::vector<std::string> initial_peers_;                // as given to the last bootstrap
  net::Nat<T> nat_;                                       // reachability and relays
  bool nat_started_ = false, nat_busy_ = false;
  mutable std::mutex failures_mutex_;
  std::vector<std::string> bootstrap_failures_;          // guarded by failures_mutex_
  std::set<Id160> watched_cache_keys_;
  hive::detail::Notifier upkeep_wake_;
  bool upkeep_started_ = false;
  bool closed_ = false;
};

/// The routing policy slot for transport T: `R::node_type<T>` is the DHT engine a BasicDHT<T, R>
/// runs — it owns the routing table and the lookups, stores and finds records, and carries the
/// peer's RPC port for the layers above (experts, averaging). Models: Kademlia<K, Alpha,
/// DepthModulo> (hive's own dht::Node) and OpenDHT (<hive/dht/opendht.hpp>). See
/// docs/concepts/routing.md.
template <class R, class T>
concept RoutingFor =
    net::Transport<T> && requires { typename R::template node_type<T>; } &&
    requires(typename R::template node_type<T>& n, const typename R::template node_type<T>& cn,
             std::vector<StoreItem> items, Id160 key, bool latest, std::vector<std::string> peers,
             std::string_view address, const asio::any_io_executor& executor, NodeOptions options,
             typename T::Options transport_options, net::RpcOptions rpc_options, std::optional<Id160> id) {
      { R::template node_type<T>::create(executor, options, transport_options, rpc_options, id) }
          -> std::same_as<std::shared_ptr<typename R::template node_type<T>>>;
      { cn.id() } -> std::convertible_to<const Id160&>;
      { cn.rpc() } -> std::convertible_to<std::shared_ptr<net::Rpc<T>>>;
      { cn.address() } -> std::convertible_to<std::string>;
      { cn.announce_addresses(address) } -> std::convertible_to<std::vector<std::string>>;
      { cn.bootstrap_failures() } -> std::convertible_to<std::vector<std::string>>;
      { cn.options() } -> std::convertible_to<const NodeOptions&>;
      { cn.now() } -> std::convertible_to<double>;
      n.listen(address);
      { n.bootstrap(peers) } -> std::same_as<asio::awaitable<std::size_t>>;
      { n.store_many(items) } -> std::same_as<asio::awaitable<std::vector<bool>>>;
      { n.get(key, latest) } -> std::same_as<asio::awaitable<std::optional<Record>>>;
      { n.routing_table_size() } -> std::same_as<asio::awaitable<std::size_t>>;
      { n.storage_size() } -> std::same_as<asio::awaitable<std::pair<std::size_t, std::size_t>>>;
      n.close();
    };

/// The routing policy slot (the `routing` of a policy bundle): a RoutingFor every transport,
/// checked against net::archetype::Transport.
template <class R>
concept Routing = RoutingFor<R, net::archetype::Transport>;

static_assert(Routing<Kademlia<>>);

}  // namespace hive::dht
