// The one AND-popcount implicit-GEMM problem description shared by every CUDA kernel of quantkit (CUDA-core
// fallback, mma.sync tensor cores, sm_90a wgmma in quantkit._C_sm90a) and the device helpers they all use for
// the operand gather and the fused epilogue. Plain C++ structs only: the struct crosses the boundary between the
// two shared libraries by address, so both are compiled from this header.
//
// Problem (bit layout: quantkit/ops/layout.py):
//   rows m = (img, oy, ox) output pixels (linear / bmm: img = m, 1x1 "image", 1x1 kernel);
//   columns n = output channels;
//   reduction over KW = taps * Wc 32-bit words, tap t = (ky, kx), word c of the pixel's channel words;
//   A word (m, t, c) = act[img, oy*sy - py + ky*dy, ox*sx - px + kx*dx, c]   (0 outside the image: exact padding)
//   B word (n, t, c) = wgt[n, t, c]                                           (contiguous rows of KW words)
//   P[m, n] = sum over words of OP(A, B) with OP = popcount(a & b) (binary, thermometer adder) or the byte-wise
//   |a - b| sum (vabsdiff4, 8-bit adder) or |a - b| of int32 words (wide adder).
// Epilogue inputs besides P, all "over the VALID taps of row m":
//   U[m]    = sum of pix[img, iy, ix]   (pix: per-pixel popcount of the activation words, or 0 when pix == null)
//   V[m, n] = sum of tab[n, t]          (tab: per-(channel, tap) table, e.g. the weight popcount per tap)
//   nv[m]   = valid taps * kbits        (kbits = true reduction length of one tap, c_in for binary conv)
#pragma once

#include <cstdint>

namespace quantkit {
namespace cuda {

// Version of the struct below; the sm_90a library refuses a mismatching caller.
constexpr int kBgemmAbiVersion = 3;

enum BgemmOp : int {
  kOpAndPopc = 0,  // popcount(a & b): tensor cores (mma.sync / wgmma) or CUDA cores
  kOpVabsdiff4 = 1,  // sum of |a_byte - b_byte| over the 4 bytes (vabsdiff4), CUDA cores only
  kOpAbsdiff32 = 2,  // |a - b| of the int32 words, CUDA cores only
};

enum BgemmEpi : int {
  kEpiDot = 0,  // int32:  4P - 2U - 2V + nv                       (sum of s_a * s_w over valid taps)
  kEpiDot01 = 1,  // int32:  2P - U                                  ({0,1} x {+-1})
  kEpiAffine = 2,  // float: scale*dot + act_sum_scale*(2U-nv) + weight_sum_scale*(2V-nv) + count_scale*nv + bias
  kEpiThreshold = 3,  // bits:  affine y >= threshold[n], packed along n (bit n%32 of word n/32)
  kEpiAdderInt = 4,  // int32:  S = U + pcoef*P + V + tot[n]        (written to column col_map[n])
  kEpiAdderAffine = 5,  // float: -delta[col] * S + bias[col]
};

struct BgemmParams {
  int abi_version;
  int op;  // BgemmOp
  int epi;  // BgemmEpi
  // operands (32-bit words); per batch z the pointers advance by the batch strides (in elements)
  const uint32_t* A;
  const uint32_t* B;
  long long a_bstride, b_bstride;
  int batch;
  int M, N;
  int Wc;  // words per tap
  int KW;  // taps * Wc
  // geometry (linear / bmm: all 1 / 0)
  int H, W, Ho, Wo, kh, kw, sy, sx, py, px, dy, dx;
  int kbits;  // true reduction length per tap
  // epilogue tables
  const int32_t* pix;  // [batch][imgs*H*W] or null (U = 0)
  long long pix_bstride;
  const int32_t* tab;  // [batch][N][taps] or null (V = 0)
  long long tab_bstride;
  const int32_t* tot;  // [N] (adder) or null
  const int32_t* col_map;  // [N] output column of local column n (adder groups) or null (identity)
  int pcoef;  // adder: coefficient of P in S (-2 thermometer, +1 absdiff)
  // per-channel epilogue vectors (float32, indexed by the OUTPUT column); null = default (scale 1, others 0)
  const float* scale;
  const float* act_sum_scale;
  const float* weight_sum_scale;
  const float* count_scale;
  const float* bias;
  const float* threshold;
  const float* delta;
  // output: element (z, m, col) at out + z*out_bstride + m*ldo + col  (ldo in elements: floats, int32s or
  // words for the threshold epilogue, whose "col" is the word index)
  void* out;
  long long out_bstride;
  long long ldo;
};

#if defined(__CUDACC__)

// ------------------------------------------------------------------------------------------------ row info
// Per output row of a tile, computed once per block (shared memory): where its pixel is, and the epilogue terms
// that depend on the row only.
struct RowInfo {
  int img_off;  // img * H * W (pixel index of the image's first pixel), or -1 for rows >= M
  int iy0, ix0;  // top-left input coordinate of the receptive field
  int U;  // sum of pix over the valid taps
  unsigned ymask, xmask;  // bit ky / kx set when that kernel row / column lands inside the image
  int nv;  // valid taps * kbits
};

__device__ __forceinline__ unsigned full_mask(int n) { return n >= 32 ? 0xffffffffu : ((1u << n) - 1u); }

__device__ __forceinline__ void make_row_info(const BgemmParams& p, int z, int m, RowInfo& r) {
  if (m >= p.M) {
    r.img_off = -1;
    r.iy0 = r.ix0 = 0;
    r.U = 0;
    r.ymask = r.xmask = 0;
    r.nv = 0;
    return;
  }
  const int hw_out = p.Ho * p.Wo;
  const int img = m / hw_out;
  const int rem = m - img * hw_out;
  const int oy = rem / p.Wo;
  const int ox = rem - oy * p.Wo;
  r.img_off = img * p.H * p.W;
  r.iy0 = oy * p.sy - p.py;
  r.ix0 = ox * p.sx - p.px;
  unsigned ym = 0, xm = 0;
  for (int ky = 0; ky < p.kh; ++ky) {
    const int iy = r.iy0 + ky * p.dy;
    if (iy >= 0 && iy < p.H) ym |= 1u << ky;
  }
  for (int kx = 0; kx < p.kw; ++kx) {
    const int ix = r.ix0 + kx * p.dx;
    if (ix >= 0 && ix < p.W) xm |= 1u << kx;
  }
  r.ymask = ym;
  r.xmask = xm;
  r.nv = __popc(ym) * __popc(xm) * p.kbits;
  int u = 0;
  if (p.pix != nullptr) {
    const int32_t* pix = p.pix + (long long)z * p.pix_bstride + r.img_off;
    for (unsigned yb = ym; yb; yb &= yb - 1) {
      const int iy = r.iy0 + (__ffs(yb) - 1) * p.dy;
      for (unsigned xb = xm; xb; xb &= xb - 1) {
        const int ix = r.ix0 + (__ffs(xb) - 1) * p.dx;
        u += pix[iy * p.W + ix];
      }
    }
  }
  r.U = u;
}

// Sum of tab[n, t] over all taps (the value of V for interior rows).
__device__ __forceinline__ int col_total(const BgemmParams& p, int z, int n) {
  if (p.tab == nullptr || n >= p.N) return 0;
  const int taps = p.kh * p.kw;
  const int32_t* t = p.tab + (long long)z * p.tab_bstride + (long long)n * taps;
  int s = 0;
  for (int i = 0; i < taps; ++i) s += t[i];
  return s;
}

// V[m, n]: sum of tab[n, t] over the valid taps of row r (coltot = the all-taps sum).
__device__ __forceinline__ int row_col_v(const BgemmParams& p, int z, const RowInfo& r, int n, int coltot) {
  if (p.tab == nullptr) return 0;
  if (r.ymask == full_mask(p.kh) && r.xmask == full_mask(p.kw)) return coltot;
  const int32_t* t = p.tab + (long long)z * p.tab_bstride + (long long)n * (p.kh * p.kw);
  int s = 0;
  for (unsigned yb = r.ymask; yb; yb &= yb - 1) {
    const int ky = __ffs(yb) - 1;
    for (unsigned xb = r.xmask; xb; xb &= xb - 1) s += t[ky * p.kw + (__ffs(xb) - 1)];
  }
  return s;
}

// ------------------------------------------------------------------------------------------------ gather
// Word decomposition of reduction index j (same for every row): tap (ky, kx) and channel word c.
struct KIndex {
  int ky, kx, c;
  bool ok;  // j < KW
};

__device__ __forceinline__ KIndex k_index(const BgemmParams& p, int j) {
  KIndex k;
  k.ok = j < p.KW;
  const int jj = k.ok ? j : 0;
  const int tap = jj / p.Wc;
  k.c = jj - tap * p.Wc;
  k.ky = tap / p.kw;
  k.kx = tap - k.ky * p.kw;
  return k;
}

// Word offset (from the batch's A base) of A[row, j], or -1 when the word is zero (padding, row >= M, j >= KW).
__device__ __forceinline__ long long a_offset(const BgemmParams& p, const RowInfo& r, const KIndex& k) {
  if (!k.ok || r.img_off < 0) return -1;
  const int iy = r.iy0 + k.ky * p.dy;
  const int ix = r.ix0 + k.kx * p.dx;
  if (iy < 0 || iy >= p.H || ix < 0 || ix >= p.W) return -1;
  return ((long long)r.img_off + (long long)iy * p.W + ix) * p.Wc + k.c;
}

// ------------------------------------------------------------------------------------------------ epilogue
// Float value of the affine epilogue (also the value compared with the threshold).
__device__ __forceinline__ float affine_value(const BgemmParams& p, int col, int P, int U, int V, int nv) {
  const int dot = 4 * P - 2 * U - 2 * V + nv;
  float y = p.bias ? p.bias[col] : 0.0f;
  if (p.count_scale) y = fmaf(p.count_scale[col], (float)nv, y);
  if (p.weight_sum_scale) y = fmaf(p.weight_sum_scale[col], (float)(2 * V - nv), y);
  if (p.act_sum_scale) y = fmaf(p.act_sum_scale[col], (float)(2 * U - nv), y);
  y = fmaf(p.scale ? p.scale[col] : 1.0f, (float)dot, y);
  return y;
}

// Store one output (not for the threshold epilogue, which packs bits across columns).
__device__ __forceinline__ void store_value(const BgemmParams& p, int z, int m, int n, int P, int U, int V, int nv) {
  const long long base = (long long)z * p.out_bstride + (long long)m * p.ldo;
  switch (p.epi) {
    case kEpiDot:
      static_cast<int32_t*>(p.out)[base + n] = 4 * P - 2 * U - 2 * V + nv;
      break;
    case kEpiDot01:
      static_cast<int32_t*>(p.out)[base + n] = 2 * P - U;
      break;
    case kEpiAffine:
      static_cast<float*>(p.out)[base + n] = affine_value(p, n, P, U, V, nv);
      break;
    case kEpiAdderInt:
    case kEpiAdderAffine: {
      const int col = p.col_map ? p.col_map[n] : n;
      const int s = U + p.pcoef * P + V + (p.tot ? p.tot[n] : 0);
      if (p.epi == kEpiAdderInt) {
        static_cast<int32_t*>(p.out)[base + col] = s;
      } else {
        const float b = p.bias ? p.bias[col] : 0.0f;
        static_cast<float*>(p.out)[base + col] = fmaf(-p.delta[col], (float)s, b);
      }
      break;
    }
    default:
      break;
  }
}

// Threshold bit of one output (false outside the matrix).
__device__ __forceinline__ unsigned threshold_bit(const BgemmParams& p, int n, int P, int U, int V, int nv) {
  return affine_value(p, n, P, U, V, nv) >= p.threshold[n] ? 1u : 0u;
}

// ------------------------------------------------------------------------------------------------ cp.async
__device__ __forceinline__ unsigned smem_u32(const void* ptr) {
  return static_cast<unsigned>(__cvta_generic_to_shared(ptr));
}

// 16-byte async copy; src_bytes = 0 writes zeros (the source is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace quantkit
