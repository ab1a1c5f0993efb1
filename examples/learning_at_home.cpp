// The convergence experiment of Learning@home (Ryabinin & Gusev, NeurIPS 2020) on hive's
// emulator: the README's grid of setups (a large FFN against DMoE layers of 64, 256 or 4096
// experts, at 100 ms and 1000 ms delays, with and without 10% failed requests), trained on
// Fashion-MNIST by many trainers with the expert servers in this process, all on one
// net::SimNetwork. One CSV per run, one PNG per delay (gnuplot), a summary table.
//
//   learning_at_home                       # the reduced default grid (11 minutes on 2 cores)
//   learning_at_home --list                # the eleven setups
//   learning_at_home --setup "1000ms 64 experts" --seeds 1337,1338,1339,1340,1341
//   learning_at_home --full                # the README's grid at the paper's sizes (memory permitting)
//   learning_at_home --measure_emulator    # emulated calls per second of wall time

#include "common/cli.hpp"
#include "common/fashion_mnist.hpp"
#include "common/learning_at_home.hpp"
#include "common/models.hpp"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>

namespace {

namespace lah = hive::examples::lah;

constexpr const char* usage = R"(usage: learning_at_home [options]

Runs rows of the Learning@home convergence grid on the emulated network and writes, under
--out, one CSV per run (<setup>_seed<seed>.csv), one PNG per delay (accuracy_<delay>ms.png)
and a summary table.

  --list                 print the setups and exit
  --setup NAMES          setups by name or slug, comma-separated ("1000ms 64 experts" or
                         1000ms-64-experts); default: 100ms-large-ffn, 100ms-64-experts,
                         1000ms-large-ffn, 1000ms-64-experts, 10pct-failure-64-experts
  --full                 every setup, seeds 1337..1341, --hidden_dim 512, every trainer,
                         --duration 1200 (set flags after it to change one)
  --seeds S,S            seeds (default 1337,1338)
  --max_trainers N       at most N trainers per setup; 0: the setup's count (default 16)
  --hidden_dim D         DMoE width d; the FFN is 2d wide (default 128; the paper's 512)
  --duration S           training seconds per run, wall clock (default 60)
  --eval_interval S      seconds between evaluations (default 5)
  --eval_samples N       test images per evaluation (default 1000)
  --latency NAME         per-frame delay: exponential (default), uniform, fixed, normal
  --servers N            expert servers (default 4)
  --k_best K             experts per sample and layer (default 4)
  --timeout_after_k_min S  how long a layer waits for more experts once one answered for
                         every sample (default 1, the library's)
  --target_accuracy P    the summary's "time to P%" (default 70)
  --memory_limit_gb G    refuse a run estimated above G GiB (default: half the free memory)
  --out DIR              output directory (default learning_at_home)
  --no_plot              CSVs and table only
  --measure_emulator     measure emulated calls per second and exit
)";

struct Flags {
  std::vector<lah::Setup> setups;
  std::vector<std::uint64_t> seeds{1337, 1338};
  int max_trainers = 16, servers = 4, k_best = 4;
  std::int64_t hidden_dim = 128, eval_samples = 1000;
  double duration = 60, eval_interval = 5, target = 70, memory_limit_gb = 0, timeout_after_k_min = 1;
  hive::net::LatencyDistribution latency = hive::net::LatencyDistribution::exponential;
  std::string out = "learning_at_home";
  bool plot = true, list = false, measure = false;
};

Flags parse(int argc, char** argv) {
  Flags f;
  for (const char* name : {"100ms large ffn", "100ms 64 experts", "1000ms large ffn", "1000ms 64 experts",
                           "10% failure 64 experts"})
    f.setups.push_back(lah::find_setup(name));
  for (int i = 1; i < argc; ++i) {
    const std::string flag = hive::examples::flag_name(argv[i]);
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw hive::InvalidArgument(fmt::format("{} needs a value (see --help)", flag));
      return argv[++i];
    };
    if (flag == "--help") {
      std::cout << usage;
      std::exit(0);
    } else if (flag == "--list") f.list = true;
    else if (flag == "--measure_emulator") f.measure = true;
    else if (flag == "--setup") {
      f.setups.clear();
      for (const auto& name : hive::examples::split_commas(value())) f.setups.push_back(lah::find_setup(name));
      HIVE_CHECK(!f.setups.empty(), "--setup needs at least one name");
    } else if (flag == "--full") {
      f.setups = lah::setups();
      f.seeds = {1337, 1338, 1339, 1340, 1341};
      f.hidden_dim = 512;
      f.max_trainers = 0;
      f.duration = 1200;
    } else if (flag == "--seeds") {
      f.seeds.clear();
      for (const auto& s : hive::examples::split_commas(value())) f.seeds.push_back(std::stoull(s));
      HIVE_CHECK(!f.seeds.empty(), "--seeds needs at least one seed");
    } else if (flag == "--max_trainers") f.max_trainers = std::stoi(value());
    else if (flag == "--hidden_dim") f.hidden_dim = std::stoll(value());
    else if (flag == "--duration") f.duration = std::stod(value());
    else if (flag == "--eval_interval") f.eval_interval = std::stod(value());
    else if (flag == "--eval_samples") f.eval_samples = std::stoll(value());
    else if (flag == "--latency") f.latency = hive::net::parse_latency_distribution(value());
    else if (flag == "--servers") f.servers = std::stoi(value());
    else if (flag == "--k_best") f.k_best = std::stoi(value());
    else if (flag == "--timeout_after_k_min") f.timeout_after_k_min = std::stod(value());
    else if (flag == "--target_accuracy") f.target = std::stod(value());
    else if (flag == "--memory_limit_gb") f.memory_limit_gb = std::stod(value());
    else if (flag == "--out") f.out = value();
    else if (flag == "--no_plot") f.plot = false;
    else throw hive::InvalidArgument(fmt::format("unknown flag '{}' (see --help)", flag));
  }
  HIVE_CHECK(f.memory_limit_gb >= 0, "--memory_limit_gb must be >= 0");
  return f;
}

lah::RunOptions options_for(const Flags& f, const lah::Setup& setup, std::uint64_t seed) {
  return lah::RunOptions()
      .setup(setup)
      .seed(seed)
      .max_trainers(f.max_trainers)
      .hidden_dim(f.hidden_dim)
      .servers(f.servers)
      .k_best(f.k_best)
      .timeout_after_k_min(hive::Seconds(f.timeout_after_k_min))
      .latency(f.latency)
      .duration(hive::Seconds(f.duration))
      .eval_interval(hive::Seconds(f.eval_interval))
      .eval_samples(f.eval_samples);
}

bool have_program(const std::string& name) { return std::system(("command -v " + name + " >/dev/null 2>&1").c_str()) == 0; }

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}
double stddev(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

struct Run {
  lah::Setup setup;
  std::uint64_t seed;
  lah::RunResult result;
};

// Per setup, the accuracy curve averaged over seeds point by point (every run evaluates on the
// same schedule), with its lowest and highest seed: "time mean low high".
std::filesystem::path write_band(const std::filesystem::path& dir, const lah::Setup& setup, const std::vector<Run>& runs) {
  std::vector<const Run*> mine;
  for (const auto& r : runs)
    if (r.setup.name == setup.name && !r.result.points.empty()) mine.push_back(&r);
  auto path = dir / (lah::slug(setup.name) + "_band.dat");
  std::ofstream out(path);
  if (mine.empty()) return path;
  std::size_t n = mine.front()->result.points.size();
  for (const auto* r : mine) n = std::min(n, r->result.points.size());
  for (std::size_t i = 0; i < n; ++i) {
    std::vector<double> t, a;
    for (const auto* r : mine) {
      t.push_back(r->result.points[i].time_s);
      a.push_back(r->result.points[i].accuracy);
    }
    out << fmt::format("{:.2f} {:.3f} {:.3f} {:.3f}\n", mean(t), mean(a), *std::min_element(a.begin(), a.end()),
                       *std::max_element(a.begin(), a.end()));
  }
  return path;
}

// Figure 4 of the paper for one delay: accuracy against training time, one curve per setup
// (mean over seeds), the spread over seeds shaded.
void plot(const std::filesystem::path& dir, double delay_ms, const std::vector<lah::Setup>& setups, const std::vector<Run>& runs,
          const Flags& f) {
  const auto png = dir / fmt::format("accuracy_{:.0f}ms.png", delay_ms);
  const auto script = dir / fmt::format("accuracy_{:.0f}ms.gp", delay_ms);
  std::ofstream gp(script);
  gp << "set terminal pngcairo size 900,560 noenhanced\nset output '" << png.string() << "'\n"
     << fmt::format("set title 'Learning@home on hive: Fashion-MNIST, {:.0f} ms delay, seeds {}, d={}'\n", delay_ms,
                    f.seeds.size(), f.hidden_dim)
     << "set xlabel 'training time (s, wall clock)'\nset ylabel 'test accuracy (%)'\nset yrange [0:100]\n"
     << "set key bottom right\nset grid\nset style fill transparent solid 0.2 noborder\n";
  std::string cmd = "plot ";
  int color = 1;
  for (const auto& s : setups) {
    const auto band = write_band(dir, s, runs);
    cmd += fmt::format("{}'{}' using 1:3:4 with filledcurves linecolor {} notitle, '{}' using 1:2 with lines linewidth 2 "
                       "linecolor {} title '{}'",
                       cmd == "plot " ? "" : ", ", band.string(), color, band.string(), color, s.name);
    ++color;
  }
  gp << cmd << "\n";
  gp.close();
  if (std::system(("gnuplot " + script.string()).c_str()) == 0) fmt::print("wrote {}\n", png.string());
  else fmt::print("gnuplot failed; the data is in {}\n", dir.string());
}

}  // namespace

int main(int argc, char** argv) try {
  const auto f = parse(argc, argv);
  if (f.list) {
    fmt::print("| setup | slug | experts per layer | trainers | batch | delay ms | failures |\n");
    for (const auto& s : lah::setups())
      fmt::print("| {} | {} | {} | {} | {} | {:.0f} | {:.0f}% |\n", s.name, lah::slug(s.name),
                 s.is_ffn() ? std::string("- (large ffn)") : std::to_string(s.experts_per_layer), s.trainers, s.batch_size,
                 s.delay_ms, 100 * s.failure);
    return 0;
  }
  hive::examples::limit_blas_threads(1);
  at::set_num_threads(1);
  if (!std::getenv("HIVE_LOG_LEVEL")) hive::log::set_level(hive::log::Level::error);
  if (f.measure) {
    // Enough callers that the delay does not bound the rate: a caller makes at most one call
    // per round trip.
    for (auto [one_way, callers] : {std::pair{0.0, 2000}, std::pair{0.05, 4000}, std::pair{0.5, 20000}}) {
      const double rate = lah::measure_emulator(callers, 16, hive::Seconds(one_way), hive::Seconds(5));
      fmt::print("emulator: {:.0f} calls/s with {} callers, 16 servers, {:.0f} ms one-way ({} cores)\n", rate, callers,
                 one_way * 1000, std::thread::hardware_concurrency());
    }
    return 0;
  }

  // Everything is checked before any run starts.
  const double bound = f.memory_limit_gb > 0 ? f.memory_limit_gb * (1 << 30) : 0;
  for (const auto& s : f.setups)
    for (auto seed : f.seeds) lah::check_run(options_for(f, s, seed), bound);
  HIVE_CHECK(!f.plot || have_program("gnuplot"),
             "gnuplot is not installed (bash scripts/setup.sh gnuplot-nox), or pass --no_plot");

  const std::filesystem::path dir(f.out);
  std::filesystem::create_directories(dir);
  fmt::print("Fashion-MNIST from {} (MNIST, the paper's data set, is not packaged in Debian)\n",
             hive::examples::fashion_mnist_dir);
  auto train = hive::examples::load_fashion_mnist(true);
  auto test = hive::examples::load_fashion_mnist(false);
  const bool tty = isatty(STDOUT_FILENO);
  const std::size_t total_runs = f.setups.size() * f.seeds.size();
  const double total_seconds = static_cast<double>(total_runs) * f.duration;
  const auto started = std::chrono::steady_clock::now();
  std::vector<Run> runs;
  int last_percent = -5;
  for (const auto& s : f.setups) {
    for (auto seed : f.seeds) {
      const auto options = options_for(f, s, seed);
      const std::size_t index = runs.size();
      const int trainers = f.max_trainers > 0 ? std::min(f.max_trainers, s.trainers) : s.trainers;
      fmt::print("[{}/{}] {} (seed {}, {} trainers, batch {}, about {:.2f} GiB)\n", index + 1, total_runs, s.name,
                 seed, trainers, s.batch_size, lah::estimate_memory(options).total() / (1 << 30));
      auto on_point = [&](const lah::Point& p) {
        const double done = (static_cast<double>(index) * f.duration + std::min(p.time_s, f.duration)) / total_seconds;
        const int percent = static_cast<int>(100 * done);
        if (tty) {
          const int filled = static_cast<int>(30 * done);
          fmt::print("\r  [{}{}] {:3d}%  t={:5.1f}s  samples={:6d}  loss={:.3f}  accuracy={:5.1f}%  failed={}   ",
                     std::string(static_cast<std::size_t>(filled), '#'), std::string(static_cast<std::size_t>(30 - filled), '.'),
                     percent, p.time_s, p.samples, p.loss, p.accuracy, p.failed_requests);
          std::fflush(stdout);
        } else if (percent / 5 > last_percent / 5) {
          fmt::print("  {:3d}%  t={:.1f}s samples={} loss={:.3f} accuracy={:.1f}% failed={}\n", percent, p.time_s, p.samples,
                     p.loss, p.accuracy, p.failed_requests);
          std::fflush(stdout);
        }
        last_percent = std::max(last_percent, percent);
      };
      auto result = lah::run(options, train, test, on_point);
      if (tty) fmt::print("\n");
      const auto csv_path = dir / fmt::format("{}_seed{}.csv", lah::slug(s.name), seed);
      std::ofstream csv(csv_path);
      csv << "time_s,samples,loss,accuracy,failed_requests\n";
      for (const auto& p : result.points)
        csv << fmt::format("{:.3f},{},{:.5f},{:.3f},{}\n", p.time_s, p.samples, p.loss, p.accuracy, p.failed_requests);
      fmt::print("  final accuracy {:.1f}% after {} samples ({} steps, {} abandoned), {} of {} expert requests failed; "
                 "{:.0f} s wall; wrote {}\n",
                 result.points.empty() ? 0.0 : result.points.back().accuracy,
                 result.points.empty() ? 0 : result.points.back().samples, result.steps, result.failed_steps,
                 result.failed_requests, result.requests, result.wall_seconds, csv_path.string());
      runs.push_back({s, seed, std::move(result)});
    }
  }

  fmt::print("\n== summary (Fashion-MNIST, d={}, at most {} trainers, {:.0f} s per run, {} latency; {:.0f} s wall in all)\n",
             f.hidden_dim, f.max_trainers > 0 ? std::to_string(f.max_trainers) : std::string("all"), f.duration,
             hive::net::to_string(f.latency), std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  fmt::print("| setup | seeds | final accuracy | time to {:.0f}% | samples | failed requests |\n", f.target);
  fmt::print("| --- | --- | --- | --- | --- | --- |\n");
  std::map<double, std::vector<lah::Setup>> by_delay;
  for (const auto& s : f.setups) {
    by_delay[s.delay_ms].push_back(s);
    std::vector<double> acc, reach, samples;
    std::uint64_t failed = 0, requests = 0;
    for (const auto& r : runs) {
      if (r.setup.name != s.name || r.result.points.empty()) continue;
      acc.push_back(r.result.points.back().accuracy);
      samples.push_back(static_cast<double>(r.result.points.back().samples));
      if (r.result.time_to(f.target) >= 0) reach.push_back(r.result.time_to(f.target));
      failed += r.result.failed_requests;
      requests += r.result.requests;
    }
    const std::string reached = reach.empty() ? std::string("not reached")
                                              : fmt::format("{:.0f} s ({} of {} seeds)", mean(reach), reach.size(), acc.size());
    fmt::print("| {} | {} | {:.1f} ± {:.1f}% | {} | {:.0f} | {} ({:.1f}%) |\n", s.name, acc.size(), mean(acc), stddev(acc),
               reached, mean(samples), failed, requests ? 100.0 * static_cast<double>(failed) / static_cast<double>(requests) : 0.0);
  }
  if (f.plot)
    for (const auto& [delay, setups] : by_delay) plot(dir, delay, setups, runs, f);
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "learning_at_home: {}\n", e.what());
  return 2;
}
