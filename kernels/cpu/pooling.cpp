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
};

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
  const float* img = g.x + n * g.H * W * C;
  float* yrow = g.y + (n * g.Ho + oh) * Wo * C;
  for (int64_t i = 0; i < Wo * C; ++i) yrow[i] = -std::numeric_limits<float>::infinity();
  for (int64_t ih = h_lo; ih < h_hi; ++ih) {
    const float* row = img + ih * W * C;
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
  const float* img = g.x + n * g.H * g.W * g.C;
  float* yrow = g.y + (n * g.Ho + oh) * g.Wo * g.C;
  const __mmask16 full = 0xFFFF;
  const int64_t rem = g.C % 16;
  const __mmask16 tail = rem ? __mmask16((1u << rem) - 1u) : full;
  const int64_t c_full = g.C - rem;  // channels in whole vectors
  for (int64_t ih = h_lo; ih < h_hi; ++ih) {
    const float* row = img + ih * g.W * g.C;
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
  const float* img = g.x + n * g.H * g.W * g.C;
  float* yrow = g.y + (n * g.Ho + oh) * g.Wo * g.C;
  const int64_t c_full = g.C - g.C % 8;
  for (int64_t ih = h_lo; ih < h_hi; ++ih) {
    const float* row = img + ih * g.W * g.C;
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

}  // namespace

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
}
