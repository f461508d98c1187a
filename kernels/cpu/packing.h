// Float rows to packed bits, shared by pack_bits (packing.cpp) and kernels that pack their own output.
#pragma once

#include <cstdint>

#include "cpu/cpu_features.h"

namespace quantkit {
namespace cpu {

// Rows [r0, r1) of float32 x (rows x k, row-major) into rows x ceil(k/32) int32 words: bit i % 32 of word i / 32 is
// x[i] >= thr[i] (thr nullptr: 0; false for NaN), the last word's bits past k zero (quantkit/ops/layout.py).
void pack_float_rows(const float* x, const float* thr, int64_t k, uint32_t* out, int64_t r0, int64_t r1, Isa isa);

}  // namespace cpu
}  // namespace quantkit
