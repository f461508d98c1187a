"""The ``quantkit`` command line (also ``python -m quantkit``).

Exit codes: 0 success; 1 a problem with the inputs (bad module path, missing file, wrong tensor shape, unknown scheme,
unwritable output, failed verification) reported as one line on stderr; 2 bad command-line usage; 70 an internal
error (one line; ``--verbose`` prints the traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ExportError
from .files import OutputExistsError, check_output_path, publish_file, write_synced
from .sysinfo import cpu_flags

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit code 1."""


class _Console:
    def __init__(self, quiet: bool = False, verbose: bool = False) -> None:
        self.quiet, self.verbose = quiet, verbose

    def info(self, msg: str = "") -> None:
        if not self.quiet:
            print(msg, flush=True)

    def debug(self, msg: str) -> None:
        if self.verbose and not self.quiet:
            print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- loading things
def load_factory(spec: str) -> Callable[[], Any]:
    """``pkg.module:factory`` or ``path/to/file.py:factory`` -> the callable."""
    if ":" not in spec or spec.startswith(":") or spec.endswith(":"):
        raise CLIError(f"--model {spec!r}: expected 'pkg.module:factory' (or 'file.py:factory'), e.g. "
                       "'quantkit.models.adder_resnet:adder_resnet20'")
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise CLIError(f"--model {spec!r}: no such file {mod_name!r}")
            loader_spec = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current folder are found
            module = importlib.import_module(mod_name)
    except CLIError:
        raise
    except ModuleNotFoundError as exc:
        raise CLIError(f"--model {spec!r}: cannot import module {mod_name!r} ({exc})") from exc
    except Exception as exc:
        raise CLIError(f"--model {spec!r}: importing {mod_name!r} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise CLIError(f"--model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise CLIError(f"--model {spec!r}: {attr!r} is not callable")
    return factory


def build_model(spec: str, weights: str | None, console: _Console):
    import torch
    from torch import nn

    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise CLIError(f"--model {spec!r}: calling {spec.rpartition(':')[2]}() failed: {type(exc).__name__}: "
                       f"{exc}") from exc
    if not isinstance(model, nn.Module):
        raise CLIError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        state = load_tensor_file(weights, "--weights", allow_dict=True)
        if isinstance(state, dict):
            for key in ("state_dict", "model", "model_state_dict"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CLIError(f"--weights {weights!r}: expected a state_dict (a dict of tensors), got "
                           f"{type(state).__name__}")
        own = model.state_dict()
        mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                      if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if mismatched:
            raise CLIError(f"--weights {weights!r} does not fit the model: size mismatch for {_few(mismatched)} "
                           "(a checkpoint of another model or configuration?)")
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CLIError(f"--weights {weights!r} does not fit the model: missing {_few(result.missing_keys)}, "
                           f"unexpected {_few(result.unexpected_keys)}")
        console.debug(f"loaded {len(state)} tensors from {weights}")
    return model.eval()


def _few(keys: Sequence[str]) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def load_tensor_file(path: str, what: str, allow_dict: bool = False) -> Any:
    """A .pt/.pth (``torch.load(weights_only=True)``) or .npy (``allow_pickle=False``) file."""
    import numpy as np
    import torch

    if not os.path.exists(path):
        raise CLIError(f"{what} {path!r}: no such file")
    if os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is a folder, expected a file")
    try:
        if path.endswith(".npy"):
            return torch.from_numpy(np.load(path, allow_pickle=False))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"{what} {path!r} {_unloadable_reason(exc)}") from exc


def _unloadable_reason(exc: Exception) -> str:
    """Why torch.load / np.load refused a file, in one line: without torch's advice to turn off weights_only (never
    right for a file of unknown origin) and without its terminal colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"holds pickled Python objects ({found.group(1)}), e.g. a whole model saved with torch.save(model): "
                "quantkit loads only plain tensors (weights_only=True); save model.state_dict() instead")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", text)
    first = detail.group(1) if detail else (text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    return (f"is not a readable tensor file ({first.rstrip('.')}); expected a state_dict saved with "
            "torch.save(model.state_dict(), path) or an array saved with numpy.save")


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    import re

    if not re.fullmatch(r"\s*\d+(\s*[,x]\s*\d+)*\s*", text):
        raise CLIError(f"--input-shape {text!r}: expected integers such as 3,32,32 (one sample, no batch)")
    shape = tuple(int(v) for v in re.split(r"[,x]", text))
    if min(shape) <= 0:
        raise CLIError(f"--input-shape {text!r}: every size must be a positive integer")
    return shape


def _parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected one number or one per channel, comma-separated "
                       "(e.g. 0.485,0.456,0.406)") from None
    return values


def load_calibration(spec: str, shape: tuple[int, ...] | None, limit: int, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, console: _Console | None = None):
    """Calibration samples (N, ...) float32 from 'digits', a folder of images or a .npy/.pt tensor file, with the
    preprocessing documented in :mod:`quantkit.calibrate.sources` (the API's ``quantkit.calibration_samples``)."""
    from .calibrate.sources import load_samples

    loaded = load_samples(spec, shape, limit=limit, mean=mean, std=std)
    if console is not None:
        console.info(f"calibration data {spec}: {loaded.describe()}")
    return loaded.samples


# ---------------------------------------------------------------------------------------------- output files
def _check_output(path: str, suffixes: tuple[str, ...], args) -> Path:
    """``--out``, checked before any work: a known suffix, a writable folder, not one of the command's input files,
    and not an existing file unless ``--force``."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise CLIError(f"--out {path!r}: use a file name ending in {' or '.join(suffixes)}")
    try:
        p = check_output_path(p)
    except ExportError as exc:
        raise CLIError(f"--out: {exc}") from exc
    # OpenVINO IR is two files: the .bin beside the .xml is written (and protected) just the same
    written = [p, p.with_suffix(".bin")] if p.suffix.lower() == ".xml" else [p]
    for target in written:
        for flag, given in _input_files(args):
            if os.path.exists(given) and os.path.exists(target) and os.path.samefile(given, target):
                what = f"--out {path!r} is" if target == p else f"--out {path!r} writes {str(target)!r}, which is"
                raise CLIError(f"{what} the {flag} input {given!r}: quantkit never writes over its inputs; choose "
                               "another output file name")
        _refuse_existing(target, getattr(args, "force", False))
    return p


def _input_files(args) -> list[tuple[str, str]]:
    """(flag, path) of every file the command reads."""
    files = []
    if getattr(args, "weights", None):
        files.append(("--weights", args.weights))
    calib = getattr(args, "calib", None)
    if calib and calib != "digits" and os.path.isfile(calib):
        files.append(("--calib", calib))
    model = getattr(args, "model", None) or ""
    if model.rpartition(":")[0].endswith(".py"):
        files.append(("--model", model.rpartition(":")[0]))
    return files


def _refuse_existing(out: Path, force: bool) -> None:
    if force or not os.path.lexists(out):
        return
    read_only = os.path.exists(out) and not os.stat(out).st_mode & 0o222  # by its mode bits (root may write anyway)
    what = "a read-only file" if read_only else "a file"
    raise CLIError(f"--out {str(out)!r} exists ({what}); pass --force to replace it, or choose another name")


def _write_output(out: Path, force: bool, write: Callable[[Path], Any]) -> Any:
    """Run ``write(tmp)`` on a temporary file beside ``out``, then publish it as ``out`` (:mod:`quantkit.files`: one
    rename, never a partial file, nothing left behind on failure), without replacing a file that appeared meanwhile
    unless ``force``. Returns what ``write`` returned."""
    try:
        return publish_file(out, write, replace=force)
    except OutputExistsError:
        _refuse_existing(out, False)  # the work took a while: the file appeared meanwhile
        raise
    except ExportError as exc:
        raise CLIError(f"--out: {exc}") from exc


def _save_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: write_synced(path, data)


def _batches(x, batch_size: int) -> list:
    return [x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)]


def _fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _prepare_quantized(args, console: _Console):
    """Build, load, calibrate -> (float model, simulated model, calibration samples)."""
    import torch

    import quantkit
    from quantkit.schemes.base import get_scheme

    overrides = _parse_overrides(args.set or [])
    cfg = get_scheme(args.scheme, **overrides)  # unknown scheme / bad option -> QuantkitError (one line)
    shape = _parse_shape(args.input_shape)
    model = build_model(args.model, args.weights, console)
    mean, std = _parse_floats(getattr(args, "mean", None), "--mean"), _parse_floats(getattr(args, "std", None), "--std")
    if (mean is not None or std is not None) and not args.calib:
        raise CLIError("--mean/--std normalize calibration data: give --calib as well")
    if args.calib:
        samples = load_calibration(args.calib, shape, args.num_calib, mean, std, console)
    elif shape is not None:
        if cfg.mode == "ptq":
            raise CLIError(f"scheme {cfg.name!r} is post-training: give --calib (digits, a folder or a tensor file)")
        samples = torch.randn(max(2, args.batch_size), *shape)
    else:
        raise CLIError("give --calib (digits, an image folder or a .npy/.pt file) or --input-shape C,H,W")
    if cfg.mode == "qat":
        console.info(f"note: {cfg.name!r} is a quantization-aware-training scheme; without a QAT-trained "
                     "checkpoint the binarized model is untrained")
    example = (samples[: min(args.batch_size, samples.shape[0], 8)],)
    try:
        with torch.no_grad():
            model(*example)
    except Exception as exc:
        raise CLIError(f"the model does not accept inputs of shape {tuple(example[0].shape)}: "
                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__} "
                       "(set --input-shape C,H,W to resize the calibration data)") from exc
    batches = _batches(samples, args.batch_size)
    console.debug(f"calibration: {samples.shape[0]} samples of shape {tuple(samples.shape[1:])} in "
                  f"{len(batches)} batches")
    qmodel = quantkit.quantize(model, cfg, batches, example, progress=not console.quiet)
    return model, qmodel, example


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    import ast

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CLIError(f"--set {item!r}: expected option=value, e.g. --set groups=4")
        k, _, v = item.partition("=")
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


# ---------------------------------------------------------------------------------------------- commands
def cmd_quantize(args, console: _Console) -> int:
    import torch

    import quantkit
    from .api import config_of, scheme_to_dict
    from .nn.base import deploy_nbytes

    out = _check_output(args.out, (".onnx", ".xml", ".pt", ".pth"), args)
    model, qmodel, example = _prepare_quantized(args, console)
    report = quantkit.report(qmodel)
    cfg = config_of(qmodel)
    fp_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if out.suffix.lower() == ".onnx":
        result = _write_output(out, args.force, lambda tmp: quantkit.export_onnx(
            qmodel, example, tmp, opset=args.opset, binary_form=args.binary_form, custom_ops=args.custom_ops,
            uniform_form=args.uniform_form, quiet=True))
        result.path = str(out)
        deployed = quantkit.convert(qmodel)
        console.info(str(quantkit.report(deployed)))
        console.info(result.summary())
        with tempfile.TemporaryDirectory() as tmp:
            fp = quantkit.export_onnx(model, example, os.path.join(tmp, "fp32.onnx"), opset=args.opset,
                                      verify=False, quiet=True)
        console.info(f"size: FP32 ONNX {_fmt_size(fp.file_bytes)} -> quantized ONNX {_fmt_size(result.file_bytes)} "
                     f"({fp.file_bytes / max(result.file_bytes, 1):.1f}x smaller)")
        a = result.agreement
        if a.deploy_vs_onnxruntime is not None:
            console.info(f"onnxruntime vs PyTorch deploy: max abs difference {a.deploy_vs_onnxruntime:.3g} "
                         f"(max |y| = {a.output_absmax:.3g})")
    elif out.suffix.lower() == ".xml":
        _quantize_to_openvino(qmodel, example, out, console, args.uniform_form)
    else:
        deployed = quantkit.convert(qmodel)
        console.info(str(quantkit.report(deployed)))
        payload = {"format": "quantkit-deploy-v1", "quantkit_version": quantkit.__version__,
                   "model": args.model, "scheme": report.scheme,
                   # every field of the config (with the --set overrides): quantkit.api.scheme_from_dict rebuilds it
                   "scheme_config": scheme_to_dict(cfg),
                   "example_input_shape": list(example[0].shape),
                   "simulated_state_dict": qmodel.state_dict(), "deploy_state_dict": deployed.state_dict()}
        buf = io.BytesIO()
        torch.save(payload, buf)
        _write_output(out, args.force, _save_bytes(buf.getvalue()))
        dep = deploy_nbytes(deployed)
        console.info(f"size: FP32 parameters {_fmt_size(fp_bytes)} -> deploy model tensors {_fmt_size(dep)} "
                     f"({fp_bytes / max(dep, 1):.1f}x smaller)")
        console.info(f"wrote {out} (PyTorch checkpoint: rebuild with quantkit.prepare(factory(), "
                     "quantkit.api.scheme_from_dict(ckpt['scheme_config'])), load_state_dict("
                     "ckpt['simulated_state_dict']), quantkit.convert)")
    return EXIT_OK


def _quantize_to_openvino(qmodel, example, out: Path, console: _Console, uniform_form: str) -> None:
    """--out model.xml: OpenVINO IR (.xml + .bin), verified in OpenVINO against the PyTorch deploy model."""
    import quantkit

    result = quantkit.export_openvino(qmodel, example, out, quiet=True, uniform_form=uniform_form)
    console.info(str(quantkit.report(quantkit.convert(qmodel))))
    console.info(result.summary())
    a = result.agreement
    if a.deploy_vs_openvino is not None:
        console.info(f"OpenVINO vs PyTorch deploy: max abs difference {a.deploy_vs_openvino:.3g} "
                     f"(max |y| = {a.output_absmax:.3g})")


def cmd_schemes(args, console: _Console) -> int:
    import quantkit

    items = quantkit.schemes()
    width = max(len(k) for k in items)
    for name, desc in items.items():
        print(f"{name:<{width}}  {desc}")
    return EXIT_OK


def cmd_inspect(args, console: _Console) -> int:
    from .errors import ExportError
    from .export.inspect import inspect_onnx

    try:
        if Path(args.file).suffix.lower() == ".xml":
            from .export.openvino import inspect_openvino

            summary = inspect_openvino(args.file)
        else:
            summary = inspect_onnx(args.file)
    except ExportError as exc:
        raise CLIError(str(exc)) from exc
    print(summary.table())
    return EXIT_OK


def cmd_info(args, console: _Console) -> int:

    import onnx
    import torch

    import quantkit
    from .ops import cpu_isa, kernel_status, supported_cpu_isas

    st = kernel_status()
    lines = [f"quantkit {quantkit.__version__}  (python {platform.python_version()}, {platform.machine()})",
             f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {_ort_version()}",
             f"compiled kernels (quantkit._C): {'built' if st.get('loaded') else 'MISSING: ' + str(st.get('error'))}",
             f"  sm90a kernels (quantkit._C_sm90a): {'built' if st.get('sm90a') else 'not built'}",
             f"CPU kernel ISA: {cpu_isa()} (this CPU can run: {', '.join(supported_cpu_isas()) or 'none'})",
             f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch threads "
             f"{torch.get_num_threads()}",
             f"CPU features: {' '.join(cpu_flags()) or 'unknown'}"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"CUDA: {torch.version.cuda}, devices: {', '.join(names)}")
    else:
        lines.append(f"CUDA: not available (torch built with CUDA {torch.version.cuda})")
    print("\n".join(lines))
    return EXIT_OK


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "not installed"


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int, desc: str, console: _Console) -> float:
    from tqdm.auto import tqdm

    for _ in range(warmup):
        fn()
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=console.quiet or None):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cmd_bench(args, console: _Console) -> int:
    import torch

    import quantkit
    from .export.verify import ort_session

    if args.threads:
        torch.set_num_threads(args.threads)
    model, qmodel, example = _prepare_quantized(args, console)
    deployed = quantkit.convert(qmodel)
    x = example[0][:1].expand(args.batch_size, *example[0].shape[1:]).contiguous()
    forms = ["unpack", "xor"] if args.binary_form == "both" else [args.binary_form]
    rows: list[tuple[str, float]] = []
    with torch.no_grad():
        rows.append(("PyTorch FP32", _median_ms(lambda: model(x), args.repeats, args.warmup, "torch fp32", console)))
        rows.append(("PyTorch deploy (quantkit kernels)",
                     _median_ms(lambda: deployed(x), args.repeats, args.warmup, "torch deploy", console)))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"onnxruntime FP32": quantkit.export_onnx(model, (x,), os.path.join(tmp, "fp32.onnx"), verify=False,
                                                           quiet=True).path}
        for form in forms:
            res = quantkit.export_onnx(qmodel, (x,), os.path.join(tmp, f"q_{form}.onnx"), binary_form=form,
                                       quiet=True)
            if not any(layer.form in ("unpack", "xor") for layer in res.layers):
                paths["onnxruntime quantized"] = res.path  # no binary layer: the forms are the same graph
                break
            paths[f"onnxruntime quantized ({form})"] = res.path
        for label, path in paths.items():
            sess = ort_session(path, threads=args.threads or None)
            name = sess.get_inputs()[0].name
            feed = {name: x.numpy()}
            size = os.path.getsize(path)
            rows.append((f"{label} [{_fmt_size(size)}]",
                         _median_ms(lambda: sess.run(None, feed), args.repeats, args.warmup, label, console)))
    base = rows[0][1]
    print(f"bench: {args.model} scheme={args.scheme} batch={args.batch_size} input={tuple(x.shape[1:])} "
          f"threads={args.threads or torch.get_num_threads()} repeats={args.repeats} (median)")
    width = max(len(r[0]) for r in rows)
    for label, ms in rows:
        print(f"  {label:<{width}}  {ms:9.3f} ms   {base / ms:6.2f}x vs PyTorch FP32")
    print(f"  machine: {platform.machine()}, {os.cpu_count()} cores; {', '.join(cpu_flags()[-6:])}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- parser
_EPILOG_MAIN = """examples:
  quantkit schemes
  quantkit quantize --model quantkit.models.adder_resnet:adder_cnn_digits --scheme adder_ptq4 --calib digits \\
      --out adder4.onnx
  quantkit quantize --model my_pkg.models:build --weights ckpt.pt --scheme w8a8 --calib images/ \\
      --input-shape 3,224,224 --out model.pt
  quantkit inspect adder4.onnx
  quantkit bench --model quantkit.models.vit:vit_digits --scheme bivit --calib digits --binary-form both
  quantkit info

exit codes: 0 ok, 1 bad input (one-line error), 2 usage, 70 internal error, 130 interrupted
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PKG.MODULE:FACTORY",
                   help="a function returning the float nn.Module (also file.py:factory)")
    p.add_argument("--weights", metavar="CKPT", help="state_dict to load (torch.load with weights_only=True)")
    p.add_argument("--scheme", required=True, help="quantization scheme (see `quantkit schemes`)")
    p.add_argument("--calib", metavar="PATH|digits",
                   help="calibration data: 'digits' (scikit-learn), a folder of images, or a .npy/.pt tensor (N, ...); "
                        "images and uint8 (any integer 0..255) data are scaled to [0, 1], float data is used as "
                        "it is, then --mean/--std apply (digits: its own mean/std unless given)")
    p.add_argument("--input-shape", metavar="C,H,W", help="one sample's shape (resizes images / digits to it)")
    p.add_argument("--mean", metavar="M[,M...]",
                   help="normalize calibration data: (x - mean) / std, one value or one per channel, on the [0, 1] "
                        "scale images and uint8 data are brought to (e.g. 0.485,0.456,0.406)")
    p.add_argument("--std", metavar="S[,S...]", help="see --mean (e.g. 0.229,0.224,0.225)")
    p.add_argument("--num-calib", type=int, default=256, metavar="N", help="calibration samples to use (256)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="batch size (32; bench: 1)")
    p.add_argument("--set", action="append", metavar="OPTION=VALUE",
                   help="scheme option override, repeatable (e.g. --set groups=4 --set keep_first=False)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="quantkit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Low-bit quantization and binarization of vision models (AdaBin, AdderNet PTQ, BiViT), "
                    "with bit-packed kernels and ONNX export.", epilog=_EPILOG_MAIN)
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="more detail; tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model and write ONNX or a PyTorch deploy checkpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Quantize a model (prepare + calibrate), convert it, and write it: .onnx runs in "
                                   "stock onnxruntime (verified against PyTorch), .pt is a PyTorch checkpoint.",
                       epilog="examples:\n  quantkit quantize --model quantkit.models.adder_resnet:adder_cnn_digits "
                              "--scheme adder_ptq4 --calib digits --out adder4.onnx\n"
                              "  quantkit quantize --model my_pkg.models:build --weights ckpt.pt --scheme w4a4 "
                              "--calib calib.npy --out model.pt")
    _add_model_args(q)
    q.add_argument("--out", required=True, metavar="FILE",
                   help="model.onnx, model.xml (OpenVINO IR, .bin beside it) or model.pt (never one of the inputs)")
    q.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    q.add_argument("--opset", type=int, default=21, help="ONNX opset, 18-21 (21: INT4 initializers)")
    q.add_argument("--binary-form", choices=("unpack", "xor"), default="unpack",
                   help="ONNX form of binary layers (unpack: faster in onnxruntime)")
    q.add_argument("--uniform-form", choices=("int8", "int8_signed", "int4"), default="int8",
                   help="container of w8a8 / w4a4 layers (int8: 8-bit codes, onnxruntime runs them as QLinearConv / "
                        "QGemm, exact on every CPU; int8_signed: every weight int8, exact only on CPUs with VNNI and "
                        "on ARM; int4 (ONNX only): INT4 weights and UINT4 activations at opset 21, half the weight "
                        "bytes, runs unfused)")
    q.add_argument("--custom-ops", action="store_true",
                   help="emit compact quantkit.* custom-domain ops (not runnable by stock onnxruntime)")
    q.set_defaults(func=cmd_quantize)

    s = sub.add_parser("schemes", help="list the quantization schemes")
    s.set_defaults(func=cmd_schemes)

    i = sub.add_parser("inspect", help="show an ONNX file's or OpenVINO IR's operators, bit widths and sizes",
                       epilog="example:\n  quantkit inspect model.onnx",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("file", help="an .onnx file or an OpenVINO .xml")
    i.set_defaults(func=cmd_inspect)

    n = sub.add_parser("info", help="kernels built, CPU features, CUDA")
    n.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="latency of PyTorch FP32, the deploy model and onnxruntime",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  quantkit bench --model quantkit.models.vit:vit_digits --scheme bivit "
                              "--calib digits --binary-form both --repeats 50")
    _add_model_args(b)
    b.set_defaults(batch_size=1)
    b.add_argument("--repeats", type=int, default=30, help="timed runs (median reported; 30)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs first (3)")
    b.add_argument("--threads", type=int, default=0, help="threads for PyTorch and onnxruntime (0: default)")
    b.add_argument("--binary-form", choices=("unpack", "xor", "both"), default="both",
                   help="ONNX forms of binary layers to time (both)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    for name in ("num_calib", "batch_size", "repeats"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    console = _Console(args.quiet, args.verbose)
    if args.quiet:
        import warnings

        warnings.filterwarnings("ignore")
    from .errors import QuantkitError

    try:
        return int(args.func(args, console) or 0)
    except (CLIError, QuantkitError) as exc:
        if args.verbose:
            traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"quantkit: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("quantkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"quantkit: internal error: {type(exc).__name__}: {first} (run with --verbose for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
