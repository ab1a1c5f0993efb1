// Live inference while training (serve/): snapshots and their checksums, the inference server
// under concurrent training, live weights, bad input, the client's failover and vote, DHT
// discovery, and a replica that follows a training swarm.
#include "../common/wait.hpp"

#include <hive/serve/client.hpp>
#include <hive/serve/replica.hpp>
#include <hive/trainer.hpp>

#include <doctest/doctest.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <future>
#include <map>
#include <set>
#include <thread>

using namespace hive;
using namespace std::chrono_literals;
namespace nn = torch::nn;

namespace {

nn::Sequential small_model() { return nn::Sequential(nn::Linear(8, 16), nn::ReLU(), nn::Linear(16, 4)); }

const moe::TensorSchema input8{at::kFloat, {8}};

DHTOptions loopback() { return DHTOptions().listen_on("127.0.0.1:0"); }

serve::InferenceOptions serving(const std::string& prefix) {
  return serve::InferenceOptions().prefix(prefix).declare_period(Seconds(0.2)).nice(0);
}

/// A DHT peer, a publisher over `model` and an inference server on the peer's port.
struct Endpoint {
  Endpoint(nn::Sequential model, const std::string& prefix, std::vector<std::string> peers = {},
           serve::PublisherOptions publishing = serve::PublisherOptions().every_steps(1),
           serve::InferenceOptions options = {})
      : dht(loopback().initial_peers(std::move(peers))),
        publisher(std::move(model), publishing),
        server(publisher, dht, input8, options.prefix().empty() ? serving(prefix) : options) {}
  DHT dht;
  serve::Publisher<nn::Sequential> publisher;
  serve::InferenceServer<nn::Sequential> server;
};

/// The model's outputs for `x` with the weights of `snapshot`.
at::Tensor forward_with(const nn::Sequential& model, const serve::Snapshot& snapshot, const at::Tensor& x) {
  auto copy = std::dynamic_pointer_cast<nn::SequentialImpl>(model->clone());
  at::NoGradGuard no_grad;
  std::size_t i = 0;
  for (auto& p : copy->parameters()) p.set_data(snapshot.tensors.at(i++).clone());
  for (auto& b : copy->buffers()) b.set_data(snapshot.tensors.at(i++).clone());
  return copy->forward(x);
}

/// One SGD step of `model` on a random regression batch, through `publisher`.
void train_step(nn::Sequential& model, torch::optim::SGD& sgd, serve::Publisher<nn::Sequential>& publisher) {
  sgd.zero_grad();
  auto loss = (model->forward(at::randn({16, 8})) - at::randn({16, 4})).pow(2).mean();
  loss.backward();
  publisher.step([&] { sgd.step(); });
}

/// A module whose forward waits (at most 10 s) until the test opens it: holds a request in flight.
struct GateState {
  std::mutex mutex;
  std::condition_variable cv;
  bool open = false;
  std::atomic<int> waiting{0};
  void release() {
    std::lock_guard lock(mutex);
    open = true;
    cv.notify_all();
  }
};
struct GateImpl : nn::Cloneable<GateImpl> {
  explicit GateImpl(std::shared_ptr<GateState> s = std::make_shared<GateState>()) : state(std::move(s)) {}
  void reset() override {}
  at::Tensor forward(const at::Tensor& x) {
    ++state->waiting;
    std::unique_lock lock(state->mutex);
    state->cv.wait_for(lock, 10s, [&] { return state->open; });
    return x;
  }
  std::shared_ptr<GateState> state;
};
TORCH_MODULE(Gate);

/// Class scores that are the same for every row: a bias-only linear layer.
nn::Sequential constant_scores(std::vector<float> scores) {
  nn::Linear linear(nn::LinearOptions(8, static_cast<std::int64_t>(scores.size())));
  at::NoGradGuard no_grad;
  linear->weight.zero_();
  linear->bias.copy_(at::tensor(scores));
  return nn::Sequential(linear);
}

}  // namespace

TEST_CASE("serve snapshot: immutable copies whose checksums hold while training goes on") {
  auto model = small_model();
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
  serve::Publisher<nn::Sequential> publisher(model, serve::PublisherOptions().every_steps(2).every_seconds(Seconds(0)));
  auto first = publisher.current();
  REQUIRE(first);
  CHECK(first->step == 0);
  CHECK(first->checksum == serve::checksum(first->tensors));
  const auto first_bytes = at::cat([&] {
    std::vector<at::Tensor> flat;
    for (const auto& t : first->tensors) flat.push_back(t.flatten().clone());
    return flat;
  }());

  train_step(model, sgd, publisher);
  CHECK(publisher.step() == 1);
  CHECK(publisher.current() == first);  // every 2 steps: nothing yet
  train_step(model, sgd, publisher);
  auto second = publisher.current();
  CHECK(second != first);
  CHECK(second->step == 2);
  CHECK(second->checksum != first->checksum);
  // The training weights moved on; the old snapshot did not.
  for (int i = 0; i < 5; ++i) train_step(model, sgd, publisher);
  std::vector<at::Tensor> now;
  for (const auto& t : first->tensors) now.push_back(t.flatten());
  CHECK(at::equal(at::cat(now), first_bytes));
  CHECK(serve::checksum(first->tensors) == first->checksum);
  CHECK(serve::checksum(second->tensors) == second->checksum);
  // On demand; the parameters of a snapshot equal the model's at that moment.
  auto third = publisher.publish();
  CHECK(third->step == 7);
  std::size_t i = 0;
  for (const auto& p : model->parameters()) CHECK(at::equal(third->tensors.at(i++), p.detach()));
  CHECK(publisher.stats().published == 5);  // steps 0, 2, 4, 6 and the one on demand
  CHECK(publisher.stats().bytes >= static_cast<std::int64_t>(sizeof(float)) * (8 * 16 + 16 + 16 * 4 + 4));
}

TEST_CASE("serve snapshot: a snapshot no reader holds lends its buffer to the next one") {
  auto model = small_model();
  serve::Publisher<nn::Sequential> publisher(model, serve::PublisherOptions().every_seconds(Seconds(0)));
  const void* first_data = publisher.current()->tensors.front().data_ptr();
  publisher.publish();  // step 0's snapshot is no longer current, and nobody holds it
  auto third = publisher.publish();
  CHECK(third->tensors.front().data_ptr() == first_data);
  auto held = publisher.current();
  auto fourth = publisher.publish();
  CHECK(fourth->tensors.front().data_ptr() != held->tensors.front().data_ptr());
}

TEST_CASE("serve: every reply under concurrent training comes from one published snapshot") {
  auto model = small_model();
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05));
  std::mutex recorded_mutex;
  std::map<std::uint64_t, std::shared_ptr<const serve::Snapshot>> recorded;
  Endpoint e(model, "consistent");
  e.publisher.on_publish([&](const std::shared_ptr<const serve::Snapshot>& s) {
    std::lock_guard lock(recorded_mutex);
    recorded[s->step] = s;
  });
  recorded[0] = e.publisher.current();

  DHT client_dht(DHTOptions().client_mode(true).initial_peers({e.dht.visible_addresses().at(0)}));
  serve::InferenceClient<> client(client_dht, serve::ClientOptions().prefix("consistent"));
  REQUIRE(test::wait_for([&] { return !client.endpoints().empty(); }));

  constexpr int clients = 3, requests = 25;
  std::atomic<int> done{0};
  std::vector<std::future<std::vector<std::pair<at::Tensor, serve::Answer>>>> results;
  for (int c = 0; c < clients; ++c)
    results.push_back(std::async(std::launch::async, [&] {
      std::vector<std::pair<at::Tensor, serve::Answer>> got;
      for (int r = 0; r < requests; ++r) {
        auto x = at::randn({1 + r % 7, 8});
        auto p = client.predict(x);
        got.emplace_back(x, p.answers.back());
      }
      ++done;
      return got;
    }));
  // Train while the clients stream (bounded: the clients finish, or 20000 steps).
  for (int s = 0; s < 20000 && done < clients; ++s) train_step(model, sgd, e.publisher);

  std::set<std::uint64_t> steps;
  int checked = 0;
  for (auto& f : results)
    for (auto& [x, a] : f.get()) {
      REQUIRE(a.ok());
      CHECK(a.mode == "snapshot");
      CHECK_FALSE(a.torn);
      std::shared_ptr<const serve::Snapshot> s;
      {
        std::lock_guard lock(recorded_mutex);
        REQUIRE(recorded.count(a.step) == 1);
        s = recorded[a.step];
      }
      // The checksum is the published snapshot's, and so are the outputs.
      CHECK(a.checksum == serve::checksum_hex(s->checksum));
      CHECK(serve::checksum(s->tensors) == s->checksum);
      CHECK(at::allclose(a.outputs, forward_with(model, *s, x), 1e-5, 1e-5));
      steps.insert(a.step);
      ++checked;
    }
  CHECK(checked == clients * requests);
  MESSAGE("replies came from " << steps.size() << " distinct snapshots");
  CHECK(e.server.stats().answered == static_cast<std::uint64_t>(clients * requests));
  CHECK(e.server.stats().torn == 0);
}

TEST_CASE("serve: live mode reads the training weights and says so") {
  auto model = small_model();
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05));
  Endpoint e(model, "live", {}, serve::PublisherOptions().mode(serve::Mode::live));
  DHT client_dht(DHTOptions().client_mode(true));
  serve::InferenceClient<> client(client_dht, serve::ClientOptions().endpoints({e.server.address()}));
  for (int s = 0; s < 3; ++s) train_step(model, sgd, e.publisher);
  // No step runs now: a live answer equals the model's outputs with the current weights.
  auto x = at::randn({5, 8});
  auto p = client.predict(x);
  const auto& a = p.answers.back();
  CHECK(a.mode == "live");
  CHECK(a.step == 3);
  CHECK(a.checksum == serve::checksum_hex(0));
  CHECK_FALSE(a.torn);
  at::NoGradGuard no_grad;
  CHECK(at::allclose(a.outputs, model->forward(x), 1e-5, 1e-5));
  // Switching to snapshots at run time serves the last published copy.
  e.publisher.set_mode(serve::Mode::snapshot);
  e.publisher.publish();
  CHECK(client.predict(x).answers.back().mode == "snapshot");
}

TEST_CASE("serve: bad input gets an error naming the schema, and the server keeps serving") {
  auto model = small_model();
  Endpoint e(model, "hostile", {}, serve::PublisherOptions(),
             serving("hostile").batching(moe::BatcherOptions().max_batch_size(16)));
  auto rpc = net::Rpc<net::Tcp>::create(e.dht.executor());
  auto call = [&](std::vector<at::Tensor> tensors) -> std::string {
    Message m;
    add_tensors(m, tensors);
    try {
      rpc->call(e.server.address(), std::string(serve::predict_method), std::move(m), Seconds(5));
    } catch (const RemoteError& err) {
      return err.remote_message();
    }
    return "";
  };
  CHECK(call({at::randn({2, 8}, at::kDouble)}).find("float32[*, 8]") != std::string::npos);
  CHECK(call({at::randn({2, 9})}).find("float32[*, 8]") != std::string::npos);
  CHECK(call({at::randn({2, 8, 1})}).find("float32[*, 8]") != std::string::npos);
  CHECK(call({at::randn({0, 8})}).find("empty batch") != std::string::npos);
  CHECK(call({at::randn({17, 8})}).find("max_batch_size 16") != std::string::npos);
  CHECK(call({}).find("expected 1 tensors") != std::string::npos);
  CHECK(call({at::full({1, 8}, std::nan(""))}).find("non-finite") != std::string::npos);
  {
    Message m;
    m.header = {{"compression", "zip"}};
    add_tensors(m, {at::randn({2, 8})});
    CHECK_THROWS_AS(rpc->call(e.server.address(), std::string(serve::predict_method), std::move(m), Seconds(5)), RemoteError);
  }
  CHECK(call({at::randn({16, 8})}).empty());
  CHECK(e.server.stats().failed == 8);
  CHECK(e.server.stats().answered == 1);
  auto info = rpc->call(e.server.address(), std::string(serve::info_method), Message{}, Seconds(5));
  CHECK(info.header["max_batch_size"] == 16);
  CHECK(info.header["input_schema"]["shape"] == nlohmann::json::array({8}));
  rpc->close();
}

TEST_CASE("serve: more requests than max_in_flight are refused, the admitted ones finish") {
  auto gate = std::make_shared<GateState>();
  auto model = nn::Sequential(nn::Linear(8, 4), Gate(gate));
  Endpoint e(model, "bounded", {}, serve::PublisherOptions(),
             serving("bounded").max_in_flight(2).batching(moe::BatcherOptions().max_batch_size(64)));
  DHT client_dht(DHTOptions().client_mode(true));
  serve::InferenceClient<> client(client_dht, serve::ClientOptions().endpoints({e.server.address()}).max_attempts(1));
  auto first = client.async_predict(at::randn({1, 8}));
  REQUIRE(test::wait_for([&] { return gate->waiting >= 1; }));
  auto second = client.async_predict(at::randn({1, 8}));
  REQUIRE(test::wait_for([&] { return e.server.stats().in_flight == 2; }));
  const std::string refused = [&] {
    try {
      client.predict(at::randn({1, 8}));
    } catch (const std::exception& err) {
      return std::string(err.what());
    }
    return std::string();
  }();
  CHECK(refused.find("busy") != std::string::npos);
  gate->release();
  CHECK(first.get().answers.back().ok());
  CHECK(second.get().answers.back().ok());
  CHECK(client.predict(at::randn({3, 8})).answers.back().ok());
}

TEST_CASE("serve client: mode one fails over when an endpoint dies mid-request") {
  auto gate = std::make_shared<GateState>();
  Endpoint dying(nn::Sequential(nn::Linear(8, 4), Gate(gate)), "failover");
  Endpoint alive(small_model(), "failover", {dying.dht.visible_addresses().at(0)});
  DHT client_dht(DHTOptions().client_mode(true));
  // Fixed order: both declare load 0, so the first one listed is tried first.
  serve::InferenceClient<> client(client_dht, serve::ClientOptions()
                                                  .endpoints({dying.server.address(), alive.server.address()})
                                                  .timeout(Seconds(10)));
  auto pending = client.async_predict(at::randn({4, 8}));
  REQUIRE(test::wait_for([&] { return gate->waiting >= 1; }));
  dying.dht.node()->rpc()->close();  // the peer goes away with the request in flight
  auto p = pending.get();
  REQUIRE(p.answers.size() == 2);
  CHECK_FALSE(p.answers[0].ok());
  CHECK(p.answers[0].address == dying.server.address());
  CHECK(p.answers[1].ok());
  CHECK(p.answers[1].address == alive.server.address());
  CHECK(p.answered_by() == std::vector<std::string>{alive.server.address()});
  CHECK(p.labels.sizes() == at::IntArrayRef{4});
  gate->release();
  // The dead endpoint is now tried last, so the next request goes straight to the live one.
  auto next = client.predict(at::randn({2, 8}));
  CHECK(next.answers.size() == 1);
  CHECK(next.answers[0].address == alive.server.address());
  // With every endpoint gone the client gives up after max_attempts, with the reason.
  alive.dht.node()->rpc()->close();
  CHECK_THROWS_WITH_AS(client.predict(at::randn({2, 8})), doctest::Contains("no endpoint answered"), Error);
}

TEST_CASE("serve client: mode all votes per row, ties go to the more confident") {
  Endpoint a(constant_scores({4, 0, 0}), "vote");
  Endpoint b(constant_scores({3, 0, 0}), "vote", {a.dht.visible_addresses().at(0)});
  Endpoint c(constant_scores({0, 5, 0}), "vote", {a.dht.visible_addresses().at(0)});
  DHT client_dht(DHTOptions().client_mode(true).initial_peers({a.dht.visible_addresses().at(0)}));
  serve::InferenceClient<> client(client_dht, serve::ClientOptions().prefix("vote").mode(serve::ClientMode::all));
  REQUIRE(test::wait_for([&] { return client.endpoints().size() == 3; }));
  auto p = client.predict(at::randn({3, 8}));
  CHECK(p.answers.size() == 3);
  CHECK(p.answered_by().size() == 3);
  CHECK(at::equal(p.labels, at::zeros({3}, at::kLong)));  // two votes for class 0 beat one for class 1
  CHECK(p.outputs.sizes() == at::IntArrayRef{3, 3});
  // A tie (1 against 1): c is more confident in class 1 than b is in class 0.
  a.dht.node()->rpc()->close();
  auto tie = client.predict(at::randn({2, 8}));
  CHECK(tie.answered_by().size() == 2);
  CHECK(at::equal(tie.labels, at::ones({2}, at::kLong)));
}

TEST_CASE("serve: endpoints are declared in the DHT with step, load, mode and role") {
  auto model = small_model();
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05));
  Endpoint e(model, "declared");
  for (int s = 0; s < 4; ++s) train_step(model, sgd, e.publisher);
  DHT client_dht(DHTOptions().client_mode(true).initial_peers({e.dht.visible_addresses().at(0)}));
  serve::InferenceClient<> client(client_dht, serve::ClientOptions().prefix("declared").refresh_period(Seconds(0.05)));
  REQUIRE(test::wait_for([&] {
    auto list = client.endpoints();
    return list.size() == 1 && list[0].step == 4;
  }));
  const auto list = client.endpoints();
  CHECK(list[0].address == e.server.address());
  CHECK(list[0].mode == "snapshot");
  CHECK(list[0].role == "trainer");
  serve::InferenceClient<> replicas_only(client_dht, serve::ClientOptions().prefix("declared").role("replica"));
  CHECK(replicas_only.endpoints().empty());
  CHECK_THROWS_WITH_AS(replicas_only.predict(at::randn({1, 8})), doctest::Contains("no inference endpoint"), Error);
}

TEST_CASE("serve replica: follows a training swarm's state and serves it") {
  auto model = small_model();
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05));
  Trainer<> trainer(sgd, TrainerOptions()
                             .dht(loopback())
                             .optimizer(optim::DecentralizedOptions().prefix("followed").averaging_steps_period(1000000)));
  serve::Publisher<nn::Sequential> publisher(model, serve::PublisherOptions().every_steps(1));
  serve::InferenceServer<nn::Sequential> trainer_endpoint(publisher, trainer.dht(), input8, serving("followed"));
  auto step = [&] {
    sgd.zero_grad();
    (model->forward(at::randn({16, 8})) - 1).pow(2).mean().backward();
    publisher.step([&] { trainer.step(); });
  };
  for (int s = 0; s < 3; ++s) step();

  serve::Replica<nn::Sequential> replica(small_model(), input8,
                                         serve::ReplicaOptions()
                                             .dht(loopback().initial_peers({trainer.address()}))
                                             .serving(serving("followed"))
                                             .every_seconds(Seconds(600))
                                             .every_steps(5)
                                             .poll_period(Seconds(0.05)));
  // It started from the swarm's state: the trainer's parameters after 3 steps.
  CHECK(replica.stats().step == 3);
  CHECK(replica.stats().downloads == 1);
  {
    auto s = replica.publisher().current();
    std::size_t i = 0;
    for (const auto& p : model->parameters()) CHECK(at::equal(s->tensors.at(i++), p.detach()));
  }
  // The swarm moves 10 steps on; the replica follows by step count, not by time.
  for (int s = 0; s < 10; ++s) step();
  REQUIRE(test::wait_for([&] { return replica.stats().step >= 8; }, 20s));
  CHECK(replica.stats().swarm_step >= 8);

  // A client that asks replicas only gets the replica's answer, computed from its snapshot.
  DHT client_dht(DHTOptions().client_mode(true).initial_peers({trainer.address()}));
  serve::InferenceClient<> client(client_dht, serve::ClientOptions().prefix("followed").role("replica"));
  REQUIRE(test::wait_for([&] { return client.endpoints().size() == 1; }));
  auto x = at::randn({6, 8});
  auto p = client.predict(x);
  REQUIRE(p.answers.back().ok());
  CHECK(p.answers.back().address == replica.address());
  auto served = replica.publisher().current();
  CHECK(p.answers.back().step == served->step);
  CHECK(p.answers.back().checksum == serve::checksum_hex(served->checksum));
  CHECK(at::allclose(p.outputs, forward_with(model, *served, x), 1e-5, 1e-5));
  replica.shutdown();
  trainer_endpoint.shutdown();
}
