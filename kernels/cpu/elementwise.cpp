// Fused per-channel elementwise ops of deploy models (one memory pass instead of several ATen ops).
//
// maxout(x, pos, neg): y = pos[c] * relu(x) - neg[c] * relu(-x) with c the channel (dim 1), for contiguous
// (NCHW / (N, C)) and channels_last inputs: the reference's formula in quantkit/ops/elementwise.py, term by term, so
// the result is bit-identical to it (up to the sign of a zero) for every input, NaN and Inf slopes included.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace quantkit {
namespace cpu {
namespace {

// Two exact forms of the reference's pos * relu(x) - neg * relu(-x), both branch-free so they vectorise (signs of
// activations are random):
//  * finite slopes: x * (x > 0 ? p : q) -- for x > 0 the reference is p * x - 0, for x < 0 it is 0 - q * (-x), and
//    NaN / +-Inf / zero inputs give the same NaN, infinities and zeros (inf * 0 = NaN in both);
//  * a NaN or infinite slope: the reference's operations themselves (relu(NaN) = NaN: std::max(v, 0) returns v unless
//    v < 0), since p * 0 is NaN there and poisons every output of the channel. One of the two products is always 0
//    (or NaN), so contracting the subtraction into an FMA cannot change the rounding.
// The form is chosen per channel plane (or once per call for channels_last), outside the element loops.
inline float maxout_finite(float v, float p, float q) { return v * (v > 0.f ? p : q); }
inline float maxout_general(float v, float p, float q) { return p * std::max(v, 0.f) - q * std::max(-v, 0.f); }

template <bool kFinite>
inline void maxout_row(const float* __restrict x, float* __restrict y, const float* __restrict pos,
                       const float* __restrict neg, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = kFinite ? maxout_finite(x[i], pos[i], neg[i]) : maxout_general(x[i], pos[i], neg[i]);
}

template <bool kFinite>
inline void maxout_plane(const float* __restrict x, float* __restrict y, float p, float q, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = kFinite ? maxout_finite(x[i], p, q) : maxout_general(x[i], p, q);
}

}  // namespace

at::Tensor maxout_cpu(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& neg) {
  TORCH_CHECK(x.dim() >= 2, "quantkit::maxout: x must be (N, C, ...), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantkit::maxout: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && pos.device().is_cpu() && neg.device().is_cpu(),
              "quantkit::maxout: x, pos and neg must all be CPU tensors, got ", x.device(), ", ", pos.device(), ", ",
              neg.device());
  TORCH_CHECK(pos.is_floating_point() && neg.is_floating_point(), "quantkit::maxout: pos and neg must be float tensors");
  const int64_t C = x.size(1);
  TORCH_CHECK(pos.numel() == C && neg.numel() == C, "quantkit::maxout: pos/neg need ", C,
              " values (one per channel), got shapes ", pos.sizes(), " and ", neg.sizes());
  at::Tensor p = pos.to(at::kFloat).contiguous(), n = neg.to(at::kFloat).contiguous();
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor xc = channels_last ? x : x.contiguous();
  at::Tensor y = at::empty_like(xc, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const float* xs = xc.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const float* ps = p.data_ptr<float>();
  const float* ns = n.data_ptr<float>();
  const int64_t total = xc.numel();
  if (total == 0) return y;
  auto finite = [](float a, float b) { return std::isfinite(a) && std::isfinite(b); };
  if (channels_last) {
    // memory order (N, H, W, C): the channel is the innermost index
    bool all_finite = true;
    for (int64_t c = 0; c < C; ++c) all_finite = all_finite && finite(ps[c], ns[c]);
    at::parallel_for(0, total / C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (all_finite)
          maxout_row<true>(xs + r * C, ys + r * C, ps, ns, C);
        else
          maxout_row<false>(xs + r * C, ys + r * C, ps, ns, C);
      }
    });
  } else {
    // memory order (N, C, inner): one (n, c) plane at a time
    const int64_t inner = total / (x.size(0) * C);
    at::parallel_for(0, x.size(0) * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const float pc = ps[plane % C], qc = ns[plane % C];
        if (finite(pc, qc))
          maxout_plane<true>(xs + plane * inner, ys + plane * inner, pc, qc, inner);
        else
          maxout_plane<false>(xs + plane * inner, ys + plane * inner, pc, qc, inner);
      }
    });
  }
  return y;
}

// quantize_groups: codes[g] = clamp(round((x / scale[g]) * c), lo, hi) for every group g (AdderNet PTQ re-quantizes
// the activation once per group), c = (2^b - 1) / 2 (signed) or 2^b - 1 (unsigned), round half to even (nearbyint)
// or half away from zero; NaN has no integer code and becomes code 0 (deploy layers propagate NaN to their output
// separately). Same float operations, in the same order, as quantkit.quantizers.adder.quantize_act_codes,
// so the codes are identical. A 4-D input gives each group's codes in channels_last memory (what the adder kernels
// read); other ranks are contiguous.
at::Tensor quantize_groups_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits, bool is_signed,
                               bool half_even) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantkit::quantize_groups: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(bits >= 2 && bits <= 8, "quantkit::quantize_groups: bits must be in 2..8, got ", bits);
  TORCH_CHECK(scale.dim() == 1 && scale.numel() >= 1, "quantkit::quantize_groups: scale must be (G,), got ",
              scale.sizes());
  TORCH_CHECK(x.device().is_cpu() && scale.device().is_cpu(), "quantkit::quantize_groups: x and scale must be CPU ",
              "tensors, got ", x.device(), " and ", scale.device());
  TORCH_CHECK(scale.is_floating_point(), "quantkit::quantize_groups: scale must be a float tensor, got ",
              scale.scalar_type());
  const int64_t G = scale.numel();
  const float levels = static_cast<float>((1 << bits) - 1);
  const float c = is_signed ? levels / 2.0f : levels;
  const float lo = is_signed ? -static_cast<float>(1 << (bits - 1)) : 0.f;
  const float hi = is_signed ? static_cast<float>((1 << (bits - 1)) - 1) : levels;
  at::Tensor s = scale.to(at::kFloat).contiguous();
  const bool nhwc = x.dim() == 4;
  // values in the memory order of the output: (N, H, W, C) for 4-D, row-major otherwise
  at::Tensor xv = nhwc ? x.permute({0, 2, 3, 1}).contiguous() : x.contiguous();
  std::vector<int64_t> out_shape{G};
  for (int64_t d : xv.sizes()) out_shape.push_back(d);
  at::Tensor out = at::empty(out_shape, x.options().dtype(is_signed ? at::kChar : at::kByte));
  const int64_t n = xv.numel();
  const float* xs = xv.data_ptr<float>();
  const float* ss = s.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(std::isfinite(ss[g]) && ss[g] > 0.f, "quantkit::quantize_groups: scale[", g, "] = ", ss[g],
                "; every group scale must be finite and > 0");
  // Clamp first, then round: the bounds are integers, so round(clamp(v)) == clamp(round(v)), and |v| <= 255 lets
  // both roundings avoid libm calls: half-to-even by the 1.5 * 2^23 trick (exact for |v| < 2^22, IEEE default
  // rounding, no -ffast-math), half-away by truncation of |v| + 0.5.
  auto run = [&](auto* dst) {
    using T = std::remove_pointer_t<decltype(dst)>;
    for (int64_t g = 0; g < G; ++g) {
      const float sg = ss[g];
      T* out_g = dst + g * n;
      at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          float v = (xs[i] / sg) * c;
          v = std::min(std::max(v, lo), hi);
          float r;
          if (half_even) {
            r = (v + 12582912.0f) - 12582912.0f;
          } else {
            const float a = static_cast<float>(static_cast<int32_t>(std::fabs(v) + 0.5f));
            r = v < 0.f ? -a : a;
          }
          out_g[i] = static_cast<T>(r == r ? r : 0.f);  // NaN has no code: 0, as in the reference (no UB cast)
        }
      });
    }
  };
  if (is_signed) run(out.data_ptr<int8_t>()); else run(out.data_ptr<uint8_t>());

  return nhwc ? out.permute({0, 1, 4, 2, 3}) : out;
}

}  // namespace cpu
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("maxout", &quantkit::cpu::maxout_cpu);
  m.impl("quantize_groups", &quantkit::cpu::quantize_groups_cpu);
}
