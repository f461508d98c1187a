"""The examples run end to end with ``--fast`` (in this process, one thread): each writes an ONNX file that
onnxruntime runs and that classifies the digits like the deploy model."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import onnx
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"quantkit_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


@pytest.mark.parametrize("name,kind", [("adder_ptq_export", "adder"), ("adabin_qat", "adabin"),
                                       ("bivit_vit", "bivit")])
def test_example_fast(tmp_path, capsys, name, kind):
    out = tmp_path / f"{name}.onnx"
    _load(name).main(["--fast", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.exists()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert "three-way agreement" in printed
    accs = re.search(r"deploy ([\d.]+)%, onnxruntime ([\d.]+)%", printed)
    assert accs, printed
    assert abs(float(accs.group(1)) - float(accs.group(2))) <= 1.0
    if kind in ("adabin", "bivit"):
        assert any(t.data_type == onnx.TensorProto.UINT8 and "weight_bits" in t.name
                   for t in onnx.load(str(out)).graph.initializer)
    else:
        assert any(t.data_type == onnx.TensorProto.INT4 for t in onnx.load(str(out)).graph.initializer)
