// CUDA bit packing / unpacking (layout: quantkit/ops/layout.py; schemas: kernels/register.cpp).
//   pack_bits(x (..., K) float|bool, threshold (K,)?) -> int32 (..., ceil(K/32)); bit = x >= threshold (or x).
//   unpack_bits(words (..., W), k, dtype?) -> (..., k): +1 for bit 1, -1 for bit 0 (bool: the bit).
// Packing: one warp per output word, lane l reads element 32*w + l (coalesced) and __ballot_sync forms the word.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace quantkit {
namespace cuda {
namespace {

constexpr int64_t kWordBits = 32;

inline int64_t num_words(int64_t k) { return (k + kWordBits - 1) / kWordBits; }

inline unsigned grid_for(long long work, int per_block) {
  const long long b = (work + per_block - 1) / per_block;
  return (unsigned)std::max<long long>(1, std::min<long long>(b, 1 << 20));
}

// Compare in float for the 16-bit types (exact: both sides are representable), in the type itself otherwise.
template <typename T>
struct CmpType {
  using type = float;
};
template <>
struct CmpType<double> {
  using type = double;
};

template <typename T>
__global__ void pack_bits_kernel(const T* __restrict__ x, const T* __restrict__ thr, long long rows, long long k,
                                 long long nw, uint32_t* __restrict__ out) {
  using C = typename CmpType<T>::type;
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  const long long total = rows * nw;
  // The loop bound is the same for the whole warp (gw differs per warp only), so the ballot sees all 32 lanes.
  for (long long gw = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); gw < total; gw += warps) {
    const long long r = gw / nw;
    const long long w = gw - r * nw;
    const long long i = w * kWordBits + lane;
    bool bit = false;
    if (i < k) {
      const C v = static_cast<C>(x[r * k + i]);
      const C t = thr ? static_cast<C>(thr[i]) : C(0);
      bit = v >= t;  // false for NaN
    }
    const unsigned word = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) out[gw] = word;
  }
}

__global__ void pack_bool_kernel(const bool* __restrict__ x, long long rows, long long k, long long nw,
                                 uint32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  const long long total = rows * nw;
  for (long long gw = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); gw < total; gw += warps) {
    const long long r = gw / nw;
    const long long w = gw - r * nw;
    const long long i = w * kWordBits + lane;
    const bool bit = i < k && x[r * k + i];
    const unsigned word = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) out[gw] = word;
  }
}

template <typename T>
__global__ void unpack_bits_kernel(const uint32_t* __restrict__ words, long long rows, long long k, long long nw,
                                   bool raw, T* __restrict__ out) {
  const long long total = rows * k;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const long long r = e / k;
    const long long i = e - r * k;
    const int bit = (words[r * nw + i / kWordBits] >> (i % kWordBits)) & 1u;
    out[e] = raw ? static_cast<T>(bit) : static_cast<T>(2 * bit - 1);
  }
}

at::Tensor pack_bits_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& threshold) {
  TORCH_CHECK(x_in.is_cuda(), "pack_bits (CUDA): x must be a CUDA tensor");
  TORCH_CHECK(x_in.dim() >= 1, "pack_bits: x must have at least one dimension");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kBool,
              "pack_bits: x must be a float or bool tensor, got ", dt);
  const c10::cuda::CUDAGuard guard(x_in.device());
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
  const int64_t nw = num_words(k);
  out_sizes.back() = nw;
  at::Tensor out = at::empty(out_sizes, x.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / nw;
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const unsigned blocks = grid_for(rows * nw, 8);  // 8 warps (words) per block
  if (dt == at::kBool) {
    pack_bool_kernel<<<blocks, 256, 0, stream>>>(x.data_ptr<bool>(), rows, k, nw, o);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "pack_bits_cuda", [&] {
      pack_bits_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
          x.data_ptr<scalar_t>(), thr.defined() ? thr.data_ptr<scalar_t>() : nullptr, rows, k, nw, o);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_bits_cuda(const at::Tensor& words_in, int64_t k, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(words_in.is_cuda(), "unpack_bits (CUDA): words must be a CUDA tensor");
  TORCH_CHECK(words_in.scalar_type() == at::kInt, "unpack_bits: words must be int32, got ", words_in.scalar_type());
  TORCH_CHECK(words_in.dim() >= 1, "unpack_bits: words must have at least one dimension");
  TORCH_CHECK(k >= 0 && words_in.size(-1) == num_words(k), "unpack_bits: words has ", words_in.size(-1),
              " words in its last dimension but k=", k, " needs ", num_words(k));
  const c10::cuda::CUDAGuard guard(words_in.device());
  const at::ScalarType out_dt = dtype.value_or(at::kFloat);
  const at::Tensor words = words_in.contiguous();
  auto out_sizes = words.sizes().vec();
  out_sizes.back() = k;
  at::Tensor out = at::empty(out_sizes, words.options().dtype(out_dt));
  if (out.numel() == 0) return out;
  const int64_t nw = num_words(k);
  const int64_t rows = out.numel() / k;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const unsigned blocks = grid_for(out.numel(), 256);
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, out_dt, "unpack_bits_cuda", [&] {
    unpack_bits_kernel<scalar_t><<<blocks, 256, 0, stream>>>(wp, rows, k, nw, out_dt == at::kBool,
                                                             out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CUDA, m) {
  m.impl("pack_bits", &quantkit::cuda::pack_bits_cuda);
  m.impl("unpack_bits", &quantkit::cuda::unpack_bits_cuda);
}
