from quantkit.ops.adder import adder_conv2d, adder_l1, adder_l1_conv2d, adder_linear  # noqa: F401
