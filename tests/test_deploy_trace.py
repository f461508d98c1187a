"""Every scheme's deploy model is a graph PyTorch's compilers can capture whole: ``torch.export.export`` with a
dynamic batch dimension (then run at another batch size) and ``torch.compile(fullgraph=True)`` (no graph break),
both matching eager."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import quantkit
from quantkit.graph import adderize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import TinyResNet  # noqa: E402


def _cnn() -> nn.Module:
    model = TinyResNet((8, 16, 16), (1, 1, 1), 10)
    model.train()
    with torch.no_grad():  # BatchNorm statistics from data, so activations are not degenerate
        for _ in range(2):
            model(torch.randn(8, 3, 12, 12))
    return model.eval()


def _vit() -> nn.Module:
    from quantkit.models.vit import vit_digits

    return vit_digits().eval()


def _deploy(scheme: str) -> tuple[nn.Module, torch.Tensor]:
    if scheme.startswith("adder"):
        float_model = adderize(_cnn())
    elif scheme.startswith("bi"):
        float_model = _vit()
    else:
        float_model = _cnn()
    x = torch.randn(3, *({"bi": (1, 8, 8)}.get(scheme[:2], (3, 12, 12))))
    if quantkit.api.get_scheme(scheme).mode == "ptq":
        sim = quantkit.quantize(float_model, scheme, [torch.randn(8, *x.shape[1:]) for _ in range(2)], progress=False)
    else:
        sim = quantkit.prepare(float_model, scheme)
    return quantkit.convert(sim), x


SCHEMES = ["w8a8", "w4a4", "xnor", "adabin", "adder_ptq4", "adder_round8", "bivit", "bibert"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_export_dynamic_batch(scheme):
    deploy, x = _deploy(scheme)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(deploy, (x,), dynamic_shapes=({0: batch},))
        for b in (x.shape[0], 5):
            xb = torch.randn(b, *x.shape[1:])
            torch.testing.assert_close(exported.module()(xb), deploy(xb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_compile_fullgraph(scheme):
    deploy, x = _deploy(scheme)
    torch._dynamo.reset()
    compiled = torch.compile(deploy, fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        for b in (x.shape[0], 5):
            xb = torch.randn(b, *x.shape[1:])
            torch.testing.assert_close(compiled(xb), deploy(xb), rtol=1e-5, atol=1e-5)
