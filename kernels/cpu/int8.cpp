// Integer (u8 x s8 -> s32) GEMM and conv2d of the uniform deploy layers (w8a8, w4a4, ...), with the input
// quantization and the dequantizing epilogue fused in:
//
//   q_x = clamp(round_half_even(x / s_x) + z_x, 0, qmax)                   (u8; exactly quantize_affine)
//   acc[p, o] = sum_k q_x[p, k] * q_w[o, k]                                 (exact int32)
//   y[p, o] = float(acc[p, o] - z_x * wsum[o]) * (s_x * s_w[o]) + bias[o]   (wsum[o] = sum_k q_w[o, k])
//
// which equals sum_k ((q_x - z_x) s_x) (q_w s_w) + bias, the simulated layer's float math, up to float rounding.
// Optional output grid (out_scale given): y is then rounded like round_to_output_grid, in registers, with its float32
// operations in its order: y * (1/s) -> round half even -> + z -> clamp(qmin, qmax) -> - z -> * s.
// Conv zero padding: a padded tap holds the code z_x (the code of 0.0), so the correction z_x * wsum[o] is the same
// at every output position, borders included.
// Convs with few input channels (kw * C <= 64 bytes a kernel row) read a z_x-padded code image instead, where each
// kernel row of an output pixel is one run of bytes (quantize_padded_image, fill_runs).
//
// Layout of the packed weight (quantkit/ops/int8.py packs it once at conversion): int8 (ceil(N/16), ceil(K/4), 64),
// block b, quad j holds [16 output channels][4 consecutive k] of channels 16b..16b+15 and k 4j..4j+3, zero padded.
// One 64-byte row is one zmm operand of VPDPBUSD (16 channels x 4 k), so the micro-kernel broadcasts 4 activation
// bytes of a pixel and multiplies them into 16 channels at once. Conv weights are flattened in (kh, kw, c) order
// (OHWI), the order of the im2col rows built here from channels-last codes.
//
// ISA (cpu/cpu_features.h, QUANTKIT_CPU_ISA lowers it): AVX-512 with VNNI -> VPDPBUSD micro-kernel 6 pixels x 64
// channels (24 accumulators); AVX2 (or AVX-512 without VNNI) -> VPMADDWD on the same layout, 2 pixels x 16 channels;
// portable -> plain loops. All levels compute identical integers; the epilogue is the same float expression.
// No u8 x s8 pair product can saturate (VPDPBUSD adds four 16-bit products into int32 without saturation; the AVX2
// path widens to int16 and uses VPMADDWD, exact), and K is limited so that the int32 accumulator cannot overflow.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu/cpu_features.h"
#include "cpu/memory.h"

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#define QK_TARGET_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,popcnt,bmi,bmi2")))

namespace quantkit {
namespace int8 {
namespace {

constexpr int64_t kNB = 16;  // output channels per packed block
constexpr int64_t kKQ = 4;   // k values per packed quad
// |q_x| <= 255, |q_w| <= 128: K products stay below 2^31 for K <= 65793
constexpr int64_t kMaxK = (int64_t{1} << 31) / (255 * 128) - 1;

inline bool have_vnni() {
  static const bool ok = [] {
#if QUANTKIT_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
#else
    return false;
#endif
  }();
  return ok;
}

enum class Path { Portable, Avx2, Vnni };

Path active_path() {
  const cpu::Isa isa = cpu::active_isa();
  if (isa == cpu::Isa::Avx512 && have_vnni()) return Path::Vnni;
  if (isa != cpu::Isa::Portable) return Path::Avx2;
  return Path::Portable;
}

// Per-output-channel epilogue constants, padded to a multiple of 16 channels, and the optional output grid.
struct Epilogue {
  std::vector<int32_t> corr;   // z_x * wsum[o]
  std::vector<float> scale;    // s_x * s_w[o]
  std::vector<float> bias;     // bias[o] or 0
  // Output grid (round_to_output_grid in quantkit/quantizers/uniform.py), applied to y while it is in registers:
  // y = (clamp(round_half_even(y * out_inv) + out_zp, out_lo, out_hi) - out_zp) * out_scale, each step one float32
  // operation in this order, as the six in-place torch ops compute it. clamp keeps a NaN (torch.clamp does).
  bool out_grid = false;
  float out_inv = 1.f, out_scale = 1.f, out_zp = 0.f, out_lo = 0.f, out_hi = 0.f;
};

inline float to_output_grid(float y, const Epilogue& e) {
  float t = std::nearbyint(y * e.out_inv) + e.out_zp;  // default rounding mode: half to even
  t = t < e.out_lo ? e.out_lo : t;                      // a NaN fails both tests and stays NaN
  t = t > e.out_hi ? e.out_hi : t;
  return (t - e.out_zp) * e.out_scale;
}

struct Gemm {
  const uint8_t* a = nullptr;  // (M, lda) activation codes; columns K..Kp-1 are zero
  int64_t lda = 0;
  int64_t M = 0, N = 0, K4 = 0;
  const int8_t* w = nullptr;   // packed (ceil(N/16), K4, 64)
  const Epilogue* epi = nullptr;
  float* y = nullptr;          // (M, N) row-major
  // Conv: instead of `a`, fill(m0, rows, dst) writes im2col rows [m0, m0 + rows) to dst (stride lda) on demand.
  std::function<void(int64_t, int64_t, uint8_t*)> fill;
};

// ------------------------------------------------------------------------------------------------ portable
void tile_portable(const Gemm& g, int64_t m0, int64_t mrows, int64_t b0, int64_t nblocks) {
  for (int64_t r = 0; r < mrows; ++r) {
    const uint8_t* a = g.a + (m0 + r) * g.lda;
    for (int64_t b = b0; b < b0 + nblocks; ++b) {
      int32_t acc[kNB] = {0};
      const int8_t* wb = g.w + b * g.K4 * 64;
      for (int64_t j = 0; j < g.K4; ++j) {
        const uint8_t* aj = a + j * kKQ;
        const int8_t* wj = wb + j * 64;
        for (int c = 0; c < kNB; ++c) {
          int32_t s = 0;
          for (int t = 0; t < kKQ; ++t) s += int32_t(aj[t]) * int32_t(wj[c * kKQ + t]);
          acc[c] += s;
        }
      }
      float* yr = g.y + (m0 + r) * g.N;
      for (int c = 0; c < kNB; ++c) {
        const int64_t o = b * kNB + c;
        if (o >= g.N) break;
        const float v = float(acc[c] - g.epi->corr[o]) * g.epi->scale[o] + g.epi->bias[o];
        yr[o] = g.epi->out_grid ? to_output_grid(v, *g.epi) : v;
      }
    }
  }
}

#if QUANTKIT_X86
// GCC implements the float intrinsics as plain vector arithmetic and, under its default -ffp-contract=fast, fuses
// a multiply and a following add into one FMA (one rounding instead of two). The epilogue must round like the
// reference (multiply, then add), so the product passes through an empty asm the compiler cannot see into.
template <typename V>
inline void no_contract(V& v) {
  __asm__("" : "+v"(v));
}

// ------------------------------------------------------------------------------------------------ AVX2
// 16 int16 lanes [a0 a1 a2 a3] x 4 (the 4 activation bytes of one quad, zero-extended).
QK_TARGET_AVX2 inline __m256i bcast_quad_avx2(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_cvtepu8_epi16(_mm_set1_epi32(v));
}

// to_output_grid 8 lanes at a time: VROUNDPS rounds half to even; MAXPS / MINPS return their second operand when
// one is NaN, so a NaN y stays NaN like the scalar rule.
struct GridAvx2 {
  __m256 inv, scale, zp, lo, hi;
};

QK_TARGET_AVX2 inline GridAvx2 grid_avx2(const Epilogue& e) {
  return {_mm256_set1_ps(e.out_inv), _mm256_set1_ps(e.out_scale), _mm256_set1_ps(e.out_zp),
          _mm256_set1_ps(e.out_lo), _mm256_set1_ps(e.out_hi)};
}

QK_TARGET_AVX2 inline __m256 to_output_grid_avx2(__m256 y, const GridAvx2& c) {
  __m256 t = _mm256_round_ps(_mm256_mul_ps(y, c.inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  t = _mm256_add_ps(t, c.zp);
  t = _mm256_min_ps(c.hi, _mm256_max_ps(c.lo, t));
  return _mm256_mul_ps(_mm256_sub_ps(t, c.zp), c.scale);
}

template <int MR>
QK_TARGET_AVX2 void block_avx2(const Gemm& g, int64_t m0, int64_t b) {
  // acc[r][q]: 8 int32 = channels 4q..4q+3 of the block, two partial sums (k pairs) each
  // loops over the accumulators fully unrolled (constant indices keep them in registers, as in block_vnni); MR = 2
  // rows (8 accumulators) fit the 16 ymm registers with broadcasts and widened weights, MR = 3 spilled
  __m256i acc[MR][4];
#pragma GCC unroll 3
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_si256();
  const int8_t* wb = g.w + b * g.K4 * 64;
  for (int64_t j = 0; j < g.K4; ++j) {
    __m256i av[MR];
#pragma GCC unroll 3
    for (int r = 0; r < MR; ++r) av[r] = bcast_quad_avx2(g.a + (m0 + r) * g.lda + j * kKQ);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256i wq =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + j * 64 + q * 16)));
#pragma GCC unroll 3
      for (int r = 0; r < MR; ++r) acc[r][q] = _mm256_add_epi32(acc[r][q], _mm256_madd_epi16(av[r], wq));
    }
  }
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  const bool out_grid = g.epi->out_grid;
  const GridAvx2 grid = grid_avx2(*g.epi);
  const int64_t n0 = b * kNB;
  const int valid = int(std::min<int64_t>(kNB, g.N - n0));
#pragma GCC unroll 3
  for (int r = 0; r < MR; ++r) {
    float* yr = g.y + (m0 + r) * g.N + n0;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      // hadd within 128-bit lanes gives channels [0 1 4 5 | 2 3 6 7] of this 8-channel half
      __m256i s = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(acc[r][2 * h], acc[r][2 * h + 1]), order);
      const int64_t o = n0 + 8 * h;
      s = _mm256_sub_epi32(s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.epi->corr.data() + o)));
      __m256 prod = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_loadu_ps(g.epi->scale.data() + o));
      no_contract(prod);
      __m256 v = _mm256_add_ps(prod, _mm256_loadu_ps(g.epi->bias.data() + o));
      if (out_grid) v = to_output_grid_avx2(v, grid);
      const int n_here = std::max(0, std::min(8, valid - 8 * h));
      if (n_here == 8) {
        _mm256_storeu_ps(yr + 8 * h, v);
      } else if (n_here > 0) {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v);
        std::memcpy(yr + 8 * h, tmp, sizeof(float) * n_here);
      }
    }
  }
}

QK_TARGET_AVX2 void tile_avx2(const Gemm& g, int64_t m0, int64_t mrows, int64_t b0, int64_t nblocks) {
  for (int64_t b = b0; b < b0 + nblocks; ++b) {
    int64_t r = 0;
    for (; r + 2 <= mrows; r += 2) block_avx2<2>(g, m0 + r, b);
    if (r < mrows) block_avx2<1>(g, m0 + r, b);
  }
}

// ------------------------------------------------------------------------------------------------ AVX-512 VNNI
// to_output_grid 16 lanes at a time (the AVX2 comments hold: VRNDSCALE rounds half to even, NaN stays NaN).
struct Grid512 {
  __m512 inv, scale, zp, lo, hi;
};

QK_TARGET_VNNI inline Grid512 grid_512(const Epilogue& e) {
  return {_mm512_set1_ps(e.out_inv), _mm512_set1_ps(e.out_scale), _mm512_set1_ps(e.out_zp),
          _mm512_set1_ps(e.out_lo), _mm512_set1_ps(e.out_hi)};
}

QK_TARGET_VNNI inline __m512 to_output_grid_512(__m512 y, const Grid512& c) {
  __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(y, c.inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  t = _mm512_add_ps(t, c.zp);
  t = _mm512_min_ps(c.hi, _mm512_max_ps(c.lo, t));
  return _mm512_mul_ps(_mm512_sub_ps(t, c.zp), c.scale);
}

// acc += dot4(a (u8), w (s8)) per int32 lane, as asm with the accumulator tied in place. With the intrinsic, GCC 12
// copied every accumulator to another register and to the stack on each k step (24 accumulators); the asm, together
// with fully unrolled loops over the accumulators (constant indices, so the array lives in registers), gives a k
// loop of 4 weight loads, 6 broadcasts and 24 VPDPBUSD and nothing else.
QK_TARGET_VNNI inline void dpbusd(__m512i& acc, __m512i a, __m512i w) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
}

template <int MR, int NB>
QK_TARGET_VNNI void block_vnni(const Gemm& g, int64_t m0, int64_t b0) {
  __m512i acc[MR][NB];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_si512();
  const int64_t bstride = g.K4 * 64;
  const int8_t* wb = g.w + b0 * bstride;
  const uint8_t* arow[MR];
  for (int r = 0; r < MR; ++r) arow[r] = g.a + (m0 + r) * g.lda;
  for (int64_t j = 0; j < g.K4; ++j) {
    __m512i wv[NB];
#pragma GCC unroll 4
    for (int c = 0; c < NB; ++c) wv[c] = _mm512_loadu_si512(wb + c * bstride + j * 64);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t q;
      std::memcpy(&q, arow[r] + j * kKQ, 4);
      const __m512i av = _mm512_set1_epi32(q);
#pragma GCC unroll 4
      for (int c = 0; c < NB; ++c) dpbusd(acc[r][c], av, wv[c]);
    }
  }
  const bool out_grid = g.epi->out_grid;
  const Grid512 grid = grid_512(*g.epi);
  // every loop over the accumulators unrolled completely: with constant indices GCC keeps them in registers
#pragma GCC unroll 4
  for (int c = 0; c < NB; ++c) {
    const int64_t o = (b0 + c) * kNB;
    const int valid = int(std::min<int64_t>(kNB, g.N - o));
    const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1u);
    const __m512i corr = _mm512_loadu_si512(g.epi->corr.data() + o);
    const __m512 scale = _mm512_loadu_ps(g.epi->scale.data() + o);
    const __m512 bias = _mm512_loadu_ps(g.epi->bias.data() + o);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      __m512 prod = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], corr)), scale);
      no_contract(prod);
      __m512 v = _mm512_add_ps(prod, bias);
      if (out_grid) v = to_output_grid_512(v, grid);
      _mm512_mask_storeu_ps(g.y + (m0 + r) * g.N + o, mask, v);
    }
  }
}

template <int NB>
QK_TARGET_VNNI void rows_vnni(const Gemm& g, int64_t m0, int64_t mrows, int64_t b0) {
  int64_t r = 0;
  for (; r + 6 <= mrows; r += 6) block_vnni<6, NB>(g, m0 + r, b0);
  switch (mrows - r) {
    case 5: block_vnni<5, NB>(g, m0 + r, b0); break;
    case 4: block_vnni<4, NB>(g, m0 + r, b0); break;
    case 3: block_vnni<3, NB>(g, m0 + r, b0); break;
    case 2: block_vnni<2, NB>(g, m0 + r, b0); break;
    case 1: block_vnni<1, NB>(g, m0 + r, b0); break;
    default: break;
  }
}

QK_TARGET_VNNI void tile_vnni(const Gemm& g, int64_t m0, int64_t mrows, int64_t b0, int64_t nblocks) {
  int64_t b = b0;
  for (; b + 4 <= b0 + nblocks; b += 4) rows_vnni<4>(g, m0, mrows, b);
  switch (b0 + nblocks - b) {
    case 3: rows_vnni<3>(g, m0, mrows, b); break;
    case 2: rows_vnni<2>(g, m0, mrows, b); break;
    case 1: rows_vnni<1>(g, m0, mrows, b); break;
    default: break;
  }
}
#endif

void run_tile(Path path, const Gemm& g, int64_t m0, int64_t mrows, int64_t b0, int64_t nb) {
#if QUANTKIT_X86
  if (path == Path::Vnni) return tile_vnni(g, m0, mrows, b0, nb);
  if (path == Path::Avx2) return tile_avx2(g, m0, mrows, b0, nb);
#endif
  tile_portable(g, m0, mrows, b0, nb);
}

// Tiles of (MC pixels) x (64 channels), pixel-major so consecutive tiles of a thread share the activation rows.
// With an im2col `fill` and enough pixel chunks for every thread, each chunk's rows are built into a per-thread
// buffer (cache resident) right before the GEMM reads them, for all output channels; otherwise (few pixels: split
// the channels too) the whole im2col matrix is built first.
void run_gemm(Gemm g) {
  if (g.M == 0 || g.N == 0) return;
  const Path path = active_path();
  const int64_t nblocks = (g.N + kNB - 1) / kNB;
  constexpr int64_t kGroup = 4;  // blocks per tile (64 channels)
  const int64_t ngroups = (nblocks + kGroup - 1) / kGroup;
  const int64_t MC = 96;
  const int64_t mchunks = (g.M + MC - 1) / MC;
  at::Tensor whole;
  if (g.fill) {
    if (mchunks >= 4 * int64_t(at::get_num_threads())) {
      at::parallel_for(0, mchunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<uint8_t> buf(size_t(MC * g.lda));
        for (int64_t mc = begin; mc < end; ++mc) {
          const int64_t m0 = mc * MC, mrows = std::min(MC, g.M - m0);
          g.fill(m0, mrows, buf.data());
          Gemm local = g;
          local.a = buf.data();
          local.M = mrows;
          local.y = g.y + m0 * g.N;
          for (int64_t ng = 0; ng < ngroups; ++ng)
            run_tile(path, local, 0, mrows, ng * kGroup, std::min(kGroup, nblocks - ng * kGroup));
        }
      });
      return;
    }
    whole = at::empty({g.M, g.lda}, at::TensorOptions().dtype(at::kByte));
    uint8_t* dst = whole.data_ptr<uint8_t>();
    at::parallel_for(0, g.M, std::max<int64_t>(1, 4096 / g.lda), [&](int64_t b, int64_t e) {
      g.fill(b, e - b, dst + b * g.lda);
    });
    g.a = dst;
  }
  at::parallel_for(0, mchunks * ngroups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t mc = t / ngroups, ng = t % ngroups;
      const int64_t m0 = mc * MC, mrows = std::min(MC, g.M - m0);
      run_tile(path, g, m0, mrows, ng * kGroup, std::min(kGroup, nblocks - ng * kGroup));
    }
  });
}

// ------------------------------------------------------------------------------------------------ quantize
// Same float operations as quantize_affine: x / s (a division, not a reciprocal product), round half to even,
// + z, clamp. Clamping before rounding is equivalent (integer bounds) and keeps |v| small enough for the
// 1.5 * 2^23 rounding trick (IEEE default rounding; the build never uses -ffast-math). A NaN input fails both
// comparisons and lands on the lower bound (code 0) instead of an undefined float-to-int conversion.
inline uint8_t quantize_one(float x, float s, float zf, float lo, float hi) {
  float v = x / s;
  v = v > lo ? v : lo;
  v = v < hi ? v : hi;
  const float r = (v + 12582912.0f) - 12582912.0f;
  return static_cast<uint8_t>(static_cast<int32_t>(r + zf));
}

struct ActParams {
  float scale;
  float zp;
  int32_t zp_int;
  int64_t qmax;
};

ActParams act_params(const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmax, const char* op) {
  TORCH_CHECK(qmax >= 1 && qmax <= 255, op, ": act_qmax must be in 1..255, got ", qmax);
  TORCH_CHECK(scale.numel() == 1 && zero_point.numel() == 1, op,
              ": act_scale and act_zero_point must hold one value each (per-tensor activation grid), got ",
              scale.sizes(), " and ", zero_point.sizes());
  ActParams p;
  p.scale = scale.to(at::kFloat).item<float>();
  const double zp = zero_point.to(at::kDouble).item<double>();
  TORCH_CHECK(std::isfinite(p.scale) && p.scale > 0.f, op, ": act_scale must be a positive finite number, got ",
              p.scale);
  TORCH_CHECK(zp >= 0 && zp <= double(qmax) && zp == std::floor(zp), op,
              ": act_zero_point must be an integer in [0, act_qmax=", qmax, "], got ", zp);
  p.zp = float(zp);
  p.zp_int = int32_t(zp);
  p.qmax = qmax;
  return p;
}

#if QUANTKIT_X86
// The same operations 16 (8) lanes at a time: max/min return their second operand for a NaN first operand (the
// scalar rule above), VRNDSCALE / VROUNDPS round half to even like the 1.5 * 2^23 trick.
QK_TARGET_AVX512 void quantize_row_avx512(const float* x, int64_t K, const ActParams& p, float lo, float hi,
                                          uint8_t* q) {
  const __m512 s = _mm512_set1_ps(p.scale), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi),
               zf = _mm512_set1_ps(p.zp);
  for (int64_t k = 0; k < K; k += 16) {
    const int n = int(std::min<int64_t>(16, K - k));
    const __mmask16 m = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), s);
    v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
    v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zf);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
  }
}

QK_TARGET_AVX2 void quantize_row_avx2(const float* x, int64_t K, const ActParams& p, float lo, float hi,
                                      uint8_t* q) {
  const __m256 s = _mm256_set1_ps(p.scale), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi),
               zf = _mm256_set1_ps(p.zp);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + k), s);
    v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
    v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zf);
    const __m256i i32 = _mm256_cvttps_epi32(v);
    const __m128i i16 = _mm_packus_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    const __m128i u8 = _mm_packus_epi16(i16, i16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), u8);
  }
  for (; k < K; ++k) q[k] = quantize_one(x[k], p.scale, p.zp, lo, hi);
}
#endif

// One row of K floats -> K codes on the active ISA.
inline void quantize_row(cpu::Isa isa, const float* x, int64_t K, const ActParams& p, uint8_t* q) {
  const float lo = -p.zp, hi = float(p.qmax) - p.zp;
#if QUANTKIT_X86
  if (isa == cpu::Isa::Avx512) return quantize_row_avx512(x, K, p, lo, hi, q);
  if (isa == cpu::Isa::Avx2) return quantize_row_avx2(x, K, p, lo, hi, q);
#endif
  (void)isa;
  for (int64_t k = 0; k < K; ++k) q[k] = quantize_one(x[k], p.scale, p.zp, lo, hi);
}

// x (rows, K) float with row stride `ld` (elements) -> codes (rows, ldq) with zeroed tail columns K..ldq-1.
void quantize_rows(const float* x, int64_t rows, int64_t K, int64_t ld, const ActParams& p, uint8_t* q,
                   int64_t ldq) {
  if (ld == K && ldq == K && K < 64 && rows > 1) {
    // dense short rows (a 3-channel stem: one row per pixel): the same codes as one long row, quantized in
    // chunks, instead of paying the per-row set-up of the vector loop every 3 values
    constexpr int64_t kChunk = 4096;
    const int64_t total = rows * K, chunks = (total + kChunk - 1) / kChunk;
    quantize_rows(x, chunks - 1, kChunk, kChunk, p, q, kChunk);
    quantize_rows(x + (chunks - 1) * kChunk, 1, total - (chunks - 1) * kChunk, 0, p, q + (chunks - 1) * kChunk, 0);
    return;
  }
  const cpu::Isa isa = cpu::active_isa();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      uint8_t* qr = q + r * ldq;
      quantize_row(isa, x + r * ld, K, p, qr);
      for (int64_t k = K; k < ldq; ++k) qr[k] = 0;
    }
  });
}

// Channel rows (C, W) of codes -> one channels-last row (W, C); a constant C lets the compiler vectorize the
// interleave (the stem's C = 3).
template <int kC>
inline void interleave_rows(const uint8_t* rows, int64_t W, uint8_t* out) {
  for (int64_t w = 0; w < W; ++w)
    for (int c = 0; c < kC; ++c) out[w * kC + c] = rows[c * W + w];
}

inline void interleave_rows_any(const uint8_t* rows, int64_t C, int64_t W, uint8_t* out) {
  switch (C) {
    case 2: return interleave_rows<2>(rows, W, out);
    case 3: return interleave_rows<3>(rows, W, out);
    case 4: return interleave_rows<4>(rows, W, out);
    default:
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) out[w * C + c] = rows[c * W + w];
  }
}

// The codes of x (B, C, H, W) in a channels-last image padded by (ph, pw) on each side, the padding holding z_x
// (the code of 0.0): (B, H + 2 ph, W + 2 pw, C) bytes. A conv over it needs no border tests: every kernel row of an
// output pixel is one run of kw * C bytes (dilation 1 along W). x may be NCHW (channel rows are quantized then
// interleaved, which saves the float permute) or channels-last (rows quantized in place).
at::Tensor quantize_padded_image(const at::Tensor& x, const ActParams& p, int64_t ph, int64_t pw) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  at::Tensor img = at::empty({B * Hp * Wp * C}, x.options().dtype(at::kByte));
  uint8_t* dst = img.data_ptr<uint8_t>();
  const uint8_t zp = uint8_t(p.zp_int);
  const cpu::Isa isa = cpu::active_isa();
  const bool nhwc = C > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor xc = nhwc ? x : x.contiguous();
  const float* src = xc.data_ptr<float>();
  at::parallel_for(0, B * Hp, std::max<int64_t>(1, 16384 / std::max<int64_t>(Wp * C, 1)), [&](int64_t b, int64_t e) {
    std::vector<uint8_t> rowq(size_t(W * C));
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / Hp, h = r % Hp - ph;
      uint8_t* out = dst + r * Wp * C;
      if (h < 0 || h >= H) {  // a padding row
        std::memset(out, zp, size_t(Wp * C));
        continue;
      }
      std::memset(out, zp, size_t(pw * C));
      std::memset(out + (pw + W) * C, zp, size_t(pw * C));
      uint8_t* interior = out + pw * C;
      if (nhwc) {
        quantize_row(isa, src + (n * H + h) * W * C, W * C, p, interior);
      } else if (C == 1) {
        quantize_row(isa, src + (n * H + h) * W, W, p, interior);
      } else {
        for (int64_t c = 0; c < C; ++c) quantize_row(isa, src + ((n * C + c) * H + h) * W, W, p, rowq.data() + c * W);
        interleave_rows_any(rowq.data(), C, W, interior);
      }
    }
  });
  return img;
}

// Copies a run of n bytes with fixed-width unaligned moves, the last one overlapping the previous ones, so no byte
// outside [0, n) is read or written and there is no per-byte loop from 4 bytes on. kWidth is the run-length class
// (n in [kWidth, 2 kWidth], or 1..3 for kWidth = 1), chosen once per conv.
template <int kWidth>
inline void copy_run(uint8_t* d, const uint8_t* s, int64_t n) {
  if constexpr (kWidth == 1) {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
  } else if constexpr (kWidth == 32) {  // 32..64 bytes: four 16-byte moves
    std::memcpy(d, s, 16);
    std::memcpy(d + 16, s + 16, 16);
    std::memcpy(d + n - 32, s + n - 32, 16);
    std::memcpy(d + n - 16, s + n - 16, 16);
  } else {
    std::memcpy(d, s, kWidth);
    std::memcpy(d + n - kWidth, s + n - kWidth, kWidth);
  }
}

// The im2col rows of a conv over a quantize_padded_image: row (pixel m) = kh runs of kw * C bytes, then zeros.
struct RunFill {
  const uint8_t* image = nullptr;
  int64_t Hp = 0, Wp = 0, C = 0, kh = 0, run = 0, sh = 0, sw = 0, row_step = 0, Ho = 0, Wo = 0, ldc = 0;
};

template <int kWidth>
void fill_runs(const RunFill& f, int64_t m0, int64_t rows, uint8_t* dst) {
  // local copies: the byte stores below may alias f as far as the compiler knows, which reloaded every field per run
  const uint8_t* const image = f.image;
  const int64_t Hp = f.Hp, Wp = f.Wp, C = f.C, kh = f.kh, run = f.run, sh = f.sh, sw = f.sw, step = f.row_step,
                Ho = f.Ho, Wo = f.Wo, ldc = f.ldc;
  int64_t n = m0 / (Ho * Wo), oh = (m0 % (Ho * Wo)) / Wo, ow = m0 % Wo;
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = dst + r * ldc;
    std::memset(row + ldc - kKQ, 0, kKQ);  // the K tail (K..ldc-1 lies in the last quad); the runs fill [0, K)
    const uint8_t* from = image + ((n * Hp + oh * sh) * Wp + ow * sw) * C;
    for (int64_t i = 0; i < kh; ++i, row += run, from += step) copy_run<kWidth>(row, from, run);
    if (++ow == Wo) {
      ow = 0;
      if (++oh == Ho) oh = 0, ++n;
    }
  }
}

void fill_runs_any(const RunFill& f, int64_t m0, int64_t rows, uint8_t* dst) {
  if (f.run >= 32) return fill_runs<32>(f, m0, rows, dst);
  if (f.run >= 16) return fill_runs<16>(f, m0, rows, dst);
  if (f.run >= 8) return fill_runs<8>(f, m0, rows, dst);
  if (f.run >= 4) return fill_runs<4>(f, m0, rows, dst);
  fill_runs<1>(f, m0, rows, dst);
}


// ------------------------------------------------------------------------------------------------ checks
void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), op, ": ", what, " overflows int64 (", a,
              " x ", b, ")");
  return r;
}

struct Weights {
  Epilogue epi;
  const int8_t* packed = nullptr;
  int64_t K4 = 0;
};

// Validates the packed weight and per-channel vectors against (N, K) and builds the epilogue constants.
void check_weights(const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                   const c10::optional<at::Tensor>& bias, int64_t N, int64_t K, const ActParams& p, const char* op,
                   Weights& out, at::Tensor& w_keep) {
  check_cpu(w_packed, op, "w_packed");
  check_cpu(w_sum, op, "w_sum");
  check_cpu(w_scale, op, "w_scale");
  if (bias.has_value()) check_cpu(*bias, op, "bias");
  TORCH_CHECK(N >= 0, op, ": n_out must be >= 0, got ", N);
  TORCH_CHECK(K <= kMaxK, op, ": reduction length ", K, " exceeds ", kMaxK,
              " (the int32 accumulator could overflow); split the layer");
  TORCH_CHECK(w_packed.scalar_type() == at::kChar, op, ": w_packed must be int8 (quantkit.ops.int8.pack_weight), got ",
              w_packed.scalar_type());
  const int64_t nblocks = (N + kNB - 1) / kNB, K4 = (K + kKQ - 1) / kKQ;
  TORCH_CHECK(w_packed.dim() == 3 && w_packed.size(0) == nblocks && w_packed.size(1) == K4 && w_packed.size(2) == 64,
              op, ": w_packed must be (ceil(n_out/16), ceil(K/4), 64) = (", nblocks, ", ", K4,
              ", 64) for n_out=", N, ", K=", K, ", got ", w_packed.sizes());
  TORCH_CHECK(w_sum.dim() == 1 && w_sum.numel() == N && !at::isFloatingType(w_sum.scalar_type()) &&
                  w_sum.scalar_type() != at::kBool,
              op, ": w_sum must be an integer tensor of shape (", N, "), got ", w_sum.scalar_type(), " ",
              w_sum.sizes());
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.numel() == N && at::isFloatingType(w_scale.scalar_type()), op,
              ": w_scale must be a float tensor of shape (", N, "), got ", w_scale.scalar_type(), " ",
              w_scale.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == N && at::isFloatingType(bias->scalar_type()), op,
                ": bias must be a float tensor of shape (", N, "), got ", bias->scalar_type(), " ", bias->sizes());
  const int64_t Np = nblocks * kNB;
  out.epi.corr.assign(Np, 0);
  out.epi.scale.assign(Np, 0.f);
  out.epi.bias.assign(Np, 0.f);
  at::Tensor ws = w_sum.to(at::kLong).contiguous(), sc = w_scale.to(at::kFloat).contiguous();
  const int64_t* wsp = ws.data_ptr<int64_t>();
  const float* scp = sc.data_ptr<float>();
  for (int64_t o = 0; o < N; ++o) {
    TORCH_CHECK(std::llabs(wsp[o]) <= K * 128, op, ": w_sum[", o, "] = ", wsp[o], " is impossible for K=", K,
                " int8 weights; recompute it from the weight codes");
    out.epi.corr[o] = int32_t(int64_t(p.zp_int) * wsp[o]);
    out.epi.scale[o] = p.scale * scp[o];
  }
  if (bias.has_value()) {
    at::Tensor bc = bias->to(at::kFloat).contiguous();
    std::memcpy(out.epi.bias.data(), bc.data_ptr<float>(), sizeof(float) * N);
  }
  w_keep = w_packed.contiguous();
  out.packed = w_keep.data_ptr<int8_t>();
  out.K4 = K4;
}

// The optional output grid of the epilogue; the Python layer passes round_to_output_grid's numbers (s, 1/s as a
// float32, z, qmin, qmax), which are exact float32 values, so the casts below are exact.
void set_output_grid(Epilogue& e, const c10::optional<double>& out_scale, double out_inv_scale,
                     int64_t out_zero_point, int64_t out_qmin, int64_t out_qmax, const char* op) {
  if (!out_scale.has_value()) return;
  constexpr int64_t kExact = int64_t{1} << 24;  // integers up to 2^24 are exact float32 values
  TORCH_CHECK(std::isfinite(*out_scale) && *out_scale > 0 && std::isfinite(out_inv_scale) && out_inv_scale > 0, op,
              ": out_scale and out_inv_scale must be positive finite numbers, got ", *out_scale, " and ",
              out_inv_scale);
  TORCH_CHECK(out_qmin <= out_qmax && std::llabs(out_qmin) <= kExact && std::llabs(out_qmax) <= kExact &&
                  std::llabs(out_zero_point) <= kExact,
              op, ": the output grid needs out_qmin <= out_qmax and |out_qmin|, |out_qmax|, |out_zero_point| <= 2^24, "
              "got out_qmin=", out_qmin, ", out_qmax=", out_qmax, ", out_zero_point=", out_zero_point);
  e.out_grid = true;
  e.out_scale = float(*out_scale);
  e.out_inv = float(out_inv_scale);
  e.out_zp = float(out_zero_point);
  e.out_lo = float(out_qmin);
  e.out_hi = float(out_qmax);
}

}  // namespace

// ------------------------------------------------------------------------------------------------ ops
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& act_scale, const at::Tensor& act_zero_point,
                           int64_t act_qmax, const at::Tensor& w_packed, const at::Tensor& w_sum,
                           const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t n_out,
                           c10::optional<double> out_scale, double out_inv_scale, int64_t out_zero_point,
                           int64_t out_qmin, int64_t out_qmax) {
  const char* op = "quantkit::int8_linear";
  check_cpu(x, op, "x");
  check_cpu(act_scale, op, "act_scale");
  check_cpu(act_zero_point, op, "act_zero_point");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must be (..., K), got a 0-d tensor");
  const ActParams p = act_params(act_scale, act_zero_point, act_qmax, op);
  const int64_t K = x.size(-1);
  Weights wt;
  at::Tensor w_keep;
  check_weights(w_packed, w_sum, w_scale, bias, n_out, K, p, op, wt, w_keep);
  set_output_grid(wt.epi, out_scale, out_inv_scale, out_zero_point, out_qmin, out_qmax, op);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(n_out);
  at::Tensor y = at::empty(out_shape, x.options());
  cpu::advise_huge_pages(y);
  int64_t rows = 1;
  for (int64_t d = 0; d < x.dim() - 1; ++d) rows = checked_mul(rows, x.size(d), op, "rows");
  checked_mul(rows, n_out, op, "output size");
  if (rows == 0 || n_out == 0) return y;
  const int64_t Kp = wt.K4 * kKQ;
  at::Tensor xc = x.reshape({rows, K}).contiguous();
  at::Tensor codes = at::empty({rows, std::max<int64_t>(Kp, 1)}, x.options().dtype(at::kByte));
  quantize_rows(xc.data_ptr<float>(), rows, K, K, p, codes.data_ptr<uint8_t>(), codes.size(1));
  Gemm g;
  g.a = codes.data_ptr<uint8_t>();
  g.lda = codes.size(1);
  g.M = rows;
  g.N = n_out;
  g.K4 = wt.K4;
  g.w = wt.packed;
  g.epi = &wt.epi;
  g.y = y.data_ptr<float>();
  run_gemm(g);
  return y;
}

at::Tensor int8_conv2d_cpu(const at::Tensor& x, const at::Tensor& act_scale, const at::Tensor& act_zero_point,
                           int64_t act_qmax, const at::Tensor& w_packed, const at::Tensor& w_sum,
                           const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t n_out,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, c10::optional<double> out_scale, double out_inv_scale,
                           int64_t out_zero_point, int64_t out_qmin, int64_t out_qmax) {
  const char* op = "quantkit::int8_conv2d";
  check_cpu(x, op, "x");
  check_cpu(act_scale, op, "act_scale");
  check_cpu(act_zero_point, op, "act_zero_point");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation need two values each");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= 4096 && kw <= 4096, op, ": kernel_size must be in 1..4096, got ",
              kernel_size);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1, op,
              ": stride and dilation must be >= 1, got ", stride, " and ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0 && padding[0] <= (int64_t{1} << 30) &&
                  padding[1] <= (int64_t{1} << 30) && stride[0] <= (int64_t{1} << 30) &&
                  stride[1] <= (int64_t{1} << 30) && dilation[0] <= (int64_t{1} << 30) &&
                  dilation[1] <= (int64_t{1} << 30),
              op, ": padding must be >= 0 and padding, stride, dilation at most 2^30, got padding=", padding,
              ", stride=", stride, ", dilation=", dilation);
  const int64_t span_h = dilation[0] * (kh - 1) + 1, span_w = dilation[1] * (kw - 1) + 1;
  TORCH_CHECK(H + 2 * padding[0] >= span_h && W + 2 * padding[1] >= span_w, op, ": input ", H, "x", W,
              " with padding ", padding, " is smaller than the dilated kernel ", span_h, "x", span_w);
  const int64_t Ho = (H + 2 * padding[0] - span_h) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - span_w) / stride[1] + 1;
  const ActParams p = act_params(act_scale, act_zero_point, act_qmax, op);
  const int64_t taps = kh * kw;
  const int64_t K = checked_mul(taps, C, op, "reduction length C * kh * kw");
  Weights wt;
  at::Tensor w_keep;
  check_weights(w_packed, w_sum, w_scale, bias, n_out, K, p, op, wt, w_keep);
  set_output_grid(wt.epi, out_scale, out_inv_scale, out_zero_point, out_qmin, out_qmax, op);
  const int64_t M = checked_mul(checked_mul(B, Ho, op, "output size"), Wo, op, "output size");
  checked_mul(M, n_out, op, "output size");
  at::Tensor y = at::empty({B, n_out, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  cpu::advise_huge_pages(y);
  if (M == 0 || n_out == 0) return y;
  const int64_t Kp = wt.K4 * kKQ;
  checked_mul(M, std::max<int64_t>(Kp, 1), op, "im2col buffer size");
  const bool direct = kh == 1 && kw == 1 && stride[0] == 1 && stride[1] == 1 && padding[0] == 0 &&
                      padding[1] == 0 && C % kKQ == 0 && C > 0;
  // Few channels (the stem, C = 3; a one-channel input): kernel rows of kw * C <= 64 bytes are copied from a
  // z_x-padded code image as whole runs; the padded image may not be much larger than the input.
  const int64_t Hp = H + 2 * padding[0], Wp = W + 2 * padding[1];
  const bool run_fill = !direct && C > 0 && dilation[1] == 1 && kw * C <= 64 &&
                        double(Hp) * double(Wp) <= 4.0 * double(H) * double(W) + 65536.0;
  Gemm g;
  at::Tensor codes, image;
  if (run_fill) {
    image = quantize_padded_image(x, p, padding[0], padding[1]);
    RunFill f;
    f.image = image.data_ptr<uint8_t>();
    f.Hp = Hp, f.Wp = Wp, f.C = C, f.kh = kh, f.run = kw * C, f.sh = stride[0], f.sw = stride[1];
    f.row_step = dilation[0] * Wp * C, f.Ho = Ho, f.Wo = Wo, f.ldc = Kp;
    g.fill = [f](int64_t m0, int64_t rows, uint8_t* dst) { fill_runs_any(f, m0, rows, dst); };
    g.lda = Kp;
  } else {
    // codes of the input in channels-last order (N, H, W, C)
    at::Tensor xl = x.permute({0, 2, 3, 1}).contiguous();
    codes = at::empty({std::max<int64_t>(B * H * W, 1), std::max<int64_t>(C, 1)}, x.options().dtype(at::kByte));
    if (B * H * W > 0 && C > 0)
      quantize_rows(xl.data_ptr<float>(), B * H * W, C, C, p, codes.data_ptr<uint8_t>(), C);
    if (direct) {
      g.a = codes.data_ptr<uint8_t>();
      g.lda = C;
    } else {
      // 2. im2col rows (pixel, (kh, kw, c)), built by the GEMM driver per pixel chunk; padded taps hold the code of
      //    0.0 (z_x), the K tail 0
      const int64_t ldc = std::max<int64_t>(Kp, 1);
      const uint8_t* src = codes.data_ptr<uint8_t>();
      const uint8_t zp = uint8_t(p.zp_int);
      const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1], dh = dilation[0],
                    dw = dilation[1];
      g.fill = [=](int64_t m0, int64_t rows, uint8_t* dst) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t m = m0 + r;
          const int64_t n = m / (Ho * Wo), rem = m % (Ho * Wo), oh = rem / Wo, ow = rem % Wo;
          uint8_t* row = dst + r * ldc;
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t ih = oh * sh - ph + i * dh, iw0 = ow * sw - pw;
            uint8_t* trow = row + i * kw * C;
            if (ih < 0 || ih >= H) {  // a padded kernel row
              std::memset(trow, zp, kw * C);
              continue;
            }
            if (dw == 1 && iw0 >= 0 && iw0 + kw <= W) {  // the kw taps are consecutive pixels of the source row
              std::memcpy(trow, src + ((n * H + ih) * W + iw0) * C, kw * C);
              continue;
            }
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t iw = ow * sw - pw + j * dw;
              uint8_t* tap = row + (i * kw + j) * C;
              const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
              const uint8_t* from = inside ? src + ((n * H + ih) * W + iw) * C : nullptr;
              if (C >= 32) {  // library calls pay off for long runs only; the stem (C = 3) copies 3 bytes a tap
                if (inside) std::memcpy(tap, from, C); else std::memset(tap, zp, C);
              } else if (inside) {
                for (int64_t c = 0; c < C; ++c) tap[c] = from[c];
              } else {
                for (int64_t c = 0; c < C; ++c) tap[c] = zp;
              }
            }
          }
          if (ldc > K) std::memset(row + K, 0, ldc - K);
        }
      };
      g.lda = ldc;
    }
  }
  g.M = M;
  g.N = n_out;
  g.K4 = wt.K4;
  g.w = wt.packed;
  g.epi = &wt.epi;
  g.y = y.data_ptr<float>();  // channels-last memory: row-major (pixel, channel)
  run_gemm(g);
  return y;
}

// Which micro-kernel the int8 ops run now ("vnni", "avx2", "portable"): AVX-512 without VNNI runs the AVX2 one.
std::string int8_kernel_path() {
  switch (active_path()) {
    case Path::Vnni: return "vnni";
    case Path::Avx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace int8
}  // namespace quantkit

TORCH_LIBRARY_FRAGMENT(quantkit, m) {
  // Uniform integer layers (semantics in the header comment of kernels/cpu/int8.cpp and quantkit/ops/int8.py):
  // float x -> u8 codes on the per-tensor grid (act_scale, act_zero_point, [0, act_qmax]) -> u8 x s8 GEMM with the
  // packed weight -> float32 y = (acc - z_x * w_sum) * act_scale * w_scale + bias.
  // int8_linear: x (..., K) -> (..., n_out).  int8_conv2d: x (N, C, H, W), weight flattened OHWI, groups = 1
  //   -> (N, n_out, Ho, Wo) in channels-last memory.
  // With out_scale given, the epilogue also rounds y to the output grid (out_scale, out_inv_scale = float32(1 /
  // out_scale), out_zero_point, [out_qmin, out_qmax]) with round_to_output_grid's float operations, bit for bit.
  m.def("int8_linear(Tensor x, Tensor act_scale, Tensor act_zero_point, int act_qmax, Tensor w_packed, "
        "Tensor w_sum, Tensor w_scale, Tensor? bias, int n_out, float? out_scale=None, float out_inv_scale=1.0, "
        "int out_zero_point=0, int out_qmin=0, int out_qmax=0) -> Tensor");
  m.def("int8_conv2d(Tensor x, Tensor act_scale, Tensor act_zero_point, int act_qmax, Tensor w_packed, "
        "Tensor w_sum, Tensor w_scale, Tensor? bias, int n_out, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, float? out_scale=None, float out_inv_scale=1.0, int out_zero_point=0, "
        "int out_qmin=0, int out_qmax=0) -> Tensor");
  m.def("int8_kernel_path() -> str");
}

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("int8_linear", &quantkit::int8::int8_linear_cpu);
  m.impl("int8_conv2d", &quantkit::int8::int8_conv2d_cpu);
}

TORCH_LIBRARY_IMPL(quantkit, CompositeExplicitAutograd, m) {
  m.impl("int8_kernel_path", &quantkit::int8::int8_kernel_path);
}
