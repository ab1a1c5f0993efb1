// Serving while training (serve/), measured: for the demo's CNN and an FFN of hidden size 1024,
// the latency of a steady request rate with the process idle and while it trains, the training
// samples/s lost to serving, the most requests/s one serving thread answers, the cost of
// publishing a snapshot against a plain memcpy of the same bytes, and torn replies (snapshot
// replies whose step and checksum match no published snapshot; live replies that overlapped an
// optimizer step). Loopback TCP, one process.
//
//   benchmark_inference                  # both models, 5 s per phase
//   benchmark_inference --model cnn --seconds 10 --rate 100 --rows 32
//
// The last line is one JSON object: the CNN's figures at the top level, each model's under "models".

#include "../examples/common/latency.hpp"
#include "../examples/common/models.hpp"
#include "common/machine.hpp"

#include <hive/serve/client.hpp>
#include <hive/serve/server.hpp>

#include <atomic>
#include <cstring>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <thread>

namespace {

using Clock = std::chrono::steady_clock;
using Model = torch::nn::Sequential;

struct Flags {
  std::vector<std::string> models{"cnn", "ffn"};
  double seconds = 5, rate = 100;
  std::int64_t rows = 32, train_batch = 64, hidden = 1024;
  int concurrency = 8, clients = 4;
  std::uint64_t publish_every = 10;
};

Flags parse(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw hive::InvalidArgument(fmt::format("{} needs a value", flag));
      return argv[++i];
    };
    if (flag == "--help") {
      std::cout << "usage: benchmark_inference [--model cnn|ffn|both] [--seconds S] [--rate R] [--rows N]\n"
                   "       [--train_batch N] [--hidden H] [--concurrency K] [--clients K] [--publish_every N]\n";
      std::exit(0);
    } else if (flag == "--model") {
      const auto m = value();
      HIVE_CHECK(m == "cnn" || m == "ffn" || m == "both", "--model is cnn, ffn or both, got '{}'", m);
      f.models = m == "both" ? std::vector<std::string>{"cnn", "ffn"} : std::vector<std::string>{m};
    } else if (flag == "--seconds") f.seconds = std::stod(value());
    else if (flag == "--rate") f.rate = std::stod(value());
    else if (flag == "--rows") f.rows = std::stoll(value());
    else if (flag == "--train_batch") f.train_batch = std::stoll(value());
    else if (flag == "--hidden") f.hidden = std::stoll(value());
    else if (flag == "--concurrency") f.concurrency = std::stoi(value());
    else if (flag == "--clients") f.clients = std::stoi(value());
    else if (flag == "--publish_every") f.publish_every = std::stoull(value());
    else throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
  }
  HIVE_CHECK(f.seconds > 0 && f.rate > 0 && f.rows >= 1 && f.concurrency >= 1 && f.clients >= 1,
             "--seconds, --rate, --rows, --concurrency and --clients must be positive");
  return f;
}

Model ffn_model(std::int64_t hidden) {
  namespace nn = torch::nn;
  return nn::Sequential(nn::Linear(784, hidden), nn::ReLU(), nn::Linear(hidden, hidden), nn::ReLU(), nn::Linear(hidden, 10));
}

/// Latencies and checks of the replies of one phase.
struct Replies {
  std::vector<double> latencies_ms;
  std::int64_t answered = 0, failed = 0, torn = 0, mismatched = 0;
  double seconds = 0;
};

/// Training in a thread of its own, through the publisher, until stopped.
class TrainingLoop {
 public:
  TrainingLoop(Model model, hive::serve::Publisher<Model>& publisher, std::int64_t batch)
      : model_(std::move(model)), publisher_(publisher), batch_(batch) {}
  void start() {
    stop_ = false;
    samples_ = 0;
    start_ = Clock::now();
    thread_ = std::thread([this] {
      at::set_num_threads(1);
      torch::optim::SGD sgd(model_->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
      auto x = at::randn({batch_, 784});
      auto y = at::randint(0, 10, {batch_}, at::kLong);
      while (!stop_) {
        sgd.zero_grad();
        torch::nn::functional::cross_entropy(model_->forward(x), y).backward();
        publisher_.step([&] { sgd.step(); });
        samples_ += batch_;
      }
    });
  }
  /// Stops; returns the samples/s trained.
  double stop() {
    stop_ = true;
    thread_.join();
    return static_cast<double>(samples_.load()) / std::chrono::duration<double>(Clock::now() - start_).count();
  }

 private:
  Model model_;
  hive::serve::Publisher<Model>& publisher_;
  std::int64_t batch_;
  std::atomic<bool> stop_{false};
  std::atomic<std::int64_t> samples_{0};
  Clock::time_point start_;
  std::thread thread_;
};

nlohmann::json run_model(const Flags& flags, const std::string& name) {
  at::set_num_threads(1);
  torch::manual_seed(0);
  Model model = name == "cnn" ? hive::examples::fashion_model() : ffn_model(flags.hidden);
  hive::serve::Publisher<Model> publisher(
      model, hive::serve::PublisherOptions().every_steps(flags.publish_every).every_seconds(hive::Seconds(0)));
  // Every published snapshot, to check the replies' step and checksum against.
  std::mutex published_mutex;
  std::map<std::uint64_t, std::set<std::string>> published;
  auto record = [&](const std::shared_ptr<const hive::serve::Snapshot>& s) {
    std::lock_guard lock(published_mutex);
    published[s->step].insert(hive::serve::checksum_hex(s->checksum));
  };
  record(publisher.current());
  publisher.on_publish(record);

  hive::DHT dht(hive::DHTOptions().listen_on("127.0.0.1:0"));
  hive::serve::InferenceServer<Model> server(publisher, dht, hive::examples::image_schema(false),
                                             hive::serve::InferenceOptions().prefix("bench"));
  hive::DHT client_dht(hive::DHTOptions().client_mode(true));
  hive::serve::InferenceClient<> client(client_dht, hive::serve::ClientOptions().endpoints({server.address()}));
  const auto x = at::rand({flags.rows, 784});
  for (int i = 0; i < 20; ++i) client.predict(x);  // warm-up: connection, clone, allocator

  auto check = [&](const hive::serve::Prediction& p, Replies& r) {
    const auto& a = p.answers.back();
    r.latencies_ms.push_back(p.latency.count() * 1000);
    ++r.answered;
    if (a.mode == "live") {
      r.torn += a.torn ? 1 : 0;
      return;
    }
    std::lock_guard lock(published_mutex);
    auto it = published.find(a.step);
    if (it == published.end() || !it->second.count(a.checksum)) ++r.mismatched;
  };
  // Open loop: `clients` threads together send `rate` requests/s for `seconds`.
  auto steady_load = [&]() {
    Replies r;
    std::mutex mutex;
    const auto start = Clock::now();
    const auto end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(flags.seconds));
    std::vector<std::thread> threads;
    for (int c = 0; c < flags.clients; ++c)
      threads.emplace_back([&, c] {
        const auto period = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(flags.clients / flags.rate));
        for (auto next = start + period * c / flags.clients; next < end; next += period) {
          std::this_thread::sleep_until(next);
          try {
            auto p = client.predict(x);
            std::lock_guard lock(mutex);
            check(p, r);
          } catch (const std::exception&) {
            std::lock_guard lock(mutex);
            ++r.failed;
          }
        }
      });
    for (auto& t : threads) t.join();
    r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return r;
  };
  // Closed loop: `concurrency` threads send as fast as answers come back.
  auto saturate = [&]() {
    Replies r;
    std::mutex mutex;
    const auto start = Clock::now();
    const auto end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(flags.seconds));
    std::vector<std::thread> threads;
    for (int c = 0; c < flags.concurrency; ++c)
      threads.emplace_back([&] {
        while (Clock::now() < end) {
          auto p = client.predict(x);
          std::lock_guard lock(mutex);
          check(p, r);
        }
      });
    for (auto& t : threads) t.join();
    r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return r;
  };
  auto p = [](const Replies& r, double q) { return hive::examples::percentile(r.latencies_ms, q); };

  fmt::print("== {} ({:.2f} MB of parameters), {:.0f} requests/s of {} rows\n", name,
             static_cast<double>(publisher.bytes()) / 1e6, flags.rate, flags.rows);
  std::fflush(stdout);
  const auto idle = steady_load();
  fmt::print("idle: p50 {:.2f} ms, p99 {:.2f} ms ({} answered)\n", p(idle, 0.5), p(idle, 0.99), idle.answered);
  const auto max = saturate();
  const double requests_per_s = static_cast<double>(max.answered) / max.seconds;
  fmt::print("saturated ({} in flight): {:.0f} requests/s, p50 {:.2f} ms\n", flags.concurrency, requests_per_s, p(max, 0.5));

  TrainingLoop training(model, publisher, flags.train_batch);
  training.start();
  std::this_thread::sleep_for(std::chrono::duration<double>(flags.seconds));
  const double alone = training.stop();
  fmt::print("training alone: {:.0f} samples/s\n", alone);
  training.start();
  const auto busy = steady_load();
  const double serving = training.stop();
  const double slowdown = std::clamp(1 - serving / alone, 0.0, 1.0);
  fmt::print("training while serving: {:.0f} samples/s (slowdown {:.3f}); serving p50 {:.2f} ms, p99 {:.2f} ms "
             "({} answered, {} failed)\n",
             serving, slowdown, p(busy, 0.5), p(busy, 0.99), busy.answered, busy.failed);

  // Live weights: no copies, replies may overlap an optimizer step.
  publisher.set_mode(hive::serve::Mode::live);
  training.start();
  const auto live = steady_load();
  training.stop();
  publisher.set_mode(hive::serve::Mode::snapshot);
  fmt::print("live weights while training: {} of {} replies torn, p99 {:.2f} ms\n", live.torn, live.answered, p(live, 0.99));

  // A publication (copy into a recycled buffer and checksum) against memcpy of the same bytes.
  constexpr int reps = 50;
  std::vector<double> publish_ms, memcpy_ms;
  auto source = at::empty({publisher.bytes()}, at::kByte).fill_(1);
  auto target = at::empty({publisher.bytes()}, at::kByte).fill_(0);
  for (int i = 0; i < reps; ++i) {
    auto t = Clock::now();
    publisher.publish();
    publish_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
    t = Clock::now();
    std::memcpy(target.data_ptr(), source.data_ptr(), static_cast<std::size_t>(publisher.bytes()));
    memcpy_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
  }
  const double snapshot = hive::examples::percentile(publish_ms, 0.5), copy = hive::examples::percentile(memcpy_ms, 0.5);
  fmt::print("publishing a snapshot: {:.3f} ms (median of {}), memcpy of the same {} bytes: {:.3f} ms ({:.2f}x)\n", snapshot,
             reps, publisher.bytes(), copy, snapshot / copy);
  const auto torn = idle.mismatched + max.mismatched + busy.mismatched;
  fmt::print("snapshot replies whose step and checksum match no published snapshot: {}\n", torn);
  std::fflush(stdout);
  server.shutdown();
  return {{"model", name},
          {"parameter_bytes", publisher.bytes()},
          {"rate", flags.rate},
          {"rows", flags.rows},
          {"p50_ms", p(busy, 0.5)},
          {"p99_ms", p(busy, 0.99)},
          {"idle_p50_ms", p(idle, 0.5)},
          {"idle_p99_ms", p(idle, 0.99)},
          {"p99_ratio", p(busy, 0.99) / std::max(1e-9, p(idle, 0.99))},
          {"requests_per_s", requests_per_s},
          {"train_samples_per_s", alone},
          {"train_samples_per_s_serving", serving},
          {"train_slowdown", slowdown},
          {"snapshot_ms", snapshot},
          {"memcpy_ms", copy},
          {"snapshot_to_memcpy", snapshot / std::max(1e-9, copy)},
          {"torn_replies", torn},
          {"failed", idle.failed + busy.failed + live.failed},
          {"live_replies", live.answered},
          {"live_torn_replies", live.torn}};
}

}  // namespace

int main(int argc, char** argv) try {
  const auto flags = parse(argc, argv);
  // One thread per matrix product: training and each serving thread get a core each.
  hive::examples::limit_blas_threads(1);
  const double busy0 = hive::bench::machine_busy_seconds(), cpu0 = hive::bench::cpu_seconds();
  nlohmann::json models = nlohmann::json::array();
  for (const auto& m : flags.models) models.push_back(run_model(flags, m));
  nlohmann::json out = models.front();
  out["bench"] = "inference";
  out["models"] = models;
  out["blas"] = hive::bench::loaded_blas();
  out["load_average"] = hive::bench::load_average();
  out["others_cpu_s"] = std::max(0.0, hive::bench::machine_busy_seconds() - busy0 - (hive::bench::cpu_seconds() - cpu0));
  std::cout << out.dump() << std::endl;
  return 0;
} catch (const std::exception& e) {
  std::cerr << "benchmark_inference: " << e.what() << "\n";
  return 1;
}
