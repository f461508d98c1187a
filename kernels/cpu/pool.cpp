// maxpool2d_relu(x, kernel_size, stride, padding, relu): max pooling (floor output size, dilation 1, padded taps
// ignored) of a float32 channels_last activation, then ReLU when `relu` -- relu(maxpool(x)) == maxpool(relu(x))
// exactly (ReLU is monotone), so it replaces a binary net's stem ReLU -> MaxPool pair with one pass over the large
// pre-pool tensor instead of two, and no int64 index tensor (aten's CPU max pool writes one even in inference).
// Same values as aten: a NaN tap makes the window NaN (the `val > max || isnan(val)` rule), ReLU keeps NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <limits>

#include "cpu/cpu_features.h"

namespace quantkit {
namespace cpu {
namespace {

struct PoolGeo {
  int64_t C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw;
};

// One output pixel: out[c] over C channels from the valid taps of its window (NHWC rows of C floats).
void pool_pixel_portable(const float* x, float* out, const PoolGeo& g, int64_t n, int64_t oh, int64_t ow,
                         bool relu) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < g.C; ++c) out[c] = ninf;
  for (int64_t r = 0; r < g.kh; ++r) {
    const int64_t ih = oh * g.sh - g.ph + r;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t s = 0; s < g.kw; ++s) {
      const int64_t iw = ow * g.sw - g.pw + s;
      if (iw < 0 || iw >= g.W) continue;
      const float* row = x + ((n * g.H + ih) * g.W + iw) * g.C;
      for (int64_t c = 0; c < g.C; ++c) {
        const float v = row[c];
        if (v > out[c] || std::isnan(v)) out[c] = v;
      }
    }
  }
  if (relu)
    for (int64_t c = 0; c < g.C; ++c) out[c] = (out[c] > 0.f || std::isnan(out[c])) ? out[c] : 0.f;
}

#if QUANTKIT_X86
QK_TARGET_AVX512 void pool_pixel_avx512(const float* x, float* out, const PoolGeo& g, int64_t n, int64_t oh,
                                        int64_t ow, bool relu) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), zero = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < g.C; c0 += 16) {
    const int64_t left = g.C - c0;
    const __mmask16 lm = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    __m512 m = ninf;
    for (int64_t r = 0; r < g.kh; ++r) {
      const int64_t ih = oh * g.sh - g.ph + r;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t s = 0; s < g.kw; ++s) {
        const int64_t iw = ow * g.sw - g.pw + s;
        if (iw < 0 || iw >= g.W) continue;
        const __m512 v = _mm512_maskz_loadu_ps(lm, x + ((n * g.H + ih) * g.W + iw) * g.C + c0);
        const __mmask16 take = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_mask_blend_ps(take, m, v);
      }
    }
    if (relu) m = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, zero, _CMP_GT_OQ) | _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q), m);
    _mm512_mask_storeu_ps(out + c0, lm, m);
  }
}
#endif

}  // namespace

at::Tensor maxpool2d_relu_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, bool relu) {
  static const char* op = "quantkit::maxpool2d_relu";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be (N, C, H, W), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, op, ": x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding take two values each");
  PoolGeo g{x_in.size(1), x_in.size(2), x_in.size(3), 0, 0, kernel_size[0], kernel_size[1], stride[0], stride[1],
            padding[0], padding[1]};
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1, op, ": kernel_size and stride must be >= 1");
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0 && 2 * g.ph <= g.kh && 2 * g.pw <= g.kw, op,
              ": padding must be >= 0 and at most half the kernel (as in torch)");
  TORCH_CHECK(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op, ": the padded input ", g.H, "x", g.W,
              " is smaller than the kernel");
  g.Ho = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0);
  at::Tensor out = at::empty({N, g.C, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const float* xs = x.data_ptr<float>();
  float* os = out.data_ptr<float>();
  auto fn = pool_pixel_portable;
#if QUANTKIT_X86
  if (active_isa() == Isa::Avx512) fn = pool_pixel_avx512;
#endif
  const int64_t pixels = N * g.Ho * g.Wo;
  at::parallel_for(0, pixels, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.C)), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t n = p / (g.Ho * g.Wo), rem = p - n * g.Ho * g.Wo, oh = rem / g.Wo, ow = rem - oh * g.Wo;
      fn(xs, os + p * g.C, g, n, oh, ow, relu);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) { m.impl("maxpool2d_relu", &quantkit::cpu::maxpool2d_relu_cpu); }
