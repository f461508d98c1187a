// CPU bit packing / unpacking (layout: quantkit/ops/layout.py and kernels/register.cpp).
//   pack_bits(x (..., K) float|bool, threshold (K,)?) -> int32 (..., ceil(K/32)); bit = x >= threshold (or x).
//   unpack_bits(words (..., W), k, dtype?) -> (..., k): +1 for bit 1, -1 for bit 0 (bool: the bit).
// float32 and bool inputs have vectorised paths (AVX-512: one masked compare gives 16 bits; AVX2: compare +
// movemask); other float dtypes use a scalar loop comparing in their own precision.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "cpu/cpu_features.h"
#include "cpu/packing.h"

namespace quantkit {
namespace cpu {
namespace {

constexpr int64_t kWordBits = 32;

inline int64_t num_words(int64_t k) { return (k + kWordBits - 1) / kWordBits; }

// ---------------------------------------------------------------------------------------------- float32 rows
// thr == nullptr means threshold 0. Each function packs `rows` rows of length k into rows x num_words(k) words.
void pack_f32_portable(const float* x, const float* thr, int64_t k, uint32_t* out) {
  const int64_t nw = num_words(k);
  for (int64_t w = 0; w < nw; ++w) {
    uint32_t word = 0;
    const int64_t end = std::min<int64_t>(k, (w + 1) * kWordBits);
    for (int64_t i = w * kWordBits; i < end; ++i) {
      const float t = thr ? thr[i] : 0.0f;
      word |= static_cast<uint32_t>(x[i] >= t) << (i - w * kWordBits);
    }
    out[w] = word;
  }
}

#if QUANTKIT_X86
QK_TARGET_AVX2 void pack_f32_avx2(const float* x, const float* thr, int64_t k, uint32_t* out) {
  const int64_t full = k / kWordBits;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t w = 0; w < full; ++w) {
    uint32_t word = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t i = w * kWordBits + q * 8;
      const __m256 t = thr ? _mm256_loadu_ps(thr + i) : zero;
      const __m256 ge = _mm256_cmp_ps(_mm256_loadu_ps(x + i), t, _CMP_GE_OQ);  // exact for +-0, false for NaN
      word |= static_cast<uint32_t>(_mm256_movemask_ps(ge)) << (q * 8);
    }
    out[w] = word;
  }
  if (full * kWordBits < k) pack_f32_portable(x + full * kWordBits, thr ? thr + full * kWordBits : nullptr,
                                              k - full * kWordBits, out + full);
}

QK_TARGET_AVX512 void pack_f32_avx512(const float* x, const float* thr, int64_t k, uint32_t* out) {
  const int64_t nw = num_words(k);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t w = 0; w < nw; ++w) {
    uint32_t word = 0;
    for (int q = 0; q < 2; ++q) {
      const int64_t i = w * kWordBits + q * 16;
      const int64_t left = k - i;
      if (left <= 0) break;
      const __mmask16 lm = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(lm, x + i);
      const __m512 t = thr ? _mm512_maskz_loadu_ps(lm, thr + i) : zero;
      word |= static_cast<uint32_t>(_mm512_mask_cmp_ps_mask(lm, v, t, _CMP_GE_OQ)) << (q * 16);
    }
    out[w] = word;
  }
}
// Rows [r0, r1) when k is a multiple of 32 (every activation of a binary ResNet): unmasked loads, one loop over the
// rows instead of a call per row (the per-row call and mask set-up cost more than the compares at 64 channels).
QK_TARGET_AVX512 void pack_f32_rows_avx512(const float* x, const float* thr, int64_t k, uint32_t* out, int64_t r0,
                                           int64_t r1) {
  const int64_t nw = k / kWordBits;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * k;
    uint32_t* o = out + r * nw;
    for (int64_t w = 0; w < nw; ++w) {
      const int64_t i = w * kWordBits;
      const __m512 t0 = thr ? _mm512_loadu_ps(thr + i) : zero, t1 = thr ? _mm512_loadu_ps(thr + i + 16) : zero;
      const uint32_t lo = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + i), t0, _CMP_GE_OQ);
      const uint32_t hi = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + i + 16), t1, _CMP_GE_OQ);
      o[w] = lo | (hi << 16);
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------- bool rows
void pack_bool_portable(const uint8_t* x, int64_t k, uint32_t* out) {
  const int64_t nw = num_words(k);
  for (int64_t w = 0; w < nw; ++w) {
    uint32_t word = 0;
    const int64_t end = std::min<int64_t>(k, (w + 1) * kWordBits);
    for (int64_t i = w * kWordBits; i < end; ++i) word |= static_cast<uint32_t>(x[i] != 0) << (i - w * kWordBits);
    out[w] = word;
  }
}

#if QUANTKIT_X86
QK_TARGET_AVX2 void pack_bool_avx2(const uint8_t* x, int64_t k, uint32_t* out) {
  const int64_t full = k / kWordBits;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t w = 0; w < full; ++w) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + w * kWordBits));
    out[w] = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, zero)));
  }
  if (full * kWordBits < k) pack_bool_portable(x + full * kWordBits, k - full * kWordBits, out + full);
}

QK_TARGET_AVX512 void pack_bool_avx512(const uint8_t* x, int64_t k, uint32_t* out) {
  const int64_t nw = num_words(k);
  for (int64_t w = 0; w < nw; w += 2) {
    const int64_t i = w * kWordBits;
    const int64_t left = k - i;
    const __mmask64 lm = left >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << left) - 1);
    const __m512i v = _mm512_maskz_loadu_epi8(lm, x + i);
    const uint64_t bits = _mm512_test_epi8_mask(v, v);
    out[w] = static_cast<uint32_t>(bits);
    if (w + 1 < nw) out[w + 1] = static_cast<uint32_t>(bits >> 32);
  }
}
#endif

// ---------------------------------------------------------------------------------------------- other floats
template <typename T>
void pack_generic(const T* x, const T* thr, int64_t k, uint32_t* out) {
  const int64_t nw = num_words(k);
  for (int64_t w = 0; w < nw; ++w) {
    uint32_t word = 0;
    const int64_t end = std::min<int64_t>(k, (w + 1) * kWordBits);
    for (int64_t i = w * kWordBits; i < end; ++i) {
      // compare in float for half types (exact), in the type itself otherwise
      using Acc = std::conditional_t<std::is_same<T, double>::value, double, float>;
      const Acc t = thr ? static_cast<Acc>(thr[i]) : Acc(0);
      word |= static_cast<uint32_t>(static_cast<Acc>(x[i]) >= t) << (i - w * kWordBits);
    }
    out[w] = word;
  }
}

}  // namespace

// Rows [r0, r1) of float32 x (rows x k) against a per-element threshold (nullptr: 0) into rows x ceil(k/32) words
// (cpu/packing.h): the float path of pack_bits, also used by kernels that pack their own output (the stem kernel).
void pack_float_rows(const float* x, const float* thr, int64_t k, uint32_t* out, int64_t r0, int64_t r1, Isa isa) {
  const int64_t nw = num_words(k);
  auto fn = pack_f32_portable;
#if QUANTKIT_X86
  if (isa == Isa::Avx512 && k % kWordBits == 0) return pack_f32_rows_avx512(x, thr, k, out, r0, r1);
  if (isa == Isa::Avx512) fn = pack_f32_avx512;
  else if (isa == Isa::Avx2) fn = pack_f32_avx2;
#endif
  (void)isa;
  for (int64_t r = r0; r < r1; ++r) fn(x + r * k, thr, k, out + r * nw);
}

namespace {

at::Tensor pack_bits_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& threshold) {
  TORCH_CHECK(x_in.dim() >= 1, "pack_bits: x must have at least one dimension");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kBool,
              "pack_bits: x must be a float or bool tensor, got ", dt);
  const int64_t k = x_in.size(-1);
  at::Tensor thr;
  if (threshold.has_value()) {
    TORCH_CHECK(dt != at::kBool, "pack_bits: threshold is not allowed for bool inputs");
    TORCH_CHECK(threshold->dim() == 1 && threshold->size(0) == k, "pack_bits: threshold must have shape (", k,
                "), got ", threshold->sizes());
    TORCH_CHECK(threshold->device() == x_in.device(), "pack_bits: threshold and x must be on the same device");
    thr = threshold->to(dt).contiguous();
  }
  const at::Tensor x = x_in.contiguous();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = num_words(k);
  at::Tensor out = at::empty(out_sizes, x.options().dtype(at::kInt));
  const int64_t nw = num_words(k);
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / nw;
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const Isa isa = active_isa();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1));
  if (dt == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    const float* tp = thr.defined() ? thr.data_ptr<float>() : nullptr;
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { pack_float_rows(xp, tp, k, o, b, e, isa); });
  } else if (dt == at::kBool) {
    const uint8_t* xp = reinterpret_cast<const uint8_t*>(x.data_ptr<bool>());
    auto fn = pack_bool_portable;
#if QUANTKIT_X86
    if (isa == Isa::Avx512) fn = pack_bool_avx512;
    else if (isa == Isa::Avx2) fn = pack_bool_avx2;
#endif
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) fn(xp + r * k, k, o + r * nw);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "pack_bits", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* tp = thr.defined() ? thr.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) pack_generic<scalar_t>(xp + r * k, tp, k, o + r * nw);
      });
    });
  }
  return out;
}

at::Tensor unpack_bits_cpu(const at::Tensor& words_in, int64_t k, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(words_in.scalar_type() == at::kInt, "unpack_bits: words must be int32, got ", words_in.scalar_type());
  TORCH_CHECK(words_in.dim() >= 1, "unpack_bits: words must have at least one dimension");
  TORCH_CHECK(k >= 0 && words_in.size(-1) == num_words(k), "unpack_bits: words has ", words_in.size(-1),
              " words in its last dimension but k=", k, " needs ", num_words(k));
  const at::ScalarType out_dt = dtype.value_or(at::kFloat);
  const at::Tensor words = words_in.contiguous();
  auto out_sizes = words.sizes().vec();
  out_sizes.back() = k;
  at::Tensor out = at::empty(out_sizes, words.options().dtype(out_dt));
  if (out.numel() == 0) return out;
  const int64_t nw = num_words(k);
  const int64_t rows = out.numel() / k;
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, out_dt, "unpack_bits", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool raw = out_dt == at::kBool;
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / k), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const uint32_t* w = wp + r * nw;
        scalar_t* dst = op + r * k;
        for (int64_t i = 0; i < k; ++i) {
          const int bit = (w[i / kWordBits] >> (i % kWordBits)) & 1u;
          dst[i] = raw ? static_cast<scalar_t>(bit) : static_cast<scalar_t>(2 * bit - 1);
        }
      }
    });
  });
  return out;
}

std::string cpu_isa() {
  const Isa isa = active_isa();
  return (isa == Isa::Avx512 && use_amx()) ? "amx" : isa_name(isa);
}

bool cpu_amx() { return active_isa() == Isa::Avx512 && amx_for_prepacked_conv(); }

}  // namespace
}  // namespace cpu
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("pack_bits", &quantkit::cpu::pack_bits_cpu);
  m.impl("unpack_bits", &quantkit::cpu::unpack_bits_cpu);
}

TORCH_LIBRARY_IMPL(quantkit, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &quantkit::cpu::cpu_isa);
  m.impl("cpu_amx", &quantkit::cpu::cpu_amx);
}
