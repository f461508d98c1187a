// Fused per-channel elementwise ops of deploy models (one memory pass instead of several ATen ops).
//
// maxout(x, pos, neg): y = x * (x > 0 ? pos[c] : neg[c]) with c the channel (dim 1), for contiguous (NCHW / (N, C))
// and channels_last inputs. Bit-identical to the reference in quantkit/ops/elementwise.py.
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

// Branch-free (both factors loaded, then a select) so the compiler emits vector blends: signs of activations are
// random, and a branch per element mispredicts half the time.
inline void maxout_row(const float* __restrict x, float* __restrict y, const float* __restrict pos,
                       const float* __restrict neg, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float p = pos[i], q = neg[i], v = x[i];
    y[i] = v * (v > 0.f ? p : q);
  }
}

inline void maxout_plane(const float* __restrict x, float* __restrict y, float p, float q, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    y[i] = v * (v > 0.f ? p : q);
  }
}

}  // namespace

at::Tensor maxout_cpu(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& neg) {
  TORCH_CHECK(x.dim() >= 2, "quantkit::maxout: x must be (N, C, ...), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantkit::maxout: x must be float32, got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(pos.numel() == C && neg.numel() == C, "quantkit::maxout: pos/neg need ", C, " values (one per channel)");
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
  if (channels_last) {
    // memory order (N, H, W, C): the channel is the innermost index
    at::parallel_for(0, total / C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) maxout_row(xs + r * C, ys + r * C, ps, ns, C);
    });
  } else {
    // memory order (N, C, inner): one (n, c) plane at a time
    const int64_t inner = total / (x.size(0) * C);
    at::parallel_for(0, x.size(0) * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane)
        maxout_plane(xs + plane * inner, ys + plane * inner, ps[plane % C], ns[plane % C], inner);
    });
  }
  return y;
}

// quantize_groups: codes[g] = clamp(round((x / scale[g]) * c), lo, hi) for every group g (AdderNet PTQ re-quantizes
// the activation once per group), c = (2^b - 1) / 2 (signed) or 2^b - 1 (unsigned), round half to even (nearbyint)
// or half away from zero. Same float operations, in the same order, as quantkit.quantizers.adder.quantize_act_codes,
// so the codes are identical. A 4-D input gives each group's codes in channels_last memory (what the adder kernels
// read); other ranks are contiguous.
at::Tensor quantize_groups_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits, bool is_signed,
                               bool half_even) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantkit::quantize_groups: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(bits >= 2 && bits <= 8, "quantkit::quantize_groups: bits must be in 2..8, got ", bits);
  TORCH_CHECK(scale.dim() == 1 && scale.numel() >= 1, "quantkit::quantize_groups: scale must be (G,), got ",
              scale.sizes());
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
          out_g[i] = static_cast<T>(r);
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
