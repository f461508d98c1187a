// Integer l1 (AdderNet) GEMM and conv2d on CPU:  S[p, o] = sum_k |x[g(o), p, k] - w_mult * w[o, k]|,
// Y = -delta[o] * S + bias[o]. Schemas and semantics: kernels/register.cpp and quantkit/ops/adder.py.
//
// Design (docs/kernels.md#cpu-adder-micro-kernel):
// * One indirect-GEMM driver serves both ops: the linear op is a 1x1 convolution over M "pixels". Activations are
//   converted once per call to channels-last rows of unsigned bytes [G][rows + 1][Cp] (Cp = C rounded up to 8); the
//   extra row per group is the zero-padding row (q_x = 0). A per-(pixel, tap) table of row offsets replaces im2col.
// * Common unsigned grid: with [lo, hi] the range of the activations (and 0 when the conv pads), every weight is
//   clamped into [lo, hi] and the exact correction dist(w, [lo, hi]) summed per channel is added to S:
//   |x - w| = |x - clamp(w, lo, hi)| + dist(w, [lo, hi]) for every lo <= x <= hi. Both operands are then stored as
//   (v - lo) in u8 when hi - lo <= 255 (all 2-8-bit forms, including the 8-bit code form |q_x - 2 q_w|), else u16.
// * Weights are packed (once by adder_prepack, or per call by the integer-input ops) as
//   [Cout/16][tap][Cp/8][16 channels][8 bytes], channels sorted by group so that a 16-channel block reads (mostly)
//   one group's activation rows; results are scattered back to the original channel order in the epilogue.
//   2-bit grids may use the thermometer form of a tap row (Form below): XOR + popcount instead of the byte SAD.
// * AVX-512BW micro-kernel: 8 pixels x 16 channels, broadcast 8 activation bytes per pixel, VPSADBW (or VPXORQ +
//   VPOPCNTQ) against two weight registers (8 channels x 8 bytes each), VPADDQ into 16 accumulators. AVX2: the same
//   with ymm on 4 pixels x 8 channels at a time. Portable: plain loops (also the u16 path).
// * ISA: runtime dispatch AVX-512 -> AVX2 -> portable via cpu/cpu_features.h (QUANTKIT_CPU_ISA lowers it). Threads: at::parallel_for over (channel block, pixel block) tiles.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "conv_shape.h"
#include "cpu/cpu_features.h"
#include "cpu/memory.h"

// GCC 12 reports false "may be used uninitialized" inside its own AVX-512 intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace quantkit {
namespace adder {
namespace {

using cpu::Isa;
constexpr Isa kPortable = Isa::Portable, kAvx2 = Isa::Avx2, kAvx512 = Isa::Avx512;

constexpr int kNR = 16;  // output channels per packed block
constexpr int kKB = 8;   // bytes per channel per packed step (one u64 lane of VPSADBW / VPOPCNTQ)

// Two forms of a packed tap row (weights and activations alike), chosen by adder_prepack:
// * bytes: one value per byte, channel c at byte c, Cp = C rounded up to 8; |x - w| by VPSADBW.
// * thermometer (grids of at most 4 values, i.e. 2-bit codes): value v in [0, 3] as the 3-bit code T(v) = 2^v - 1,
//   so |a - b| = popcount(T(a) xor T(b)). Five codes share a 16-bit lane (bits 3f .. 3f + 2 hold field f): with
//   L = ceil(C / 5) lanes, channel c sits in lane c % L, field c / L (each field is a contiguous run of channels, so
//   the quantizer fills a field with one vector op per 32 lanes). Lanes are padded to a multiple of 4 (one u64 word
//   = 4 lanes = 20 values), Cp = 8 * ceil(L / 4) bytes; padding is T(0) = 0 on both sides and adds nothing.
enum Form : int64_t { kFormBytes = 0, kFormThermo = 1 };

inline int64_t thermo_lanes(int64_t C) { return (C + 4) / 5; }
// elements per tap row: bytes for u8 storage (both forms), u16 values in the bytes form's layout otherwise
inline int64_t row_elems(int64_t form, int64_t C) {
  return form == kFormThermo ? (thermo_lanes(C) + 3) / 4 * kKB : (C + kKB - 1) / kKB * kKB;
}
inline uint16_t thermo_code(int64_t v) { return static_cast<uint16_t>((1u << v) - 1u); }

// ------------------------------------------------------------------------------------------------------------
// Problem description shared by the micro-kernels
// ------------------------------------------------------------------------------------------------------------
// Which groups feed the lanes of one 8-channel half (AVX-512) or 4-channel quarter (AVX2) of a block: the first
// entry is broadcast to every lane, later entries overwrite their lanes (mask).
struct LaneGroups {
  int count = 0;
  int group[kNR];
  uint32_t mask[kNR];
};

struct BlockInfo {
  bool uniform;        // all 16 lanes read one group
  int group0;          // that group (or lane 0's)
  bool contiguous;     // the valid lanes map to consecutive original channels
  int valid;           // real channels in the block (<= 16)
  LaneGroups half[2];  // AVX-512: lanes 0-7 and 8-15
  LaneGroups quarter[4];
};

template <typename E>
struct Problem {
  int64_t P = 0;       // output pixels (rows)
  int64_t T = 0;       // taps
  int64_t Cp = 0;      // bytes per tap row (multiple of kKB; see Form)
  bool thermo = false; // tap rows in the thermometer form (popcount of xor instead of the byte SAD)
  int64_t gstride = 0; // elements between two groups' activation buffers
  int64_t NB = 0;      // 16-channel blocks
  int64_t ldo = 0;     // output row stride (= number of output channels)
  const E* A = nullptr;          // activations [G][rows + 1][Cp]
  const int64_t* off = nullptr;  // [pixels][T] element offsets of tap rows inside a group buffer, from pixel off_first
  int64_t off_first = 0;
  const E* W = nullptr;          // packed weights [NB][T][Cp / 8][16][8]
  const BlockInfo* blocks = nullptr;
  const int32_t* perm = nullptr; // [NB * 16] original channel of each sorted lane (-1: padding)
  const int32_t* corr = nullptr; // [NB * 16] exact clamp correction per sorted lane
  const float* nd = nullptr;     // [NB * 16] -delta per sorted lane (float output) or nullptr (int output)
  const float* bias = nullptr;   // [NB * 16] or nullptr
  float* outf = nullptr;
  int32_t* outi = nullptr;
  // Fused block epilogue (float output only): y += res[row, o] (rows of ldo floats), then y = relu(y) -- the
  // residual block's "out += identity; relu(out)" while the tile is in registers.
  const float* res = nullptr;
  bool relu = false;
  // AVX-512 row kernel: weights to prefetch into the cache while this micro-tile runs (the next block's, when all
  // blocks' weights do not stay in L2), or nullptr
  const E* W_next = nullptr;
  int64_t pf_line0 = 0, pf_lines = 0;  // this micro-tile prefetches line pf_line0 + (its step) of W_next, < pf_lines
};

// relu as torch computes it: NaN and -0.0 pass through (max(0, y) returns y unless 0 > y).
inline float relu_like_torch(float y) { return 0.f > y ? 0.f : y; }

// Store one row of 16 sorted-lane sums (without the correction) through the epilogue.
template <typename E>
inline void store_row_scalar(const Problem<E>& pb, int64_t blk, int64_t row, const int32_t* s) {
  const BlockInfo& bi = pb.blocks[blk];
  const int64_t base = blk * kNR;
  for (int j = 0; j < bi.valid; ++j) {
    const int64_t o = pb.perm[base + j];
    const int32_t v = s[j] + pb.corr[base + j];
    if (pb.outf != nullptr) {
      const float b = pb.bias != nullptr ? pb.bias[base + j] : 0.f;
      // a product, then a sum (two roundings, no FMA): the simulated layer's -delta * S + bias in PyTorch, bit for bit
      float y = pb.nd[base + j] * static_cast<float>(v) + b;
      if (pb.res != nullptr) y += pb.res[row * pb.ldo + o];
      if (pb.relu) y = relu_like_torch(y);
      pb.outf[row * pb.ldo + o] = y;
    } else {
      pb.outi[row * pb.ldo + o] = v;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Portable micro-kernel (any element type; also the u16 path)
// ------------------------------------------------------------------------------------------------------------
template <typename E, bool kThermo>
inline __attribute__((always_inline)) void tile_portable_body(const Problem<E>& pb, int64_t blk, int64_t p0,
                                                              int nrows) {
  constexpr int MR = 4;
  const BlockInfo& bi = pb.blocks[blk];
  int lane_group[kNR];
  for (int h = 0; h < 2; ++h) {
    const LaneGroups& lg = bi.half[h];
    for (int e = 0; e < lg.count; ++e)
      for (int l = 0; l < 8; ++l)
        if (e == 0 || (lg.mask[e] >> l & 1u)) lane_group[h * 8 + l] = lg.group[e];
  }
  for (int r0 = 0; r0 < nrows; r0 += MR) {
    const int nr = std::min(MR, nrows - r0);
    int32_t acc[MR][kNR] = {};
    for (int64_t t = 0; t < pb.T; ++t) {
      const E* w = pb.W + (blk * pb.T + t) * pb.Cp * kNR;
      for (int r = 0; r < nr; ++r) {
        const int64_t o = pb.off[(p0 + r0 + r - pb.off_first) * pb.T + t];
        for (int j = 0; j < kNR; ++j) {
          const E* a = pb.A + lane_group[j] * pb.gstride + o;
          int32_t sum = 0;
          for (int64_t c8 = 0; c8 < pb.Cp / kKB; ++c8) {
            const E* wv = w + (c8 * kNR + j) * kKB;
            const E* av = a + c8 * kKB;
            if constexpr (kThermo) {
              uint64_t xa, xw;
              std::memcpy(&xa, av, 8);
              std::memcpy(&xw, wv, 8);
              sum += __builtin_popcountll(xa ^ xw);
            } else {
              for (int b = 0; b < kKB; ++b) {
                const int32_t d = static_cast<int32_t>(av[b]) - static_cast<int32_t>(wv[b]);
                sum += d < 0 ? -d : d;
              }
            }
          }
          acc[r][j] += sum;
        }
      }
    }
    for (int r = 0; r < nr; ++r) store_row_scalar(pb, blk, p0 + r0 + r, acc[r]);
  }
}

template <typename E>
void tile_portable(const Problem<E>& pb, int64_t blk, int64_t p0, int nrows) {
  if constexpr (sizeof(E) == 1) {
    if (pb.thermo) return tile_portable_body<E, true>(pb, blk, p0, nrows);
  }
  tile_portable_body<E, false>(pb, blk, p0, nrows);
}

// Thermometer rows at the AVX2 level: the portable loop compiled with POPCNT (AVX2 has no vector popcount; this
// path is for correctness on such CPUs -- adder_prepack's "auto" form picks bytes there).
QK_TARGET_AVX2 void tile_avx2_thermo(const Problem<uint8_t>& pb, int64_t blk, int64_t p0, int nrows) {
  tile_portable_body<uint8_t, true>(pb, blk, p0, nrows);
}

// ------------------------------------------------------------------------------------------------------------
// AVX2 micro-kernel: 4 pixels x 8 channels per pass (two passes per 16-channel block), u8 only
// ------------------------------------------------------------------------------------------------------------
QK_TARGET_AVX2 inline __m256i bcast8_avx2(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return _mm256_set1_epi64x(v);
}

QK_TARGET_AVX2 inline __m256i lane_mask_avx2(uint32_t m) {
  return _mm256_set_epi64x((m & 8u) ? -1 : 0, (m & 4u) ? -1 : 0, (m & 2u) ? -1 : 0, (m & 1u) ? -1 : 0);
}

QK_TARGET_AVX2 void tile_avx2(const Problem<uint8_t>& pb, int64_t blk, int64_t p0, int nrows) {
  constexpr int MR = 4;
  const BlockInfo& bi = pb.blocks[blk];
  const int64_t steps = pb.Cp / kKB;
  for (int r0 = 0; r0 < nrows; r0 += MR) {
    const int nr = std::min(MR, nrows - r0);
    alignas(32) int32_t out[MR][kNR];
    for (int h = 0; h < 2; ++h) {
      const LaneGroups& q0 = bi.quarter[2 * h];
      const LaneGroups& q1 = bi.quarter[2 * h + 1];
      const bool simple = bi.uniform || (q0.count == 1 && q1.count == 1 && q0.group[0] == q1.group[0]);
      __m256i acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (int64_t t = 0; t < pb.T; ++t) {
        int64_t o[MR];
        for (int r = 0; r < MR; ++r) o[r] = pb.off[(p0 + r0 + std::min(r, nr - 1) - pb.off_first) * pb.T + t];
        const uint8_t* w = pb.W + (blk * pb.T + t) * pb.Cp * kNR + h * 8 * kKB;
        if (simple) {
          const uint8_t* a = pb.A + q0.group[0] * pb.gstride;
          for (int64_t c8 = 0; c8 < steps; ++c8, w += kNR * kKB) {
            const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
            const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
            for (int r = 0; r < MR; ++r) {
              const __m256i x = bcast8_avx2(a + o[r] + c8 * kKB);
              acc[r][0] = _mm256_add_epi64(acc[r][0], _mm256_sad_epu8(x, w0));
              acc[r][1] = _mm256_add_epi64(acc[r][1], _mm256_sad_epu8(x, w1));
            }
          }
        } else if (q0.count == 1 && q1.count == 1) {  // each quarter reads one group: two broadcasts, no blend
          const uint8_t* a0 = pb.A + q0.group[0] * pb.gstride;
          const uint8_t* a1 = pb.A + q1.group[0] * pb.gstride;
          for (int64_t c8 = 0; c8 < steps; ++c8, w += kNR * kKB) {
            const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
            const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
            for (int r = 0; r < MR; ++r) {
              const int64_t k = o[r] + c8 * kKB;
              acc[r][0] = _mm256_add_epi64(acc[r][0], _mm256_sad_epu8(bcast8_avx2(a0 + k), w0));
              acc[r][1] = _mm256_add_epi64(acc[r][1], _mm256_sad_epu8(bcast8_avx2(a1 + k), w1));
            }
          }
        } else {
          // lanes of several groups: blend the groups' broadcasts, with the lane masks and group rows made once
          // per block instead of per element
          const uint8_t* a0[4];
          const uint8_t* a1[4];
          __m256i m0[4], m1[4];
          for (int e = 0; e < q0.count; ++e) a0[e] = pb.A + q0.group[e] * pb.gstride, m0[e] = lane_mask_avx2(q0.mask[e]);
          for (int e = 0; e < q1.count; ++e) a1[e] = pb.A + q1.group[e] * pb.gstride, m1[e] = lane_mask_avx2(q1.mask[e]);
          for (int64_t c8 = 0; c8 < steps; ++c8, w += kNR * kKB) {
            const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
            const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
            for (int r = 0; r < MR; ++r) {
              const int64_t k = o[r] + c8 * kKB;
              __m256i x0 = bcast8_avx2(a0[0] + k);
              for (int e = 1; e < q0.count; ++e) x0 = _mm256_blendv_epi8(x0, bcast8_avx2(a0[e] + k), m0[e]);
              __m256i x1 = bcast8_avx2(a1[0] + k);
              for (int e = 1; e < q1.count; ++e) x1 = _mm256_blendv_epi8(x1, bcast8_avx2(a1[e] + k), m1[e]);
              acc[r][0] = _mm256_add_epi64(acc[r][0], _mm256_sad_epu8(x0, w0));
              acc[r][1] = _mm256_add_epi64(acc[r][1], _mm256_sad_epu8(x1, w1));
            }
          }
        }
      }
      for (int r = 0; r < MR; ++r) {
        alignas(32) int64_t tmp[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[r][0]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 4), acc[r][1]);
        for (int l = 0; l < 8; ++l) out[r][h * 8 + l] = static_cast<int32_t>(tmp[l]);
      }
    }
    for (int r = 0; r < nr; ++r) store_row_scalar(pb, blk, p0 + r0 + r, out[r]);
  }
}

// ------------------------------------------------------------------------------------------------------------
// AVX-512BW micro-kernel: 8 pixels x 16 channels, u8
// ------------------------------------------------------------------------------------------------------------
QK_TARGET_AVX512 inline __m512i bcast8_avx512(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return _mm512_set1_epi64(v);
}

QK_TARGET_AVX512 inline __m512i build_half(const Problem<uint8_t>& pb,
                                                                      const LaneGroups& lg, int64_t k) {
  __m512i x = bcast8_avx512(pb.A + lg.group[0] * pb.gstride + k);
  for (int e = 1; e < lg.count; ++e) {
    int64_t v;
    std::memcpy(&v, pb.A + lg.group[e] * pb.gstride + k, 8);
    x = _mm512_mask_set1_epi64(x, static_cast<__mmask8>(lg.mask[e]), v);
  }
  return x;
}

// Epilogue of 8 rows: sums in sorted lanes -> corrected int32 / float, vector store when the block's channels are
// consecutive in the output, scatter otherwise.
QK_TARGET_AVX512 inline void store_rows_avx512(const Problem<uint8_t>& pb, int64_t blk,
                                                                          int64_t p0, int nrows, const __m512i* acc0,
                                                                          const __m512i* acc1) {
  const BlockInfo& bi = pb.blocks[blk];
  const int64_t base = blk * kNR;
  const __mmask16 valid = static_cast<__mmask16>((1u << bi.valid) - 1u);
  const __m512i corr = _mm512_loadu_si512(pb.corr + base);
  const __m512i idx = _mm512_loadu_si512(pb.perm + base);
  const int64_t first = pb.perm[base];
  __m512 nd = _mm512_setzero_ps(), bias = _mm512_setzero_ps();
  if (pb.outf != nullptr) {
    nd = _mm512_loadu_ps(pb.nd + base);
    if (pb.bias != nullptr) bias = _mm512_loadu_ps(pb.bias + base);
  }
  for (int r = 0; r < nrows; ++r) {
    const __m256i lo = _mm512_cvtepi64_epi32(acc0[r]);
    const __m256i hi = _mm512_cvtepi64_epi32(acc1[r]);
    const __m512i s = _mm512_add_epi32(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), corr);
    const int64_t row = p0 + r;
    if (pb.outf != nullptr) {
      // product then sum, no FMA (-ffp-contract=off keeps them apart): bit-equal to the simulated layer's epilogue
      __m512 y = _mm512_add_ps(_mm512_mul_ps(nd, _mm512_cvtepi32_ps(s)), bias);
      float* dst = pb.outf + row * pb.ldo;
      if (pb.res != nullptr) {
        const float* rrow = pb.res + row * pb.ldo;
        y = _mm512_add_ps(y, bi.contiguous ? _mm512_maskz_loadu_ps(valid, rrow + first)
                                           : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, rrow, 4));
      }
      if (pb.relu) y = _mm512_max_ps(_mm512_setzero_ps(), y);  // (0 > y) ? 0 : y, as relu_like_torch
      if (bi.contiguous) {
        _mm512_mask_storeu_ps(dst + first, valid, y);
      } else {
        _mm512_mask_i32scatter_ps(dst, valid, idx, y, 4);
      }
    } else {
      int32_t* dst = pb.outi + row * pb.ldo;
      if (bi.contiguous) {
        _mm512_mask_storeu_epi32(dst + first, valid, s);
      } else {
        _mm512_mask_i32scatter_epi32(dst, valid, idx, s, 4);
      }
    }
  }
}

// One micro-tile of MR rows (nrows <= MR valid; the others repeat the last valid row and are not stored).
// kMerge0 / kMerge1: whether 8-lane half 0 / 1 reads two groups (a broadcast of the first group, then a masked
// broadcast over the second group's lanes) -- at a group boundary of the sorted channels only the half that contains
// the boundary pays for the merge: the masked merge is an ALU uop competing with VPSADBW / VPADDQ, while a plain
// broadcast is a load and costs nothing next to them (measured on Zen 5: a merge in both halves of every row ran at
// 0.58x the plain loop, two plain broadcasts per row at 1.0x). kUniform: all 16 lanes read one group (one broadcast
// per row; in the full kernel a second one cost ~10%). kGeneric: a half reads more than two groups (a loop).
// |x - w| summed per u64 lane: VPSADBW on bytes, VPOPCNTQ(x xor w) on thermometer codes.
template <bool kThermo>
QK_TARGET_AVX512 inline __m512i lane_l1(__m512i x, __m512i w) {
  if constexpr (kThermo) {
    return _mm512_popcnt_epi64(_mm512_xor_si512(x, w));
  } else {
    return _mm512_sad_epu8(x, w);
  }
}

template <int MR, bool kThermo, bool kUniform, bool kMerge0, bool kMerge1, bool kGeneric>
QK_TARGET_AVX512 void tile_avx512_impl(const Problem<uint8_t>& pb, int64_t blk, int64_t p0, int nrows) {
  const BlockInfo& bi = pb.blocks[blk];
  const int64_t steps = pb.Cp / kKB;
  // first and second group of each half and the second group's lane mask
  const uint8_t* hb[2][2];
  __mmask8 hm[2];
  for (int h = 0; h < 2; ++h) {
    const LaneGroups& lg = bi.half[h];
    hb[h][0] = pb.A + lg.group[0] * pb.gstride;
    hb[h][1] = pb.A + lg.group[lg.count > 1 ? 1 : 0] * pb.gstride;
    hm[h] = static_cast<__mmask8>(lg.count > 1 ? lg.mask[1] : 0u);
  }
  __m512i acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_si512();
  for (int64_t t = 0; t < pb.T; ++t) {
    const int64_t* offs = pb.off + t;
    int64_t o[MR];
    for (int r = 0; r < MR; ++r) o[r] = offs[(p0 + std::min(r, nrows - 1) - pb.off_first) * pb.T];
    const uint8_t* w = pb.W + (blk * pb.T + t) * pb.Cp * kNR;
    // one line of the next block's weights per step: with the micro-tile's first line pf_line0, two full
    // micro-tiles cover the block (it has two lines per step of one micro-tile)
    const int64_t pf_line = pb.pf_line0 + t * steps;
    const uint8_t* w_next = pb.W_next != nullptr && pf_line < pb.pf_lines ? pb.W_next + pf_line * 64 : nullptr;
    const int64_t pf_steps = w_next != nullptr ? std::min(steps, pb.pf_lines - pf_line) : 0;
    if (!kGeneric) {
      // One pointer per row plus three group distances: opaque row pointers keep the compiler from turning the
      // 4 x MR addresses into induction variables (which spilled the accumulators).
      const uint8_t* a[MR];
      for (int r = 0; r < MR; ++r) a[r] = hb[0][0] + o[r];
      const int64_t d01 = hb[0][1] - hb[0][0], d10 = hb[1][0] - hb[0][0], d11 = hb[1][1] - hb[0][0];
      for (int64_t c8 = 0; c8 < steps; ++c8, w += kNR * kKB) {
        const __m512i w0 = _mm512_loadu_si512(w);
        const __m512i w1 = _mm512_loadu_si512(w + 64);
        if (c8 < pf_steps) __builtin_prefetch(w_next + c8 * 64, 0, 2);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const uint8_t* pr = a[r] + c8 * kKB;
          if (!kUniform) __asm__("" : "+r"(pr));  // (uniform: one address per row, nothing to keep apart)
          __m512i x0 = bcast8_avx512(pr);
          __m512i x1 = kUniform ? x0 : bcast8_avx512(pr + d10);
          if (kMerge0) {
            int64_t v;
            std::memcpy(&v, pr + d01, 8);
            x0 = _mm512_mask_set1_epi64(x0, hm[0], v);
          }
          if (kMerge1) {
            int64_t v;
            std::memcpy(&v, pr + d11, 8);
            x1 = _mm512_mask_set1_epi64(x1, hm[1], v);
          }
          acc0[r] = _mm512_add_epi64(acc0[r], lane_l1<kThermo>(x0, w0));
          acc1[r] = _mm512_add_epi64(acc1[r], lane_l1<kThermo>(x1, w1));
        }
      }
    } else {
      for (int64_t c8 = 0; c8 < steps; ++c8, w += kNR * kKB) {
        const __m512i w0 = _mm512_loadu_si512(w);
        const __m512i w1 = _mm512_loadu_si512(w + 64);
        if (c8 < pf_steps) __builtin_prefetch(w_next + c8 * 64, 0, 2);
        for (int r = 0; r < MR; ++r) {
          const int64_t k = o[r] + c8 * kKB;
          acc0[r] = _mm512_add_epi64(acc0[r], lane_l1<kThermo>(build_half(pb, bi.half[0], k), w0));
          acc1[r] = _mm512_add_epi64(acc1[r], lane_l1<kThermo>(build_half(pb, bi.half[1], k), w1));
        }
      }
    }
  }
  // Copies: passing the accumulator arrays themselves by pointer kept them in memory in the inner loop.
  __m512i out0[8], out1[8];
  for (int r = 0; r < MR; ++r) {
    out0[r] = acc0[r];
    out1[r] = acc1[r];
  }
  store_rows_avx512(pb, blk, p0, nrows, out0, out1);
}

template <int MR, bool kThermo>
QK_TARGET_AVX512 void tile_avx512_rows(const Problem<uint8_t>& pb, int64_t blk, int64_t p0, int nrows) {
  const BlockInfo& bi = pb.blocks[blk];
  const int c0 = bi.half[0].count, c1 = bi.half[1].count;
  if (bi.uniform) {
    tile_avx512_impl<MR, kThermo, true, false, false, false>(pb, blk, p0, nrows);
  } else if (c0 > 2 || c1 > 2) {
    tile_avx512_impl<MR, kThermo, false, false, false, true>(pb, blk, p0, nrows);
  } else if (c0 == 2 && c1 == 2) {
    tile_avx512_impl<MR, kThermo, false, true, true, false>(pb, blk, p0, nrows);
  } else if (c0 == 2) {
    tile_avx512_impl<MR, kThermo, false, true, false, false>(pb, blk, p0, nrows);
  } else if (c1 == 2) {
    tile_avx512_impl<MR, kThermo, false, false, true, false>(pb, blk, p0, nrows);
  } else {
    tile_avx512_impl<MR, kThermo, false, false, false, false>(pb, blk, p0, nrows);
  }
}

// Packed weights larger than this are assumed not to stay in L2 across the panels of a call (nor across calls).
constexpr int64_t kWeightsInL2 = 768 * 1024;

// A panel of rows: micro-tiles of 8 rows, then the remainder as tiles of 4, 2 and 1 rows (a 49-row panel -- one
// 7x7 image -- is 6 x 8 + 1 instead of 7 x 8 rows of work: a micro-tile costs its MR rows whether they are valid
// or not).
template <bool kThermo>
void tile_avx512_panel(const Problem<uint8_t>& pb, int64_t blk, int64_t p0, int nrows) {
  int r = 0;
  const int64_t block_bytes = pb.T * pb.Cp * kNR;
  if (pb.NB > 1 && pb.NB * block_bytes > kWeightsInL2 && nrows >= 8) {
    // The weights stream from memory (or L3) once per panel: while this block runs, its first two full
    // micro-tiles prefetch the next block's weights (the next tile's in run_tiles' order), one line per step, so
    // that block does not start on cold weights. Measured on Sapphire Rapids: 512 channels at 7x7 with the weights
    // evicted before each call (as in a network) ran 9-15% faster at batch 1 (1 thread), 2% at batch 16.
    Problem<uint8_t> pf = pb;
    pf.W_next = pb.W + ((blk + 1) % pb.NB) * block_bytes;
    pf.pf_lines = block_bytes / 64;
    for (; r + 8 <= nrows; r += 8) {
      pf.pf_line0 = (r / 8) * pb.T * (pb.Cp / kKB);
      tile_avx512_rows<8, kThermo>(pf, blk, p0 + r, 8);
    }
  }
  for (; r + 8 <= nrows; r += 8) tile_avx512_rows<8, kThermo>(pb, blk, p0 + r, 8);
  if (nrows - r >= 4) {
    tile_avx512_rows<4, kThermo>(pb, blk, p0 + r, 4);
    r += 4;
  }
  if (nrows - r >= 2) {
    tile_avx512_rows<2, kThermo>(pb, blk, p0 + r, 2);
    r += 2;
  }
  if (nrows - r >= 1) tile_avx512_rows<1, kThermo>(pb, blk, p0 + r, 1);
}

// ------------------------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------------------------
struct ConvGeom {
  int64_t G, N, C, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// Element offsets (inside a group buffer) of the T tap rows read by each of the nrows output pixels from p0 on (the
// zero-padding row for taps outside the image), stepping (n, oy, ox) instead of dividing per pixel (three 64-bit
// divisions per pixel had cost ~10% of a 64-channel conv).
inline void panel_offsets(const ConvGeom& gm, int64_t Cp, int64_t p0, int64_t nrows, int64_t T, int64_t* off) {
  const int64_t rows = gm.N * gm.H * gm.W;
  int64_t n = p0 / (gm.Ho * gm.Wo), oy = (p0 / gm.Wo) % gm.Ho, ox = p0 % gm.Wo;
  for (int64_t r = 0; r < nrows; ++r, off += T) {
    for (int64_t i = 0; i < gm.kh; ++i) {
      const int64_t iy = oy * gm.sh - gm.ph + i * gm.dh;
      const bool row_inside = iy >= 0 && iy < gm.H;
      const int64_t row_base = (n * gm.H + iy) * gm.W;
      for (int64_t j = 0; j < gm.kw; ++j) {
        const int64_t ix = ox * gm.sw - gm.pw + j * gm.dw;
        off[i * gm.kw + j] = (row_inside && ix >= 0 && ix < gm.W ? row_base + ix : rows) * Cp;
      }
    }
    if (++ox == gm.Wo) {
      ox = 0;
      if (++oy == gm.Ho) {
        oy = 0;
        ++n;
      }
    }
  }
}

template <typename E, typename TileFn>
void run_tiles(const Problem<E>& pb, const ConvGeom& gm, int64_t rows_per_tile, TileFn tile) {
  const int64_t nrb = (pb.P + rows_per_tile - 1) / rows_per_tile;
  const int64_t tiles = nrb * pb.NB;
  // Pixel-panel-major order: a panel's activation rows (all groups) stay in L1/L2 while every weight block passes
  // over them, so the activations are read from memory once (the packed weights are small and stay in L2). The
  // indirection table is built per panel (rows_per_tile x T offsets, L1-resident) instead of once for all pixels.
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> panel_off(rows_per_tile * pb.T);
    Problem<E> local = pb;
    local.off = panel_off.data();
    local.off_first = -1;
    for (int64_t tix = begin; tix < end; ++tix) {
      const int64_t blk = tix % pb.NB;
      const int64_t p0 = (tix / pb.NB) * rows_per_tile;
      const int64_t nrows = std::min(rows_per_tile, pb.P - p0);
      if (local.off_first != p0) {
        panel_offsets(gm, pb.Cp, p0, nrows, pb.T, panel_off.data());
        local.off_first = p0;
      }
      tile(local, blk, p0, static_cast<int>(nrows));
    }
  });
}

std::vector<BlockInfo> make_blocks(const std::vector<int32_t>& lane_group, const std::vector<int32_t>& perm,
                                   int64_t NB, int64_t Cout) {
  std::vector<BlockInfo> blocks(NB);
  for (int64_t b = 0; b < NB; ++b) {
    BlockInfo& bi = blocks[b];
    const int64_t base = b * kNR;
    bi.valid = static_cast<int>(std::min<int64_t>(kNR, Cout - base));
    bi.group0 = lane_group[base];
    bi.uniform = true;
    bi.contiguous = true;
    for (int j = 0; j < kNR; ++j) {
      if (lane_group[base + j] != bi.group0) bi.uniform = false;
      if (j < bi.valid && perm[base + j] != perm[base] + j) bi.contiguous = false;
    }
    auto fill = [&](LaneGroups& lg, int first, int width) {
      lg.count = 0;
      for (int l = 0; l < width; ++l) {
        const int g = lane_group[base + first + l];
        int e = 0;
        while (e < lg.count && lg.group[e] != g) ++e;
        if (e == lg.count) {
          lg.group[e] = g;
          lg.mask[e] = 0;
          ++lg.count;
        }
        lg.mask[e] |= 1u << l;
      }
    };
    fill(bi.half[0], 0, 8);
    fill(bi.half[1], 8, 8);
    for (int q = 0; q < 4; ++q) fill(bi.quarter[q], 4 * q, 4);
  }
  return blocks;
}

// ------------------------------------------------------------------------------------------------------------
// Packed weights: made once by the prepack op (deploy layers keep them as buffers), or per call by the ops that
// take raw integer weights. Two tensors:
//   wbuf  [NB][T][Cp/8][16][8] values clamp(w_mult * w, lo, hi) - lo (u8, or u16 stored as int16), stored flat;
//         each channel's tap row in the bytes or the thermometer form (Form; thermometer: u8 storage only)
//   meta  int32 [4][L], L = max(NB * 16, kHeaderLen): row 0 original channel of each sorted lane, row 1 its group,
//         row 2 the exact clamp correction, row 3 a header (grid, form, shape; see Header) the ops validate.
// ------------------------------------------------------------------------------------------------------------
enum MetaRow : int64_t { kRowPerm = 0, kRowGroup = 1, kRowCorr = 2, kRowHeader = 3, kMetaRows = 4 };
// kHForm came last: packings made before it have 0 there, the bytes form they are in.
enum Header : int64_t { kHLo = 0, kHHi, kHWmult, kHWabs, kHCout, kHC, kHKh, kHKw, kHEsize, kHGroups, kHForm, kHeaderLen };

struct PackedView {
  const void* W = nullptr;
  const int32_t* perm = nullptr;
  const int32_t* corr = nullptr;
  std::vector<BlockInfo> blocks;
  int64_t lo = 0, hi = 0, w_mult = 1, wabs_max = 0, Cout = 0, C = 0, kh = 1, kw = 1, esize = 1, groups = 1;
  int64_t form = kFormBytes, Cp = 0;  // tap-row form and elements per tap row
};

template <typename E>
std::vector<at::Tensor> pack_weights(const at::Tensor& wq, const at::Tensor& group_index, int64_t w_mult, int64_t lo,
                                     int64_t hi, int64_t form = kFormBytes) {
  static_assert(sizeof(E) <= 2, "u8 or u16 values");
  TORCH_INTERNAL_ASSERT(form == kFormBytes || (sizeof(E) == 1 && hi - lo <= 3));
  const int64_t Cout = wq.size(0), C = wq.size(1), kh = wq.size(2), kw = wq.size(3);
  const int64_t T = kh * kw;
  const int64_t Cp = row_elems(form, C);
  const int64_t lanes = thermo_lanes(C);
  const int64_t NB = (Cout + kNR - 1) / kNR;
  const int64_t L = std::max<int64_t>(NB * kNR, kHeaderLen);
  const auto e_dtype = sizeof(E) == 1 ? at::kByte : at::kShort;
  std::vector<int64_t> gidx(Cout);
  if (Cout > 0) {
    at::Tensor gi = group_index.to(at::kLong).contiguous();
    std::memcpy(gidx.data(), gi.data_ptr<int64_t>(), Cout * sizeof(int64_t));
  }
  // Channels sorted by group (stable), so a 16-channel block mostly reads one group.
  std::vector<int32_t> order(Cout);
  for (int64_t o = 0; o < Cout; ++o) order[o] = static_cast<int32_t>(o);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return gidx[a] < gidx[b]; });
  at::Tensor meta = at::zeros({kMetaRows, L}, wq.options().dtype(at::kInt));
  int32_t* perm = meta[kRowPerm].data_ptr<int32_t>();
  int32_t* lane_group = meta[kRowGroup].data_ptr<int32_t>();
  int32_t* corr = meta[kRowCorr].data_ptr<int32_t>();
  int32_t* header = meta[kRowHeader].data_ptr<int32_t>();
  int64_t gmax = 0;
  for (int64_t j = 0; j < NB * kNR; ++j) {
    const int64_t o = order[std::min<int64_t>(j, Cout - 1)];
    perm[j] = j < Cout ? static_cast<int32_t>(o) : 0;
    lane_group[j] = static_cast<int32_t>(gidx[o]);
    gmax = std::max(gmax, gidx[o]);
  }

  // |w_mult * w| must stay in int32 (so the clamp arithmetic below and the sum bound of the run cannot overflow).
  int64_t wabs_max = 0;
  if (wq.numel() > 0) {
    auto mm = at::aminmax(wq);
    const int64_t wmin = std::get<0>(mm).item<int64_t>(), wmax = std::get<1>(mm).item<int64_t>();
    constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();
    TORCH_CHECK(wmin >= -kI32Max / w_mult && wmax <= kI32Max / w_mult, "adder: the weights span [", wmin, ", ", wmax,
                "]; with w_mult=", w_mult, " they leave the int32 range, so their l1 sums cannot be represented in "
                "int32 (integer l1 kernels are for 2-8-bit operands)");
    wabs_max = std::max(-wmin, wmax) * w_mult;
  }

  // Weights: clamp into [lo, hi] (exact correction), shift by -lo, pack [NB][T][Cp/8][16][8].
  // flat (1-D): Module.to(memory_format=...) leaves it alone
  at::Tensor wbuf = at::zeros({NB * T * (Cp / kKB) * kNR * kKB}, wq.options().dtype(e_dtype));
  E* Wp = reinterpret_cast<E*>(wbuf.data_ptr());
  const at::Tensor wc = wq.contiguous();  // (Cout, C, kh, kw)
  bool corr_overflow = false;
  AT_DISPATCH_INTEGRAL_TYPES(wc.scalar_type(), "adder_pack_weights", [&] {
    const scalar_t* wsrc = wc.data_ptr<scalar_t>();
    const int64_t wm = w_mult, wlo = lo, whi = hi;
    std::atomic<bool> overflow{false};
    at::parallel_for(0, Cout, 16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t o = perm[j];
        E* __restrict__ dst_blk = Wp + (j / kNR) * T * Cp * kNR + (j % kNR) * kKB;
        const scalar_t* __restrict__ src = wsrc + o * C * T;
        int64_t cj = 0;
        for (int64_t t = 0; t < T; ++t) {
          E* __restrict__ dst = dst_blk + t * Cp * kNR;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t v = static_cast<int64_t>(src[c * T + t]) * wm;
            const int64_t cl = std::min(std::max(v, wlo), whi);
            cj += v > cl ? v - cl : cl - v;
            if (form == kFormThermo) {
              // lane m = c % lanes of word m / 4 (bytes 2 (m % 4) .. + 1 of the channel's 8-byte slot), field c / lanes
              const int64_t m = c % lanes;
              uint8_t* lane = reinterpret_cast<uint8_t*>(dst) + (m / 4) * kNR * kKB + 2 * (m % 4);
              uint16_t bits;
              std::memcpy(&bits, lane, 2);
              bits = static_cast<uint16_t>(bits | thermo_code(cl - wlo) << (3 * (c / lanes)));
              std::memcpy(lane, &bits, 2);
            } else {
              dst[(c / kKB) * kNR * kKB + c % kKB] = static_cast<E>(cl - wlo);
            }
          }
        }
        if (cj > std::numeric_limits<int32_t>::max()) overflow = true;
        corr[j] = static_cast<int32_t>(cj);
      }
    });
    if (overflow) corr_overflow = true;
  });
  TORCH_CHECK(!corr_overflow, "adder: a weight clamp correction overflows int32; the operands are far outside 2-8 bits");
  const int64_t hdr[kHeaderLen] = {lo, hi, w_mult, wabs_max, Cout, C, kh, kw, static_cast<int64_t>(sizeof(E)),
                                   gmax + 1, form};
  for (int64_t i = 0; i < kHeaderLen; ++i) header[i] = static_cast<int32_t>(hdr[i]);
  return {wbuf, meta};
}

// Validate a (wbuf, meta) pair and view it (block descriptors are rebuilt from the sorted lanes: O(Cout)).
PackedView view_packed(const char* fn, const at::Tensor& wbuf, const at::Tensor& meta) {
  TORCH_CHECK(meta.device().is_cpu() && meta.scalar_type() == at::kInt && meta.dim() == 2 &&
                  meta.size(0) == kMetaRows && meta.size(1) >= kHeaderLen && meta.is_contiguous(),
              fn, ": packed_meta must be the contiguous int32 (4, L) tensor made by adder_prepack, got ", meta.sizes(),
              " ", meta.scalar_type(), "; rebuild it with quantkit.ops.adder.adder_prepack");
  const int32_t* h = meta[kRowHeader].data_ptr<int32_t>();
  PackedView v;
  v.lo = h[kHLo];
  v.hi = h[kHHi];
  v.w_mult = h[kHWmult];
  v.wabs_max = h[kHWabs];
  v.Cout = h[kHCout];
  v.C = h[kHC];
  v.kh = h[kHKh];
  v.kw = h[kHKw];
  v.esize = h[kHEsize];
  v.groups = h[kHGroups];
  v.form = h[kHForm];
  const bool form_ok = v.form == kFormBytes || (v.form == kFormThermo && v.hi - v.lo <= 3);
  const int64_t NB = (v.Cout + kNR - 1) / kNR, T = v.kh * v.kw, Cp = form_ok ? row_elems(v.form, v.C) : 0;
  v.Cp = Cp;
  const bool header_ok = v.Cout >= 0 && v.C >= 0 && v.kh >= 1 && v.kw >= 1 && (v.w_mult == 1 || v.w_mult == 2) &&
                         v.esize == 1 && v.hi >= v.lo && v.hi - v.lo <= 255 && v.groups >= 1 && v.wabs_max >= 0 &&
                         form_ok &&
                         meta.size(1) == std::max<int64_t>(NB * kNR, kHeaderLen);
  TORCH_CHECK(header_ok, fn, ": packed_meta has an invalid header; rebuild it with quantkit.ops.adder.adder_prepack");
  TORCH_CHECK(wbuf.device().is_cpu() && wbuf.scalar_type() == at::kByte && wbuf.is_contiguous() && wbuf.dim() == 1 &&
                  wbuf.numel() == NB * T * Cp * kNR,
              fn, ": packed_weight ", wbuf.sizes(), " ", wbuf.scalar_type(), " does not match packed_meta (Cout=",
              v.Cout, ", C=", v.C, ", kernel ", v.kh, "x", v.kw, "); rebuild both with quantkit.ops.adder.adder_prepack");
  const int32_t* perm = meta[kRowPerm].data_ptr<int32_t>();
  const int32_t* lane_group = meta[kRowGroup].data_ptr<int32_t>();
  for (int64_t j = 0; j < NB * kNR; ++j) {
    TORCH_CHECK(perm[j] >= 0 && perm[j] < std::max<int64_t>(v.Cout, 1) && lane_group[j] >= 0 &&
                    lane_group[j] < v.groups,
                fn, ": packed_meta is corrupt (lane ", j, "); rebuild it with quantkit.ops.adder.adder_prepack");
  }
  v.W = wbuf.data_ptr();
  v.perm = perm;
  v.corr = meta[kRowCorr].data_ptr<int32_t>();
  std::vector<int32_t> lg(lane_group, lane_group + NB * kNR), pm(perm, perm + NB * kNR);
  v.blocks = make_blocks(lg, pm, NB, v.Cout);
  return v;
}

// ------------------------------------------------------------------------------------------------------------
// Activations
// ------------------------------------------------------------------------------------------------------------
// One pass over integer activations: channels-last u8 rows [G][rows + 1][Cp] holding (x mod 256), channel padding
// 0, and the exact min / max of x. Reads C-contiguous (channels-last) inputs row by row and NCHW inputs channel by
// channel, so one side of the copy is always sequential.
at::Tensor convert_activations_u8(const ConvGeom& gm, const at::Tensor& xq, int64_t Cp, int64_t* lo_out,
                                  int64_t* hi_out) {
  const int64_t rows = gm.N * gm.H * gm.W;
  at::Tensor abuf = at::empty({gm.G, rows + 1, Cp}, xq.options().dtype(at::kByte));
  uint8_t* A = abuf.data_ptr<uint8_t>();
  const int64_t gstride = (rows + 1) * Cp;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  std::mutex mu;
  AT_DISPATCH_INTEGRAL_TYPES(xq.scalar_type(), "adder_convert_activations", [&] {
    const scalar_t* x = xq.data_ptr<scalar_t>();
    const int64_t s0 = xq.stride(0), s1 = xq.stride(1), s2 = xq.stride(2), s3 = xq.stride(3), s4 = xq.stride(4);
    const int64_t C = gm.C, H = gm.H, W = gm.W, N = gm.N, CP = Cp;
    const bool channels_inner = s2 == 1 || C == 1;
    at::parallel_for(0, gm.G * N * H, 4, [&](int64_t begin, int64_t end) {
      scalar_t vmin = std::numeric_limits<scalar_t>::max(), vmax = std::numeric_limits<scalar_t>::lowest();
      for (int64_t i = begin; i < end; ++i) {
        const int64_t g = i / (N * H), n = (i / H) % N, h = i % H;
        uint8_t* __restrict__ dst_row = A + g * gstride + ((n * H + h) * W) * CP;
        const scalar_t* __restrict__ src_row = x + g * s0 + n * s1 + h * s3;
        if (channels_inner) {
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* __restrict__ src = src_row + w * s4;
            uint8_t* __restrict__ dst = dst_row + w * CP;
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t v = src[c];
              vmin = v < vmin ? v : vmin;
              vmax = v > vmax ? v : vmax;
              dst[c] = static_cast<uint8_t>(v);
            }
            for (int64_t c = C; c < CP; ++c) dst[c] = 0;
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* __restrict__ src = src_row + c * s2;
            for (int64_t w = 0; w < W; ++w) {
              const scalar_t v = src[w * s4];
              vmin = v < vmin ? v : vmin;
              vmax = v > vmax ? v : vmax;
              dst_row[w * CP + c] = static_cast<uint8_t>(v);
            }
          }
          for (int64_t w = 0; w < W; ++w)
            for (int64_t c = C; c < CP; ++c) dst_row[w * CP + c] = 0;
        }
      }
      if (begin < end) {
        std::lock_guard<std::mutex> lock(mu);
        lo = std::min<int64_t>(lo, vmin);
        hi = std::max<int64_t>(hi, vmax);
      }
    });
  });
  if (lo > hi) lo = hi = 0;  // no activations
  *lo_out = lo;
  *hi_out = hi;
  return abuf;
}

// Activation re-quantization fused into the kernel's input side (the deploy path): float rows -> the codes of
// every group, shifted onto the packed grid (code - lo), written straight into the kernel's [G][rows + 1][Cp]
// buffer. The float operations are those of quantize_groups (kernels/cpu/elementwise.cpp) and of
// quantkit.quantizers.adder.quantize_act_codes, in the same order: v = (x / s_g) * c, clamp to [qlo, qhi], round
// (half to even, or half away from zero as trunc(|v| + 0.5)); NaN gets code 0 and flags its row.
struct ActGrid {
  float c, qlo, qhi;
  bool half_even;
  int32_t shift;  // -lo of the packed grid
  // per group fl(c / scale[g]), or nullptr: the AVX-512 quantizer then multiplies instead of dividing and recomputes
  // the lanes inside the guard band |v - round(v)| > near_half with the division (see code_multipliers)
  const float* c_over_scale = nullptr;
  float near_half = 0.5f;
};

// The multipliers m_g = fl(c / s_g) of the division-free quantizer, or nothing where one is not a normal float.
// Why the codes stay exact: fl(x m_g) and the reference fl(fl(x / s_g) c) are each within a factor (1 +- u)^2 of
// x c / s_g (u = 2^-24), so they differ by at most 4.01 u (M + 1) wherever either lies in [qlo - 1, qhi + 1]
// (M = max(|qlo|, |qhi|)); outside that interval both clamp to the same end. Clamping to the integer bounds and
// rounding to the nearest integer can tell two such values apart only if one lies within that distance of a
// half-integer, so lanes within (M + 1) 2^-19 of one (8x the bound) take the division.
std::vector<float> code_multipliers(const float* scale, int64_t G, const ActGrid& q, float* near_half) {
  std::vector<float> m(G);
  for (int64_t g = 0; g < G; ++g) {
    m[g] = static_cast<float>(static_cast<double>(q.c) / static_cast<double>(scale[g]));
    if (!std::isnormal(m[g])) return {};
  }
  const double M = std::max(std::fabs(q.qlo), std::fabs(q.qhi));
  *near_half = static_cast<float>(0.5 - (M + 1.0) * std::ldexp(1.0, -19));
  return m;
}

inline bool quant_row_scalar(const float* __restrict__ x, int64_t C, float s, const ActGrid& q,
                             uint8_t* __restrict__ dst) {
  bool nan = false;
  for (int64_t i = 0; i < C; ++i) {
    float v = (x[i] / s) * q.c;
    if (v != v) {  // NaN: no integer code (and no float -> int conversion of it)
      nan = true;
      dst[i] = static_cast<uint8_t>(q.shift);
      continue;
    }
    v = std::min(std::max(v, q.qlo), q.qhi);
    float r;
    if (q.half_even) {
      r = (v + 12582912.0f) - 12582912.0f;
    } else {
      const float a = static_cast<float>(static_cast<int32_t>(std::fabs(v) + 0.5f));
      r = v < 0.f ? -a : a;
    }
    dst[i] = static_cast<uint8_t>(static_cast<int32_t>(r) + q.shift);
  }
  return nan;
}

// quant_row_scalar for every group at the AVX2 level, 8 channels at a time, the same float operations lane by lane
// (and the division-free form with its guard band where ActGrid::c_over_scale is set, as the AVX-512 quantizer):
// channel c of group g goes to dst + g * gstride + c, channels C .. Cp - 1 get 0. A tail of C % 8 channels runs the
// scalar loop.
QK_TARGET_AVX2 bool quant_row_groups_avx2(const float* __restrict__ x, int64_t C, int64_t Cp, const float* scale,
                                          int64_t G, const ActGrid& q, uint8_t* __restrict__ dst, int64_t gstride) {
  const __m256 c = _mm256_set1_ps(q.c), lo = _mm256_set1_ps(q.qlo), hi = _mm256_set1_ps(q.qhi);
  const __m256 half = _mm256_set1_ps(0.5f), near_half = _mm256_set1_ps(q.near_half);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i shift = _mm256_set1_epi32(q.shift);
  // the low 4 bytes of each 128-bit lane after the two packs: lane 0 holds channels 0-3, lane 1 channels 4-7
  const __m256i gather = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  bool nan = false;
  const int64_t C8 = C / 8 * 8;
  for (int64_t i = 0; i < C8; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 isnan = _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q);
    nan |= _mm256_movemask_ps(isnan) != 0;
    for (int64_t g = 0; g < G; ++g) {
      // max/min return their second operand for a NaN first one; NaN lanes get code 0 below
      const __m256 by_div =
          _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_div_ps(xv, _mm256_set1_ps(scale[g])), c), lo), hi);
      __m256 v;
      if (q.c_over_scale != nullptr) {
        v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(xv, _mm256_set1_ps(q.c_over_scale[g])), lo), hi);
        const __m256 dist =
            _mm256_andnot_ps(sign, _mm256_sub_ps(v, _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        v = _mm256_blendv_ps(v, by_div, _mm256_cmp_ps(dist, near_half, _CMP_GT_OQ));
      } else {
        v = by_div;
      }
      __m256i code;
      if (q.half_even) {
        code = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else {  // trunc(|v| + 0.5) with v's sign
        const __m256i a = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_andnot_ps(sign, v), half));
        const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
        code = _mm256_sub_epi32(_mm256_xor_si256(a, neg), neg);  // -a where v < 0
      }
      code = _mm256_andnot_si256(_mm256_castps_si256(isnan), code);
      code = _mm256_add_epi32(code, shift);  // 0 .. 255
      const __m256i w16 = _mm256_packus_epi32(code, code);
      const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w16, w16), gather);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + g * gstride + i), _mm256_castsi256_si128(b8));
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    uint8_t* d = dst + g * gstride;
    if (C8 < C) nan |= quant_row_scalar(x + C8, C - C8, scale[g], q, d + C8);
    if (Cp > C) std::memset(d + C, 0, Cp - C);
  }
  return nan;
}

// The lanes of the 16-channel chunk from channel i that lie below n (n = C: the valid channels; n = Cp: the
// stored ones).
inline __mmask16 chunk_mask(int64_t n, int64_t i) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF)
         : n > i     ? static_cast<__mmask16>((1u << (n - i)) - 1u)
                     : static_cast<__mmask16>(0);
}

struct ActGridVec {
  __m512 c, lo, hi, half, near_half;
  __m512i shift;
  bool half_even, shifted;
  const float* c_over_scale;
};

QK_TARGET_AVX512 inline ActGridVec act_grid_vec(const ActGrid& q) {
  return {_mm512_set1_ps(q.c), _mm512_set1_ps(q.qlo), _mm512_set1_ps(q.qhi), _mm512_set1_ps(0.5f),
          _mm512_set1_ps(q.near_half), _mm512_set1_epi32(q.shift), q.half_even, q.shift != 0, q.c_over_scale};
}

// clamp((x / s) * c, lo, hi) in the reference's operation order
QK_TARGET_AVX512 inline __m512 grid_value_div(__m512 xv, float s, const ActGridVec& q) {
  // max/min return their second operand for a NaN first one; NaN lanes are overwritten by codes16.
  return _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_div_ps(xv, _mm512_set1_ps(s)), q.c), q.lo), q.hi);
}

// The codes of 16 channels of x on the grid of group g, shifted onto the packed grid, as int32 lanes: channels
// outside m (>= C) get 0 (the channel padding), NaN lanes the code of 0 (their rows are flagged by the caller).
QK_TARGET_AVX512 inline __m512i codes16(__m512 xv, const float* scale, int64_t g, const ActGridVec& q, __mmask16 m,
                                        __mmask16 isnan) {
  __m512 v;
  if (q.c_over_scale != nullptr) {  // x * (c / s_g), the lanes near a rounding boundary by the division
    v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(xv, _mm512_set1_ps(q.c_over_scale[g])), q.lo), q.hi);
    const __m512 dist =
        _mm512_abs_ps(_mm512_sub_ps(v, _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    const __mmask16 near = _mm512_cmp_ps_mask(dist, q.near_half, _CMP_GT_OQ);
    if (__builtin_expect(near != 0, 0)) v = _mm512_mask_blend_ps(near, v, grid_value_div(xv, scale[g], q));
  } else {
    v = grid_value_div(xv, scale[g], q);
  }
  __m512i code;
  if (q.half_even) {
    code = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m512i a = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_abs_ps(v), q.half));
    const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    code = _mm512_mask_sub_epi32(a, neg, _mm512_setzero_si512(), a);
  }
  if (m == 0xFFFF && isnan == 0) return q.shifted ? _mm512_add_epi32(code, q.shift) : code;
  return _mm512_maskz_add_epi32(m, _mm512_mask_mov_epi32(code, isnan, _mm512_setzero_si512()), q.shift);
}

// One row for every group: x is loaded once per 16 channels and the groups' codes (codes16) are independent of each
// other, so they overlap instead of one row-length loop per group. Channel c of group g goes to
// dst + g * gstride + (c / 8) * sstride + c % 8 (sstride 8: one contiguous row; larger: the planar layout's step
// planes), channels C .. Cp - 1 get 0.
QK_TARGET_AVX512 bool quant_row_groups_avx512(const float* __restrict__ x, int64_t C, int64_t Cp, const float* scale,
                                              int64_t G, const ActGrid& grid, uint8_t* __restrict__ dst,
                                              int64_t gstride, int64_t sstride) {
  const ActGridVec q = act_grid_vec(grid);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < Cp; i += 16) {
    const __mmask16 m = chunk_mask(C, i), mp = chunk_mask(Cp, i);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    const __mmask16 isnan = _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q) & m;
    nan |= isnan;
    for (int64_t g = 0; g < G; ++g) {
      const __m128i bytes = _mm512_cvtepi32_epi8(codes16(xv, scale, g, q, m, isnan));
      uint8_t* d = dst + g * gstride + (i / kKB) * sstride;
      if (sstride == kKB) {
        _mm_mask_storeu_epi8(d, mp, bytes);
      } else {  // two steps (Cp is a multiple of 8, so a chunk holds one or two whole steps)
        _mm_storel_epi64(reinterpret_cast<__m128i*>(d), bytes);
        if (mp >> 8) _mm_storel_epi64(reinterpret_cast<__m128i*>(d + sstride), _mm_unpackhi_epi64(bytes, bytes));
      }
    }
  }
  return nan != 0;
}

// Eight consecutive pixels of one image row into the planar layout (Planar): their cells are consecutive, so each
// group's step plane gets one 64-byte store per 8 channels. Per 16 channels and group, the 8 rows' int32 codes are
// narrowed by two rounds of saturating packs (codes are 0 .. 255) and one dword permute per step -- 8 shuffle uops
// for 128 codes, against two narrowings and extractions per row in quant_row_groups_avx512 (which left the planar
// quantizer bound on port 5). x: 8 rows of C floats; dst: the first pixel's cell in group 0's step plane 0.
// Returns the rows' NaN flags, bit r for row r.
QK_TARGET_AVX512 unsigned quant_8px_planar_avx512(const float* __restrict__ x, int64_t C, int64_t Cp,
                                                  const float* scale, int64_t G, const ActGrid& grid,
                                                  uint8_t* __restrict__ dst, int64_t gstride, int64_t sstride) {
  const ActGridVec q = act_grid_vec(grid);
  // After packus_epi32 then packus_epi16 of rows (0,1),(2,3) -> b0 and (4,5),(6,7) -> b1, dword 4L + r' of b0 (b1)
  // holds channels 4L .. 4L + 3 of row r' (r' + 4). Step plane dword 2r + h is row r, channels 4h .. 4h + 3 of the
  // step: for the chunk's first step L = h, for its second L = 2 + h; bit 4 of an index picks b1.
  const __m512i step0 = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 16, 20, 17, 21, 18, 22, 19, 23);
  const __m512i step1 = _mm512_setr_epi32(8, 12, 9, 13, 10, 14, 11, 15, 24, 28, 25, 29, 26, 30, 27, 31);
  unsigned nan_rows = 0;
  for (int64_t i = 0; i < Cp; i += 16) {
    const __mmask16 m = chunk_mask(C, i);
    __m512 xv[8];
    __mmask16 isnan[8];
    for (int r = 0; r < 8; ++r) {
      xv[r] = _mm512_maskz_loadu_ps(m, x + r * C + i);
      isnan[r] = _mm512_cmp_ps_mask(xv[r], xv[r], _CMP_UNORD_Q) & m;
      if (isnan[r]) nan_rows |= 1u << r;
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512i c[8];
      for (int r = 0; r < 8; ++r) c[r] = codes16(xv[r], scale, g, q, m, isnan[r]);
      const __m512i b0 = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
      const __m512i b1 = _mm512_packus_epi16(_mm512_packus_epi32(c[4], c[5]), _mm512_packus_epi32(c[6], c[7]));
      uint8_t* d = dst + g * gstride + (i / kKB) * sstride;
      _mm512_storeu_si512(d, _mm512_permutex2var_epi32(b0, step0, b1));
      if (Cp - i > 8) _mm512_storeu_si512(d + sstride, _mm512_permutex2var_epi32(b0, step1, b1));
    }
  }
  return nan_rows;
}

// Thermometer tap row (Form) from C grid values in [0, 3] (one byte each): Cp bytes of 16-bit lanes.
void thermo_row_scalar(const uint8_t* __restrict__ v, int64_t C, int64_t Cp, uint8_t* __restrict__ dst) {
  const int64_t lanes = thermo_lanes(C);
  for (int64_t m = 0; m < Cp / 2; ++m) {
    uint16_t bits = 0;
    for (int64_t f = 0; f < 5 && m < lanes; ++f) {
      const int64_t c = f * lanes + m;
      if (c < C) bits = static_cast<uint16_t>(bits | thermo_code(v[c]) << (3 * f));
    }
    std::memcpy(dst + 2 * m, &bits, 2);
  }
}

QK_TARGET_AVX512 void thermo_row_avx512(const uint8_t* __restrict__ v, int64_t C, int64_t Cp,
                                        uint8_t* __restrict__ dst) {
  const int64_t lanes = thermo_lanes(C), lanes_padded = Cp / 2;
  const __m256i table = _mm256_setr_epi8(0, 1, 3, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  // T(v) = 2^v - 1
                                         0, 1, 3, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t m0 = 0; m0 < lanes_padded; m0 += 32) {
    __m512i bits = _mm512_setzero_si512();
    for (int f = 0; f < 5; ++f) {
      // field f of lanes m0 .. m0 + 31: channels f * lanes + m (lanes < `lanes` and channels < C only)
      const int64_t n = std::min<int64_t>({32, lanes - m0, C - f * lanes - m0});
      if (n <= 0) break;  // later fields start further on
      const __mmask32 m = n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u);
      const __m256i t = _mm256_shuffle_epi8(table, _mm256_maskz_loadu_epi8(m, v + f * lanes + m0));
      bits = _mm512_or_si512(bits, _mm512_sll_epi16(_mm512_cvtepu8_epi16(t), _mm_cvtsi32_si128(3 * f)));
    }
    const int64_t nl = std::min<int64_t>(32, lanes_padded - m0);
    _mm512_mask_storeu_epi16(dst + 2 * m0, nl >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << nl) - 1u), bits);
  }
}

// Planar activation layout of the pixel-vector kernel (stride-1 convs, tile_pv): [G][Cp/8 steps][N][Hp][Wp][8 bytes],
// the image with its zero padding around it (Hp = H + 2 ph, Wp = W + 2 pw + 8: 8 more columns so the last, partly
// valid pixel vector of an output row stays inside its image row), so the 8 pixels of an output-row vector read 64
// contiguous bytes per tap and step.
struct Planar {
  int64_t Hp = 0, Wp = 0, ph = 0, pw = 0, N = 0, H = 0, W = 0;
  int64_t sstride = 0;  // bytes between two steps' planes (N Hp Wp 8)
  int64_t gstride = 0;  // bytes between two groups (steps * sstride)
};

// The planar buffer of one image (the pixel-vector path quantizes and runs a batch image by image).
inline Planar make_planar(const ConvGeom& gm, int64_t Cp) {
  Planar pl;
  pl.N = 1;
  pl.H = gm.H;
  pl.W = gm.W;
  pl.ph = gm.ph;
  pl.pw = gm.pw;
  pl.Hp = gm.H + 2 * gm.ph;
  pl.Wp = gm.W + 2 * gm.pw + 8;
  pl.sstride = pl.Hp * pl.Wp * kKB;  // one image: a batch goes through the buffer image by image
  pl.gstride = (Cp / kKB) * pl.sstride;
  return pl;
}

// How far ahead quantize_into prefetches its float input rows (4 to 64 measured the same).
constexpr int64_t kPrefetchRows = 8;

// Software prefetch of the n float rows of C channels from row r of x.
inline void prefetch_rows(const float* x, int64_t C, int64_t r, int64_t n) {
  const char* p = reinterpret_cast<const char*>(x + r * C);
  for (int64_t b = 0; b < n * C * 4; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// x: float NHWC rows [rows][C] (contiguous). Fills the activation buffer A with the tap rows in `form` (channel
// padding 0, zero padding holds code 0) and nan_row (one flag per row); returns whether any input was NaN.
// Row layout (planar == nullptr): A [G][rows + 1][Cp], the last row of each group the zero-padding row. Planar
// layout: see Planar; the padding ring is written too.
bool quantize_into(const float* x, int64_t rows, int64_t C, int64_t Cp, int64_t form, const float* scale, int64_t G,
                   const ActGrid& q, Isa isa, uint8_t* A, uint8_t* nan_row, const Planar* planar = nullptr) {
  const int64_t gstride = planar != nullptr ? planar->gstride : (rows + 1) * Cp;
  const bool thermo = form == kFormThermo;
  const int64_t steps = Cp / kKB;
  // the tap row of code 0 (zero padding) in this form
  std::vector<uint8_t> zero_row(Cp, 0);
  {
    std::vector<uint8_t> zero_values(C, static_cast<uint8_t>(q.shift));
    if (thermo) {
      thermo_row_scalar(zero_values.data(), C, Cp, zero_row.data());
    } else {
      std::memcpy(zero_row.data(), zero_values.data(), C);
    }
  }
  std::atomic<bool> any_nan{false};
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    bool nan_here = false;
    // thermometer form: grid values [G][Cv] of one row (one byte per channel), then its encoded tap rows [G][Cp]
    // (planar layout only)
    const int64_t Cv = (C + kKB - 1) / kKB * kKB;
    std::vector<uint8_t> values(thermo ? G * Cv : 0), staged(thermo && planar != nullptr ? G * Cp : 0);
    const int64_t sstride = planar != nullptr ? planar->sstride : kKB;
    for (int64_t r = begin; r < end; ++r) {
      // the row's first byte in A: row layout r * Cp; planar layout its cell (n, y + ph, x + pw) of step plane 0
      int64_t cell = r * Cp;
      if (planar != nullptr) {
        const Planar& pl = *planar;
        const int64_t n = r / (pl.H * pl.W), y = (r / pl.W) % pl.H, xx = r % pl.W;
        cell = ((n * pl.Hp + y + pl.ph) * pl.Wp + xx + pl.pw) * kKB;
        if (!thermo && isa == kAvx512 && xx + 8 <= pl.W && r + 8 <= end) {  // 8 pixels of one image row
          prefetch_rows(x, C, std::min(r + kPrefetchRows, end - 8), 8);
          const unsigned nan8 = quant_8px_planar_avx512(x + r * C, C, Cp, scale, G, q, A + cell, gstride, sstride);
          for (int k = 0; k < 8; ++k) nan_row[r + k] = nan8 >> k & 1u;
          nan_here |= nan8 != 0;
          r += 7;
          continue;
        }
      }
      bool nan = false;
      {  // the float row kPrefetchRows ahead: where the input is not in L2 (batch 16) the hardware prefetchers
         // alone left the quantizer waiting on these loads (a 64-channel conv at batch 16 ran 16% slower without
         // this on Sapphire Rapids, 256 channels 7%)
        prefetch_rows(x, C, std::min(r + kPrefetchRows, end - 1), 1);
      }
      if (!thermo && isa == kAvx512) {
        nan = quant_row_groups_avx512(x + r * C, C, Cp, scale, G, q, A + cell, gstride, sstride);
      } else if (!thermo && isa == kAvx2) {  // (row layout only: the planar layout is an AVX-512 kernel's)
        nan = quant_row_groups_avx2(x + r * C, C, Cp, scale, G, q, A + cell, gstride);
      } else if (!thermo) {
        for (int64_t g = 0; g < G; ++g) {
          uint8_t* dst = A + g * gstride + cell;
          nan |= quant_row_scalar(x + r * C, C, scale[g], q, dst);
          if (Cp > C) std::memset(dst + C, 0, Cp - C);
        }
      } else {
        if (isa == kAvx512) {
          nan = quant_row_groups_avx512(x + r * C, C, Cv, scale, G, q, values.data(), Cv, kKB);
        } else if (isa == kAvx2) {
          nan = quant_row_groups_avx2(x + r * C, C, Cv, scale, G, q, values.data(), Cv);
        } else {
          for (int64_t g = 0; g < G; ++g) nan |= quant_row_scalar(x + r * C, C, scale[g], q, values.data() + g * Cv);
        }
        for (int64_t g = 0; g < G; ++g) {
          uint8_t* dst = planar != nullptr ? staged.data() + g * Cp : A + g * gstride + cell;
          if (isa == kAvx512) {
            thermo_row_avx512(values.data() + g * Cv, C, Cp, dst);
          } else {
            thermo_row_scalar(values.data() + g * Cv, C, Cp, dst);
          }
          if (planar != nullptr)
            for (int64_t st = 0; st < steps; ++st)
              std::memcpy(A + g * gstride + cell + st * sstride, dst + st * kKB, kKB);
        }
      }
      nan_row[r] = nan;
      nan_here |= nan;
    }
    if (nan_here) any_nan = true;
  });
  if (planar == nullptr) {
    for (int64_t g = 0; g < G; ++g) std::memcpy(A + g * gstride + rows * Cp, zero_row.data(), Cp);
  } else {
    // the padding ring (and the slack columns) of every image, group and step: code 0
    const Planar& pl = *planar;
    at::parallel_for(0, G * steps * pl.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t g = i / (steps * pl.N), st = (i / pl.N) % steps, n = i % pl.N;
        uint64_t z;
        std::memcpy(&z, zero_row.data() + st * kKB, kKB);
        uint64_t* img = reinterpret_cast<uint64_t*>(A + g * gstride + st * pl.sstride + n * pl.Hp * pl.Wp * kKB);
        for (int64_t yp = 0; yp < pl.Hp; ++yp) {
          uint64_t* row = img + yp * pl.Wp;
          if (yp < pl.ph || yp >= pl.ph + pl.H) {
            std::fill(row, row + pl.Wp, z);
          } else {
            std::fill(row, row + pl.pw, z);
            std::fill(row + pl.pw + pl.W, row + pl.Wp, z);
          }
        }
      }
    });
  }
  return any_nan;
}

// ------------------------------------------------------------------------------------------------------------
// Pixel-vector micro-kernel (AVX-512; stride-1 convs on the planar layout)
// ------------------------------------------------------------------------------------------------------------
// The 64-bit lanes of an accumulator are 8 consecutive output pixels of one output row; there is one accumulator
// per (pixel vector, output channel) of an 8-channel half, 2 vectors x 8 channels. Each step loads 8 pixels' 8
// activation bytes (64 contiguous bytes of the planar layout) and broadcasts one channel's 8 weight bytes. A
// channel's group only picks the planar buffer its pixel vectors are loaded from -- plain loads -- so a channel block
// at a group boundary costs what a one-group block costs (the row kernel merges two groups' bytes per lane there,
// an ALU uop per row and step), and there is no per-pixel tap-offset table: a tap is one constant offset.
struct PvRun {
  const uint8_t* A = nullptr;
  Planar pl;
  int64_t kh = 1, kw = 1, dh = 1, dw = 1, sh = 1, Ho = 0, Wo = 0, steps = 0, T = 0;
};

// a[j]: lane p = pixel p of channel j  ->  r[p]: lane j = channel j of pixel p (8 x 8 64-bit transpose).
QK_TARGET_AVX512 inline void transpose8x8_epi64(const __m512i* a, __m512i* r) {
  __m512i b[8], c[8];
  for (int k = 0; k < 4; ++k) {
    b[2 * k] = _mm512_unpacklo_epi64(a[2 * k], a[2 * k + 1]);      // pixels 0 2 4 6 of channels 2k, 2k+1
    b[2 * k + 1] = _mm512_unpackhi_epi64(a[2 * k], a[2 * k + 1]);  // pixels 1 3 5 7
  }
  // 128-bit blocks: c[0] = pixels 0|4 of channels 0-3, c[1] = 2|6 (0-3), c[2] = 0|4 (4-7), c[3] = 2|6 (4-7),
  // c[4..7] the same for the odd pixels
  c[0] = _mm512_shuffle_i64x2(b[0], b[2], 0x88);
  c[1] = _mm512_shuffle_i64x2(b[0], b[2], 0xDD);
  c[2] = _mm512_shuffle_i64x2(b[4], b[6], 0x88);
  c[3] = _mm512_shuffle_i64x2(b[4], b[6], 0xDD);
  c[4] = _mm512_shuffle_i64x2(b[1], b[3], 0x88);
  c[5] = _mm512_shuffle_i64x2(b[1], b[3], 0xDD);
  c[6] = _mm512_shuffle_i64x2(b[5], b[7], 0x88);
  c[7] = _mm512_shuffle_i64x2(b[5], b[7], 0xDD);
  r[0] = _mm512_shuffle_i64x2(c[0], c[2], 0x88);
  r[4] = _mm512_shuffle_i64x2(c[0], c[2], 0xDD);
  r[2] = _mm512_shuffle_i64x2(c[1], c[3], 0x88);
  r[6] = _mm512_shuffle_i64x2(c[1], c[3], 0xDD);
  r[1] = _mm512_shuffle_i64x2(c[4], c[6], 0x88);
  r[5] = _mm512_shuffle_i64x2(c[4], c[6], 0xDD);
  r[3] = _mm512_shuffle_i64x2(c[5], c[7], 0x88);
  r[7] = _mm512_shuffle_i64x2(c[5], c[7], 0xDD);
}

// One 8-channel half h of block blk for V pixel vectors from output pixel (oy, ox0) of the buffer's image. kSplit: 8 = one group for
// all lanes; 1..7 = lanes [0, kSplit) read the half's first group, the rest its second (the channels are sorted by
// group, so the second group's lanes are a suffix); 0 = any groups (one load per lane). rows[v][p]: pixel p of
// vector v, lanes = the half's 8 channel sums.
template <bool kThermo, int V, int kSplit>
QK_TARGET_AVX512 void pv_half(const Problem<uint8_t>& pb, const PvRun& run, int64_t blk, int h, int64_t oy,
                              int64_t ox0, __m512i (*rows)[8]) {
  const BlockInfo& bi = pb.blocks[blk];
  const LaneGroups& lg = bi.half[h];
  const Planar& pl = run.pl;
  const int64_t pix = (oy * run.sh * pl.Wp + ox0) * kKB;  // tap (0, 0) of the first pixel (one image per buffer)
  const uint8_t* xa = run.A + lg.group[0] * pl.gstride + pix;
  const uint8_t* xb = run.A + lg.group[lg.count > 1 ? 1 : 0] * pl.gstride + pix;
  const uint8_t* xl[8];  // kSplit 0: each lane's own group
  if (kSplit == 0) {
    for (int l = 0; l < 8; ++l) {
      int g = lg.group[0];
      for (int e = 1; e < lg.count; ++e)
        if (lg.mask[e] >> l & 1u) g = lg.group[e];
      xl[l] = run.A + g * pl.gstride + pix;
    }
  }
  __m512i acc[V][8];
  for (int v = 0; v < V; ++v)
    for (int j = 0; j < 8; ++j) acc[v][j] = _mm512_setzero_si512();
  for (int64_t i = 0; i < run.kh; ++i) {
    for (int64_t j = 0; j < run.kw; ++j) {
      const int64_t toff = (i * run.dh * pl.Wp + j * run.dw) * kKB;
      const uint8_t* w = pb.W + ((blk * run.T + i * run.kw + j) * run.steps) * kNR * kKB + h * 8 * kKB;
      const uint8_t* pa = xa + toff;
      const uint8_t* pbp = xb + toff;
      for (int64_t st = 0; st < run.steps; ++st, w += kNR * kKB, pa += pl.sstride, pbp += pl.sstride) {
        if (kSplit == 0) {
          for (int l = 0; l < 8; ++l) {
            const __m512i wl = bcast8_avx512(w + l * kKB);
            const uint8_t* px = xl[l] + toff + st * pl.sstride;
            for (int v = 0; v < V; ++v) acc[v][l] = _mm512_add_epi64(acc[v][l], lane_l1<kThermo>(_mm512_loadu_si512(px + v * 64), wl));
          }
        } else {
          __m512i va[V], vb[V];
          for (int v = 0; v < V; ++v) {
            va[v] = _mm512_loadu_si512(pa + v * 64);
            vb[v] = kSplit < 8 ? _mm512_loadu_si512(pbp + v * 64) : va[v];
          }
#pragma GCC unroll 8
          for (int l = 0; l < 8; ++l) {
            const __m512i wl = bcast8_avx512(w + l * kKB);
            for (int v = 0; v < V; ++v)
              acc[v][l] = _mm512_add_epi64(acc[v][l], lane_l1<kThermo>(l < kSplit ? va[v] : vb[v], wl));
          }
        }
      }
    }
  }
  for (int v = 0; v < V; ++v) transpose8x8_epi64(acc[v], rows[v]);
}

template <bool kThermo, int V>
QK_TARGET_AVX512 void pv_half_any(const Problem<uint8_t>& pb, const PvRun& run, int64_t blk, int h, int64_t oy,
                                  int64_t ox0, __m512i (*rows)[8]) {
  const LaneGroups& lg = pb.blocks[blk].half[h];
  int split = 8;
  if (lg.count == 2) {
    split = __builtin_ctz(lg.mask[1]);
    if (lg.mask[1] != (0xFFu << split & 0xFFu)) split = 0;  // not a suffix: the general loop
  } else if (lg.count > 2) {
    split = 0;
  }
  switch (split) {
    case 1: return pv_half<kThermo, V, 1>(pb, run, blk, h, oy, ox0, rows);
    case 2: return pv_half<kThermo, V, 2>(pb, run, blk, h, oy, ox0, rows);
    case 3: return pv_half<kThermo, V, 3>(pb, run, blk, h, oy, ox0, rows);
    case 4: return pv_half<kThermo, V, 4>(pb, run, blk, h, oy, ox0, rows);
    case 5: return pv_half<kThermo, V, 5>(pb, run, blk, h, oy, ox0, rows);
    case 6: return pv_half<kThermo, V, 6>(pb, run, blk, h, oy, ox0, rows);
    case 7: return pv_half<kThermo, V, 7>(pb, run, blk, h, oy, ox0, rows);
    case 8: return pv_half<kThermo, V, 8>(pb, run, blk, h, oy, ox0, rows);
    default: return pv_half<kThermo, V, 0>(pb, run, blk, h, oy, ox0, rows);
  }
}

// V pixel vectors (8 V pixels from ox0, the valid ones stored) x the 16 channels of block blk.
template <bool kThermo, int V>
QK_TARGET_AVX512 void pv_tile(const Problem<uint8_t>& pb, const PvRun& run, int64_t blk, int64_t n, int64_t oy,
                              int64_t ox0) {
  __m512i rows0[V][8], rows1[V][8];
  pv_half_any<kThermo, V>(pb, run, blk, 0, oy, ox0, rows0);
  pv_half_any<kThermo, V>(pb, run, blk, 1, oy, ox0, rows1);
  for (int v = 0; v < V; ++v) {
    const int64_t nr = std::min<int64_t>(8, run.Wo - ox0 - 8 * v);
    if (nr > 0) store_rows_avx512(pb, blk, (n * run.Ho + oy) * run.Wo + ox0 + 8 * v, static_cast<int>(nr), rows0[v],
                                  rows1[v]);
  }
}

// Image n (the planar buffer holds it alone: quantized image by image, so the buffer stays in L2 at any batch).
template <bool kThermo>
void run_pv(const Problem<uint8_t>& pb, const PvRun& run, int64_t n) {
  // (output row, channel block) units, blocks inner: consecutive units reuse the same activation rows
  at::parallel_for(0, run.Ho * pb.NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t blk = u % pb.NB, oy = u / pb.NB;
      int64_t ox0 = 0;
      for (; ox0 + 8 < run.Wo; ox0 += 16) pv_tile<kThermo, 2>(pb, run, blk, n, oy, ox0);
      if (ox0 < run.Wo) pv_tile<kThermo, 1>(pb, run, blk, n, oy, ox0);
    }
  });
}

// What the pixel-vector path needs from the caller: the planar geometry and how to quantize image n into A.
struct PvInput {
  Planar pl;
  std::function<void(int64_t)> quantize_image;
};

// ------------------------------------------------------------------------------------------------------------
// The run: indirection table, problem, tiles
// ------------------------------------------------------------------------------------------------------------
// Runs the l1 GEMM over the activation buffer A ([G][rows + 1][Cp], values x - lo) with packed weights pw.
// xabs_max bounds |x| (the sum-overflow check).
template <typename E>
at::Tensor run_packed(const ConvGeom& gm, const E* A, const PackedView& pw, int64_t xabs_max, const at::Tensor& delta, const c10::optional<at::Tensor>& bias,
                      bool float_out, Isa isa, const at::TensorOptions& opts, const float* residual = nullptr,
                      bool relu = false, const PvInput* planar = nullptr) {
  const int64_t T = gm.kh * gm.kw;
  const int64_t Cp = pw.Cp;
  const int64_t rows = gm.N * gm.H * gm.W;
  const int64_t P = gm.N * gm.Ho * gm.Wo;
  const int64_t NB = (gm.Cout + kNR - 1) / kNR;
  {  // every |x - w| <= |x| + |w|: the sums fit int32 (and the u64 lanes narrowed to int32 stay exact)
    const int64_t k = T * gm.C;
    TORCH_CHECK(k == 0 || xabs_max + pw.wabs_max <= std::numeric_limits<int32_t>::max() / k,
                "adder: the l1 sums could overflow int32 (K=", k, ", |x| <= ", xabs_max, ", |w_mult*w| <= ",
                pw.wabs_max, "); the operands are far outside 2-8 bits");
  }
  std::vector<float> nd, bs;
  if (float_out) {
    at::Tensor d = delta.to(at::kFloat).contiguous();
    nd.assign(NB * kNR, 0.f);
    for (int64_t j = 0; j < gm.Cout; ++j) nd[j] = -d.data_ptr<float>()[pw.perm[j]];
    if (bias.has_value()) {
      at::Tensor bb = bias->to(at::kFloat).contiguous();
      bs.assign(NB * kNR, 0.f);
      for (int64_t j = 0; j < gm.Cout; ++j) bs[j] = bb.data_ptr<float>()[pw.perm[j]];
    }
  }
  at::Tensor out = at::empty({gm.N, gm.Cout, gm.Ho, gm.Wo},
                             opts.dtype(float_out ? at::kFloat : at::kInt).memory_format(at::MemoryFormat::ChannelsLast));
  if (P == 0 || gm.Cout == 0) return out;
  cpu::advise_huge_pages(out);
  (void)rows;

  Problem<E> pb;
  pb.P = P;
  pb.T = T;
  pb.Cp = Cp;
  pb.thermo = pw.form == kFormThermo;
  pb.gstride = (rows + 1) * Cp;
  pb.NB = NB;
  pb.ldo = gm.Cout;
  pb.A = A;
  pb.W = reinterpret_cast<const E*>(pw.W);
  pb.blocks = pw.blocks.data();
  pb.perm = pw.perm;
  pb.corr = pw.corr;
  if (float_out) {
    pb.nd = nd.data();
    pb.bias = bs.empty() ? nullptr : bs.data();
    pb.outf = out.data_ptr<float>();
    pb.res = residual;
    pb.relu = relu;
  } else {
    pb.outi = out.data_ptr<int32_t>();
  }
  if constexpr (sizeof(E) == 1) {
    if (isa == kAvx512 && planar != nullptr) {  // the pixel-vector kernel, image by image on the planar layout
      PvRun run;
      run.A = A;
      run.pl = planar->pl;
      run.kh = gm.kh;
      run.kw = gm.kw;
      run.dh = gm.dh;
      run.dw = gm.dw;
      run.sh = gm.sh;
      run.Ho = gm.Ho;
      run.Wo = gm.Wo;
      run.steps = Cp / kKB;
      run.T = T;
      for (int64_t n = 0; n < gm.N; ++n) {
        planar->quantize_image(n);
        if (pb.thermo) {
          run_pv<true>(pb, run, n);
        } else {
          run_pv<false>(pb, run, n);
        }
      }
      return out;
    }
    if (isa == kAvx512) {
      run_tiles(pb, gm, 64, pb.thermo ? tile_avx512_panel<true> : tile_avx512_panel<false>);
      return out;
    }
    if (isa == kAvx2 && pb.thermo) {
      run_tiles(pb, gm, 16, tile_avx2_thermo);
      return out;
    }
    if (isa == kAvx2) {
      run_tiles(pb, gm, 32, tile_avx2);
      return out;
    }
  }
  run_tiles(pb, gm, 16, tile_portable<E>);
  return out;
}

// Integer-input ops: pack the weights for this call's grid (no cache: deploy layers use the prepacked ops).
template <typename E>
at::Tensor run_conv(const ConvGeom& gm, const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                    int64_t w_mult, int64_t lo, int64_t xhi, const at::Tensor& delta,
                    const c10::optional<at::Tensor>& bias, bool float_out, Isa isa, at::Tensor abuf) {
  const int64_t Cp = (gm.C + kKB - 1) / kKB * kKB;
  const int64_t rows = gm.N * gm.H * gm.W;
  const auto e_dtype = sizeof(E) == 1 ? at::kByte : at::kShort;  // u16 values are reinterpreted from int16 storage

  // Activations: [G][rows + 1][Cp], values (x - lo); padding values 0; the last row of each group is q_x = 0.
  // The u8 buffer comes from convert_activations_u8 (conv_impl); the u16 fallback converts here with ATen's copy
  // (any strides, any integer dtype); integer conversion and the in-place shift are modular, which is exact
  // because every shifted value lies in [0, max(E)].
  const int64_t gstride = (rows + 1) * Cp;
  if (!abuf.defined()) {
    abuf = at::zeros({gm.G, rows + 1, Cp}, xq.options().dtype(e_dtype));
    E* A0 = reinterpret_cast<E*>(abuf.data_ptr());
    const int64_t shift_mod = sizeof(E) == 1 ? ((-lo) & 0xFF) : ((((-lo) & 0xFFFF) ^ 0x8000) - 0x8000);
    for (int64_t g = 0; g < gm.G; ++g)
      for (int64_t c = 0; c < gm.C; ++c) A0[g * gstride + rows * Cp + c] = static_cast<E>(-lo);
    if (rows > 0 && gm.C > 0) {
      at::Tensor view = abuf.narrow(1, 0, rows).narrow(2, 0, gm.C).view({gm.G, gm.N, gm.H, gm.W, gm.C});
      view.copy_(xq.permute({0, 1, 3, 4, 2}));
      if (shift_mod != 0) view.add_(shift_mod);
    }
  }
  const int64_t hi_bound = (sizeof(E) == 1 ? 255 : 65535) + lo;
  const std::vector<at::Tensor> packed = pack_weights<E>(wq, group_index, w_mult, lo, hi_bound);
  PackedView pw;
  {
    const int32_t* h = packed[1][kRowHeader].data_ptr<int32_t>();
    const int64_t NB = (gm.Cout + kNR - 1) / kNR;
    pw.W = packed[0].data_ptr();
    pw.perm = packed[1][kRowPerm].data_ptr<int32_t>();
    pw.corr = packed[1][kRowCorr].data_ptr<int32_t>();
    pw.wabs_max = h[kHWabs];
    pw.form = kFormBytes;
    pw.Cp = Cp;
    const int32_t* lgp = packed[1][kRowGroup].data_ptr<int32_t>();
    pw.blocks = make_blocks(std::vector<int32_t>(lgp, lgp + NB * kNR), std::vector<int32_t>(pw.perm, pw.perm + NB * kNR),
                            NB, gm.Cout);
  }
  const int64_t xabs_max = std::max(std::abs(lo), std::abs(xhi));
  return run_packed<E>(gm, reinterpret_cast<const E*>(abuf.data_ptr()), pw, xabs_max, delta, bias, float_out,
                       isa, xq.options());
}

// ------------------------------------------------------------------------------------------------------------
// Op entry points
// ------------------------------------------------------------------------------------------------------------
void check_common(const char* fn, const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                  int64_t w_mult) {
  TORCH_CHECK(xq.device().is_cpu() && wq.device().is_cpu() && group_index.device().is_cpu(), fn,
              ": all tensors must be on the CPU");
  TORCH_CHECK(at::isIntegralType(xq.scalar_type(), /*includeBool=*/false), fn, ": xq must be an integer tensor, got ",
              xq.scalar_type());
  TORCH_CHECK(at::isIntegralType(wq.scalar_type(), false), fn, ": wq must be an integer tensor, got ", wq.scalar_type());
  TORCH_CHECK(at::isIntegralType(group_index.scalar_type(), false) && group_index.dim() == 1, fn,
              ": group_index must be a 1-D integer tensor");
  TORCH_CHECK(w_mult == 1 || w_mult == 2, fn, ": w_mult must be 1 (|q_x - q_w|) or 2 (|q_x - 2 q_w|), got ", w_mult);
  TORCH_CHECK(xq.size(0) >= 1, fn, ": xq needs at least one group");
  TORCH_CHECK(group_index.numel() == wq.size(0), fn, ": group_index has ", group_index.numel(),
              " entries but wq has ", wq.size(0), " output channels");
  if (group_index.numel() > 0) {
    const int64_t gmin = group_index.min().item<int64_t>(), gmax = group_index.max().item<int64_t>();
    TORCH_CHECK(gmin >= 0 && gmax < xq.size(0), fn, ": group_index values must lie in [0, ", xq.size(0), "), got [",
                gmin, ", ", gmax, "]");
  }
}

void check_epilogue(const char* fn, int64_t n_out, const at::Tensor& delta, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(delta.device().is_cpu() && delta.is_floating_point() && delta.dim() == 1 && delta.size(0) == n_out, fn,
              ": delta must be a 1-D float CPU tensor of length ", n_out);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == n_out, fn,
                ": bias must be None or a 1-D float CPU tensor of length ", n_out);
  }
}

// The window of a conv whose N, C, H, W, Cout, kh, kw are set: stride, padding, dilation, output size, and the
// size checks of the output and the tap-offset table.
void set_conv_window(const char* fn, ConvGeom& gm, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation) {
  const ConvOut osz = conv2d_out_hw(fn, gm.H, gm.W, gm.kh, gm.kw, stride, padding, dilation);
  gm.sh = stride[0];
  gm.sw = stride[1];
  gm.ph = padding[0];
  gm.pw = padding[1];
  gm.dh = dilation[0];
  gm.dw = dilation[1];
  gm.Ho = osz.h;
  gm.Wo = osz.w;
  checked_numel(fn, "output elements", {gm.N, gm.Ho, gm.Wo, std::max<int64_t>(gm.Cout, 1)});
  checked_numel(fn, "tap offsets", {gm.N, gm.Ho, gm.Wo, gm.kh, gm.kw});
}

at::Tensor conv_impl(const char* fn, const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t w_mult,
                     const at::Tensor& delta, const c10::optional<at::Tensor>& bias, bool float_out) {
  TORCH_CHECK(xq.dim() == 5, fn, ": xq must have shape (G, N, C, H, W), got ", xq.sizes());
  TORCH_CHECK(wq.dim() == 4, fn, ": wq must have shape (Cout, C, kh, kw), got ", wq.sizes());
  check_common(fn, xq, wq, group_index, w_mult);
  TORCH_CHECK(xq.size(2) == wq.size(1), fn, ": xq has C=", xq.size(2), " but wq has C=", wq.size(1));
  ConvGeom gm{};
  gm.G = xq.size(0);
  gm.N = xq.size(1);
  gm.C = xq.size(2);
  gm.H = xq.size(3);
  gm.W = xq.size(4);
  gm.Cout = wq.size(0);
  gm.kh = wq.size(2);
  gm.kw = wq.size(3);
  set_conv_window(fn, gm, stride, padding, dilation);
  if (float_out) check_epilogue(fn, gm.Cout, delta, bias);

  // Common grid: the activation range, plus 0 where the convolution reads padding, placed at a canonical offset
  // when possible (u8: [0, 255] or [-128, 127]).
  const int64_t Cp = (gm.C + kKB - 1) / kKB * kKB;
  int64_t lo = 0, hi = 0;
  at::Tensor abuf = convert_activations_u8(gm, xq, Cp, &lo, &hi);
  if (gm.ph > 0 || gm.pw > 0 || xq.numel() == 0) {
    lo = std::min<int64_t>(lo, 0);
    hi = std::max<int64_t>(hi, 0);
  }
  // Every l1 sum is an int32: operands outside the int32 range cannot be summed exactly (and would overflow the
  // int64 range arithmetic below), so they are rejected before any of it.
  constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(lo >= -kI32Max && hi <= kI32Max, fn, ": the activations span [", lo, ", ", hi,
              "], outside [-(2^31 - 1), 2^31 - 1]; their l1 sums cannot be represented in int32 (integer l1 kernels "
              "are for 2-8-bit operands)");
  const int64_t range = hi - lo;
  TORCH_CHECK(range <= 65535, fn, ": the activations span ", range + 1,
              " integer values; at most 65536 are supported (integer l1 kernels are for 2-8-bit operands)");
  const bool use_u8 = range <= 255;
  const int64_t span = use_u8 ? 255 : 65535;
  int64_t grid_lo = lo;
  if (lo >= 0 && hi <= span) {
    grid_lo = 0;
  } else if (lo >= -(span + 1) / 2 && hi <= span / 2) {
    grid_lo = -(span + 1) / 2;
  }
  const Isa isa = cpu::active_isa();
  const at::Tensor& d = float_out ? delta : xq;  // unused when !float_out
  if (use_u8) {
    // abuf holds x mod 256: shift it onto the grid (modular, exact) and write the zero-padding row (q_x = 0).
    const int64_t rows = gm.N * gm.H * gm.W;
    if (grid_lo != 0 && rows > 0 && gm.C > 0) abuf.narrow(1, 0, rows).narrow(2, 0, gm.C).add_((-grid_lo) & 0xFF);
    uint8_t* A = abuf.data_ptr<uint8_t>();
    for (int64_t g = 0; g < gm.G; ++g) {
      uint8_t* zero_row = A + (g * (rows + 1) + rows) * Cp;
      std::memset(zero_row, 0, Cp);
      std::memset(zero_row, static_cast<int>((-grid_lo) & 0xFF), gm.C);
    }
    return run_conv<uint8_t>(gm, xq, wq, group_index, w_mult, grid_lo, hi, d, bias, float_out, isa, abuf);
  }
  return run_conv<uint16_t>(gm, xq, wq, group_index, w_mult, grid_lo, hi, d, bias, float_out, isa, at::Tensor());
}

at::Tensor linear_impl(const char* fn, const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                       int64_t w_mult, const at::Tensor& delta, const c10::optional<at::Tensor>& bias, bool float_out) {
  TORCH_CHECK(xq.dim() == 3, fn, ": xq must have shape (G, M, K), got ", xq.sizes());
  TORCH_CHECK(wq.dim() == 2, fn, ": wq must have shape (N, K), got ", wq.sizes());
  TORCH_CHECK(xq.size(2) == wq.size(1), fn, ": xq has K=", xq.size(2), " but wq has K=", wq.size(1));
  const int64_t one[2] = {1, 1}, zero[2] = {0, 0};
  at::Tensor y = conv_impl(fn, xq.unsqueeze(-1).unsqueeze(-1), wq.unsqueeze(-1).unsqueeze(-1), group_index, one,
                           zero, one, w_mult, delta, bias, float_out);
  return y.view({xq.size(1), wq.size(0)});  // channels-last (M, N, 1, 1) is row-major (M, N)
}

at::Tensor adder_l1_cpu(const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index, int64_t w_mult) {
  return linear_impl("adder_l1", xq, wq, group_index, w_mult, at::Tensor(), c10::nullopt, false);
}

at::Tensor adder_linear_cpu(const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                            const at::Tensor& delta, const c10::optional<at::Tensor>& bias, int64_t w_mult) {
  return linear_impl("adder_linear", xq, wq, group_index, w_mult, delta, bias, true);
}

at::Tensor adder_l1_conv2d_cpu(const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t w_mult) {
  return conv_impl("adder_l1_conv2d", xq, wq, group_index, stride, padding, dilation, w_mult, at::Tensor(),
                   c10::nullopt, false);
}

at::Tensor adder_conv2d_cpu(const at::Tensor& xq, const at::Tensor& wq, const at::Tensor& group_index,
                            const at::Tensor& delta, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t w_mult) {
  return conv_impl("adder_conv2d", xq, wq, group_index, stride, padding, dilation, w_mult, delta, bias, true);
}


// ---- prepacked, fused-input ops (deploy layers) --------------------------------------------------------------
// The tap-row form "auto" picks: the thermometer form where it measured faster than the byte SADs -- a grid of at
// most 4 values (2-bit codes), VPOPCNTQ available (the AVX-512 level; AVX2 would popcount word by word), and more
// than 64 input channels. The VPXORQ+VPOPCNTQ register loop runs 2.0x the VPSADBW one on Zen 5, and 3x3 convs with
// 128-512 channels ran 1.3-1.8x the bytes form (benchmarks/kernels_cpu_adder.py); at 64 channels (ResNet's first
// stage: 4 words a tap row, against 8 byte steps) the shorter loops and the encoding step ate the gain (0.93-1.09x).
int64_t auto_form(int64_t C, int64_t x_lo, int64_t x_hi) {
  if (x_hi - x_lo > 3 || cpu::best_supported_isa() != kAvx512) return kFormBytes;
  return C > 64 ? kFormThermo : kFormBytes;
}

std::vector<at::Tensor> adder_prepack_cpu(const at::Tensor& wq, const at::Tensor& group_index, int64_t w_mult,
                                          int64_t x_lo, int64_t x_hi, c10::string_view form) {
  const char* fn = "adder_prepack";
  TORCH_CHECK(wq.device().is_cpu() && group_index.device().is_cpu(), fn, ": wq and group_index must be CPU tensors");
  TORCH_CHECK(wq.dim() == 2 || wq.dim() == 4, fn, ": wq must be (N, K) or (Cout, C, kh, kw), got ", wq.sizes());
  TORCH_CHECK(at::isIntegralType(wq.scalar_type(), false), fn, ": wq must be an integer tensor, got ", wq.scalar_type());
  TORCH_CHECK(at::isIntegralType(group_index.scalar_type(), false) && group_index.dim() == 1 &&
                  group_index.numel() == wq.size(0),
              fn, ": group_index must be a 1-D integer tensor with one entry per output channel (", wq.size(0), ")");
  TORCH_CHECK(w_mult == 1 || w_mult == 2, fn, ": w_mult must be 1 or 2, got ", w_mult);
  TORCH_CHECK(x_lo <= 0 && 0 <= x_hi && x_hi - x_lo <= 255, fn, ": the activation grid [", x_lo, ", ", x_hi,
              "] must contain 0 (the zero padding) and span at most 256 integers (2-8-bit codes)");
  if (group_index.numel() > 0) {
    const int64_t gmin = group_index.min().item<int64_t>(), gmax = group_index.max().item<int64_t>();
    TORCH_CHECK(gmin >= 0 && gmax < 65536, fn, ": group_index values must lie in [0, 65536), got [", gmin, ", ", gmax,
                "]");
  }
  at::Tensor w4 = wq.dim() == 4 ? wq : wq.unsqueeze(-1).unsqueeze(-1);
  checked_numel(fn, "weights", {w4.size(0), w4.size(1), w4.size(2), w4.size(3)});
  TORCH_CHECK(w4.size(1) < (int64_t(1) << 24) && w4.size(2) * w4.size(3) < (int64_t(1) << 24), fn,
              ": the weight shape ", wq.sizes(), " is too large");
  const bool thermo = form == "thermometer", bytes = form == "bytes";
  TORCH_CHECK(thermo || bytes || form == "auto", fn, ": form must be 'auto', 'bytes' or 'thermometer', got '", form,
              "'");
  TORCH_CHECK(!thermo || x_hi - x_lo <= 3, fn, ": the thermometer form holds grids of at most 4 values (2-bit codes); "
              "the grid [", x_lo, ", ", x_hi, "] has ", x_hi - x_lo + 1, "; use form='bytes' or 'auto'");
  const int64_t f = thermo ? kFormThermo : bytes ? kFormBytes : auto_form(w4.size(1), x_lo, x_hi);
  return pack_weights<uint8_t>(w4, group_index, w_mult, x_lo, x_hi, f);
}

// Which AVX-512 kernel a fused conv runs. The pixel-vector kernel needs stride 1 along the rows (its 8 pixels are
// consecutive input columns) and wastes the lanes of a partial last vector per output row, while the row kernel
// pays for group boundaries inside its channel blocks. Measured on Zen 5 (4-bit, G = 4, 1 thread): C64 56x56 0.45
// against 0.58 ms (batch 1); C128 28x28 even (Wo = 28: 3.5 vectors); C256 14x14 0.46 against 0.34 ms. So: whole
// vectors only, at least two per row.
inline bool use_pixel_vectors(const ConvGeom& gm) { return gm.sw == 1 && gm.Wo >= 16 && gm.Wo % 8 == 0; }

at::Tensor fused_impl(const char* fn, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& wbuf,
                      const at::Tensor& meta, const at::Tensor& delta, const c10::optional<at::Tensor>& bias,
                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t bits,
                      bool is_signed, bool half_even, const c10::optional<at::Tensor>& residual = c10::nullopt,
                      bool relu = false) {
  TORCH_CHECK(x.device().is_cpu() && scale.device().is_cpu(), fn, ": x and scale must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat, fn, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, fn, ": x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(bits >= 2 && bits <= 8, fn, ": bits must be in 2..8, got ", bits);
  const PackedView pw = view_packed(fn, wbuf, meta);
  TORCH_CHECK(x.size(1) == pw.C, fn, ": x has C=", x.size(1), " but the packed weights were made for C=", pw.C);
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] == pw.kh && kernel_size[1] == pw.kw, fn, ": kernel_size ",
              kernel_size, " differs from the packed weights' ", pw.kh, "x", pw.kw);
  TORCH_CHECK(scale.is_floating_point() && scale.dim() == 1 && scale.numel() >= pw.groups, fn,
              ": scale must be a 1-D float tensor with one scale per group (at least ", pw.groups, "), got ",
              scale.sizes());
  const int64_t G = scale.numel();
  at::Tensor s = scale.to(at::kFloat).contiguous();
  const float* ss = s.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(std::isfinite(ss[g]) && ss[g] > 0.f, fn, ": scale[", g, "] = ", ss[g],
                "; every group scale must be finite and > 0");
  const int64_t qlo = is_signed ? -(int64_t(1) << (bits - 1)) : 0;
  const int64_t qhi = is_signed ? (int64_t(1) << (bits - 1)) - 1 : (int64_t(1) << bits) - 1;
  TORCH_CHECK(qlo >= pw.lo && qhi <= pw.hi, fn, ": ", bits, "-bit ", is_signed ? "signed" : "unsigned",
              " codes span [", qlo, ", ", qhi, "] but the weights were packed for the grid [", pw.lo, ", ", pw.hi,
              "]; prepack with x_lo <= ", qlo, " and x_hi >= ", qhi);
  check_epilogue(fn, pw.Cout, delta, bias);

  ConvGeom gm{};
  gm.G = G;
  gm.N = x.size(0);
  gm.C = pw.C;
  gm.H = x.size(2);
  gm.W = x.size(3);
  gm.Cout = pw.Cout;
  gm.kh = pw.kh;
  gm.kw = pw.kw;
  set_conv_window(fn, gm, stride, padding, dilation);
  // A strided 1x1 conv without padding (a ResNet downsample shortcut) reads only every sh-th row and sw-th column:
  // quantize just those pixels and run it as a stride-1 conv on them (the same outputs; a NaN elsewhere reaches
  // no output either way). The full input would be re-quantized per group for a quarter of it being read.
  at::Tensor x_read = x;
  if (gm.kh == 1 && gm.kw == 1 && gm.ph == 0 && gm.pw == 0 && (gm.sh > 1 || gm.sw > 1) && gm.Ho > 0 && gm.Wo > 0) {
    x_read = x.slice(2, 0, (gm.Ho - 1) * gm.sh + 1, gm.sh).slice(3, 0, (gm.Wo - 1) * gm.sw + 1, gm.sw);
    gm.H = gm.Ho, gm.W = gm.Wo, gm.sh = gm.sw = 1, gm.dh = gm.dw = 1;
  }
  const int64_t Cp = pw.Cp;
  const int64_t rows = gm.N * gm.H * gm.W;
  checked_numel(fn, "activation buffer", {G, rows + 1, Cp});
  const Isa isa = cpu::active_isa();
  const bool use_pv = isa == kAvx512 && use_pixel_vectors(gm);
  PvInput planar;
  planar.pl = make_planar(gm, Cp);
  if (use_pv) checked_numel(fn, "activation buffer", {G, Cp, planar.pl.Hp, planar.pl.Wp});
  const int64_t abuf_bytes = use_pv ? G * planar.pl.gstride : G * (rows + 1) * Cp;

  // NHWC float rows: free for channels-last inputs (what the previous adder conv returns), one copy otherwise (and
  // the gather of a strided 1x1 conv's pixels).
  at::Tensor xr = x_read.permute({0, 2, 3, 1}).contiguous();
  // The quantized activations live in a per-thread scratch buffer reused across calls: a fresh multi-MiB
  // allocation per layer costs page faults comparable to the quantization itself (activations only, never weights).
  thread_local std::unique_ptr<uint8_t[]> scratch;
  thread_local int64_t scratch_bytes = 0;
  if (scratch_bytes < abuf_bytes) {
    scratch.reset();  // release first: the old and the new buffer need not coexist
    scratch_bytes = 0;
    scratch.reset(new uint8_t[abuf_bytes]);
    scratch_bytes = abuf_bytes;
  }
  uint8_t* abuf = scratch.get();
  std::vector<uint8_t> nan_row(rows + 1, 0);
  ActGrid q{is_signed ? static_cast<float>((1 << bits) - 1) / 2.0f : static_cast<float>((1 << bits) - 1),
            static_cast<float>(qlo), static_cast<float>(qhi), half_even, static_cast<int32_t>(-pw.lo)};
  const std::vector<float> c_over_scale = code_multipliers(ss, G, q, &q.near_half);
  if (!c_over_scale.empty()) q.c_over_scale = c_over_scale.data();
  bool any_nan = false;
  if (use_pv) {  // run_packed quantizes image by image into the planar buffer
    const int64_t image_rows = gm.H * gm.W;
    const float* xf = xr.data_ptr<float>();
    planar.quantize_image = [&, image_rows, xf](int64_t n) {
      any_nan |= quantize_into(xf + n * image_rows * gm.C, image_rows, gm.C, Cp, pw.form, ss, G, q, isa, abuf,
                               nan_row.data() + n * image_rows, &planar.pl);
    };
  } else {
    any_nan = quantize_into(xr.data_ptr<float>(), rows, gm.C, Cp, pw.form, ss, G, q, isa, abuf, nan_row.data());
  }
  const int64_t xabs_max = std::max(std::abs(qlo), std::abs(qhi));
  // the residual in the output's layout: channels-last rows of Cout floats (free for the block input it usually is)
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == at::kFloat, fn,
                ": residual must be a float32 CPU tensor, got ", residual->scalar_type(), " on ", residual->device());
    TORCH_CHECK(residual->dim() == 4 && residual->size(0) == gm.N && residual->size(1) == gm.Cout &&
                    residual->size(2) == gm.Ho && residual->size(3) == gm.Wo,
                fn, ": residual must have the output's shape (", gm.N, ", ", gm.Cout, ", ", gm.Ho, ", ", gm.Wo,
                "), got ", residual->sizes());
    res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor out = run_packed<uint8_t>(gm, abuf, pw, xabs_max, delta, bias, true, isa, x.options(),
                                       res.defined() ? res.data_ptr<float>() : nullptr, relu,
                                       use_pv ? &planar : nullptr);
  if (any_nan) {
    // NaN where the float model has it: |NaN - w| poisons every output whose window reads a NaN (any channel).
    const int64_t P = gm.N * gm.Ho * gm.Wo, T = gm.kh * gm.kw;
    float* y = out.data_ptr<float>();
    const float qnan = std::numeric_limits<float>::quiet_NaN();
    at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> off(T);
      for (int64_t p = begin; p < end; ++p) {
        panel_offsets(gm, Cp, p, 1, T, off.data());
        bool hit = false;
        for (int64_t t = 0; t < T && !hit; ++t) hit = nan_row[off[t] / Cp] != 0;
        if (hit) std::fill(y + p * gm.Cout, y + (p + 1) * gm.Cout, qnan);
      }
    });
  }
  return out;
}

at::Tensor adder_conv2d_packed_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& packed_weight,
                                   const at::Tensor& packed_meta, const at::Tensor& delta,
                                   const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t bits, bool is_signed, bool half_even,
                                   const c10::optional<at::Tensor>& residual, bool relu) {
  return fused_impl("adder_conv2d_packed", x, scale, packed_weight, packed_meta, delta, bias, kernel_size, stride, padding,
                    dilation, bits, is_signed, half_even, residual, relu);
}

at::Tensor adder_linear_packed_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& packed_weight,
                                   const at::Tensor& packed_meta, const at::Tensor& delta,
                                   const c10::optional<at::Tensor>& bias, int64_t bits, bool is_signed,
                                   bool half_even) {
  TORCH_CHECK(x.dim() == 2, "adder_linear_packed: x must be (M, K), got ", x.sizes());
  const int64_t one[2] = {1, 1}, zero[2] = {0, 0};
  // (M, K) rows are the NHWC rows of an (M, K, 1, 1) image: a 1x1 convolution.
  at::Tensor y = fused_impl("adder_linear_packed", x.unsqueeze(-1).unsqueeze(-1), scale, packed_weight, packed_meta,
                            delta, bias, one, one, zero, one, bits, is_signed, half_even);
  return y.view({x.size(0), y.size(1)});
}

// Register-resident loops shaped like the micro-kernel (8 broadcast rows x 2 weight registers, no memory operands;
// the empty asm makes the inputs opaque on every step, so nothing is hoisted). They measure the instruction ceilings
// the kernels are compared with (docs/kernels.md#measured-cpu-limits):
//   "sad":      16 VPSADBW + 16 VPADDQ per step                        -> abs-differences / s
//   "minsum":   16 VPMINUB + 16 VPADDB per step, widened by VPSADBW every 16 steps (the <= 4-bit alternative)
//   "fp32_fma": 16 independent VFMADD231PS zmm chains                   -> FP32 FMAs / s
#define QK_OPAQUE8(x, w0, w1) \
  __asm__ volatile("" : "+v"(x[0]), "+v"(x[1]), "+v"(x[2]), "+v"(x[3]), "+v"(x[4]), "+v"(x[5]), "+v"(x[6]), "+v"(x[7]), "+v"(w0), "+v"(w1))

QK_TARGET_AVX512 double peak_sad_avx512(int64_t iters) {
  __m512i acc[16], x[8];
  __m512i w0 = _mm512_set1_epi8(9), w1 = _mm512_set1_epi8(10);
  for (int i = 0; i < 8; ++i) x[i] = _mm512_set1_epi8(static_cast<char>(i + 1));
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    QK_OPAQUE8(x, w0, w1);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      acc[2 * r] = _mm512_add_epi64(acc[2 * r], _mm512_sad_epu8(x[r], w0));
      acc[2 * r + 1] = _mm512_add_epi64(acc[2 * r + 1], _mm512_sad_epu8(x[r], w1));
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m512i s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_epi64(s, acc[i]);
  volatile int64_t sink = _mm512_reduce_add_epi64(s);
  (void)sink;
  return static_cast<double>(iters) * 16.0 * 64.0 / std::chrono::duration<double>(t1 - t0).count();
}

QK_TARGET_AVX512 double peak_minsum_avx512(int64_t iters) {
  __m512i acc[16], wide[16], x[8];
  __m512i w0 = _mm512_set1_epi8(9), w1 = _mm512_set1_epi8(10);
  for (int i = 0; i < 8; ++i) x[i] = _mm512_set1_epi8(static_cast<char>(i + 1));
  for (int i = 0; i < 16; ++i) acc[i] = wide[i] = _mm512_setzero_si512();
  const int64_t outer = (iters + 15) / 16;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < outer; ++it) {
    for (int step = 0; step < 16; ++step) {  // 16 x min <= 15 fits a byte for 4-bit operands
      QK_OPAQUE8(x, w0, w1);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        acc[2 * r] = _mm512_add_epi8(acc[2 * r], _mm512_min_epu8(x[r], w0));
        acc[2 * r + 1] = _mm512_add_epi8(acc[2 * r + 1], _mm512_min_epu8(x[r], w1));
      }
    }
    for (int i = 0; i < 16; ++i) {
      wide[i] = _mm512_add_epi64(wide[i], _mm512_sad_epu8(acc[i], _mm512_setzero_si512()));
      acc[i] = _mm512_setzero_si512();
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m512i s = wide[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_epi64(s, wide[i]);
  volatile int64_t sink = _mm512_reduce_add_epi64(s);
  (void)sink;
  return static_cast<double>(outer) * 16.0 * 16.0 * 64.0 / std::chrono::duration<double>(t1 - t0).count();
}

// "thermo2": 2-bit operands as 3-bit thermometer codes (|a - b| = popcount(T(a) xor T(b))), 21 per u64 lane:
// 16 VPXORQ + 16 VPOPCNTQ + 16 VPADDQ per step -> 168 abs-differences per zmm instruction triple.
QK_TARGET_AVX512 double peak_thermo2_avx512(int64_t iters) {
  __m512i acc[16], x[8];
  __m512i w0 = _mm512_set1_epi64(0x1234567), w1 = _mm512_set1_epi64(0x7654321);
  for (int i = 0; i < 8; ++i) x[i] = _mm512_set1_epi64(i * 0x1111 + 1);
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    QK_OPAQUE8(x, w0, w1);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      acc[2 * r] = _mm512_add_epi64(acc[2 * r], _mm512_popcnt_epi64(_mm512_xor_si512(x[r], w0)));
      acc[2 * r + 1] = _mm512_add_epi64(acc[2 * r + 1], _mm512_popcnt_epi64(_mm512_xor_si512(x[r], w1)));
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m512i s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_epi64(s, acc[i]);
  volatile int64_t sink = _mm512_reduce_add_epi64(s);
  (void)sink;
  return static_cast<double>(iters) * 16.0 * 168.0 / std::chrono::duration<double>(t1 - t0).count();
}

QK_TARGET_AVX512 double peak_fma_avx512(int64_t iters) {
  __m512 acc[16];
  __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+v"(a), "+v"(b));
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m512 s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, acc[i]);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return static_cast<double>(iters) * 16.0 * 16.0 / std::chrono::duration<double>(t1 - t0).count();
}

double adder_isa_peak(int64_t iters, c10::string_view loop) {
  // bounded so that no argument makes the call run for more than a few seconds
  TORCH_CHECK(iters >= 1 && iters <= 1000000000, "adder_isa_peak: iters must be in [1, 1e9], got ", iters);
  const bool sad = loop == "sad", minsum = loop == "minsum", fma = loop == "fp32_fma", thermo2 = loop == "thermo2";
  TORCH_CHECK(sad || minsum || fma || thermo2, "adder_isa_peak: loop must be 'sad', 'minsum', 'thermo2' or "
              "'fp32_fma', got '", loop, "'");
  if (cpu::best_supported_isa() != kAvx512) return 0.0;
  if (thermo2) return peak_thermo2_avx512(iters);
  return sad ? peak_sad_avx512(iters) : minsum ? peak_minsum_avx512(iters) : peak_fma_avx512(iters);
}

}  // namespace
}  // namespace adder
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("adder_l1", &quantkit::adder::adder_l1_cpu);
  m.impl("adder_linear", &quantkit::adder::adder_linear_cpu);
  m.impl("adder_l1_conv2d", &quantkit::adder::adder_l1_conv2d_cpu);
  m.impl("adder_conv2d", &quantkit::adder::adder_conv2d_cpu);
  m.impl("adder_prepack", &quantkit::adder::adder_prepack_cpu);
  m.impl("adder_conv2d_packed", &quantkit::adder::adder_conv2d_packed_cpu);
  m.impl("adder_linear_packed", &quantkit::adder::adder_linear_packed_cpu);
}

TORCH_LIBRARY_IMPL(quantkit, CompositeExplicitAutograd, m) {
  m.impl("adder_isa_peak", &quantkit::adder::adder_isa_peak);
}
