#pragma once
// What the benchmarks report about the machine they ran on: the BLAS in use, load, CPU time.

#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <string>

namespace hive::bench {

/// The BLAS libraries mapped into this process (libtorch calls whatever libblas.so.3 the
/// system selects; the reference BLAS is ~20x slower than OpenBLAS here).
inline std::string loaded_blas() {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> found;
  for (std::string line; std::getline(maps, line);) {
    const auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    const auto path = line.substr(slash);
    const auto file = path.substr(path.rfind('/') + 1);
    if (file.find("blas") != std::string::npos || file.find("mkl_rt") != std::string::npos) found.insert(path);
  }
  std::string out;
  for (const auto& f : found) out += (out.empty() ? "" : ",") + f;
  return out.empty() ? "none found" : out;
}

/// The 1-minute load average.
inline double load_average() {
  double l = 0;
  std::ifstream("/proc/loadavg") >> l;
  return l;
}

/// CPU seconds that the whole machine has spent busy (all processes, all cores), from /proc/stat.
inline double machine_busy_seconds() {
  std::ifstream stat("/proc/stat");
  std::string cpu;
  double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  stat >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  return (user + nice + system + irq + softirq + steal) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

/// CPU seconds (user + system) this process has used.
inline double cpu_seconds() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  auto s = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_usec); };
  return s(r.ru_utime) + s(r.ru_stime);
}

}  // namespace hive::bench
