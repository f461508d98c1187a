// The single op-registration file: every torch.ops.quantkit.* schema is declared here, once.
// Implementations register per backend with TORCH_LIBRARY_IMPL(quantkit, CPU|CUDA, m) in kernels/cpu and
// kernels/cuda; fake (meta) implementations live in quantkit/ops (torch.library.register_fake).
//
// Bit layout shared by CPU, CUDA and ONNX export (also documented in quantkit/ops/layout.py):
//   values are packed along the reduction dimension (the last dimension; channels for NHWC activations)
//   into little-endian int32 words: element k sits in bit (k % 32) of word (k / 32);
//   bit 1 means +1 (x >= 0), bit 0 means -1; pack_bits writes the tail of the last word zero, and every op
//   ignores (masks) the tail bits of words from elsewhere, as the references do.
#include <torch/library.h>
#include <Python.h>

// Importing quantkit._C runs the static TORCH_LIBRARY initializers below; no pybind11 is needed.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(quantkit, m) {
  // ---- bit packing -------------------------------------------------------------------------------------
  // pack_bits: float (bit = x >= threshold, threshold (K,) defaults to 0) or bool (bit = x) tensor (..., K)
  //            -> int32 (..., ceil(K/32)). Any strides.
  // unpack_bits: int32 (..., ceil(k/32)) -> (..., k) of +1 (bit 1) / -1 (bit 0) in dtype (default float32;
  //            bool gives the raw bits).
  // cpu_isa: the CPU instruction-set level the kernels use now ("avx512", "avx2", "portable"; see
  //            QUANTKIT_CPU_ISA in kernels/cpu/cpu_features.h).
  m.def("pack_bits(Tensor x, Tensor? threshold=None) -> Tensor");
  m.def("unpack_bits(Tensor words, int k, ScalarType? dtype=None) -> Tensor");
  m.def("cpu_isa() -> str");
  // cpu_amx: whether binary_conv2d_prepacked runs its AMX path now (AMX-INT8 tiles available and usable, and
  //            QUANTKIT_CPU_ISA unset, "auto" or "amx").
  m.def("cpu_amx() -> bool");

  // ---- binary (XNOR / AND-popcount) GEMM, conv2d, attention products ------------------------------------
  // All operands are packed int32 words (layout above), contiguous; per-channel vectors are float32 (N,).
  // Epilogue (missing scale = 1, other missing terms = 0), per output position p and channel o, sums over the
  // VALID taps only (zero padding is exact: a padded tap is 0, neither +1 nor -1):
  //   y[p,o] = scale[o]*sum(s_a s_w) + act_sum_scale[o]*sum(s_a) + weight_sum_scale[o]*sum(s_w)
  //            + count_scale[o]*n_valid + bias[o]          (n_valid = valid taps * c_in)
  // With threshold (N,) given the result is packed bits (y >= threshold[o]) along the channels instead.
  // binary_linear: x (..., W), w (N, W), W = ceil(k/32) -> float32 (..., N) | int32 (..., ceil(N/32)).
  m.def(
      "binary_linear(Tensor x, Tensor w, int k, Tensor? scale=None, Tensor? act_sum_scale=None, "
      "Tensor? bias=None, Tensor? threshold=None) -> Tensor");
  // binary_conv2d: x NHWC (N, H, W, ceil(c_in/32)), w OHWI (C_out, kh, kw, ceil(c_in/32))
  //   -> float32 (N, C_out, Ho, Wo) in channels_last memory | int32 NHWC (N, Ho, Wo, ceil(C_out/32)).
  m.def(
      "binary_conv2d(Tensor x, Tensor w, int c_in, int[2] stride, int[2] padding, int[2] dilation, "
      "Tensor? scale=None, Tensor? act_sum_scale=None, Tensor? weight_sum_scale=None, Tensor? count_scale=None, "
      "Tensor? bias=None, Tensor? threshold=None) -> Tensor");
  // binary_conv_prepack: OHWI packed weights (C_out, kh, kw, ceil(c_in/32)) -> (panels, wpop), the layout the CPU
  //   micro-kernel reads (docs/kernels.md#prepacked-weights): panels int32 (ceil(C_out/16), kh*kw*ceil(c_in/32), 16),
  //   wpop int32 (ceil(C_out/16), kh*kw + 1, 16) the per-tap weight popcounts and (last row) their sums. Deploy
  //   layers call it once, when they are built, and keep both as buffers.
  m.def("binary_conv_prepack(Tensor w, int c_in) -> (Tensor, Tensor)");
  // binary_conv2d_prepacked: binary_conv2d on prepacked weights with a fused epilogue, per position and channel:
  //   y = (the epilogue above); y += residual (float32 (N, C_out, Ho, Wo), when given); y = Maxout(y) with slopes
  //   maxout_pos / maxout_neg (when given); returns (y as float32 (N, C_out, Ho, Wo) channels_last if float_out,
  //   else an empty tensor; packed bits y >= threshold NHWC (N, Ho, Wo, ceil(C_out/32)) if threshold, else empty).
  m.def(
      "binary_conv2d_prepacked(Tensor x, Tensor panels, Tensor wpop, int c_in, int c_out, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, Tensor? scale=None, Tensor? act_sum_scale=None, "
      "Tensor? weight_sum_scale=None, Tensor? count_scale=None, Tensor? bias=None, Tensor? residual=None, "
      "Tensor? maxout_pos=None, Tensor? maxout_neg=None, Tensor? threshold=None, bool float_out=True, "
      "Tensor? amx_weights=None) -> (Tensor, Tensor)");
  // binary_conv_prepack_amx: OHWI packed weights -> int64 (NBp, ceil(c_in/64)*kh*kw, 16), the bit masks of the
  //   int8 weight tiles binary_conv2d_prepacked's AMX path loads (NBp = ceil(C_out/16) rounded up to even; layout
  //   in kernels/cpu/binary.cpp). Passed as amx_weights, they make binary_conv2d_prepacked run on AMX tiles where
  //   the CPU has them (and QUANTKIT_CPU_ISA does not ask for a lower level); elsewhere they are ignored.
  m.def("binary_conv_prepack_amx(Tensor w, int c_in) -> Tensor");
  // binary_bmm: a (B, M, W), b (B, N, W), +-1 x +-1 -> int32 (B, M, N) = k - 2*popcount(a ^ b)  (Q_b K_b^T).
  m.def("binary_bmm(Tensor a, Tensor b, int k) -> Tensor");
  // binary_bmm_01: a in {0,1} (B, M, W), b in {+-1} (B, N, W) -> int32 (B, M, N) = 2*popc(a & b) - popc(a)
  //   (BiViT A_b V_b with V_b transposed and packed along tokens).
  m.def("binary_bmm_01(Tensor a, Tensor b, int k) -> Tensor");
  // binary_popcount_peak: bit-MAC/s of a register-resident XOR+POPCOUNT+ADD loop of the active CPU ISA, summed
  //   over at::get_num_threads() concurrent threads (the ceiling benchmarks/kernels_cpu.py compares against);
  //   iters in [1, 1e9] (so a call ends within seconds), the same for adder_isa_peak.
  m.def("binary_popcount_peak(int iters) -> float");

  // ---- fused elementwise ops of deploy models -----------------------------------------------------------
  // maxout: y = x * (x > 0 ? pos[c] : neg[c]) per channel c = dim 1 (AdaBin's Maxout, one memory pass)
  m.def("maxout(Tensor x, Tensor pos, Tensor neg) -> Tensor");
  // quantize_groups: (G, *x.shape) int8 (signed) / uint8 codes of x on each group's grid (AdderNet PTQ activations)
  m.def("quantize_groups(Tensor x, Tensor scale, int bits, bool is_signed, bool half_even) -> Tensor");
  // max_pool2d_nhwc: F.max_pool2d(x, kernel_size, stride, padding) (dilation 1, floor output size), then relu when
  //   relu=True, bit for bit (NaN, signed zeros), without indices: x float32 (N, C, H, W) channels_last (a
  //   contiguous NCHW x is copied first) -> float32 (N, C, Ho, Wo) channels_last (quantkit/ops/pooling.py).
  // max_pool2d_nhwc_into: the same written into out (float32 (N, C, Ho, Wo), contiguous in channels_last memory,
  //   e.g. a batch slice of a bigger output), returning nothing so that functionalization can handle the mutation.
  m.def("max_pool2d_nhwc(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool relu=False) -> Tensor");
  m.def("max_pool2d_nhwc_into(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool relu, "
        "Tensor(a!) out) -> ()");
  // conv_max_pool2d_nhwc: max_pool2d_nhwc(conv2d(x, w, bias, conv_stride, conv_padding), kernel_size, stride,
  //   padding, relu) in one kernel (a network stem: few input channels); weight prepacked (KH, KW * C_in, C_out) by
  //   quantkit.ops.pack_stem_weight; x float32 (N, C_in, H, W) -> float32 channels_last (quantkit/ops/pooling.py),
  //   and with a threshold (C_out) also pack_bits(y >= threshold) as (N, Ho, Wo, ceil(C_out/32)) int32 (else empty).
  m.def("conv_max_pool2d_nhwc(Tensor x, Tensor weight, Tensor? bias, int[2] conv_stride, int[2] conv_padding, "
        "int[2] kernel_size, int[2] stride, int[2] padding, bool relu, Tensor? threshold=None) -> (Tensor, Tensor)");

  // ---- integer l1 (adder) GEMM and conv2d ---------------------------------------------------------------
  // S[m, o] = sum_k |xq[group_index[o], m, k] - w_mult * wq[o, k]|  (exact, int32);  Y = -delta[o] * S + bias[o]
  // (float32). xq carries a leading group dim G (activations re-quantized once per group); w_mult is 1 (signed form
  // |q_x - q_w|) or 2 (unsigned code form |q_x - 2 q_w|). Any integer dtypes. Conv: zero padding means q_x = 0 at
  // padded taps; xq (G, N, C, H, W), wq (Cout, C, kh, kw); outputs (N, Cout, Ho, Wo) in channels-last memory format.
  // Semantics, references and fake impls: quantkit/ops/adder.py.
  m.def("adder_l1(Tensor xq, Tensor wq, Tensor group_index, int w_mult=1) -> Tensor");
  m.def("adder_linear(Tensor xq, Tensor wq, Tensor group_index, Tensor delta, Tensor? bias, int w_mult=1) -> Tensor");
  m.def("adder_l1_conv2d(Tensor xq, Tensor wq, Tensor group_index, int[2] stride=1, int[2] padding=0, "
        "int[2] dilation=1, int w_mult=1) -> Tensor");
  m.def("adder_conv2d(Tensor xq, Tensor wq, Tensor group_index, Tensor delta, Tensor? bias, int[2] stride=1, "
        "int[2] padding=0, int[2] dilation=1, int w_mult=1) -> Tensor");
  // Benchmark helper: rate of a register-resident loop on the calling thread (AVX-512; 0 without it): "sad"
  // (VPSADBW+VPADDQ, abs-differences/s), "minsum" (VPMINUB+VPADDB, the <= 4-bit alternative, abs-differences/s),
  // "thermo2" (VPXORQ+VPOPCNTQ+VPADDQ on 3-bit thermometer codes of 2-bit values, abs-differences/s),
  // "fp32_fma" (VFMADD231PS, FMAs/s): the ceilings the adder kernels are compared with.
  m.def("adder_isa_peak(int iters, str loop) -> float");
  // Deploy path (CPU): weights packed once, activation re-quantization fused into the kernel's input side.
  // adder_prepack: wq (N, K) or (Cout, C, kh, kw) integer codes, group_index (Cout,), w_mult, the activation code
  //   grid [x_lo, x_hi] (must hold 0 and span <= 256 integers), the tap-row form ("bytes", "thermometer" for grids of
  //   <= 4 values, "auto": thermometer where it is faster) -> [packed_weight uint8 (NB kh kw Cp/8 128,) flat,
  //   packed_meta int32 (4, max(16 NB, 16)): sorted lanes' channel, group, clamp correction, header]
  //   (NB = ceil(Cout/16); layout in kernels/cpu/adder.cpp). Deploy layers keep both as buffers.
  // adder_conv2d_packed / adder_linear_packed: float32 x (N, C, H, W) / (M, K) is re-quantized per group exactly as
  //   quantize_groups(x, scale, bits, is_signed, half_even) and fed to the l1 kernel; output as adder_conv2d /
  //   adder_linear, and NaN wherever a window (a row) reads a NaN input, as the float model gives. The conv's
  //   optional block epilogue: y += residual (float32, the output's shape), then y = relu(y) when relu (torch's relu:
  //   NaN and -0.0 pass), the unfused block's "out += identity; relu(out)" in the same float operations.
  m.def("adder_prepack(Tensor wq, Tensor group_index, int w_mult, int x_lo, int x_hi, str form=\"auto\") -> Tensor[]");
  m.def("adder_conv2d_packed(Tensor x, Tensor scale, Tensor packed_weight, Tensor packed_meta, Tensor delta, "
        "Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int bits, bool is_signed, "
        "bool half_even, Tensor? residual=None, bool relu=False) "
        "-> Tensor");
  m.def("adder_linear_packed(Tensor x, Tensor scale, Tensor packed_weight, Tensor packed_meta, Tensor delta, "
        "Tensor? bias, int bits, bool is_signed, bool half_even) -> Tensor");
}
