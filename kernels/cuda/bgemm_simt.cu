// The CUDA-core AND-popcount / vabsdiff4 / int32 |a-b| implicit GEMM kernel (any GPU; the fallback of the binary
// ladder and the fast path of 7-8-bit adder layers) and the small pre-passes (row popcounts, thermometer codes).
// Problem definition and epilogues: kernels/cuda/bgemm_common.cuh; path choice: bgemm.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/bgemm_common.cuh"
#include "cuda/bgemm_host.h"

namespace quantkit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// ================================================================================================ CUDA-core kernel
// 128 x 128 block tile, 16 x 16 threads, each an 8 x 8 micro-tile (rows ty*4+{0..3} and 64+ty*4+{0..3}, columns
// likewise with tx); K staged 8 words per step, transposed into shared memory (k-major) so that every thread reads
// its 8 row words and 8 column words with two 16-byte loads each; global loads for step k+1 overlap the math of k.
constexpr int kSimtBM = 128, kSimtBN = 128, kSimtBKW = 8, kSimtLds = 132;

template <int OP>
__device__ __forceinline__ unsigned simt_op(unsigned a, unsigned b, unsigned acc) {
  if (OP == kOpAndPopc) {
    return acc + __popc(a & b);
  } else if (OP == kOpVabsdiff4) {
    unsigned d;
    asm("vabsdiff4.u32.u32.u32.add %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(acc));
    return d;
  } else {
    const int diff = (int)a - (int)b;
    return acc + (unsigned)(diff < 0 ? -diff : diff);
  }
}

template <int OP>
__global__ void __launch_bounds__(kThreads) bgemm_simt_kernel(const BgemmParams p, int z_base) {
  __shared__ __align__(16) uint32_t As[kSimtBKW][kSimtLds];
  __shared__ __align__(16) uint32_t Bs[kSimtBKW][kSimtLds];
  __shared__ RowInfo rows[kSimtBM];
  __shared__ int coltot[kSimtBN];

  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int z = z_base + blockIdx.z;
  const int m0 = blockIdx.x * kSimtBM, n0 = blockIdx.y * kSimtBN;
  const uint32_t* A = p.A + (long long)z * p.a_bstride;
  const uint32_t* B = p.B + (long long)z * p.b_bstride;

  for (int r = tid; r < kSimtBM; r += kThreads) make_row_info(p, z, m0 + r, rows[r]);
  for (int c = tid; c < kSimtBN; c += kThreads) coltot[c] = col_total(p, z, n0 + c);
  __syncthreads();

  // This thread copies word q = tid & 7 of rows (tid >> 3) + 32 i, i = 0..3, of both tiles.
  const int q = tid & 7;
  const int r_base = tid >> 3;
  uint32_t ra[4], rb[4];
  auto load_regs = [&](int kt) {
    const int j = kt * kSimtBKW + q;
    const KIndex k = k_index(p, j);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r_base + 32 * i;
      const long long off = a_offset(p, rows[r], k);
      ra[i] = off >= 0 ? A[off] : 0u;
      const int n = n0 + r;
      rb[i] = (k.ok && n < p.N) ? B[(long long)n * p.KW + j] : 0u;
    }
  };

  unsigned acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0;

  const int KT = (p.KW + kSimtBKW - 1) / kSimtBKW;
  if (KT > 0) load_regs(0);
  for (int kt = 0; kt < KT; ++kt) {
    __syncthreads();  // the previous step's reads of As/Bs are done
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      As[q][r_base + 32 * i] = ra[i];
      Bs[q][r_base + 32 * i] = rb[i];
    }
    __syncthreads();
    if (kt + 1 < KT) load_regs(kt + 1);
#pragma unroll
    for (int k = 0; k < kSimtBKW; ++k) {
      const uint4 a_lo = *reinterpret_cast<const uint4*>(&As[k][ty * 4]);
      const uint4 a_hi = *reinterpret_cast<const uint4*>(&As[k][64 + ty * 4]);
      const uint4 b_lo = *reinterpret_cast<const uint4*>(&Bs[k][tx * 4]);
      const uint4 b_hi = *reinterpret_cast<const uint4*>(&Bs[k][64 + tx * 4]);
      const unsigned a[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
      const unsigned b[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = simt_op<OP>(a[i], b[j], acc[i][j]);
    }
  }

  // Epilogue. Row i -> (i < 4 ? ty*4 + i : 64 + ty*4 + i - 4); column j likewise with tx.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int rl = (i < 4 ? 0 : 64) + ty * 4 + (i & 3);
    const int m = m0 + rl;
    const RowInfo ri = rows[rl];
    if (p.epi == kEpiThreshold) {
#pragma unroll
      for (int hc = 0; hc < 2; ++hc) {
        unsigned bits = 0;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int nl = hc * 64 + tx * 4 + jj;
          const int n = n0 + nl;
          if (m < p.M && n < p.N) {
            const int V = row_col_v(p, z, ri, n, coltot[nl]);
            bits |= threshold_bit(p, n, (int)acc[i][hc * 4 + jj], ri.U, V, ri.nv) << ((tx & 7) * 4 + jj);
          }
        }
        // lanes tx, tx^1, tx^2, tx^4 (same ty) hold the 8 x 4 bits of one 32-column word
        bits |= __shfl_xor_sync(0xffffffffu, bits, 1);
        bits |= __shfl_xor_sync(0xffffffffu, bits, 2);
        bits |= __shfl_xor_sync(0xffffffffu, bits, 4);
        const int word = (n0 + hc * 64 + (tx >> 3) * 32) >> 5;
        if ((tx & 7) == 0 && m < p.M && word * 32 < p.N) {
          static_cast<uint32_t*>(p.out)[(long long)z * p.out_bstride + (long long)m * p.ldo + word] = bits;
        }
      }
    } else if (m < p.M) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int nl = (j < 4 ? 0 : 64) + tx * 4 + (j & 3);
        const int n = n0 + nl;
        if (n < p.N) {
          const int V = row_col_v(p, z, ri, n, coltot[nl]);
          store_value(p, z, m, n, (int)acc[i][j], ri.U, V, ri.nv);
        }
      }
    }
  }
}

// ================================================================================================ pre-passes
__global__ void row_popcount_thread_kernel(const uint32_t* __restrict__ w, long long rows, int wc,
                                           int32_t* __restrict__ out) {
  for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < rows;
       r += (long long)gridDim.x * blockDim.x) {
    const uint32_t* row = w + r * wc;
    int s = 0;
    for (int i = 0; i < wc; ++i) s += __popc(row[i]);
    out[r] = s;
  }
}

__global__ void row_popcount_warp_kernel(const uint32_t* __restrict__ w, long long rows, int wc,
                                         int32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  for (long long r = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const uint32_t* row = w + r * wc;
    int s = 0;
    for (int i = lane; i < wc; i += 32) s += __popc(row[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) out[r] = s;
  }
}

// One output word per thread. code_bits <= 32: 32/code_bits values per word; code_bits = 64: two words per value.
__global__ void thermometer_pack_kernel(const int32_t* __restrict__ v, long long rows, int c, int code_bits,
                                        int wc, uint32_t* __restrict__ out) {
  const long long total = rows * (long long)wc;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / wc;
    const int w = (int)(i - r * wc);
    const int32_t* row = v + r * c;
    uint32_t word = 0;
    if (code_bits <= 32) {
      const int per = 32 / code_bits;
      for (int e = 0; e < per; ++e) {
        const int ci = w * per + e;
        if (ci >= c) break;
        const int val = row[ci];  // 0 <= val <= code_bits
        const uint32_t code = val >= 32 ? 0xffffffffu : ((1u << val) - 1u);
        word |= code << (e * code_bits);
      }
    } else {  // 64
      const int ci = w >> 1;
      if (ci < c) {
        const int val = row[ci] - 32 * (w & 1);
        word = val <= 0 ? 0u : (val >= 32 ? 0xffffffffu : ((1u << val) - 1u));
      }
    }
    out[i] = word;
  }
}

}  // namespace

namespace detail {
void launch_simt(const BgemmParams& p, cudaStream_t stream) {
  const dim3 grid((p.M + kSimtBM - 1) / kSimtBM, (p.N + kSimtBN - 1) / kSimtBN, 1);
  switch (p.op) {
    case kOpAndPopc:
      detail::launch_batches(bgemm_simt_kernel<kOpAndPopc>, p, grid, kThreads, 0, stream);
      break;
    case kOpVabsdiff4:
      detail::launch_batches(bgemm_simt_kernel<kOpVabsdiff4>, p, grid, kThreads, 0, stream);
      break;
    default:
      detail::launch_batches(bgemm_simt_kernel<kOpAbsdiff32>, p, grid, kThreads, 0, stream);
      break;
  }
}

}  // namespace detail

at::Tensor row_popcount(const at::Tensor& words, int64_t rows, int64_t wc) {
  TORCH_CHECK(words.is_cuda() && words.scalar_type() == at::kInt && words.is_contiguous(), "row_popcount: bad input");
  TORCH_CHECK(words.numel() == rows * wc, "row_popcount: size mismatch");
  at::Tensor out = at::empty({rows}, words.options());
  if (rows == 0) return out;
  if (wc == 0) return out.zero_();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const uint32_t* w = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  if (wc >= 16) {
    const long long blocks = std::min<long long>((rows + 7) / 8, 1 << 20);
    row_popcount_warp_kernel<<<(unsigned)blocks, 256, 0, stream>>>(w, rows, (int)wc, out.data_ptr<int32_t>());
  } else {
    const long long blocks = std::min<long long>((rows + 255) / 256, 1 << 20);
    row_popcount_thread_kernel<<<(unsigned)blocks, 256, 0, stream>>>(w, rows, (int)wc, out.data_ptr<int32_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor thermometer_pack(const at::Tensor& values, int64_t code_bits) {
  TORCH_CHECK(values.is_cuda() && values.scalar_type() == at::kInt && values.is_contiguous() && values.dim() >= 1,
              "thermometer_pack: bad input");
  TORCH_CHECK(code_bits >= 1 && code_bits <= 64 && (code_bits & (code_bits - 1)) == 0,
              "thermometer_pack: code_bits must be a power of two <= 64");
  const int64_t c = values.size(-1);
  const int64_t rows = c == 0 ? 0 : values.numel() / c;
  const int64_t wc = (c * code_bits + 31) / 32;
  auto sizes = values.sizes().vec();
  sizes.back() = wc;
  at::Tensor out = at::empty(sizes, values.options());
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const long long total = rows * wc;
  const long long blocks = std::min<long long>((total + 255) / 256, 1 << 20);
  thermometer_pack_kernel<<<(unsigned)blocks, 256, 0, stream>>>(values.data_ptr<int32_t>(), rows, (int)c,
                                                                (int)code_bits, (int)wc,
                                                                reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace quantkit
