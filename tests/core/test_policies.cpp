// The torch-free policy slots: Transport and Routing refuse a type that lacks one member
// (compile-time checks), and a DHT built from a policy bundle with other Kademlia constants
// runs. The second routing model, OpenDHT, is tested in test_opendht.cpp.
#include <hive/dht/dht.hpp>
#include <hive/net/simulated.hpp>
#include <hive/net/tcp.hpp>

#include <doctest/doctest.h>

#include <type_traits>

using namespace hive;

namespace {
// A transport without accept(): it could dial out but never serve.
struct TransportWithoutAccept {
  struct Options {};
  using connection_type = net::archetype::Connection;
  using executor_type = asio::strand<asio::any_io_executor>;
  [[nodiscard]] executor_type get_executor() const;
  [[nodiscard]] const Limits& limits() const;
  std::string listen(std::string address);
  asio::awaitable<std::shared_ptr<connection_type>> connect(std::string address, Deadline deadline);
  void close();
};
// A connection whose read blocks instead of being awaitable.
struct BlockingConnection {
  net::Frame read_frame();
  asio::awaitable<void> write_frame(const net::EncodedFrame& frame);
  void close() noexcept;
  [[nodiscard]] std::string remote_address() const;
};
struct TransportWithBlockingConnection {
  struct Options {};
  using connection_type = BlockingConnection;
  using executor_type = asio::strand<asio::any_io_executor>;
  [[nodiscard]] executor_type get_executor() const;
  [[nodiscard]] const Limits& limits() const;
  std::string listen(std::string address);
  asio::awaitable<std::shared_ptr<connection_type>> accept();
  asio::awaitable<std::shared_ptr<connection_type>> connect(std::string address, Deadline deadline);
  void close();
};
// Kademlia constants without the engine: not a routing policy.
struct RoutingWithoutEngine {
  static constexpr std::size_t bucket_size = 20;
  static constexpr std::size_t alpha = 3;
  static constexpr int depth_modulo = 5;
};
// An engine that cannot store.
struct ReadOnlyEngine {
  static std::shared_ptr<ReadOnlyEngine> create(const asio::any_io_executor&, dht::NodeOptions, net::archetype::Transport::Options,
                                                net::RpcOptions, std::optional<Id160>);
  [[nodiscard]] const Id160& id() const;
  [[nodiscard]] std::shared_ptr<net::Rpc<net::archetype::Transport>> rpc() const;
  [[nodiscard]] std::string address() const;
  [[nodiscard]] std::vector<std::string> announce_addresses(std::string_view) const;
  [[nodiscard]] std::vector<std::string> bootstrap_failures() const;
  [[nodiscard]] const dht::NodeOptions& options() const;
  [[nodiscard]] double now() const;
  void listen(std::string_view);
  asio::awaitable<std::size_t> bootstrap(std::vector<std::string>);
  asio::awaitable<std::optional<dht::Record>> get(Id160, bool);
  asio::awaitable<std::size_t> routing_table_size();
  asio::awaitable<std::pair<std::size_t, std::size_t>> storage_size();
  void close();
};
struct ReadOnlyRouting {
  template <class T>
  using node_type = ReadOnlyEngine;
};
// Kademlia constants that dht::Node refuses.
struct RoutingWithoutAlpha {
  static constexpr std::size_t bucket_size = 20;
  static constexpr int depth_modulo = 5;
};
struct RoutingWithEmptyBuckets {
  static constexpr std::size_t bucket_size = 0;
  static constexpr std::size_t alpha = 3;
  static constexpr int depth_modulo = 5;
};
}  // namespace

static_assert(net::Transport<net::Tcp>);
static_assert(net::Transport<net::Simulated>);
static_assert(net::Transport<net::archetype::Transport>);
static_assert(!net::Transport<TransportWithoutAccept>);
static_assert(!net::Connection<BlockingConnection>);
static_assert(!net::Transport<TransportWithBlockingConnection>);
static_assert(dht::Routing<dht::Kademlia<>>);
static_assert(dht::Routing<dht::Kademlia<8, 2, 1>>);
static_assert(dht::RoutingFor<dht::Kademlia<>, net::Tcp>);
static_assert(dht::RoutingFor<dht::Kademlia<>, net::Simulated>);
static_assert(!dht::Routing<RoutingWithoutEngine>);
static_assert(!dht::Routing<ReadOnlyRouting>);
static_assert(dht::KademliaConstants<RoutingWithoutEngine>);
static_assert(!dht::KademliaConstants<RoutingWithoutAlpha>);
static_assert(!dht::KademliaConstants<RoutingWithEmptyBuckets>);

namespace {
struct SmallBuckets : DefaultPolicies {
  using routing = dht::Kademlia<4, 2>;
};
}  // namespace
static_assert(std::is_same_v<DHTFor<SmallBuckets>, BasicDHT<net::Tcp, dht::Kademlia<4, 2>>>);
static_assert(std::is_same_v<DHTFor<>, DHT>);

TEST_CASE("policies: a DHT from a bundle with other routing constants stores and finds across peers") {
  DHTFor<SmallBuckets> first(DHTOptions().listen_on("127.0.0.1:0"));
  std::vector<std::unique_ptr<DHTFor<SmallBuckets>>> others;
  for (int i = 0; i < 5; ++i)
    others.push_back(std::make_unique<DHTFor<SmallBuckets>>(
        DHTOptions().listen_on("127.0.0.1:0").initial_peers(first.visible_addresses())));
  REQUIRE(others[0]->store("policy_key", nlohmann::json{{"x", 1}}, wall_time() + 60));
  auto found = others[4]->get("policy_key", true);
  REQUIRE(found);
  REQUIRE(found->value);
  CHECK(found->value->value == nlohmann::json{{"x", 1}});
}
