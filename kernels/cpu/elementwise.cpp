// Fused per-channel elementwise ops of deploy models (one memory pass instead of several ATen ops).
//
// maxout(x, pos, neg): y = x * (x > 0 ? pos[c] : neg[c]) with c the channel (dim 1), for contiguous (NCHW / (N, C))
// and channels_last inputs. Bit-identical to the reference in quantkit/ops/elementwise.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/ATen.h>

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

}  // namespace cpu
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) { m.impl("maxout", &quantkit::cpu::maxout_cpu); }
