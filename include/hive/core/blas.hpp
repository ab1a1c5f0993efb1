#pragma once
/// @file
/// Which kernels the BLAS under libtorch runs, and advice when they are older than the CPU.
///
/// Debian's libtorch multiplies matrices with OpenBLAS, which picks its kernels when it loads
/// by recognising the CPU model. A model newer than the OpenBLAS release is not recognised and
/// gets the generic SSE3 kernels ("Prescott"): on a 2-core virtual machine with AVX-512 that
/// made an FFN expert's forward and backward 3.4 times slower than with the SkylakeX kernels.
/// OpenBLAS reads OPENBLAS_CORETYPE before main() runs, so a program cannot switch by itself;
/// blas_advice() says what to set.

#include <fmt/format.h>

#include <dlfcn.h>

#include <array>
#include <string>
#include <string_view>

namespace hive {

/// The name of the kernel set OpenBLAS chose ("Prescott", "Haswell", "SkylakeX", …), or an
/// empty string when the process has no OpenBLAS loaded (another BLAS, or no libtorch).
[[nodiscard]] inline std::string blas_core() {
  using Get = const char* (*)();
  auto* get = reinterpret_cast<Get>(::dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  const char* name = get ? get() : nullptr;
  return name ? std::string(name) : std::string();
}

/// The widest vector instructions this CPU offers for matrix kernels: 0 none known (or not
/// x86-64), 1 AVX, 2 AVX2 with FMA, 3 AVX-512 (F, BW, DQ, VL).
[[nodiscard]] inline int cpu_vector_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return 3;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
  if (__builtin_cpu_supports("avx")) return 1;
#endif
  return 0;
}

/// Advice for an OpenBLAS that runs kernel set `core` on a CPU of vector level `cpu_level`
/// (as cpu_vector_level()): a sentence naming the OPENBLAS_CORETYPE to set when the kernels
/// use narrower vectors than the CPU has, else an empty string (also for a kernel name it does
/// not know, and for an empty `core`).
[[nodiscard]] inline std::string blas_advice(std::string_view core, int cpu_level) {
  struct Kernel {
    std::string_view name;
    int level;
  };
  // OpenBLAS's x86-64 kernel sets by the vectors they use (names as openblas_get_corename).
  static constexpr std::array<Kernel, 21> kernels{{{"Prescott", 0},    {"Core2", 0},        {"Penryn", 0},
                                                   {"Dunnington", 0},  {"Nehalem", 0},      {"Atom", 0},
                                                   {"Opteron", 0},     {"Barcelona", 0},    {"Nano", 0},
                                                   {"Sandybridge", 1}, {"Bulldozer", 1},    {"Piledriver", 1},
                                                   {"Haswell", 2},     {"Zen", 2},          {"Steamroller", 2},
                                                   {"Excavator", 2},   {"SkylakeX", 3},     {"Cooperlake", 3},
                                                   {"SapphireRapids", 3}, {"Opteron(SSE3)", 0}, {"Katmai", 0}}};
  static constexpr std::array<std::string_view, 4> suggestion{"", "Sandybridge", "Haswell", "SkylakeX"};
  if (core.empty() || cpu_level < 1 || cpu_level > 3) return {};
  for (const auto& k : kernels)
    if (k.name == core) {
      if (k.level >= cpu_level) return {};
      return fmt::format(
          "OpenBLAS runs its {} kernels, but this CPU has {}: matrix products may run several times faster "
          "with OPENBLAS_CORETYPE={} set in the environment before the program starts",
          core, cpu_level == 3 ? "AVX-512" : cpu_level == 2 ? "AVX2" : "AVX", suggestion[static_cast<std::size_t>(cpu_level)]);
    }
  return {};
}

/// blas_advice() for the OpenBLAS loaded in this process and this CPU: empty when there is
/// nothing to do.
[[nodiscard]] inline std::string blas_advice() { return blas_advice(blas_core(), cpu_vector_level()); }

}  // namespace hive
