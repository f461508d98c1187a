// CPU binary (XNOR / AND-popcount) kernels: binary_linear, binary_conv2d, binary_bmm, binary_bmm_01.
// Schemas and the epilogue formula: kernels/register.cpp. Layout: quantkit/ops/layout.py.
//
// Design (docs/kernels.md#cpu-binary-micro-kernel):
//  * one GEMM core for everything: a broadcast outer-product micro-kernel of MR = 8 output rows (pixels) x
//    NR = 16 output channels in 32-bit lanes; per K-word it loads 16 channels' weight words (one zmm), broadcasts
//    one activation word per row and accumulates popcount(a XOR w) (or AND) -- no horizontal reductions; the
//    AVX-512 path runs two channel blocks per call (8 x 32, 16 accumulators);
//  * weights are repacked per call into panels [C_out/16][T][Cw][16] (T taps of Cw words), O(weight size);
//  * conv2d is an indirect GEMM: per output pixel a list of T tap pointers into the NHWC input, padded taps
//    pointing at a buffer of zero words (no im2col copy). A padded tap then adds popcount(w) to the XOR count;
//    the epilogue removes it with a per-(block, tap, channel) weight popcount table, so zero padding is exact;
//  * the epilogue (AdaBin/XNOR affine terms, float NHWC store or thresholded packed bits) runs on the
//    accumulator tile while it is hot, compiled for the same ISA as the micro-kernel;
//  * ISA levels (cpu_features.h): AVX-512 VPOPCNTDQ, AVX2 (vpshufb nibble-LUT byte popcounts, widened every
//    31 words), portable C++, and an opt-in AMX-INT8 path; threads: at::parallel_for over (row blocks x equal
//    channel super-blocks sized to keep their weight panels in L2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "conv_shape.h"
#include "cpu/cpu_features.h"
#include "cpu/memory.h"

namespace quantkit {
namespace cpu {
namespace binary {

constexpr int MR = 8;   // output rows (pixels) per micro-kernel
constexpr int NR = 16;  // output channels per micro-kernel (one zmm of int32 lanes)
constexpr int kPixelGroup = 4;  // pixel blocks that share each weight panel read (binary_tile_impl.h, tile)

// kEpiFused (binary_conv2d_prepacked): the affine terms, then an optional residual add and Maxout, then a float
// store and/or thresholded packed bits -- each part present or not per call (Ctx fields below).
enum : int { kEpiFloat = 0, kEpiBits = 1, kEpiXnorInt = 2, kEpiAnd01 = 3, kEpiFused = 4 };

// One GEMM-like problem (one batch item for bmm).
struct Ctx {
  const uint32_t* x = nullptr;  // GEMM: rows of Cw words; conv: NHWC (N, H, W, Cw)
  int64_t P = 0;                // output rows (GEMM rows, or N*Ho*Wo pixels)
  int64_t T = 1, Cw = 0;        // taps per output row and words per tap
  int64_t c_in = 0;             // elements per tap (GEMM: k)
  int64_t H = 0, W = 0, Ho = 0, Wo = 0, kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  const uint32_t* zbuf = nullptr;  // >= Cw zero words (padded taps, missing rows)
  const uint32_t* panels = nullptr;
  const int32_t* wpop = nullptr;      // [NB][T][NR] popcount of each tap's weight words (conv)
  const int32_t* wpop_tot = nullptr;  // [NB*NR] popcount over all taps (conv)
  const int8_t* bexp = nullptr;       // AMX: weights as int8 +-1 tiles [NB][T*ceil(Cw/2)][16][64] (VNNI order)
  int64_t NB = 0, Nout = 0;
  const float *scale = nullptr, *ass = nullptr, *wss = nullptr, *cs = nullptr, *bias = nullptr, *thr = nullptr;
  bool need_apop = false;
  void* out = nullptr;
  int64_t ldo = 0;  // output row stride: elements (float/int32) or 16-bit halfwords (packed bits)
  // kEpiFused only: out (float rows, may be null), residual rows added before Maxout, Maxout slopes (padded to
  // NB*NR; null = none; mo_finite: every slope finite, the one-multiply form), packed-bit rows (may be null)
  const float* res = nullptr;
  int64_t ldr = 0;
  const float *mpos = nullptr, *mneg = nullptr;
  bool mo_finite = true;
  bool nt_out = false;  // the AMX path's float output as non-temporal stores (full, aligned 16-channel blocks)
  bool pf_rows = false;  // the AMX path prefetches the residual / output rows of its next block
  uint16_t* outb = nullptr;
  int64_t ldb = 0;  // halfwords per row of outb
  // conv with need_apop: popcount of each input pixel's Cw words (N*H*W), so a row's activation popcount is a sum
  // of T table entries instead of T*Cw popcounts (null: count the words)
  const int32_t* xpop = nullptr;
};

// Facts of one output row used by the epilogue.
struct RowInfo {
  int32_t nv = 0;      // valid elements (valid taps * c_in; GEMM: k)
  int32_t apop = 0;    // popcount of the activation bits over the valid taps (when need_apop)
  float asum = 0.f;    // sum of s_a over the valid taps = 2*apop - nv (when need_apop)
  bool border = false; // some taps are padding
  uint64_t pad_taps = 0; // which taps are padding (bit t; kept when T <= 64, else the epilogue scans the taps)
};

using TileFn = void (*)(const Ctx&, int64_t, int64_t, int64_t, int64_t, const uint32_t**);

// ---------------------------------------------------------------------------------------------- portable
namespace portable {
constexpr bool kHasVecEpi = false;  // the epilogue below is the generic one of binary_tile_impl.h
template <bool CONV, int EPI>
inline void vec_epilogue(const Ctx&, int64_t, int64_t, const uint32_t* const*, const RowInfo&, const int32_t*) {}
constexpr bool kHasMk2 = false;
template <bool AND>
inline void mk2(const uint32_t* const*, int64_t, int64_t, const uint32_t*, const uint32_t*, int32_t*, int32_t*) {}
template <bool AND>
inline void mk2_tail(int, const uint32_t* const*, int64_t, int64_t, const uint32_t*, const uint32_t*, int32_t*,
                     int32_t*) {}
template <bool AND>
inline void mk(const uint32_t* const* a, int64_t T, int64_t Cw, const uint32_t* panel, int32_t* acc) {
  for (int q = 0; q < MR * NR; ++q) acc[q] = 0;
  for (int64_t t = 0; t < T; ++t) {
    const uint32_t* wp = panel + t * Cw * NR;
    for (int i = 0; i < MR; ++i) {
      const uint32_t* ai = a[i * T + t];
      int32_t* ac = acc + i * NR;
      for (int64_t w = 0; w < Cw; ++w) {
        const uint32_t av = ai[w];
        const uint32_t* wv = wp + w * NR;
        for (int j = 0; j < NR; ++j) ac[j] += __builtin_popcount(AND ? (av & wv[j]) : (av ^ wv[j]));
      }
    }
  }
}
#include "cpu/binary_tile_impl.h"
}  // namespace portable

#if QUANTKIT_X86
// ---------------------------------------------------------------------------------------------- AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")
namespace avx2 {
// The float / bits / fused epilogue on ymm registers, the 16 channels of a block as two halves of 8 (the generic
// scalar loop took a third of a binary ResNet-18's conv time on an AVX2-only Zen 3). The operations of the AVX-512
// form: y = scale*dot + bias, += act_sum_scale*asum, += (weight_sum_scale*wsum + count_scale*n_valid) (FMAs as
// written), then residual, Maxout (the two forms of kernels/cpu/elementwise.cpp), store / compare. The constant
// vectors are padded to NB*NR channels; the residual and the float output are touched only below C_out.
constexpr bool kHasVecEpi = true;

// lanes l < n set (n may be <= 0 or >= 8)
inline __m256i lanes_below(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <bool CONV, int EPI>
inline void vec_epilogue(const Ctx& c, int64_t cb, int64_t p, const uint32_t* const* pi, const RowInfo& ri,
                         const int32_t* acc) {
  const int64_t col0 = cb * NR;
  const int ncols = static_cast<int>(std::min<int64_t>(NR, c.Nout - col0));
  __m256i inv[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};  // padded taps' weight popcounts
  if (CONV && ri.border) {
    const int32_t* wp = c.wpop + cb * c.T * NR;
    auto add_tap = [&](int64_t t) {
      inv[0] = _mm256_add_epi32(inv[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + t * NR)));
      inv[1] = _mm256_add_epi32(inv[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + t * NR + 8)));
    };
    if (c.T <= 64) {
      for (uint64_t m = ri.pad_taps; m != 0; m &= m - 1) add_tap(__builtin_ctzll(m));
    } else {
      for (int64_t t = 0; t < c.T; ++t)
        if (pi[t] == c.zbuf) add_tap(t);
    }
  }
  const __m256i nv = _mm256_set1_epi32(ri.nv);
  const __m256 nvf = _mm256_set1_ps(static_cast<float>(ri.nv)), asum = _mm256_set1_ps(ri.asum);
  const __m256 zero = _mm256_setzero_ps();
  uint32_t bits = 0;
  for (int h = 0; h < 2; ++h) {
    const int64_t col = col0 + 8 * h;
    const int n = ncols - 8 * h;  // channels of this half below C_out
    if (n <= 0) break;
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 8 * h));
    // XOR form: popcount(a ^ w) over the valid taps = acc - inv (padded taps saw zero activation words)
    const __m256i dot = _mm256_sub_epi32(nv, _mm256_slli_epi32(_mm256_sub_epi32(a, inv[h]), 1));
    __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(c.scale + col), _mm256_cvtepi32_ps(dot), _mm256_loadu_ps(c.bias + col));
    v = _mm256_fmadd_ps(_mm256_loadu_ps(c.ass + col), asum, v);
    if (CONV) {
      const __m256i wt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.wpop_tot + col));
      const __m256 wsum = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_slli_epi32(_mm256_sub_epi32(wt, inv[h]), 1), nv));
      v = _mm256_add_ps(v, _mm256_fmadd_ps(_mm256_loadu_ps(c.wss + col), wsum,
                                           _mm256_mul_ps(_mm256_loadu_ps(c.cs + col), nvf)));
    }
    const __m256i keep = lanes_below(n);
    if (EPI == kEpiFused) {
      if (c.res) {
        const float* r = c.res + p * c.ldr + col;
        v = _mm256_add_ps(v, n >= 8 ? _mm256_loadu_ps(r) : _mm256_maskload_ps(r, keep));
      }
      if (c.mpos) {
        const __m256 mp = _mm256_loadu_ps(c.mpos + col), mn = _mm256_loadu_ps(c.mneg + col);
        if (c.mo_finite) {
          v = _mm256_mul_ps(v, _mm256_blendv_ps(mn, mp, _mm256_cmp_ps(v, zero, _CMP_GT_OQ)));
        } else {  // max(0, v) returns v when v is NaN, as std::max(v, 0.f) does
          const __m256 neg_v = _mm256_xor_ps(v, _mm256_set1_ps(-0.0f));
          v = _mm256_sub_ps(_mm256_mul_ps(mp, _mm256_max_ps(zero, v)), _mm256_mul_ps(mn, _mm256_max_ps(zero, neg_v)));
        }
      }
    }
    if ((EPI == kEpiFused && c.out) || EPI == kEpiFloat) {
      float* dst = static_cast<float*>(c.out) + p * c.ldo + col;
      if (n >= 8) _mm256_storeu_ps(dst, v);
      else _mm256_maskstore_ps(dst, keep, v);
    }
    if ((EPI == kEpiFused && c.outb) || EPI == kEpiBits)
      bits |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_loadu_ps(c.thr + col), _CMP_GE_OQ)))
              << (8 * h);
  }
  if ((EPI == kEpiFused && c.outb) || EPI == kEpiBits) {
    if (ncols < NR) bits &= (1u << ncols) - 1u;  // channels past C_out stay 0 (layout tail rule)
    uint16_t* dst = EPI == kEpiFused ? c.outb + p * c.ldb + cb : static_cast<uint16_t*>(c.out) + p * c.ldo + cb;
    *dst = static_cast<uint16_t>(bits);
  }
}
constexpr bool kHasMk2 = false;
template <bool AND>
inline void mk2(const uint32_t* const*, int64_t, int64_t, const uint32_t*, const uint32_t*, int32_t*, int32_t*) {}
template <bool AND>
inline void mk2_tail(int, const uint32_t* const*, int64_t, int64_t, const uint32_t*, const uint32_t*, int32_t*,
                     int32_t*) {}
static inline __m256i popcnt_bytes(__m256i v, __m256i lut, __m256i low) {
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

template <bool AND>
inline void mk(const uint32_t* const* a, int64_t T, int64_t Cw, const uint32_t* panel, int32_t* acc) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int q = 0; q < MR * NR; ++q) acc[q] = 0;
  // 4 rows x 16 channels per pass: 8 byte accumulators (each byte gains <= 8 per word, so widen every 31 words
  // into the int32 tile in memory: maddubs pairs bytes, madd sums pairs into the 32-bit lane of each channel).
  for (int h = 0; h < MR; h += 4) {
    __m256i b00 = _mm256_setzero_si256(), b01 = b00, b10 = b00, b11 = b00, b20 = b00, b21 = b00, b30 = b00,
            b31 = b00;
    int steps = 0;
    auto flush = [&]() {
      auto widen = [&](__m256i b, int32_t* dst) {
        const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(b, ones8), ones16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst)), d));
      };
      widen(b00, acc + (h + 0) * NR), widen(b01, acc + (h + 0) * NR + 8);
      widen(b10, acc + (h + 1) * NR), widen(b11, acc + (h + 1) * NR + 8);
      widen(b20, acc + (h + 2) * NR), widen(b21, acc + (h + 2) * NR + 8);
      widen(b30, acc + (h + 3) * NR), widen(b31, acc + (h + 3) * NR + 8);
      b00 = b01 = b10 = b11 = b20 = b21 = b30 = b31 = _mm256_setzero_si256();
      steps = 0;
    };
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t* a0 = a[(h + 0) * T + t];
      const uint32_t* a1 = a[(h + 1) * T + t];
      const uint32_t* a2 = a[(h + 2) * T + t];
      const uint32_t* a3 = a[(h + 3) * T + t];
      const uint32_t* wp = panel + t * Cw * NR;
      for (int64_t w = 0; w < Cw; ++w) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + w * NR));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + w * NR + 8));
#define QK_AVX2_ROW(ap, c0, c1)                                                                        \
  {                                                                                                    \
    const __m256i av = _mm256_set1_epi32(static_cast<int>(ap[w]));                                     \
    c0 = _mm256_add_epi8(c0, popcnt_bytes(AND ? _mm256_and_si256(av, w0) : _mm256_xor_si256(av, w0), lut, low)); \
    c1 = _mm256_add_epi8(c1, popcnt_bytes(AND ? _mm256_and_si256(av, w1) : _mm256_xor_si256(av, w1), lut, low)); \
  }
        QK_AVX2_ROW(a0, b00, b01)
        QK_AVX2_ROW(a1, b10, b11)
        QK_AVX2_ROW(a2, b20, b21)
        QK_AVX2_ROW(a3, b30, b31)
#undef QK_AVX2_ROW
        if (++steps == 31) flush();
      }
    }
    flush();
  }
}
#include "cpu/binary_tile_impl.h"
}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx512bitalg,avx2,fma,popcnt,bmi,bmi2")
namespace avx512 {
template <bool AND>
inline void mk(const uint32_t* const* a, int64_t T, int64_t Cw, const uint32_t* panel, int32_t* acc) {
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  for (int64_t t = 0; t < T; ++t) {
    const uint32_t* a0 = a[0 * T + t];
    const uint32_t* a1 = a[1 * T + t];
    const uint32_t* a2 = a[2 * T + t];
    const uint32_t* a3 = a[3 * T + t];
    const uint32_t* a4 = a[4 * T + t];
    const uint32_t* a5 = a[5 * T + t];
    const uint32_t* a6 = a[6 * T + t];
    const uint32_t* a7 = a[7 * T + t];
    const uint32_t* wp = panel + t * Cw * NR;
    for (int64_t w = 0; w < Cw; ++w) {
      const __m512i wv = _mm512_loadu_si512(wp + w * NR);
#define QK_AVX512_ROW(ap, c)                                                                              \
  {                                                                                                       \
    const __m512i av = _mm512_set1_epi32(static_cast<int>(ap[w]));                                        \
    c = _mm512_add_epi32(c, _mm512_popcnt_epi32(AND ? _mm512_and_si512(av, wv) : _mm512_xor_si512(av, wv))); \
  }
      QK_AVX512_ROW(a0, c0)
      QK_AVX512_ROW(a1, c1)
      QK_AVX512_ROW(a2, c2)
      QK_AVX512_ROW(a3, c3)
      QK_AVX512_ROW(a4, c4)
      QK_AVX512_ROW(a5, c5)
      QK_AVX512_ROW(a6, c6)
      QK_AVX512_ROW(a7, c7)
#undef QK_AVX512_ROW
    }
  }
  _mm512_storeu_si512(acc + 0 * NR, c0);
  _mm512_storeu_si512(acc + 1 * NR, c1);
  _mm512_storeu_si512(acc + 2 * NR, c2);
  _mm512_storeu_si512(acc + 3 * NR, c3);
  _mm512_storeu_si512(acc + 4 * NR, c4);
  _mm512_storeu_si512(acc + 5 * NR, c5);
  _mm512_storeu_si512(acc + 6 * NR, c6);
  _mm512_storeu_si512(acc + 7 * NR, c7);
}
// Two channel blocks at once (MR x 2*NR, 16 accumulators): each broadcast activation word feeds two XORs, and the
// per-tap pointer loads are shared by twice the work. R rows of a block (R = MR: a full block; R < MR: a conv's
// partial last pixel block -- 49 output pixels at 7x7, batch 1, are six blocks of 8 and one of 1 -- on which the
// full kernel would spend 8 rows of popcounts). The loops over R unroll fully, so the accumulators stay in
// registers (a hand-unrolled 8-row copy measured 2-7% slower on Sapphire Rapids).
constexpr bool kHasMk2 = true;
template <bool AND, int R>
inline void mk2_rows(const uint32_t* const* a, int64_t T, int64_t Cw, const uint32_t* panel0, const uint32_t* panel1,
                     int32_t* acc0, int32_t* acc1) {
  __m512i c[R], d[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) c[i] = d[i] = _mm512_setzero_si512();
  for (int64_t t = 0; t < T; ++t) {
    const uint32_t* ap[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) ap[i] = a[i * T + t];
    const uint32_t* wp0 = panel0 + t * Cw * NR;
    const uint32_t* wp1 = panel1 + t * Cw * NR;
    for (int64_t w = 0; w < Cw; ++w) {
      const __m512i wv0 = _mm512_loadu_si512(wp0 + w * NR);
      const __m512i wv1 = _mm512_loadu_si512(wp1 + w * NR);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const __m512i av = _mm512_set1_epi32(static_cast<int>(ap[i][w]));
        c[i] = _mm512_add_epi32(c[i], _mm512_popcnt_epi32(AND ? _mm512_and_si512(av, wv0) : _mm512_xor_si512(av, wv0)));
        d[i] = _mm512_add_epi32(d[i], _mm512_popcnt_epi32(AND ? _mm512_and_si512(av, wv1) : _mm512_xor_si512(av, wv1)));
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    _mm512_storeu_si512(acc0 + i * NR, c[i]);
    _mm512_storeu_si512(acc1 + i * NR, d[i]);
  }
}
template <bool AND>
inline void mk2(const uint32_t* const* a, int64_t T, int64_t Cw, const uint32_t* panel0, const uint32_t* panel1,
                int32_t* acc0, int32_t* acc1) {
  mk2_rows<AND, MR>(a, T, Cw, panel0, panel1, acc0, acc1);
}
// mk2 for a block of `rows` < MR valid rows (the accumulator rows past them are left as they were).
template <bool AND>
inline void mk2_tail(int rows, const uint32_t* const* a, int64_t T, int64_t Cw, const uint32_t* panel0,
                     const uint32_t* panel1, int32_t* acc0, int32_t* acc1) {
  switch (rows) {
    case 1: return mk2_rows<AND, 1>(a, T, Cw, panel0, panel1, acc0, acc1);
    case 2: return mk2_rows<AND, 2>(a, T, Cw, panel0, panel1, acc0, acc1);
    case 3: return mk2_rows<AND, 3>(a, T, Cw, panel0, panel1, acc0, acc1);
    case 4: return mk2_rows<AND, 4>(a, T, Cw, panel0, panel1, acc0, acc1);
    case 5: return mk2_rows<AND, 5>(a, T, Cw, panel0, panel1, acc0, acc1);
    case 6: return mk2_rows<AND, 6>(a, T, Cw, panel0, panel1, acc0, acc1);
    case 7: return mk2_rows<AND, 7>(a, T, Cw, panel0, panel1, acc0, acc1);
    default: return mk2<AND>(a, T, Cw, panel0, panel1, acc0, acc1);
  }
}
// The float / bits / fused epilogue of one output row and channel block on zmm registers: a scalar loop over the 16
// channels (the generic epilogue) costs more than the micro-kernel itself when C_in is small (64 channels: 18 words
// per tap set), and its bit-gathering loop for packed outputs more still. Same operations as the generic form:
// y = scale*dot + bias, += act_sum_scale*asum, += (weight_sum_scale*wsum + count_scale*n_valid) (FMAs as written),
// then residual, Maxout (the two forms of kernels/cpu/elementwise.cpp), store / compare.
constexpr bool kHasVecEpi = true;
// The popcount of the weight words of row p's padded taps, per channel of block cb (0 away from the borders).
template <bool CONV>
inline __m512i padded_tap_popcounts(const Ctx& c, int64_t cb, const uint32_t* const* pi, const RowInfo& ri) {
  __m512i inv = _mm512_setzero_si512();
  if (CONV && ri.border) {
    const int32_t* wp = c.wpop + cb * c.T * NR;
    if (c.T <= 64) {  // the padded taps' bits: no data-dependent branch per tap
      for (uint64_t m = ri.pad_taps; m != 0; m &= m - 1)
        inv = _mm512_add_epi32(inv, _mm512_loadu_si512(wp + __builtin_ctzll(m) * NR));
    } else {
      for (int64_t t = 0; t < c.T; ++t)
        if (pi[t] == c.zbuf) inv = _mm512_add_epi32(inv, _mm512_loadu_si512(wp + t * NR));
    }
  }
  return inv;
}

// The per-channel affine epilogue vectors of channel block cb (vec_epilogue_dot loads them per row, the AMX path
// once per block).
struct EpiVecs {
  __mmask16 cm;  // the channels of the block that exist (C_out tail)
  __m512 sc, bi, as, cs, ws;
  __m512i wt;
};

template <bool CONV>
inline EpiVecs load_epilogue(const Ctx& c, int64_t cb) {
  const int64_t col0 = cb * NR;
  const int ncols = static_cast<int>(std::min<int64_t>(NR, c.Nout - col0));
  EpiVecs e;
  e.cm = ncols >= NR ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << ncols) - 1u);
  e.sc = _mm512_loadu_ps(c.scale + col0);
  e.bi = _mm512_loadu_ps(c.bias + col0);
  e.as = _mm512_loadu_ps(c.ass + col0);
  if (CONV) {
    e.cs = _mm512_loadu_ps(c.cs + col0);
    e.ws = _mm512_loadu_ps(c.wss + col0);
    e.wt = _mm512_loadu_si512(c.wpop_tot + col0);
  } else {
    e.cs = e.ws = _mm512_setzero_ps();
    e.wt = _mm512_setzero_si512();
  }
  return e;
}

// scale*dot + bias, then += act_sum_scale*asum (FMAs as written)
inline __m512 epilogue_affine(const EpiVecs& e, __m512i dot, float asum) {
  const __m512 v = _mm512_fmadd_ps(e.sc, _mm512_cvtepi32_ps(dot), e.bi);
  return _mm512_fmadd_ps(e.as, _mm512_set1_ps(asum), v);
}

// weight_sum_scale*SUM(s_w) + count_scale*n_valid over a row's valid taps (inv: padded_tap_popcounts)
inline __m512 epilogue_weight_terms(const EpiVecs& e, __m512i inv, int32_t n_valid) {
  const __m512i nv = _mm512_set1_epi32(n_valid);
  const __m512 wsum = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_slli_epi32(_mm512_sub_epi32(e.wt, inv), 1), nv));
  return _mm512_fmadd_ps(e.ws, wsum, _mm512_mul_ps(e.cs, _mm512_set1_ps(static_cast<float>(n_valid))));
}

// Then the residual, Maxout (the two forms of kernels/cpu/elementwise.cpp) and the float store / packed bits.
template <int EPI>
inline void epilogue_store(const Ctx& c, __mmask16 cm, int64_t cb, int64_t p, __m512 v) {
  const int64_t col0 = cb * NR;
  if (EPI == kEpiFused) {
    const __m512 zero = _mm512_setzero_ps();
    if (c.res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(cm, c.res + p * c.ldr + col0));
    if (c.mpos) {
      const __m512 mp = _mm512_loadu_ps(c.mpos + col0), mn = _mm512_loadu_ps(c.mneg + col0);
      if (c.mo_finite) {
        v = _mm512_mul_ps(v, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), mn, mp));
      } else {  // max(0, v) returns v when v is NaN, as std::max(v, 0.f) does
        const __m512 neg_v = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)));
        v = _mm512_sub_ps(_mm512_mul_ps(mp, _mm512_max_ps(zero, v)), _mm512_mul_ps(mn, _mm512_max_ps(zero, neg_v)));
      }
    }
    if (c.out) {
      float* dst = static_cast<float*>(c.out) + p * c.ldo + col0;
      if (c.nt_out && cm == 0xFFFF && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) _mm512_stream_ps(dst, v);
      else _mm512_mask_storeu_ps(dst, cm, v);
    }
    if (c.outb)
      c.outb[p * c.ldb + cb] =
          static_cast<uint16_t>(_mm512_cmp_ps_mask(v, _mm512_loadu_ps(c.thr + col0), _CMP_GE_OQ) & cm);
  } else if (EPI == kEpiFloat) {
    _mm512_mask_storeu_ps(static_cast<float*>(c.out) + p * c.ldo + col0, cm, v);
  } else {
    static_cast<uint16_t*>(c.out)[p * c.ldo + cb] =
        static_cast<uint16_t>(_mm512_cmp_ps_mask(v, _mm512_loadu_ps(c.thr + col0), _CMP_GE_OQ) & cm);
  }
}

// The epilogue from dot = sum(s_a s_w) over the valid taps and inv (padded_tap_popcounts).
template <bool CONV, int EPI>
inline void vec_epilogue_dot(const Ctx& c, int64_t cb, int64_t p, const RowInfo& ri, __m512i dot, __m512i inv) {
  const EpiVecs e = load_epilogue<CONV>(c, cb);
  __m512 v = epilogue_affine(e, dot, ri.asum);
  if (CONV) v = _mm512_add_ps(v, epilogue_weight_terms(e, inv, ri.nv));
  epilogue_store<EPI>(c, e.cm, cb, p, v);
}

template <bool CONV, int EPI>
inline void vec_epilogue(const Ctx& c, int64_t cb, int64_t p, const uint32_t* const* pi, const RowInfo& ri,
                         const int32_t* acc) {
  const __m512i inv = padded_tap_popcounts<CONV>(c, cb, pi, ri);
  // XOR form: popcount(a ^ w) over the valid taps = acc - inv (padded taps saw zero activation words)
  const __m512i dot =
      _mm512_sub_epi32(_mm512_set1_epi32(ri.nv), _mm512_slli_epi32(_mm512_sub_epi32(_mm512_loadu_si512(acc), inv), 1));
  vec_epilogue_dot<CONV, EPI>(c, cb, p, ri, dot, inv);
}
#include "cpu/binary_tile_impl.h"
}  // namespace avx512
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------- AMX-INT8
// Opt-in (QUANTKIT_CPU_ISA=amx) on CPUs with AMX (Sapphire Rapids and later): bits are expanded to int8 +-1
// (padding and tail lanes to 0, so zero padding stays exact) and TDPBSSD does 16x16x64 int8 MACs per instruction
// (nominally ~3x the bit-MAC rate of the VPOPCNTD loop). Activations expand per 32-row block (once for all channel
// blocks), weights once per call into [C_out/16][T*ceil(Cw/2)][16 rows of 4 k][16 channels x 4 k] tiles.
// Not the default: as written (A/B tiles streamed from L2, no K blocking for L1) it measured slower than AVX-512.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx512bitalg,avx2,fma,popcnt,bmi,bmi2,amx-tile,amx-int8,prfchw")
namespace amx {
using avx512::kHasVecEpi;
using avx512::padded_tap_popcounts;
using avx512::vec_epilogue;
using avx512::vec_epilogue_dot;
using avx512::EpiVecs;
using avx512::epilogue_affine;
using avx512::epilogue_store;
using avx512::epilogue_weight_terms;
using avx512::load_epilogue;
using avx512::kHasMk2;
using avx512::mk;
using avx512::mk2;
#include "cpu/binary_tile_impl.h"

constexpr int MRA = 32;  // rows per AMX block (two 16-row A tiles); channels per block: 2 x NR

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// All eight tiles 16 rows x 64 bytes (int8 A/B operands, int32 16 x 16 accumulators).
inline void load_tile_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

inline __mmask64 lane_mask(int64_t lanes) {
  return lanes >= 64 ? ~static_cast<__mmask64>(0) : lanes <= 0 ? 0 : ((static_cast<__mmask64>(1) << lanes) - 1);
}

// Channel block cb of plain packed weights [Nout][T][Cw] -> int8 tiles (see above).
void expand_weights(const uint32_t* w, int64_t Nout, int64_t T, int64_t Cw, int64_t c_in, int64_t cb, int8_t* out) {
  const int64_t CQ = (Cw + 1) / 2;
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  alignas(64) int32_t e[NR][16];
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t q = 0; q < CQ; ++q) {
      const __mmask64 vm = lane_mask(c_in - 64 * q);
      for (int n = 0; n < NR; ++n) {
        const int64_t o = cb * NR + n;
        __m512i v = _mm512_setzero_si512();
        if (o < Nout) {
          const uint32_t* src = w + (o * T + t) * Cw + 2 * q;
          const uint64_t m = src[0] | (2 * q + 1 < Cw ? static_cast<uint64_t>(src[1]) << 32 : 0);
          v = _mm512_maskz_mov_epi8(vm, _mm512_mask_blend_epi8(m, minus, plus));
        }
        _mm512_store_si512(e[n], v);
      }
      int32_t* dst = reinterpret_cast<int32_t*>(out + ((cb * T + t) * CQ + q) * 1024);
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < NR; ++n) dst[r * 16 + n] = e[n][r];  // row r = k 4r..4r+3 of all 16 channels
    }
  }
}

// Rows [pb0*MRA, pb1*MRA) x channel blocks [cb0, cb1); `ptrs` holds MRA*T tap pointers.
template <bool CONV, int EPI>
void tile_amx(const Ctx& c, int64_t pb0, int64_t pb1, int64_t cb0, int64_t cb1, const uint32_t** ptrs) {
  const int64_t T = c.T, Cw = c.Cw, CQ = (Cw + 1) / 2, TQ = T * CQ;
  load_tile_config();
  std::vector<int8_t> abuf_store(static_cast<size_t>(std::max<int64_t>(1, TQ)) * MRA * 64 + 64);
  int8_t* abuf = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(abuf_store.data()) + 63) & ~uintptr_t(63));
  alignas(64) int32_t cbuf[MRA * 2 * NR];
  RowInfo ri[MRA];
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  constexpr bool kZeroOne = EPI == kEpiAnd01;  // activations in {0,1} (BiViT attention bits)
  for (int64_t pb = pb0; pb < pb1; ++pb) {
    const int64_t p0 = pb * MRA;
    const int rows = static_cast<int>(std::min<int64_t>(MRA, c.P - p0));
    PixelCursor pc;
    if (CONV) pc.seek(c, p0);
    for (int i = 0; i < MRA; ++i) {
      if (i < rows) {
        setup_row<CONV>(c, p0 + i, pc, ptrs + i * T, ri[i]);
        if (CONV) pc.next(c);
      } else {
        setup_missing_row(c, ptrs + i * T, ri[i]);
      }
    }
    // expand the activation bits of the block: abuf[tq][row][64 bytes]
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t q = 0; q < CQ; ++q) {
        const __mmask64 vm = lane_mask(c.c_in - 64 * q);
        int8_t* dst = abuf + ((t * CQ + q) * MRA) * 64;
        for (int i = 0; i < MRA; ++i) {
          const uint32_t* src = ptrs[i * T + t];
          __m512i v = _mm512_setzero_si512();
          if (src != c.zbuf) {
            const uint64_t m = src[2 * q] | (2 * q + 1 < Cw ? static_cast<uint64_t>(src[2 * q + 1]) << 32 : 0);
            v = kZeroOne ? _mm512_maskz_mov_epi8(m & vm, plus)
                         : _mm512_maskz_mov_epi8(vm, _mm512_mask_blend_epi8(m, minus, plus));
          }
          _mm512_store_si512(dst + i * 64, v);
        }
      }
    }
    for (int64_t cb = cb0; cb < cb1; cb += 2) {
      const bool second = cb + 1 < cb1;
      const int8_t* b0 = c.bexp + cb * TQ * 1024;
      const int8_t* b1 = second ? b0 + TQ * 1024 : b0;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t tq = 0; tq < TQ; ++tq) {
        _tile_loadd(4, abuf + (tq * MRA) * 64, 64);
        _tile_loadd(5, abuf + (tq * MRA + 16) * 64, 64);
        _tile_loadd(6, b0 + tq * 1024, 64);
        _tile_loadd(7, b1 + tq * 1024, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      _tile_stored(0, cbuf, 2 * NR * 4);
      _tile_stored(1, cbuf + NR, 2 * NR * 4);
      _tile_stored(2, cbuf + 16 * 2 * NR, 2 * NR * 4);
      _tile_stored(3, cbuf + 16 * 2 * NR + NR, 2 * NR * 4);
      for (int i = 0; i < rows; ++i) {
        epilogue_row<CONV, EPI, true>(c, cb, p0 + i, ptrs + i * T, ri[i], cbuf + i * 2 * NR);
        if (second) epilogue_row<CONV, EPI, true>(c, cb + 1, p0 + i, ptrs + i * T, ri[i], cbuf + i * 2 * NR + NR);
      }
    }
  }
  _tile_release();
}

// ---- binary_conv2d_prepacked on AMX (its default path where AMX is available; docs/kernels.md#amx-prepacked-conv)
// Activations: the input bits expand once per call into a zero-padded int8 NHWC image xe (N, Hp, Wp, Cp) with
// s_a = +-1 on valid lanes and 0 on the padding and on lanes past c_in (Cp = c_in rounded up to 64), so a k-step
// (one tap, 64 channels) of 16 output rows is ONE strided tile load straight from xe (no per-block copy) and padded
// taps add 0 to the dot product. Output rows go in segments of 16: stride-1 convs take 16 consecutive positions of
// the image flattened over the padded width (row stride Cp bytes; the Wp - Wo positions past the end of each
// output row are computed and dropped: 2 of 9 at 7x7, 2 of 58 at 56x56), other strides 16 consecutive positions
// of one output row (row stride sw*Cp). Weights: the prepacked masks (binary_conv_prepack_amx, 8x smaller than
// int8) expand per channel-block pair into int8 tiles that stay in L2 while a chunk of row segments streams past.
// Blocking 2 segments x 2 channel blocks: 4 accumulator tiles, 4 tile loads per 4 TDPBSSD. The epilogue is the
// AVX-512 one (vec_epilogue_dot) on the tiles' dot products.
// Per-thread scratch reused across calls (slot 0: the calling thread's int8 image, 2 and 3 its popcount maps;
// 1: a worker's weight tiles): a fresh multi-MiB allocation per call faults in page by page (the adder kernels'
// activation buffer, kernels/cpu/adder.cpp, does the same for that reason). Activations and per-call copies only,
// never a cache of weights.
inline int8_t* amx_scratch(int slot, int64_t bytes) {
  thread_local std::unique_ptr<int8_t[]> buf[4];
  thread_local int64_t size[4] = {0, 0, 0, 0};
  if (size[slot] < bytes + 64) {
    buf[slot].reset();  // release first: the old and the new buffer need not coexist
    size[slot] = 0;
    buf[slot].reset(new int8_t[bytes + 64]);
    size[slot] = bytes + 64;
  }
  return reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(buf[slot].get()) + 63) & ~uintptr_t(63));
}

// Bytes of int8 weight tiles a task expands at once (several channel-block pairs where they fit; see conv_amx_task).
constexpr int64_t kAmxTileBudget = 256 * 1024;

struct AmxConvGeom {
  int64_t N = 0, Hp = 0, Wp = 0, Cp = 0, G = 0, S = 0;
  bool flat = true;        // stride 1: segments over the flattened padded image
  int64_t segs_img = 0;    // segments per image
  int64_t per_row = 0;     // segments per output row (row mode)
  int64_t segs = 0;        // all segments
  int64_t pixels = 0;      // pixels of xe, including the slack the last segments read past the last image
};

inline AmxConvGeom amx_geometry(const Ctx& c) {
  AmxConvGeom g;
  g.N = c.P / (c.Ho * c.Wo);
  g.Hp = c.H + 2 * c.ph;
  g.Wp = c.W + 2 * c.pw;
  g.G = (c.c_in + 63) / 64;
  g.Cp = 64 * g.G;
  g.S = g.G * c.T;
  g.flat = c.sh == 1 && c.sw == 1;
  g.per_row = (c.Wo + 15) / 16;
  g.segs_img = g.flat ? (c.Ho * g.Wp + 15) / 16 : c.Ho * g.per_row;
  g.segs = g.N * g.segs_img;
  return g;
}

// Whether the AMX path pays here: it computes whole 16-row segments, and where fewer than 70% of their rows are
// output positions (stride 2 onto a 7-wide output: 7 of 16) the VPOPCNTD path measured faster; so it did with fewer
// than 64 output positions (512 channels at 7x7, batch 1), where expanding the weight tiles serves two blocks.
// On more than one thread it measured faster only up to 128 output channels (ResNet-18's 64- and 128-channel
// layers; from 256 channels on, VPOPCNTD tied or won at batch 1 and 16: benchmarks/binary_conv_amx_results.md).
inline bool amx_worthwhile(const Ctx& c) {
  if (c.Ho <= 0 || c.Wo <= 0 || c.P < 64) return false;
  if (at::get_num_threads() > 1 && c.Nout > 128) return false;
  const AmxConvGeom g = amx_geometry(c);
  return 10 * c.P >= 7 * 16 * g.segs;
}

// First pixel of xe (tap (0, 0)) that segment k's row 0 reads, and the pixel step between its rows.
inline void amx_segment(const Ctx& c, const AmxConvGeom& g, int64_t k, int64_t& pix, int64_t& step) {
  const int64_t n = k / g.segs_img, kk = k - n * g.segs_img;
  if (g.flat) {
    pix = n * g.Hp * g.Wp + 16 * kk;
    step = 1;
  } else {
    const int64_t oh = kk / g.per_row, ow0 = 16 * (kk - oh * g.per_row);
    pix = n * g.Hp * g.Wp + oh * c.sh * g.Wp + ow0 * c.sw;
    step = c.sw;
  }
}

// Padded row (n, hp) of xe from the packed input bits (zeros for padding rows, columns and lanes past c_in).
// With pp, also each padded pixel's activation popcount (0 on the padding) into pp (N, Hp, Wp).
inline void amx_expand_row(const Ctx& c, const AmxConvGeom& g, int64_t n, int64_t hp, int8_t* xe, int32_t* pp) {
  int8_t* dst = xe + (n * g.Hp + hp) * g.Wp * g.Cp;
  int32_t* pop = pp ? pp + (n * g.Hp + hp) * g.Wp : nullptr;
  const int64_t ih = hp - c.ph;
  if (ih < 0 || ih >= c.H) {
    std::memset(dst, 0, static_cast<size_t>(g.Wp * g.Cp));
    if (pop) std::fill(pop, pop + g.Wp, 0);
    return;
  }
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  for (int64_t wp = 0; wp < g.Wp; ++wp, dst += g.Cp) {
    const int64_t iw = wp - c.pw;
    if (iw < 0 || iw >= c.W) {
      std::memset(dst, 0, static_cast<size_t>(g.Cp));
      if (pop) pop[wp] = 0;
      continue;
    }
    const uint32_t* src = c.x + ((n * c.H + ih) * c.W + iw) * c.Cw;
    if (pop) {
      int32_t cnt = 0;
      for (int64_t w = 0; w < c.Cw; ++w) cnt += __builtin_popcount(src[w]);
      pop[wp] = cnt;
    }
    for (int64_t q = 0; q < g.G; ++q) {
      const uint64_t m = src[2 * q] | (2 * q + 1 < c.Cw ? static_cast<uint64_t>(src[2 * q + 1]) << 32 : 0);
      _mm512_storeu_si512(dst + 64 * q,
                          _mm512_maskz_mov_epi8(lane_mask(c.c_in - 64 * q), _mm512_mask_blend_epi8(m, minus, plus)));
    }
  }
}

// setup_row's RowInfo without the tap pointers (T <= 64: the epilogue finds the padded taps in pad_taps), which the
// AMX path does not read; the activation popcount over the valid taps comes from the window map `win` (per output
// position; see conv_prepacked_amx), so a row costs a load instead of T.
inline void amx_row_facts(const Ctx& c, const PixelCursor& pc, int64_t p, const int32_t* win, RowInfo& ri) {
  const int64_t H = c.H, W = c.W, kh = c.kh, kw = c.kw, dh = c.dh, dw = c.dw, T = c.T;
  const int64_t ih0 = pc.oh * c.sh - c.ph, iw0 = pc.ow * c.sw - c.pw;
  int64_t valid = T;
  uint64_t pad = 0;
  if (!(ih0 >= 0 && ih0 + (kh - 1) * dh < H && iw0 >= 0 && iw0 + (kw - 1) * dw < W)) {
    valid = 0;
    for (int64_t r = 0; r < kh; ++r) {
      const int64_t ih = ih0 + r * dh;
      for (int64_t s = 0; s < kw; ++s) {
        const int64_t iw = iw0 + s * dw;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) ++valid;
        else pad |= uint64_t{1} << (r * kw + s);
      }
    }
  }
  RowInfo f;
  f.pad_taps = pad;
  f.nv = static_cast<int32_t>(valid * c.c_in);
  f.border = valid != T;
  f.apop = win ? win[p] : 0;
  f.asum = win ? static_cast<float>(2 * f.apop - f.nv) : 0.f;
  ri = f;
}

// vec_epilogue_dot for the rows of one block and one channel block, the affine vectors loaded once for all rows
// and the weight terms of interior rows computed once; the same
// operations in the same order, so the same values.
template <int EPI>
inline void amx_epilogue_rows(const Ctx& c, int64_t cb, const int64_t* pos, const RowInfo* ris, int nrows,
                              const int32_t* acc, int64_t ld) {
  const EpiVecs e = load_epilogue<true>(c, cb);
  const int32_t* wp = c.wpop + cb * c.T * NR;
  const __m512 wterm_interior =
      epilogue_weight_terms(e, _mm512_setzero_si512(), static_cast<int32_t>(c.T * c.c_in));
  for (int r = 0; r < nrows; ++r) {
    const int64_t p = pos[r];
    if (p < 0) continue;
    const RowInfo& ri = ris[r];
    __m512 wterm = wterm_interior;
    if (ri.border) {
      __m512i inv = _mm512_setzero_si512();
      for (uint64_t m = ri.pad_taps; m != 0; m &= m - 1)
        inv = _mm512_add_epi32(inv, _mm512_loadu_si512(wp + __builtin_ctzll(m) * NR));
      wterm = epilogue_weight_terms(e, inv, ri.nv);
    }
    const __m512 v = epilogue_affine(e, _mm512_load_si512(acc + r * ld), ri.asum);
    epilogue_store<EPI>(c, e.cm, cb, p, _mm512_add_ps(v, wterm));
  }
}

// Segments' M-blocks [m0, m1) x channel-block pairs [cp0, cp1) (see above); wmask: (NBp, S, 16) row masks.
template <int EPI>
void conv_amx_task(const Ctx& c, const AmxConvGeom& g, const int8_t* xe, const int32_t* win, const uint64_t* wmask,
                   int64_t m0, int64_t m1, int64_t cp0, int64_t cp1, int8_t* bbuf, const uint32_t** ptrs) {
  load_tile_config();
  const int64_t S = g.S, T = c.T, Cp = g.Cp;
  std::vector<int64_t> tap_off(static_cast<size_t>(S));  // byte offset of k-step s (group-major, then taps)
  for (int64_t q = 0; q < g.G; ++q)
    for (int64_t i = 0; i < c.kh; ++i)
      for (int64_t j = 0; j < c.kw; ++j)
        tap_off[q * T + i * c.kw + j] = (i * c.dh * g.Wp + j * c.dw) * Cp + 64 * q;
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  // the rows' epilogue facts, once for all channel pairs; with more than 64 taps the epilogue also needs the tap
  // pointers, so those rows run setup_row per pair instead
  const int64_t nrows = (m1 - m0) * 32;
  const bool keep_rows = T <= 64;
  thread_local std::vector<RowInfo> ris_store;
  thread_local std::vector<int64_t> pos_store;
  ris_store.resize(static_cast<size_t>(keep_rows ? nrows : 0));
  pos_store.resize(static_cast<size_t>(nrows));
  // plain pointers: every use of a thread_local in a shared library is a __tls_get_addr call
  RowInfo* const ris = ris_store.data();
  int64_t* const pos = pos_store.data();  // output position of each row, -1 if dropped
  for (int64_t i0 = 0; i0 < nrows; i0 += 16) {  // per segment: one division, then a cursor along its rows
    const int64_t k = 2 * m0 + i0 / 16;
    if (k >= g.segs) {
      std::fill(pos + i0, pos + i0 + 16, int64_t{-1});
      continue;
    }
    PixelCursor pc;
    pc.n = k / g.segs_img;
    const int64_t kk = k - pc.n * g.segs_img;
    if (g.flat) {
      pc.oh = (16 * kk) / g.Wp;
      pc.ow = 16 * kk - pc.oh * g.Wp;
    } else {
      pc.oh = kk / g.per_row;
      pc.ow = 16 * (kk - pc.oh * g.per_row);
    }
    for (int64_t i = i0; i < i0 + 16; ++i) {
      const bool valid = pc.oh < c.Ho && pc.ow < c.Wo;
      pos[i] = valid ? (pc.n * c.Ho + pc.oh) * c.Wo + pc.ow : -1;
      if (keep_rows && valid) amx_row_facts(c, pc, pos[i], win, ris[i]);
      if (++pc.ow == g.Wp && g.flat) {
        pc.ow = 0;
        ++pc.oh;
      }
    }
  }
  // epilogue of block m (its dot products in buf) for channel pair cp
  float* const out = static_cast<float*>(c.out);
  auto epilogue = [&](int64_t m, int64_t cp, const int32_t* buf) {
    const int64_t i0 = (m - m0) * 32;
    if (keep_rows) {
      for (int b = 0; b < 2; ++b) {
        const int64_t cb = 2 * cp + b;
        if (cb < c.NB) amx_epilogue_rows<EPI>(c, cb, pos + i0, ris + i0, 32, buf + b * NR, 2 * NR);
      }
      return;
    }
    for (int64_t i = i0, r = 0; r < 32; ++i, ++r) {
      const int64_t p = pos[i];
      if (p < 0) continue;
      RowInfo ri;
      PixelCursor pc;
      pc.seek(c, p);
      setup_row<true>(c, p, pc, ptrs, ri);
      const int32_t* acc = buf + r * 2 * NR;
      for (int b = 0; b < 2; ++b) {
        const int64_t cb = 2 * cp + b;
        if (cb >= c.NB) break;
        vec_epilogue_dot<true, EPI>(c, cb, p, ri, _mm512_load_si512(acc + b * NR),
                                    padded_tap_popcounts<true>(c, cb, ptrs, ri));
      }
    }
  };
  alignas(64) int32_t cbuf[2][32 * 2 * NR];
  // The next block's residual rows (and output rows, unless they are stored non-temporally) are prefetched, a few
  // lines per k-step of this block: as plain loads and stores in the epilogue their misses reached the head of the
  // reorder buffer behind the tile instructions and stalled them (docs/kernels.md#amx-prepacked-conv).
  const bool pf_rows = c.pf_rows && ((EPI == kEpiFused && (c.res || c.out)) || EPI == kEpiFloat);
  int64_t col_lo = 0, col_hi = 0;  // the channels of the pairs whose tiles are expanded (set per group below)
  // the next block's rows to prefetch: their output positions, the lines of [col_lo, col_hi) in each, per array
  int64_t pf_pos[32];
  int64_t pf_rows_n = 0, pf_lpr = 0, pf_arrays = 0, pf_done = 0, pf_total = 0, pf_per_step = 0;
  const float* pf_base[2] = {nullptr, nullptr};
  int64_t pf_ld[2] = {0, 0};
  bool pf_write[2] = {false, false};
  int64_t pf_arr = 0, pf_line = 0, pf_row = 0;  // the next prefetch: array, line, row (counters, no divisions)
  if (pf_rows && EPI == kEpiFused && c.res)
    pf_base[pf_arrays] = c.res, pf_ld[pf_arrays] = c.ldr, pf_write[pf_arrays++] = false;
  if (pf_rows && c.out && !c.nt_out)
    pf_base[pf_arrays] = static_cast<const float*>(c.out), pf_ld[pf_arrays] = c.ldo, pf_write[pf_arrays++] = true;
  // per group of pairs: the columns and the lines they span in a row -- whole lines where every row's first column
  // starts on one (C_out a multiple of 16), else one more for the line the range may straddle
  auto set_columns = [&](int64_t lo, int64_t hi) {
    col_lo = lo, col_hi = hi;
    bool aligned = (c.ldr * 4) % 64 == 0 && (c.ldo * 4) % 64 == 0 && (col_lo * 4) % 64 == 0;
    for (int64_t i = 0; i < pf_arrays; ++i) aligned = aligned && reinterpret_cast<uintptr_t>(pf_base[i]) % 64 == 0;
    pf_lpr = ((col_hi - col_lo) * 4 + 63) / 64 + (aligned ? 0 : 1);
  };
  auto plan_prefetch = [&](int64_t mm, int64_t steps) {
    pf_done = pf_total = 0;
    pf_arr = pf_line = pf_row = 0;
    if (!pf_rows || mm >= m1) return;
    const int64_t* bp = pos + (mm - m0) * 32;
    pf_rows_n = 0;
    for (int r = 0; r < 32; ++r)
      if (bp[r] >= 0) pf_pos[pf_rows_n++] = bp[r];
    pf_total = pf_rows_n * pf_lpr * pf_arrays;
    pf_per_step = (pf_total + steps - 1) / std::max<int64_t>(1, steps);
  };
  auto issue_prefetch = [&]() {
    for (int64_t j = 0; j < pf_per_step && pf_done < pf_total; ++j, ++pf_done) {
      const char* p =
          reinterpret_cast<const char*>(pf_base[pf_arr] + pf_pos[pf_row] * pf_ld[pf_arr] + col_lo) + 64 * pf_line;
      if (pf_write[pf_arr]) __builtin_prefetch(p, 1, 3);  // PREFETCHW: owned before it is stored
      else __builtin_prefetch(p, 0, 2);
      if (++pf_arr == pf_arrays) {
        pf_arr = 0;
        if (++pf_line == pf_lpr) pf_line = 0, ++pf_row;
      }
    }
  };
  // Pairs whose int8 tiles fit in kAmxTileBudget together are expanded at once and the blocks loop outside them,
  // so each row's output and residual are visited once, whole, instead of in 128-byte pieces per pair; larger
  // weights go a pair at a time.
  const int64_t pair_bytes = S * 2048;
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(cp1 - cp0, kAmxTileBudget / pair_bytes));
  int64_t pend_m = -1, pend_cp = 0;  // the item whose epilogue is still to run: block, pair, cbuf slot
  int pend_slot = 0;
  for (int64_t gp0 = cp0; gp0 < cp1; gp0 += group) {
    const int64_t gp1 = std::min(cp1, gp0 + group);
    set_columns(2 * gp0 * NR, std::min<int64_t>(2 * gp1 * NR, c.Nout));
    for (int64_t cp = gp0; cp < gp1; ++cp)
      for (int64_t h = 0; h < 2; ++h) {  // pair cp's weights as int8 tiles [h][s][16 rows][64]
        const uint64_t* wm = wmask + (2 * cp + h) * S * 16;
        int8_t* dst = bbuf + (cp - gp0) * pair_bytes + h * S * 1024;
        for (int64_t e = 0; e < S * 16; ++e)
          _mm512_store_si512(dst + 64 * e, _mm512_mask_blend_epi8(wm[e], minus, plus));
      }
    for (int64_t m = m0; m < m1; ++m) {
      plan_prefetch(m + 1, (gp1 - gp0) * S);
      const int64_t k0 = 2 * m, k1 = 2 * m + 1;
      const bool second = k1 < g.segs;
      int64_t pix0, step0, pix1 = 0, step1 = 0;
      amx_segment(c, g, k0, pix0, step0);
      if (second) amx_segment(c, g, k1, pix1, step1);
      const int8_t* a0 = xe + pix0 * Cp;
      const int8_t* a1 = second ? xe + pix1 * Cp : a0;
      const int64_t st0 = step0 * Cp, st1 = second ? step1 * Cp : st0;
      for (int64_t cp = gp0; cp < gp1; ++cp) {
        const int8_t* b0 = bbuf + (cp - gp0) * pair_bytes;
        const int8_t* b1 = b0 + S * 1024;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t off = tap_off[s];
          _tile_loadd(4, a0 + off, st0);
          _tile_loadd(5, a1 + off, st1);
          _tile_loadd(6, b0 + s * 1024, 64);
          _tile_loadd(7, b1 + s * 1024, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
          issue_prefetch();
        }
        const int slot = 1 - pend_slot;  // the buffer the pending item is not in
        int32_t* buf = cbuf[slot];
        _tile_stored(0, buf, 2 * NR * 4);
        _tile_stored(1, buf + NR, 2 * NR * 4);
        _tile_stored(2, buf + 16 * 2 * NR, 2 * NR * 4);
        _tile_stored(3, buf + 16 * 2 * NR + NR, 2 * NR * 4);
        // the previous item's epilogue runs on the vector units while the tile unit works on this one
        if (pend_m >= 0) epilogue(pend_m, pend_cp, cbuf[pend_slot]);
        pend_m = m;
        pend_cp = cp;
        pend_slot = slot;
      }
    }
  }
  if (pend_m >= 0) epilogue(pend_m, pend_cp, cbuf[pend_slot]);
  if (c.nt_out) _mm_sfence();
  _tile_release();
}

// The whole conv: expand the activations, then the tasks over all threads.
template <int EPI>
void conv_prepacked_amx(const Ctx& c, const uint64_t* wmask, int64_t NBp) {
  AmxConvGeom g = amx_geometry(c);
  int64_t last_pix, last_step;
  amx_segment(c, g, g.segs - 1, last_pix, last_step);
  const int64_t reach = last_pix + 15 * last_step + (c.kh - 1) * c.dh * g.Wp + (c.kw - 1) * c.dw + 1;
  g.pixels = std::max(g.N * g.Hp * g.Wp, reach);
  int8_t* xe = amx_scratch(0, g.pixels * g.Cp);
  // with act-sum terms: the activation popcount of every output window (its sum over the valid taps) as a box
  // filter of the padded per-pixel popcounts pixpop (zero on the padding, so border windows need no special case)
  int32_t* pixpop = c.need_apop ? reinterpret_cast<int32_t*>(amx_scratch(2, g.N * g.Hp * g.Wp * 4)) : nullptr;
  at::parallel_for(0, g.N * g.Hp, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) amx_expand_row(c, g, r / g.Hp, r % g.Hp, xe, pixpop);
  });
  int32_t* win = nullptr;
  if (pixpop) {
    win = reinterpret_cast<int32_t*>(amx_scratch(3, c.P * 4));
    at::parallel_for(0, g.N * c.Ho, 8, [&](int64_t b, int64_t e) {
      std::vector<int32_t> col(static_cast<size_t>(g.Wp));
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / c.Ho, oh = r - n * c.Ho;
        std::fill(col.begin(), col.end(), 0);
        for (int64_t i = 0; i < c.kh; ++i) {
          const int32_t* src = pixpop + (n * g.Hp + oh * c.sh + i * c.dh) * g.Wp;
          for (int64_t w = 0; w < g.Wp; ++w) col[w] += src[w];
        }
        int32_t* dst = win + r * c.Wo;
        for (int64_t ow = 0; ow < c.Wo; ++ow) {
          int32_t sum = 0;
          for (int64_t j = 0; j < c.kw; ++j) sum += col[ow * c.sw + j * c.dw];
          dst[ow] = sum;
        }
      }
    });
  }
  const int64_t tail = g.pixels - g.N * g.Hp * g.Wp;  // read by dropped rows only; zeroed all the same
  if (tail > 0) std::memset(xe + g.N * g.Hp * g.Wp * g.Cp, 0, static_cast<size_t>(tail * g.Cp));
  const int64_t MB = (g.segs + 1) / 2, NP = NBp / 2;
  // a chunk of M-blocks reads ~192 KB of xe, which stays in L2 while each weight pair streams past it
  // (equal chunks, at least one per thread where each still has 8+ blocks to amortize expanding the weight tiles;
  // otherwise the threads split the channel-block pairs: 512 channels at 7x7 has 2 blocks per image)
  const int64_t nthreads = at::get_num_threads();
  const int64_t mb_max = std::max<int64_t>(1, (192 * 1024) / (32 * (g.flat ? 1 : c.sw) * g.Cp));
  const bool split_rows = MB >= 8 * nthreads || NP < nthreads;
  const int64_t want_chunks =
      std::min<int64_t>(MB, std::max<int64_t>((MB + mb_max - 1) / mb_max, split_rows ? nthreads : 1));
  const int64_t mb_per = (MB + want_chunks - 1) / want_chunks;
  const int64_t n_chunks = (MB + mb_per - 1) / mb_per;
  const int64_t n_psplit = n_chunks >= nthreads ? 1 : std::min<int64_t>(NP, (nthreads + n_chunks - 1) / n_chunks);
  const int64_t pp = (NP + n_psplit - 1) / n_psplit;
  at::parallel_for(0, n_chunks * n_psplit, 1, [&](int64_t b, int64_t e) {
    int8_t* bbuf = amx_scratch(1, std::max<int64_t>(g.S * 2048, std::min<int64_t>(pp * g.S * 2048, kAmxTileBudget)));
    std::vector<const uint32_t*> ptrs(static_cast<size_t>(std::max<int64_t>(1, c.T)));
    for (int64_t task = b; task < e; ++task) {
      const int64_t ch = task / n_psplit, ps = task - ch * n_psplit;
      const int64_t cp0 = ps * pp, cp1 = std::min(NP, cp0 + pp);
      if (cp0 >= cp1) continue;
      conv_amx_task<EPI>(c, g, xe, win, wmask, ch * mb_per, std::min(MB, (ch + 1) * mb_per), cp0, cp1, bbuf,
                         ptrs.data());
    }
  });
}
}  // namespace amx
#pragma GCC pop_options
#endif

// Float outputs from this size on are stored non-temporally by the AMX conv (see binary_conv2d_prepacked_cpu):
// measured on ResNet-18 at batch 16 (Sapphire Rapids VM, 2 MB L2), a gain for the 12.8 MB outputs of layer1, neutral
// for layer2's 6.4 MB and a loss for layer3's 3.2 MB.
constexpr int64_t kNtOutputBytes = 8 << 20;
// From this float output size on (out of L2: the residual too) the AMX conv prefetches the rows of its next block;
// below it the rows are cached and the prefetches only cost issue slots (measured 2-6% slower at 512 channels 7x7
// batch 16 and at 64 channels 56x56 batch 1; 9% faster at 64 channels batch 16).
constexpr int64_t kPrefetchRowsBytes = 2 << 20;

// AMX pays for expanding the weights once per call when there are enough output rows to reuse them.
constexpr int64_t kAmxMinRows = 128;

template <bool CONV, int EPI>
TileFn pick_tile(Isa isa, bool amx = false) {
#if QUANTKIT_X86
  if (amx) return &amx::tile_amx<CONV, EPI>;
  if (isa == Isa::Avx512) return &avx512::tile<CONV, EPI>;
  if (isa == Isa::Avx2) return &avx2::tile<CONV, EPI>;
#endif
  (void)isa;
  return &portable::tile<CONV, EPI>;
}

// ---------------------------------------------------------------------------------------------- weights
inline int32_t popcount_swar(uint32_t v) {  // baseline build: avoid a libgcc call per word
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  return static_cast<int32_t>((((v + (v >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
}

struct Panels {
  std::vector<uint32_t> w;       // [NB][T][Cw][NR]
  std::vector<int32_t> pop;      // [NB][T][NR]      (with_pop)
  std::vector<int32_t> pop_tot;  // [NB*NR]          (with_pop)
};

// Repack plain packed weights [Nout][T][Cw] into micro-kernel panels; channels past Nout are zero words.
void pack_panels(const uint32_t* w, int64_t Nout, int64_t T, int64_t Cw, bool with_pop, Panels& out,
                 bool parallel) {
  const int64_t NB = (Nout + NR - 1) / NR;
  out.w.assign(static_cast<size_t>(NB * T * Cw * NR), 0u);
  if (with_pop) {
    out.pop.assign(static_cast<size_t>(NB * T * NR), 0);
    out.pop_tot.assign(static_cast<size_t>(NB * NR), 0);
  }
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t cb = b; cb < e; ++cb) {
      for (int j = 0; j < NR; ++j) {
        const int64_t o = cb * NR + j;
        if (o >= Nout) break;
        int32_t tot = 0;
        for (int64_t t = 0; t < T; ++t) {
          const uint32_t* src = w + (o * T + t) * Cw;
          uint32_t* dst = out.w.data() + ((cb * T + t) * Cw) * NR + j;
          int32_t s = 0;
          for (int64_t q = 0; q < Cw; ++q) {
            dst[q * NR] = src[q];
            if (with_pop) s += popcount_swar(src[q]);
          }
          if (with_pop) out.pop[(cb * T + t) * NR + j] = s;
          tot += s;
        }
        if (with_pop) out.pop_tot[cb * NR + j] = tot;
      }
    }
  };
  if (parallel)
    at::parallel_for(0, NB, 1, body);
  else
    body(0, NB);
}

// All channel blocks of plain packed weights [Nout][T][Cw] as AMX int8 tiles (empty without AMX support).
std::vector<int8_t> expand_weights_amx(const uint32_t* w, int64_t Nout, int64_t T, int64_t Cw, int64_t c_in,
                                       bool parallel) {
  std::vector<int8_t> out;
#if QUANTKIT_X86
  const int64_t NB = (Nout + NR - 1) / NR, CQ = (Cw + 1) / 2;
  out.assign(static_cast<size_t>(NB * T * CQ * 1024), 0);
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t cb = b; cb < e; ++cb) amx::expand_weights(w, Nout, T, Cw, c_in, cb, out.data());
  };
  if (parallel)
    at::parallel_for(0, NB, 1, body);
  else
    body(0, NB);
#else
  (void)w, (void)Nout, (void)T, (void)Cw, (void)c_in, (void)parallel;
#endif
  return out;
}

// Per-channel epilogue vectors padded to NB*NR (missing scale = 1, others 0).
struct EpiVecs {
  std::vector<float> scale, ass, wss, cs, bias, thr;
};

std::vector<float> padded(const c10::optional<at::Tensor>& t, int64_t n, int64_t npad, float dflt, const char* op,
                          const char* name) {
  std::vector<float> v(static_cast<size_t>(npad), dflt);
  if (t.has_value()) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor");
    TORCH_CHECK(t->is_floating_point(), op, ": ", name, " must be a float tensor, got ", t->scalar_type());
    TORCH_CHECK(t->numel() == n, op, ": ", name, " must have one value per output channel (", n, "), got shape ",
                t->sizes());
    const at::Tensor f = t->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + n, v.begin());
  }
  return v;
}

// Run the tiles of `ctxs` (one per batch item) over all threads.
void run(const std::vector<Ctx>& ctxs, TileFn fn, bool amx = false) {
  if (ctxs.empty()) return;
  const Ctx& c0 = ctxs[0];
  const int64_t mr = amx ? 32 : MR;
  const int64_t PB = (c0.P + mr - 1) / mr;
  const int64_t NB = c0.NB;
  if (PB == 0 || NB == 0) return;
  // channel super-block: its weight panels stay in L2 while the row blocks stream past
  const int64_t panel_bytes =
      std::max<int64_t>(1, amx ? c0.T * ((c0.Cw + 1) / 2) * 1024 : c0.T * c0.Cw * NR * 4);
  const int64_t cb_max = std::max<int64_t>(1, std::min<int64_t>(NB, ((amx ? 768 : 256) * 1024) / panel_bytes));
  // equal super-blocks (threads split the task list evenly), an even count where blocks are taken in pairs
  int64_t cb_per = (NB + (NB + cb_max - 1) / cb_max - 1) / ((NB + cb_max - 1) / cb_max);
  if (cb_per > 1 && cb_per < NB) cb_per += cb_per & 1;
  const int64_t n_super = (NB + cb_per - 1) / cb_per;
  const int64_t nthreads = at::get_num_threads();
  const int64_t per_batch = n_super * PB;
  const int64_t total = per_batch * static_cast<int64_t>(ctxs.size());
  const int64_t want_tasks = 8 * nthreads;
  const int64_t pb_per = std::max<int64_t>(1, std::min<int64_t>(16, total / std::max<int64_t>(1, want_tasks)));
  const int64_t n_pchunks = (PB + pb_per - 1) / pb_per;
  const int64_t tasks = static_cast<int64_t>(ctxs.size()) * n_super * n_pchunks;
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    std::vector<const uint32_t*> ptrs(static_cast<size_t>(kPixelGroup * mr * std::max<int64_t>(1, c0.T)));
    for (int64_t task = b; task < e; ++task) {
      const int64_t bi = task / (n_super * n_pchunks);
      const int64_t rest = task - bi * n_super * n_pchunks;
      const int64_t s = rest / n_pchunks, pc = rest - s * n_pchunks;
      fn(ctxs[bi], pc * pb_per, std::min(PB, (pc + 1) * pb_per), s * cb_per, std::min(NB, (s + 1) * cb_per),
         ptrs.data());
    }
  });
}

inline int64_t num_words(int64_t k) { return (k + 31) / 32; }

inline const uint32_t* words_ptr(const at::Tensor& t) {
  return reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>());
}

void check_words(const at::Tensor& t, const char* op, const char* name, int64_t k) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must hold packed int32 words, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == num_words(k), op, ": ", name, " must have num_words(k)=", num_words(k),
              " words in its last dimension (k=", k, "), got shape ", t.sizes());
}

// The bits of the last word past k (k % 32 != 0) carry no element: the kernels ignore them, as the references do
// (they unpack k bits). The micro-kernels rely on zero tails (popcount(a XOR w) must not see them), so a
// contiguous operand whose tails are not all zero -- never the case for words from pack_bits -- is copied with
// its tails cleared. One word per row is read; the copy is O(operand), outside the GEMM loops.
at::Tensor clear_tail_bits(const at::Tensor& t, int64_t k) {
  const int64_t nw = num_words(k);
  if (k % 32 == 0 || t.numel() == 0) return t;
  const uint32_t keep = (1u << (k % 32)) - 1u;
  const int64_t rows = t.numel() / nw;
  const uint32_t* p = reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>()) + (nw - 1);
  uint32_t dirty = 0;
  for (int64_t r = 0; r < rows; ++r) dirty |= p[r * nw] & ~keep;
  if (dirty == 0) return t;
  at::Tensor c = t.clone(at::MemoryFormat::Contiguous);
  uint32_t* q = reinterpret_cast<uint32_t*>(c.data_ptr<int32_t>()) + (nw - 1);
  for (int64_t r = 0; r < rows; ++r) q[r * nw] &= keep;
  return c;
}

// The int32 accumulators and the epilogue's element counts hold sums over a whole reduction of T taps x k bits.
void check_reduction(const char* op, int64_t taps, int64_t k) {
  int64_t n = 0;
  TORCH_CHECK(mul_nonneg(taps, k, &n) && n <= std::numeric_limits<int32_t>::max(), op, ": the reduction length (",
              taps, " taps x ", k, " bits) exceeds the int32 range of the kernel's counts");
}

// Per-pixel activation popcounts of an NHWC word tensor (pixels x Cw words), the table of Ctx::xpop.
// (The POPCNT instruction where the ISA level has it: the SWAR form costs a percent of a 512-channel conv.)
#if QUANTKIT_X86
QK_TARGET_AVX2 void pixel_popcounts_hw(const uint32_t* x, int64_t b, int64_t e, int64_t Cw, int32_t* pop) {
  for (int64_t q = b; q < e; ++q) {
    int32_t s = 0;
    for (int64_t w = 0; w < Cw; ++w) s += __builtin_popcount(x[q * Cw + w]);
    pop[q] = s;
  }
}
#endif

std::vector<int32_t> pixel_popcounts(const uint32_t* x, int64_t pixels, int64_t Cw) {
  std::vector<int32_t> pop(static_cast<size_t>(pixels));
  const bool hw = QUANTKIT_X86 && cpu::active_isa() != Isa::Portable;
  at::parallel_for(0, pixels, 4096, [&](int64_t b, int64_t e) {
#if QUANTKIT_X86
    if (hw) return pixel_popcounts_hw(x, b, e, Cw, pop.data());
#endif
    for (int64_t q = b; q < e; ++q) {
      int32_t s = 0;
      for (int64_t w = 0; w < Cw; ++w) s += popcount_swar(x[q * Cw + w]);
      pop[q] = s;
    }
  });
  (void)hw;
  return pop;
}

// ---------------------------------------------------------------------------------------------- ops
at::Tensor binary_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_in, int64_t k,
                             const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& act_sum_scale,
                             const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& threshold) {
  static const char* op = "binary_linear";
  TORCH_CHECK(k >= 0, op, ": k must be >= 0");
  check_words(x_in, op, "x", k);
  check_words(w_in, op, "w", k);
  TORCH_CHECK(w_in.dim() == 2, op, ": w must be 2-D (N, words), got ", w_in.sizes());
  check_reduction(op, 1, k);
  const at::Tensor x = clear_tail_bits(x_in.contiguous(), k), w = clear_tail_bits(w_in.contiguous(), k);
  const int64_t Kw = num_words(k), N = w.size(0), NB = (N + NR - 1) / NR;
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  auto out_sizes = x.sizes().vec();
  const bool bits = threshold.has_value();
  out_sizes.back() = bits ? num_words(N) : N;
  at::Tensor out = bits ? at::zeros(out_sizes, x.options().dtype(at::kInt)) : at::empty(out_sizes, x.options().dtype(at::kFloat));
  if (rows == 0 || N == 0) return out;
  EpiVecs ev;
  ev.scale = padded(scale, N, NB * NR, 1.f, op, "scale");
  ev.ass = padded(act_sum_scale, N, NB * NR, 0.f, op, "act_sum_scale");
  ev.bias = padded(bias, N, NB * NR, 0.f, op, "bias");
  ev.thr = padded(threshold, N, NB * NR, 0.f, op, "threshold");
  ev.wss.assign(NB * NR, 0.f);
  ev.cs.assign(NB * NR, 0.f);
  const Isa isa = active_isa();
  const bool amx = isa == Isa::Avx512 && rows >= kAmxMinRows && use_amx();
  Panels pn;
  std::vector<int8_t> bexp;
  if (amx)
    bexp = expand_weights_amx(words_ptr(w), N, 1, Kw, k, true);
  else
    pack_panels(words_ptr(w), N, 1, Kw, false, pn, true);
  std::vector<uint32_t> zbuf(static_cast<size_t>(std::max<int64_t>(1, Kw)), 0u);
  Ctx c;
  c.bexp = bexp.data();
  c.x = words_ptr(x);
  c.P = rows;
  c.T = 1;
  c.Cw = Kw;
  c.c_in = k;
  c.zbuf = zbuf.data();
  c.panels = pn.w.data();
  c.NB = NB;
  c.Nout = N;
  c.scale = ev.scale.data(), c.ass = ev.ass.data(), c.wss = ev.wss.data(), c.cs = ev.cs.data();
  c.bias = ev.bias.data(), c.thr = ev.thr.data();
  c.need_apop = act_sum_scale.has_value();
  c.out = bits ? static_cast<void*>(out.data_ptr<int32_t>()) : static_cast<void*>(out.data_ptr<float>());
  c.ldo = bits ? 2 * num_words(N) : N;
  run({c}, bits ? pick_tile<false, kEpiBits>(isa, amx) : pick_tile<false, kEpiFloat>(isa, amx), amx);
  return out;
}

at::Tensor binary_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& w_in, int64_t c_in, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation,
                             const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& act_sum_scale,
                             const c10::optional<at::Tensor>& weight_sum_scale,
                             const c10::optional<at::Tensor>& count_scale, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& threshold) {
  static const char* op = "binary_conv2d";
  TORCH_CHECK(c_in >= 0, op, ": c_in must be >= 0");
  check_words(x_in, op, "x", c_in);
  check_words(w_in, op, "w", c_in);
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be NHWC packed (N, H, W, words), got ", x_in.sizes());
  TORCH_CHECK(w_in.dim() == 4, op, ": w must be OHWI packed (C_out, kh, kw, words), got ", w_in.sizes());
  const int64_t Nb = x_in.size(0), H = x_in.size(1), W = x_in.size(2), Cw = x_in.size(3);
  const int64_t Cout = w_in.size(0), kh = w_in.size(1), kw = w_in.size(2);
  const ConvOut o = conv2d_out_hw(op, H, W, kh, kw, stride, padding, dilation);
  const int64_t Ho = o.h, Wo = o.w;
  checked_numel(op, "output elements", {Nb, Ho, Wo, std::max<int64_t>(Cout, 1)});
  check_reduction(op, kh * kw, c_in);
  const at::Tensor x = clear_tail_bits(x_in.contiguous(), c_in), w = clear_tail_bits(w_in.contiguous(), c_in);
  const bool bits = threshold.has_value();
  at::Tensor out = bits ? at::zeros({Nb, Ho, Wo, num_words(Cout)}, x.options().dtype(at::kInt))
                        : at::empty({Nb, Cout, Ho, Wo}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const int64_t NB = (Cout + NR - 1) / NR, T = kh * kw;
  EpiVecs ev;
  ev.scale = padded(scale, Cout, NB * NR, 1.f, op, "scale");
  ev.ass = padded(act_sum_scale, Cout, NB * NR, 0.f, op, "act_sum_scale");
  ev.wss = padded(weight_sum_scale, Cout, NB * NR, 0.f, op, "weight_sum_scale");
  ev.cs = padded(count_scale, Cout, NB * NR, 0.f, op, "count_scale");
  ev.bias = padded(bias, Cout, NB * NR, 0.f, op, "bias");
  ev.thr = padded(threshold, Cout, NB * NR, 0.f, op, "threshold");
  const Isa isa = active_isa();
  const bool amx = isa == Isa::Avx512 && Nb * Ho * Wo >= kAmxMinRows && use_amx();
  Panels pn;
  pack_panels(words_ptr(w), Cout, T, Cw, true, pn, true);  // the weight popcounts serve both paths
  std::vector<int8_t> bexp;
  if (amx) bexp = expand_weights_amx(words_ptr(w), Cout, T, Cw, c_in, true);
  std::vector<uint32_t> zbuf(static_cast<size_t>(std::max<int64_t>(1, Cw)), 0u);
  Ctx c;
  c.bexp = bexp.data();
  c.x = words_ptr(x);
  c.P = Nb * Ho * Wo;
  c.T = T;
  c.Cw = Cw;
  c.c_in = c_in;
  c.H = H, c.W = W, c.Ho = Ho, c.Wo = Wo, c.kh = kh, c.kw = kw;
  c.sh = stride[0], c.sw = stride[1], c.ph = padding[0], c.pw = padding[1], c.dh = dilation[0], c.dw = dilation[1];
  c.zbuf = zbuf.data();
  c.panels = pn.w.data();
  c.wpop = pn.pop.data();
  c.wpop_tot = pn.pop_tot.data();
  c.NB = NB;
  c.Nout = Cout;
  c.scale = ev.scale.data(), c.ass = ev.ass.data(), c.wss = ev.wss.data(), c.cs = ev.cs.data();
  c.bias = ev.bias.data(), c.thr = ev.thr.data();
  c.need_apop = act_sum_scale.has_value();
  std::vector<int32_t> xpop;
  if (c.need_apop && c.T > 1) {
    xpop = pixel_popcounts(c.x, Nb * H * W, Cw);
    c.xpop = xpop.data();
  }
  c.out = bits ? static_cast<void*>(out.data_ptr<int32_t>()) : static_cast<void*>(out.data_ptr<float>());
  c.ldo = bits ? 2 * num_words(Cout) : Cout;
  run({c}, bits ? pick_tile<true, kEpiBits>(isa, amx) : pick_tile<true, kEpiFloat>(isa, amx), amx);
  return out;
}

// ---------------------------------------------------------------------------------------------- prepacked conv
// binary_conv_prepack: the per-call weight work of binary_conv2d done once (deploy layers call it when they are
// built): panels (NB, T * Cw, NR) int32 in the micro-kernel's order (3-D, so Module.to(memory_format=...) leaves
// it alone), channels past C_out zero words, and wpop
// (NB, T + 1, NR) int32, rows t < T the popcount of tap t's weight words, row T their sum over the taps.
std::tuple<at::Tensor, at::Tensor> binary_conv_prepack_cpu(const at::Tensor& w_in, int64_t c_in) {
  static const char* op = "binary_conv_prepack";
  TORCH_CHECK(c_in >= 0, op, ": c_in must be >= 0");
  check_words(w_in, op, "w", c_in);
  TORCH_CHECK(w_in.dim() == 4, op, ": w must be OHWI packed (C_out, kh, kw, words), got ", w_in.sizes());
  const at::Tensor w = clear_tail_bits(w_in.contiguous(), c_in);
  const int64_t Cout = w.size(0), T = w.size(1) * w.size(2), Cw = w.size(3), NB = (Cout + NR - 1) / NR;
  check_reduction(op, T, c_in);
  Panels pn;
  pack_panels(words_ptr(w), Cout, T, Cw, true, pn, true);
  at::Tensor panels = at::empty({NB, T * Cw, NR}, w.options().dtype(at::kInt));
  at::Tensor wpop = at::empty({NB, T + 1, NR}, w.options().dtype(at::kInt));
  if (!pn.w.empty()) std::memcpy(panels.data_ptr<int32_t>(), pn.w.data(), pn.w.size() * sizeof(uint32_t));
  int32_t* wp = wpop.data_ptr<int32_t>();
  for (int64_t cb = 0; cb < NB; ++cb) {
    if (T > 0) std::memcpy(wp + cb * (T + 1) * NR, pn.pop.data() + cb * T * NR, T * NR * sizeof(int32_t));
    std::memcpy(wp + (cb * (T + 1) + T) * NR, pn.pop_tot.data() + cb * NR, NR * sizeof(int32_t));
  }
  return {panels, wpop};
}

// binary_conv_prepack_amx: the weights in the order the AMX path of binary_conv2d_prepacked loads them, as bit
// masks of its int8 tiles: (NBp, S, 16) int64, NBp = ceil(C_out/16) rounded up to even (blocks go in pairs),
// S = ceil(c_in/64) * kh*kw k-steps (64-channel group major, then taps), and row r of a k-step's tile holds channel
// c = 64*group + 4*r + j of output channel 16*block + n at bit 4*n + j (1 = +1). Bits past c_in and channels past
// C_out are 0 (-1 in the tile; the activation lanes there are 0 and those outputs are not stored).
at::Tensor binary_conv_prepack_amx_cpu(const at::Tensor& w_in, int64_t c_in) {
  static const char* op = "binary_conv_prepack_amx";
  TORCH_CHECK(c_in >= 0, op, ": c_in must be >= 0");
  check_words(w_in, op, "w", c_in);
  TORCH_CHECK(w_in.dim() == 4, op, ": w must be OHWI packed (C_out, kh, kw, words), got ", w_in.sizes());
  const at::Tensor w = clear_tail_bits(w_in.contiguous(), c_in);
  const int64_t Cout = w.size(0), T = w.size(1) * w.size(2), Cw = w.size(3);
  const int64_t NB = (Cout + NR - 1) / NR, NBp = NB + (NB & 1), G = (c_in + 63) / 64, S = G * T;
  check_reduction(op, T, c_in);
  at::Tensor out = at::zeros({NBp, S, 16}, w.options().dtype(at::kLong));
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const uint32_t* src = words_ptr(w);
  for (int64_t o = 0; o < Cout; ++o) {
    const int64_t cb = o / NR, n = o % NR;
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t* ws = src + (o * T + t) * Cw;
      for (int64_t q = 0; q < G; ++q) {
        const uint64_t bits = ws[2 * q] | (2 * q + 1 < Cw ? static_cast<uint64_t>(ws[2 * q + 1]) << 32 : 0);
        uint64_t* rows = dst + (cb * S + q * T + t) * 16;
        for (int r = 0; r < 16; ++r) rows[r] |= ((bits >> (4 * r)) & 0xFu) << (4 * n);
      }
    }
  }
  return out;
}

// binary_conv2d on prepacked weights with the fused epilogue (kEpiFused; schema in kernels/register.cpp).
std::tuple<at::Tensor, at::Tensor> binary_conv2d_prepacked_cpu(
    const at::Tensor& x_in, const at::Tensor& panels, const at::Tensor& wpop_in, int64_t c_in, int64_t c_out,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& act_sum_scale,
    const c10::optional<at::Tensor>& weight_sum_scale, const c10::optional<at::Tensor>& count_scale,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& maxout_pos, const c10::optional<at::Tensor>& maxout_neg,
    const c10::optional<at::Tensor>& threshold, bool float_out, const c10::optional<at::Tensor>& amx_weights) {
  static const char* op = "binary_conv2d_prepacked";
  TORCH_CHECK(c_in >= 0 && c_out >= 0, op, ": c_in and c_out must be >= 0");
  check_words(x_in, op, "x", c_in);
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be NHWC packed (N, H, W, words), got ", x_in.sizes());
  TORCH_CHECK(kernel_size.size() == 2, op, ": kernel_size must have 2 values");
  const int64_t kh = kernel_size[0], kw = kernel_size[1], T = kh * kw, Cw = num_words(c_in);
  const int64_t NB = (c_out + NR - 1) / NR;
  TORCH_CHECK(panels.device().is_cpu() && wpop_in.device().is_cpu(), op, ": the prepacked weights must be on CPU");
  TORCH_CHECK(panels.scalar_type() == at::kInt && panels.dim() == 3 && panels.size(0) == NB &&
                  panels.size(1) == T * Cw && panels.size(2) == NR,
              op, ": panels must be int32 (", NB, ", ", T * Cw, ", ", NR, ") from binary_conv_prepack, got ",
              panels.sizes(), " ", panels.scalar_type());
  TORCH_CHECK(wpop_in.scalar_type() == at::kInt && wpop_in.dim() == 3 && wpop_in.size(0) == NB &&
                  wpop_in.size(1) == T + 1 && wpop_in.size(2) == NR,
              op, ": wpop must be int32 (", NB, ", ", T + 1, ", ", NR, ") from binary_conv_prepack, got ",
              wpop_in.sizes());
  TORCH_CHECK(float_out || threshold.has_value(), op, ": nothing to compute (float_out=False and no threshold)");
  TORCH_CHECK(maxout_pos.has_value() == maxout_neg.has_value(), op, ": maxout_pos and maxout_neg go together");
  const int64_t Nb = x_in.size(0), H = x_in.size(1), W = x_in.size(2);
  const ConvOut o = conv2d_out_hw(op, H, W, kh, kw, stride, padding, dilation);
  const int64_t Ho = o.h, Wo = o.w;
  checked_numel(op, "output elements", {Nb, Ho, Wo, std::max<int64_t>(c_out, 1)});
  check_reduction(op, T, c_in);
  const at::Tensor x = clear_tail_bits(x_in.contiguous(), c_in);
  const at::Tensor pan = panels.contiguous(), wpop = wpop_in.contiguous();
  at::Tensor res;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kFloat, op, ": residual must be a float32 CPU tensor");
    TORCH_CHECK(r.dim() == 4 && r.size(0) == Nb && r.size(1) == c_out && r.size(2) == Ho && r.size(3) == Wo, op,
                ": residual must be (", Nb, ", ", c_out, ", ", Ho, ", ", Wo, "), got ", r.sizes());
    res = r.contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor out_f = float_out ? at::empty({Nb, c_out, Ho, Wo},
                                           x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast))
                               : at::empty({0}, x.options().dtype(at::kFloat));
  const bool bits = threshold.has_value();
  // each channel block writes one 16-bit half word: a row's last half word stays unwritten when NB is odd
  at::Tensor out_b = !bits ? at::empty({0}, x.options().dtype(at::kInt))
                     : (NB % 2) ? at::zeros({Nb, Ho, Wo, num_words(c_out)}, x.options().dtype(at::kInt))
                                : at::empty({Nb, Ho, Wo, num_words(c_out)}, x.options().dtype(at::kInt));
  if (Nb * Ho * Wo == 0 || c_out == 0) return {out_f, out_b};
  if (float_out) cpu::advise_huge_pages(out_f);
  EpiVecs ev;
  ev.scale = padded(scale, c_out, NB * NR, 1.f, op, "scale");
  ev.ass = padded(act_sum_scale, c_out, NB * NR, 0.f, op, "act_sum_scale");
  ev.wss = padded(weight_sum_scale, c_out, NB * NR, 0.f, op, "weight_sum_scale");
  ev.cs = padded(count_scale, c_out, NB * NR, 0.f, op, "count_scale");
  ev.bias = padded(bias, c_out, NB * NR, 0.f, op, "bias");
  ev.thr = padded(threshold, c_out, NB * NR, 0.f, op, "threshold");
  std::vector<float> mpos, mneg;
  bool mo_finite = true;
  if (maxout_pos.has_value()) {
    mpos = padded(maxout_pos, c_out, NB * NR, 1.f, op, "maxout_pos");
    mneg = padded(maxout_neg, c_out, NB * NR, 1.f, op, "maxout_neg");
    for (int64_t j = 0; j < c_out; ++j) mo_finite = mo_finite && std::isfinite(mpos[j]) && std::isfinite(mneg[j]);
  }
  // per-(block, tap) popcounts and per-block totals as the epilogue reads them
  std::vector<int32_t> pop(static_cast<size_t>(NB * T * NR)), pop_tot(static_cast<size_t>(NB * NR));
  const int32_t* wp = wpop.data_ptr<int32_t>();
  for (int64_t cb = 0; cb < NB; ++cb) {
    std::copy(wp + cb * (T + 1) * NR, wp + (cb * (T + 1) + T) * NR, pop.begin() + cb * T * NR);
    std::copy(wp + (cb * (T + 1) + T) * NR, wp + (cb * (T + 1) + T + 1) * NR, pop_tot.begin() + cb * NR);
  }
  std::vector<uint32_t> zbuf(static_cast<size_t>(std::max<int64_t>(1, Cw)), 0u);
  Ctx c;
  c.x = words_ptr(x);
  c.P = Nb * Ho * Wo;
  c.T = T;
  c.Cw = Cw;
  c.c_in = c_in;
  c.H = H, c.W = W, c.Ho = Ho, c.Wo = Wo, c.kh = kh, c.kw = kw;
  c.sh = stride[0], c.sw = stride[1], c.ph = padding[0], c.pw = padding[1], c.dh = dilation[0], c.dw = dilation[1];
  c.zbuf = zbuf.data();
  c.panels = reinterpret_cast<const uint32_t*>(pan.data_ptr<int32_t>());
  c.wpop = pop.data();
  c.wpop_tot = pop_tot.data();
  c.NB = NB;
  c.Nout = c_out;
  c.scale = ev.scale.data(), c.ass = ev.ass.data(), c.wss = ev.wss.data(), c.cs = ev.cs.data();
  c.bias = ev.bias.data(), c.thr = ev.thr.data();
  c.need_apop = act_sum_scale.has_value();
  c.out = float_out ? static_cast<void*>(out_f.data_ptr<float>()) : nullptr;
  c.ldo = c_out;
  c.res = res.defined() ? res.data_ptr<float>() : nullptr;
  c.ldr = c_out;
  c.mpos = mpos.empty() ? nullptr : mpos.data();
  c.mneg = mneg.empty() ? nullptr : mneg.data();
  c.mo_finite = mo_finite;
  c.outb = bits ? reinterpret_cast<uint16_t*>(out_b.data_ptr<int32_t>()) : nullptr;
  c.ldb = 2 * num_words(c_out);
  const Isa isa = active_isa();
  const uint64_t* amx_masks = nullptr;
  at::Tensor amc;
  if (amx_weights.has_value() && amx_weights->numel() > 0) {
    const at::Tensor& am = *amx_weights;
    const int64_t NBp = NB + (NB & 1), S = ((c_in + 63) / 64) * T;
    TORCH_CHECK(am.device().is_cpu() && am.scalar_type() == at::kLong && am.dim() == 3 && am.size(0) == NBp &&
                    am.size(1) == S && am.size(2) == 16,
                op, ": amx_weights must be int64 (", NBp, ", ", S, ", 16) from binary_conv_prepack_amx, got ",
                am.sizes(), " ", am.scalar_type());
#if QUANTKIT_X86
    // QUANTKIT_CPU_ISA=amx asks for the tiles on every shape; by default only where they pay (amx_worthwhile)
    if (S > 0 && isa == Isa::Avx512 && amx_for_prepacked_conv() && (use_amx() || amx::amx_worthwhile(c))) {
      amc = am.contiguous();
      amx_masks = reinterpret_cast<const uint64_t*>(amc.data_ptr<int64_t>());
    }
#endif
  }
  std::vector<int32_t> xpop;  // the AMX path makes its own window popcounts (up to 64 taps)
  if (c.need_apop && T > 1 && !(amx_masks && T <= 64)) {
    xpop = pixel_popcounts(c.x, Nb * H * W, Cw);
    c.xpop = xpop.data();
  }
#if QUANTKIT_X86
  if (amx_masks) {
    // An output this large is out of L2 before a later layer reads it (as a residual, two convs on): stored past
    // the caches it skips the read for ownership of every line. Smaller ones (batch 1) stay cached for that read.
    c.nt_out = float_out && c.P * c_out * 4 >= kNtOutputBytes;
    c.pf_rows = c.P * c_out * 4 >= kPrefetchRowsBytes;
    amx::conv_prepacked_amx<kEpiFused>(c, amx_masks, NB + (NB & 1));
    return {out_f, out_b};
  }
#endif
  TileFn fn = &portable::tile<true, kEpiFused>;
#if QUANTKIT_X86
  if (isa == Isa::Avx512) fn = &avx512::tile<true, kEpiFused>;
  else if (isa == Isa::Avx2) fn = &avx2::tile<true, kEpiFused>;
#endif
  run({c}, fn, false);
  return {out_f, out_b};
}

at::Tensor binary_bmm_impl(const at::Tensor& a_in, const at::Tensor& b_in, int64_t k, bool and01) {
  const char* op = and01 ? "binary_bmm_01" : "binary_bmm";
  TORCH_CHECK(k >= 0, op, ": k must be >= 0");
  check_words(a_in, op, "a", k);
  check_words(b_in, op, "b", k);
  TORCH_CHECK(a_in.dim() == 3 && b_in.dim() == 3 && a_in.size(0) == b_in.size(0), op,
              ": a and b must be (B, M, words) and (B, N, words) with the same B, got ", a_in.sizes(), " and ",
              b_in.sizes());
  check_reduction(op, 1, k);
  const at::Tensor a = clear_tail_bits(a_in.contiguous(), k), b = clear_tail_bits(b_in.contiguous(), k);
  const int64_t B = a.size(0), M = a.size(1), N = b.size(1), Kw = num_words(k);
  at::Tensor out = at::empty({B, M, N}, a.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const int64_t NB = (N + NR - 1) / NR;
  const Isa isa = active_isa();
  const bool amx = isa == Isa::Avx512 && M >= kAmxMinRows && use_amx();
  std::vector<Panels> pns(static_cast<size_t>(B));
  std::vector<std::vector<int8_t>> bexps(static_cast<size_t>(B));
  at::parallel_for(0, B, 1, [&](int64_t s, int64_t e) {
    for (int64_t bi = s; bi < e; ++bi) {
      if (amx)
        bexps[bi] = expand_weights_amx(words_ptr(b) + bi * N * Kw, N, 1, Kw, k, false);
      else
        pack_panels(words_ptr(b) + bi * N * Kw, N, 1, Kw, false, pns[bi], false);
    }
  });
  std::vector<uint32_t> zbuf(static_cast<size_t>(std::max<int64_t>(1, Kw)), 0u);
  std::vector<Ctx> ctxs(static_cast<size_t>(B));
  for (int64_t bi = 0; bi < B; ++bi) {
    Ctx& c = ctxs[bi];
    c.x = words_ptr(a) + bi * M * Kw;
    c.P = M;
    c.T = 1;
    c.Cw = Kw;
    c.c_in = k;
    c.zbuf = zbuf.data();
    c.panels = pns[bi].w.data();
    c.bexp = bexps[bi].data();
    c.NB = NB;
    c.Nout = N;
    c.need_apop = and01;
    c.out = out.data_ptr<int32_t>() + bi * M * N;
    c.ldo = N;
  }
  run(ctxs, and01 ? pick_tile<false, kEpiAnd01>(isa, amx) : pick_tile<false, kEpiXnorInt>(isa, amx), amx);
  return out;
}

at::Tensor binary_bmm_cpu(const at::Tensor& a, const at::Tensor& b, int64_t k) {
  return binary_bmm_impl(a, b, k, false);
}
at::Tensor binary_bmm_01_cpu(const at::Tensor& a, const at::Tensor& b, int64_t k) {
  return binary_bmm_impl(a, b, k, true);
}

// ---------------------------------------------------------------------------------------------- peak probe
// Register-resident XOR + POPCOUNT + ADD loop of the given ISA (16 independent accumulators, no loads): the
// ceiling the GEMM micro-kernel is measured against. Returns bit-MAC/s of one thread.
double popcount_peak_portable(int64_t iters) {
  uint64_t x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint64_t wv = 0x9E3779B97F4A7C15ull;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+r"(wv));
    for (int r = 0; r < 8; ++r) acc[r] += static_cast<uint64_t>(__builtin_popcountll(x[r] ^ wv));
  }
  const auto t1 = std::chrono::steady_clock::now();
  volatile uint64_t sink = acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
  (void)sink;
  const double sec = std::chrono::duration<double>(t1 - t0).count();
  return sec > 0 ? static_cast<double>(iters) * 8.0 * 64.0 / sec : 0.0;
}

#if QUANTKIT_X86
QK_TARGET_AVX2 double popcount_peak_avx2(int64_t iters) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i x0 = _mm256_set1_epi32(1), x1 = _mm256_set1_epi32(2), x2 = _mm256_set1_epi32(3), x3 = _mm256_set1_epi32(4);
  __m256i w0 = _mm256_set1_epi32(5), w1 = _mm256_set1_epi32(6);
  __m256i acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_si256();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+x"(x0), "+x"(x1), "+x"(x2), "+x"(x3), "+x"(w0), "+x"(w1));
    const __m256i xs[4] = {x0, x1, x2, x3};
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m256i v0 = _mm256_xor_si256(xs[r], w0), v1 = _mm256_xor_si256(xs[r], w1);
      acc[2 * r] = _mm256_add_epi8(acc[2 * r], _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v0, low)),
                                                                _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v0, 4), low))));
      acc[2 * r + 1] = _mm256_add_epi8(acc[2 * r + 1], _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v1, low)),
                                                                        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v1, 4), low))));
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m256i s = acc[0];
  for (int i = 1; i < 8; ++i) s = _mm256_add_epi8(s, acc[i]);
  volatile int sink = _mm256_extract_epi32(s, 0);
  (void)sink;
  const double sec = std::chrono::duration<double>(t1 - t0).count();
  return sec > 0 ? static_cast<double>(iters) * 8.0 * 256.0 / sec : 0.0;
}

QK_TARGET_AVX512 double popcount_peak_avx512(int64_t iters) {
  __m512i x0 = _mm512_set1_epi32(1), x1 = _mm512_set1_epi32(2), x2 = _mm512_set1_epi32(3), x3 = _mm512_set1_epi32(4);
  __m512i x4 = _mm512_set1_epi32(5), x5 = _mm512_set1_epi32(6), x6 = _mm512_set1_epi32(7), x7 = _mm512_set1_epi32(8);
  __m512i w0 = _mm512_set1_epi32(9), w1 = _mm512_set1_epi32(10);
  __m512i acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3), "+v"(x4), "+v"(x5), "+v"(x6), "+v"(x7), "+v"(w0),
                     "+v"(w1));
    const __m512i xs[8] = {x0, x1, x2, x3, x4, x5, x6, x7};
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      acc[2 * r] = _mm512_add_epi32(acc[2 * r], _mm512_popcnt_epi32(_mm512_xor_si512(xs[r], w0)));
      acc[2 * r + 1] = _mm512_add_epi32(acc[2 * r + 1], _mm512_popcnt_epi32(_mm512_xor_si512(xs[r], w1)));
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m512i s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_epi32(s, acc[i]);
  volatile int sink = _mm512_reduce_add_epi32(s);
  (void)sink;
  const double sec = std::chrono::duration<double>(t1 - t0).count();
  return sec > 0 ? static_cast<double>(iters) * 16.0 * 512.0 / sec : 0.0;
}
#endif

// Sum over at::get_num_threads() concurrent copies of the probe of the active ISA (bit-MAC/s).
double binary_popcount_peak(int64_t iters) {
  // bounded so that no argument makes the call run for more than a few seconds
  TORCH_CHECK(iters >= 1 && iters <= 1000000000, "binary_popcount_peak: iters must be in [1, 1e9], got ", iters);
  const Isa isa = active_isa();
  double (*fn)(int64_t) = popcount_peak_portable;
#if QUANTKIT_X86
  if (isa == Isa::Avx512) fn = popcount_peak_avx512;
  else if (isa == Isa::Avx2) fn = popcount_peak_avx2;
#endif
  const int64_t nt = at::get_num_threads();
  std::vector<double> rates(static_cast<size_t>(nt), 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) rates[i] = fn(iters);
  });
  double total = 0.0;
  for (double r : rates) total += r;
  return total;
}

}  // namespace binary
}  // namespace cpu
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("binary_linear", &quantkit::cpu::binary::binary_linear_cpu);
  m.impl("binary_conv2d", &quantkit::cpu::binary::binary_conv2d_cpu);
  m.impl("binary_conv_prepack", &quantkit::cpu::binary::binary_conv_prepack_cpu);
  m.impl("binary_conv2d_prepacked", &quantkit::cpu::binary::binary_conv2d_prepacked_cpu);
  m.impl("binary_conv_prepack_amx", &quantkit::cpu::binary::binary_conv_prepack_amx_cpu);
  m.impl("binary_bmm", &quantkit::cpu::binary::binary_bmm_cpu);
  m.impl("binary_bmm_01", &quantkit::cpu::binary::binary_bmm_01_cpu);
}

TORCH_LIBRARY_IMPL(quantkit, CompositeExplicitAutograd, m) {
  m.impl("binary_popcount_peak", &quantkit::cpu::binary::binary_popcount_peak);
}
