// Max pooling of channels_last float32 activations (the ResNet stem's MaxPool2d(3, 2, 1) after conv -> ReLU),
// optionally fused with the ReLU before it, without the argmax indices ATen's CPU max_pool2d always computes.
//
// Exactness: the result equals torch.nn.functional.max_pool2d(x, k, s, p) (then .relu()) bit for bit. ATen scans
// each window row by row and replaces its running value m by a tap v when (v > m || isnan(v)); so a window's
// result is its LAST NaN (payload and sign as read) if it has one, else its FIRST maximal value (of -0.0 and +0.0,
// whichever comes first). Every path here applies that same step in the same tap order:
//   * portable: the comparison itself;
//   * AVX-512: VMAXPS(v, m) is v > m ? v : m (the first maximum stays, and a NaN m stays), merge-masked so lanes
//     where v is NaN take v: one compare into a mask and one masked max per tap;
//   * AVX2: the same VMAXPS followed by a blend on an unordered compare.
// Padded taps are skipped (ATen's -inf padding can never win: every window holds a real tap when the padding is at
// most half the kernel, which is checked). ReLU is m < 0 ? +0 : m as ATen's relu (NaN and -0.0 pass through):
// VMAXPS(+0, m). Geometry: dilation 1, floor output size (ceil_mode False).
// Threads: at::parallel_for over (image, output row); ISA: cpu::active_isa() (QUANTKIT_CPU_ISA lowers it).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/cpu_features.h"
#include "cpu/packing.h"

#if QUANTKIT_X86
#include <immintrin.h>
#endif

namespace quantkit {
namespace cpu {
namespace {

constexpr const char* kOp = "quantkit::max_pool2d_nhwc";

struct PoolGeom {
  const float* x;  // (N, H, W, C) in memory
  float* y;        // (N, Ho, Wo, C) in memory
  int64_t H, W, C, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw;
  bool relu;
  int64_t ring = 0;  // > 0: x holds only `ring` input rows, row ih at slot ih % ring (the stem kernel's conv rows)
};

// Input row ih of image n.
inline const float* pool_input_row(const PoolGeom& g, int64_t n, int64_t ih) {
  if (g.ring > 0) return g.x + (ih % g.ring) * g.W * g.C;
  return g.x + (n * g.H + ih) * g.W * g.C;
}

// [lo, hi): the valid input indices of the window starting at `start` (may be negative) of `k` taps, in [0, n).
// Written so that a huge k (the schema takes any int64) cannot overflow: start >= -p and p <= k / 2.
inline void clip_window(int64_t start, int64_t k, int64_t n, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(start, 0);
  hi = k >= n - start ? n : start + k;
}

// ATen's update step (see the header): the running value m becomes v when v > m or v is NaN.
// Bitwise | and no short-circuit: branch-free, so the compiler vectorises it into compares and a blend.
inline float pool_step(float m, float v) { return ((v > m) | (v != v)) ? v : m; }
inline float relu_step(float m) { return 0.f > m ? 0.f : m; }

// Each path computes one output row in passes over the window's input rows, top to bottom: a pass runs along one
// input row and updates the running maxima of every output pixel of the row (kept in y: Wo * C floats, in L1/L2)
// with that row's taps, left to right. The taps are still combined in ATen's order for each output (row by row,
// left to right within a row), and the input is read as one linear stream per pass instead of kh interleaved ones:
// faster once the input no longer fits the cache (a batch of stems), the same when it does.
// The channel loop over __restrict locals: with the sizes read through `g` (which a store to y could alias, as
// far as the compiler knows) it would not vectorise.
inline void pool_taps_portable(const float* __restrict t, float* __restrict y, int64_t C) {
  for (int64_t c = 0; c < C; ++c) y[c] = pool_step(y[c], t[c]);
}

void pool_row_portable(const PoolGeom& g, int64_t n, int64_t oh) {
  int64_t h_lo, h_hi;
  clip_window(oh * g.sh - g.ph, g.kh, g.H, h_lo, h_hi);
  const int64_t C = g.C, W = g.W, Wo = g.Wo, kw = g.kw, sw = g.sw, pw = g.pw;
  float* yrow = g.y + (n * g.Ho + oh) * Wo * C;
  for (int64_t i = 0; i < Wo * C; ++i) yrow[i] = -std::numeric_limits<float>::infinity();
  for (int64_t ih = h_lo; ih < h_hi; ++ih) {
    const float* row = pool_input_row(g, n, ih);
    for (int64_t ow = 0; ow < Wo; ++ow) {
      int64_t w_lo, w_hi;
      clip_window(ow * sw - pw, kw, W, w_lo, w_hi);
      for (int64_t iw = w_lo; iw < w_hi; ++iw) pool_taps_portable(row + iw * C, yrow + ow * C, C);
    }
  }
  if (g.relu)
    for (int64_t i = 0; i < Wo * C; ++i) yrow[i] = relu_step(yrow[i]);
}

#if QUANTKIT_X86
QK_TARGET_AVX512 inline __m512 pool_step512(__m512 m, __m512 v) {
  const __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  return _mm512_mask_max_ps(v, ordered, v, m);  // NaN lanes of v: v itself
}

// One pass of input row `row` over U vectors of 16 channels from channel c (the last one masked by `tail`) of one
// output pixel y: running maxima start at -inf on the window's first row (`first`), ReLU after its last (`last`).
template <int U>
QK_TARGET_AVX512 inline void pool_pass512(const PoolGeom& g, const float* row, int64_t w_lo, int64_t w_hi, int64_t c,
                                          __mmask16 tail, float* y, bool first, bool last) {
  __m512 m[U];
  for (int u = 0; u < U; ++u) {
    const __mmask16 k = u == U - 1 ? tail : __mmask16(0xFFFF);
    m[u] = first ? _mm512_set1_ps(-std::numeric_limits<float>::infinity()) : _mm512_maskz_loadu_ps(k, y + c + 16 * u);
  }
  for (int64_t iw = w_lo; iw < w_hi; ++iw) {
    const float* t = row + iw * g.C + c;
    for (int u = 0; u < U; ++u) {
      const __mmask16 k = u == U - 1 ? tail : __mmask16(0xFFFF);
      m[u] = pool_step512(m[u], _mm512_maskz_loadu_ps(k, t + 16 * u));
    }
  }
  for (int u = 0; u < U; ++u) {
    // all lanes: the merge source is never used (the unmasked intrinsic trips GCC 12's -Wmaybe-uninitialized)
    if (last && g.relu) m[u] = _mm512_mask_max_ps(m[u], __mmask16(0xFFFF), _mm512_setzero_ps(), m[u]);
    _mm512_mask_storeu_ps(y + c + 16 * u, u == U - 1 ? tail : __mmask16(0xFFFF), m[u]);
  }
}

QK_TARGET_AVX512 void pool_row_avx512(const PoolGeom& g, int64_t n, int64_t oh) {
  int64_t h_lo, h_hi;
  clip_window(oh * g.sh - g.ph, g.kh, g.H, h_lo, h_hi);
  float* yrow = g.y + (n * g.Ho + oh) * g.Wo * g.C;
  const __mmask16 full = 0xFFFF;
  const int64_t rem = g.C % 16;
  const __mmask16 tail = rem ? __mmask16((1u << rem) - 1u) : full;
  const int64_t c_full = g.C - rem;  // channels in whole vectors
  for (int64_t ih = h_lo; ih < h_hi; ++ih) {
    const float* row = pool_input_row(g, n, ih);
    const bool first = ih == h_lo, last = ih == h_hi - 1;
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      int64_t w_lo, w_hi;
      clip_window(ow * g.sw - g.pw, g.kw, g.W, w_lo, w_hi);
      float* y = yrow + ow * g.C;
      int64_t c = 0;
      // four independent running maxima per tap (64 channels: the ResNet stem's whole pixel)
      for (; c + 64 <= c_full; c += 64) pool_pass512<4>(g, row, w_lo, w_hi, c, full, y, first, last);
      for (; c + 16 <= c_full; c += 16) pool_pass512<1>(g, row, w_lo, w_hi, c, full, y, first, last);
      if (rem) pool_pass512<1>(g, row, w_lo, w_hi, c, tail, y, first, last);
    }
  }
}

QK_TARGET_AVX2 inline __m256 pool_step256(__m256 m, __m256 v) {
  return _mm256_blendv_ps(_mm256_max_ps(v, m), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

template <int U>
QK_TARGET_AVX2 inline void pool_pass256(const PoolGeom& g, const float* row, int64_t w_lo, int64_t w_hi, int64_t c,
                                        float* y, bool first, bool last) {
  __m256 m[U];
  for (int u = 0; u < U; ++u)
    m[u] = first ? _mm256_set1_ps(-std::numeric_limits<float>::infinity()) : _mm256_loadu_ps(y + c + 8 * u);
  for (int64_t iw = w_lo; iw < w_hi; ++iw) {
    const float* t = row + iw * g.C + c;
    for (int u = 0; u < U; ++u) m[u] = pool_step256(m[u], _mm256_loadu_ps(t + 8 * u));
  }
  for (int u = 0; u < U; ++u) {
    if (last && g.relu) m[u] = _mm256_max_ps(_mm256_setzero_ps(), m[u]);
    _mm256_storeu_ps(y + c + 8 * u, m[u]);
  }
}

QK_TARGET_AVX2 void pool_row_avx2(const PoolGeom& g, int64_t n, int64_t oh) {
  int64_t h_lo, h_hi;
  clip_window(oh * g.sh - g.ph, g.kh, g.H, h_lo, h_hi);
  float* yrow = g.y + (n * g.Ho + oh) * g.Wo * g.C;
  const int64_t c_full = g.C - g.C % 8;
  for (int64_t ih = h_lo; ih < h_hi; ++ih) {
    const float* row = pool_input_row(g, n, ih);
    const bool first = ih == h_lo, last = ih == h_hi - 1;
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      int64_t w_lo, w_hi;
      clip_window(ow * g.sw - g.pw, g.kw, g.W, w_lo, w_hi);
      float* y = yrow + ow * g.C;
      int64_t c = 0;
      for (; c + 32 <= c_full; c += 32) pool_pass256<4>(g, row, w_lo, w_hi, c, y, first, last);
      for (; c + 8 <= c_full; c += 8) pool_pass256<1>(g, row, w_lo, w_hi, c, y, first, last);
      for (; c < g.C; ++c) {  // the last C % 8 channels, one at a time
        float m = first ? -std::numeric_limits<float>::infinity() : y[c];
        for (int64_t iw = w_lo; iw < w_hi; ++iw) m = pool_step(m, row[iw * g.C + c]);
        y[c] = last && g.relu ? relu_step(m) : m;
      }
    }
  }
}
#endif

// Checks the arguments and returns the output shape (N, C, Ho, Wo); fills the geometry except the data pointers.
std::vector<int64_t> pool_shape(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, PoolGeom& g) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be 4-D (N, C, H, W), got shape ", x.sizes(),
              "; add the batch dimension with x.unsqueeze(0)");
  TORCH_CHECK(x.scalar_type() == at::kFloat, kOp, ": x must be float32, got ", x.scalar_type(),
              "; convert it with x.float()");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, kOp,
              ": kernel_size, stride and padding must have two values (height, width), got ", kernel_size, ", ",
              stride, ", ", padding);
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(H > 0 && W > 0, kOp, ": x must have a non-empty height and width (as torch's max_pool2d), got shape ",
              x.sizes());
  int64_t out_hw[2];
  const int64_t in_hw[2] = {H, W};
  for (int i = 0; i < 2; ++i) {
    const int64_t k = kernel_size[i], s = stride[i], p = padding[i];
    TORCH_CHECK(k >= 1 && s >= 1 && p >= 0, kOp, ": kernel_size and stride must be >= 1 and padding >= 0, got ",
                kernel_size, ", ", stride, ", ", padding);
    TORCH_CHECK(p <= k / 2, kOp, ": padding must be at most half the kernel size (as torch's max_pool2d), got ",
                "padding ", padding, " for kernel_size ", kernel_size);
    int64_t span = 0;  // H + 2p: p <= k / 2 < 2^62, only the sum with H can overflow
    TORCH_CHECK(!__builtin_add_overflow(in_hw[i], 2 * p, &span), kOp, ": input size + 2 * padding overflows int64");
    TORCH_CHECK(span >= k, kOp, ": the kernel ", kernel_size, " is larger than the padded input (", H, " x ", W,
                " with padding ", padding, "); the output would be empty");
    out_hw[i] = (span - k) / s + 1;
  }
  g.H = H;
  g.W = W;
  g.C = x.size(1);
  g.Ho = out_hw[0];
  g.Wo = out_hw[1];
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  return {x.size(0), g.C, g.Ho, g.Wo};
}

// x in channels_last memory: itself, or a channels_last copy of a contiguous NCHW x.
at::Tensor channels_last_input(const at::Tensor& x) {
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  TORCH_CHECK(x.is_contiguous(), kOp, ": x must be channels_last (or contiguous NCHW, which is copied), got strides ",
              x.strides(), "; call x.contiguous(memory_format=torch.channels_last)");
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

void pool_into(const at::Tensor& xc, at::Tensor& y, PoolGeom& g) {
  const int64_t N = xc.size(0);
  if (y.numel() == 0) return;
  g.x = xc.data_ptr<float>();
  g.y = y.data_ptr<float>();
  const Isa isa = active_isa();
  // work per output row (taps x channels): rows are grouped so that a thread gets at least ~32k of it
  const int64_t row_work = std::max<int64_t>(1, g.Wo * g.C * std::min(g.kh, g.H) * std::min(g.kw, g.W));
  const int64_t grain = std::max<int64_t>(1, 32768 / row_work);
  at::parallel_for(0, N * g.Ho, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho, oh = r % g.Ho;
#if QUANTKIT_X86
      if (isa == Isa::Avx512) {
        pool_row_avx512(g, n, oh);
        continue;
      }
      if (isa == Isa::Avx2) {
        pool_row_avx2(g, n, oh);
        continue;
      }
#endif
      pool_row_portable(g, n, oh);
    }
  });
}

// ---------------------------------------------------------------------------------------------- conv -> pool
// conv_max_pool2d_nhwc: max_pool(relu(conv2d(x, w) + bias)) for a network's stem (few input channels), one kernel.
// The conv is direct: per output pixel and 16 channels one zmm accumulator, started at the bias, then one FMA per tap
// (kh, kw, c_in) in that order, the input value broadcast: a block of 6 pixels x 64 channels keeps 24 accumulators
// and the 4 weight vectors of a tap in registers (FMA-bound); the AVX2 loop does the same with 6 pixels x 16
// channels in ymm registers, and the portable loop (std::fma, the same order) serves the rest. The weights are prepacked (Python:
// pack_stem_weight) as (KH, KW * C_in, C_out): for a fixed kernel row the KW * C_in taps of a pixel are
// consecutive floats of an NHWC input row, so the tap loop is one linear run per kernel row. Conv rows are made in
// order into a ring of (pool kh + pool sh) rows (PoolGeom::ring) and each pool row runs (the pool code above) as
// soon as its window's conv rows exist: they are read from L1/L2, and the conv output never goes to memory. Input
// rows are copied once per task into a zero-padded band (the conv's padding). Threads: (image, band of pool rows)
// tasks; a band recomputes the conv rows its window shares with the band above.
struct StemGeom {
  int64_t N, Cin, H, W, Cout, KH, KW, sh, sw, ph, pw, Hc, Wc;  // conv input / kernel / output sizes
  PoolGeom pool;                                                 // pool over the (Hc, Wc, Cout) conv output
};

// Conv output row r of one image into crow (Wc x Cout), from the zero-padded input band xb whose row 0 is input row
// `band_row0` (padded coordinates: input row ih is band row ih + ph - band_row0); xb rows are Wp * Cin floats.
void stem_conv_row_portable(const StemGeom& s, const float* xb, int64_t band_row0, int64_t Wp, const float* w,
                            const float* bias, int64_t r, float* crow) {
  const int64_t U = s.KW * s.Cin;
  for (int64_t ow = 0; ow < s.Wc; ++ow) {
    float* o = crow + ow * s.Cout;
    for (int64_t c = 0; c < s.Cout; ++c) o[c] = bias ? bias[c] : 0.f;
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      const float* xr = xb + (r * s.sh + kh - band_row0) * Wp * s.Cin + ow * s.sw * s.Cin;
      const float* wk = w + kh * U * s.Cout;
      for (int64_t u = 0; u < U; ++u) {
        const float a = xr[u];
        const float* wu = wk + u * s.Cout;
        for (int64_t c = 0; c < s.Cout; ++c) o[c] = std::fma(a, wu[c], o[c]);
      }
    }
  }
}

#if QUANTKIT_X86
// J pixels x Q vectors of 16 channels from channel c0: the register block of the AVX-512 conv row.
template <int J, int Q>
QK_TARGET_AVX512 inline void stem_block512(const StemGeom& s, const float* xr0, int64_t Wp, const float* w,
                                           const float* bias, int64_t c0, float* o) {
  const int64_t U = s.KW * s.Cin, px = s.sw * s.Cin, row = Wp * s.Cin, Cout = s.Cout;
  __m512 acc[J][Q];
  for (int q = 0; q < Q; ++q) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + c0 + 16 * q) : _mm512_setzero_ps();
    for (int j = 0; j < J; ++j) acc[j][q] = b;
  }
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    const float* xr = xr0 + kh * row;
    const float* wk = w + kh * U * Cout + c0;
    for (int64_t u = 0; u < U; ++u) {
      __m512 wv[Q];
      for (int q = 0; q < Q; ++q) wv[q] = _mm512_loadu_ps(wk + u * Cout + 16 * q);
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        const __m512 a = _mm512_set1_ps(xr[j * px + u]);
        for (int q = 0; q < Q; ++q) acc[j][q] = _mm512_fmadd_ps(a, wv[q], acc[j][q]);
      }
    }
  }
  for (int j = 0; j < J; ++j)
    for (int q = 0; q < Q; ++q) _mm512_storeu_ps(o + j * Cout + c0 + 16 * q, acc[j][q]);
}

template <int Q>
QK_TARGET_AVX512 inline void stem_pixels512(const StemGeom& s, const float* xr0, int64_t Wp, const float* w,
                                            const float* bias, int64_t c0, float* crow) {
  const int64_t px = s.sw * s.Cin;
  int64_t ow = 0;
  for (; ow + 6 <= s.Wc; ow += 6) stem_block512<6, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
  switch (s.Wc - ow) {
    case 5: return stem_block512<5, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    case 4: return stem_block512<4, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    case 3: return stem_block512<3, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    case 2: return stem_block512<2, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    case 1: return stem_block512<1, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    default: return;
  }
}

// C_out a multiple of 16 (checked by the caller): chunks of 64 channels, then one of 16, 32 or 48.
QK_TARGET_AVX512 void stem_conv_row_avx512(const StemGeom& s, const float* xb, int64_t band_row0, int64_t Wp,
                                           const float* w, const float* bias, int64_t r, float* crow) {
  const float* xr0 = xb + (r * s.sh - band_row0) * Wp * s.Cin;
  int64_t c0 = 0;
  for (; c0 + 64 <= s.Cout; c0 += 64) stem_pixels512<4>(s, xr0, Wp, w, bias, c0, crow);
  switch ((s.Cout - c0) / 16) {
    case 3: return stem_pixels512<3>(s, xr0, Wp, w, bias, c0, crow);
    case 2: return stem_pixels512<2>(s, xr0, Wp, w, bias, c0, crow);
    case 1: return stem_pixels512<1>(s, xr0, Wp, w, bias, c0, crow);
    default: return;
  }
}

// The AVX2 form of the same loop, 8 channels per ymm: a block of 6 pixels x 16 channels keeps 12 accumulators, the
// 2 weight vectors of a tap and the broadcast input in the 16 registers. Same FMA order per output as above, so
// every level computes the same floats.
template <int J, int Q>
QK_TARGET_AVX2 inline void stem_block256(const StemGeom& s, const float* xr0, int64_t Wp, const float* w,
                                         const float* bias, int64_t c0, float* o) {
  const int64_t U = s.KW * s.Cin, px = s.sw * s.Cin, row = Wp * s.Cin, Cout = s.Cout;
  __m256 acc[J][Q];
  for (int q = 0; q < Q; ++q) {
    const __m256 b = bias ? _mm256_loadu_ps(bias + c0 + 8 * q) : _mm256_setzero_ps();
    for (int j = 0; j < J; ++j) acc[j][q] = b;
  }
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    const float* xr = xr0 + kh * row;
    const float* wk = w + kh * U * Cout + c0;
    for (int64_t u = 0; u < U; ++u) {
      __m256 wv[Q];
      for (int q = 0; q < Q; ++q) wv[q] = _mm256_loadu_ps(wk + u * Cout + 8 * q);
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        const __m256 a = _mm256_broadcast_ss(xr + j * px + u);
        for (int q = 0; q < Q; ++q) acc[j][q] = _mm256_fmadd_ps(a, wv[q], acc[j][q]);
      }
    }
  }
  for (int j = 0; j < J; ++j)
    for (int q = 0; q < Q; ++q) _mm256_storeu_ps(o + j * Cout + c0 + 8 * q, acc[j][q]);
}

template <int Q>
QK_TARGET_AVX2 inline void stem_pixels256(const StemGeom& s, const float* xr0, int64_t Wp, const float* w,
                                          const float* bias, int64_t c0, float* crow) {
  const int64_t px = s.sw * s.Cin;
  int64_t ow = 0;
  for (; ow + 6 <= s.Wc; ow += 6) stem_block256<6, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
  switch (s.Wc - ow) {
    case 5: return stem_block256<5, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    case 4: return stem_block256<4, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    case 3: return stem_block256<3, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    case 2: return stem_block256<2, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    case 1: return stem_block256<1, Q>(s, xr0 + ow * px, Wp, w, bias, c0, crow + ow * s.Cout);
    default: return;
  }
}

// C_out a multiple of 8 (checked by the caller): chunks of 16 channels, then one of 8.
QK_TARGET_AVX2 void stem_conv_row_avx2(const StemGeom& s, const float* xb, int64_t band_row0, int64_t Wp,
                                       const float* w, const float* bias, int64_t r, float* crow) {
  const float* xr0 = xb + (r * s.sh - band_row0) * Wp * s.Cin;
  int64_t c0 = 0;
  for (; c0 + 16 <= s.Cout; c0 += 16) stem_pixels256<2>(s, xr0, Wp, w, bias, c0, crow);
  if (c0 < s.Cout) stem_pixels256<1>(s, xr0, Wp, w, bias, c0, crow);
}
#endif

// Which conv-row loop runs: the AVX-512 one (C_out % 16 == 0), the AVX2 one (C_out % 8 == 0) or the portable one.
enum class StemLoop { Portable, Avx2, Avx512 };

// Pool rows [p0, p1) of image n: the conv rows their windows need, in order, each pool row right after its last one.
void stem_band(const StemGeom& s, const float* x, const float* w, const float* bias, float* conv_img, float* y,
               int64_t n, int64_t p0, int64_t p1, std::vector<float>& band, StemLoop loop, Isa isa) {
  const PoolGeom& g = s.pool;
  int64_t lo0, hi0, lo1, hi1;
  clip_window(p0 * g.sh - g.ph, g.kh, g.H, lo0, hi0);
  clip_window((p1 - 1) * g.sh - g.ph, g.kh, g.H, lo1, hi1);
  const int64_t r_first = lo0, r_last = hi1 - 1;  // conv rows of the band
  // zero-padded input rows of those conv rows: padded row index = input row + ph
  const int64_t band_row0 = r_first * s.sh, band_rows = (r_last - r_first) * s.sh + s.KH;
  const int64_t Wp = (s.Wc - 1) * s.sw + s.KW;  // padded columns the conv reads
  band.resize(static_cast<size_t>(band_rows * Wp * s.Cin));  // every element written below: padding or input
  const float* img = x + n * s.H * s.W * s.Cin;
  const int64_t col_lo = std::min<int64_t>(s.pw, Wp), col_hi = std::min<int64_t>(Wp, s.pw + s.W);  // input columns
  for (int64_t br = 0; br < band_rows; ++br) {
    float* dst = band.data() + br * Wp * s.Cin;
    const int64_t ih = band_row0 + br - s.ph;
    if (ih < 0 || ih >= s.H) {
      std::fill(dst, dst + Wp * s.Cin, 0.f);
      continue;
    }
    std::fill(dst, dst + col_lo * s.Cin, 0.f);
    if (col_hi > col_lo) std::copy(img + ih * s.W * s.Cin, img + (ih * s.W + (col_hi - col_lo)) * s.Cin,
                                   dst + col_lo * s.Cin);
    std::fill(dst + std::max(col_hi, col_lo) * s.Cin, dst + Wp * s.Cin, 0.f);
  }
  // conv rows in a ring of kh + sh rows: a pool row's window (kh rows) plus the rows made before the next one's
  PoolGeom pg = g;
  pg.x = conv_img;
  pg.ring = g.kh + g.sh;
  pg.y = y + n * g.Ho * g.Wo * g.C;
  int64_t next = r_first;  // next conv row to compute
  for (int64_t oh = p0; oh < p1; ++oh) {
    int64_t lo, hi;
    clip_window(oh * g.sh - g.ph, g.kh, g.H, lo, hi);
    for (; next < hi; ++next) {
      float* crow = conv_img + (next % pg.ring) * s.Wc * s.Cout;
#if QUANTKIT_X86
      if (loop == StemLoop::Avx512) {
        stem_conv_row_avx512(s, band.data(), band_row0, Wp, w, bias, next, crow);
        continue;
      }
      if (loop == StemLoop::Avx2) {
        stem_conv_row_avx2(s, band.data(), band_row0, Wp, w, bias, next, crow);
        continue;
      }
#endif
      stem_conv_row_portable(s, band.data(), band_row0, Wp, w, bias, next, crow);
    }
#if QUANTKIT_X86
    if (isa == Isa::Avx512) {
      pool_row_avx512(pg, 0, oh);
      continue;
    }
    if (isa == Isa::Avx2) {
      pool_row_avx2(pg, 0, oh);
      continue;
    }
#endif
    pool_row_portable(pg, 0, oh);
  }
  (void)loop;
  (void)isa;
}

constexpr const char* kStemOp = "quantkit::conv_max_pool2d_nhwc";

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_max_pool2d_nhwc_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef conv_stride,
    at::IntArrayRef conv_padding, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    bool relu, const c10::optional<at::Tensor>& threshold) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), kStemOp, ": x and weight must be CPU tensors");
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, kStemOp, ": x must be float32 (N, C, H, W), got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kFloat && weight.is_contiguous(), kStemOp,
              ": weight must be contiguous float32 (KH, KW * C_in, C_out) from pack_stem_weight, got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(conv_stride.size() == 2 && conv_padding.size() == 2, kStemOp,
              ": conv_stride and conv_padding must have two values");
  StemGeom s{};
  s.N = x.size(0), s.Cin = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.KH = weight.size(0), s.Cout = weight.size(2);
  TORCH_CHECK(s.Cin > 0 && weight.size(1) % s.Cin == 0 && s.KH > 0 && weight.size(1) > 0, kStemOp,
              ": weight (KH, KW * C_in, C_out) = ", weight.sizes(), " does not match x's ", s.Cin, " channels");
  s.KW = weight.size(1) / s.Cin;
  s.sh = conv_stride[0], s.sw = conv_stride[1], s.ph = conv_padding[0], s.pw = conv_padding[1];
  TORCH_CHECK(s.sh >= 1 && s.sw >= 1 && s.ph >= 0 && s.pw >= 0 && s.ph < s.KH && s.pw < s.KW, kStemOp,
              ": conv stride must be >= 1 and padding in [0, kernel size), got ", conv_stride, ", ", conv_padding);
  TORCH_CHECK(s.H + 2 * s.ph >= s.KH && s.W + 2 * s.pw >= s.KW, kStemOp, ": the conv kernel (", s.KH, ", ", s.KW,
              ") is larger than the padded input ", x.sizes());
  s.Hc = (s.H + 2 * s.ph - s.KH) / s.sh + 1;
  s.Wc = (s.W + 2 * s.pw - s.KW) / s.sw + 1;
  if (bias.has_value())
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->numel() == s.Cout, kStemOp,
                ": bias must be float32 with ", s.Cout, " values");
  // the pool's geometry and checks, on the conv output's shape
  PoolGeom& g = s.pool;
  const at::Tensor conv_shape = at::empty({1}, x.options()).expand({s.N, s.Cout, s.Hc, s.Wc});  // sizes only
  const std::vector<int64_t> shape = pool_shape(conv_shape, kernel_size, stride, padding, g);
  g.relu = relu;
  if (threshold.has_value())
    TORCH_CHECK(threshold->device().is_cpu() && threshold->scalar_type() == at::kFloat &&
                    threshold->numel() == s.Cout,
                kStemOp, ": threshold must be float32 with ", s.Cout, " values (one per output channel)");
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor th = threshold.has_value() ? threshold->contiguous() : at::Tensor();
  at::Tensor y = at::empty(shape, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t words = (s.Cout + 31) / 32;
  at::Tensor bits = th.defined() ? at::empty({s.N, g.Ho, g.Wo, words}, x.options().dtype(at::kInt))
                                 : at::empty({0}, x.options().dtype(at::kInt));
  if (y.numel() == 0) return {y, bits};
  const Isa isa = active_isa();
  const StemLoop loop = !QUANTKIT_X86                            ? StemLoop::Portable
                        : isa == Isa::Avx512 && s.Cout % 16 == 0 ? StemLoop::Avx512
                        : isa != Isa::Portable && s.Cout % 8 == 0 ? StemLoop::Avx2
                                                                  : StemLoop::Portable;
  // tasks: (image, band of pool rows); bands only where there are fewer images than threads
  const int64_t threads = at::get_num_threads();
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(g.Ho, (threads + s.N - 1) / s.N));
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, s.N * bands, 1, [&](int64_t begin, int64_t end) {
    // this task's ring of conv rows (uninitialized: every row the pool reads is written first) and padded input band
    at::Tensor conv_img = at::empty({(g.kh + g.sh) * s.Wc * s.Cout}, xc.options().memory_format(at::MemoryFormat::Contiguous));
    std::vector<float> band;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / bands, k = t % bands;
      const int64_t p0 = g.Ho * k / bands, p1 = g.Ho * (k + 1) / bands;
      if (p1 > p0) {
        stem_band(s, xp, wp, bp, conv_img.data_ptr<float>(), yp, n, p0, p1, band, loop, isa);
        if (th.defined())  // the band's rows are still in cache
          pack_float_rows(yp, th.data_ptr<float>(), s.Cout, reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>()),
                          (n * g.Ho + p0) * g.Wo, (n * g.Ho + p1) * g.Wo, isa);
      }
    }
  });
  return {y, bits};
}

at::Tensor max_pool2d_nhwc_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool relu) {
  PoolGeom g{};
  const std::vector<int64_t> shape = pool_shape(x, kernel_size, stride, padding, g);
  g.relu = relu;
  const at::Tensor xc = channels_last_input(x);
  at::Tensor y = at::empty(shape, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  pool_into(xc, y, g);
  return y;
}

void max_pool2d_nhwc_into_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, bool relu, at::Tensor& out) {
  PoolGeom g{};
  const std::vector<int64_t> shape = pool_shape(x, kernel_size, stride, padding, g);
  g.relu = relu;
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat, kOp, ": out must be a float32 CPU tensor, ",
              "got ", out.scalar_type(), " on ", out.device());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), kOp, ": out must have the output's shape ", at::IntArrayRef(shape),
              ", got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), kOp, ": out must be contiguous in channels_last ",
              "memory (a batch slice big[i:j] of a channels_last tensor is), got strides ", out.strides());
  TORCH_CHECK(at::get_overlap_status(out, x) == at::MemOverlapStatus::No, kOp, ": out must not share memory ",
              "with x; pass a separate output tensor");
  const at::Tensor xc = channels_last_input(x);
  pool_into(xc, out, g);
}

}  // namespace cpu
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("max_pool2d_nhwc", &quantkit::cpu::max_pool2d_nhwc_cpu);
  m.impl("max_pool2d_nhwc_into", &quantkit::cpu::max_pool2d_nhwc_into_cpu);
  m.impl("conv_max_pool2d_nhwc", &quantkit::cpu::conv_max_pool2d_nhwc_cpu);
}
