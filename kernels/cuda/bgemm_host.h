// Host side of the AND-popcount implicit GEMM (kernels/cuda/bgemm.cu): one entry point that picks the fastest
// correct kernel for the device and the problem, and the small pre-passes shared by the op wrappers.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <string>

#include "cuda/bgemm_common.cuh"

namespace quantkit {
namespace cuda {

// Kernel ladder for kOpAndPopc problems (QUANTKIT_CUDA_BGEMM=auto|simt|mma|wgmma overrides it):
//   sm_90 + quantkit._C_sm90a present + its one-time self-check passed -> wgmma (b1 AND, m64n128k256)
//   sm_80+                                                              -> mma.sync m16n8k256 AND
//   otherwise                                                           -> CUDA-core popcount
// Other ops (vabsdiff4, absdiff32) always run on the CUDA-core kernel.
// `p` must be fully filled; the launch goes to the current stream of the current device.
void launch_bgemm(const BgemmParams& p);

// The path launch_bgemm takes for `p` on the current device ("simt", "mma" or "wgmma").
std::string bgemm_path(const BgemmParams& p);

// Per-row popcount of a contiguous int32 tensor viewed as (rows, wc) words -> int32 (rows,).
at::Tensor row_popcount(const at::Tensor& words, int64_t rows, int64_t wc);

// Thermometer codes of int32 values in [0, 2^e] (e = log2 code_bits, code_bits in 1..64, a power of two):
// values (rows, c) -> words (rows, ceil(c * code_bits / 32)); value v sets the low v bits of its code_bits-bit
// field; value c of a row occupies bits [c*code_bits, (c+1)*code_bits) of the row. Tail bits are 0.
at::Tensor thermometer_pack(const at::Tensor& values, int64_t code_bits);

namespace detail {
#if defined(__CUDACC__)
// Launch `kernel(p, z_base)` over the batch in chunks of 65535 (the grid's z limit).
template <typename Kernel>
void launch_batches(Kernel kernel, const BgemmParams& p, dim3 grid_xy, int block, size_t smem, cudaStream_t stream) {
  for (int zb = 0; zb < p.batch; zb += 65535) {
    const int nz = p.batch - zb < 65535 ? p.batch - zb : 65535;
    kernel<<<dim3(grid_xy.x, grid_xy.y, nz), block, smem, stream>>>(p, zb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}
#endif

// The CUDA-core kernel (bgemm_simt.cu); launch_bgemm decides when it runs.
void launch_simt(const BgemmParams& p, cudaStream_t stream);
}  // namespace detail

// Summary of the CUDA kernel configuration (sm_90a library status, self-check result) for diagnostics.
std::string backend_info();

}  // namespace cuda
}  // namespace quantkit
