"""Brevitas W8A8 / W4A4 QCDQ exports of the digits CNN, for benchmarks/uniform_vs_ort_quantize.py. Runs in a
separate environment with brevitas installed (not a quantkit dependency):

    /tmp/brevitas-venv/bin/python benchmarks/brevitas_qcdq.py STATE_DICT.pt CALIB.pt OUT_DIR

The float CNN's weights (a ``DigitsCNN(width=32)`` state dict) are loaded with each BatchNorm folded into the conv
before it (what quantkit's uniform schemes do), into Brevitas layers: per-channel float-scaled weights, per-tensor
activations (signed input quantizer, unsigned after each ReLU), int32 bias; activation ranges from Brevitas'
calibration mode on the calibration batches. Prints ``file<TAB>key<TAB>path`` per export.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def folded(state: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv ``features.{i}`` with BatchNorm ``features.{i+1}`` folded in (inference statistics)."""
    w, b = state[f"features.{i}.weight"], state[f"features.{i}.bias"]
    bn = {k: state[f"features.{i + 1}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
    g = bn["weight"] / torch.sqrt(bn["running_var"] + 1e-5)
    return w * g.view(-1, 1, 1, 1), (b - bn["running_mean"]) * g + bn["bias"]


def build(bits: int, state: dict) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int32Bias, Uint8ActPerTensorFloat

    widths = [(1, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1)]
    layers: list[nn.Module] = [qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=bits,
                                                 return_quant_tensor=True)]
    for i, (cin, cout, stride) in enumerate(widths):
        conv = qnn.QuantConv2d(cin, cout, 3, stride=stride, padding=1, bias=True, weight_quant=Int8WeightPerChannelFloat,
                               weight_bit_width=bits, bias_quant=Int32Bias, return_quant_tensor=False)
        w, b = folded(state, 3 * i)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        layers += [conv, qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=bits, return_quant_tensor=True)]
    fc = qnn.QuantLinear(64 * 16, 10, bias=True, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits,
                         bias_quant=Int32Bias, return_quant_tensor=False)
    with torch.no_grad():
        fc.weight.copy_(state["classifier.weight"])
        fc.bias.copy_(state["classifier.bias"])
    return nn.Sequential(*layers, nn.Flatten(1), fc).eval()


def main(state_path: str, calib_path: str, out_dir: str) -> None:
    from brevitas.export import export_onnx_qcdq
    from brevitas.graph.calibrate import calibration_mode

    state = torch.load(state_path, weights_only=True)
    calib = torch.load(calib_path, weights_only=True)
    for bits in (8, 4):
        model = build(bits, state)
        with torch.no_grad(), calibration_mode(model):
            for batch in calib.split(64):
                model(batch)
        model.eval()
        path = f"{out_dir}/digits_brevitas_w{bits}a{bits}.onnx"
        export_onnx_qcdq(model, args=calib[:2], export_path=path, input_names=["input"], output_names=["output"],
                         dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                         dynamo=False)
        print(f"file\tBrevitas QCDQ w{bits}a{bits}\t{path}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
