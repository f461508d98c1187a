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


# ---------------------------------------------------------------------------------------------- output files
def _pt_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "quantize", "--model", f"{TINY}:tiny_resnet_digits", "--scheme", "w8a8", "--calib", "digits",
            "--num-calib", "8", "--out", str(out), *extra]


def test_output_is_never_an_input(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    from tiny_models import tiny_resnet_digits

    weights = tmp_path / "ckpt.pt"
    torch.save(tiny_resnet_digits().state_dict(), weights)
    before = weights.read_bytes()
    for extra in ([], ["--force"]):  # not even with --force
        p = run_here(capsys, *_pt_args(tmp_path, weights, "--weights", str(weights), *extra))
        assert_one_line_error(p, "is the --weights input", "never writes over its inputs")
    link = tmp_path / "link.pt"  # another name of the same file
    os.symlink(weights, link)
    assert_one_line_error(run_here(capsys, *_pt_args(tmp_path, link, "--weights", str(weights), "--force")),
                          "--weights input")
    calib = tmp_path / "calib.pt"
    torch.save(torch.rand(8, 1, 8, 8), calib)
    args = _pt_args(tmp_path, calib, "--force")
    args[args.index("digits")] = str(calib)
    assert_one_line_error(run_here(capsys, *args), "is the --calib input")
    assert weights.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt", "ckpt.pt", "link.pt"]


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"precious")
    assert_one_line_error(run_here(capsys, *_pt_args(tmp_path, out)), "exists", "--force")
    out.chmod(0o444)
    assert_one_line_error(run_here(capsys, *_pt_args(tmp_path, out)), "read-only", "--force")
    assert out.read_bytes() == b"precious"
    p = run_here(capsys, *_pt_args(tmp_path, out, "--force"))
    assert p.returncode == 0, p.stderr
    assert torch.load(out, weights_only=True)["format"] == "quantkit-deploy-v1"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_respect_the_umask(tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        p = run_here(capsys, *_pt_args(tmp_path, tmp_path / "m.pt"))
        assert p.returncode == 0, p.stderr
        p = run_here(capsys, "-q", "quantize", "--model", ADDER_CNN, "--scheme", "adder_ptq4", "--calib", "digits",
                     "--num-calib", "16", "--out", str(tmp_path / "m.onnx"))
        assert p.returncode == 0, p.stderr
    finally:
        os.umask(old)
    for name in ("m.pt", "m.onnx"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt"]


def test_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A failure while the output is written (here: the disk fills up) leaves neither the output nor a temporary."""
    import quantkit.cli as cli

    def full(data):
        def write(path):
            path.write_bytes(data[:10])
            raise OSError(28, "No space left on device")
        return write

    monkeypatch.setattr(cli, "_save_bytes", full)
    assert_one_line_error(run_here(capsys, *_pt_args(tmp_path, tmp_path / "m.pt")), "No space left on device")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- calibration data
def _stats_model_file(tmp_path: Path) -> str:
    """A model whose only layer is a linear over 3 channels, so the calibration range shows the preprocessing."""
    path = tmp_path / "stats_model.py"
    path.write_text("import torch\nfrom torch import nn\n\n\nclass Pool(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(3, 2)\n\n"
                    "    def forward(self, x):\n        return self.fc(x.mean((2, 3)))\n\n\n"
                    "def build():\n    return Pool()\n")
    return f"{path}:build"


def test_calibration_sources_are_preprocessed_alike(tmp_path, capsys):
    """The same pixels as PNG files, a uint8 .npy and an int64 .pt calibrate the same observer ranges; --mean/--std
    apply to each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)  # N, H, W, C
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(pixels):
        Image.fromarray(a).save(folder / f"{i}.png")
    chw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    np.save(tmp_path / "u8.npy", chw)
    torch.save(torch.from_numpy(chw.astype(np.int64)), tmp_path / "i64.pt")
    model = _stats_model_file(tmp_path)
    ranges = {}
    for name, src in (("folder", folder), ("uint8", tmp_path / "u8.npy"), ("int64", tmp_path / "i64.pt")):
        for norm in ([], ["--mean", "0.5,0.4,0.3", "--std", "0.2"]):
            out = tmp_path / f"{name}{len(norm)}.pt"
            p = run_here(capsys, "quantize", "--model", model, "--scheme", "w8a8", "--calib", str(src),
                         "--input-shape", "3,4,4", "--out", str(out), *norm)
            assert p.returncode == 0, p.stderr
            assert "/ 255" in p.stdout and (("normalize" in p.stdout) == bool(norm)), p.stdout
            sd = torch.load(out, weights_only=True)["simulated_state_dict"]
            ranges[name, bool(norm)] = torch.stack([v for k, v in sd.items() if "act" in k and v.numel() == 1])
    x = torch.from_numpy(chw).float().div(255).mean((2, 3))
    for norm in (False, True):
        for name in ("uint8", "int64"):
            torch.testing.assert_close(ranges[name, norm], ranges["folder", norm])
    assert not torch.allclose(ranges["uint8", False], ranges["uint8", True])
    assert float(x.max()) <= 1.0  # the plain range is the [0, 1] one


def test_calibration_mean_std_errors(tmp_path, capsys):
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--mean", "a,b")), "--mean", "comma-separated")
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--mean", "0.1,0.2")), "2 values", "1 channel")
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--std", "0")), "std", "positive")
    signed = tmp_path / "signed.npy"
    np.save(signed, np.full((4, 1, 8, 8), -3, np.int16))
    assert_one_line_error(run_here(capsys, *_args(tmp_path, calib=str(signed))), "int16", "save these samples as")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signed.npy"]


# ---------------------------------------------------------------------------------------------- messages
def test_clear_messages_for_bad_checkpoints_options_and_files(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    import quantkit.models.adder_resnet as ar

    wrong = tmp_path / "wrong_shape.pt"
    state = ar.adder_cnn_digits().state_dict()
    key = next(k for k, v in state.items() if v.dim() == 4)
    state[key] = torch.zeros(3, *state[key].shape[1:])
    torch.save(state, wrong)
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--weights", str(wrong))), "size mismatch", key,
                          "(3,")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    p = run_here(capsys, *_args(tmp_path, "--weights", str(noise)))
    assert_one_line_error(p, "not a readable tensor file")
    assert "weights_only=False" not in p.stderr and "weights_only` set to `False" not in p.stderr
    full = tmp_path / "full_model.pt"
    torch.save(ar.adder_cnn_digits(), full)
    p = run_here(capsys, *_args(tmp_path, "--weights", str(full)))
    assert_one_line_error(p, "pickled Python objects", "state_dict()")
    assert "\x1b" not in p.stderr
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--set", "bits=1")), "scheme 'adder_ptq4'",
                          "bits=1", "2 to 8")
    p = run_here(capsys, *_args(tmp_path, "--set", "bits=1"))
    assert "adder_ptq1" not in p.stderr
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--set", "bits=abc")), "bits='abc' must be an integer")
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--set", "percentile=None")), "percentile=None",
                          "float")
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--set", "skip=['conv9']")), "'conv9'",
                          "matches no layer")
    assert_one_line_error(run_here(capsys, *_args(tmp_path, "--set", "only=['re:[']")), "not a valid regular")
    assert_one_line_error(run_here(capsys, "inspect", str(tmp_path)), "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full_model.pt", "noise.pt", "wrong_shape.pt"]


def test_api_export_respects_the_umask(tmp_path):
    import quantkit

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    q = quantkit.quantize(model, "w8a8", [torch.randn(4, 1, 8, 8)], progress=False)
    old = os.umask(0o027)
    try:
        quantkit.export_onnx(q, (torch.randn(1, 1, 8, 8),), tmp_path / "m.onnx", quiet=True)
    finally:
        os.umask(old)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o640


def test_checkpoint_carries_the_full_scheme_config(tmp_path, capsys):
    """--set overrides survive a reload: the checkpoint stores every field of the config, and the config rebuilt
    from it equals the one the command used (and rebuilds the same deploy tensors)."""
    sys.path.insert(0, str(REPO / "examples"))
    from tiny_models import tiny_resnet_digits

    import quantkit
    from quantkit.api import scheme_from_dict

    out = tmp_path / "m.pt"
    p = run_here(capsys, *_pt_args(tmp_path, out, "--set", "bits_w=4", "--set", "percentile=99.5",
                                   "--set", "observer='percentile'", "--set", "keep_first=True"))
    assert p.returncode == 0, p.stderr
    ckpt = torch.load(out, weights_only=True)
    stored = ckpt["scheme_config"]
    assert stored["scheme"] == "w8a8"
    assert stored["options"]["bits_w"] == 4 and stored["options"]["percentile"] == 99.5
    assert stored["options"]["observer"] == "percentile" and stored["options"]["keep_first"] is True
    assert stored["options"]["bits_a"] == 8  # defaults are stored too: a later change of a default cannot leak in
    cfg = scheme_from_dict(stored)
    assert cfg == quantkit.get_scheme("w8a8", bits_w=4, percentile=99.5, observer="percentile", keep_first=True)
    sim = quantkit.prepare(tiny_resnet_digits(), cfg)
    sim.load_state_dict(ckpt["simulated_state_dict"])
    deployed = quantkit.convert(sim)
    for k, v in ckpt["deploy_state_dict"].items():
        assert torch.equal(deployed.state_dict()[k], v), k
    # the name alone would have lost the overrides: 8-bit weights, a min/max observer
    assert quantkit.get_scheme(ckpt["scheme"]) != cfg


def test_scheme_dict_round_trip_and_unstorable_rules():
    import re

    from torch import nn

    import quantkit
    from quantkit.api import scheme_from_dict, scheme_to_dict
    from quantkit.errors import ConfigError

    cfg = quantkit.get_scheme("adder_ptq4", bits=3, groups=2, skip=["fc"], rules={re.compile(r"layer1\..*"): None})
    data = scheme_to_dict(cfg)
    assert data["scheme"] == "adder_ptq4" and data["options"]["rules"] == {r"re:layer1\..*": None}
    back = scheme_from_dict(data)
    assert (back.name, back.bits, back.groups, back.skip) == ("adder_ptq3", 3, 2, ("fc",))
    typed = scheme_from_dict(scheme_to_dict(quantkit.get_scheme("w8a8", rules={nn.Linear: None})))
    assert typed.rules == {nn.Linear: None}  # module types are stored by their import path
    with pytest.raises(ConfigError, match="expected"):
        scheme_from_dict({"fields": {}})


@pytest.mark.parametrize("form, weight_type", [("int8", onnx.TensorProto.INT8), ("int4", onnx.TensorProto.INT4)])
def test_quantize_uniform_form(tmp_path, capsys, form, weight_type):
    """--uniform-form picks the ONNX container of w4a4 layers: int8 codes (fused by onnxruntime) or INT4."""
    out = tmp_path / f"w4a4_{form}.onnx"
    p = run_here(capsys, "-q", "quantize", "--model", f"{TINY}:tiny_resnet_digits", "--scheme", "w4a4", "--calib",
                 "digits", "--num-calib", "16", "--uniform-form", form, "--out", str(out))
    assert p.returncode == 0, p.stderr
    graph = onnx.load(str(out)).graph
    assert {t.data_type for t in graph.initializer if "weight_int" in t.name} == {weight_type}
    assert any(n.op_type == "Clip" for n in graph.node) == (form == "int8")  # 4-bit range on uint8 codes


def test_quantize_uniform_form_rejects_other_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_here(capsys, *_pt_args(tmp_path, tmp_path / "m.onnx", "--uniform-form", "int2"))
    assert exc.value.code == 2 and "--uniform-form" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
