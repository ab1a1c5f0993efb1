#pragma once
/// @file
/// hive::DHT: the blocking and future-returning facade of a DHT peer, with its own runtime.

#include <hive/fwd.hpp>
#include <hive/core/msgpack.hpp>
#include <hive/detail/event.hpp>
#include <hive/dht/node.hpp>
#include <hive/net/runtime.hpp>
#include <hive/net/simulated.hpp>
#include <hive/net/tcp.hpp>

#include <fmt/ranges.h>

#include <future>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace hive {

namespace dht {

/// True for a protocol peer type that runs record validators (dht::Node; not dht::OpenDHT's),
/// so that it can sign records and check signatures.
template <class N>
inline constexpr bool signs_records = requires(const N& n) { n.validators(); };

/// Signs, in place, the values of `items` whose subkey names this peer as their owner
/// (`[owner:<peer id>]`, Identity::owner_marker()), as BasicDHT::async_store does; others are
/// left as they are (a validator's sign() may still wrap them). `node`'s routing model must
/// sign records (signs_records); on one that does not, nothing changes. A key's own owner
/// marker is not seen here (items carry the key's id only): use BasicDHT::async_store for
/// those.
template <class N>
void sign_items(const N& node, std::vector<StoreItem>& items) {
  if constexpr (signs_records<N>) {
    const auto validators = node.validators();
    for (auto& item : items) {
      const RecordView view{item.key, {}, item.subkey ? &*item.subkey : nullptr, item.value, item.expiration};
      item.value = validators->sign(view);
    }
  }
}

}  // namespace dht

/// Run-time knobs of a DHT peer (the facade).
struct DHTOptions {
  /// Addresses of peers already in the swarm ("host:port"); empty starts a new swarm.
  HIVE_ARG(std::vector<std::string>, initial_peers, {});
  /// Where to listen; port 0 picks a free one. Ignored in client mode.
  HIVE_ARG(std::string, listen_on, "0.0.0.0:0");
  /// Host to announce instead of a wildcard listen address (a public IP behind port
  /// forwarding); empty: what other peers observe, else the interface addresses.
  HIVE_ARG(std::string, announce_host, "");
  /// Query and store without accepting connections.
  HIVE_ARG(bool, client_mode, false);
  /// io threads of the peer's own runtime.
  HIVE_ARG(int, threads, 1);
  /// Fail construction when initial peers were given but none answered.
  HIVE_ARG(bool, require_bootstrap, true);
  /// Protocol knobs (replicas, timeouts, storage bounds, refresh period).
  HIVE_ARG(dht::NodeOptions, node, dht::NodeOptions{});
  /// Transport knobs (limits).
  HIVE_ARG(net::TcpOptions, transport, net::TcpOptions{});
  /// RPC knobs (timeouts, concurrency).
  HIVE_ARG(net::RpcOptions, rpc, net::RpcOptions{});
  HIVE_OPTIONS_JSON(DHTOptions, initial_peers, listen_on, announce_host, client_mode, threads, require_bootstrap, node,
                    transport, rpc)
};

/// The options of transport T for a peer configured by `options`: for a transport configured by
/// net::TcpOptions, DHTOptions::transport, or `given` (not both: hive::InvalidArgument); for any
/// other transport, `given` (or its defaults), and DHTOptions::transport must be left alone,
/// since that transport would not read it. Shared by BasicDHT, Server and Trainer.
template <class T>
typename T::Options transport_options_of(const DHTOptions& options, std::optional<typename T::Options> given) {
  const bool set_in_dht = nlohmann::json(options.transport()) != nlohmann::json(net::TcpOptions{});
  if constexpr (std::is_same_v<typename T::Options, net::TcpOptions>) {
    HIVE_CHECK(!(given && set_in_dht),
               "TCP options were given twice, in DHTOptions::transport and as the transport argument: set one");
    return given ? std::move(*given) : options.transport();
  } else {
    HIVE_CHECK(!set_in_dht, "DHTOptions::transport holds TCP knobs, which this transport does not read: pass its "
                            "options as the transport argument instead");
    return given ? std::move(*given) : typename T::Options{};
  }
}

/// A value read from the DHT: decoded JSON and its expiration.
struct DHTValue {
  /// The value as stored (decoded from MessagePack).
  nlohmann::json value;
  /// Absolute expiration (seconds since the epoch).
  double expiration = 0;
};

/// What a key holds: one value, or a dictionary of subkey → value.
struct DHTRecord {
  /// Set for a regular value.
  std::optional<DHTValue> value;
  /// Filled for a dictionary value.
  std::map<dht::Subkey, DHTValue> dictionary;
  /// The record's expiration (the latest subkey's for a dictionary).
  double expiration = 0;
  /// True for a dictionary.
  [[nodiscard]] bool is_dictionary() const noexcept { return !value.has_value(); }
};

/// A DHT peer with its own background runtime: blocking and future forms of get and store.
///
/// @tparam T the net::Transport policy (net::Tcp by default)
/// @tparam R the dht::Routing policy
/// @par Example
/// @code
/// hive::DHT first;                                     // a new swarm
/// hive::DHT second(hive::DHTOptions().initial_peers(first.visible_addresses()));
/// second.store("hello", "world", hive::wall_time() + 60);
/// auto got = first.get("hello");                       // got->value->value == "world"
/// @endcode
/// @par Thread safety
/// All member functions may be called from any thread except the peer's own io threads.
template <class T, class R>
class BasicDHT {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(dht::Routing<R>, "R must model dht::Routing (see docs/concepts/routing.md)");
  static_assert(dht::RoutingFor<R, T>, "R::node_type<T> must model dht::RoutingFor<R, T>");
 public:
  /// The protocol peer type.
  using node_type = typename R::template node_type<T>;

  /// Starts a peer on its own runtime: listens (unless client mode) and bootstraps from the
  /// initial peers. Throws hive::Error when initial peers were given and none answered.
  /// `transport_options` configures a transport whose options are not net::TcpOptions (for
  /// net::Tcp, DHTOptions::transport is their home; giving both throws hive::InvalidArgument).
  explicit BasicDHT(DHTOptions options = {}, std::optional<typename T::Options> given_transport = std::nullopt,
                    std::optional<Id160> id = std::nullopt)
      : options_(std::move(options)), runtime_(options_.threads()) {
    auto transport_options = transport_options_of<T>(options_, std::move(given_transport));
    auto node_options = options_.node();
    node_options.client_mode(options_.client_mode());
    // A host the user announces is where peers reach this one: nothing to check.
    if (!options_.announce_host().empty()) node_options.nat().check_reachability(false);
    node_ = node_type::create(runtime_.executor(), node_options, std::move(transport_options), options_.rpc(), id);
    node_->listen(options_.listen_on());
    const auto answered =
        asio::co_spawn(runtime_.executor(), node_->bootstrap(options_.initial_peers()), asio::use_future).get();
    if (!options_.initial_peers().empty() && answered == 0 && options_.require_bootstrap()) {
      node_->close();
      throw Error(errc::connection_refused, fmt::format("none of the {} initial peers answered ({})",
                                                        options_.initial_peers().size(),
                                                        fmt::join(node_->bootstrap_failures(), "; ")));
    }
  }
  BasicDHT(const BasicDHT&) = delete;
  BasicDHT& operator=(const BasicDHT&) = delete;
  /// Stops the peer and joins its runtime.
  ~BasicDHT() { shutdown(); }

  /// Stops serving and joins the runtime; idempotent.
  void shutdown() {
    if (!node_) return;
    // Close on the peer's strand and wait for it: stopping the runtime first would leave the
    // listening socket open (accepting connections nobody serves) until this object dies.
    auto node = node_;
    hive::detail::run_blocking_on(node->rpc()->get_executor(), [&] { node->close(); });
    node_.reset();
    runtime_.stop();
  }

  /// Addresses other peers reach this one at, best first (empty in client mode): the listen
  /// address when it is specific; for a wildcard, announce_host, or the hosts other peers saw
  /// this one connect from, then this machine's interface addresses (loopback only when there
  /// is nothing else). These are what the join line prints and what experts and averagers are
  /// announced at.
  [[nodiscard]] std::vector<std::string> visible_addresses() const {
    return node_->announce_addresses(options_.announce_host());
  }

  /// This peer's id.
  [[nodiscard]] const Id160& peer_id() const noexcept { return node_->id(); }
  /// This peer's identity key pair (RpcOptions::identity_path keeps it across runs).
  [[nodiscard]] const Identity& identity() const noexcept { return node_->rpc()->identity(); }
  /// The `[owner:<peer id>]` marker that makes a key or subkey this peer's alone: put it in a
  /// key or subkey and only this peer's signed values are stored and returned there.
  [[nodiscard]] std::string owner_marker() const { return identity().owner_marker(); }
  /// Adds a record validator (dht::SchemaValidator, say); see dht::Node::add_validator. Throws
  /// hive::InvalidArgument for a routing model that runs no validators (dht::OpenDHT).
  void add_validator(std::shared_ptr<const dht::RecordValidator> validator) {
    if constexpr (requires { node_->add_validator(std::move(validator)); })
      node_->add_validator(std::move(validator));
    else
      throw InvalidArgument("this routing model runs no record validators");
  }
  /// The protocol peer (to serve more methods on the same port, or to await operations).
  [[nodiscard]] const std::shared_ptr<node_type>& node() const noexcept { return node_; }
  /// The runtime's executor.
  [[nodiscard]] asio::any_io_executor executor() noexcept { return runtime_.executor(); }
  /// The options this peer was started with.
  [[nodiscard]] const DHTOptions& options() const noexcept { return options_; }

  /// Stores `value` (any JSON, sent as MessagePack) under `key` until `expiration`, as a
  /// regular value or, with `subkey`, as a dictionary entry. Completes with true when a
  /// replica accepted it.
  ///
  /// A key or subkey holding owner_marker() is this peer's alone: the value is signed, and
  /// other peers refuse values under it that this peer did not sign (dht::SignatureValidator).
  /// Throws hive::InvalidArgument (at once) for a key or subkey that names another owner or
  /// holds a malformed marker.
  ///
  /// `token` is any Asio completion token for the signature `void(std::exception_ptr, bool)`:
  /// `asio::use_future` (the default: a `std::future<bool>`), `asio::use_awaitable`,
  /// `asio::experimental::deferred`, or a callback. Failures arrive as the exception (hive::Error, whose
  /// code() is a hive::errc); `false` means no replica accepted the value.
  template <class Token = asio::use_future_t<>>
  auto async_store(std::string_view key, const nlohmann::json& value, double expiration,
                   std::optional<dht::Subkey> subkey = std::nullopt, Token&& token = {}) {
    std::vector<dht::StoreItem> items{{Id160::of(key), std::move(subkey), nlohmann::json::to_msgpack(value), expiration}};
    auto& item = items.front();
    const dht::RecordView view{item.key, key, item.subkey ? &*item.subkey : nullptr, item.value, expiration};
    const auto owner = dht::SignatureValidator::owner_of(view);
    HIVE_CHECK(owner.has_value(), "key '{}' or its subkey holds a malformed owner marker or more than one", key);
    HIVE_CHECK(owner->empty() || *owner == node_->rpc()->peer_id(),
               "key '{}' or its subkey is owned by {}; only that peer can store there (this peer is {})", key, *owner,
               node_->rpc()->peer_id());
    const auto validators = validators_of(*node_);
    HIVE_CHECK(owner->empty() || validators, "this routing model does not sign records, so it cannot store under '{}'", key);
    if (validators) item.value = validators->sign(view);
    auto node = node_;
    return asio::co_spawn(
        runtime_.executor(),
        [node, items = std::move(items)]() mutable -> asio::awaitable<bool> {
          auto ok = co_await node->store_many(std::move(items));
          co_return ok.at(0);
        },
        std::forward<Token>(token));
  }
  /// Blocking async_store(): true when a replica accepted the value; throws hive::Error.
  bool store(std::string_view key, const nlohmann::json& value, double expiration,
             std::optional<dht::Subkey> subkey = std::nullopt) {
    return async_store(key, value, expiration, std::move(subkey), asio::use_future).get();
  }

  /// Looks `key` up; with `latest` asks all nearest peers and returns the freshest record.
  /// Completes with the record, or nullopt when no peer holds one; `token` as async_store's,
  /// for the signature `void(std::exception_ptr, std::optional<DHTRecord>)`.
  template <class Token = asio::use_future_t<>>
  auto async_get(std::string_view key, bool latest = false, Token&& token = {}) {
    auto node = node_;
    return asio::co_spawn(
        runtime_.executor(),
        [node, key = std::string(key), latest]() -> asio::awaitable<std::optional<DHTRecord>> {
          std::optional<dht::Record> record;
          if constexpr (requires { node->get(Id160::of(key), latest, key); })
            record = co_await node->get(Id160::of(key), latest, key);
          else
            record = co_await node->get(Id160::of(key), latest);
          if (!record) co_return std::nullopt;
          const auto validators = validators_of(*node);
          co_return decode(*record, key, validators.get());
        },
        std::forward<Token>(token));
  }
  /// Blocking async_get().
  std::optional<DHTRecord> get(std::string_view key, bool latest = false) {
    return async_get(key, latest, asio::use_future).get();
  }

  /// async_get() of many keys at once; completes with one record (or nullopt) per key, in
  /// order, for the signature `void(std::exception_ptr, std::vector<std::optional<DHTRecord>>)`.
  /// Where the routing model batches (dht::Node::get_many), one lookup serves every key and
  /// keys that want the same peer share a request; otherwise the gets run concurrently.
  template <class Token = asio::use_future_t<>>
  auto async_get_many(std::vector<std::string> keys, bool latest = false, Token&& token = {}) {
    auto node = node_;
    // A strand: the fallback's gets gather their records on it.
    return asio::co_spawn(
        asio::make_strand(runtime_.executor()),
        [node, keys = std::move(keys), latest]() -> asio::awaitable<std::vector<std::optional<DHTRecord>>> {
          std::vector<std::optional<dht::Record>> records;
          if constexpr (requires { node->get_many(std::vector<Id160>{}, latest, std::vector<std::string>{}); }) {
            std::vector<Id160> ids;
            ids.reserve(keys.size());
            for (const auto& key : keys) ids.push_back(Id160::of(key));
            auto op = node->get_many(std::move(ids), latest, keys);
            records = co_await std::move(op);
          } else if (!keys.empty()) {
            struct Gather {
              std::vector<std::optional<dht::Record>> records;
              std::size_t left = 0;
              std::exception_ptr error;
              hive::detail::Event all;
            };
            auto g = std::make_shared<Gather>();
            g->records.resize(keys.size());
            g->left = keys.size();
            const auto executor = co_await asio::this_coro::executor;
            for (std::size_t i = 0; i < keys.size(); ++i)
              asio::co_spawn(executor, [node, id = Id160::of(keys[i]), latest, i, g]() -> asio::awaitable<void> {
                try {
                  auto op = node->get(id, latest);
                  g->records[i] = co_await std::move(op);
                } catch (...) {
                  if (!g->error) g->error = std::current_exception();
                }
                if (--g->left == 0) g->all.set();
              }, asio::detached);
            co_await g->all.wait(Deadline::max());  // each get is bounded by the routing model's timeouts
            if (g->error) std::rethrow_exception(g->error);
            records = std::move(g->records);
          }
          const auto validators = validators_of(*node);
          std::vector<std::optional<DHTRecord>> out(keys.size());
          for (std::size_t i = 0; i < keys.size() && i < records.size(); ++i)
            if (records[i]) out[i] = decode(*records[i], keys[i], validators.get());
          co_return out;
        },
        std::forward<Token>(token));
  }
  /// Blocking async_get_many().
  std::vector<std::optional<DHTRecord>> get_many(std::vector<std::string> keys, bool latest = false) {
    return async_get_many(std::move(keys), latest, asio::use_future).get();
  }

  /// Decodes a raw record's MessagePack values; values that do not decode are skipped, and
  /// signed ones lose their signature. With `validators` (and the record's `key`), values they
  /// refuse are skipped too: a reader that knows the key checks its owner's signature.
  static std::optional<DHTRecord> decode(const dht::Record& record, std::string_view key = {},
                                         const dht::Validators* validators = nullptr) {
    DHTRecord out;
    out.expiration = record.expiration;
    const Id160 id = Id160::of(key);
    auto decode_one = [&](const dht::Subkey* subkey, const dht::ValueWithExpiration& v) -> std::optional<DHTValue> {
      const dht::RecordView view{id, key, subkey, v.value, v.expiration};
      try {
        if (!validators) {
          auto wrapped = dht::SignatureValidator::unwrap(v.value);
          return DHTValue{parse_msgpack(wrapped ? wrapped->value : v.value), v.expiration};
        }
        if (!validators->validate(view)) return std::nullopt;
        return DHTValue{parse_msgpack(validators->strip(view)), v.expiration};
      } catch (const Error&) {
        return std::nullopt;
      }
    };
    if (!record.is_dictionary()) {
      out.value = decode_one(nullptr, record.regular());
      if (!out.value) return std::nullopt;
      return out;
    }
    for (const auto& [subkey, v] : record.dictionary())
      if (auto d = decode_one(&subkey, v)) out.dictionary.emplace(subkey, std::move(*d));
    return out;
  }

 private:
  // The node's validator chain, or null for a routing model without one.
  static std::shared_ptr<const dht::Validators> validators_of(const node_type& node) {
    if constexpr (requires { node.validators(); })
      return node.validators();
    else
      return nullptr;
  }

  DHTOptions options_;
  net::Runtime runtime_;
  std::shared_ptr<node_type> node_;
};

/// The DHT peer over TCP with the default Kademlia policy.
using DHT = BasicDHT<>;

}  // namespace hive
