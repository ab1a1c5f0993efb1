// benchmark_throughput: hivemind's remote-experts throughput benchmark in C++. One server
// process hosts the experts; separate client processes call them over loopback TCP, each
// running its batches sequentially (forward, then backward when --backprop); the same batches
// are also run in-process with no networking (half before the remote run, half after), which is
// the limit on this machine.
//
//   benchmark_throughput [--preset default|ffn_forward|ffn_small_batch|nop|minimalistic|latency]
//                        [--expert_cls ffn] [--num_experts N] [--hidden_dim H] [--num_clients C]
//                        [--num_batches_per_client B] [--batch_size S] [--max_batch_size M]
//                        [--backprop 0|1] [--port 0] [--seed 0] [--timeout 600] [--local 0|1]
//                        [--encrypt 0|1]
//
// The program re-executes itself (/proc/self/exe) as the server (`--role server`) and as each
// client (`--role client`), talking to them through pipes on their stdin and stdout: the server
// prints its address and answers "stats"; a client connects, makes one single-row warm-up call,
// prints "ready", waits for "go", runs its batches and prints one JSON line with its timings.
// Throughput is the total samples over the wall time from "go" to the last client's result.
// The last line is one JSON object.

#include <hive/core/blas.hpp>
#include <hive/moe/remote_expert.hpp>
#include <hive/moe/server.hpp>

#include "common/machine.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <system_error>
#include <vector>

extern char** environ;

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

using namespace hive::bench;  // loaded_blas, load_average, machine_busy_seconds, cpu_seconds

// ---- presets and flags -----------------------------------------------------------------------

struct Preset {
  const char* name;
  const char* expert_cls;
  int num_experts, hidden_dim, num_clients, num_batches_per_client, batch_size, max_batch_size;
  bool backprop;
  const char* what;
};

// hivemind's presets scaled to about a minute on 2 cores (hivemind's default is 128 clients x 16
// batches of 2048 rows at h=1024: 4.2 M samples, over 40 minutes here). max_batch_size is
// hivemind's default of 4 x batch_size unless hivemind sets it.
constexpr Preset presets[] = {
    {"default", "ffn", 16, 1024, 16, 4, 256, 1024, true, "ffn forward+backward"},
    {"ffn_forward", "ffn", 16, 1024, 16, 12, 256, 1024, false, "ffn forward only"},
    {"ffn_small_batch", "ffn", 4, 1024, 16, 64, 32, 8192, false, "ffn forward, small batches merged by the server"},
    {"nop", "nop", 16, 64, 16, 2000, 16, 64, false, "expert returning its input: per-request overhead"},
    {"minimalistic", "ffn", 2, 1024, 2, 16, 256, 1024, true, "2 experts, 2 clients, ffn forward+backward"},
    {"latency", "ffn", 1, 512, 1, 2000, 3, 12, true, "1 client, sequential forward and backward calls of 3 rows"},
};

struct Config {
  std::string preset = "default";
  std::string expert_cls;
  int num_experts = 0, hidden_dim = 0, num_clients = 0, num_batches_per_client = 0, batch_size = 0,
      max_batch_size = 0;
  bool backprop = true;
  int port = 0;
  std::uint64_t seed = 0;
  double timeout = 600;
  bool local = true;
  bool encrypt = true;
  // Internal: set by the parent on the processes it starts.
  std::string role;
  std::string address;
  long parent_pid = 0;
};

void usage() {
  fmt::print(
      "usage: benchmark_throughput [--preset NAME] [--expert_cls ffn|transformer|det_dropout|nop]\n"
      "                            [--num_experts N] [--hidden_dim H] [--num_clients C]\n"
      "                            [--num_batches_per_client B] [--batch_size S] [--max_batch_size M]\n"
      "                            [--backprop 0|1] [--port P] [--seed N] [--timeout SECONDS] [--local 0|1]\n"
      "                            [--encrypt 0|1]\n"
      "\n"
      "One server process hosts --num_experts experts; --num_clients client processes each send\n"
      "--num_batches_per_client batches of --batch_size rows to experts picked at random, one call at a\n"
      "time (forward, then backward when --backprop 1). The server merges requests into batches of at\n"
      "most --max_batch_size rows (default 4 x batch_size). The same batches also run in this process\n"
      "without networking, half before and half after the remote run (--local 0 skips that).\n"
      "--port 0 picks a free port; --timeout bounds the whole run. --encrypt 0 turns off the\n"
      "encryption of the connections (on by default, as in the library).\n"
      "Flags given after or before --preset override the preset's values.\n"
      "\n"
      "presets (sized to take about a minute or less on 2 cores):\n"
      "  {:<16} {:<5} {:>7} {:>6} {:>7} {:>7} {:>5} {:>9} {:>8}\n",
      "name", "cls", "experts", "hidden", "clients", "batches", "batch", "max_batch", "backprop");
  for (const auto& p : presets)
    fmt::print("  {:<16} {:<5} {:>7} {:>6} {:>7} {:>7} {:>5} {:>9} {:>8}  {}\n", p.name, p.expert_cls, p.num_experts,
               p.hidden_dim, p.num_clients, p.num_batches_per_client, p.batch_size, p.max_batch_size,
               p.backprop ? "yes" : "no", p.what);
}

bool parse_bool(const std::string& flag, const std::string& v) {
  if (v == "1" || v == "true") return true;
  if (v == "0" || v == "false") return false;
  throw std::invalid_argument(flag + " takes 0 or 1, got '" + v + "'");
}

Config parse(int argc, char** argv) {
  static const std::set<std::string> known = {
      "--preset", "--expert_cls", "--num_experts", "--hidden_dim", "--num_clients", "--num_batches_per_client",
      "--batch_size", "--max_batch_size", "--backprop", "--port", "--seed", "--timeout", "--local", "--encrypt",
      "--role", "--address", "--parent_pid"};
  std::map<std::string, std::string> given;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      usage();
      std::exit(0);
    }
    if (!known.contains(k)) throw std::invalid_argument("unknown flag " + k + " (see --help)");
    if (i + 1 >= argc) throw std::invalid_argument("missing value for " + k);
    given[k] = argv[++i];
  }
  Config c;
  if (given.contains("--preset")) c.preset = given["--preset"];
  const Preset* p = nullptr;
  for (const auto& candidate : presets)
    if (c.preset == candidate.name) p = &candidate;
  if (!p) throw std::invalid_argument("unknown preset '" + c.preset + "' (see --help)");
  c.expert_cls = p->expert_cls;
  c.num_experts = p->num_experts;
  c.hidden_dim = p->hidden_dim;
  c.num_clients = p->num_clients;
  c.num_batches_per_client = p->num_batches_per_client;
  c.batch_size = p->batch_size;
  c.max_batch_size = p->max_batch_size;
  c.backprop = p->backprop;
  const bool batch_given = given.contains("--batch_size");
  for (const auto& [k, v] : given) {
    if (k == "--expert_cls") c.expert_cls = v;
    else if (k == "--num_experts") c.num_experts = std::stoi(v);
    else if (k == "--hidden_dim") c.hidden_dim = std::stoi(v);
    else if (k == "--num_clients") c.num_clients = std::stoi(v);
    else if (k == "--num_batches_per_client") c.num_batches_per_client = std::stoi(v);
    else if (k == "--batch_size") c.batch_size = std::stoi(v);
    else if (k == "--max_batch_size") c.max_batch_size = std::stoi(v);
    else if (k == "--backprop") c.backprop = parse_bool(k, v);
    else if (k == "--port") c.port = std::stoi(v);
    else if (k == "--seed") c.seed = std::stoull(v);
    else if (k == "--timeout") c.timeout = std::stod(v);
    else if (k == "--local") c.local = parse_bool(k, v);
    else if (k == "--encrypt") c.encrypt = parse_bool(k, v);
    else if (k == "--role") c.role = v;
    else if (k == "--address") c.address = v;
    else if (k == "--parent_pid") c.parent_pid = std::stol(v);
  }
  // As in hivemind, the server's cap follows the batch size unless it is given.
  if (batch_given && !given.contains("--max_batch_size")) c.max_batch_size = 4 * c.batch_size;
  HIVE_CHECK(c.num_experts >= 1 && c.hidden_dim >= 1 && c.num_clients >= 1 && c.num_batches_per_client >= 1 &&
                 c.batch_size >= 1,
             "--num_experts, --hidden_dim, --num_clients, --num_batches_per_client and --batch_size must be positive");
  HIVE_CHECK(c.max_batch_size >= c.batch_size, "--max_batch_size ({}) must be at least --batch_size ({})",
             c.max_batch_size, c.batch_size);
  HIVE_CHECK(c.port >= 0 && c.port < 65536, "--port must be in [0, 65535]");
  HIVE_CHECK(c.timeout > 0, "--timeout must be positive");
  HIVE_CHECK(c.role.empty() || c.role == "server" || c.role == "client", "--role is server or client");
  (void)hive::moe::ExpertRegistry::global().get(c.expert_cls);  // fails early, naming the known classes
  return c;
}

std::vector<std::string> expert_uids(int n) {
  std::vector<std::string> uids;
  for (int i = 0; i < n; ++i) uids.push_back(fmt::format("expert.{}", i));
  return uids;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Context switches of this process so far (voluntary and involuntary, all threads).
double context_switches() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  return static_cast<double>(r.ru_nvcsw + r.ru_nivcsw);
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

// OpenBLAS's own thread count (libtorch's GEMMs run on OpenBLAS threads, not torch's), or 0.
int blas_threads() {
  using Get = int (*)();
  auto get = reinterpret_cast<Get>(::dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  return get ? get() : 0;
}

// Dies with the parent, so that a killed benchmark leaves no server or client behind.
void follow_parent(long parent_pid) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (parent_pid != 0 && getppid() != parent_pid) std::_Exit(3);
}

// The output gradient of the loss mean(y²): each backward pulls the expert's output toward zero.
// A constant gradient such as out.sum()'s drives the same batch ever further and overflows the
// expert after a few dozen steps when few experts share many batches (4 experts, 8 clients).
at::Tensor loss_gradient(const at::Tensor& y) {
  return y.detach() * (2.0 / static_cast<double>(std::max<std::int64_t>(1, y.numel())));
}

// ---- the server process ----------------------------------------------------------------------

// Time the compute threads spend inside the experts.
struct BusyTime {
  std::atomic<std::int64_t> forward_ns{0}, backward_ns{0};
};

// ModuleBackend with a stopwatch: the server's compute busy fraction, measured through the
// Backend policy slot rather than by changing the library.
class TimedBackend {
 public:
  TimedBackend(hive::moe::ModuleBackend<> inner, std::shared_ptr<BusyTime> busy)
      : inner_(std::move(inner)), busy_(std::move(busy)) {}

  [[nodiscard]] const std::string& name() const noexcept { return inner_.name(); }
  [[nodiscard]] const std::vector<hive::moe::TensorSchema>& input_schema() const noexcept { return inner_.input_schema(); }
  [[nodiscard]] const std::vector<hive::moe::TensorSchema>& output_schema() const noexcept { return inner_.output_schema(); }
  [[nodiscard]] nlohmann::json info() const { return inner_.info(); }
  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs) {
    const auto t0 = Clock::now();
    auto out = inner_.forward(inputs);
    busy_->forward_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
    return out;
  }
  std::vector<at::Tensor> backward(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& grad_outputs) {
    const auto t0 = Clock::now();
    auto out = inner_.backward(inputs, grad_outputs);
    busy_->backward_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
    return out;
  }
  void save(const std::filesystem::path& dir) { inner_.save(dir); }
  bool load(const std::filesystem::path& dir) { return inner_.load(dir); }

 private:
  hive::moe::ModuleBackend<> inner_;
  std::shared_ptr<BusyTime> busy_;
};
static_assert(hive::moe::Backend<TimedBackend>);

using BenchServer = hive::Server<hive::net::Tcp, hive::dht::Kademlia<>, hive::moe::PriorityBatcher<>, TimedBackend>;

void print_line(const nlohmann::json& j) {
  fmt::print("{}\n", j.dump());
  std::fflush(stdout);
}

int run_server(const Config& c) {
  follow_parent(c.parent_pid);
  const auto t0 = Clock::now();
  auto busy = std::make_shared<BusyTime>();
  std::vector<TimedBackend> backends;
  for (auto& b : hive::moe::make_backends(c.expert_cls, expert_uids(c.num_experts), c.hidden_dim))
    backends.emplace_back(std::move(b), busy);
  const double experts_s = seconds_since(t0);
  const auto t1 = Clock::now();
  BenchServer server(std::move(backends),
                     hive::ServerOptions()
                         .dht(hive::DHTOptions()
                                  .listen_on(fmt::format("127.0.0.1:{}", c.port))
                                  .rpc(hive::net::RpcOptions().encrypt(c.encrypt)))
                         .update_period(hive::Seconds(60))
                         .batching(hive::moe::BatcherOptions().max_batch_size(static_cast<std::size_t>(c.max_batch_size))));
  print_line({{"address", server.address()},
              {"experts_s", experts_s},
              {"networking_s", seconds_since(t1)},
              {"torch_threads", at::get_num_threads()},
              {"blas_threads", blas_threads()}});
  // Commands from the parent, one per line; EOF (the parent is gone) stops the server too.
  for (std::string line; std::getline(std::cin, line);) {
    if (line == "quit") break;
    if (line != "stats") continue;
    std::uint64_t batches[2] = {0, 0}, rows[2] = {0, 0}, max_rows[2] = {0, 0};
    for (const auto& p : server.scheduler().stats()) {
      const int k = p.name.ends_with("/backward") ? 1 : 0;
      batches[k] += p.batches;
      rows[k] += p.rows;
      max_rows[k] = std::max(max_rows[k], p.max_batch_rows);
    }
    print_line({{"cpu_s", cpu_seconds()},
                {"busy_forward_s", 1e-9 * static_cast<double>(busy->forward_ns.load())},
                {"busy_backward_s", 1e-9 * static_cast<double>(busy->backward_ns.load())},
                {"forward_batches", batches[0]},
                {"forward_rows", rows[0]},
                {"forward_max_rows", max_rows[0]},
                {"backward_batches", batches[1]},
                {"backward_rows", rows[1]},
                {"backward_max_rows", max_rows[1]}});
  }
  server.shutdown();
  return 0;
}

// ---- a client process ------------------------------------------------------------------------

int run_client(const Config& c) {
  follow_parent(c.parent_pid);
  // Like hivemind's clients: one torch thread each, the cores belong to the server.
  at::set_num_threads(1);
  at::manual_seed(c.seed);
  auto client = std::make_shared<hive::moe::Client<>>(hive::net::Tcp::Options(), hive::net::RpcOptions().encrypt(c.encrypt));
  const auto options = hive::moe::RemoteExpertOptions()
                           .forward_timeout(hive::Seconds(c.timeout))
                           .backward_timeout(hive::Seconds(c.timeout));
  std::vector<hive::moe::RemoteExpert> experts;
  for (const auto& uid : expert_uids(c.num_experts))
    experts.emplace_back(hive::moe::RemoteExpert(uid, c.address, client, options));
  const auto cls = hive::moe::ExpertRegistry::global().get(c.expert_cls);
  std::mt19937_64 rng(c.seed);
  std::uniform_int_distribution<int> pick(0, c.num_experts - 1);

  // One call: forward, then backward through the output when backprop. Returns both times in µs.
  auto step = [&](hive::moe::RemoteExpert& expert, std::vector<at::Tensor>& inputs) {
    const auto t0 = Clock::now();
    auto outputs = expert->call(inputs);
    const auto t1 = Clock::now();
    double backward_us = 0;
    if (c.backprop) {
      outputs.front().backward(loss_gradient(outputs.front()));
      inputs.front().mutable_grad() = at::Tensor();  // nothing accumulates across batches
      backward_us = std::chrono::duration<double, std::micro>(Clock::now() - t1).count();
    }
    return std::pair{std::chrono::duration<double, std::micro>(t1 - t0).count(), backward_us};
  };
  auto make_inputs = [&](int rows) {
    auto inputs = cls.sample_inputs(rows, c.hidden_dim);
    if (c.backprop) inputs.front().requires_grad_(true);
    return inputs;
  };

  // Warm-up: opens the connection and runs each code path once, with a single row.
  auto warm = make_inputs(1);
  step(experts[static_cast<std::size_t>(pick(rng))], warm);
  auto inputs = make_inputs(c.batch_size);
  fmt::print("ready\n");
  std::fflush(stdout);
  std::string go;
  if (!std::getline(std::cin, go) || go != "go") return 3;

  std::vector<double> forward_us, backward_us;
  forward_us.reserve(static_cast<std::size_t>(c.num_batches_per_client));
  const double cpu0 = cpu_seconds(), switches0 = context_switches();
  const auto t0 = Clock::now();
  for (int i = 0; i < c.num_batches_per_client; ++i) {
    auto [f, b] = step(experts[static_cast<std::size_t>(pick(rng))], inputs);
    forward_us.push_back(std::round(f * 10) / 10);
    if (c.backprop) backward_us.push_back(std::round(b * 10) / 10);
  }
  print_line({{"elapsed_s", seconds_since(t0)},
              {"cpu_s", cpu_seconds() - cpu0},
              {"context_switches", context_switches() - switches0},
              {"forward_us", forward_us},
              {"backward_us", backward_us}});
  return 0;
}

// ---- the parent: processes and pipes ---------------------------------------------------------

// A process started by the parent, with a pipe to its stdin and one from its stdout.
struct Child {
  std::string name;
  pid_t pid = -1;
  int in = -1;   // write end: the child's stdin
  int out = -1;  // read end: the child's stdout
  std::string buffer;
  int status = 0;
  rusage usage{};

  // The next complete line already read, if any.
  std::optional<std::string> take_line() {
    const auto nl = buffer.find('\n');
    if (nl == std::string::npos) return std::nullopt;
    auto line = buffer.substr(0, nl);
    buffer.erase(0, nl + 1);
    return line;
  }
};

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

[[noreturn]] void throw_errno(const std::string& what) { throw std::system_error(errno, std::generic_category(), what); }

// Starts `exe` with `args` and the parent's environment plus `env` (NAME=value entries).
Child spawn(const std::string& name, const std::string& exe, const std::vector<std::string>& args,
            const std::vector<std::string>& env = {}) {
  Child c;
  c.name = name;
  int to[2], from[2];
  // Close-on-exec everywhere: a child inheriting another child's pipe would hide that one's EOF.
  if (pipe2(to, O_CLOEXEC) != 0) throw_errno("pipe2");
  if (pipe2(from, O_CLOEXEC) != 0) {
    ::close(to[0]);
    ::close(to[1]);
    throw_errno("pipe2");
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, to[0], STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, from[1], STDOUT_FILENO);
  std::vector<char*> argv{const_cast<char*>(exe.c_str())};
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) {
    const std::string entry = *e;
    const auto key = entry.substr(0, entry.find('=') + 1);
    if (std::none_of(env.begin(), env.end(), [&](const std::string& o) { return o.starts_with(key); }))
      env_strings.push_back(entry);
  }
  env_strings.insert(env_strings.end(), env.begin(), env.end());
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  const int rc = posix_spawn(&c.pid, exe.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(to[0]);
  ::close(from[1]);
  c.in = to[1];
  c.out = from[0];
  if (rc != 0) {
    close_fd(c.in);
    close_fd(c.out);
    throw std::system_error(rc, std::generic_category(), "posix_spawn " + exe);
  }
  return c;
}

void write_line(Child& c, const std::string& line) {
  const std::string data = line + "\n";
  std::size_t done = 0;
  while (done < data.size()) {
    const auto n = ::write(c.in, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("writing to " + c.name);
    done += static_cast<std::size_t>(n);
  }
}

// Reads every child's stdout until each has given one complete line; returns the lines.
// Throws when a child closes its stdout first or the deadline passes.
std::vector<std::string> read_one_line_each(const std::vector<Child*>& kids, Clock::time_point deadline,
                                            const std::string& what) {
  std::vector<std::optional<std::string>> lines(kids.size());
  std::size_t pending = kids.size();
  for (std::size_t i = 0; i < kids.size(); ++i)
    if ((lines[i] = kids[i]->take_line())) --pending;
  while (pending > 0) {
    std::vector<pollfd> fds;
    std::vector<std::size_t> index;
    for (std::size_t i = 0; i < kids.size(); ++i)
      if (!lines[i]) {
        fds.push_back({kids[i]->out, POLLIN, 0});
        index.push_back(i);
      }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) throw std::runtime_error(fmt::format("timed out waiting for {} ({} processes pending)", what, pending));
    const int n = ::poll(fds.data(), fds.size(), static_cast<int>(std::min<long long>(left, 1000)));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("poll");
    for (std::size_t k = 0; k < fds.size(); ++k) {
      if (fds[k].revents == 0) continue;
      Child& c = *kids[index[k]];
      char buf[1 << 16];
      const auto got = ::read(c.out, buf, sizeof buf);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw_errno("reading from " + c.name);
      if (got == 0) throw std::runtime_error(fmt::format("{} exited before {} (see its stderr above)", c.name, what));
      c.buffer.append(buf, static_cast<std::size_t>(got));
      if ((lines[index[k]] = c.take_line())) --pending;
    }
  }
  std::vector<std::string> out;
  for (auto& l : lines) out.push_back(std::move(*l));
  return out;
}

// Waits until `c` exits: its stdout reaches EOF, then it is reaped. Past the deadline it is
// killed. Returns false when it had to be killed.
bool wait_exit(Child& c, Clock::time_point deadline) {
  if (c.pid <= 0) return true;
  bool in_time = true;
  while (c.out >= 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      in_time = false;
      ::kill(c.pid, SIGKILL);
      break;
    }
    pollfd fd{c.out, POLLIN, 0};
    const int n = ::poll(&fd, 1, static_cast<int>(std::min<long long>(left, 1000)));
    if (n <= 0) continue;
    char buf[1 << 16];
    const auto got = ::read(c.out, buf, sizeof buf);
    if (got == 0 || (got < 0 && errno != EINTR)) close_fd(c.out);
  }
  while (::wait4(c.pid, &c.status, 0, &c.usage) < 0 && errno == EINTR) {
  }
  c.pid = -1;
  close_fd(c.in);
  close_fd(c.out);
  return in_time;
}

// Every process the parent started; whatever is still running when it goes is killed.
struct Children {
  std::deque<Child> all;  // stable addresses for the Child* handed out
  Children() = default;
  Children(const Children&) = delete;
  Children& operator=(const Children&) = delete;
  ~Children() {
    for (auto& c : all)
      if (c.pid > 0) ::kill(c.pid, SIGKILL);
    for (auto& c : all)
      if (c.pid > 0) {
        while (::waitpid(c.pid, nullptr, 0) < 0 && errno == EINTR) {
        }
        c.pid = -1;
      }
    for (auto& c : all) {
      close_fd(c.in);
      close_fd(c.out);
    }
  }
};

std::string self_exe() {
  char path[4096];
  const auto n = ::readlink("/proc/self/exe", path, sizeof path - 1);
  if (n <= 0) throw_errno("readlink /proc/self/exe");
  return std::string(path, static_cast<std::size_t>(n));
}

// ---- the parent: local baseline --------------------------------------------------------------

struct LocalResult {
  double elapsed_s = 0;
  double others_cpu_s = 0;  // CPU time of other processes on the machine meanwhile
  std::vector<double> forward_us, backward_us;
};

// The same batches (count, size, expert class, width, forward and backward with the optimizer
// step) run in this process with no networking: what the machine can do. Half run before the
// remote run and half after it, so that a change of load on the machine weighs on both alike.
class LocalBaseline {
 public:
  explicit LocalBaseline(const Config& c)
      : c_(c),
        backends_(hive::moe::make_backends(c.expert_cls, expert_uids(c.num_experts), c.hidden_dim)),
        rng_(c.seed),
        pick_(0, c.num_experts - 1) {
    at::manual_seed(c.seed);
    inputs_ = hive::moe::ExpertRegistry::global().get(c.expert_cls).sample_inputs(c.batch_size, c.hidden_dim);
    step(backends_.front());  // warm-up, as each client makes one call before the clock starts
  }

  // Runs `batches` batches on experts picked at random, adding to `r`.
  void run(int batches, LocalResult& r) {
    const double busy0 = machine_busy_seconds(), cpu0 = cpu_seconds();
    const auto t0 = Clock::now();
    for (int i = 0; i < batches; ++i) {
      auto [f, b] = step(backends_[static_cast<std::size_t>(pick_(rng_))]);
      r.forward_us.push_back(f);
      if (c_.backprop) r.backward_us.push_back(b);
    }
    r.elapsed_s += seconds_since(t0);
    r.others_cpu_s += std::max(0.0, machine_busy_seconds() - busy0 - (cpu_seconds() - cpu0));
  }

 private:
  std::pair<double, double> step(hive::moe::ModuleBackend<>& backend) {
    const auto t0 = Clock::now();
    auto outputs = backend.forward(inputs_);
    const auto t1 = Clock::now();
    if (c_.backprop) {
      (void)backend.backward(inputs_, {loss_gradient(outputs.front())});
    }
    return {std::chrono::duration<double, std::micro>(t1 - t0).count(),
            std::chrono::duration<double, std::micro>(Clock::now() - t1).count()};
  }

  const Config& c_;
  std::vector<hive::moe::ModuleBackend<>> backends_;
  std::vector<at::Tensor> inputs_;
  std::mt19937_64 rng_;
  std::uniform_int_distribution<int> pick_;
};

// ---- the parent: the run ---------------------------------------------------------------------

std::vector<std::string> common_args(const Config& c) {
  return {"--preset", c.preset, "--expert_cls", c.expert_cls, "--num_experts", std::to_string(c.num_experts),
          "--hidden_dim", std::to_string(c.hidden_dim), "--batch_size", std::to_string(c.batch_size),
          "--max_batch_size", std::to_string(c.max_batch_size), "--backprop", c.backprop ? "1" : "0",
          "--num_batches_per_client", std::to_string(c.num_batches_per_client), "--timeout", fmt::format("{}", c.timeout),
          "--encrypt", c.encrypt ? "1" : "0",
          "--parent_pid", std::to_string(::getpid())};
}

int run_parent(const Config& c) {
  ::signal(SIGPIPE, SIG_IGN);  // a dead child's pipe fails the write instead of killing us
  const auto started = Clock::now();
  const auto deadline = started + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(c.timeout));
  const std::string exe = self_exe();
  const std::int64_t samples = std::int64_t{c.batch_size} * c.num_clients * c.num_batches_per_client;
  const std::int64_t calls = std::int64_t{c.num_clients} * c.num_batches_per_client * (c.backprop ? 2 : 1);
  const std::string blas = loaded_blas();
  const double load = load_average();
  fmt::print("benchmark_throughput: preset {} ({} h={}, {} experts, max_batch_size {}); {} clients x {} batches of {} rows, {}\n",
             c.preset, c.expert_cls, c.hidden_dim, c.num_experts, c.max_batch_size, c.num_clients,
             c.num_batches_per_client, c.batch_size, c.backprop ? "forward+backward" : "forward");
  const std::string blas_core = hive::blas_core();
  fmt::print("blas: {} ({} kernels); load average {:.2f}\n", blas, blas_core.empty() ? "unknown" : blas_core, load);
  if (const auto advice = hive::blas_advice(); !advice.empty()) fmt::print("note: {}\n", advice);
  std::fflush(stdout);

  // The local baseline's first half, before any other process starts.
  const int local_batches = c.num_clients * c.num_batches_per_client;
  std::optional<LocalBaseline> baseline;
  LocalResult local;
  if (c.local) {
    baseline.emplace(c);
    baseline->run(local_batches / 2, local);
  }

  Children children;
  // The server, timed from launch to its address (process start, libtorch, experts, listening).
  const auto t_spawn = Clock::now();
  auto server_args = common_args(c);
  server_args.insert(server_args.end(), {"--role", "server", "--port", std::to_string(c.port), "--seed", std::to_string(c.seed)});
  children.all.push_back(spawn("server", exe, server_args));
  Child* server = &children.all.back();
  const auto hello = nlohmann::json::parse(
      read_one_line_each({server}, std::min(deadline, Clock::now() + 120s), "the server's address").at(0));
  const double startup_s = seconds_since(t_spawn);
  const auto address = hello.at("address").get<std::string>();
  fmt::print("server at {}: startup {:.2f} s (experts {:.2f} s, networking {:.3f} s); torch threads {}, blas threads {}\n",
             address, startup_s, hello.at("experts_s").get<double>(), hello.at("networking_s").get<double>(),
             hello.at("torch_threads").get<int>(), hello.at("blas_threads").get<int>());
  std::fflush(stdout);

  std::vector<Child*> clients;
  for (int i = 0; i < c.num_clients; ++i) {
    auto args = common_args(c);
    args.insert(args.end(), {"--role", "client", "--address", address, "--seed", std::to_string(c.seed * 1000003 + 1 + i)});
    children.all.push_back(spawn(fmt::format("client {}", i), exe, args, {"OMP_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1"}));
    clients.push_back(&children.all.back());
  }
  for (const auto& line : read_one_line_each(clients, std::min(deadline, Clock::now() + 300s), "the clients' ready line"))
    HIVE_CHECK(line == "ready", "a client said '{}' instead of ready", line);

  write_line(*server, "stats");
  const auto before = nlohmann::json::parse(read_one_line_each({server}, deadline, "server stats").at(0));
  const double machine0 = machine_busy_seconds(), parent0 = cpu_seconds();
  const auto t_go = Clock::now();
  for (auto* client : clients) write_line(*client, "go");
  const auto results = read_one_line_each(clients, deadline, "the clients' results");
  const double elapsed_s = seconds_since(t_go);
  const double machine_s = machine_busy_seconds() - machine0, parent_s = cpu_seconds() - parent0;
  write_line(*server, "stats");
  const auto after = nlohmann::json::parse(read_one_line_each({server}, deadline, "server stats").at(0));
  write_line(*server, "quit");

  std::vector<double> forward_us, backward_us, all_us;
  double client_cpu_s = 0, slowest_client_s = 0, client_switches = 0;
  for (const auto& line : results) {
    const auto j = nlohmann::json::parse(line);
    for (double v : j.at("forward_us")) forward_us.push_back(v);
    for (double v : j.at("backward_us")) backward_us.push_back(v);
    client_cpu_s += j.at("cpu_s").get<double>();
    client_switches += j.at("context_switches").get<double>();
    slowest_client_s = std::max(slowest_client_s, j.at("elapsed_s").get<double>());
  }
  all_us = forward_us;
  all_us.insert(all_us.end(), backward_us.begin(), backward_us.end());
  bool clean = true;
  for (auto* client : clients) clean = wait_exit(*client, Clock::now() + 30s) && clean;
  clean = wait_exit(*server, Clock::now() + 30s) && clean;
  for (const auto& ch : children.all)
    if (!WIFEXITED(ch.status) || WEXITSTATUS(ch.status) != 0) {
      fmt::print(stderr, "benchmark_throughput: {} ended with status {:#x}\n", ch.name, ch.status);
      clean = false;
    }

  auto delta = [&](const char* key) { return after.at(key).get<double>() - before.at(key).get<double>(); };
  const double fwd_batches = delta("forward_batches"), bwd_batches = delta("backward_batches");
  const double fwd_rows_mean = fwd_batches > 0 ? delta("forward_rows") / fwd_batches : 0;
  const double bwd_rows_mean = bwd_batches > 0 ? delta("backward_rows") / bwd_batches : 0;
  const double busy_s = delta("busy_forward_s") + delta("busy_backward_s");
  const double server_cpu_s = delta("cpu_s");
  const double samples_per_s = static_cast<double>(samples) / elapsed_s;
  // What other processes on the machine took meanwhile (the machine is shared with builds).
  const double others_cpu_s = std::max(0.0, machine_s - parent_s - server_cpu_s - client_cpu_s);

  fmt::print("processed {} samples in {:.2f} s: {:.1f} samples/s ({}), {:.0f} calls/s, {:.1f} us per call\n", samples,
             elapsed_s, samples_per_s, c.backprop ? "forward+backward" : "forward", static_cast<double>(calls) / elapsed_s,
             1e6 * elapsed_s / static_cast<double>(calls));
  fmt::print("calls: p50 {:.2f} ms, p99 {:.2f} ms (forward p50 {:.2f} ms{})\n", percentile(all_us, 0.5) / 1e3,
             percentile(all_us, 0.99) / 1e3, percentile(forward_us, 0.5) / 1e3,
             c.backprop ? fmt::format(", backward p50 {:.2f} ms", percentile(backward_us, 0.5) / 1e3) : "");
  fmt::print("server: forward batches {:.0f} (mean {:.1f} rows, max {}), backward batches {:.0f} (mean {:.1f} rows, max {}); "
             "compute busy {:.1f}% of the run; cpu {:.2f} s server, {:.2f} s all clients\n",
             fwd_batches, fwd_rows_mean, after.at("forward_max_rows").get<std::uint64_t>(), bwd_batches, bwd_rows_mean,
             after.at("backward_max_rows").get<std::uint64_t>(), 100 * busy_s / elapsed_s, server_cpu_s, client_cpu_s);
  fmt::print("per call: {:.1f} us cpu in the server, {:.1f} us cpu and {:.1f} context switches in the client\n",
             1e6 * server_cpu_s / static_cast<double>(calls), 1e6 * client_cpu_s / static_cast<double>(calls),
             client_switches / static_cast<double>(calls));
  fmt::print("other processes on the machine meanwhile: {:.2f} cores busy on average\n", others_cpu_s / elapsed_s);
  std::fflush(stdout);

  nlohmann::json out = {{"bench", "throughput"},
                        {"preset", c.preset},
                        {"expert_cls", c.expert_cls},
                        {"num_experts", c.num_experts},
                        {"hidden_dim", c.hidden_dim},
                        {"num_clients", c.num_clients},
                        {"num_batches_per_client", c.num_batches_per_client},
                        {"batch_size", c.batch_size},
                        {"max_batch_size", c.max_batch_size},
                        {"backprop", c.backprop},
                        {"encrypt", c.encrypt},
                        {"samples", samples},
                        {"calls", calls},
                        {"elapsed_s", elapsed_s},
                        {"samples_per_s", samples_per_s},
                        {"us_per_call", 1e6 * elapsed_s / static_cast<double>(calls)},
                        {"p50_ms", percentile(all_us, 0.5) / 1e3},
                        {"p99_ms", percentile(all_us, 0.99) / 1e3},
                        {"forward_p50_ms", percentile(forward_us, 0.5) / 1e3},
                        {"startup_s", startup_s},
                        {"server_experts_s", hello.at("experts_s")},
                        {"server_forward_mean_batch", fwd_rows_mean},
                        {"server_forward_max_batch", after.at("forward_max_rows")},
                        {"server_busy_fraction", busy_s / elapsed_s},
                        {"server_compute_s", busy_s},
                        {"server_cpu_s", server_cpu_s},
                        {"client_cpu_s", client_cpu_s},
                        {"client_switches_per_call", client_switches / static_cast<double>(calls)},
                        {"slowest_client_s", slowest_client_s},
                        {"others_cores", others_cpu_s / elapsed_s},
                        {"blas", blas},
                        {"torch_threads", hello.at("torch_threads")},
                        {"blas_threads", hello.at("blas_threads")},
                        {"blas_core", blas_core},
                        {"loadavg_1m", load}};
  if (c.backprop) {
    out["backward_p50_ms"] = percentile(backward_us, 0.5) / 1e3;
    out["server_backward_mean_batch"] = bwd_rows_mean;
    out["server_backward_max_batch"] = after.at("backward_max_rows");
  }

  if (baseline) {
    baseline->run(local_batches - local_batches / 2, local);
    std::vector<double> local_all = local.forward_us;
    local_all.insert(local_all.end(), local.backward_us.begin(), local.backward_us.end());
    const double local_samples_per_s = static_cast<double>(samples) / local.elapsed_s;
    fmt::print("local (same batches in this process, no networking): {:.2f} s, {:.1f} samples/s, call p50 {:.2f} ms "
               "(forward p50 {:.2f} ms{}){}\n",
               local.elapsed_s, local_samples_per_s, percentile(local_all, 0.5) / 1e3,
               percentile(local.forward_us, 0.5) / 1e3,
               c.backprop ? fmt::format(", backward p50 {:.2f} ms", percentile(local.backward_us, 0.5) / 1e3) : "",
               local.elapsed_s >= 1 ? fmt::format("; other processes {:.2f} cores", local.others_cpu_s / local.elapsed_s) : "");
    // Time per row inside the experts: the server's compute stopwatch against the whole local
    // run (which does nothing else), so any difference is compute slowed by what shares the cores.
    const double server_us_per_row = 1e6 * busy_s / static_cast<double>(samples);
    const double local_us_per_row = 1e6 * local.elapsed_s / static_cast<double>(samples);
    fmt::print("compute per row: {:.1f} us in the server's experts, {:.1f} us in-process ({:+.1f}%)\n", server_us_per_row,
               local_us_per_row, 100 * (server_us_per_row / local_us_per_row - 1));
    fmt::print("ratio to local {:.3f}\n", samples_per_s / local_samples_per_s);
    out["server_us_per_row"] = server_us_per_row;
    out["local_us_per_row"] = local_us_per_row;
    out["local_elapsed_s"] = local.elapsed_s;
    out["local_samples_per_s"] = local_samples_per_s;
    out["ratio_to_local"] = samples_per_s / local_samples_per_s;
    out["local_p50_ms"] = percentile(local_all, 0.5) / 1e3;
    out["local_p99_ms"] = percentile(local_all, 0.99) / 1e3;
    out["local_forward_p50_ms"] = percentile(local.forward_us, 0.5) / 1e3;
    if (c.backprop) out["local_backward_p50_ms"] = percentile(local.backward_us, 0.5) / 1e3;
    out["local_us_per_call"] = 1e6 * local.elapsed_s / static_cast<double>(calls);
    // /proc/stat counts in 10 ms ticks: too coarse for a run shorter than a second.
    if (local.elapsed_s >= 1) out["local_others_cores"] = local.others_cpu_s / local.elapsed_s;
  }
  out["loadavg_1m_end"] = load_average();
  out["total_s"] = seconds_since(started);
  out["clean_exit"] = clean;
  fmt::print("{}\n", out.dump());
  return clean ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) try {
  const Config c = parse(argc, argv);
  if (c.role == "server") return run_server(c);
  if (c.role == "client") return run_client(c);
  return run_parent(c);
} catch (const std::exception& e) {
  fmt::print(stderr, "benchmark_throughput: {}\n", e.what());
  return 2;
}
