// CUDA integer l1 ("adder") ops: adder_l1, adder_linear, adder_l1_conv2d, adder_conv2d (schemas:
// kernels/register.cpp; semantics and references: quantkit/ops/adder.py).
//
//   S[m, o] = sum_k |x[g(o), m, k] - w'[o, k]|,  w' = w_mult * wq;   Y = -delta[o] * S + bias[o]
//
// All paths first move both operands onto one non-negative grid [0, R]: with lo/hi the activation range (0
// included when the conv pads), x' = x - lo, w_c = clamp(w', lo, hi) - lo, and for every real tap
// |x - w'| = |x' - w_c| + dist(w', [lo, hi]) exactly (x lies inside [lo, hi]). Padded taps have x = 0 and cost
// |w'|. The GEMM reads zero words at padded taps, so the per-(channel, tap) table tab and the constant tot of the
// epilogue (S = U + pcoef * P + sum_{valid taps} tab + tot) repair both terms exactly:
//   * R <= 64 (<= 6-bit grids), sm_80+: thermometer codes of code_bits = 2^ceil(log2 R) bits per value,
//     min(a, b) = popcount(T(a) & T(b)) on the b1 AND tensor cores; |a - b| = a + b - 2 min(a, b):
//     U = sum x' (popcount of the codes), P = sum min, pcoef = -2, tab = sum_c (w_c + dist - |w'|), tot = sum |w'|;
//   * R <= 255: bytes, four per word, vabsdiff4 on CUDA cores (one SASS VABSDIFF4 per 4 |a-b| + accumulate):
//     U = 0, P = sum |x' - w_c| (padded taps give w_c), pcoef = +1, tab = sum_c (w_c + dist - |w'|),
//     tot = sum (|w'| - w_c);
//   * wider: the same with one int32 per word.
// QUANTKIT_CUDA_ADDER=auto|thermo|vabs|abs32 forces a path (tests exercise all three).
// Groups: output channels are sorted by group once per call; each group is one GEMM launch whose epilogue writes
// its channels back to their original columns.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "conv_shape.h"
#include "cuda/bgemm_common.cuh"
#include "cuda/bgemm_host.h"

namespace quantkit {
namespace cuda {
namespace {

constexpr int64_t kValueLimit = int64_t(1) << 30;

bool is_int_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

std::string adder_mode() {
  const char* v = std::getenv("QUANTKIT_CUDA_ADDER");
  return (v && *v) ? std::string(v) : std::string("auto");
}

int device_major_minor() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major * 10 + minor;
}

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Unsigned values (.., C) in [0, 255] -> int32 words (.., ceil(C/4)) of 4 little-endian bytes, zero padded.
at::Tensor bytes_to_words(const at::Tensor& v) {
  const int64_t c = v.size(-1);
  const int64_t c4 = (c + 3) / 4 * 4;
  auto sizes = v.sizes().vec();
  sizes.back() = c4;
  at::Tensor b = at::zeros(sizes, v.options().dtype(at::kByte));
  if (c > 0) b.narrow(-1, 0, c).copy_(v);
  return b.view(at::kInt);  // last dim c4 bytes -> c4/4 int32 (contiguous, divisible by 4)
}

struct Geometry {
  int64_t groups, nb, c, h, w, cout, kh, kw, ho, wo;
  int64_t sy, sx, py, px, dy, dx;
};

// xq (G, Nb, C, H, W), wq (Cout, C, kh, kw) -> int32 or float32 (Nb*Ho*Wo, Cout) written into `out` (row-major
// over output pixels, i.e. NHWC / channels_last memory).
void adder_run(const char* op, const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
               int64_t w_mult, const Geometry& g, const at::Tensor* delta, const at::Tensor* bias, at::Tensor& out) {
  const bool float_out = delta != nullptr;
  const int64_t taps = g.kh * g.kw;
  const int64_t m_rows = g.nb * g.ho * g.wo;
  if (m_rows == 0 || g.cout == 0) return;
  // Per-channel epilogue vectors, indexed by the output column.
  at::Tensor delta_f, bias_f;
  if (float_out) {
    delta_f = delta->to(at::kFloat).contiguous();
    if (bias != nullptr) bias_f = bias->to(at::kFloat).contiguous();
  }
  if (g.c == 0) {  // empty reduction: S = 0
    if (float_out) {
      out.copy_(bias_f.defined() ? bias_f.view({1, g.cout}).expand({m_rows, g.cout})
                                 : at::zeros({m_rows, g.cout}, out.options()));
    } else {
      out.zero_();
    }
    return;
  }

  // ---- value ranges (one device sync) -------------------------------------------------------------------
  const auto xmm = at::aminmax(xq);
  const auto wmm = at::aminmax(wq);
  int64_t lo = std::get<0>(xmm).item<int64_t>(), hi = std::get<1>(xmm).item<int64_t>();
  const int64_t wlo = std::get<0>(wmm).item<int64_t>() * w_mult, whi = std::get<1>(wmm).item<int64_t>() * w_mult;
  TORCH_CHECK(lo >= -kValueLimit && hi <= kValueLimit && wlo >= -kValueLimit && whi <= kValueLimit, op,
              ": integer operands must lie within +-2^30 (got activations [", lo, ", ", hi, "], weights*w_mult [",
              wlo, ", ", whi, "])");
  if (g.py > 0 || g.px > 0) {  // padded taps read x = 0, which must lie on the grid too
    lo = std::min<int64_t>(lo, 0);
    hi = std::max<int64_t>(hi, 0);
  }
  const int64_t range = hi - lo;
  const int64_t wabs = std::max<int64_t>(std::abs(wlo), std::abs(whi));
  const int64_t xabs = std::max<int64_t>(std::abs(lo), std::abs(hi));
  TORCH_CHECK(taps * g.c * (xabs + wabs) <= std::numeric_limits<int32_t>::max(), op,
              ": an l1 sum could exceed int32 (reduction ", taps * g.c, " x magnitude ", xabs + wabs,
              "); the operands are far outside 2-8 bits");

  // ---- path ---------------------------------------------------------------------------------------------
  const std::string mode = adder_mode();
  enum { kThermo, kVabs, kAbs32 } path;
  if (mode == "thermo") {
    TORCH_CHECK(range <= 64, op, ": QUANTKIT_CUDA_ADDER=thermo needs a value range <= 64, got ", range);
    path = kThermo;
  } else if (mode == "vabs") {
    TORCH_CHECK(range <= 255, op, ": QUANTKIT_CUDA_ADDER=vabs needs a value range <= 255, got ", range);
    path = kVabs;
  } else if (mode == "abs32") {
    path = kAbs32;
  } else {
    TORCH_CHECK(mode == "auto", "QUANTKIT_CUDA_ADDER must be auto, thermo, vabs or abs32; got '", mode, "'");
    if (range <= 64 && device_major_minor() >= 80) {
      path = kThermo;
    } else if (range <= 255) {
      path = kVabs;
    } else {
      path = kAbs32;
    }
  }

  // ---- operands on the shifted grid ---------------------------------------------------------------------
  // activations (G, Nb, H, W, C) int32 in [0, range]
  const at::Tensor xs = (xq.to(at::kInt) - static_cast<int>(lo)).permute({0, 1, 3, 4, 2}).contiguous();
  // weights (Cout, kh, kw, C) int64
  const at::Tensor w64 = (wq.to(at::kLong) * w_mult).permute({0, 2, 3, 1}).contiguous();
  const at::Tensor wcl = at::clamp(w64, lo, hi);
  const at::Tensor wsh = wcl - lo;  // w_c in [0, range]
  const at::Tensor dist = (w64 - wcl).abs();
  const at::Tensor aw = w64.abs();
  at::Tensor tab64, tot64, a_words, b_words, pix;
  int64_t wc = 0;
  int pcoef = 0;
  if (path == kThermo) {
    const int64_t code_bits = next_pow2(std::max<int64_t>(range, 1));
    a_words = thermometer_pack(xs, code_bits);
    b_words = thermometer_pack(wsh.to(at::kInt).contiguous(), code_bits);
    wc = a_words.size(-1);
    pix = row_popcount(a_words, g.groups * g.nb * g.h * g.w, wc);
    tab64 = (wsh + dist - aw).sum(-1);
    tot64 = aw.sum({1, 2, 3});
    pcoef = -2;
  } else {
    if (path == kVabs) {
      a_words = bytes_to_words(xs);
      b_words = bytes_to_words(wsh);
    } else {
      a_words = xs;
      b_words = wsh.to(at::kInt).contiguous();
    }
    wc = a_words.size(-1);
    tab64 = (wsh + dist - aw).sum(-1);
    tot64 = (aw - wsh).sum({1, 2, 3});
    pcoef = 1;
  }
  TORCH_CHECK(b_words.size(-1) == wc, op, ": internal word-count mismatch");
  const at::Tensor tab = tab64.reshape({g.cout, taps}).to(at::kInt).contiguous();
  const at::Tensor tot = tot64.to(at::kInt).contiguous();

  // ---- groups: sort output channels by group (stable), one launch per non-empty group ---------------------
  const at::Tensor gi = group_index.to(at::kLong);
  at::Tensor perm, b_sorted, tab_sorted, tot_sorted, col_map;
  std::vector<int64_t> counts;
  if (g.groups == 1) {
    b_sorted = b_words.reshape({g.cout, taps * wc}).contiguous();
    tab_sorted = tab;
    tot_sorted = tot;
    counts.push_back(g.cout);
  } else {
    perm = std::get<1>(at::sort(gi, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    b_sorted = b_words.reshape({g.cout, taps * wc}).index_select(0, perm).contiguous();
    tab_sorted = tab.index_select(0, perm).contiguous();
    tot_sorted = tot.index_select(0, perm).contiguous();
    col_map = perm.to(at::kInt).contiguous();
    const at::Tensor cnt = at::bincount(gi, {}, g.groups).cpu();
    for (int64_t i = 0; i < g.groups; ++i) counts.push_back(cnt[i].item<int64_t>());
  }

  const int64_t a_group_words = g.nb * g.h * g.w * wc;
  const int64_t pix_group = g.nb * g.h * g.w;
  int64_t off = 0;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const int64_t n = counts[grp];
    if (n == 0) continue;
    BgemmParams p{};
    p.abi_version = kBgemmAbiVersion;
    p.op = path == kThermo ? kOpAndPopc : (path == kVabs ? kOpVabsdiff4 : kOpAbsdiff32);
    p.epi = float_out ? kEpiAdderAffine : kEpiAdderInt;
    p.A = reinterpret_cast<const uint32_t*>(a_words.data_ptr<int32_t>()) + grp * a_group_words;
    p.B = reinterpret_cast<const uint32_t*>(b_sorted.data_ptr<int32_t>()) + off * taps * wc;
    p.batch = 1;
    p.M = (int)m_rows;
    p.N = (int)n;
    p.Wc = (int)wc;
    p.KW = (int)(taps * wc);
    p.H = (int)g.h;
    p.W = (int)g.w;
    p.Ho = (int)g.ho;
    p.Wo = (int)g.wo;
    p.kh = (int)g.kh;
    p.kw = (int)g.kw;
    p.sy = (int)g.sy;
    p.sx = (int)g.sx;
    p.py = (int)g.py;
    p.px = (int)g.px;
    p.dy = (int)g.dy;
    p.dx = (int)g.dx;
    p.kbits = (int)g.c;
    p.pix = pix.defined() ? pix.data_ptr<int32_t>() + grp * pix_group : nullptr;
    p.tab = tab_sorted.data_ptr<int32_t>() + off * taps;
    p.tot = tot_sorted.data_ptr<int32_t>() + off;
    p.col_map = col_map.defined() ? col_map.data_ptr<int32_t>() + off : nullptr;
    p.pcoef = pcoef;
    p.delta = float_out ? delta_f.data_ptr<float>() : nullptr;
    p.bias = (float_out && bias_f.defined()) ? bias_f.data_ptr<float>() : nullptr;
    p.out = out.data_ptr();
    p.ldo = g.cout;
    launch_bgemm(p);
    off += n;
  }
}

void check_common(const char* op, const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& gi, int64_t w_mult,
                  int64_t groups, int64_t cout) {
  TORCH_CHECK(xq.is_cuda(), op, ": xq must be a CUDA tensor");
  TORCH_CHECK(wq.device() == xq.device() && gi.device() == xq.device(), op,
              ": xq, wq and group_index must be on one device");
  TORCH_CHECK(is_int_dtype(xq.scalar_type()) && is_int_dtype(wq.scalar_type()), op,
              ": xq and wq must be integer tensors");
  TORCH_CHECK(w_mult == 1 || w_mult == 2, op, ": w_mult must be 1 or 2, got ", w_mult);
  TORCH_CHECK(groups >= 1, op, ": xq needs at least one group");
  TORCH_CHECK(gi.dim() == 1 && gi.numel() == cout && is_int_dtype(gi.scalar_type()), op,
              ": group_index must be a 1-D integer tensor with one entry per output channel (", cout, ")");
  if (cout > 0) {
    const auto mm = at::aminmax(gi);
    const int64_t gmin = std::get<0>(mm).item<int64_t>(), gmax = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(gmin >= 0 && gmax < groups, op, ": group_index values must lie in [0, ", groups, "), got [", gmin,
                ", ", gmax, "]");
  }
}

void check_epilogue(const char* op, const at::Tensor& delta, const c10::optional<at::Tensor>& bias, int64_t cout,
                    const at::Device& dev) {
  TORCH_CHECK(delta.device() == dev && at::isFloatingType(delta.scalar_type()) && delta.dim() == 1 &&
                  delta.numel() == cout,
              op, ": delta must be a float (", cout, ",) tensor on ", dev);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == dev && at::isFloatingType(bias->scalar_type()) && bias->dim() == 1 &&
                    bias->numel() == cout,
                op, ": bias must be None or a float (", cout, ",) tensor on ", dev);
  }
}

Geometry linear_geometry(const at::Tensor& xq, const at::Tensor& wq) {
  Geometry g{};
  g.groups = xq.size(0);
  g.nb = xq.size(1);
  g.c = xq.size(2);
  g.h = g.w = g.ho = g.wo = 1;
  g.cout = wq.size(0);
  g.kh = g.kw = 1;
  g.sy = g.sx = g.dy = g.dx = 1;
  g.py = g.px = 0;
  return g;
}

Geometry conv_geometry(const char* op, const at::Tensor& xq, const at::Tensor& wq, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(xq.dim() == 5 && wq.dim() == 4, op, ": expected xq (G, N, C, H, W) and wq (Cout, C, kh, kw)");
  TORCH_CHECK(xq.size(2) == wq.size(1), op, ": input channels differ (", xq.size(2), " vs ", wq.size(1), ")");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 values");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": need stride >= 1, dilation >= 1, padding >= 0");
  Geometry g{};
  g.groups = xq.size(0);
  g.nb = xq.size(1);
  g.c = xq.size(2);
  g.h = xq.size(3);
  g.w = xq.size(4);
  g.cout = wq.size(0);
  g.kh = wq.size(2);
  g.kw = wq.size(3);
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1 && g.kh <= 32 && g.kw <= 32, op,
              ": the CUDA kernel supports kernels up to 32x32");
  g.sy = stride[0];
  g.sx = stride[1];
  g.py = padding[0];
  g.px = padding[1];
  g.dy = dilation[0];
  g.dx = dilation[1];
  const quantkit::ConvOut osz = quantkit::conv2d_out_hw(op, g.h, g.w, g.kh, g.kw, stride, padding, dilation);
  g.ho = osz.h;
  g.wo = osz.w;
  const int64_t lim = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(g.nb * g.h * g.w * std::max<int64_t>(g.c, 1) <= lim / 2 &&
                  quantkit::checked_numel(op, "output pixels", {g.nb, g.ho, g.wo}) <= lim,
              op,
              ": tensor too large for the CUDA kernel's 32-bit pixel indices");
  return g;
}

// ------------------------------------------------------------------------------------------------ ops
at::Tensor adder_l1_cuda(const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                         int64_t w_mult) {
  const char* op = "adder_l1";
  TORCH_CHECK(xq.dim() == 3 && wq.dim() == 2 && xq.size(2) == wq.size(1), op,
              ": expected xq (G, M, K) and wq (N, K) with the same K");
  check_common(op, xq, wq, group_index, w_mult, xq.size(0), wq.size(0));
  const c10::cuda::CUDAGuard guard(xq.device());
  const Geometry g = linear_geometry(xq, wq);
  at::Tensor out = at::empty({g.nb, g.cout}, xq.options().dtype(at::kInt));
  adder_run(op, xq.reshape({g.groups, g.nb, g.c, 1, 1}), wq.reshape({g.cout, g.c, 1, 1}), group_index, w_mult, g,
            nullptr, nullptr, out);
  return out;
}

at::Tensor adder_linear_cuda(const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                             const at::Tensor& delta, const c10::optional<at::Tensor>& bias, int64_t w_mult) {
  const char* op = "adder_linear";
  TORCH_CHECK(xq.dim() == 3 && wq.dim() == 2 && xq.size(2) == wq.size(1), op,
              ": expected xq (G, M, K) and wq (N, K) with the same K");
  check_common(op, xq, wq, group_index, w_mult, xq.size(0), wq.size(0));
  check_epilogue(op, delta, bias, wq.size(0), xq.device());
  const c10::cuda::CUDAGuard guard(xq.device());
  const Geometry g = linear_geometry(xq, wq);
  at::Tensor out = at::empty({g.nb, g.cout}, xq.options().dtype(at::kFloat));
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  adder_run(op, xq.reshape({g.groups, g.nb, g.c, 1, 1}), wq.reshape({g.cout, g.c, 1, 1}), group_index, w_mult, g,
            &delta, b.defined() ? &b : nullptr, out);
  return out;
}

at::Tensor adder_l1_conv2d_cuda(const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t w_mult) {
  const char* op = "adder_l1_conv2d";
  const Geometry g = conv_geometry(op, xq, wq, stride, padding, dilation);
  check_common(op, xq, wq, group_index, w_mult, g.groups, g.cout);
  const c10::cuda::CUDAGuard guard(xq.device());
  at::Tensor out = at::empty({g.nb, g.cout, g.ho, g.wo},
                             xq.options().dtype(at::kInt).memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor rows = out.permute({0, 2, 3, 1}).view({g.nb * g.ho * g.wo, g.cout});  // same memory
  adder_run(op, xq, wq, group_index, w_mult, g, nullptr, nullptr, rows);
  return out;
}

at::Tensor adder_conv2d_cuda(const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                             const at::Tensor& delta, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t w_mult) {
  const char* op = "adder_conv2d";
  const Geometry g = conv_geometry(op, xq, wq, stride, padding, dilation);
  check_common(op, xq, wq, group_index, w_mult, g.groups, g.cout);
  check_epilogue(op, delta, bias, g.cout, xq.device());
  const c10::cuda::CUDAGuard guard(xq.device());
  at::Tensor out = at::empty({g.nb, g.cout, g.ho, g.wo},
                             xq.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor rows = out.permute({0, 2, 3, 1}).view({g.nb * g.ho * g.wo, g.cout});
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  adder_run(op, xq, wq, group_index, w_mult, g, &delta, b.defined() ? &b : nullptr, rows);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CUDA, m) {
  m.impl("adder_l1", &quantkit::cuda::adder_l1_cuda);
  m.impl("adder_linear", &quantkit::cuda::adder_linear_cuda);
  m.impl("adder_l1_conv2d", &quantkit::cuda::adder_l1_conv2d_cuda);
  m.impl("adder_conv2d", &quantkit::cuda::adder_conv2d_cuda);
}
