// Remote experts: the expert classes, ModuleBackend, the batching scheduler, Server and
// RemoteExpert over loopback TCP, failures, checkpoints.
#include "../common/error_of.hpp"
#include "../common/wait.hpp"

#include <hive/moe/remote_expert.hpp>
#include <hive/moe/server.hpp>

#include <doctest/doctest.h>

#include <torch/nn/modules/linear.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <future>
#include <limits>
#include <thread>

using namespace hive;
using namespace std::chrono_literals;

using hive::test::error_of;

namespace {

/// A server on loopback with one DHT peer of its own.
ServerOptions local_server() {
  return ServerOptions().dht(DHTOptions().listen_on("127.0.0.1:0")).update_period(Seconds(60));
}

/// True when a and b agree to a tolerance scaled by their magnitude.
bool close_to(const at::Tensor& a, const at::Tensor& b, double tol = 1e-5) {
  return a.sizes() == b.sizes() && at::allclose(a, b, tol, tol);
}

/// A unique scratch directory removed at the end of the test.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    path = std::filesystem::temp_directory_path() /
           fmt::format("hive-test-{}-{}", ::getpid(), SteadyClock::now().time_since_epoch().count());
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

/// A module with two inputs and two outputs, to exercise the list forms.
class TwoWayImpl : public torch::nn::Cloneable<TwoWayImpl> {
 public:
  explicit TwoWayImpl(std::int64_t h = 4) : h_(h) { reset(); }
  void reset() override { fc = register_module("fc", torch::nn::Linear(h_, h_)); }
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& a, const at::Tensor& b) { return {fc(a) * b, a + b}; }
  torch::nn::Linear fc{nullptr};

 private:
  std::int64_t h_;
};
TORCH_MODULE(TwoWay);

}  // namespace

TEST_CASE("moe experts: every registered class serves a batch forward and backward") {
  auto& registry = moe::ExpertRegistry::global();
  for (const std::string name : {"ffn", "transformer", "det_dropout", "nop"}) {
    CAPTURE(name);
    auto backends = moe::make_backends(name, {"expert.0"}, 16);
    auto& b = backends.front();
    auto inputs = registry.get(name).sample_inputs(3, 16);
    CHECK(moe::TensorSchema::of(inputs) == b.input_schema());
    auto outputs = b.forward(inputs);
    REQUIRE(outputs.size() == b.output_schema().size());
    CHECK(outputs[0].size(0) == 3);
    CHECK_FALSE(outputs[0].requires_grad());
    std::vector<at::Tensor> grad_outputs;
    for (const auto& o : outputs) grad_outputs.push_back(at::ones_like(o));
    auto grads = b.backward(inputs, grad_outputs);
    REQUIRE(grads.size() == inputs.size());
    for (std::size_t i = 0; i < grads.size(); ++i) CHECK(grads[i].sizes() == inputs[i].sizes());
    CHECK(b.updates() == 1);
  }
  CHECK(error_of([&] { (void)registry.get("no_such_expert"); }).find("known: det_dropout, ffn, nop, transformer") !=
        std::string::npos);
  CHECK_THROWS_AS((void)moe::make_backends("ffn", {"expert.0"}, 0), InvalidArgument);
  CHECK_THROWS_AS((void)moe::make_backends("ffn", {"expert.0"}, 8, moe::BackendOptions().optimizer("lion")),
                  InvalidArgument);
}

TEST_CASE("moe backend: backward returns autograd's input gradients and takes one optimizer step") {
  moe::FFN local(8);
  moe::FFN served(std::dynamic_pointer_cast<moe::FFNImpl>(local->clone()));
  moe::ModuleBackend<moe::FFN> backend("expert.0", served, {at::randn({2, 8})},
                                      moe::BackendOptions().optimizer("sgd").learning_rate(0.1));
  auto x = at::randn({5, 8});
  auto g = at::randn({5, 8});
  auto xr = x.clone().requires_grad_(true);
  local(xr).backward(g);
  auto grads = backend.backward({x}, {g});
  CHECK(close_to(grads[0], xr.grad()));
  // SGD step: served parameters moved by -lr * grad.
  auto before = local->fc1->weight.detach();
  auto after = served->fc1->weight.detach();
  CHECK(close_to(after, before - 0.1 * local->fc1->weight.grad()));
  CHECK(backend.updates() == 1);
  CHECK(backend.info()["parameters"].get<std::int64_t>() == 8 * 32 + 32 + 32 + 32 + 32 * 8 + 8);
}

TEST_CASE("moe schema: check_batch names the first mismatch") {
  std::vector<moe::TensorSchema> schema{{at::kFloat, {4}}, {at::kLong, {2, 3}}};
  CHECK(moe::check_batch({at::zeros({5, 4}), at::zeros({5, 2, 3}, at::kLong)}, schema, "in") == 5);
  CHECK(error_of([&] { moe::check_batch({at::zeros({5, 4})}, schema, "in"); }).find("expected 2 tensors, got 1") !=
        std::string::npos);
  CHECK(error_of([&] { moe::check_batch({at::zeros({5, 4}, at::kDouble), at::zeros({5, 2, 3}, at::kLong)}, schema, "in"); })
            .find("should be float32[*, 4], got float64[5, 4]") != std::string::npos);
  CHECK(error_of([&] { moe::check_batch({at::zeros({5, 3}), at::zeros({5, 2, 3}, at::kLong)}, schema, "in"); })
            .find("should be float32[*, 4]") != std::string::npos);
  CHECK(error_of([&] { moe::check_batch({at::zeros({5, 4}), at::zeros({4, 2, 3}, at::kLong)}, schema, "in"); })
            .find("has 4 rows but tensor 0 has 5") != std::string::npos);
  CHECK(error_of([&] { moe::check_batch({at::zeros({0, 4}), at::zeros({0, 2, 3}, at::kLong)}, schema, "in"); })
            .find("empty batch") != std::string::npos);
  CHECK(error_of([&] { moe::check_batch({at::zeros({4}), at::zeros({4, 2, 3}, at::kLong)}, schema, "in"); })
            .find("rank 2") != std::string::npos);
}

TEST_CASE("moe uid patterns expand to all or to a seeded sample") {
  CHECK(dht::expand_uid_pattern("expert.[0:3]") == std::vector<std::string>{"expert.0", "expert.1", "expert.2"});
  CHECK(dht::expand_uid_pattern("e.[1:3].7.[0:2]") ==
        std::vector<std::string>{"e.1.7.0", "e.1.7.1", "e.2.7.0", "e.2.7.1"});
  auto sample = dht::expand_uid_pattern("expert.[0:10].[0:10]", 5, 42);
  CHECK(sample.size() == 5);
  CHECK(std::set<std::string>(sample.begin(), sample.end()).size() == 5);
  CHECK(sample == dht::expand_uid_pattern("expert.[0:10].[0:10]", 5, 42));
  for (const auto& uid : sample) CHECK_NOTHROW(dht::parse_uid(uid));
  CHECK_THROWS_AS(dht::expand_uid_pattern("expert.[0:3]", 4), InvalidArgument);
  CHECK_THROWS_AS(dht::expand_uid_pattern("expert.[3:3]"), InvalidArgument);
  CHECK_THROWS_AS(dht::expand_uid_pattern("expert"), InvalidArgument);
  CHECK_THROWS_AS(dht::expand_uid_pattern("expert.[0-3]"), InvalidArgument);
  CHECK_THROWS_AS(dht::expand_uid_pattern("expert.[0:100000].[0:100000]"), InvalidArgument);
}

TEST_CASE("moe scheduler: concurrent tasks merge into batches and each gets its own rows back") {
  moe::PriorityBatcher<> batcher(moe::BatcherOptions().max_batch_size(16).min_batch_size(8).max_wait(Seconds(5)));
  std::atomic<int> calls{0};
  const auto pool = batcher.add_pool("double", [&](std::vector<at::Tensor> in) {
    ++calls;
    return std::vector<at::Tensor>{in[0] * 2};
  });
  batcher.start();
  std::vector<std::future<at::Tensor>> results;
  for (int i = 0; i < 8; ++i) {
    auto promise = std::make_shared<std::promise<at::Tensor>>();
    results.push_back(promise->get_future());
    batcher.submit(pool, {at::full({1, 3}, static_cast<float>(i))}, [promise](std::exception_ptr e, std::vector<at::Tensor> out) {
      if (e) promise->set_exception(e);
      else promise->set_value(out.at(0));
    });
  }
  for (int i = 0; i < 8; ++i) {
    REQUIRE(results[i].wait_for(10s) == std::future_status::ready);
    CHECK(close_to(results[i].get(), at::full({1, 3}, 2.0f * static_cast<float>(i))));
  }
  // min_batch_size 8 with a long max_wait: the eight single-row tasks ran as one batch.
  CHECK(calls == 1);
  CHECK(batcher.stats()[0].max_batch_rows == 8);
  CHECK(batcher.stats()[0].rows == 8);

  // A task larger than max_batch_size is refused at once, with a reason.
  std::promise<std::string> refused;
  batcher.submit(pool, {at::zeros({17, 3})}, [&](std::exception_ptr e, std::vector<at::Tensor>) {
    refused.set_value(e ? error_of([&] { std::rethrow_exception(e); }) : "");
  });
  CHECK(refused.get_future().get().find("max_batch_size=16") != std::string::npos);

  // Tasks still queued when the scheduler stops fail with a shutdown error.
  std::promise<std::string> orphan;
  batcher.submit(pool, {at::zeros({1, 3})}, [&](std::exception_ptr e, std::vector<at::Tensor>) {
    orphan.set_value(e ? error_of([&] { std::rethrow_exception(e); }) : "ran");
  });
  batcher.stop();
  CHECK(orphan.get_future().get().find("shutting down") != std::string::npos);
}

TEST_CASE("moe scheduler: a batch that throws fails each of its tasks, and the pool keeps serving") {
  moe::PriorityBatcher<> batcher(moe::BatcherOptions().max_batch_size(8));
  bool fail = true;
  const auto pool = batcher.add_pool("flaky", [&](std::vector<at::Tensor> in) {
    if (fail) throw std::runtime_error("boom");
    return in;
  });
  batcher.start();
  auto run = [&] {
    std::promise<std::string> p;
    batcher.submit(pool, {at::zeros({2, 2})}, [&](std::exception_ptr e, std::vector<at::Tensor> out) {
      p.set_value(e ? error_of([&] { std::rethrow_exception(e); }) : fmt::format("{} rows", out.at(0).size(0)));
    });
    return p.get_future().get();
  };
  CHECK(run() == "boom");
  fail = false;
  CHECK(run() == "2 rows");
}

TEST_CASE("moe server: RemoteExpert forward and backward equal the module run locally, and the expert trains") {
  moe::FFN local(16);
  moe::FFN served(std::dynamic_pointer_cast<moe::FFNImpl>(local->clone()));
  std::vector<moe::ModuleBackend<moe::FFN>> backends;
  backends.emplace_back("expert.3", served, std::vector<at::Tensor>{at::randn({1, 16})},
                        moe::BackendOptions().learning_rate(0.05));
  Server<net::Tcp, dht::Kademlia<>, moe::PriorityBatcher<>, moe::ModuleBackend<moe::FFN>> server(std::move(backends),
                                                                                               local_server());
  DHT client(DHTOptions().client_mode(true).initial_peers({server.address()}));
  auto experts = moe::get_experts(client, {"expert.3", "expert.404"});
  REQUIRE(experts[0]);
  CHECK_FALSE(experts[1]);
  auto& remote = experts[0];
  CHECK(remote->info()["input_schema"][0]["shape"] == nlohmann::json::array({16}));
  CHECK(remote->info()["output_schema"][0]["dtype"] == "float32");

  auto x = at::randn({4, 16});
  auto xl = x.clone().requires_grad_(true), xr = x.clone().requires_grad_(true);
  auto yl = local(xl), yr = remote(xr);
  CHECK(close_to(yl, yr));
  auto g = at::randn({4, 16});
  yl.backward(g);
  yr.backward(g);
  CHECK(close_to(xl.grad(), xr.grad()));
  // The server took one SGD step with the same gradients as the local backward.
  CHECK(server.backend("expert.3").updates() == 1);
  auto expected = local->fc2->weight.detach() - 0.05 * local->fc2->weight.grad();
  CHECK(close_to(served->fc2->weight.detach(), expected));
  CHECK_FALSE(close_to(served->fc2->weight.detach(), local->fc2->weight.detach()));

  // Inside a larger graph: gradients flow through two remote calls and a local layer.
  torch::nn::Linear proj(16, 2);
  auto z = proj(remote(remote(at::randn({3, 16}).requires_grad_())));
  z.sum().backward();
  CHECK(proj->weight.grad().defined());
  CHECK(server.backend("expert.3").updates() == 3);

  // No grad mode: a forward only, nothing recorded.
  {
    torch::NoGradGuard no_grad;
    CHECK_FALSE(remote(at::randn({2, 16})).requires_grad());
  }
  // Data that does not require grad (the first layer of a model): the backward still reaches
  // the server, so the expert trains.
  remote(at::randn({2, 16})).sum().backward();
  CHECK(server.backend("expert.3").updates() == 4);
  // Compression: float16 both ways, close to the exact result.
  moe::RemoteExpert half("expert.3", server.address(), nullptr, moe::RemoteExpertOptions().compression(Compression::float16));
  auto xh = at::randn({2, 16});
  CHECK(close_to(half(xh), remote(xh), 2e-2));
}

TEST_CASE("moe server: experts with several inputs and outputs, and the det_dropout mask") {
  std::vector<moe::ModuleBackend<TwoWay>> two;
  two.emplace_back("two.0", TwoWay(4), std::vector<at::Tensor>{at::zeros({1, 4}), at::zeros({1, 4})});
  Server<net::Tcp, dht::Kademlia<>, moe::PriorityBatcher<>, moe::ModuleBackend<TwoWay>> server(std::move(two), local_server());
  moe::RemoteExpert remote("two.0", server.address());
  auto a = at::randn({3, 4}).requires_grad_(), b = at::randn({3, 4}).requires_grad_();
  auto out = remote->call({a, b});
  REQUIRE(out.size() == 2);
  (out[0].sum() + out[1].sum()).backward();
  CHECK(a.grad().defined());
  CHECK(b.grad().defined());
  CHECK(error_of([&] { (void)remote(a); }).find("expected 2 tensors, got 1") != std::string::npos);

  DefaultServer dropout(moe::make_backends("det_dropout", {"drop.0"}, 8), local_server());
  moe::RemoteExpert d("drop.0", dropout.address());
  auto x = at::randn({2, 8}).requires_grad_();
  auto mask = at::zeros({2, 8});
  mask.index_put_({0}, 1.0);  // row 1 drops every unit: its gradient is zero
  d->call({x, mask})[0].sum().backward();
  CHECK(x.grad()[0].abs().sum().item<double>() > 0);
  CHECK(x.grad()[1].abs().sum().item<double>() == 0);
}

TEST_CASE("moe server: the same server and client code over the emulated network") {
  net::Runtime runtime;
  auto network = net::SimNetwork::create(runtime.executor(), net::SimNetwork::Options().seed(7));
  auto sim = [&] { return net::SimulatedOptions().network(network); };
  Server<net::Simulated> server(moe::make_backends("ffn", {"expert.0", "expert.1"}, 8), local_server(), sim());
  BasicDHT<net::Simulated> client(DHTOptions().client_mode(true).initial_peers({server.address()}), sim());
  auto experts = moe::get_experts(client, {"expert.0", "expert.1"}, std::make_shared<moe::Client<net::Simulated>>(sim()));
  REQUIRE(experts[0]);
  REQUIRE(experts[1]);
  CHECK(experts[0]->address().starts_with("sim-"));
  auto x = at::randn({3, 8}).requires_grad_();
  experts[1](experts[0](x)).sum().backward();
  CHECK(x.grad().defined());
  CHECK(server.backend("expert.0").updates() == 1);
  CHECK_THROWS_AS((void)moe::get_experts(client, {"expert.0"}), InvalidArgument);  // no TCP default here
}

TEST_CASE("moe server: concurrent requests from many clients are batched together") {
  auto options = local_server();
  options.batching().min_batch_size(4).max_wait(Seconds(0.5));
  DefaultServer server(moe::make_backends("ffn", {"expert.0", "expert.1"}, 32), options);
  // Reference outputs come from the served module itself (forward only, so it does not change).
  constexpr int clients = 8, calls_per_thread = 6;
  std::vector<std::shared_ptr<moe::ExpertClient>> pool;
  for (int c = 0; c < clients; ++c) pool.push_back(std::make_shared<moe::Client<>>());
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  std::vector<std::string> failures(clients);
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      try {
        moe::RemoteExpert e0("expert.0", server.address(), pool[c]), e1("expert.1", server.address(), pool[c]);
        torch::NoGradGuard no_grad;
        for (int i = 0; i < calls_per_thread; ++i) {
          auto x = at::randn({1 + (c + i) % 3, 32});
          auto y = e0(x);
          (void)e1(x);
          auto expected = server.backend("expert.0").module().forward({x}).at(0);
          if (close_to(y, expected)) ++good;
        }
      } catch (const std::exception& e) {
        failures[c] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& f : failures) CHECK(f == "");
  CHECK(good == clients * calls_per_thread);
  std::uint64_t largest = 0, rows = 0;
  for (const auto& s : server.scheduler().stats()) {
    largest = std::max(largest, s.max_batch_rows);
    rows += s.rows;
  }
  CHECK(largest > 3);  // rows of several requests merged into one batch
  CHECK(rows > 0);
}

TEST_CASE("moe server: schema violations and unknown experts come back as clear remote errors, and the server keeps serving") {
  DefaultServer server(moe::make_backends("ffn", {"expert.0"}, 8), local_server());
  moe::Client<> client;
  moe::RemoteExpert good("expert.0", server.address());
  auto call = [&](std::string_view method, nlohmann::json header, std::vector<at::Tensor> tensors) {
    Message m{std::move(header), {}};
    add_tensors(m, tensors);
    return error_of([&] { (void)client.call(server.address(), method, std::move(m), Seconds(10)); });
  };
  const nlohmann::json uid = {{"uid", "expert.0"}};
  CHECK(call(moe::forward_method, uid, {at::zeros({2, 8}, at::kDouble)}).find("should be float32[*, 8], got float64[2, 8]") !=
        std::string::npos);
  CHECK(call(moe::forward_method, uid, {at::zeros({2, 9})}).find("should be float32[*, 8]") != std::string::npos);
  CHECK(call(moe::forward_method, uid, {at::zeros({2, 8}), at::zeros({2, 8})}).find("expected 1 tensors, got 2") !=
        std::string::npos);
  CHECK(call(moe::forward_method, uid, {at::zeros({0, 8})}).find("empty batch") != std::string::npos);
  CHECK(call(moe::forward_method, {{"uid", "expert.9"}}, {at::zeros({2, 8})}).find("no expert 'expert.9' is served here") !=
        std::string::npos);
  CHECK(call(moe::forward_method, nlohmann::json::object(), {at::zeros({2, 8})}).find("needs 'uid'") != std::string::npos);
  CHECK(call(moe::backward_method, uid, {at::zeros({2, 8})}).find("expected 1 inputs and 1 grad_outputs") !=
        std::string::npos);
  CHECK(call(moe::backward_method, uid, {at::zeros({2, 8}), at::zeros({3, 8})}).find("2 input rows but 3 grad_output rows") !=
        std::string::npos);
  CHECK(call(moe::forward_method, {{"uid", "expert.0"}, {"compression", "zip"}}, {at::zeros({2, 8})}).find("compression") !=
        std::string::npos);
  CHECK(call("moe.nope", uid, {}).find("unknown method") != std::string::npos);
  CHECK(call(moe::forward_method, uid, {at::zeros({4097, 8})}).find("max_batch_size=4096") != std::string::npos);
  // The RemoteError carries the server's message to a RemoteExpert user too.
  CHECK(error_of([&] { (void)good(at::zeros({2, 3})); }).find("should be float32[*, 8]") != std::string::npos);
  CHECK_NOTHROW((void)good(at::zeros({2, 8})));
}

TEST_CASE("moe server: non-finite or overflowing inputs and gradients get an error reply and change nothing") {
  DefaultServer server(moe::make_backends("ffn", {"expert.0"}, 8), local_server());
  moe::Client<> client;
  auto call = [&](std::string_view method, std::vector<at::Tensor> tensors) {
    Message m{{{"uid", "expert.0"}}, {}};
    add_tensors(m, tensors);
    return error_of([&] { (void)client.call(server.address(), method, std::move(m), Seconds(10)); });
  };
  moe::RemoteExpert expert("expert.0", server.address());
  const auto x = at::randn({4, 8});
  const auto before = expert(x).detach().clone();
  const auto nan = std::numeric_limits<float>::quiet_NaN();
  const auto inf = std::numeric_limits<float>::infinity();
  CHECK(call(moe::backward_method, {x, at::full({4, 8}, nan)}).find("grad_outputs: tensor 0 holds non-finite values") !=
        std::string::npos);
  auto poisoned = at::randn({4, 8});
  poisoned[2][3] = inf;
  CHECK(call(moe::backward_method, {x, poisoned}).find("non-finite") != std::string::npos);
  CHECK(call(moe::backward_method, {poisoned, at::randn({4, 8})}).find("inputs: tensor 0 holds non-finite") !=
        std::string::npos);
  CHECK(call(moe::forward_method, {poisoned}).find("non-finite") != std::string::npos);
  // Finite, but the update would overflow float32: refused whole.
  CHECK(call(moe::backward_method, {x, at::full({4, 8}, 1e30f)}).find("update refused") != std::string::npos);
  // The expert is untouched, and trains again on honest gradients.
  CHECK(at::equal(expert(x).detach(), before));
  CHECK(call(moe::backward_method, {x, at::randn({4, 8})}).empty());
  CHECK_FALSE(at::equal(expert(x).detach(), before));
  CHECK(at::isfinite(expert(x)).all().item<bool>());
}

TEST_CASE("moe client: a server that dies or stalls mid-request costs the caller an error, not a hang") {
  net::Runtime runtime;
  auto stalled = net::Rpc<net::Tcp>::create(runtime.executor());
  auto dying = net::Rpc<net::Tcp>::create(runtime.executor());
  std::promise<void> received;
  // Never answers (until the runtime stops).
  stalled->add_handler(std::string(moe::forward_method), [](net::CallContext, Message m) -> asio::awaitable<Message> {
    asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::hours(1));
    co_await timer.async_wait(asio::use_awaitable);
    co_return m;
  });
  // Drops every connection as soon as a request arrives, like a process killed mid-call.
  dying->add_handler(std::string(moe::forward_method), [&dying](net::CallContext, Message m) -> asio::awaitable<Message> {
    dying->close();
    asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::hours(1));
    co_await timer.async_wait(asio::use_awaitable);
    co_return m;
  });
  const auto stalled_at = stalled->listen("127.0.0.1:0"), dying_at = dying->listen("127.0.0.1:0");

  moe::RemoteExpert slow("expert.0", stalled_at, nullptr, moe::RemoteExpertOptions().forward_timeout(Seconds(0.5)));
  auto start = SteadyClock::now();
  CHECK(error_of([&] { (void)slow(at::zeros({1, 4})); }).find("timed out") != std::string::npos);
  CHECK(SteadyClock::now() - start < 10s);

  moe::RemoteExpert dead("expert.0", dying_at, nullptr, moe::RemoteExpertOptions().forward_timeout(Seconds(30)));
  start = SteadyClock::now();
  CHECK(error_of([&] { (void)dead(at::zeros({1, 4})); }).find("connection") != std::string::npos);
  CHECK(SteadyClock::now() - start < 10s);
  stalled->close();
  dying->close();
}

TEST_CASE("moe server: checkpoints are written at shutdown and the newest is restored at start") {
  TempDir dir;
  auto options = local_server().checkpoint_dir(dir.path.string());
  at::Tensor trained;
  {
    DefaultServer server(moe::make_backends("ffn", {"expert.0"}, 8, moe::BackendOptions().optimizer("adam")), options);
    moe::RemoteExpert e("expert.0", server.address());
    e(at::randn({4, 8}).requires_grad_()).sum().backward();
    CHECK(server.backend("expert.0").updates() == 1);
    trained = server.backend("expert.0").module().module->parameters()[0].detach().clone();
  }
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path / "expert.0"), std::filesystem::directory_iterator{}) == 1);
  DefaultServer restarted(moe::make_backends("ffn", {"expert.0"}, 8, moe::BackendOptions().optimizer("adam")), options);
  CHECK(restarted.backend("expert.0").updates() == 1);
  CHECK(close_to(restarted.backend("expert.0").module().module->parameters()[0], trained, 0));
}

TEST_CASE("moe server: announces its experts again before they expire") {
  auto options = local_server().update_period(Seconds(0.2)).expiration(Seconds(1));
  DefaultServer server(moe::make_backends("nop", {"expert.5"}, 4), options);
  DHT client(DHTOptions().client_mode(true).initial_peers({server.address()}));
  auto first = client.get("expert.5", true);
  REQUIRE(first);
  CHECK(first->expiration <= wall_time() + 1.0);
  CHECK(test::wait_for([&] {
    auto now = client.get("expert.5", true);
    return now && now->expiration > first->expiration;
  }, 5s));
}

namespace {
struct NotABackend {
  std::string name() const { return "x"; }
};
}  // namespace
static_assert(!moe::Backend<NotABackend>);
static_assert(!moe::Scheduler<NotABackend>);
static_assert(moe::Backend<moe::ModuleBackend<moe::FFN>>);

#ifdef HIVE_SERVER_CLI
#include "../common/child_process.hpp"

#include <fstream>
#include <sstream>

namespace {

/// The hive-server child's join address, read from its banner.
std::string server_address(test::ChildProcess& child) {
  auto line = child.read_until("--initial_peers ", 60s);
  REQUIRE(line);
  return line->substr(line->find("--initial_peers ") + 16);
}

/// CPU time (user + system, in clock ticks) that process `pid` has used so far.
long cpu_ticks(pid_t pid) {
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  std::istringstream fields(text.substr(text.rfind(')') + 2));  // after "pid (comm) "
  std::string field;
  long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i) {
    if (i == 14) utime = std::stol(field);
    if (i == 15) stime = std::stol(field);
  }
  return utime + stime;
}

}  // namespace

TEST_CASE("cli hive-server: prints its address, serves its experts, stops cleanly on SIGINT") {
  test::ChildProcess child({HIVE_SERVER_CLI, "--expert_cls", "ffn", "--hidden_dim", "16", "--num_experts", "3",
                            "--listen_on", "127.0.0.1:0", "--optimizer", "adam"});
  const auto address = server_address(child);
  {
    DHT client(DHTOptions().client_mode(true).initial_peers({address}));
    auto experts = moe::get_experts(client, {"expert.0", "expert.2", "expert.3"});
    REQUIRE(experts[0]);
    REQUIRE(experts[1]);
    CHECK_FALSE(experts[2]);
    CHECK(experts[1]->info()["optimizer"] == "adam");
    auto x = at::randn({4, 16}).requires_grad_();
    experts[0](experts[1](x)).sum().backward();
    CHECK(x.grad().defined());
  }
  REQUIRE(child.signal(SIGINT));
  std::string rest;
  const auto status = child.wait_exit(60s, &rest);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
  CHECK(rest.find("stopped") != std::string::npos);

  CHECK(std::system((std::string(HIVE_SERVER_CLI) + " --help > /dev/null").c_str()) == 0);
  CHECK(std::system((std::string(HIVE_SERVER_CLI) + " --no-such-flag 2> /dev/null").c_str()) != 0);
  CHECK(std::system((std::string(HIVE_SERVER_CLI) + " --expert_cls nosuch --num_experts 1 2> /dev/null").c_str()) != 0);
  CHECK(std::system((std::string(HIVE_SERVER_CLI) + " --hidden_dim 8 2> /dev/null").c_str()) != 0);  // which experts?
}

TEST_CASE("cli hive-server: a server killed mid-request gives the client an error well within its timeout") {
  test::ChildProcess child({HIVE_SERVER_CLI, "--expert_cls", "ffn", "--hidden_dim", "256", "--num_experts", "1",
                            "--listen_on", "127.0.0.1:0", "--max_batch_size", "16384"});
  const auto address = server_address(child);
  moe::RemoteExpert expert("expert.0", address, std::make_shared<moe::Client<>>(),
                           moe::RemoteExpertOptions().forward_timeout(Seconds(120)).backward_timeout(Seconds(120)));
  (void)expert(at::randn({2, 256}));  // connected and served once
  // A backward of 16384 rows keeps the server computing for a while; kill it once it has
  // visibly started (its CPU time grows), then the call must fail fast, not wait 120 s.
  const long before = cpu_ticks(child.pid());
  const auto start = SteadyClock::now();
  auto call = std::async(std::launch::async, [&] {
    return error_of([&] { expert(at::randn({16384, 256}).requires_grad_()).sum().backward(); });
  });
  CHECK(test::wait_for([&] { return cpu_ticks(child.pid()) > before + 20; }, 60s));
  REQUIRE(child.signal(SIGKILL));
  REQUIRE(call.wait_for(60s) == std::future_status::ready);
  const auto error = call.get();
  CHECK(error.find("connection") != std::string::npos);
  CHECK(SteadyClock::now() - start < 60s);
  (void)child.wait_exit(10s);
}
#endif
