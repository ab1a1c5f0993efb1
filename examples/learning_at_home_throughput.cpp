// learning_at_home_throughput: the throughput experiment of Learning@home (the testbed's
// throughput_client.py and baseline_throughput.py). Trainers push batches through L layers of
// experts spread over several servers (DMoE: many trainers at once, each calling every layer's
// expert), against a model-parallel pipeline over the same layers (one batch at a time, passed
// from server to server), as the one-way per-hop latency grows. Prints a line per latency,
// writes throughput.csv and throughput.png (gnuplot), and ends with one JSON line.
//
//   learning_at_home_throughput                                   # emulator, in this process
//   learning_at_home_throughput --hosts 10.0.0.1:1337,10.0.0.2:1337 # real hive-servers over TCP
//
// examples/common/lah_throughput.hpp holds the experiment (and says what a hop costs in each
// mode); docs/learning-at-home-throughput.md shows how to run it and what it measured.

#include "common/lah_throughput.hpp"
#include "common/models.hpp"

#include <hive/core/log.hpp>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>

namespace {

namespace lah = hive::examples::lah_throughput;

constexpr const char* usage = R"(usage: learning_at_home_throughput [options]

Learning@home's throughput experiment. Trainers push batches through L = servers x
layers_per_server layers of experts (layer l on server l mod S, as the testbed interleaves them):

  dmoe      --trainers concurrent trainers, each calling every layer's expert (2 hops per layer)
  pipeline  model parallelism: one batch at a time passed from server to server (1 hop per layer)

for each one-way per-hop latency of --latencies, forward and backward (each backward trains the
expert on its server). Reports samples/s of each; writes OUT/throughput.csv and OUT/throughput.png.

where the servers are:
  (default)                  emulated in this process on net::Simulated: the latency is the network's
  --hosts A:P,B:P,...        hive-servers over TCP, one per host, each serving every expert of the model:
                               hive-server --expert_cls ffn --hidden_dim 512 --expert_pattern 'expert.[0:8].[0:1]'
                             (L layers x E experts per layer); the latency is slept by the trainers after
                             each layer and on the way back, as the testbed's clients did
  --servers S                emulated servers (default 4; with --hosts, the number of hosts)

the model:
  --layers_per_server N      layers on each server (the testbed's --layers-per-gpu; default 2)
  --layers L                 or the model's layers, a multiple of the servers
  --experts_per_layer E      experts per layer; a DMoE trainer picks one at random per layer and batch,
                             the pipeline uses expert 0 (default 1, as the testbed)
  --block TYPE               ffn, transformer or nop (default ffn; also --block_type)
  --hidden_dim H             width of every block (default 512)

the measurement:
  --trainers J               concurrent DMoE trainers (default 32; also -j, --jobs)
  --batch_size B             rows per batch (default 16)
  --batches N                measured batches per trainer and of the pipeline, after one warm-up
                             batch each (default 4)
  --runs R                   measurements per latency and mode; the mean is reported (default 1)
  --latencies MS,MS,...      one-way per-hop latencies in ms (default 0,10,50,100,200)
  --forward_only             no backward pass (the testbed measured forward passes only)
  --timeout SECONDS          longest one measurement may take; it is then reported incomplete (default 600)
  --seed N                   seed of the inputs, the experts and the expert choices (default 0)

output:
  --out DIR                  where throughput.csv and throughput.png go (default lah_throughput)
  --no_plot                  write the CSV only (the plot needs gnuplot: bash scripts/setup.sh gnuplot-nox)
  --help                     this text

Flags may also be spelled with dashes (--hidden-dim).
)";

/// The 1-minute load average (the machine may be shared: other work slows both modes).
double load_average() {
  std::ifstream in("/proc/loadavg");
  double v = 0;
  in >> v;
  return v;
}

bool have_program(const std::string& name) {
  return std::system(("command -v " + name + " >/dev/null 2>&1").c_str()) == 0;
}

/// The mean of each mode's runs at one latency.
struct Row {
  double latency_ms = 0;
  std::map<lah::Mode, std::vector<lah::Measurement>> runs;

  [[nodiscard]] double mean(lah::Mode mode, double lah::Measurement::*field) const {
    const auto& all = runs.at(mode);
    double sum = 0;
    for (const auto& m : all) sum += m.*field;
    return sum / static_cast<double>(all.size());
  }
  [[nodiscard]] double min(lah::Mode mode) const {
    double v = runs.at(mode).front().samples_per_s;
    for (const auto& m : runs.at(mode)) v = std::min(v, m.samples_per_s);
    return v;
  }
  [[nodiscard]] double max(lah::Mode mode) const {
    double v = runs.at(mode).front().samples_per_s;
    for (const auto& m : runs.at(mode)) v = std::max(v, m.samples_per_s);
    return v;
  }
  [[nodiscard]] double ratio() const {
    const double pipe = mean(lah::Mode::pipeline, &lah::Measurement::samples_per_s);
    return pipe > 0 ? mean(lah::Mode::dmoe, &lah::Measurement::samples_per_s) / pipe : 0.0;
  }
  [[nodiscard]] bool complete(lah::Mode mode) const {
    for (const auto& m : runs.at(mode))
      if (!m.complete) return false;
    return true;
  }
};

// Samples/s against latency, one line per mode, the runs' spread as error bars (log scale:
// the two differ by an order of magnitude).
void plot(const std::filesystem::path& csv, const std::filesystem::path& png, const std::string& title) {
  const auto script = png.parent_path() / "throughput.gp";
  std::ofstream gp(script);
  gp << "set terminal pngcairo size 1000,650 noenhanced\nset output '" << png.string() << "'\n"
     << "set datafile separator ','\nset key top right\nset grid\n"
     << "set title \"" << title << "\"\n"
     << "set xlabel 'one-way latency per hop (ms)'\nset ylabel 'samples/s (log scale)'\nset logscale y\n"
     << "set autoscale xfix\nset offsets graph 0.03, graph 0.03, 0, 0\n"
     << "plot '" << csv.string() << "' using 1:2:3:4 skip 1 with yerrorlines linewidth 2 pointtype 7 "
     << "title 'DMoE (concurrent trainers)', '" << csv.string()
     << "' using 1:9:10:11 skip 1 with yerrorlines linewidth 2 pointtype 5 title 'model-parallel pipeline'\n";
  gp.close();
  if (std::system(("gnuplot " + script.string()).c_str()) == 0) fmt::print("wrote {}\n", png.string());
  else fmt::print("gnuplot failed; the data is in {}\n", csv.string());
}

}  // namespace

int main(int argc, char** argv) try {
  const auto flags = lah::parse_flags(std::vector<std::string>(argv + 1, argv + argc));
  if (flags.help) {
    std::cout << usage;
    return 0;
  }
  const auto& c = flags.config;
  // Each emulated server computes on one thread, as one "GPU" each; they share the cores.
  hive::examples::limit_blas_threads(1);
  at::set_num_threads(1);
  if (!std::getenv("HIVE_LOG_LEVEL")) hive::log::set_level(hive::log::Level::warn);

  const std::string where =
      c.emulated() ? fmt::format("{} servers emulated in this process (net::Simulated)", c.servers)
                   : fmt::format("{} hive-servers over TCP: {}", c.servers, fmt::join(c.hosts, ", "));
  const double load_at_start = load_average();
  fmt::print("learning_at_home_throughput: {}; load average {:.2f}\n", where, load_at_start);
  fmt::print("model: {} layers of {} blocks (h={}), {} per server, {} expert(s) per layer ({} experts per server); "
             "batches of {} rows, {}\n",
             c.layers(), c.block, c.hidden_dim, c.layers_per_server, c.experts_per_layer, c.experts_per_server(),
             c.batch_size, c.backward ? "forward+backward" : "forward only");
  fmt::print("dmoe: {} trainers x {} batches; pipeline: 1 x {} batches; {} run(s) per point; latencies {} ms\n",
             c.trainers, c.batches, c.batches, c.runs, fmt::join(c.latencies_ms, ", "));
  if (!c.emulated())
    fmt::print("each host must serve {0} (hive-server --expert_pattern '{0}')\n", lah::uid_pattern(c));
  std::fflush(stdout);

  std::shared_ptr<hive::moe::ExpertClient> tcp_client;
  if (!c.emulated()) tcp_client = std::make_shared<hive::moe::Client<hive::net::Tcp>>();

  // Runs sweep every latency in turn, so that a change of the machine's load spreads over all
  // of them instead of weighing on one.
  std::vector<Row> rows(c.latencies_ms.size());
  std::uint64_t point = 0;
  const auto started = std::chrono::steady_clock::now();
  for (int r = 0; r < c.runs; ++r)
    for (std::size_t i = 0; i < c.latencies_ms.size(); ++i) {
      const double ms = c.latencies_ms[i];
      Row& row = rows[i];
      row.latency_ms = ms;
      std::map<lah::Mode, lah::Measurement> now;
      for (auto mode : {lah::Mode::dmoe, lah::Mode::pipeline}) {
        now[mode] = lah::measure_point(c, mode, ms, tcp_client, c.seed * 7919 + point++);
        row.runs[mode].push_back(now[mode]);
      }
      const auto latency = hive::Seconds(ms / 1000);
      auto describe = [&](lah::Mode mode) {
        const auto& m = now[mode];
        return fmt::format("{} {:8.1f} samples/s (batch {:.3f} s, floor {:.3f} s){}", lah::mode_name(mode),
                           m.samples_per_s, m.batch_s, lah::latency_floor(c, mode, latency).count(),
                           m.complete ? "" : " INCOMPLETE");
      };
      const double pipe = now[lah::Mode::pipeline].samples_per_s;
      fmt::print("{}latency {:>6.1f} ms: {}, {}; dmoe/pipeline {:.2f}x\n",
                 c.runs > 1 ? fmt::format("run {}/{}, ", r + 1, c.runs) : "", ms, describe(lah::Mode::dmoe),
                 describe(lah::Mode::pipeline), pipe > 0 ? now[lah::Mode::dmoe].samples_per_s / pipe : 0.0);
      std::fflush(stdout);
    }
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::filesystem::create_directories(flags.out);
  const auto csv_path = std::filesystem::path(flags.out) / "throughput.csv";
  {
    // One row per latency, each mode's columns side by side (what the plot reads).
    std::ofstream csv(csv_path);
    csv << "latency_ms";
    for (const char* m : {"dmoe", "pipeline"})
      csv << fmt::format(",{0}_samples_per_s,{0}_min,{0}_max,{0}_batch_s,{0}_floor_s,{0}_streams,{0}_complete", m);
    csv << ",dmoe_over_pipeline,runs\n";
    for (const auto& row : rows) {
      csv << fmt::format("{:g}", row.latency_ms);
      for (auto mode : {lah::Mode::dmoe, lah::Mode::pipeline})
        csv << fmt::format(",{:.3f},{:.3f},{:.3f},{:.4f},{:.4f},{},{}",
                           row.mean(mode, &lah::Measurement::samples_per_s), row.min(mode), row.max(mode),
                           row.mean(mode, &lah::Measurement::batch_s),
                           lah::latency_floor(c, mode, hive::Seconds(row.latency_ms / 1000)).count(),
                           row.runs.at(mode).front().streams, row.complete(mode) ? 1 : 0);
      csv << fmt::format(",{:.3f},{}\n", row.ratio(), c.runs);
    }
  }

  fmt::print("\n| latency (ms) | DMoE samples/s | pipeline samples/s | DMoE / pipeline |\n| --- | --- | --- | --- |\n");
  for (const auto& row : rows)
    fmt::print("| {:g} | {:.1f} | {:.1f} | {:.2f} |\n", row.latency_ms,
               row.mean(lah::Mode::dmoe, &lah::Measurement::samples_per_s),
               row.mean(lah::Mode::pipeline, &lah::Measurement::samples_per_s), row.ratio());
  fmt::print("wrote {}\n", csv_path.string());
  if (flags.plot) {
    if (have_program("gnuplot"))
      plot(csv_path, std::filesystem::path(flags.out) / "throughput.png",
           fmt::format("Learning@home throughput: {} layers of {} (h={}) on {} {} servers\\n"
                       "{} DMoE trainers, batches of {}{}",
                       c.layers(), c.block, c.hidden_dim, c.servers, c.emulated() ? "emulated" : "TCP", c.trainers,
                       c.batch_size, c.backward ? ", fwd+bwd" : ", forward only"));
    else
      fmt::print("gnuplot is not installed (bash scripts/setup.sh gnuplot-nox): no plot\n");
  }

  nlohmann::ordered_json samples_per_s = {{"dmoe", nlohmann::ordered_json::object()},
                                          {"pipeline", nlohmann::ordered_json::object()}};
  bool complete = true;
  for (const auto& row : rows)
    for (auto mode : {lah::Mode::dmoe, lah::Mode::pipeline}) {
      samples_per_s[lah::mode_name(mode)][fmt::format("{:g}", row.latency_ms)] =
          row.mean(mode, &lah::Measurement::samples_per_s);
      complete = complete && row.complete(mode);
    }
  const nlohmann::ordered_json summary = {{"bench", "learning_at_home_throughput"},
                                  {"network", c.emulated() ? "emulated" : "tcp"},
                                  {"servers", c.servers},
                                  {"layers", c.layers()},
                                  {"experts_per_layer", c.experts_per_layer},
                                  {"block", c.block},
                                  {"hidden_dim", c.hidden_dim},
                                  {"batch_size", c.batch_size},
                                  {"trainers", c.trainers},
                                  {"batches", c.batches},
                                  {"runs", c.runs},
                                  {"backward", c.backward},
                                  {"latency_unit", "ms one-way per hop"},
                                  {"samples_per_s", samples_per_s},
                                  {"complete", complete},
                                  {"loadavg_1m", load_at_start},
                                  {"loadavg_1m_end", load_average()},
                                  {"total_s", total_s}};
  fmt::print("{}\n", summary.dump());
  return complete ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "learning_at_home_throughput: {}\n", e.what());
  return 2;
}
