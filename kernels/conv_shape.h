// Output size of a 2-D convolution, computed in one place for every kernel (CPU and the CUDA host wrappers) with
// the same rule as the Python side (quantkit/ops/layout.py, conv2d_output_hw, used by the wrappers and the fake
// implementations):
//   out = floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1
// with FLOOR division (a kernel larger than the padded input gives out <= 0, never a truncated 1) and every
// intermediate overflow-checked in int64 (a wrapped intermediate must not pass the bounds check).
// Host-only plain C++ (no compiler builtins), so nvcc compiles it too.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace quantkit {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// a * b for a, b >= 0; false when the product exceeds int64.
inline bool mul_nonneg(int64_t a, int64_t b, int64_t* out) {
  if (a != 0 && b > kInt64Max / a) return false;
  *out = a * b;
  return true;
}

// a + b for a, b >= 0; false when the sum exceeds int64.
inline bool add_nonneg(int64_t a, int64_t b, int64_t* out) {
  if (b > kInt64Max - a) return false;
  *out = a + b;
  return true;
}

// One axis (see above). Checks kernel >= 1, stride >= 1, dilation >= 1, padding >= 0; returns the floor-divided
// length, which is <= 0 when the kernel does not fit (the caller reports that with both axes).
inline int64_t conv_out_size(const char* op, const char* axis, int64_t size, int64_t kernel, int64_t stride,
                             int64_t padding, int64_t dilation) {
  TORCH_CHECK(kernel >= 1, op, ": the kernel has ", kernel, " taps along ", axis, "; it needs at least 1");
  TORCH_CHECK(stride >= 1 && dilation >= 1 && padding >= 0, op, ": need stride >= 1, dilation >= 1 and padding >= 0",
              " along ", axis, ", got stride ", stride, ", dilation ", dilation, ", padding ", padding);
  TORCH_CHECK(size >= 0, op, ": negative input size ", size);
  int64_t two_pad = 0, padded = 0, reach = 0;
  TORCH_CHECK(mul_nonneg(padding, 2, &two_pad) && add_nonneg(size, two_pad, &padded), op, ": padding ", padding,
              " along ", axis, " overflows int64 (input size ", size, ")");
  TORCH_CHECK(mul_nonneg(dilation, kernel - 1, &reach) && reach < kInt64Max, op, ": dilation ", dilation,
              " x (kernel ", kernel, " - 1) along ", axis, " overflows int64");
  const int64_t span = reach + 1;  // input extent covered by one output position
  if (padded >= span) return (padded - span) / stride + 1;
  return 1 - (span - padded + stride - 1) / stride;  // floor of a negative quotient, plus 1 (<= 0)
}

struct ConvOut {
  int64_t h, w;
};

// Both axes; raises unless the output has at least one row and one column. stride/padding/dilation: 2 values.
inline ConvOut conv2d_out_hw(const char* op, int64_t H, int64_t W, int64_t kh, int64_t kw, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 values each");
  const int64_t ho = conv_out_size(op, "height", H, kh, stride[0], padding[0], dilation[0]);
  const int64_t wo = conv_out_size(op, "width", W, kw, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(ho >= 1 && wo >= 1, op, ": input ", H, "x", W, " is too small for kernel ", kh, "x", kw, " with stride (",
              stride[0], ", ", stride[1], "), padding (", padding[0], ", ", padding[1], ") and dilation (",
              dilation[0], ", ", dilation[1], "): the output would be ", ho, "x", wo,
              "; enlarge the input or the padding");
  return {ho, wo};
}

// Product of non-negative sizes, raising when it exceeds int64 (what = what is being counted, for the message).
inline int64_t checked_numel(const char* op, const char* what, std::initializer_list<int64_t> dims) {
  int64_t n = 1;
  for (int64_t d : dims) TORCH_CHECK(d >= 0 && mul_nonneg(n, d, &n), op, ": the number of ", what, " overflows int64");
  return n;
}

}  // namespace quantkit
