"""Uniform (w8a8, w4a4) ONNX that onnxruntime runs as integer: every conv of a ResNet becomes QLinearConv (the
convs feeding a residual Add round their output to an 8-bit grid, in simulation too), the graph cleanup after the QDQ
emitters is exact, and the layer-wise checks allow exactly one step of a layer's output grid."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import quantkit
from quantkit.errors import ConfigError
from quantkit.export import export_onnx
from quantkit.export.emit.uniform import integer_friendly_cleanup
from quantkit.export.verify import layer_tolerance, ort_session

from conftest import settle_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

RESNET_RESIDUAL_CONVS = (["conv1"] + [f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)]
                         + [f"layer{i}.0.downsample.0" for i in range(2, 5)])


def optimized_op_types(path: Path, tmp_path: Path) -> list[str]:
    """Op types of the graph onnxruntime runs (its optimizer's output, saved by the session)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return settle_bn(torchvision.models.resnet18(num_classes=10), (3, 32, 32))


def _quantize(model: nn.Module, scheme: str, shape: tuple, **overrides) -> nn.Module:
    calib = [torch.randn(8, *shape) for _ in range(2)]
    return quantkit.quantize(model, scheme, calib, progress=False, **overrides)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4"])
def test_resnet18_every_conv_runs_as_qlinearconv(resnet18, tmp_path, scheme):
    """All 20 convs of torchvision's ResNet-18 (stem, both convs of each block, the 3 downsample convs) become
    QLinearConv in onnxruntime's optimized graph, the classifier QGemm, the stem MaxPool runs on uint8 codes; no float
    Conv is left. Without the residual output grid (quantize_residual=False) only the 8 convs whose output feeds the
    next conv's QuantizeLinear are fused."""
    torch.manual_seed(1)
    q = _quantize(resnet18, scheme, (3, 32, 32))
    path = tmp_path / "r18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ResNet-18 at random init amplifies float rounding
        res = export_onnx(q, (torch.randn(2, 3, 32, 32),), path, quiet=True, allow_mismatch=True)
    # the layer-wise checks passed (otherwise the export raises): each layer matches within its tolerance
    assert res.agreement.deploy_vs_onnxruntime is not None
    convs = sum(isinstance(m, nn.Conv2d) for m in resnet18.modules())
    assert convs == 20
    ops = optimized_op_types(path, tmp_path)
    assert ops.count("QLinearConv") == convs, ops
    assert not {"Conv", "FusedConv", "BatchNormalization"} & set(ops), ops
    assert "QGemm" in ops and "Gemm" not in ops, ops
    # the stem's MaxPool reads codes straight from the stem's QLinearConv (no DequantizeLinear before it)
    opt = onnx.load(str(tmp_path / "optimized.onnx")).graph
    producer = {o: n.op_type for n in opt.node for o in n.output}
    pools = [n for n in opt.node if "MaxPool" in n.op_type]
    assert len(pools) == 1 and producer[pools[0].input[0]] == "QLinearConv", [producer[pools[0].input[0]]]

    plain = _quantize(resnet18, scheme, (3, 32, 32), quantize_residual=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        export_onnx(plain, (torch.randn(2, 3, 32, 32),), tmp_path / "plain.onnx", quiet=True, allow_mismatch=True)
    ops_plain = optimized_op_types(tmp_path / "plain.onnx", tmp_path)
    assert ops_plain.count("QLinearConv") == convs - len(RESNET_RESIDUAL_CONVS), ops_plain


def test_residual_pass_rounds_exactly_the_convs_feeding_an_add(resnet18):
    """The convs whose output reaches a residual Add (through folded BatchNorms, ReLU, MaxPool) get an 8-bit
    output grid; the stem's includes its ReLU (relu(y) is rounded, the model's ReLU is then the identity); the
    first conv of each block (its output feeds the next conv's quantizer) stays as it was."""
    q = _quantize(resnet18, "w8a8", (3, 32, 32))
    rounded = {n: m for n, m in q.named_modules() if getattr(m, "output_bits", None) is not None}
    assert sorted(rounded) == sorted(RESNET_RESIDUAL_CONVS)
    assert all(m.output_bits == 8 and bool(m.out_ready) for m in rounded.values())
    assert [n for n, m in rounded.items() if m.output_relu] == ["conv1"]
    assert float(q.conv1.out_zero_point) == 0  # relu(y) >= 0: the grid starts at 0
    notes = " ".join(quantkit.report(q).notes)
    assert "12 conv(s) feeding a residual Add" in notes
    # the deploy layer rounds the same way: its outputs lie on the grid
    deploy = quantkit.convert(q)
    with torch.no_grad():
        y = deploy.layer1[0].conv2(torch.rand(1, 64, 8, 8))
    codes = y / deploy.layer1[0].conv2.out_scale + deploy.layer1[0].conv2.out_zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= 0 and codes.max() <= 255


def test_quantize_residual_flag_is_validated():
    with pytest.raises(ConfigError, match="quantize_residual"):
        quantkit.prepare(torchvision.models.resnet18(), "w8a8", quantize_residual="yes")


class _TinyResidual(nn.Module):
    """Stem conv-BN-ReLU-MaxPool, one residual block, pooled classifier: every pattern the residual pass handles."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.stem(x))))
        y = self.bn_b(self.conv_b(torch.relu(self.conv_a(x))))
        x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4"])
def test_small_residual_net_agrees_within_the_plain_tolerance(tmp_path, scheme):
    """A small residual net exports without allow_mismatch: simulated, deploy and onnxruntime agree within
    atol + rtol * max|y|, and onnxruntime runs its 3 convs as QLinearConv."""
    torch.manual_seed(0)
    model = settle_bn(_TinyResidual(), (3, 12, 12))
    q = _quantize(model, scheme, (3, 12, 12))
    assert {n for n, m in q.named_modules() if getattr(m, "output_bits", None)} == {"stem", "conv_b"}
    res = export_onnx(q, (torch.randn(4, 3, 12, 12),), tmp_path / "t.onnx", quiet=True)
    tol = 1e-4 + 1e-4 * res.agreement.output_absmax
    assert res.agreement.simulated_vs_deploy <= tol and res.agreement.deploy_vs_onnxruntime <= tol
    assert optimized_op_types(tmp_path / "t.onnx", tmp_path).count("QLinearConv") == 3


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort_session(model.SerializeToString(), optimize=False).run(None, feed)


def _cleanup_graph(zero_point: int, scale_out: float) -> onnx.ModelProto:
    """codes -> DQ -> Relu -> MaxPool -> Q(scale_out) -> DQ -> output, and a Sigmoid of the Relu's output."""
    inits = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(zero_point), "z"),
             numpy_helper.from_array(np.float32(scale_out), "s_out")]
    nodes = [helper.make_node("DequantizeLinear", ["codes", "s", "z"], ["x"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["r"], ["other"]),
             helper.make_node("QuantizeLinear", ["p", "s_out", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s_out", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("codes", TensorProto.UINT8, [1, 2, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8]),
                               helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, 2, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("zero_point, scale_out, expect", [
    (0, 0.05, {"relu": 1, "maxpool": 1, "dq_q": 1}),  # same grid after the pool: the Q reads the pooled codes
    (0, 0.1, {"relu": 1, "maxpool": 1, "dq_q": 0}),   # another grid: requantized
    (3, 0.05, {"relu": 0, "maxpool": 0, "dq_q": 0}),  # zero point 3: negative values exist, the ReLU stays
])
def test_integer_friendly_cleanup_is_exact(zero_point, scale_out, expect):
    """The cleanup's rewrites give the same integers on every code (all 256 appear) and count what they did."""
    model = _cleanup_graph(zero_point, scale_out)
    codes = np.random.default_rng(0).permutation(np.resize(np.arange(256, dtype=np.uint8), 512)).reshape(1, 2, 16, 16)
    before = _run(model, {"codes": codes})
    assert integer_friendly_cleanup(model.graph) == expect
    onnx.checker.check_model(model, full_check=True)
    after = _run(model, {"codes": codes})
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert len(np.unique(before[0])) > 20  # the pooled values span many codes
    ops = [n.op_type for n in model.graph.node]
    assert ("Relu" in ops) == (expect["relu"] == 0)


def test_layer_tolerance_allows_one_step_of_the_output_grid():
    class Rounding:
        output_bits = 8
        out_scale = torch.tensor(0.25)

    class Plain:
        output_bits = None

    assert layer_tolerance(Plain(), 10.0, 1e-4, 1e-4) == pytest.approx(1e-4 + 1e-3)
    assert layer_tolerance(Rounding(), 10.0, 1e-4, 1e-4) == pytest.approx(1e-4 + 1e-3 + 0.25)


@settings(max_examples=25, deadline=None)
@given(st.floats(1e-3, 1.0), st.integers(0, 255), st.booleans(), st.integers(0, 2**31 - 1))
def test_output_grid_forms_agree(scale, zero_point, relu, seed):
    """The simulated layer's fused op, the deploy layer's in-place chain and the op-by-op form used under
    torch.compile / torch.export give the same floats, on values at and around every rounding threshold."""
    from quantkit.quantizers.uniform import output_grid_params, round_to_output_grid

    s, inv, z = output_grid_params(torch.tensor(scale), torch.tensor(float(zero_point)))
    g = torch.Generator().manual_seed(seed)
    halves = (torch.arange(-300, 300) + 0.5) * s
    y = torch.cat([halves, torch.randn(500, generator=g) * 64 * s])
    qmin = z if relu else 0

    def grid(t):
        return round_to_output_grid(t, s, inv, z, 8, qmin)

    eager = grid(y)
    compiled = torch.compile(grid, fullgraph=True, backend="eager")(y)
    in_place = round_to_output_grid(y.clone(), s, inv, z, 8, qmin, in_place=True)
    assert torch.equal(eager, compiled) and torch.equal(eager, in_place)
    if relu:
        assert eager.min() >= 0
