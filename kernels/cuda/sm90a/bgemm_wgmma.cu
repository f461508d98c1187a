// quantkit._C_sm90a: the Hopper (sm_90a) binary GEMM on `wgmma.mma_async ... m64n128k256 .s32.b1.b1.and.popc`
// (SASS BGMMA). Built only with -gencode=arch=compute_90a,code=sm_90a (setup.py). It computes exactly the
// problem and epilogues of kernels/cuda/bgemm_common.cuh; quantkit._C finds `quantkit_sm90a_bgemm` with dlopen
// (kernels/cuda/bgemm.cu), self-checks it against the mma.sync kernel once per device and falls back when the
// check fails, so this library can never make results wrong silently.
//
// Kernel: 2 warpgroups (256 threads), block tile 128 x 128, each warpgroup one m64n128 accumulator (64 s32
// registers per thread); K staged 512 bits per stage through a 4-stage cp.async ring (prefetch distance 2, so one
// wgmma group stays in flight while the next stage lands). Shared tiles use the no-swizzle K-major canonical layout:
// 8-row x 16-byte core matrices, rows 16 B apart, 8-row groups 128 B apart (SBO), 16-byte K chunks BM*16 B apart
// (LBO). The conv gather (implicit GEMM, exact zero padding) is the same as the mma.sync kernel's.
#include <Python.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "cuda/bgemm_common.cuh"

namespace quantkit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 128, kBN = 128;
constexpr int kBKW = 16;  // words per stage (2 wgmma k-steps of 256 bits)
constexpr int kStages = 4;
constexpr int kPrefetch = kStages - 2;
constexpr int kStageWordsA = kBM * kBKW, kStageWordsB = kBN * kBKW;
// A 32 KB guard after the tables keeps every descriptor interpretation inside the allocation: with the LBO/SBO
// roles swapped (descriptor variant 1, or a misread of the layout rules) the tensor cores would read wrong data
// (caught by the self-check) but never fault on an out-of-range shared address, which would kill the context.
constexpr int kGuardBytes = 32 * 1024;
constexpr int kSmemBytes =
    kStages * (kStageWordsA + kStageWordsB) * 4 + kBM * (int)sizeof(RowInfo) + kBN * 4 + kGuardBytes;

__device__ __forceinline__ uint64_t make_desc(const void* smem_ptr, unsigned lbo_bytes, unsigned sbo_bytes) {
  const uint64_t addr = smem_u32(smem_ptr);
  uint64_t d = (addr & 0x3FFFFull) >> 4;
  d |= (uint64_t)((lbo_bytes & 0x3FFFFu) >> 4) << 16;
  d |= (uint64_t)((sbo_bytes & 0x3FFFFu) >> 4) << 32;
  return d;  // base offset 0, swizzle mode 0 (none)
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_b1_and_m64n128(int (&d)[64], uint64_t da, uint64_t db) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k256.s32.b1.b1.and.popc "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, 1;\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(da), "l"(db)
      : "memory");
#endif
}

template <bool VEC4>
__global__ void __launch_bounds__(kThreads, 1) bgemm_wgmma_kernel(const BgemmParams p, int z_base, int variant) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint32_t* As = reinterpret_cast<uint32_t*>(smem_raw);  // [stages][4 chunks][kBM rows][4 words]
  uint32_t* Bs = As + kStages * kStageWordsA;  // [stages][4 chunks][kBN rows][4 words]
  RowInfo* rows = reinterpret_cast<RowInfo*>(Bs + kStages * kStageWordsB);
  int* coltot = reinterpret_cast<int*>(rows + kBM);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int wg = tid >> 7;  // warpgroup: rows 64*wg .. 64*wg+63 of the tile
  const int wq = (tid >> 5) & 3;  // warp within the warpgroup: rows 16*wq .. of the m64 tile
  const int g = lane >> 2, t = lane & 3;
  const int z = z_base + blockIdx.z;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const uint32_t* A = p.A + (long long)z * p.a_bstride;
  const uint32_t* B = p.B + (long long)z * p.b_bstride;

  for (int r = tid; r < kBM; r += kThreads) make_row_info(p, z, m0 + r, rows[r]);
  for (int c = tid; c < kBN; c += kThreads) coltot[c] = col_total(p, z, n0 + c);
  __syncthreads();

  const int KT = (p.KW + kBKW - 1) / kBKW;

  auto load_stage = [&](int slot, int kt) {
    uint32_t* as = As + slot * kStageWordsA;
    uint32_t* bs = Bs + slot * kStageWordsB;
    if (VEC4) {
      const int q = tid & 3;  // 16-byte chunk q of the stage
      const KIndex k = k_index(p, kt * kBKW + q * 4);
#pragma unroll
      for (int idx = tid; idx < kBM * 4; idx += kThreads) {
        const int r = idx >> 2;
        const long long off = a_offset(p, rows[r], k);
        cp_async16(as + (q * kBM + r) * 4, off >= 0 ? A + off : A, off >= 0 ? 16 : 0);
      }
#pragma unroll
      for (int idx = tid; idx < kBN * 4; idx += kThreads) {
        const int r = idx >> 2;
        const int n = n0 + r;
        const bool ok = k.ok && n < p.N;
        const uint32_t* src = ok ? B + (long long)n * p.KW + (kt * kBKW + q * 4) : B;
        cp_async16(bs + (q * kBN + r) * 4, src, ok ? 16 : 0);
      }
    } else {
      const int q = tid & 15;  // word q of the stage: chunk q/4, word q%4 of the chunk
      const KIndex k = k_index(p, kt * kBKW + q);
#pragma unroll
      for (int idx = tid; idx < kBM * 16; idx += kThreads) {
        const int r = idx >> 4;
        const long long off = a_offset(p, rows[r], k);
        cp_async4(as + ((q >> 2) * kBM + r) * 4 + (q & 3), off >= 0 ? A + off : A, off >= 0 ? 4 : 0);
      }
#pragma unroll
      for (int idx = tid; idx < kBN * 16; idx += kThreads) {
        const int r = idx >> 4;
        const int n = n0 + r;
        const bool ok = k.ok && n < p.N;
        const uint32_t* src = ok ? B + (long long)n * p.KW + (kt * kBKW + q) : B;
        cp_async4(bs + ((q >> 2) * kBN + r) * 4 + (q & 3), src, ok ? 4 : 0);
      }
    }
  };

  int d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0;

  // Descriptor strides: LBO = distance between the two 16-byte K chunks of one k-step, SBO = between 8-row
  // groups (PTX ISA, K-major no-swizzle canonical layout). Variant 1 swaps them (checked at run time).
  const unsigned lbo_a = kBM * 16, lbo_b = kBN * 16, sbo = 128;

#pragma unroll 1
  for (int s = 0; s < kPrefetch; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
#pragma unroll 1
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kPrefetch - 1>();  // stage kt landed (this thread's copies)
    fence_proxy_async();  // make them visible to the tensor cores (async proxy)
    wgmma_wait<1>();  // this warpgroup's wgmma of stage kt-2 is done ...
    __syncthreads();  // ... and everyone's; everyone's copies of stage kt are visible
    {
      const int next = kt + kPrefetch;  // refills the slot stage kt-2 used
      if (next < KT) load_stage(next % kStages, next);
      cp_async_commit();
    }
    const uint32_t* as = As + (kt % kStages) * kStageWordsA;
    const uint32_t* bs = Bs + (kt % kStages) * kStageWordsB;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const uint32_t* a_tile = as + (2 * ks * kBM + 64 * wg) * 4;
      const uint32_t* b_tile = bs + (2 * ks * kBN) * 4;
      const uint64_t da = variant == 0 ? make_desc(a_tile, lbo_a, sbo) : make_desc(a_tile, sbo, lbo_a);
      const uint64_t db = variant == 0 ? make_desc(b_tile, lbo_b, sbo) : make_desc(b_tile, sbo, lbo_b);
      wgmma_b1_and_m64n128(d, da, db);
    }
    wgmma_commit();
  }
  wgmma_wait<0>();
  cp_async_wait<0>();

  // Epilogue: d[4i + 2h + e] is row 64*wg + 16*wq + g + 8h, column 8i + 2t + e.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rl = 64 * wg + 16 * wq + g + 8 * h;
    const int m = m0 + rl;
    const RowInfo ri = rows[rl];
    if (p.epi == kEpiThreshold) {
#pragma unroll
      for (int wd = 0; wd < kBN / 32; ++wd) {
        unsigned bits = 0;
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int i = wd * 4 + ii;
            const int nl = i * 8 + 2 * t + e;
            const int n = n0 + nl;
            if (m < p.M && n < p.N) {
              const int V = row_col_v(p, z, ri, n, coltot[nl]);
              bits |= threshold_bit(p, n, d[4 * i + 2 * h + e], ri.U, V, ri.nv) << (ii * 8 + 2 * t + e);
            }
          }
        bits |= __shfl_xor_sync(0xffffffffu, bits, 1);
        bits |= __shfl_xor_sync(0xffffffffu, bits, 2);
        const int word = (n0 >> 5) + wd;
        if (t == 0 && m < p.M && word * 32 < p.N) {
          static_cast<uint32_t*>(p.out)[(long long)z * p.out_bstride + (long long)m * p.ldo + word] = bits;
        }
      }
    } else if (m < p.M) {
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int nl = i * 8 + 2 * t + e;
          const int n = n0 + nl;
          if (n < p.N) {
            const int V = row_col_v(p, z, ri, n, coltot[nl]);
            store_value(p, z, m, n, d[4 * i + 2 * h + e], ri.U, V, ri.nv);
          }
        }
    }
  }
#else
  __trap();
#endif
}

template <bool VEC4>
int launch(const BgemmParams& p, cudaStream_t stream, int variant) {
  auto kernel = bgemm_wgmma_kernel<VEC4>;
  static std::once_flag flags[64];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return (int)err;
  std::call_once(flags[dev & 63], [&] {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  });
  if (err != cudaSuccess) return (int)err;
  for (int zb = 0; zb < p.batch; zb += 65535) {
    const int nz = p.batch - zb < 65535 ? p.batch - zb : 65535;
    dim3 grid((p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN, nz);
    kernel<<<grid, kThreads, kSmemBytes, stream>>>(p, zb, variant);
    err = cudaGetLastError();
    if (err != cudaSuccess) return (int)err;
  }
  return 0;
}

}  // namespace
}  // namespace cuda
}  // namespace quantkit

// 0 = launched, 1 = unsupported problem (the caller falls back), 2 = ABI mismatch, else a cudaError_t.
extern "C" __attribute__((visibility("default"))) int quantkit_sm90a_bgemm(const quantkit::cuda::BgemmParams* p,
                                                                           cudaStream_t stream, int variant) {
  using namespace quantkit::cuda;
  if (p == nullptr || p->abi_version != kBgemmAbiVersion) return 2;
  if (p->op != kOpAndPopc || p->kh < 1 || p->kh > 32 || p->kw < 1 || p->kw > 32) return 1;
  if (p->M <= 0 || p->N <= 0 || p->batch <= 0) return 0;
  const bool vec4 = p->Wc % 4 == 0 && (reinterpret_cast<uintptr_t>(p->A) & 15) == 0 &&
                    (reinterpret_cast<uintptr_t>(p->B) & 15) == 0 && p->a_bstride % 4 == 0 && p->b_bstride % 4 == 0;
  return vec4 ? launch<true>(*p, stream, variant) : launch<false>(*p, stream, variant);
}

// `import quantkit._C_sm90a` works too (quantkit.ops._load imports it); the kernels are reached through
// quantkit_sm90a_bgemm above.
extern "C" PyObject* PyInit__C_sm90a(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_sm90a", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
