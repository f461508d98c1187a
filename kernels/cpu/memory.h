// Memory hints shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace quantkit {
namespace cpu {

// A large fresh output is written once, sequentially; in a profile of the batch-16 int8 ResNet stem, faulting it in
// 4 KiB pages cost about as much as the op's GEMM, and a batch-16 binary or adder layer's 12.8 MB output pays the
// same kind of cost. Asking for transparent huge pages on its 2 MiB-aligned interior is a hint only: no effect where
// THP is off or already "always", none on memory already touched, and the values are the same.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = size_t(t.numel()) * t.element_size();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace cpu
}  // namespace quantkit
