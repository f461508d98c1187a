// Runtime ISA selection for the CPU kernels: AVX-512 (F/BW/VL/DQ + VPOPCNTDQ) -> AVX2 (+FMA, POPCNT) -> portable.
//
// Kernels are compiled for each level inside one translation unit (target attributes or
// `#pragma GCC target` regions; the extension itself is built for baseline x86-64, never -march=native) and the
// level is picked per call by active_isa():
//   * the best level this CPU (and OS) supports, detected once with __builtin_cpu_supports;
//   * lowered by the environment variable QUANTKIT_CPU_ISA=portable|avx2|avx512|amx (read on every call, so tests
//     can exercise every path in one process). Asking for a level the CPU lacks is an error, not a silent fallback.
// "amx" is AVX-512 plus Intel AMX-INT8 tiles (kernels that have an AMX path use it; the others run their AVX-512
// code): active_isa() then returns Isa::Avx512 and use_amx() returns true. One AMX path is the default where AMX is
// usable: binary_conv2d_prepacked's (amx_for_prepacked_conv), which reads its A tiles straight from a padded int8
// image and measured faster than VPOPCNTD. The older AMX paths of binary_linear / binary_conv2d / binary_bmm
// (per-block activation copies streamed from L2) stay opt-in (QUANTKIT_CPU_ISA=amx): they measured slower.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace quantkit {
namespace cpu {

enum class Isa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };

#if defined(__x86_64__) || defined(__i386__)
#define QUANTKIT_X86 1
#define QK_TARGET_AVX2 __attribute__((target("avx2,fma,popcnt,bmi,bmi2")))
#define QK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx512bitalg,avx2,fma,popcnt,bmi,bmi2")))
#else
#define QUANTKIT_X86 0
#endif

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

// The best level this machine supports (cached).
inline Isa best_supported_isa() {
  static const Isa best = [] {
#if QUANTKIT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi2"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt") &&
        __builtin_cpu_supports("bmi2"))
      return Isa::Avx2;
#endif
    return Isa::Portable;
  }();
  return best;
}

// Whether the CPU has AMX-TILE + AMX-INT8, the OS enabled the tile state (XCR0 bits 17-18) and granted this
// process permission to use it (Linux ARCH_REQ_XCOMP_PERM for XTILEDATA). Checked once.
inline bool amx_supported() {
  static const bool ok = [] {
#if defined(__x86_64__) && defined(__linux__)
    if (best_supported_isa() != Isa::Avx512) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
    if (!tile || !int8) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

// Whether the binary tile should prefetch its residual / float-output rows ahead (binary_tile_impl.h): measured to
// help at batch 16 on AMD Zen 5, where those rows otherwise waited on memory, and to lose time on an Intel Sapphire
// Rapids VM in a same-process A/B on ResNet-18's shapes, most at batch 16 (docs/kernels.md#fused-epilogues). So: on
// AMD CPUs only. Checked once.
inline bool binary_rows_prefetch() {
  static const bool amd = [] {
#if defined(__x86_64__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "Auth" "enti" "cAMD"
#else
    return false;
#endif
  }();
  return amd;
}

// Whether kernels with an AMX path should use it for this call (see QUANTKIT_CPU_ISA above).
inline bool use_amx() {
  const char* env = std::getenv("QUANTKIT_CPU_ISA");
  if (env == nullptr || std::strcmp(env, "amx") != 0) return false;
  TORCH_CHECK(amx_supported(), "QUANTKIT_CPU_ISA=amx but this CPU/OS does not provide AMX-INT8 tiles; unset it "
              "or choose avx512, avx2 or portable");
  return true;
}

// Whether binary_conv2d_prepacked takes its AMX path (given the layer's AMX weight masks): by default wherever
// AMX-INT8 is usable (there it measured faster than the VPOPCNTD path, docs/kernels.md#amx-prepacked-conv), and with
// QUANTKIT_CPU_ISA=amx; never when a lower level is asked for.
inline bool amx_for_prepacked_conv() {
  const char* env = std::getenv("QUANTKIT_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return amx_supported();
  return use_amx();
}

// The level to use for this call: best_supported_isa(), lowered by QUANTKIT_CPU_ISA.
inline Isa active_isa() {
  const Isa best = best_supported_isa();
  const char* env = std::getenv("QUANTKIT_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "amx") == 0) {
    // refused here, at selection, so that no op (whatever its size) runs with an unavailable level
    TORCH_CHECK(amx_supported(), "QUANTKIT_CPU_ISA=amx but this CPU/OS does not provide AMX-INT8 tiles; unset it "
                "or choose avx512, avx2 or portable");
    want = Isa::Avx512;
  } else if (std::strcmp(env, "portable") == 0) {
    want = Isa::Portable;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::Avx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = Isa::Avx512;
  } else {
    TORCH_CHECK(false, "QUANTKIT_CPU_ISA='", env, "' is not one of auto, portable, avx2, avx512, amx");
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "QUANTKIT_CPU_ISA=", env,
              " asks for an instruction set this CPU does not support (best available: ", isa_name(best),
              "); unset it or choose a lower level");
  return want;
}

}  // namespace cpu
}  // namespace quantkit
