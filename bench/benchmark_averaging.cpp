// benchmark_averaging: hivemind's benchmark_averaging.py in C++, plus an all-reduce bandwidth run.
// Every peer lives in this process, each hive::DHT with its own io thread, over loopback TCP;
// the peers bootstrap from one extra root DHT peer that averages nothing (as in hivemind).
//
//   benchmark_averaging [--peers 16] [--target_group_size 4] [--min_group_size 2] [--rounds 5]
//                       [--num_tensors 4] [--tensor_size 1048576] [--compression float16]
//                       [--initial_group_bits 00|spread] [--matchmaking_time 5] [--request_timeout 3]
//                       [--allreduce_timeout 60] [--part_size_bytes 524288]
//                       [--allreduce_peers 8] [--allreduce_mib 64] [--allreduce_rounds 3]
//                       [--allreduce_strategy both|butterfly|gloo] [--allreduce_aggregation mean]
//                       [--pause 0] [--encrypt 1]
//                       [--collaborative_peers 4] [--collaborative_samples 8000] [--seed 0]
//
// Part 1 (hivemind's benchmark): --peers averagers, each over --num_tensors random tensors of
// --tensor_size floats (distinct per peer). In each of --rounds rounds every peer calls
// async_step at once and the benchmark waits for all of them (hivemind's peers step on their
// own, without this barrier). Per round: the peers whose step succeeded, the mean group size of
// those steps, the groups formed, the round's wall time (first async_step to last result).
//   success_rate = successful steps / (peers x rounds); round_s = mean wall time of a round.
//   max_dev_from_mean = largest |value - global mean| over every peer's tensors after the
//   rounds, where the global mean is that of all peers' initial tensors. Averaging within groups
//   with equal weights keeps the global mean, so once every peer has been mixed with every
//   other (two good rounds of groups of 4 for 16 peers starting from bits "00") this is only
//   the compression error.
// Part 2 (bandwidth): --allreduce_peers peers, each with one float32 vector of --allreduce_mib
// MiB, target group size = all of them, no compression; all step at once, --allreduce_rounds
// times. allreduce_s = StepResult::allreduce_s (group formed -> averaged tensors written back,
// including the flatten/unflatten copies), max over peers, median over rounds.
//   allreduce_gbps     = vector bytes x 8 / allreduce_s / 1e9 ("algorithmic" bandwidth);
//   allreduce_bus_gbps = allreduce_gbps x 2 (n-1)/n: with butterfly all-reduce each peer sends
//                        (n-1)/n of its vector to the other reducers and receives as much back.
//   allreduce_copy_bound_s = the same bytes (the n(n-1) parts out, the n(n-1) averages back)
//                        through bare loopback sockets into fresh buffers on two threads, with
//                        no framing, encryption, decoding or arithmetic (median of 3, measured
//                        right after the strategy's rounds); allreduce_ratio_to_bound =
//                        allreduce_s / allreduce_copy_bound_s.
// Part 2 runs once per strategy (--allreduce_strategy, default both): Butterfly's figures are
// allreduce_*, Gloo's (c10d::ProcessGroupGloo rebuilt per round, averaging::Gloo)
// gloo_allreduce_*, same sizes, same peers count, one after the other.
// --allreduce_aggregation centered_clip makes Butterfly's reducers aggregate with CenteredClip
// (20 iterations every chunk: eps 0; τ = 100 RMS, so the N(0,1) vectors are not clipped and
// the result is still the mean that the check expects), to measure its cost against the mean.
// The averaged vector is checked against the mean of the peers' vectors (max abs error <= 1e-5;
// the exit code is 1 when it fails). Before part 2 the benchmark checks MemAvailable and halves
// --allreduce_mib until its estimate fits (it says so).
//
// Part 3 (collaborative training, bench/common/collaborative_bytes.hpp): --collaborative_peers
// peers train a Fashion-MNIST MLP on the emulated network, once with each of plain, float16 and
// 8-bit gradient averaging, PowerSGD rank 4 (target-batch-size optimizer, target 256, batch 32)
// and DiLoCo H=50; "collaborative": {config: {bytes_per_peer_per_step, bytes_per_peer_per_round,
// rounds, steps, samples, accuracy, seconds}, one_machine_accuracy, ...}.
//
// --rounds 0 skips part 1, --allreduce_peers 0 skips part 2, --collaborative_peers 0 part 3.
// The last line is one JSON object.

#include <hive/averaging/averager.hpp>
#include <hive/averaging/gloo.hpp>

#include "common/collaborative_bytes.hpp"
#include "common/machine.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace hive::bench;  // loaded_blas, load_average, machine_busy_seconds, cpu_seconds

using Clock = std::chrono::steady_clock;
using Averager = hive::averaging::DecentralizedAverager<>;
using GlooAverager = hive::averaging::DecentralizedAverager<hive::net::Tcp, hive::dht::Kademlia<>, hive::averaging::Gloo>;
using hive::averaging::StepResult;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---- flags -----------------------------------------------------------------------------------

struct Args {
  int peers = 16;
  int target_group_size = 4;
  int min_group_size = 2;
  int rounds = 5;
  int num_tensors = 4;
  std::int64_t tensor_size = std::int64_t{1} << 20;
  std::string compression = "float16";
  std::string initial_group_bits = "00";
  double matchmaking_time = 5;
  double request_timeout = 3;
  double allreduce_timeout = 60;
  std::int64_t part_size_bytes = std::int64_t{1} << 19;
  int allreduce_peers = 8;
  double allreduce_mib = 64;
  int allreduce_rounds = 3;
  std::string allreduce_strategy = "both";
  std::string allreduce_aggregation = "mean";
  double pause = 0;
  bool encrypt = true;
  int collaborative_peers = 4;
  std::int64_t collaborative_samples = 8000;
  std::uint64_t seed = 0;
};

void usage() {
  const Args d;
  fmt::print(
      "usage: benchmark_averaging [flags]\n"
      "\n"
      "Part 1, hivemind's benchmark_averaging (all peers step at once, --rounds times):\n"
      "  --peers N               averaging peers (default {})\n"
      "  --target_group_size N   a leader starts the round with this many members (default {})\n"
      "  --min_group_size N      smallest group that averages when matchmaking time ends (default {})\n"
      "  --rounds N              rounds; 0 skips part 1 (default {})\n"
      "  --num_tensors N         tensors per peer (default {})\n"
      "  --tensor_size N         floats per tensor (default {} = 1Mi; {} MiB per peer)\n"
      "  --compression C         none, float16, uniform8 or quantile8 (default {})\n"
      "  --initial_group_bits B  0/1 string shared by all peers, or 'spread' for hivemind's\n"
      "                          bits = index % 2^round(log2(peers/target)) (default {})\n"
      "  --matchmaking_time S    seconds a step looks for a group (default {})\n"
      "  --request_timeout S     extra seconds for a join request / early chunk (default {})\n"
      "  --allreduce_timeout S   bound on one all-reduce (default {})\n"
      "  --part_size_bytes N     largest chunk, bytes of float32 (default {})\n"
      "Part 2, all-reduce bandwidth (one group of all peers, no compression):\n"
      "  --allreduce_peers N     peers; 0 skips part 2 (default {})\n"
      "  --allreduce_mib M       float32 vector size per peer, MiB (default {})\n"
      "  --allreduce_rounds N    all-reduces; allreduce_s is the median (default {})\n"
      "  --allreduce_strategy S  butterfly, gloo or both (default {}; gloo's figures are gloo_allreduce_*)\n"
      "  --allreduce_aggregation A  butterfly's reducers: mean or centered_clip (20 iterations; default {})\n"
      "Part 3, bytes sent by collaborative training (emulated network, Fashion-MNIST MLP):\n"
      "  --collaborative_peers N peers of each swarm; 0 skips part 3 (default {})\n"
      "  --collaborative_samples N training images, six passes (default {})\n"
      "All:\n"
      "  --pause S               sleep between rounds, e.g. to let the previous round's DHT\n"
      "                          announcements expire (not counted in round_s; default {})\n"
      "  --seed N                seed of the random tensors (default {})\n"
      "  --encrypt 0|1           encrypted connections between the TCP peers (RpcOptions::encrypt,\n"
      "                          default {}: the library's default)\n"
      "  --help                  this text\n"
      "\n"
      "Progress goes to earlier stdout lines (and hive's logs to stderr); the last stdout line is\n"
      "one JSON object. HIVE_LOG_LEVEL=debug shows matchmaking details.\n",
      d.peers, d.target_group_size, d.min_group_size, d.rounds, d.num_tensors, d.tensor_size,
      d.num_tensors * d.tensor_size * 4 / (1 << 20), d.compression, d.initial_group_bits, d.matchmaking_time,
      d.request_timeout, d.allreduce_timeout, d.part_size_bytes, d.allreduce_peers, d.allreduce_mib,
      d.allreduce_rounds, d.allreduce_strategy, d.allreduce_aggregation, d.collaborative_peers, d.collaborative_samples, d.pause, d.seed,
      d.encrypt ? 1 : 0);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      usage();
      std::exit(0);
    }
    auto v = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument("missing value for " + k);
      return argv[++i];
    };
    if (k == "--peers") a.peers = std::stoi(v());
    else if (k == "--target_group_size") a.target_group_size = std::stoi(v());
    else if (k == "--min_group_size") a.min_group_size = std::stoi(v());
    else if (k == "--rounds") a.rounds = std::stoi(v());
    else if (k == "--num_tensors") a.num_tensors = std::stoi(v());
    else if (k == "--tensor_size") a.tensor_size = std::stoll(v());
    else if (k == "--compression") a.compression = v();
    else if (k == "--initial_group_bits") a.initial_group_bits = v();
    else if (k == "--matchmaking_time") a.matchmaking_time = std::stod(v());
    else if (k == "--request_timeout") a.request_timeout = std::stod(v());
    else if (k == "--allreduce_timeout") a.allreduce_timeout = std::stod(v());
    else if (k == "--part_size_bytes") a.part_size_bytes = std::stoll(v());
    else if (k == "--allreduce_peers") a.allreduce_peers = std::stoi(v());
    else if (k == "--allreduce_mib") a.allreduce_mib = std::stod(v());
    else if (k == "--allreduce_rounds") a.allreduce_rounds = std::stoi(v());
    else if (k == "--allreduce_strategy") a.allreduce_strategy = v();
    else if (k == "--allreduce_aggregation") a.allreduce_aggregation = v();
    else if (k == "--pause") a.pause = std::stod(v());
    else if (k == "--seed") a.seed = std::stoull(v());
    else if (k == "--encrypt") {
      const std::string e = v();
      HIVE_CHECK(e == "0" || e == "1", "--encrypt is 0 or 1, got '{}'", e);
      a.encrypt = e == "1";
    }
    else if (k == "--collaborative_peers") a.collaborative_peers = std::stoi(v());
    else if (k == "--collaborative_samples") a.collaborative_samples = std::stoll(v());
    else throw std::invalid_argument("unknown flag " + k + " (see --help)");
  }
  HIVE_CHECK(a.rounds >= 0 && a.rounds <= 1000, "--rounds must be in [0, 1000]");
  if (a.rounds > 0) {
    HIVE_CHECK(a.peers >= 2 && a.peers <= 512, "--peers must be in [2, 512]");
    HIVE_CHECK(a.target_group_size >= 2, "--target_group_size must be at least 2");
    HIVE_CHECK(a.min_group_size >= 2 && a.min_group_size <= a.target_group_size,
               "--min_group_size must be in [2, target_group_size]");
    HIVE_CHECK(a.num_tensors >= 1 && a.tensor_size >= 1, "--num_tensors and --tensor_size must be positive");
  }
  (void)hive::parse_compression(a.compression);
  if (a.initial_group_bits != "spread")
    for (char c : a.initial_group_bits)
      HIVE_CHECK(c == '0' || c == '1', "--initial_group_bits is a 0/1 string or 'spread', got '{}'", a.initial_group_bits);
  HIVE_CHECK(a.matchmaking_time > 0 && a.request_timeout > 0 && a.allreduce_timeout > 0, "timeouts must be positive");
  HIVE_CHECK(a.part_size_bytes >= 4, "--part_size_bytes must be at least 4");
  HIVE_CHECK(a.allreduce_peers == 0 || (a.allreduce_peers >= 2 && a.allreduce_peers <= 64),
             "--allreduce_peers must be 0 or in [2, 64]");
  HIVE_CHECK(a.allreduce_mib > 0, "--allreduce_mib must be positive");
  HIVE_CHECK(a.allreduce_rounds >= 1 && a.allreduce_rounds <= 100, "--allreduce_rounds must be in [1, 100]");
  HIVE_CHECK(a.allreduce_strategy == "both" || a.allreduce_strategy == "butterfly" || a.allreduce_strategy == "gloo",
             "--allreduce_strategy must be butterfly, gloo or both, got '{}'", a.allreduce_strategy);
  HIVE_CHECK(a.allreduce_aggregation == "mean" || a.allreduce_aggregation == "centered_clip",
             "--allreduce_aggregation must be mean or centered_clip, got '{}'", a.allreduce_aggregation);
  HIVE_CHECK(a.allreduce_aggregation == "mean" || a.allreduce_strategy == "butterfly",
             "--allreduce_aggregation centered_clip needs --allreduce_strategy butterfly");
  HIVE_CHECK(a.pause >= 0 && a.pause <= 600, "--pause must be in [0, 600]");
  HIVE_CHECK(a.collaborative_peers == 0 || (a.collaborative_peers >= 2 && a.collaborative_peers <= 16),
             "--collaborative_peers must be 0 or in [2, 16]");
  HIVE_CHECK(a.collaborative_samples >= 256 * a.collaborative_peers, "--collaborative_samples must be at least 256 x peers");
  return a;
}

// ---- machine -----------------------------------------------------------------------------------

double max_rss_mib() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  return static_cast<double>(r.ru_maxrss) / 1024.0;
}

// MemAvailable from /proc/meminfo, in bytes (0 when unknown).
double mem_available_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  for (std::string key; meminfo >> key;) {
    double kib = 0;
    std::string unit;
    meminfo >> kib >> unit;
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

// CPU used by other processes while a phase ran (cores), like benchmark_throughput's others_cores.
struct CpuWatch {
  Clock::time_point t0 = Clock::now();
  double busy0 = machine_busy_seconds();
  double own0 = cpu_seconds();
  [[nodiscard]] double own_cpu_s() const { return cpu_seconds() - own0; }
  [[nodiscard]] double others_cores() const {
    const double wall = since(t0);
    return wall > 0 ? std::max(0.0, (machine_busy_seconds() - busy0 - own_cpu_s()) / wall) : 0.0;
  }
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double round_to(double x, int digits) {
  const double f = std::pow(10.0, digits);
  return std::round(x * f) / f;
}

// ---- a swarm of averaging peers ----------------------------------------------------------------

template <class A = Averager>
struct Swarm {
  std::unique_ptr<hive::DHT> root;
  std::vector<std::unique_ptr<hive::DHT>> dhts;
  std::vector<std::unique_ptr<A>> averagers;
  // Steps that outlived the benchmark's bound on a round (kept so that nobody waits on them).
  std::vector<std::future<StepResult>> abandoned;
  std::vector<bool> stuck;

  Swarm() = default;
  Swarm(const Swarm&) = delete;
  Swarm& operator=(const Swarm&) = delete;
  ~Swarm() { close(); }

  // The DHT peers: a root that averages nothing, then `n` peers bootstrapped from it.
  void start_dhts(int n, bool encrypt) {
    const auto rpc = hive::net::RpcOptions().encrypt(encrypt);
    root = std::make_unique<hive::DHT>(hive::DHTOptions().listen_on("127.0.0.1:0").rpc(rpc));
    for (int i = 0; i < n; ++i)
      dhts.push_back(std::make_unique<hive::DHT>(
          hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(root->visible_addresses()).rpc(rpc)));
    stuck.assign(static_cast<std::size_t>(n), false);
  }

  // Averagers first (they must not outlive their DHT), then the DHT peers.
  void close() {
    for (auto& a : averagers) a->shutdown();
    averagers.clear();
    dhts.clear();
    root.reset();
    abandoned.clear();
  }
};

struct RoundResult {
  std::vector<StepResult> steps;
  double wall_s = 0;
  int ok = 0;
  double mean_group = 0;       // over successful steps
  std::vector<std::size_t> groups;  // sizes of the groups formed (successful or not), largest first
  double max_matchmaking_s = 0, max_allreduce_s = 0, mean_matchmaking_s = 0, mean_allreduce_s = 0;
};

// Every peer steps at once; waits for all of them, each at most `bound` after the start.
template <class A>
RoundResult run_round(Swarm<A>& swarm, hive::Seconds bound) {
  const auto n = swarm.averagers.size();
  RoundResult r;
  r.steps.resize(n);
  std::vector<std::optional<std::future<StepResult>>> futures(n);
  const auto t0 = Clock::now();
  for (std::size_t i = 0; i < n; ++i)
    if (!swarm.stuck[i]) futures[i] = swarm.averagers[i]->async_step(1.0);
  const auto deadline = t0 + std::chrono::duration_cast<Clock::duration>(bound);
  for (std::size_t i = 0; i < n; ++i) {
    if (!futures[i]) {
      r.steps[i].error = "skipped: an earlier step of this peer never returned";
      continue;
    }
    if (futures[i]->wait_until(deadline) == std::future_status::ready) {
      r.steps[i] = futures[i]->get();
    } else {
      swarm.stuck[i] = true;
      r.steps[i].error = fmt::format("the step did not return within {:.0f} s", bound.count());
      swarm.abandoned.push_back(std::move(*futures[i]));
    }
  }
  r.wall_s = since(t0);
  std::map<std::string, std::size_t> groups;
  double group_sum = 0, count = 0;
  for (const auto& s : r.steps) {
    if (!s.group_id.empty()) groups[s.group_id] = s.group_size;
    if (s.ok) {
      ++r.ok;
      group_sum += static_cast<double>(s.group_size);
    }
    if (s.ok || !s.group_id.empty() || s.matchmaking_s > 0) {
      r.max_matchmaking_s = std::max(r.max_matchmaking_s, s.matchmaking_s);
      r.max_allreduce_s = std::max(r.max_allreduce_s, s.allreduce_s);
      r.mean_matchmaking_s += s.matchmaking_s;
      r.mean_allreduce_s += s.allreduce_s;
      ++count;
    }
  }
  if (count > 0) {
    r.mean_matchmaking_s /= count;
    r.mean_allreduce_s /= count;
  }
  r.mean_group = r.ok ? group_sum / r.ok : 0;
  for (const auto& [id, size] : groups) r.groups.push_back(size);
  std::sort(r.groups.rbegin(), r.groups.rend());
  return r;
}

std::string join_sizes(const std::vector<std::size_t>& v) {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : "+") + std::to_string(x);
  return s.empty() ? "-" : s;
}

// The largest |value - mean| over every averager's tensors (mean: float64, flattened).
template <class A>
double max_deviation(Swarm<A>& swarm, const at::Tensor& mean) {
  double worst = 0;
  for (auto& a : swarm.averagers) {
    at::Tensor flat;
    {
      std::lock_guard lock(a->tensors_mutex());
      flat = hive::averaging::flatten_tensors(a->tensors());
    }
    worst = std::max(worst, (flat.to(at::kDouble) - mean).abs().max().item<double>());
  }
  return worst;
}

// Error messages of failed steps, counted (the first 12 distinct ones).
void count_errors(const RoundResult& r, int round, std::map<std::string, int>& errors) {
  for (const auto& s : r.steps) {
    if (s.ok) continue;
    auto key = fmt::format("round {}: {}", round, s.error.empty() ? "(no message)" : s.error);
    if (errors.size() < 12 || errors.contains(key)) ++errors[key];
  }
}

hive::averaging::AveragerOptions averager_options(const Args& a) {
  return hive::averaging::AveragerOptions()
      .matchmaking_time(hive::Seconds(a.matchmaking_time))
      .request_timeout(hive::Seconds(a.request_timeout))
      .allreduce_timeout(hive::Seconds(a.allreduce_timeout))
      .part_size_bytes(a.part_size_bytes);
}

// A round's bound in the benchmark: matchmaking, a join's grace, the all-reduce, and slack.
hive::Seconds round_bound(const Args& a) {
  return hive::Seconds(a.matchmaking_time + 2 * a.request_timeout + a.allreduce_timeout + 30);
}

// ---- part 1 ------------------------------------------------------------------------------------

nlohmann::json part1(const Args& a) {
  const auto compression = hive::parse_compression(a.compression);
  const int n = a.peers;
  // hivemind's assignment: num_groups = 2^round(log2(peers / target)), bits = index % num_groups.
  const int nbits = std::max(0, static_cast<int>(std::lround(std::log2(static_cast<double>(n) / a.target_group_size))));
  auto bits_of = [&](int index) -> std::string {
    if (a.initial_group_bits != "spread") return a.initial_group_bits;
    std::string b;
    for (int k = nbits; k-- > 0;) b += ((index % (1 << nbits)) >> k) & 1 ? '1' : '0';
    return b;
  };
  const double mib_per_peer = static_cast<double>(a.num_tensors) * static_cast<double>(a.tensor_size) * 4 / (1 << 20);
  fmt::print("part 1: {} peers, target group {}, min group {}, {} rounds; {} tensors x {} floats ({:.1f} MiB) per peer, "
             "compression {}, initial group bits '{}'\n",
             n, a.target_group_size, a.min_group_size, a.rounds, a.num_tensors, a.tensor_size, mib_per_peer,
             a.compression, a.initial_group_bits);
  std::fflush(stdout);

  CpuWatch cpu;
  auto t0 = Clock::now();
  Swarm<> swarm;
  swarm.start_dhts(n, a.encrypt);
  const double dht_s = since(t0);

  at::manual_seed(a.seed);
  at::Tensor sum;
  for (int i = 0; i < n; ++i) {
    std::vector<at::Tensor> tensors;
    for (int t = 0; t < a.num_tensors; ++t) tensors.push_back(at::randn({a.tensor_size}));
    auto flat = hive::averaging::flatten_tensors(tensors).to(at::kDouble);
    sum = sum.defined() ? sum.add_(flat) : flat;
    auto options = averager_options(a)
                       .prefix("bench")
                       .target_group_size(static_cast<std::size_t>(a.target_group_size))
                       .min_group_size(static_cast<std::size_t>(a.min_group_size))
                       .compression(compression)
                       .initial_group_bits(bits_of(i));
    swarm.averagers.push_back(std::make_unique<Averager>(*swarm.dhts[static_cast<std::size_t>(i)], std::move(tensors), options));
  }
  const at::Tensor mean = sum.div_(n);
  sum = at::Tensor();
  const double create_s = since(t0);
  const double dev0 = max_deviation(swarm, mean);
  fmt::print("swarm ready in {:.2f} s (DHT peers {:.2f} s); initial max |x - global mean| {:.3f}\n", create_s, dht_s, dev0);
  std::fflush(stdout);

  std::vector<double> walls, devs;
  std::vector<int> oks;
  std::vector<std::string> groups;
  std::map<std::string, int> errors;
  int successes = 0;
  double group_sum = 0, mm_sum = 0, ar_sum = 0;
  for (int round = 0; round < a.rounds; ++round) {
    if (round > 0 && a.pause > 0) std::this_thread::sleep_for(std::chrono::duration<double>(a.pause));
    auto r = run_round(swarm, round_bound(a));
    const double dev = max_deviation(swarm, mean);
    fmt::print("round {}: {}/{} ok, groups {}, mean group {:.2f}, wall {:.2f} s (matchmaking mean {:.2f} / max {:.2f} s, "
               "all-reduce mean {:.2f} / max {:.2f} s), max |x - global mean| {:.2e}\n",
               round, r.ok, n, join_sizes(r.groups), r.mean_group, r.wall_s, r.mean_matchmaking_s, r.max_matchmaking_s,
               r.mean_allreduce_s, r.max_allreduce_s, dev);
    std::fflush(stdout);
    count_errors(r, round, errors);
    walls.push_back(r.wall_s);
    devs.push_back(dev);
    oks.push_back(r.ok);
    groups.push_back(join_sizes(r.groups));
    successes += r.ok;
    group_sum += r.mean_group * r.ok;
    mm_sum += r.mean_matchmaking_s;
    ar_sum += r.mean_allreduce_s;
  }
  for (const auto& [e, count] : errors) fmt::print("  failed: {} x {}\n", count, e);
  std::vector<std::string> bits_after;
  for (auto& av : swarm.averagers) bits_after.push_back(av->group_key().substr(av->group_key().rfind(".0b") + 3));
  const double run_s = since(t0) - create_s;
  const double others = cpu.others_cores();
  const double own = cpu.own_cpu_s();
  swarm.close();

  const double total = static_cast<double>(n) * a.rounds;
  double round_s = 0;
  for (double w : walls) round_s += w;
  round_s /= std::max(1, a.rounds);
  std::map<std::string, int> bit_counts;
  for (const auto& b : bits_after) ++bit_counts[b];
  return {{"peers", n},
          {"group_size", a.target_group_size},
          {"min_group_size", a.min_group_size},
          {"rounds", a.rounds},
          {"num_tensors", a.num_tensors},
          {"tensor_size", a.tensor_size},
          {"compression", a.compression},
          {"initial_group_bits", a.initial_group_bits},
          {"matchmaking_time", a.matchmaking_time},
          {"request_timeout", a.request_timeout},
          {"pause", a.pause},
          {"success_rate", round_to(successes / total, 4)},
          {"successful_steps", successes},
          {"round_s", round_to(round_s, 3)},
          {"round_s_list", [&] {
             std::vector<double> v;
             for (double w : walls) v.push_back(round_to(w, 3));
             return v;
           }()},
          {"ok_per_round", oks},
          {"groups_per_round", groups},
          {"mean_group_size", round_to(successes ? group_sum / successes : 0, 3)},
          {"mean_matchmaking_s", round_to(mm_sum / std::max(1, a.rounds), 3)},
          {"mean_step_allreduce_s", round_to(ar_sum / std::max(1, a.rounds), 3)},
          {"max_dev_from_mean", devs.empty() ? dev0 : devs.back()},
          {"max_dev_per_round", devs},
          {"group_bits_after", bit_counts},
          {"errors", errors},
          {"swarm_create_s", round_to(create_s, 3)},
          {"part1_s", round_to(run_s, 3)},
          {"part1_cpu_s", round_to(own, 2)},
          {"part1_others_cores", round_to(others, 3)}};
}

// ---- part 2 ------------------------------------------------------------------------------------

// Part 2 with averager type A (one strategy); its figures are named `<key>_...`.
// The copy bound of part 2: the butterfly's bytes through bare loopback sockets, with no
// framing, encryption, decoding or arithmetic. Every peer sends each other peer that peer's
// part (n(n-1) messages of bytes/n), then every reducer sends its part back to each other
// peer; each message lands in a fresh buffer, as a receiver that keeps the data must. One
// connection per ordered pair, two io threads (the machine's cores). Returns the median of
// `rounds` timings.
double copy_bound_seconds(int n, std::size_t bytes, int rounds) {
  using asio::ip::tcp;
  asio::io_context io;
  const std::size_t part = bytes / static_cast<std::size_t>(n);
  std::vector<std::unique_ptr<tcp::acceptor>> acceptors;
  for (int j = 0; j < n; ++j)
    acceptors.push_back(std::make_unique<tcp::acceptor>(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)));
  std::vector<std::pair<std::unique_ptr<tcp::socket>, std::unique_ptr<tcp::socket>>> links;  // (sender end, receiver end)
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      auto from = std::make_unique<tcp::socket>(io);
      from->connect(acceptors[static_cast<std::size_t>(j)]->local_endpoint());
      auto to = std::make_unique<tcp::socket>(acceptors[static_cast<std::size_t>(j)]->accept());
      from->set_option(tcp::no_delay(true));
      to->set_option(tcp::no_delay(true));
      links.emplace_back(std::move(from), std::move(to));
    }
  const std::vector<std::byte> source(part, std::byte{1});
  std::atomic<bool> failed{false};
  std::vector<double> times;
  for (int round = 0; round < rounds; ++round) {
    const auto t0 = Clock::now();
    for (int phase = 0; phase < 2; ++phase) {  // scatter the parts, then gather the averages
      for (auto& [from, to] : links) {
        asio::async_write(*from, asio::buffer(source), [&failed](std::error_code ec, std::size_t) {
          if (ec) failed = true;
        });
        auto landing = std::shared_ptr<std::byte[]>(std::make_unique_for_overwrite<std::byte[]>(part));
        asio::async_read(*to, asio::buffer(landing.get(), part), [landing, &failed](std::error_code ec, std::size_t) {
          if (ec) failed = true;
        });
      }
      io.restart();
      std::thread helper([&] { io.run(); });
      io.run();
      helper.join();
      HIVE_CHECK(!failed, "copy bound: a loopback transfer failed");
    }
    times.push_back(since(t0));
  }
  return median(times);
}

template <class A>
nlohmann::json part2(const Args& a, bool& check_ok, const std::string& key, std::string_view strategy) {
  const int n = a.allreduce_peers;
  double mib = a.allreduce_mib;
  // Per peer: its tensor, the flattened copy, the result, and up to a vector's worth of chunks
  // in flight (CenteredClip: one more, the chunks its reducer keeps); plus the float64
  // reference mean.
  const bool clip = a.allreduce_aggregation == "centered_clip";
  auto estimate = [&](double m) { return ((clip ? 6.0 : 5.0) * n + 2.0) * m * (1 << 20); };
  const double available = mem_available_bytes();
  std::string reduced;
  while (available > 0 && estimate(mib) > 0.7 * available && mib > 1) mib /= 2;
  if (mib != a.allreduce_mib) {
    reduced = fmt::format("--allreduce_mib {} needs ~{:.1f} GiB, {:.1f} GiB available: reduced to {} MiB", a.allreduce_mib,
                          estimate(a.allreduce_mib) / (1 << 30), available / (1 << 30), mib);
    fmt::print("{}\n", reduced);
  }
  const auto elements = static_cast<std::int64_t>(std::llround(mib * (1 << 20) / 4));
  const double bytes = static_cast<double>(elements) * 4;
  fmt::print("part 2 ({}, {}): {} peers, one float32 vector of {} MiB ({} elements) each, one group of {}, compression "
             "none, {} all-reduce(s); memory estimate {:.1f} GiB of {:.1f} GiB available\n",
             strategy, a.allreduce_aggregation, n, mib, elements, n, a.allreduce_rounds, estimate(mib) / (1 << 30),
             available / (1 << 30));
  std::fflush(stdout);

  CpuWatch cpu;
  Swarm<A> swarm;
  swarm.start_dhts(n, a.encrypt);
  at::manual_seed(a.seed + 1);
  at::Tensor mean = at::zeros({elements}, at::kDouble);
  for (int i = 0; i < n; ++i) {
    std::vector<at::Tensor> tensors{at::randn({elements})};
    mean.add_(tensors[0].to(at::kDouble));
    auto options = averager_options(a)
                       .prefix("bench_" + key)
                       .target_group_size(static_cast<std::size_t>(n))
                       .min_group_size(2)
                       .compression(hive::Compression::none);
    if (clip)
      options.aggregation(hive::averaging::AggregationOptions()
                              .method(hive::averaging::Aggregation::centered_clip)
                              .tau(100)
                              .max_iterations(20)
                              .eps(0));
    swarm.averagers.push_back(std::make_unique<A>(*swarm.dhts[static_cast<std::size_t>(i)], std::move(tensors), options));
  }
  mean.div_(n);

  std::vector<double> ar, walls, mms, errs;
  std::vector<std::string> groups;
  std::map<std::string, int> errors;
  int ok_steps = 0;
  for (int round = 0; round < a.allreduce_rounds; ++round) {
    if (round > 0 && a.pause > 0) std::this_thread::sleep_for(std::chrono::duration<double>(a.pause));
    auto r = run_round(swarm, round_bound(a));
    const double err = max_deviation(swarm, mean);
    fmt::print("all-reduce {}: {}/{} ok, groups {}, all-reduce {:.3f} s (max over peers; min {:.3f}), matchmaking max "
               "{:.3f} s, wall {:.3f} s, {:.2f} Gbit/s algorithmic; max |x - mean| {:.2e}\n",
               round, r.ok, n, join_sizes(r.groups), r.max_allreduce_s,
               [&] {
                 double m = r.max_allreduce_s;
                 for (const auto& s : r.steps)
                   if (s.ok) m = std::min(m, s.allreduce_s);
                 return m;
               }(),
               r.max_matchmaking_s, r.wall_s, r.max_allreduce_s > 0 ? bytes * 8 / r.max_allreduce_s / 1e9 : 0.0, err);
    std::fflush(stdout);
    count_errors(r, round, errors);
    ok_steps += r.ok;
    groups.push_back(join_sizes(r.groups));
    errs.push_back(err);
    walls.push_back(r.wall_s);
    mms.push_back(r.max_matchmaking_s);
    // Only a round where every peer averaged with every other measures the full all-reduce.
    if (r.ok == n && r.groups.size() == 1) ar.push_back(r.max_allreduce_s);
  }
  for (const auto& [e, count] : errors) fmt::print("  failed: {} x {}\n", count, e);
  const double others = cpu.others_cores();
  const double own = cpu.own_cpu_s();
  swarm.close();

  // The same bytes through bare sockets, measured right after, on the same machine state.
  const double bound_s = copy_bound_seconds(n, static_cast<std::size_t>(bytes), 3);
  fmt::print("copy bound: the same bytes through bare loopback sockets take {:.3f} s\n", bound_s);
  const double max_err = errs.empty() ? 0 : *std::max_element(errs.begin(), errs.end());
  check_ok = ok_steps == n * a.allreduce_rounds && max_err <= 1e-5;
  const double allreduce_s = median(ar);
  const double gbps = allreduce_s > 0 ? bytes * 8 / allreduce_s / 1e9 : 0;
  std::vector<double> ar_rounded;
  for (double x : ar) ar_rounded.push_back(round_to(x, 4));
  auto name = [&](std::string_view suffix) { return key + std::string(suffix); };
  nlohmann::json out = {{name("_peers"), n},
                        {name("_aggregation"), a.allreduce_aggregation},
                        {name("_mib"), mib},
                        {name("_rounds"), a.allreduce_rounds},
                        {name("_s"), round_to(allreduce_s, 4)},
                        {name("_s_rounds"), ar_rounded},
                        {name("_wall_s"), round_to(median(walls), 4)},
                        {name("_matchmaking_s"), round_to(median(mms), 4)},
                        {name("_gbps"), round_to(gbps, 3)},
                        {name("_bus_gbps"), round_to(gbps * 2.0 * (n - 1) / n, 3)},
                        {name("_copy_bound_s"), round_to(bound_s, 4)},
                        {name("_ratio_to_bound"), bound_s > 0 ? round_to(allreduce_s / bound_s, 3) : 0.0},
                        {name("_ok_steps"), ok_steps},
                        {name("_groups"), groups},
                        {name("_max_abs_err"), max_err},
                        {name("_check_ok"), check_ok},
                        {name("_errors"), errors},
                        {key == "allreduce" ? "part2_cpu_s" : name("_cpu_s"), round_to(own, 2)},
                        {key == "allreduce" ? "part2_others_cores" : name("_others_cores"), round_to(others, 3)}};
  if (!reduced.empty()) out[name("_mib_note")] = reduced;
  // Gloo's data travels over its own connections, which hive does not encrypt.
  if (strategy == "butterfly") out[name("_encrypted")] = a.encrypt;
  return out;
}

}  // namespace

int main(int argc, char** argv) try {
  const Args a = parse(argc, argv);
  const auto t0 = Clock::now();
  const double load_start = load_average();
  const std::string blas = loaded_blas();
  fmt::print("benchmark_averaging: blas {}; torch threads {}; load average {:.2f}\n", blas, at::get_num_threads(),
             load_start);
  std::fflush(stdout);

  nlohmann::json out = {{"bench", "averaging"}};
  if (a.rounds > 0) out.update(part1(a));
  bool check_ok = true;
  if (a.allreduce_peers > 0 && a.allreduce_strategy != "gloo") {
    bool ok = true;
    out.update(part2<Averager>(a, ok, "allreduce", "butterfly"));
    check_ok = check_ok && ok;
  }
  if (a.allreduce_peers > 0 && a.allreduce_strategy != "butterfly") {
    bool ok = true;
    out.update(part2<GlooAverager>(a, ok, "gloo_allreduce", "gloo"));
    check_ok = check_ok && ok;
  }
  if (a.collaborative_peers > 0) {
    hive::bench::CollaborativeBytesArgs c;
    c.peers = a.collaborative_peers;
    c.train_samples = a.collaborative_samples;
    out["collaborative"] = hive::bench::collaborative_part(c);
  }
  out["blas"] = blas;
  out["torch_threads"] = at::get_num_threads();
  out["load_avg_start"] = load_start;
  out["load_avg_end"] = load_average();
  out["max_rss_mib"] = round_to(max_rss_mib(), 1);
  out["total_s"] = round_to(since(t0), 3);
  fmt::print("{}\n", out.dump());
  std::fflush(stdout);
  return check_ok ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "benchmark_averaging: {}\n", e.what());
  return 2;
}
