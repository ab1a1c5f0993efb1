// Live inference while training, the experiment of hive's seed plan: an averaging swarm trains
// Fashion-MNIST while concurrent clients stream test batches, served in turn from the training
// peers' snapshots, from a replica that follows the swarm, and from the live training weights.
// It reports, second by second, the served accuracy and latency, and the training throughput
// with and without serving; it writes a CSV, a PNG plot (with gnuplot) and a summary table.
//
//   live_inference                       # defaults: 3 peers, 4 clients at 25 requests/s each
//   live_inference --phase_seconds 30 --clients 8 --out results/

#include "common/cli.hpp"
#include "common/fashion_mnist.hpp"
#include "common/latency.hpp"
#include "common/models.hpp"

#include <hive/serve/client.hpp>
#include <hive/serve/replica.hpp>
#include <hive/trainer.hpp>

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <thread>

namespace {

constexpr const char* usage = R"(usage: live_inference [options]

Trains a swarm of averaging peers on Fashion-MNIST in this process while clients stream test
batches to it, in four phases: no serving (the training baseline), serving from the training
peers' snapshots, from a replica, and from the live training weights.

  --peers N            training peers (default 3)
  --clients K          concurrent clients (default 4)
  --rate R             requests per second per client (default 25)
  --batch B            rows per request (default 32)
  --phase_seconds S    length of each serving phase (default 20)
  --baseline_seconds S length of the phase without serving (default 15)
  --train_samples N    training samples, split among the peers (default 12000)
  --test_samples N     test samples the clients draw from (default 2000)
  --publish_every N    snapshot every N training steps (default 10)
  --out DIR            where live_inference.csv and live_inference.png go (default .)
  --no_plot            write the CSV only
)";

struct Flags {
  int peers = 3, clients = 4;
  double rate = 25, phase_seconds = 20, baseline_seconds = 15;
  std::int64_t batch = 32, train_samples = 12000, test_samples = 2000;
  std::uint64_t publish_every = 10;
  std::string out = ".";
  bool plot = true;
};

Flags parse(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = hive::examples::flag_name(argv[i]);
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw hive::InvalidArgument(fmt::format("{} needs a value (see --help)", flag));
      return argv[++i];
    };
    if (flag == "--help") {
      std::cout << usage;
      std::exit(0);
    } else if (flag == "--peers") f.peers = std::stoi(value());
    else if (flag == "--clients") f.clients = std::stoi(value());
    else if (flag == "--rate") f.rate = std::stod(value());
    else if (flag == "--batch") f.batch = std::stoll(value());
    else if (flag == "--phase_seconds") f.phase_seconds = std::stod(value());
    else if (flag == "--baseline_seconds") f.baseline_seconds = std::stod(value());
    else if (flag == "--train_samples") f.train_samples = std::stoll(value());
    else if (flag == "--test_samples") f.test_samples = std::stoll(value());
    else if (flag == "--publish_every") f.publish_every = std::stoull(value());
    else if (flag == "--out") f.out = value();
    else if (flag == "--no_plot") f.plot = false;
    else throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
  }
  HIVE_CHECK(f.peers >= 1 && f.clients >= 1 && f.rate > 0 && f.batch >= 1 && f.publish_every >= 1,
             "--peers, --clients, --rate, --batch and --publish_every must be positive");
  HIVE_CHECK(f.phase_seconds > 0 && f.baseline_seconds > 0, "phases must last a positive time");
  return f;
}

using Clock = std::chrono::steady_clock;
using Model = torch::nn::Sequential;

/// One training peer of the swarm: a Trainer, a Publisher and an InferenceServer.
struct Peer {
  Model model = hive::examples::fashion_model();
  torch::optim::SGD sgd{model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9)};
  std::unique_ptr<hive::Trainer<>> trainer;
  std::unique_ptr<hive::serve::Publisher<Model>> publisher;
  std::unique_ptr<hive::serve::InferenceServer<Model>> server;
  std::atomic<std::int64_t> samples{0};
  std::thread thread;
};

/// What the clients saw in one second of one phase.
struct Bucket {
  std::int64_t requests = 0, failed = 0, rows = 0, correct = 0, torn = 0;
  std::vector<double> latencies_ms;
  double step_sum = 0;
  double train_samples_per_s = 0;
  bool train_measured = false;  // a bucket only the clients saw (a phase's last sliver) has no rate
};

/// The summary of one phase.
struct PhaseResult {
  std::string name;
  std::int64_t requests = 0, failed = 0, rows = 0, correct = 0, torn = 0;
  std::vector<double> latencies_ms;
  double seconds = 0, train_samples = 0;
};

bool have_program(const std::string& name) { return std::system(("command -v " + name + " >/dev/null 2>&1").c_str()) == 0; }

// Accuracy and p99 latency against time, one series per phase.
void plot(const std::filesystem::path& csv, const std::filesystem::path& png, const std::vector<std::string>& phases) {
  const auto script = png.parent_path() / "live_inference.gp";
  std::ofstream gp(script);
  gp << "set terminal pngcairo size 1000,900 noenhanced\nset output '" << png.string() << "'\n"
     << "set datafile separator ','\nset key outside right\nset multiplot layout 3,1 title 'hive live inference: "
        "Fashion-MNIST swarm serving while it trains'\n"
     << "set ylabel 'served accuracy (%)'\nset yrange [0:100]\n";
  // Column `column` of every phase; the phase without serving has no requests to plot.
  auto series = [&](int column, bool with_baseline) {
    std::string out = "plot ";
    for (std::size_t i = 0; i < phases.size(); ++i) {
      if (!with_baseline && phases[i] == "no_serving") continue;
      out += fmt::format("{}'{}' using 1:(strcol(2) eq '{}' ? ${} : 1/0) with linespoints linecolor {} title '{}'",
                         out == "plot " ? "" : ", ", csv.string(), phases[i], column, i + 1, phases[i]);
    }
    return out + "\n";
  };
  gp << series(4, false) << "set ylabel 'p99 latency (ms)'\nset yrange [0:*]\n" << series(6, false)
     << "set ylabel 'training (samples/s)'\nset xlabel 'time (s)'\n" << series(10, true) << "unset multiplot\n";
  gp.close();
  if (std::system(("gnuplot " + script.string()).c_str()) == 0) fmt::print("wrote {}\n", png.string());
  else fmt::print("gnuplot failed; the data is in {}\n", csv.string());
}

}  // namespace

int main(int argc, char** argv) try {
  const auto flags = parse(argc, argv);
  // One thread per matrix product: training and each serving thread get a core each.
  hive::examples::limit_blas_threads(1);
  at::set_num_threads(1);
  torch::manual_seed(0);
  // The replica downloads every 2 s and logs each one; HIVE_LOG_LEVEL=info shows them.
  if (!std::getenv("HIVE_LOG_LEVEL")) hive::log::set_level(hive::log::Level::warn);
  const std::string prefix = "live_inference";
  auto train = hive::examples::load_fashion_mnist(true, flags.train_samples);
  auto test = hive::examples::load_fashion_mnist(false, flags.test_samples);
  HIVE_CHECK(test.images.size(0) >= flags.batch, "fewer test samples than one batch");
  const auto per_peer = train.images.size(0) / flags.peers;
  fmt::print("Fashion-MNIST: {} peers train on {} samples each; {} clients stream batches of {} at {} requests/s each\n",
             flags.peers, per_peer, flags.clients, flags.batch, flags.rate);

  // The swarm: every peer trains, averages in the background and serves its snapshots.
  std::vector<std::unique_ptr<Peer>> peers;
  std::atomic<bool> stop_training{false};
  for (int i = 0; i < flags.peers; ++i) {
    auto p = std::make_unique<Peer>();
    auto optimizer = hive::optim::DecentralizedOptions()
                         .prefix(prefix)
                         .target_group_size(static_cast<std::size_t>(std::max(2, flags.peers)))
                         .min_group_size(2)
                         .averaging_steps_period(10);
    optimizer.averager().matchmaking_time(hive::Seconds(2)).compression(hive::Compression::float16);
    std::vector<std::string> initial;
    if (i > 0) initial.push_back(peers[0]->trainer->address());
    p->trainer = std::make_unique<hive::Trainer<>>(
        p->sgd, hive::TrainerOptions().dht(hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(initial)).optimizer(optimizer));
    if (i > 0) p->trainer->load_state_from_peers(hive::Seconds(30));
    p->publisher = std::make_unique<hive::serve::Publisher<Model>>(
        p->model, hive::serve::PublisherOptions().every_steps(flags.publish_every).every_seconds(hive::Seconds(0)));
    p->publisher->set_step(p->trainer->optimizer().local_step());
    p->server = std::make_unique<hive::serve::InferenceServer<Model>>(*p->publisher, p->trainer->dht(),
                                                                     hive::examples::image_schema(false),
                                                                     hive::serve::InferenceOptions().prefix(prefix).declare_period(hive::Seconds(2)));
    peers.push_back(std::move(p));
  }
  for (int i = 0; i < flags.peers; ++i) {
    auto& p = *peers[static_cast<std::size_t>(i)];
    auto images = train.images.narrow(0, i * per_peer, per_peer), labels = train.labels.narrow(0, i * per_peer, per_peer);
    p.thread = std::thread([&p, images, labels, &stop_training, batch = flags.batch] {
      at::set_num_threads(1);
      while (!stop_training) {
        auto order = torch::randperm(images.size(0));
        for (std::int64_t s = 0; s + batch <= images.size(0) && !stop_training; s += batch) {
          auto idx = order.narrow(0, s, batch);
          p.sgd.zero_grad();
          torch::nn::functional::cross_entropy(p.model->forward(images.index_select(0, idx)), labels.index_select(0, idx))
              .backward();
          p.publisher->step([&] { p.trainer->step(); });
          p.samples += batch;
        }
      }
    });
  }
  // The replica follows the swarm: a download every 2 s, or when it is 20 steps behind.
  hive::serve::InferenceOptions replica_serving;
  replica_serving.prefix(prefix).declare_period(hive::Seconds(2));
  hive::serve::Replica<Model> replica(hive::examples::fashion_model(), hive::examples::image_schema(false),
                                      hive::serve::ReplicaOptions()
                                          .dht(hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers({peers[0]->trainer->address()}))
                                          .serving(replica_serving)
                                          .every_seconds(hive::Seconds(2))
                                          .every_steps(20)
                                          .poll_period(hive::Seconds(0.5)));
  fmt::print("swarm of {} training endpoints and a replica at {}\n", flags.peers, replica.address());

  hive::DHT client_dht(hive::DHTOptions().client_mode(true).initial_peers({peers[0]->trainer->address()}));
  hive::serve::InferenceClient<> trainers(client_dht, hive::serve::ClientOptions().prefix(prefix).role("trainer"));
  hive::serve::InferenceClient<> replicas(client_dht, hive::serve::ClientOptions().prefix(prefix).role("replica"));
  // Endpoints declare themselves at start; wait (bounded) until the clients see them all.
  for (int i = 0; i < 100 && (trainers.endpoints().size() < static_cast<std::size_t>(flags.peers) || replicas.endpoints().empty()); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));

  struct Phase {
    std::string name;
    double seconds;
    hive::serve::InferenceClient<>* client;
    hive::serve::Mode mode;
  };
  const std::vector<Phase> phases{{"no_serving", flags.baseline_seconds, nullptr, hive::serve::Mode::snapshot},
                                  {"snapshot", flags.phase_seconds, &trainers, hive::serve::Mode::snapshot},
                                  {"replica", flags.phase_seconds, &replicas, hive::serve::Mode::snapshot},
                                  {"live", flags.phase_seconds, &trainers, hive::serve::Mode::live}};
  const auto csv_path = std::filesystem::path(flags.out) / "live_inference.csv";
  std::filesystem::create_directories(flags.out);
  std::ofstream csv(csv_path);
  csv << "time_s,phase,requests,accuracy,p50_ms,p99_ms,torn,failed,mean_step,train_samples_per_s\n";
  const auto t0 = Clock::now();
  const bool tty = isatty(STDOUT_FILENO);
  std::vector<PhaseResult> results;
  for (const auto& phase : phases) {
    for (auto& p : peers) p->publisher->set_mode(phase.mode);
    fmt::print("== phase {}: {:.0f} s\n", phase.name, phase.seconds);
    std::fflush(stdout);
    std::mutex mutex;
    std::map<std::int64_t, Bucket> buckets;  // second since t0
    std::atomic<bool> phase_over{false};
    std::vector<std::thread> clients;
    if (phase.client)
      for (int c = 0; c < flags.clients; ++c)
        clients.emplace_back([&, c] {
          const auto period = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1 / flags.rate));
          auto next = Clock::now() + period * c / flags.clients;  // spread the clients' requests
          for (std::int64_t i = c; !phase_over; i += flags.clients) {
            std::this_thread::sleep_until(next);
            next += period;
            const auto at = (i * flags.batch) % (test.images.size(0) - flags.batch + 1);
            auto x = test.images.narrow(0, at, flags.batch);
            auto y = test.labels.narrow(0, at, flags.batch);
            const auto sec = std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - t0).count();
            try {
              auto pr = phase.client->predict(x);
              const auto correct = pr.labels.eq(y).sum().item<std::int64_t>();
              std::lock_guard lock(mutex);
              auto& b = buckets[sec];
              ++b.requests;
              b.rows += flags.batch;
              b.correct += correct;
              b.latencies_ms.push_back(pr.latency.count() * 1000);
              b.torn += pr.answers.back().torn ? 1 : 0;
              b.step_sum += static_cast<double>(pr.answers.back().step);
            } catch (const std::exception&) {
              std::lock_guard lock(mutex);
              ++buckets[sec].requests;
              ++buckets[sec].failed;
            }
          }
        });
    // Training throughput, second by second.
    const auto phase_start = Clock::now();
    const auto phase_end = phase_start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(phase.seconds));
    auto samples_now = [&] {
      std::int64_t s = 0;
      for (auto& p : peers) s += p->samples.load();
      return s;
    };
    const auto samples_start = samples_now();
    auto last_samples = samples_start;
    auto last = phase_start;
    while (Clock::now() < phase_end) {
      std::this_thread::sleep_until(std::min(phase_end, last + std::chrono::seconds(1)));
      const auto now = Clock::now();
      const auto s = samples_now();
      const auto sec = std::chrono::duration_cast<std::chrono::seconds>(now - t0).count() - 1;
      const double rate = static_cast<double>(s - last_samples) / std::chrono::duration<double>(now - last).count();
      if (now - last >= std::chrono::milliseconds(500)) {  // the phase's last sliver would overwrite a full second
        std::lock_guard lock(mutex);
        buckets[sec].train_samples_per_s = rate;
        buckets[sec].train_measured = true;
      }
      last_samples = s;
      last = now;
      const double done = std::chrono::duration<double>(now - phase_start).count() / phase.seconds;
      if (tty) fmt::print("\r  {:3.0f}%  training {:.0f} samples/s", 100 * std::min(done, 1.0), rate);
      std::fflush(stdout);
    }
    phase_over = true;
    for (auto& t : clients) t.join();
    if (tty) fmt::print("\n");
    PhaseResult r;
    r.name = phase.name;
    r.seconds = std::chrono::duration<double>(Clock::now() - phase_start).count();
    r.train_samples = static_cast<double>(samples_now() - samples_start);
    for (auto& [sec, b] : buckets) {
      r.requests += b.requests;
      r.failed += b.failed;
      r.rows += b.rows;
      r.correct += b.correct;
      r.torn += b.torn;
      r.latencies_ms.insert(r.latencies_ms.end(), b.latencies_ms.begin(), b.latencies_ms.end());
      const auto answered = b.requests - b.failed;
      csv << fmt::format("{},{},{},{:.2f},{:.2f},{:.2f},{},{},{:.1f},{}\n", sec, phase.name, b.requests,
                         b.rows ? 100.0 * static_cast<double>(b.correct) / static_cast<double>(b.rows) : 0.0,
                         hive::examples::percentile(b.latencies_ms, 0.5), hive::examples::percentile(b.latencies_ms, 0.99),
                         b.torn, b.failed, answered ? b.step_sum / static_cast<double>(answered) : 0.0,
                         b.train_measured ? fmt::format("{:.1f}", b.train_samples_per_s) : std::string());
      if (!tty && phase.client && b.requests > 0 && sec % 5 == 0)
        fmt::print("  t={}s: {} requests, accuracy {:.1f}%, p99 {:.1f} ms, training {:.0f} samples/s\n", sec, b.requests,
                   b.rows ? 100.0 * static_cast<double>(b.correct) / static_cast<double>(b.rows) : 0.0,
                   hive::examples::percentile(b.latencies_ms, 0.99), b.train_samples_per_s);
    }
    csv.flush();
    results.push_back(std::move(r));
  }
  stop_training = true;
  for (auto& p : peers) p->thread.join();

  const double baseline = results.front().train_samples / results.front().seconds;
  fmt::print("\n== summary ({} training peers, {} clients x {} requests/s of {} rows)\n", flags.peers, flags.clients,
             flags.rate, flags.batch);
  fmt::print("| phase | requests/s | failed | served accuracy | p50 ms | p99 ms | torn replies | training samples/s | vs no serving |\n");
  fmt::print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const auto& r : results) {
    const double train_rate = r.train_samples / r.seconds;
    if (r.name == "no_serving")
      fmt::print("| {} | - | - | - | - | - | - | {:.0f} | 1.00 |\n", r.name, train_rate);
    else
      fmt::print("| {} | {:.1f} | {} | {:.2f}% | {:.1f} | {:.1f} | {} | {:.0f} | {:.2f} |\n", r.name,
                 static_cast<double>(r.requests) / r.seconds, r.failed,
                 r.rows ? 100.0 * static_cast<double>(r.correct) / static_cast<double>(r.rows) : 0.0,
                 hive::examples::percentile(r.latencies_ms, 0.5), hive::examples::percentile(r.latencies_ms, 0.99), r.torn,
                 train_rate, train_rate / baseline);
  }
  const auto rs = replica.stats();
  fmt::print("replica: {} downloads, served step {} at the end\n", rs.downloads, rs.step);
  fmt::print("wrote {}\n", csv_path.string());
  csv.close();
  if (flags.plot) {
    if (have_program("gnuplot"))
      plot(csv_path, std::filesystem::path(flags.out) / "live_inference.png", {"no_serving", "snapshot", "replica", "live"});
    else fmt::print("gnuplot is not installed (apt-get install gnuplot-nox): no plot\n");
  }
  std::fflush(stdout);
  replica.shutdown();
  for (auto& p : peers) {
    p->server->shutdown();
    p->trainer->shutdown();
  }
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "live_inference: {}\n", e.what());
  return 1;
}
