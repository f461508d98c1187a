// CUDA binary ops: binary_linear, binary_conv2d, binary_bmm, binary_bmm_01 (schemas and epilogue:
// kernels/register.cpp; references: quantkit/ops/binary.py). Every op is one AND-popcount implicit GEMM
// (kernels/cuda/bgemm.cu) plus two popcount pre-passes:
//   pix[pixel]   = popcount of the activation words of each input pixel (or row)  -> U = sum s_a over valid taps
//   tab[n, tap]  = popcount of the weight words of each (channel, tap)           -> V = sum s_w over valid taps
// and the identity sum s_a s_w = 4 popc(u & v) - 2 popc(u) - 2 popc(v) + n over the valid taps (u, v the bits,
// padded taps contribute 0 bits and are excluded from n and from the V sum): AND only, never XOR.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "conv_shape.h"
#include "cuda/bgemm_common.cuh"
#include "cuda/bgemm_host.h"

namespace quantkit {
namespace cuda {
namespace {

inline int64_t num_words(int64_t k) { return (k + 31) / 32; }

void check_words(const char* op, const char* arg, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda() && t.device() == dev, op, ": ", arg, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", arg, " must hold packed int32 words, got ", t.scalar_type());
}

// Per-channel float32 (n,) vector on the device, or nullptr.
const float* channel_vec(const char* op, const char* arg, const c10::optional<at::Tensor>& t, int64_t n,
                         const at::Device& dev, std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == dev, op, ": ", arg, " must be on ", dev, ", got ", t->device());
  TORCH_CHECK(t->numel() == n, op, ": ", arg, " must have ", n, " elements (one per output channel), got ",
              t->numel());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", arg, " must be a float tensor");
  at::Tensor v = t->reshape({n}).to(at::kFloat).contiguous();
  keep.push_back(v);
  return v.data_ptr<float>();
}

void check_int32_range(const char* op, int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int32_t>::max(), op, ": ", what, " (", v,
              ") exceeds the int32 range of the CUDA kernels");
}

// Bits of the last word past k carry no element and are ignored, as on the CPU and in the references; the
// kernels assume zero tails, so an operand with k % 32 != 0 gets a contiguous copy with its tails cleared (packed
// words are 1/32 of the float activations; operands with whole words are used as they are).
at::Tensor clear_tail_bits(const at::Tensor& t, int64_t k) {
  const at::Tensor c = t.contiguous();
  if (k % 32 == 0 || c.numel() == 0) return c;
  at::Tensor m = c.clone(at::MemoryFormat::Contiguous);
  m.select(-1, m.size(-1) - 1).bitwise_and_(static_cast<int64_t>((1u << (k % 32)) - 1u));
  return m;
}

const uint32_t* words_ptr(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>()) : nullptr;
}

BgemmParams base_params() {
  BgemmParams p{};
  p.abi_version = kBgemmAbiVersion;
  p.op = kOpAndPopc;
  p.batch = 1;
  p.H = p.W = p.Ho = p.Wo = p.kh = p.kw = p.sy = p.sx = p.dy = p.dx = 1;
  p.py = p.px = 0;
  return p;
}

// ------------------------------------------------------------------------------------------------ linear
at::Tensor binary_linear_cuda(const at::Tensor& x_in, const at::Tensor& w_in, int64_t k,
                              const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& act_sum_scale,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& threshold) {
  const char* op = "binary_linear";
  const at::Device dev = x_in.device();
  check_words(op, "x", x_in, dev);
  check_words(op, "w", w_in, dev);
  TORCH_CHECK(x_in.dim() >= 1 && w_in.dim() == 2, op, ": expected x (..., W) and w (N, W)");
  TORCH_CHECK(k >= 0 && x_in.size(-1) == num_words(k) && w_in.size(1) == num_words(k), op, ": x and w need ",
              num_words(k), " words for k=", k, ", got ", x_in.size(-1), " and ", w_in.size(1));
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor x = clear_tail_bits(x_in, k);
  const at::Tensor w = clear_tail_bits(w_in, k);
  const int64_t wc = num_words(k);
  const int64_t n = w.size(0);
  int64_t mrows = 1;  // product of the leading dims (works for wc == 0 too)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) mrows *= x.size(d);
  check_int32_range(op, mrows, "rows");
  check_int32_range(op, n, "out_features");
  check_int32_range(op, wc, "words");
  std::vector<at::Tensor> keep;
  BgemmParams p = base_params();
  p.scale = channel_vec(op, "scale", scale, n, dev, keep);
  p.act_sum_scale = channel_vec(op, "act_sum_scale", act_sum_scale, n, dev, keep);
  p.bias = channel_vec(op, "bias", bias, n, dev, keep);
  p.threshold = channel_vec(op, "threshold", threshold, n, dev, keep);
  auto out_sizes = x.sizes().vec();
  at::Tensor out;
  if (p.threshold) {
    out_sizes.back() = num_words(n);
    out = at::empty(out_sizes, x.options().dtype(at::kInt));
    p.epi = kEpiThreshold;
    p.ldo = num_words(n);
  } else {
    out_sizes.back() = n;
    out = at::empty(out_sizes, x.options().dtype(at::kFloat));
    p.epi = kEpiAffine;
    p.ldo = n;
  }
  if (mrows == 0 || n == 0) return out;
  const at::Tensor pix = row_popcount(x, mrows, wc);
  const at::Tensor tab = row_popcount(w, n, wc);
  p.A = words_ptr(x);
  p.B = words_ptr(w);
  p.M = (int)mrows;
  p.N = (int)n;
  p.Wc = (int)wc;
  p.KW = (int)wc;
  p.kbits = (int)k;
  p.pix = pix.data_ptr<int32_t>();
  p.tab = tab.data_ptr<int32_t>();
  p.out = out.data_ptr();
  launch_bgemm(p);
  return out;
}

// ------------------------------------------------------------------------------------------------ conv2d
at::Tensor binary_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& w_in, int64_t c_in, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation,
                              const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& act_sum_scale,
                              const c10::optional<at::Tensor>& weight_sum_scale,
                              const c10::optional<at::Tensor>& count_scale, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& threshold) {
  const char* op = "binary_conv2d";
  const at::Device dev = x_in.device();
  check_words(op, "x", x_in, dev);
  check_words(op, "w", w_in, dev);
  TORCH_CHECK(x_in.dim() == 4 && w_in.dim() == 4, op, ": expected x (N, H, W, words) and w (C_out, kh, kw, words)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 values");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": need stride >= 1, dilation >= 1, padding >= 0");
  const int64_t wc = num_words(c_in);
  TORCH_CHECK(c_in >= 0 && x_in.size(3) == wc && w_in.size(3) == wc, op, ": x and w need ", wc,
              " words for c_in=", c_in, ", got ", x_in.size(3), " and ", w_in.size(3));
  const int64_t nb = x_in.size(0), h = x_in.size(1), wd = x_in.size(2);
  const int64_t cout = w_in.size(0), kh = w_in.size(1), kw = w_in.size(2);
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= 32 && kw <= 32, op, ": the CUDA kernel supports kernels up to 32x32, got ",
              kh, "x", kw);
  const quantkit::ConvOut osz = quantkit::conv2d_out_hw(op, h, wd, kh, kw, stride, padding, dilation);
  const int64_t ho = osz.h, wo = osz.w;
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor x = clear_tail_bits(x_in, c_in);
  const at::Tensor w = clear_tail_bits(w_in, c_in);
  check_int32_range(op, nb * h * wd, "input pixels");
  check_int32_range(op, quantkit::checked_numel(op, "output pixels", {nb, ho, wo}), "output pixels");
  check_int32_range(op, cout, "C_out");
  check_int32_range(op, kh * kw * wc, "reduction words");
  check_int32_range(op, kh * kw * std::max<int64_t>(c_in, 1), "reduction length");
  std::vector<at::Tensor> keep;
  BgemmParams p = base_params();
  p.scale = channel_vec(op, "scale", scale, cout, dev, keep);
  p.act_sum_scale = channel_vec(op, "act_sum_scale", act_sum_scale, cout, dev, keep);
  p.weight_sum_scale = channel_vec(op, "weight_sum_scale", weight_sum_scale, cout, dev, keep);
  p.count_scale = channel_vec(op, "count_scale", count_scale, cout, dev, keep);
  p.bias = channel_vec(op, "bias", bias, cout, dev, keep);
  p.threshold = channel_vec(op, "threshold", threshold, cout, dev, keep);
  at::Tensor out;
  if (p.threshold) {
    out = at::empty({nb, ho, wo, num_words(cout)}, x.options().dtype(at::kInt));
    p.epi = kEpiThreshold;
    p.ldo = num_words(cout);
  } else {
    out = at::empty({nb, cout, ho, wo}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
    p.epi = kEpiAffine;
    p.ldo = cout;
  }
  if (nb == 0 || cout == 0) return out;
  const at::Tensor pix = row_popcount(x, nb * h * wd, wc);
  const at::Tensor tab = row_popcount(w, cout * kh * kw, wc);
  p.A = words_ptr(x);
  p.B = words_ptr(w);
  p.M = (int)(nb * ho * wo);
  p.N = (int)cout;
  p.Wc = (int)wc;
  p.KW = (int)(kh * kw * wc);
  p.H = (int)h;
  p.W = (int)wd;
  p.Ho = (int)ho;
  p.Wo = (int)wo;
  p.kh = (int)kh;
  p.kw = (int)kw;
  p.sy = (int)stride[0];
  p.sx = (int)stride[1];
  p.py = (int)padding[0];
  p.px = (int)padding[1];
  p.dy = (int)dilation[0];
  p.dx = (int)dilation[1];
  p.kbits = (int)c_in;
  p.pix = pix.data_ptr<int32_t>();
  p.tab = tab.data_ptr<int32_t>();
  p.out = out.data_ptr();
  launch_bgemm(p);
  return out;
}

// ------------------------------------------------------------------------------------------------ bmm
at::Tensor bmm_common(const char* op, const at::Tensor& a_in, const at::Tensor& b_in, int64_t k, int epi) {
  const at::Device dev = a_in.device();
  check_words(op, "a", a_in, dev);
  check_words(op, "b", b_in, dev);
  TORCH_CHECK(a_in.dim() == 3 && b_in.dim() == 3 && a_in.size(0) == b_in.size(0), op,
              ": expected a (B, M, W) and b (B, N, W) with the same B");
  const int64_t wc = num_words(k);
  TORCH_CHECK(k >= 0 && a_in.size(2) == wc && b_in.size(2) == wc, op, ": a and b need ", wc, " words for k=", k);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor a = clear_tail_bits(a_in, k);
  const at::Tensor b = clear_tail_bits(b_in, k);
  const int64_t batch = a.size(0), m = a.size(1), n = b.size(1);
  check_int32_range(op, batch, "batch");
  check_int32_range(op, m, "M");
  check_int32_range(op, n, "N");
  check_int32_range(op, wc, "words");
  at::Tensor out = at::empty({batch, m, n}, a.options().dtype(at::kInt));
  if (batch == 0 || m == 0 || n == 0) return out;
  const at::Tensor pix = row_popcount(a, batch * m, wc);
  const at::Tensor tab = row_popcount(b, batch * n, wc);
  BgemmParams p = base_params();
  p.epi = epi;
  p.A = words_ptr(a);
  p.B = words_ptr(b);
  p.a_bstride = m * wc;
  p.b_bstride = n * wc;
  p.batch = (int)batch;
  p.M = (int)m;
  p.N = (int)n;
  p.Wc = (int)wc;
  p.KW = (int)wc;
  p.kbits = (int)k;
  p.pix = pix.data_ptr<int32_t>();
  p.pix_bstride = m;
  p.tab = epi == kEpiDot ? tab.data_ptr<int32_t>() : nullptr;
  p.tab_bstride = n;
  p.out = out.data_ptr<int32_t>();
  p.out_bstride = m * n;
  p.ldo = n;
  launch_bgemm(p);
  return out;
}

at::Tensor binary_bmm_cuda(const at::Tensor& a, const at::Tensor& b, int64_t k) {
  return bmm_common("binary_bmm", a, b, k, kEpiDot);
}

at::Tensor binary_bmm_01_cuda(const at::Tensor& a, const at::Tensor& b, int64_t k) {
  return bmm_common("binary_bmm_01", a, b, k, kEpiDot01);
}

}  // namespace
}  // namespace cuda
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CUDA, m) {
  m.impl("binary_linear", &quantkit::cuda::binary_linear_cuda);
  m.impl("binary_conv2d", &quantkit::cuda::binary_conv2d_cuda);
  m.impl("binary_bmm", &quantkit::cuda::binary_bmm_cuda);
  m.impl("binary_bmm_01", &quantkit::cuda::binary_bmm_01_cuda);
}
