// The policy slots: each concept refuses a type that lacks one member (checked at compile
// time), the policy bundle changes one slot in one line, and options have one home each.
// The Gloo strategy's rounds are tested beside Butterfly's, in test_averaging.cpp.
#include "../common/wait.hpp"

#include <hive/averaging/gloo.hpp>
#include <hive/hive.hpp>

#include <doctest/doctest.h>

#include <asio/experimental/deferred.hpp>

#include <atomic>
#include <future>
#include <type_traits>

using namespace hive;
using namespace std::chrono_literals;

// ----- Scheduler: PriorityBatcher models it; dropping any one member fails the concept -----
namespace {
struct SchedulerModel {
  using Options = moe::BatcherOptions;
  explicit SchedulerModel(const Options&) {}
  std::size_t add_pool(std::string, moe::PoolFunction) { return 0; }
  void submit(std::size_t, std::vector<at::Tensor>, moe::TaskCallback) {}
  void start() {}
  void stop() {}
  [[nodiscard]] std::vector<moe::PoolStats> stats() const { return {}; }
  [[nodiscard]] std::size_t max_batch_size() const { return 1; }
};
struct SchedulerWithoutMaxBatch {
  using Options = moe::BatcherOptions;
  explicit SchedulerWithoutMaxBatch(const Options&) {}
  std::size_t add_pool(std::string, moe::PoolFunction) { return 0; }
  void submit(std::size_t, std::vector<at::Tensor>, moe::TaskCallback) {}
  void start() {}
  void stop() {}
  [[nodiscard]] std::vector<moe::PoolStats> stats() const { return {}; }
};
struct SchedulerWithoutOptions {
  std::size_t add_pool(std::string, moe::PoolFunction) { return 0; }
  void submit(std::size_t, std::vector<at::Tensor>, moe::TaskCallback) {}
  void start() {}
  void stop() {}
  [[nodiscard]] std::vector<moe::PoolStats> stats() const { return {}; }
  [[nodiscard]] std::size_t max_batch_size() const { return 1; }
};
}  // namespace
static_assert(moe::Scheduler<SchedulerModel>);
static_assert(moe::Scheduler<moe::PriorityBatcher<>>);
static_assert(!moe::Scheduler<SchedulerWithoutMaxBatch>);
static_assert(!moe::Scheduler<SchedulerWithoutOptions>);

// ----- Backend -----
namespace {
struct BackendModel {
  [[nodiscard]] std::string name() const { return "x.0"; }
  [[nodiscard]] std::vector<moe::TensorSchema> input_schema() const { return {}; }
  [[nodiscard]] std::vector<moe::TensorSchema> output_schema() const { return {}; }
  [[nodiscard]] nlohmann::json info() const { return {}; }
  std::vector<at::Tensor> forward(std::vector<at::Tensor> x) { return x; }
  std::vector<at::Tensor> backward(std::vector<at::Tensor> x, std::vector<at::Tensor>) { return x; }
  void save(const std::filesystem::path&) {}
  bool load(const std::filesystem::path&) { return false; }
};
struct BackendWithoutBackward {
  [[nodiscard]] std::string name() const { return "x.0"; }
  [[nodiscard]] std::vector<moe::TensorSchema> input_schema() const { return {}; }
  [[nodiscard]] std::vector<moe::TensorSchema> output_schema() const { return {}; }
  [[nodiscard]] nlohmann::json info() const { return {}; }
  std::vector<at::Tensor> forward(std::vector<at::Tensor> x) { return x; }
  void save(const std::filesystem::path&) {}
  bool load(const std::filesystem::path&) { return false; }
};
struct BackendWithWrongInfo {
  [[nodiscard]] std::string name() const { return "x.0"; }
  [[nodiscard]] std::vector<moe::TensorSchema> input_schema() const { return {}; }
  [[nodiscard]] std::vector<moe::TensorSchema> output_schema() const { return {}; }
  [[nodiscard]] std::string info() const { return {}; }
  std::vector<at::Tensor> forward(std::vector<at::Tensor> x) { return x; }
  std::vector<at::Tensor> backward(std::vector<at::Tensor> x, std::vector<at::Tensor>) { return x; }
  void save(const std::filesystem::path&) {}
  bool load(const std::filesystem::path&) { return false; }
};
}  // namespace
static_assert(moe::Backend<BackendModel>);
static_assert(moe::Backend<moe::ModuleBackend<>>);
static_assert(!moe::Backend<BackendWithoutBackward>);
static_assert(!moe::Backend<BackendWithWrongInfo>);

// ----- Strategy: checked against the transport archetype, so against no real transport -----
namespace {
struct StrategyWithoutServe {
  static constexpr std::string_view name = "no-serve";
  template <class T>
  struct Runner {
    explicit Runner(std::shared_ptr<net::Rpc<T>>) {}
    asio::awaitable<averaging::Reduced> run(const averaging::GroupInfo&, at::Tensor, double, const averaging::AllReduceSettings&);
    void close() {}
  };
};
struct StrategyWithoutName {
  template <class T>
  struct Runner {
    explicit Runner(std::shared_ptr<net::Rpc<T>>) {}
    asio::awaitable<averaging::Reduced> run(const averaging::GroupInfo&, at::Tensor, double, const averaging::AllReduceSettings&);
    asio::awaitable<Message> serve(net::CallContext, Message, const averaging::AllReduceSettings&);
    void close() {}
  };
};
struct StrategyWithBlockingRun {
  static constexpr std::string_view name = "blocking";
  template <class T>
  struct Runner {
    explicit Runner(std::shared_ptr<net::Rpc<T>>) {}
    averaging::Reduced run(const averaging::GroupInfo&, at::Tensor, double, const averaging::AllReduceSettings&);
    asio::awaitable<Message> serve(net::CallContext, Message, const averaging::AllReduceSettings&);
    void close() {}
  };
};
// The custom strategy of docs/averaging.md, compiled and run here so that the doc stays true
// (counting rounds where the doc's version prints them).
std::atomic<int> logged_rounds{0};
struct LoggedButterfly {
  static constexpr std::string_view name = "logged-butterfly";

  template <hive::net::Transport T>
  class Runner {
   public:
    using Inner = hive::averaging::Butterfly::Runner<T>;
    explicit Runner(std::shared_ptr<hive::net::Rpc<T>> rpc) : inner_(std::make_shared<Inner>(std::move(rpc))) {}

    asio::awaitable<hive::averaging::Reduced> run(const hive::averaging::GroupInfo& group, at::Tensor flat, double weight,
                                                  const hive::averaging::AllReduceSettings& s) {
      ++logged_rounds;
      auto op = inner_->run(group, std::move(flat), weight, s);
      co_return co_await std::move(op);
    }
    asio::awaitable<hive::Message> serve(hive::net::CallContext ctx, hive::Message m,
                                         const hive::averaging::AllReduceSettings& s) {
      auto op = inner_->serve(std::move(ctx), std::move(m), s);
      co_return co_await std::move(op);
    }
    void close() { inner_->close(); }

   private:
    std::shared_ptr<Inner> inner_;
  };
};
}  // namespace
static_assert(averaging::Strategy<LoggedButterfly>);
static_assert(averaging::Strategy<averaging::Butterfly>);
static_assert(averaging::Strategy<averaging::Gloo>);
static_assert(averaging::StrategyFor<averaging::Gloo, net::Tcp>);
static_assert(averaging::StrategyFor<averaging::Butterfly, net::Simulated>);
static_assert(!averaging::Strategy<StrategyWithoutServe>);
static_assert(!averaging::Strategy<StrategyWithoutName>);
static_assert(!averaging::Strategy<StrategyWithBlockingRun>);

// ----- The bundle: one line changes one slot, the others keep their defaults -----
namespace {
struct GatedBackendPolicies : DefaultPolicies {
  using backend = moe::ModuleBackend<moe::FFN>;
};
struct GlooPolicies : DefaultPolicies {
  using strategy = averaging::Gloo;
};
struct EmulatedPolicies : DefaultPolicies {
  using transport = net::Simulated;
  using routing = dht::Kademlia<8, 2>;
};
}  // namespace
static_assert(std::is_same_v<ServerFor<>, Server<>>);
static_assert(std::is_same_v<ServerFor<GatedBackendPolicies>,
                             Server<net::Tcp, dht::Kademlia<>, moe::PriorityBatcher<>, moe::ModuleBackend<moe::FFN>>>);
static_assert(std::is_same_v<TrainerFor<GlooPolicies>, Trainer<net::Tcp, dht::Kademlia<>, averaging::Gloo>>);
static_assert(std::is_same_v<DHTFor<EmulatedPolicies>, BasicDHT<net::Simulated, dht::Kademlia<8, 2>>>);
static_assert(std::is_same_v<AveragerFor<>, averaging::DecentralizedAverager<>>);

TEST_CASE("policies: options set anywhere are honoured or refused") {
  // DecentralizedOptions keeps prefix and group sizes in its averager options, their only home.
  auto o = optim::DecentralizedOptions().prefix("run").target_group_size(4);
  CHECK(o.averager().prefix() == "run");
  CHECK(o.averager().target_group_size() == 4);
  auto from_json = optim::DecentralizedOptions::from_json_text(R"({"averager": {"prefix": "x", "min_group_size": 3}})");
  CHECK(from_json.prefix() == "x");
  CHECK(from_json.min_group_size() == 3);
  CHECK_THROWS_AS(optim::DecentralizedOptions::from_json_text(R"({"prefix": "x"})"), InvalidArgument);
  // TCP knobs have one home too: DHTOptions::transport, or the transport argument, not both.
  const auto tcp = net::TcpOptions().frame_timeout(Seconds(5));
  CHECK_THROWS_AS(DHT(DHTOptions().listen_on("127.0.0.1:0").transport(tcp), tcp), InvalidArgument);
  DHT one(DHTOptions().listen_on("127.0.0.1:0"), tcp);
  CHECK(one.node()->rpc()->transport().options().frame_timeout() == Seconds(5));
  // An emulated DHT would not read TCP knobs: setting them is refused, not ignored.
  net::Runtime runtime(1);
  auto network = net::SimNetwork::create(runtime.executor());
  CHECK_THROWS_AS(BasicDHT<net::Simulated>(DHTOptions().listen_on("127.0.0.1:0").transport(tcp),
                                                   net::SimulatedOptions().network(network)),
                  InvalidArgument);
}

TEST_CASE("policies: a server advertises its scheduler's max_batch_size in moe.info, and clients keep under it") {
  Server<> server(moe::make_backends("ffn", {"expert.0"}, 8),
                  ServerOptions().dht(DHTOptions().listen_on("127.0.0.1:0")).batching(moe::BatcherOptions().max_batch_size(16)));
  auto client = std::make_shared<moe::Client<net::Tcp>>();
  moe::RemoteExpert expert("expert.0", server.address(), client);
  CHECK(expert->info().at("max_batch_size") == 16);

  // 40 rows to a server that takes 16: refused once, then sent as 16 + 16 + 8 rows, forward
  // and backward, with the same outputs as three calls of the client's own making.
  auto x = at::randn({40, 8}).requires_grad_();
  auto y = expert(x);
  REQUIRE(y.sizes() == at::IntArrayRef({40, 8}));
  {
    at::NoGradGuard no_grad;
    auto parts = at::cat({expert(x.narrow(0, 0, 16)), expert(x.narrow(0, 16, 16)), expert(x.narrow(0, 32, 8))}, 0);
    CHECK(at::allclose(y, parts));
  }
  y.sum().backward();
  REQUIRE(x.grad().defined());
  CHECK(x.grad().sizes() == at::IntArrayRef({40, 8}));
  CHECK(at::isfinite(x.grad()).all().item<bool>());
  const auto stats = server.scheduler().stats();
  for (const auto& pool : stats) CHECK(pool.max_batch_rows <= 16);
  CHECK(client->max_batch_size(server.address(), "expert.0", Seconds(5)) == 16);

  // A client that never met the server learns its limit in the background, without waiting.
  moe::Client<net::Tcp> fresh;
  CHECK_FALSE(fresh.max_batch_size(server.address(), "expert.0", Seconds(5)).has_value());
  std::optional<std::int64_t> learned;
  CHECK(test::wait_for([&] { return (learned = fresh.max_batch_size(server.address(), "expert.0", Seconds(5))).has_value(); }));
  CHECK(learned == 16);
  moe::Client<net::Tcp> other;
  CHECK(other.max_batch_size(server.address(), "expert.0", Seconds(5), /*wait=*/true) == 16);
  CHECK_FALSE(other.max_batch_size("127.0.0.1:1", "expert.0", Seconds(2), /*wait=*/true).has_value());
}

TEST_CASE("policies: servers, expert declarations and expert clients take any completion token") {
  Server<> server(moe::make_backends("ffn", {"expert.0", "expert.1"}, 8),
                  ServerOptions().dht(DHTOptions().listen_on("127.0.0.1:0")));
  DHT dht(DHTOptions().initial_peers({server.dht_address()}).client_mode(true));
  std::promise<std::vector<bool>> declared;
  server.async_declare([&](std::exception_ptr e, std::vector<bool> ok) {
    if (e) declared.set_exception(e);
    else declared.set_value(std::move(ok));
  });
  CHECK(declared.get_future().get() == std::vector<bool>{true, true});
  std::promise<std::vector<std::optional<std::string>>> found;
  dht::async_get_experts(dht, {"expert.1", "expert.9"}, [&](std::exception_ptr e, std::vector<std::optional<std::string>> a) {
    if (e) found.set_exception(e);
    else found.set_value(std::move(a));
  });
  const auto addresses = found.get_future().get();
  REQUIRE(addresses.size() == 2);
  CHECK(addresses[0] == server.address());
  CHECK_FALSE(addresses[1].has_value());
  CHECK(dht::async_get_experts(dht, {}).get().empty());
  CHECK_THROWS_AS(dht::async_get_experts(dht, {"not a uid"}), InvalidArgument);

  auto client = std::make_shared<moe::Client<net::Tcp>>();
  Message request;
  request.header = {{"uid", "expert.0"}};
  auto deferred = client->async_call(server.address(), moe::info_method, request, Seconds(5), asio::experimental::deferred);
  CHECK(std::move(deferred)(asio::use_future).get().header.at("max_batch_size") == server.scheduler().max_batch_size());
  net::Runtime runtime(1);
  auto awaited = asio::co_spawn(
      runtime.executor(),
      [&]() -> asio::awaitable<std::string> {
        Message m;
        m.header = {{"uid", "expert.9"}};
        const auto address = server.address();
        try {
          // A named operation, not a temporary, in the co_await (GCC 12).
          auto op = client->async_call(address, moe::info_method, std::move(m), Seconds(5), asio::use_awaitable);
          co_await std::move(op);
        } catch (const Error& e) {
          co_return std::string(e.what());
        }
        co_return std::string();
      },
      asio::use_future);
  CHECK(awaited.get().find("no expert 'expert.9'") != std::string::npos);
}

TEST_CASE("policies: the custom strategy of docs/averaging.md averages two peers through the Strategy slot") {
  std::vector<std::unique_ptr<DHT>> dhts;
  dhts.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0")));
  dhts.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0").initial_peers(dhts[0]->visible_addresses())));
  using Logged = averaging::DecentralizedAverager<net::Tcp, dht::Kademlia<>, LoggedButterfly>;
  std::vector<at::Tensor> a{at::full({16}, 1.0)}, b{at::full({16}, 3.0)};
  const auto options = averaging::AveragerOptions().prefix("logged").target_group_size(2).matchmaking_time(Seconds(3));
  Logged first(*dhts[0], a, options), second(*dhts[1], b, options);
  auto fa = first.async_step(1.0);
  auto fb = second.async_step(1.0);
  auto ra = fa.get(), rb = fb.get();
  INFO(ra.error, " / ", rb.error);
  REQUIRE(ra.ok);
  REQUIRE(rb.ok);
  CHECK(at::allclose(a[0], at::full({16}, 2.0)));
  CHECK(at::equal(a[0], b[0]));
  CHECK(logged_rounds.load() == 2);
}

TEST_CASE("policies: DHT and averager operations take any completion token and report error codes") {
  std::vector<std::unique_ptr<DHT>> dhts;
  dhts.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0")));
  dhts.push_back(std::make_unique<DHT>(DHTOptions().listen_on("127.0.0.1:0").initial_peers(dhts[0]->visible_addresses())));
  // A callback, a future, an awaitable and a deferred operation: one body behind each.
  std::promise<bool> stored;
  dhts[0]->async_store("tokens", 7, wall_time() + 60, std::nullopt,
                       [&](std::exception_ptr e, bool ok) { stored.set_value(!e && ok); });
  REQUIRE(stored.get_future().get());
  auto future = dhts[1]->async_get("tokens", true);
  auto found = future.get();
  REQUIRE(found);
  REQUIRE(found->value);
  CHECK(found->value->value == 7);
  auto deferred = dhts[1]->async_get("tokens", true, asio::experimental::deferred);
  auto again = std::move(deferred)(asio::use_future).get();
  CHECK((again && again->value && again->value->value == 7));
  net::Runtime runtime(1);
  auto awaited = asio::co_spawn(
      runtime.executor(),
      [&]() -> asio::awaitable<bool> {
        auto r = co_await dhts[1]->async_get("tokens", false, asio::use_awaitable);
        co_return r.has_value();
      },
      asio::use_future);
  CHECK(awaited.get());

  // A step with no partner ends with a code, not only a sentence.
  std::vector<at::Tensor> alone{at::ones({4})};
  averaging::DecentralizedAverager<> averager(*dhts[0], alone,
                                              averaging::AveragerOptions().prefix("lonely").matchmaking_time(Seconds(0.5)));
  auto r = averager.step();
  CHECK_FALSE(r.ok);
  CHECK(r.code == errc::timeout);
  std::promise<std::error_code> code;
  averager.shutdown();
  averager.async_step(1.0, nullptr, [&](std::exception_ptr, averaging::StepResult s) { code.set_value(s.code); });
  CHECK(code.get_future().get() == errc::shutdown);
}
