// Which compilation of the CPU kernels runs (capability.h): what the CPU has, what ATen
// uses, and GROWDENSE_CPU_CAPABILITY.
#include "cpu/capability.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#include <sys/prctl.h>
#endif

namespace growdense::cpu {

// One table per compilation of csrc/cpu/vec/kernels.cpp; CMake defines
// GROWDENSE_CPU_HAVE_<CAPABILITY> for each one it compiles.
#define GROWDENSE_DECLARE_TABLE(NS) \
  namespace NS {                    \
  const KernelTable& kernel_table(); \
  }
GROWDENSE_DECLARE_TABLE(DEFAULT)
#ifdef GROWDENSE_CPU_HAVE_AVX2
GROWDENSE_DECLARE_TABLE(AVX2)
#endif
#ifdef GROWDENSE_CPU_HAVE_AVX512
GROWDENSE_DECLARE_TABLE(AVX512)
#endif
#ifdef GROWDENSE_CPU_HAVE_SVE256
GROWDENSE_DECLARE_TABLE(SVE256)
#endif
#undef GROWDENSE_DECLARE_TABLE

namespace {

constexpr const char* kEnvVar = "GROWDENSE_CPU_CAPABILITY";

const KernelTable* table_of(Capability cap) {
  switch (cap) {
    case Capability::Default:
      return &DEFAULT::kernel_table();
#ifdef GROWDENSE_CPU_HAVE_AVX2
    case Capability::Avx2:
      return &AVX2::kernel_table();
#endif
#ifdef GROWDENSE_CPU_HAVE_AVX512
    case Capability::Avx512:
      return &AVX512::kernel_table();
#endif
#ifdef GROWDENSE_CPU_HAVE_SVE256
    case Capability::Sve256:
      return &SVE256::kernel_table();
#endif
    default:
      return nullptr;
  }
}

// Whether this CPU (and its operating system) runs the instructions of `cap`.
bool cpu_has(Capability cap) {
  switch (cap) {
    case Capability::Default:
      return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    case Capability::Avx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
    case Capability::Avx512:
      __builtin_cpu_init();
      return cpu_has(Capability::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#if defined(__aarch64__) && defined(__linux__) && defined(HWCAP_SVE) && defined(PR_SVE_GET_VL)
    case Capability::Sve256: {
      if ((getauxval(AT_HWCAP) & HWCAP_SVE) == 0) return false;
      const int vl = prctl(PR_SVE_GET_VL);
      return vl >= 0 && (vl & PR_SVE_VL_LEN_MASK) == 32;  // the kernels assume 256-bit vectors
    }
#endif
    default:
      return false;
  }
}

bool parse(std::string name, Capability& cap) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  for (int i = 0; i < static_cast<int>(Capability::Count); ++i) {
    if (name == capability_name(static_cast<Capability>(i))) {
      cap = static_cast<Capability>(i);
      return true;
    }
  }
  return false;
}

std::string joined(const std::vector<Capability>& caps) {
  std::string out;
  for (Capability c : caps) out += (out.empty() ? "" : ", ") + std::string(capability_name(c));
  return out;
}

// Checks that `name` can run here; returns it.
Capability checked(const std::string& name, const char* where) {
  Capability cap = Capability::Default;
  TORCH_CHECK_VALUE(parse(name, cap), "growdense: ", where, "='", name,
                    "' is not a CPU capability; expected one of: default, avx2, avx512, sve256 (this build and CPU "
                    "support: ",
                    joined(supported_capabilities()), ")");
  TORCH_CHECK(table_of(cap) != nullptr, "growdense: ", where, "='", name,
              "' names CPU kernels this build does not contain (compiled: ", joined(compiled_capabilities()),
              "); rebuild growdense on a machine whose compiler targets it, or pick one of those");
  TORCH_CHECK(cpu_has(cap), "growdense: ", where, "='", name, "' names CPU kernels this CPU cannot run; it supports: ",
              joined(supported_capabilities()), ". Unset ", kEnvVar, " to let growdense choose");
  return cap;
}

Capability choose() {
  if (const char* env = std::getenv(kEnvVar); env != nullptr && env[0] != '\0') return checked(env, kEnvVar);
  const Capability ceiling = aten_capability();
  Capability best = Capability::Default;
  for (Capability cap : supported_capabilities()) {
    // SVE256 and the x86 ones never meet on one machine; order within each family holds.
    if (static_cast<int>(cap) <= static_cast<int>(ceiling)) best = cap;
  }
  return best;
}

std::atomic<int> g_active{-1};
std::mutex g_choose;

}  // namespace

const char* capability_name(Capability cap) {
  switch (cap) {
    case Capability::Default:
      return "default";
    case Capability::Avx2:
      return "avx2";
    case Capability::Avx512:
      return "avx512";
    case Capability::Sve256:
      return "sve256";
    default:
      return "?";
  }
}

std::vector<Capability> compiled_capabilities() {
  std::vector<Capability> out;
  for (int i = 0; i < static_cast<int>(Capability::Count); ++i) {
    if (table_of(static_cast<Capability>(i)) != nullptr) out.push_back(static_cast<Capability>(i));
  }
  return out;
}

std::vector<Capability> supported_capabilities() {
  std::vector<Capability> out;
  for (Capability cap : compiled_capabilities()) {
    if (cpu_has(cap)) out.push_back(cap);
  }
  return out;
}

Capability active_capability() {
  int active = g_active.load(std::memory_order_acquire);
  if (active < 0) {
    std::lock_guard<std::mutex> lock(g_choose);
    active = g_active.load(std::memory_order_relaxed);
    if (active < 0) {
      active = static_cast<int>(choose());  // throws, leaving it unset, on a bad variable
      g_active.store(active, std::memory_order_release);
    }
  }
  return static_cast<Capability>(active);
}

std::string set_capability(const std::string& name) {
  const Capability cap = checked(name, "capability");
  const Capability previous = active_capability();
  g_active.store(static_cast<int>(cap), std::memory_order_release);
  return capability_name(previous);
}

const KernelTable& kernels() { return *table_of(active_capability()); }

Capability aten_capability() {
  const std::string aten = at::get_cpu_capability();
  if (aten.rfind("AVX512", 0) == 0) return Capability::Avx512;
  if (aten.rfind("AVX2", 0) == 0) return Capability::Avx2;
  if (aten.rfind("SVE256", 0) == 0) return Capability::Sve256;
  return Capability::Default;
}

const KernelTable* aten_kernels() {
  const Capability cap = aten_capability();
  return cpu_has(cap) ? table_of(cap) : nullptr;
}

}  // namespace growdense::cpu
