// AND-popcount implicit GEMM on CUDA: the mma.sync m16n8k256 b1 AND tensor-core kernel (sm_80+), the path
// ladder, and the loader of the sm_90a wgmma kernel that lives in the separate library quantkit._C_sm90a.
// The CUDA-core kernel and the pre-passes are in bgemm_simt.cu (a separate file so the two compile in parallel).
// Problem definition and epilogues: kernels/cuda/bgemm_common.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#if defined(__linux__)
#include <dlfcn.h>
#endif

#include "cuda/bgemm_common.cuh"
#include "cuda/bgemm_host.h"

namespace quantkit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// ================================================================================================ mma.sync kernel
// Block tile BM x BN, 8 warps as WM x WN, warp tile (BM/WM) x 32; K staged 16 words (512 bits) per stage in a
// 3-stage cp.async pipeline. Shared rows are padded to 20 words so that the fragment loads (8 rows x 4 words per
// phase) hit 32 distinct banks.
constexpr int kMmaStages = 3;
constexpr int kMmaBKW = 16;
constexpr int kMmaLds = 20;

template <int BM, int BN>
constexpr int mma_smem_bytes() {
  return kMmaStages * (BM + BN) * kMmaLds * 4 + BM * (int)sizeof(RowInfo) + BN * 4;
}

__device__ __forceinline__ void mma_b1_and(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <int BM, int BN, int WM, int WN, bool VEC4>
__global__ void __launch_bounds__(kThreads) bgemm_mma_kernel(const BgemmParams p, int z_base) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(WM * WN * 32 == kThreads, "8 warps");
  static_assert(BN == WN * 32, "warp tile is 32 columns wide (one packed output word)");
  constexpr int WTM = BM / WM;
  constexpr int MT = WTM / 16;
  static_assert(MT >= 1 && WTM % 16 == 0, "warp rows");
  constexpr int NT = 4;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t* As = reinterpret_cast<uint32_t*>(smem_raw);  // [stages][BM][kMmaLds]
  uint32_t* Bs = As + kMmaStages * BM * kMmaLds;  // [stages][BN][kMmaLds]
  RowInfo* rows = reinterpret_cast<RowInfo*>(Bs + kMmaStages * BN * kMmaLds);  // [BM]
  int* coltot = reinterpret_cast<int*>(rows + BM);  // [BN]

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int z = z_base + blockIdx.z;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const uint32_t* A = p.A + (long long)z * p.a_bstride;
  const uint32_t* B = p.B + (long long)z * p.b_bstride;

  for (int r = tid; r < BM; r += kThreads) make_row_info(p, z, m0 + r, rows[r]);
  for (int c = tid; c < BN; c += kThreads) coltot[c] = col_total(p, z, n0 + c);
  __syncthreads();

  const int KT = (p.KW + kMmaBKW - 1) / kMmaBKW;

  auto load_stage = [&](int slot, int kt) {
    uint32_t* as = As + slot * BM * kMmaLds;
    uint32_t* bs = Bs + slot * BN * kMmaLds;
    if (VEC4) {
      const int q = tid & 3;  // the same 4-word chunk of the stage for every row this thread copies
      const KIndex k = k_index(p, kt * kMmaBKW + q * 4);
#pragma unroll
      for (int idx = tid; idx < BM * 4; idx += kThreads) {
        const int r = idx >> 2;
        const long long off = a_offset(p, rows[r], k);
        cp_async16(as + r * kMmaLds + q * 4, off >= 0 ? A + off : A, off >= 0 ? 16 : 0);
      }
#pragma unroll
      for (int idx = tid; idx < BN * 4; idx += kThreads) {
        const int r = idx >> 2;
        const int n = n0 + r;
        const bool ok = k.ok && n < p.N;
        const uint32_t* src = ok ? B + (long long)n * p.KW + (kt * kMmaBKW + q * 4) : B;
        cp_async16(bs + r * kMmaLds + q * 4, src, ok ? 16 : 0);
      }
    } else {
      const int q = tid & 15;
      const KIndex k = k_index(p, kt * kMmaBKW + q);
#pragma unroll
      for (int idx = tid; idx < BM * 16; idx += kThreads) {
        const int r = idx >> 4;
        const long long off = a_offset(p, rows[r], k);
        cp_async4(as + r * kMmaLds + q, off >= 0 ? A + off : A, off >= 0 ? 4 : 0);
      }
#pragma unroll
      for (int idx = tid; idx < BN * 16; idx += kThreads) {
        const int r = idx >> 4;
        const int n = n0 + r;
        const bool ok = k.ok && n < p.N;
        const uint32_t* src = ok ? B + (long long)n * p.KW + (kt * kMmaBKW + q) : B;
        cp_async4(bs + r * kMmaLds + q, src, ok ? 4 : 0);
      }
    }
  };

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  // Prologue: stages 0 .. S-2 in flight (one commit group each, empty groups keep the counting uniform).
#pragma unroll
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kMmaStages - 2>();  // stage kt has landed (this thread's copies)
    __syncthreads();  // ... everyone's; and everyone finished computing on the slot refilled below
    {
      const int next = kt + kMmaStages - 1;
      if (next < KT) load_stage(next % kMmaStages, next);
      cp_async_commit();
    }
    const uint32_t* as = As + (kt % kMmaStages) * BM * kMmaLds;
    const uint32_t* bs = Bs + (kt % kMmaStages) * BN * kMmaLds;
#pragma unroll
    for (int kc = 0; kc < kMmaBKW / 8; ++kc) {
      unsigned af[MT][4], bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const uint32_t* r0 = as + (wm * WTM + i * 16 + g) * kMmaLds + kc * 8 + t;
        af[i][0] = r0[0];
        af[i][1] = r0[8 * kMmaLds];
        af[i][2] = r0[4];
        af[i][3] = r0[8 * kMmaLds + 4];
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t* c0 = bs + (wn * 32 + j * 8 + g) * kMmaLds + kc * 8 + t;
        bf[j][0] = c0[0];
        bf[j][1] = c0[4];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_b1_and(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. acc[i][j][2h+e] is row wm*WTM + i*16 + g + 8h, column wn*32 + j*8 + 2t + e.
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rl = wm * WTM + i * 16 + g + 8 * h;
      const int m = m0 + rl;
      const RowInfo ri = rows[rl];
      if (p.epi == kEpiThreshold) {
        unsigned bits = 0;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int nl = wn * 32 + j * 8 + 2 * t + e;
            const int n = n0 + nl;
            if (m < p.M && n < p.N) {
              const int V = row_col_v(p, z, ri, n, coltot[nl]);
              bits |= threshold_bit(p, n, acc[i][j][2 * h + e], ri.U, V, ri.nv) << (j * 8 + 2 * t + e);
            }
          }
        bits |= __shfl_xor_sync(0xffffffffu, bits, 1);
        bits |= __shfl_xor_sync(0xffffffffu, bits, 2);
        const int word = (n0 + wn * 32) >> 5;
        if (t == 0 && m < p.M && word * 32 < p.N) {
          static_cast<uint32_t*>(p.out)[(long long)z * p.out_bstride + (long long)m * p.ldo + word] = bits;
        }
      } else if (m < p.M) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int nl = wn * 32 + j * 8 + 2 * t + e;
            const int n = n0 + nl;
            if (n < p.N) {
              const int V = row_col_v(p, z, ri, n, coltot[nl]);
              store_value(p, z, m, n, acc[i][j][2 * h + e], ri.U, V, ri.nv);
            }
          }
      }
    }
  }
#else
  __trap();  // launched only on sm_80+ (the host checks the device)
#endif
}

// ================================================================================================ host: launch
int device_cc(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if ((int)cache.size() <= device) cache.resize(device + 1, -1);
  if (cache[device] < 0) {
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    cache[device] = prop.major * 10 + prop.minor;
  }
  return cache[device];
}

std::string env_or(const char* name, const char* dflt) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::string(v) : std::string(dflt);
}

template <int BM, int BN, int WM, int WN, bool VEC4>
void launch_mma_cfg(const BgemmParams& p, cudaStream_t stream) {
  constexpr int smem = mma_smem_bytes<BM, BN>();
  auto kernel = bgemm_mma_kernel<BM, BN, WM, WN, VEC4>;
  // Raise the dynamic shared-memory limit once per device (the attribute is per device and function).
  static std::once_flag flags[64];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::call_once(flags[dev & 63], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  });
  const dim3 grid((p.M + BM - 1) / BM, (p.N + BN - 1) / BN, 1);
  detail::launch_batches(kernel, p, grid, kThreads, smem, stream);
}

bool vec4_ok(const BgemmParams& p) {
  return p.Wc % 4 == 0 && (reinterpret_cast<uintptr_t>(p.A) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(p.B) & 15) == 0 && p.a_bstride % 4 == 0 && p.b_bstride % 4 == 0;
}

void launch_mma(const BgemmParams& p, cudaStream_t stream) {
  const bool v4 = vec4_ok(p);
  // Two tile widths keep the build small: 128 columns, or 64 for narrow layers (head dims, small C_out).
  if (p.N > 64) {
    v4 ? launch_mma_cfg<128, 128, 2, 4, true>(p, stream) : launch_mma_cfg<128, 128, 2, 4, false>(p, stream);
  } else {
    v4 ? launch_mma_cfg<128, 64, 4, 2, true>(p, stream) : launch_mma_cfg<128, 64, 4, 2, false>(p, stream);
  }
}

// ------------------------------------------------------------------------------------------------ sm_90a library
// quantkit._C_sm90a exports `int quantkit_sm90a_bgemm(const BgemmParams*, cudaStream_t, int variant)`:
// 0 = launched, 1 = unsupported problem (caller falls back), 2 = ABI mismatch, other = CUDA error code.
// It is found next to this library (same directory, "_C" in the file name replaced by "_C_sm90a") and opened with
// dlopen, so the two libraries share no link-time symbols and either can be missing.
using Sm90aFn = int (*)(const BgemmParams*, cudaStream_t, int);

struct Sm90aState {
  std::once_flag load_once;
  Sm90aFn fn = nullptr;
  std::string load_msg = "not loaded yet";
  std::mutex mu;
  // self-check per device: -2 not run, -1 failed, else the working descriptor variant
  std::vector<int> variant;
  std::string check_msg = "not run";
};

Sm90aState& sm90a() {
  static Sm90aState s;
  return s;
}

void load_sm90a() {
  Sm90aState& s = sm90a();
  std::call_once(s.load_once, [&] {
#if defined(__linux__)
    if (env_or("QUANTKIT_DISABLE_SM90A", "0") == "1") {
      s.load_msg = "disabled by QUANTKIT_DISABLE_SM90A=1";
      return;
    }
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&load_sm90a), &info) == 0 || info.dli_fname == nullptr) {
      s.load_msg = "dladdr failed";
      return;
    }
    std::string self(info.dli_fname);
    const size_t slash = self.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : self.substr(0, slash);
    std::string base = slash == std::string::npos ? self : self.substr(slash + 1);
    if (base.rfind("_C", 0) != 0) {
      s.load_msg = "unexpected library name " + base;
      return;
    }
    const std::string path = dir + "/_C_sm90a" + base.substr(2);
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* e = dlerror();
      s.load_msg = "dlopen(" + path + ") failed: " + (e ? e : "?");
      return;
    }
    s.fn = reinterpret_cast<Sm90aFn>(dlsym(h, "quantkit_sm90a_bgemm"));
    s.load_msg = s.fn ? "loaded " + path : "symbol quantkit_sm90a_bgemm missing in " + path;
#else
    s.load_msg = "sm_90a library loading is implemented for Linux only";
#endif
  });
}

// Deterministic host-side LCG so the self-check does not touch torch's RNG streams.
at::Tensor lcg_words(int64_t n, uint32_t seed) {
  at::Tensor t = at::empty({n}, at::TensorOptions().dtype(at::kInt));
  uint32_t x = seed;
  int32_t* d = t.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    d[i] = static_cast<int32_t>(x ^ (x >> 15));
  }
  return t;
}

// Run the wgmma kernel on a fixed random problem (ragged M, N, K; word-wise and 16-byte loads) and compare it
// with the mma.sync kernel; return the first descriptor variant that matches, or -1.
int sm90a_self_check(int device, std::string& msg) {
  Sm90aState& s = sm90a();
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  std::ostringstream log;
  for (int variant = 0; variant < 2; ++variant) {
    bool ok = true;
    for (int kwords : {44, 13}) {  // 16-byte and 4-byte load paths; K not a multiple of the 256-bit step
      const int M = 300, N = 200;
      at::Tensor a = lcg_words((int64_t)M * kwords, 12345u + kwords).to(at::Device(at::kCUDA, device));
      at::Tensor b = lcg_words((int64_t)N * kwords, 777u + kwords).to(at::Device(at::kCUDA, device));
      at::Tensor out_ref = at::full({M, N}, -7, a.options());
      at::Tensor out = at::full({M, N}, -7, a.options());
      BgemmParams p{};
      p.abi_version = kBgemmAbiVersion;
      p.op = kOpAndPopc;
      p.epi = kEpiDot01;  // 2P - U with U = 0 (no pix): exposes P directly
      p.A = reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>());
      p.B = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
      p.batch = 1;
      p.M = M;
      p.N = N;
      p.Wc = kwords;
      p.KW = kwords;
      p.H = p.W = p.Ho = p.Wo = p.kh = p.kw = p.sy = p.sx = p.dy = p.dx = 1;
      p.kbits = kwords * 32;
      p.ldo = N;
      p.out = out_ref.data_ptr<int32_t>();
      launch_mma(p, stream);
      p.out = out.data_ptr<int32_t>();
      const int rc = s.fn(&p, stream, variant);
      if (rc != 0) {
        log << "variant " << variant << " K=" << kwords * 32 << ": launch returned " << rc << "; ";
        ok = false;
        break;
      }
      const bool same = at::equal(out, out_ref);
      if (!same) {
        log << "variant " << variant << " K=" << kwords * 32 << ": mismatch vs mma.sync; ";
        ok = false;
        break;
      }
    }
    if (ok) {
      log << "variant " << variant << " matches mma.sync";
      msg = log.str();
      return variant;
    }
  }
  msg = log.str();
  return -1;
}

// The working wgmma descriptor variant for `device`, or -1 (library missing, not sm_90, or self-check failed).
int sm90a_variant(int device) {
  if (device_cc(device) != 90) return -1;
  load_sm90a();
  Sm90aState& s = sm90a();
  if (s.fn == nullptr) return -1;
  const std::string forced = env_or("QUANTKIT_SM90A_VARIANT", "");
  if (!forced.empty()) return std::atoi(forced.c_str());
  std::lock_guard<std::mutex> lock(s.mu);
  if ((int)s.variant.size() <= device) s.variant.resize(device + 1, -2);
  if (s.variant[device] == -2) {
    std::string msg;
    s.variant[device] = sm90a_self_check(device, msg);
    s.check_msg = msg;
    if (s.variant[device] < 0) {
      TORCH_WARN("quantkit: the sm_90a wgmma binary GEMM failed its self-check (", msg,
                 "); using the mma.sync kernels instead.");
    }
  }
  return s.variant[device];
}

enum class Path { Simt, Mma, Wgmma };

Path choose_path(const BgemmParams& p, int device, int* variant) {
  *variant = -1;
  if (p.op != kOpAndPopc) return Path::Simt;
  const std::string want = env_or("QUANTKIT_CUDA_BGEMM", "auto");
  const int cc = device_cc(device);
  if (want == "simt") return Path::Simt;
  if (want == "mma") {
    TORCH_CHECK(cc >= 80, "QUANTKIT_CUDA_BGEMM=mma needs an sm_80+ GPU (this one is sm_", cc, ")");
    return Path::Mma;
  }
  if (want == "wgmma") {
    TORCH_CHECK(cc == 90, "QUANTKIT_CUDA_BGEMM=wgmma needs an sm_90 GPU (this one is sm_", cc, ")");
    load_sm90a();
    TORCH_CHECK(sm90a().fn != nullptr, "QUANTKIT_CUDA_BGEMM=wgmma but quantkit._C_sm90a is unavailable: ",
                sm90a().load_msg);
    const std::string forced = env_or("QUANTKIT_SM90A_VARIANT", "0");
    *variant = std::atoi(forced.c_str());
    return Path::Wgmma;
  }
  TORCH_CHECK(want == "auto", "QUANTKIT_CUDA_BGEMM must be auto, simt, mma or wgmma; got '", want, "'");
  if (cc < 80) return Path::Simt;
  // wgmma tiles are 128 x 128: small problems stay on mma.sync.
  if (cc == 90 && p.N >= 64 && (long long)p.M * p.batch >= 128) {
    const int v = sm90a_variant(device);
    if (v >= 0) {
      *variant = v;
      return Path::Wgmma;
    }
  }
  return Path::Mma;
}

}  // namespace

// ================================================================================================ public
void launch_bgemm(const BgemmParams& p) {
  TORCH_CHECK(p.abi_version == kBgemmAbiVersion, "bgemm: params not initialised");
  if (p.M <= 0 || p.N <= 0 || p.batch <= 0) return;
  TORCH_CHECK(p.kh >= 1 && p.kh <= 32 && p.kw >= 1 && p.kw <= 32, "quantkit CUDA kernels support kernel sizes up to 32x32");
  TORCH_CHECK(p.KW == 0 || (p.A != nullptr && p.B != nullptr), "bgemm: null operand");
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  int variant = -1;
  const Path path = choose_path(p, device, &variant);
  if (path == Path::Wgmma) {
    const int rc = sm90a().fn(&p, stream, variant);
    if (rc == 0) return;
    TORCH_CHECK(rc == 1, "quantkit sm_90a binary GEMM failed (code ", rc, ")");
    // rc == 1: a shape the wgmma kernel does not take; mma.sync takes every shape
    launch_mma(p, stream);
  } else if (path == Path::Mma) {
    launch_mma(p, stream);
  } else {
    detail::launch_simt(p, stream);
  }
}

std::string bgemm_path(const BgemmParams& p) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int variant = -1;
  switch (choose_path(p, device, &variant)) {
    case Path::Wgmma:
      return "wgmma";
    case Path::Mma:
      return "mma";
    default:
      return "simt";
  }
}

std::string backend_info() {
  std::ostringstream os;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 0;
  }
  os << "devices=" << count;
  if (count > 0) {
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    const int cc = device_cc(device);
    os << "; device=" << device << " sm_" << cc;
    load_sm90a();
    os << "; sm90a_library=" << sm90a().load_msg;
    if (cc == 90 && sm90a().fn != nullptr) {
      const int v = sm90a_variant(device);
      os << "; sm90a_self_check=" << (v >= 0 ? "passed" : "FAILED") << " (" << sm90a().check_msg << ")";
    }
    BgemmParams p{};
    p.abi_version = kBgemmAbiVersion;
    p.op = kOpAndPopc;
    p.M = 4096;
    p.N = 4096;
    p.batch = 1;
    os << "; large_gemm_path=" << bgemm_path(p);
  }
  return os.str();
}

}  // namespace cuda
}  // namespace quantkit

// Diagnostics only (no tensors): which CUDA path runs, and whether the sm_90a library loaded and self-checked.
TORCH_LIBRARY_FRAGMENT(quantkit, m) { m.def("cuda_backend_info() -> str"); }

TORCH_LIBRARY_IMPL(quantkit, CompositeExplicitAutograd, m) {
  m.impl("cuda_backend_info", [] { return quantkit::cuda::backend_info(); });
}
