// hive-infer: live inference for a training swarm, from the command line.
//
// As a replica (the default) it joins the swarm, downloads the state its averaging peers share,
// serves it, and downloads again every --every_seconds or when the swarm's step has moved on by
// --every_steps:
//   hive-infer --initial_peers 10.0.0.1:4000 --listen_on 0.0.0.0:5000
// As a client (--client) it streams test batches to the swarm's endpoints (training peers that
// run averaging_peer --serve, replicas) and reports accuracy, latency and the steps served:
//   hive-infer --client --initial_peers 10.0.0.1:4000 --mode all --requests 200

#include "common/cifar10.hpp"
#include "common/cli.hpp"
#include "common/fashion_mnist.hpp"
#include "common/latency.hpp"
#include "common/models.hpp"

#include <hive/serve/client.hpp>
#include <hive/serve/replica.hpp>

#include <asio/signal_set.hpp>

#include <atomic>
#include <csignal>
#include <iostream>
#include <mutex>
#include <set>
#include <thread>

namespace {

constexpr const char* usage = R"(usage: hive-infer [options]

Serves the newest state of a training swarm as a replica (the default), or, with --client,
streams test batches to the swarm's inference endpoints and reports what they answered.

Both:
  --initial_peers A,B    peers of the swarm (required unless --endpoints)
  --prefix NAME          the swarm's run name (default averaging_peer)
  --data_dir DIR         CIFAR-10 binary files: the swarm trains the CIFAR-10 model
                         (default: Fashion-MNIST)
Replica:
  --listen_on HOST:PORT  where to listen (default 127.0.0.1:0)
  --announce_host HOST   host others reach this replica at, for a wildcard --listen_on
  --every_seconds S      download the swarm's state at least this often (default 10)
  --every_steps K        and when the swarm's training endpoints are K steps ahead (default 50;
                         0: by time only)
  --compute_threads N    serving threads (default 1)
  --duration S           stop after S seconds (default 0: at SIGINT or SIGTERM)
Client (--client):
  --mode M               one (least loaded endpoint, failover) or all (every endpoint, majority
                         vote) (default one)
  --role R               only endpoints of role trainer or replica (default: any)
  --endpoints A,B        call these endpoints instead of looking them up in the DHT
  --requests N           batches to send (default 200)
  --batch B              rows per batch (default 32)
  --concurrency K        requests in flight at once (default 4)
  --timeout S            per call (default 5)
  --test_samples N       test images to draw batches from (default 2000)
The client's last line is a JSON summary.
)";

struct Flags {
  std::vector<std::string> initial_peers, endpoints;
  std::string prefix = "averaging_peer", data_dir, listen_on = "127.0.0.1:0", announce_host, mode = "one", role;
  bool client = false;
  double every_seconds = 10, duration = 0, timeout = 5;
  std::uint64_t every_steps = 50;
  int compute_threads = 1, concurrency = 4;
  std::int64_t requests = 200, batch = 32, test_samples = 2000;
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
    } else if (flag == "--initial_peers") f.initial_peers = hive::examples::split_commas(value());
    else if (flag == "--endpoints") f.endpoints = hive::examples::split_commas(value());
    else if (flag == "--prefix") f.prefix = value();
    else if (flag == "--data_dir") f.data_dir = value();
    else if (flag == "--listen_on") f.listen_on = value();
    else if (flag == "--announce_host") f.announce_host = value();
    else if (flag == "--every_seconds") f.every_seconds = std::stod(value());
    else if (flag == "--every_steps") f.every_steps = std::stoull(value());
    else if (flag == "--compute_threads") f.compute_threads = std::stoi(value());
    else if (flag == "--duration") f.duration = std::stod(value());
    else if (flag == "--client") f.client = true;
    else if (flag == "--mode") f.mode = value();
    else if (flag == "--role") f.role = value();
    else if (flag == "--requests") f.requests = std::stoll(value());
    else if (flag == "--batch") f.batch = std::stoll(value());
    else if (flag == "--concurrency") f.concurrency = std::stoi(value());
    else if (flag == "--timeout") f.timeout = std::stod(value());
    else if (flag == "--test_samples") f.test_samples = std::stoll(value());
    else throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
  }
  HIVE_CHECK(!f.initial_peers.empty() || (f.client && !f.endpoints.empty()),
             "--initial_peers is required (a client may give --endpoints instead)");
  HIVE_CHECK(f.every_seconds > 0 && f.duration >= 0 && f.timeout > 0, "--every_seconds and --timeout must be positive");
  HIVE_CHECK(f.compute_threads >= 1 && f.concurrency >= 1 && f.requests >= 1 && f.batch >= 1,
             "--compute_threads, --concurrency, --requests and --batch must be positive");
  HIVE_CHECK(f.role.empty() || f.role == "trainer" || f.role == "replica", "--role is trainer or replica, got '{}'", f.role);
  nlohmann::json(f.mode).get<hive::serve::ClientMode>();  // a clear error now for a bad --mode
  return f;
}

int run_replica(const Flags& flags) {
  const bool cifar = !flags.data_dir.empty();
  hive::serve::InferenceOptions serving;
  serving.prefix(flags.prefix).batching().compute_threads(flags.compute_threads);
  hive::serve::Replica<torch::nn::Sequential> replica(
      cifar ? hive::examples::cifar_model() : hive::examples::fashion_model(), hive::examples::image_schema(cifar),
      hive::serve::ReplicaOptions()
          .dht(hive::DHTOptions()
                   .initial_peers(flags.initial_peers)
                   .listen_on(flags.listen_on)
                   .announce_host(flags.announce_host))
          .serving(serving)
          .every_seconds(hive::Seconds(flags.every_seconds))
          .every_steps(flags.every_steps));
  fmt::print("Replica of '{}' serving step {} at {}\n", flags.prefix, replica.stats().step, replica.address());
  std::fflush(stdout);

  // Until a signal or --duration; a status line every 5 seconds.
  asio::io_context io;
  asio::signal_set signals(io, SIGINT, SIGTERM);
  bool stop = false;
  signals.async_wait([&](std::error_code ec, int signal) {
    if (!ec) fmt::print("received signal {}, shutting down\n", signal);
    stop = true;
  });
  asio::steady_timer end(io), status(io);
  if (flags.duration > 0) {
    end.expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(hive::Seconds(flags.duration)));
    end.async_wait([&](std::error_code ec) { stop = stop || !ec; });
  }
  std::function<void()> schedule = [&] {
    status.expires_after(std::chrono::seconds(5));
    status.async_wait([&](std::error_code ec) {
      if (ec || stop) return;
      const auto st = replica.stats();
      const auto served = replica.server().stats();
      fmt::print("replica: step {} (swarm {}), {} downloads, {} requests answered\n", st.step, st.swarm_step, st.downloads,
                 served.answered);
      std::fflush(stdout);
      schedule();
    });
  };
  schedule();
  while (!stop) io.run_one();
  signals.cancel();
  end.cancel();
  status.cancel();
  const auto st = replica.stats();
  const auto served = replica.server().stats();
  fmt::print("replica: served step {} last, {} downloads ({} failed), {} requests answered ({} rows)\n", st.step,
             st.downloads, st.failed, served.answered, served.rows);
  std::fflush(stdout);
  replica.shutdown();
  return 0;
}

int run_client(const Flags& flags) {
  const bool cifar = !flags.data_dir.empty();
  auto test = cifar ? hive::examples::load_cifar10(flags.data_dir, false, flags.test_samples)
                    : hive::examples::load_fashion_mnist(false, flags.test_samples);
  HIVE_CHECK(test.images.size(0) >= flags.batch, "{} test samples are fewer than one batch", test.images.size(0));
  hive::DHT dht(hive::DHTOptions().client_mode(true).initial_peers(flags.initial_peers));
  hive::serve::InferenceClient<> client(dht, hive::serve::ClientOptions()
                                                 .prefix(flags.prefix)
                                                 .mode(nlohmann::json(flags.mode).get<hive::serve::ClientMode>())
                                                 .role(flags.role)
                                                 .endpoints(flags.endpoints)
                                                 .timeout(hive::Seconds(flags.timeout)));
  const auto endpoints = client.endpoints();
  fmt::print("{} endpoints:", endpoints.size());
  for (const auto& e : endpoints) fmt::print(" {} ({}, step {})", e.address, e.role.empty() ? "fixed" : e.role, e.step);
  fmt::print("\n");
  std::fflush(stdout);

  std::mutex mutex;
  std::vector<double> latencies_ms;
  std::set<std::string> answered_by;
  std::int64_t correct = 0, rows = 0, failed = 0, failovers = 0;
  std::uint64_t min_step = UINT64_MAX, max_step = 0;
  std::atomic<std::int64_t> next{0};
  auto worker = [&] {
    for (auto i = next++; i < flags.requests; i = next++) {
      const auto at = (i * flags.batch) % (test.images.size(0) - flags.batch + 1);
      auto x = test.images.narrow(0, at, flags.batch);
      auto y = test.labels.narrow(0, at, flags.batch);
      try {
        auto p = client.predict(x);
        std::lock_guard lock(mutex);
        latencies_ms.push_back(p.latency.count() * 1000);
        correct += p.labels.eq(y).sum().item<std::int64_t>();
        rows += flags.batch;
        if (p.answers.size() > 1 && flags.mode == "one") ++failovers;
        for (const auto& a : p.answers)
          if (a.ok()) {
            answered_by.insert(a.address);
            min_step = std::min(min_step, a.step);
            max_step = std::max(max_step, a.step);
          }
      } catch (const std::exception& e) {
        std::lock_guard lock(mutex);
        if (failed++ < 3) fmt::print("request {} failed: {}\n", i, e.what());
      }
    }
  };
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int k = 0; k < flags.concurrency; ++k) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double accuracy = rows ? 100.0 * static_cast<double>(correct) / static_cast<double>(rows) : 0.0;
  const auto p50 = hive::examples::percentile(latencies_ms, 0.50), p99 = hive::examples::percentile(latencies_ms, 0.99);
  fmt::print("{} of {} requests answered in {:.1f} s ({:.1f} requests/s): accuracy {:.2f}%, latency p50 {:.1f} ms, "
             "p99 {:.1f} ms, steps {}..{}, {} failovers\n",
             flags.requests - failed, flags.requests, seconds, static_cast<double>(flags.requests - failed) / seconds, accuracy,
             p50, p99, rows ? min_step : 0, max_step, failovers);
  nlohmann::json summary = {{"requests", flags.requests},
                            {"answered", flags.requests - failed},
                            {"failed", failed},
                            {"accuracy", accuracy},
                            {"p50_ms", p50},
                            {"p99_ms", p99},
                            {"min_step", rows ? min_step : 0},
                            {"max_step", max_step},
                            {"failovers", failovers},
                            {"answered_by", answered_by},
                            {"mode", flags.mode}};
  fmt::print("{}\n", summary.dump());
  std::fflush(stdout);
  return failed == flags.requests ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) try {
  const auto flags = parse(argc, argv);
  at::set_num_threads(1);
  hive::examples::limit_blas_threads(1);  // one OpenBLAS thread per serving thread
  return flags.client ? run_client(flags) : run_replica(flags);
} catch (const std::exception& e) {
  fmt::print(stderr, "hive-infer: {}\n", e.what());
  return 1;
}
