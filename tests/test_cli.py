"""The ``quantkit`` command line. In subprocesses (``python -m quantkit`` and the console script): help, quantize to
ONNX, inspect, and one case of every kind of bad input (bad module path, missing file, wrong tensor shape, unknown
scheme, unwritable output: one-line error, exit code 1, no traceback, no file left behind). More variants of each run
in-process through ``quantkit.cli.main`` (the same code without another interpreter start-up)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny_models.py")
ADDER_CNN = "quantkit.models.adder_resnet:adder_cnn_digits"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env=env, timeout=300)


class _InProcess:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_here(capsys, *args: str) -> _InProcess:
    """``quantkit.cli.main`` in this process (captured like a subprocess)."""
    from quantkit.cli import main

    capsys.readouterr()
    before = torch.get_num_threads()
    try:
        rc = main(list(args))
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    return _InProcess(rc, out.out, out.err)


def assert_one_line_error(p, *needles: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    err_lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("quantkit: error: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for needle in needles:
        assert needle in err_lines[0], err_lines[0]


def test_help_and_schemes():
    p = run("--help")
    assert p.returncode == 0 and "examples:" in p.stdout and "quantize" in p.stdout and "exit codes" in p.stdout



def test_schemes_and_usage(capsys):
    p = run_here(capsys, "schemes")
    assert p.returncode == 0
    for name in ("adder_ptq4", "adabin", "bivit", "w8a8", "xnor"):
        assert f"\n{name} " in "\n" + p.stdout
    assert run_here(capsys).returncode == 2
    with pytest.raises(SystemExit) as exc:
        run_here(capsys, "quantize", "--help")
    assert exc.value.code == 0 and "--calib" in capsys.readouterr().out


def test_quantize_onnx_then_inspect(tmp_path):
    out = tmp_path / "adder4.onnx"
    p = run("quantize", "--model", ADDER_CNN, "--scheme", "adder_ptq4", "--calib", "digits", "--num-calib", "48",
            "--batch-size", "16", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert out.exists()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    for needle in ("quantkit report: scheme=adder_ptq4", "three-way agreement", "size: FP32 ONNX",
                   "onnxruntime vs PyTorch deploy: max abs difference"):
        assert needle in p.stdout, p.stdout
    p = run("inspect", str(out))
    assert p.returncode == 0 and "INT4" in p.stdout and "ReduceSum" in p.stdout and "4-bit weights" in p.stdout


def test_quantize_pt_checkpoint_from_npy_with_weights(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    from tiny_models import tiny_resnet_digits

    weights = tmp_path / "ckpt.pt"
    torch.save(tiny_resnet_digits().state_dict(), weights)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.rand(20, 1, 8, 8).astype(np.float32))
    out = tmp_path / "deploy.pt"
    p = run_here(capsys, "-q", "quantize", "--model", f"{TINY}:tiny_resnet_digits", "--weights", str(weights),
                 "--scheme", "w8a8", "--calib", str(calib), "--out", str(out))
    assert p.returncode == 0, p.stderr
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == "quantkit-deploy-v1" and ckpt["scheme"] == "w8a8"
    assert any(k.endswith("weight_int") for k in ckpt["deploy_state_dict"])
    # the documented round trip: prepare the factory's model, load the simulated state, convert
    import quantkit

    sim = quantkit.prepare(tiny_resnet_digits(), ckpt["scheme"])
    sim.load_state_dict(ckpt["simulated_state_dict"])
    deployed = quantkit.convert(sim)
    for k, v in ckpt["deploy_state_dict"].items():
        assert torch.equal(deployed.state_dict()[k], v), k


def test_quantize_image_folder_xnor_to_onnx(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / "sub" / f"{i}.png")
    out = tmp_path / "xnor.onnx"
    p = run_here(capsys, "-q", "quantize", "--model", f"{TINY}:tiny_resnet", "--scheme", "xnor", "--calib",
                 str(folder), "--input-shape", "3,16,16", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert any(t.data_type == onnx.TensorProto.UINT8 and "weight_bits" in t.name
               for t in onnx.load(str(out)).graph.initializer)


def test_info_and_bench(capsys):
    p = run_here(capsys, "info")
    assert p.returncode == 0 and "compiled kernels" in p.stdout and "CPU features" in p.stdout and "CUDA" in p.stdout
    p = run_here(capsys, "-q", "bench", "--model", "quantkit.models.vit:vit_digits", "--scheme", "bivit", "--calib",
                 "digits", "--num-calib", "8", "--repeats", "2", "--warmup", "0", "--binary-form", "unpack")
    assert p.returncode == 0, p.stderr
    for needle in ("PyTorch FP32", "PyTorch deploy", "onnxruntime FP32", "onnxruntime quantized (unpack)", "median"):
        assert needle in p.stdout, p.stdout


# ---------------------------------------------------------------------------------------------- bad inputs
def _args(tmp_path: Path, *extra: str, out: str | None = None, model: str = ADDER_CNN, scheme: str = "adder_ptq4",
          calib: str = "digits") -> list[str]:
    return ["quantize", "--model", model, "--scheme", scheme, "--calib", calib, "--num-calib", "16",
            "--out", out or str(tmp_path / "m.onnx"), *extra]


def test_bad_inputs_in_subprocesses(tmp_path):
    """One case of every kind, through a real interpreter: one line on stderr, exit 1, nothing written."""
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 3, 5, 5), np.float32))  # the digits CNN takes 1 channel
    cases = [
        (_args(tmp_path, model="no_such_package.models:build"), "cannot import module"),
        (_args(tmp_path, "--weights", str(tmp_path / "nope.pt")), "no such file"),
        (_args(tmp_path, calib=str(wrong)), "does not accept inputs of shape (4, 3, 5, 5)"),
        (_args(tmp_path, scheme="adder_ptq99"), "unknown scheme 'adder_ptq99'"),
        (_args(tmp_path, out="/proc/quantkit_cli_test.onnx"), "not writable"),
    ]
    for args, needle in cases:
        assert_one_line_error(run(*args), needle)
    assert [p.name for p in tmp_path.iterdir()] == ["wrong.npy"]


@pytest.mark.parametrize("model,needle", [
    ("quantkit.models.adder_resnet:no_such_factory", "has no attribute"),
    ("quantkit.models.adder_resnet", "expected 'pkg.module:factory'"),
    ("missing_file.py:build", "no such file"),
])
def test_bad_module_path(tmp_path, capsys, model, needle):
    assert_one_line_error(run_here(capsys, *_args(tmp_path, model=model)), needle)
    assert list(tmp_path.iterdir()) == []


def test_missing_files(tmp_path, capsys):
    assert_one_line_error(run_here(capsys, *_args(tmp_path, calib=str(tmp_path / "nope.npy"))), "no such file")
    assert_one_line_error(run_here(capsys, "inspect", str(tmp_path / "nope.onnx")), "no such file")
    assert list(tmp_path.iterdir()) == []


def test_bad_tensors(tmp_path, capsys):
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((7,), np.float32))
    assert_one_line_error(run_here(capsys, *_args(tmp_path, calib=str(flat))), "no batch dimension")
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((4, 1, 8, 8), np.nan, np.float32))
    assert_one_line_error(run_here(capsys, *_args(tmp_path, calib=str(nan))), "NaN")
    bad_weights = tmp_path / "bad.pt"
    torch.save({"not.a.layer": torch.zeros(3)}, bad_weights)
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--weights", str(bad_weights))), "does not fit the model")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": object()}, pickled)  # not loadable with weights_only=True
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--weights", str(pickled))), "weights_only=True")
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"\x00garbage")
    assert_one_line_error(run_here(capsys, "inspect", str(not_onnx)), "not a readable ONNX model")
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--input-shape", "1,x,8")), "--input-shape")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "flat.npy", "nan.npy", "pickled.pt", "x.onnx"]


def test_unknown_option_and_outputs(tmp_path, capsys):
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--set", "no_such_option=1")), "no_such_option")
    assert_one_line_error(run_here(capsys, *_args(tmp_path, out=str(tmp_path / "missing_dir" / "m.onnx"))),
                          "does not exist")
    assert_one_line_error(run_here(capsys, *_args(tmp_path, out=str(tmp_path / "m.txt"))), ".onnx")
    assert list(tmp_path.iterdir()) == []


def test_console_script_installed():
    exe = Path(sys.executable).parent / "quantkit"
    if not exe.exists():
        pytest.skip("the package is not installed with its console script in this environment")
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0 and p.stdout.startswith("quantkit ")
