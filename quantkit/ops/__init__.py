"""Kernels on packed / integer operands: compiled ``torch.ops.quantkit.*`` ops with pure-PyTorch references.

The bit layout of every packed tensor is written down once, in :mod:`quantkit.ops.layout`.
"""
from quantkit.ops._dispatch import cpu_amx, cpu_amx_supported, cpu_isa, supported_cpu_isas
from quantkit.ops._load import status as kernel_status  # which compiled extensions loaded (quantkit info)
from quantkit.ops.layout import WORD_BITS, WORD_DTYPE, conv2d_output_size, num_words
from quantkit.ops.packing import (
    pack_activation_nhwc,
    pack_bits,
    pack_bits_reference,
    pack_conv_weight,
    pack_linear_weight,
    unpack_bits,
    unpack_bits_reference,
)
from quantkit.ops.binary import (
    binary_bmm,
    binary_bmm_01,
    binary_bmm_01_reference,
    binary_bmm_reference,
    binary_conv2d,
    binary_conv2d_prepacked,
    binary_conv2d_prepacked_reference,
    binary_conv2d_reference,
    binary_conv_prepack,
    binary_conv_prepack_amx,
    binary_conv_prepack_amx_reference,
    binary_conv_prepack_reference,
    binary_linear,
    binary_linear_reference,
)
from quantkit.ops.adder import adder_conv2d, adder_l1, adder_l1_conv2d, adder_linear  # noqa: F401
from quantkit.ops.elementwise import (maxout, maxout_reference, quantize_groups,  # noqa: F401,E402
                                     quantize_groups_reference)
from quantkit.ops.pooling import (  # noqa: F401,E402
    conv_max_pool2d_nhwc,
    conv_max_pool2d_nhwc_reference,
    max_pool2d_nhwc,
    max_pool2d_nhwc_reference,
    pack_stem_weight,
)
