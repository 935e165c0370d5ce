// Run-time choice among the kernel builds compiled into this extension.
//
// By default lipkern follows ATen's choice (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY and prefers AVX2 on CPUs where AVX512 does not pay), limited to what the
// CPU supports. AVX512_BF16 is AVX512 plus the bf16 conversion instructions, chosen where ATen
// chooses AVX512 and the CPU has them. LIPKERN_CPU_CAPABILITY=DEFAULT|AVX2|AVX512|AVX512_BF16
// overrides the choice for lipkern alone. The AVX-512 builds' evaluation of the 16-bit smooth
// activations is chosen here too (cpu_16bit_method, LIPKERN_CPU_16BIT).

#include "remap_act.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace lipkern {
namespace {

struct Capability {
  const char* name;
  KernelTable (*table)();
  bool (*cpu_supports)();
  const char* aten_level;  // the ATen capability this build's Vectorized code corresponds to
};

bool always() {
  return true;
}

#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi2");
}
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx512_bf16() {
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#endif

// Ordered from least to most capable.
const auto kCapabilities = std::array{
    Capability{"DEFAULT", &DEFAULT::kernel_table, &always, "DEFAULT"},
#ifdef LIPKERN_HAVE_AVX2
    Capability{"AVX2", &AVX2::kernel_table, &cpu_has_avx2, "AVX2"},
#endif
#ifdef LIPKERN_HAVE_AVX512
    Capability{"AVX512", &AVX512::kernel_table, &cpu_has_avx512, "AVX512"},
#endif
#ifdef LIPKERN_HAVE_AVX512_BF16
    Capability{"AVX512_BF16", &AVX512_BF16::kernel_table, &cpu_has_avx512_bf16, "AVX512"},
#endif
};

// Index into kCapabilities, or -1 when `name` is not a capability of this build. Any case:
// ATen's ATEN_CPU_CAPABILITY spells them in lower case.
int find(const std::string& name) {
  const auto same_letters = [&](const char* candidate) {
    return name.size() == std::strlen(candidate) &&
           std::equal(name.begin(), name.end(), candidate, [](char a, char b) {
             return std::toupper(static_cast<unsigned char>(a)) == b;
           });
  };
  for (size_t i = 0; i < kCapabilities.size(); ++i) {
    if (same_letters(kCapabilities[i].name)) return static_cast<int>(i);
  }
  return -1;
}

std::string names() {
  std::string all;
  for (const auto& cap : kCapabilities) all += std::string(all.empty() ? "" : ", ") + cap.name;
  return all;
}

int checked(const std::string& name, const char* source) {
  const int i = find(name);
  TORCH_CHECK_VALUE(i >= 0, "lipkern: ", source, " names CPU capability '", name,
                    "', this build has ", names());
  TORCH_CHECK_VALUE(kCapabilities[i].cpu_supports(), "lipkern: ", source, " asks for ", name,
                    ", which this CPU does not support");
  return i;
}

// Order of ATen's x86 capabilities; -1 for others (their builds are not compiled here).
int aten_rank(const std::string& level) {
  const std::array<const char*, 3> levels{"DEFAULT", "AVX2", "AVX512"};
  for (size_t i = 0; i < levels.size(); ++i) {
    if (level == levels[i]) return static_cast<int>(i);
  }
  return -1;
}

int initial() {
  if (const char* env = std::getenv("LIPKERN_CPU_CAPABILITY"); env != nullptr && *env != '\0') {
    return checked(env, "LIPKERN_CPU_CAPABILITY");
  }
  // The most capable build that the CPU supports and whose Vectorized level ATen would also use.
  const int aten = aten_rank(at::get_cpu_capability());
  int best = 0;
  for (int i = 0; i < static_cast<int>(kCapabilities.size()); ++i) {
    if (kCapabilities[i].cpu_supports() && aten_rank(kCapabilities[i].aten_level) <= aten) best = i;
  }
  return best;
}

std::atomic<int>& current() {
  static std::atomic<int> index{initial()};
  return index;
}

struct Tables {
  std::array<KernelTable, kCapabilities.size()> tables;
  Tables() {
    for (size_t i = 0; i < kCapabilities.size(); ++i) tables[i] = kCapabilities[i].table();
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

const KernelTable& kernels() {
  return tables().tables[current().load(std::memory_order_relaxed)];
}

std::string cpu_capability() {
  return kCapabilities[current().load()].name;
}

void set_cpu_capability(const std::string& name) {
  current().store(checked(name, "set_cpu_capability"));
}

namespace {

// Which of the 16-bit smooth activations' two evaluations is faster depends on the CPU's
// gathers: on an AMD EPYC the grid's polynomials took 0.70-0.86x the time of the table's
// gathers, on an Intel Xeon with AMX the gathers 0.49-0.77x the polynomials' (bf16 and fp16,
// forward and backward, inputs of std 1). So "auto" times both, once per build.
constexpr std::array<const char*, 3> kMethods16{"grid", "table", "auto"};
constexpr int kGrid = 0, kTable = 1, kAuto = 2;

int method_16bit(const std::string& name, const char* source) {
  for (size_t i = 0; i < kMethods16.size(); ++i) {
    if (name == kMethods16[i]) return static_cast<int>(i);
  }
  TORCH_CHECK_VALUE(false, "lipkern: ", source, " names 16-bit method '", name,
                    "', expected 'grid', 'table' or 'auto'");
}

std::atomic<int>& requested_16bit() {
  static std::atomic<int> method{[] {
    const char* env = std::getenv("LIPKERN_CPU_16BIT");
    return env != nullptr && *env != '\0' ? method_16bit(env, "LIPKERN_CPU_16BIT") : kAuto;
  }()};
  return method;
}

bool timed_grid_beats_tables(int capability) {
  static std::array<std::once_flag, kCapabilities.size()> once;
  static std::array<bool, kCapabilities.size()> grid;
  std::call_once(once[capability], [capability] {
    grid[capability] = tables().tables[capability].grid_beats_tables();
  });
  return grid[capability];
}

}  // namespace

bool sixteen_bit_on_grid() {
  const int capability = current().load(std::memory_order_relaxed);
  if (!tables().tables[capability].computes_16bit_on_grid) return false;
  const int method = requested_16bit().load(std::memory_order_relaxed);
  return method == kAuto ? timed_grid_beats_tables(capability) : method == kGrid;
}

std::string cpu_16bit_method() {
  return sixteen_bit_on_grid() ? "grid" : "table";
}

std::string set_cpu_16bit_method(const std::string& name) {
  return kMethods16[requested_16bit().exchange(method_16bit(name, "set_cpu_16bit_method"))];
}

}  // namespace lipkern
