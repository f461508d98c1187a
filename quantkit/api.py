"""The public entry points, in PyTorch's vocabulary: prepare -> (calibrate | train) -> convert.

``prepare`` returns a *simulated* model (float math, quantizer modules inserted); ``quantize`` is prepare +
calibrate, the one-call PTQ convenience; ``convert`` returns the *deploy* model (packed / integer layers on
``torch.ops.quantkit`` kernels). Each returns a new model and leaves the input untouched unless ``inplace=True``;
after an error the input model is never left half-modified.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from .calibrate.data import run_calibration
from .errors import ConfigError, NoQuantizableLayerError, UnsupportedModelError
from .graph.fold import batchnorm_parameter_bytes, fold_batchnorms
from .graph.passes import PassContext, PassManager, refresh_report, replace_module
from .graph.records import fill_deployed_record
from .graph.trace import trace
from .nn.base import QuantModule
from .report import QuantReport
from .schemes.base import SchemeConfig, get_scheme, list_schemes

_REPORT_ATTR = "_quantkit_report"
_CONFIG_ATTR = "_quantkit_config"


def schemes() -> dict[str, str]:
    """Registered scheme names -> one-line descriptions."""
    return list_schemes()


def check_example_inputs(example_inputs: Any) -> tuple | None:
    """``example_inputs`` as a tuple of positional inputs (a single tensor is wrapped); ConfigError for a shape or
    anything else that is not a tuple."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (torch.Size, list)) or (
        isinstance(example_inputs, tuple) and example_inputs and all(isinstance(v, int) for v in example_inputs)
    ):
        raise ConfigError(
            "example_inputs must be a tuple of the model's positional inputs (e.g. (torch.randn(1, 3, 224, 224),)), "
            f"not a shape: got {example_inputs!r}"
        )
    if not isinstance(example_inputs, tuple):
        raise ConfigError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}")
    return example_inputs


def scheme_to_dict(cfg: SchemeConfig) -> dict:
    """Every field of a scheme config (defaults and overrides alike) and the name it is registered under, as
    JSON-safe data (a checkpoint loaded with ``torch.load(weights_only=True)`` can hold it); see
    :meth:`SchemeConfig.to_dict <quantkit.schemes.base.SchemeConfig.to_dict>`. :func:`scheme_from_dict` rebuilds an
    equal config."""
    return cfg.to_dict()


def scheme_from_dict(data: dict) -> SchemeConfig:
    """The scheme config :func:`scheme_to_dict` described (validated as :func:`quantkit.get_scheme` does)."""
    return SchemeConfig.from_dict(data)


def _commit(model: nn.Module, work: nn.Module, inplace: bool) -> nn.Module:
    """Return ``work``; with inplace=True move its state into ``model`` (only after everything succeeded)."""
    if not inplace:
        return work
    model.__dict__.update(work.__dict__)
    return model


def prepare(model: nn.Module, scheme: str | SchemeConfig, example_inputs: tuple | None = None, *,
            inplace: bool = False, **overrides: Any) -> nn.Module:
    """Insert the scheme's simulated quantized layers; returns the simulated model (float math).

    ``example_inputs`` (a tuple of positional inputs) is optional; it lets tracing fall back to a real forward pass
    when torch.fx cannot trace the model. ``overrides`` are fields of the scheme's config (bits, skip=, only=,
    rules=, ...). See ``quantkit.schemes()``. The simulated model keeps the input's train/eval mode (train it with
    :class:`quantkit.QAT`, or :func:`calibrate` it, which leaves it in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"prepare expects a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, _CONFIG_ATTR):
        raise UnsupportedModelError(
            "this model was already prepared by quantkit (scheme "
            f"{getattr(model, _CONFIG_ATTR).name!r}); prepare the original float model instead"
        )
    cfg = get_scheme(scheme, **overrides)
    example_inputs = check_example_inputs(example_inputs)
    work = copy.deepcopy(model)
    passes = cfg.passes()
    leaf_types = tuple({t for p in passes for t in getattr(p, "targets", {})})
    tr = trace(work, example_inputs, leaf_types)
    report = QuantReport(scheme=cfg.name, trace_method=tr.method, trace_note=tr.reason)
    ctx = PassContext(cfg, tr, report)
    PassManager(passes).run(work, ctx)
    ctx.selector.check_all_matched(model, (r.name for r in report.records))
    if not report.records:
        raise NoQuantizableLayerError(
            f"scheme {cfg.name!r} found no candidate layer in {type(model).__name__}; it rewrites layers of type(s) "
            f"{sorted({t.__name__ for t in leaf_types})}. Choose a scheme that fits the model (quantkit.schemes())"
        )
    if not report.quantized:
        reasons = "; ".join(f"{r.name}: {r.kept_fp_reason}" for r in report.records[:5])
        raise NoQuantizableLayerError(
            f"scheme {cfg.name!r} left every candidate layer of {type(model).__name__} in full precision ({reasons}); "
            "relax skip=/only=/rules or keep_first/keep_last"
        )
    _report_shared_calls(report, tr.repeated_calls)
    report.other_bytes = other_parameter_bytes(work, report)
    setattr(work, _REPORT_ATTR, report)
    setattr(work, _CONFIG_ATTR, cfg)
    return _commit(model, work, inplace)


def other_parameter_bytes(model: nn.Module, report: QuantReport) -> int:
    """Bytes of the parameters of ``model`` that belong to no layer listed in ``report`` (so that the report's totals
    cover every parameter)."""
    listed = [r.name for r in report.records]
    total = 0
    for pname, p in model.named_parameters():
        owner = pname.rpartition(".")[0]
        if not any(owner == n or owner.startswith(n + ".") for n in listed):
            total += p.numel() * p.element_size()
    return total


def _report_shared_calls(report: QuantReport, repeated: dict[str, int]) -> None:
    """A quantized layer called several times in one forward pass shares one set of quantization parameters (one
    observer, one learned scale) between its calls: say so per layer and in a note."""
    shared = []
    for rec in report.quantized:
        n = repeated.get(rec.name)
        if n:
            rec.info["calls"] = n
            shared.append(f"{rec.name!r} ({n} calls)")
    if shared:
        report.notes.append(f"layer(s) called more than once in forward share one set of quantization parameters "
                            f"(observer / scales) between their calls: {', '.join(shared)}; the export writes each "
                            "call as its own nodes")


def quant_modules(model: nn.Module) -> list[tuple[str, QuantModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def config_of(model: nn.Module) -> SchemeConfig:
    """The scheme config a model was prepared with (UnsupportedModelError if quantkit did not prepare it)."""
    cfg = getattr(model, _CONFIG_ATTR, None)
    if cfg is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} was not prepared by quantkit; call quantkit.prepare(model, scheme) first"
        )
    return cfg


def calibrate(model: nn.Module, calib_data: Any, *, transform_fn: Callable | None = None,
              max_batches: int | None = None, progress: bool = True, example_inputs: tuple | None = None) -> nn.Module:
    """Run calibration data through a prepared model's observers and fix its quantization parameters (in place).

    Calibration runs in eval mode, and the calibrated model is left in eval mode: it is an inference model
    (BatchNorm uses its running statistics, dropout is off), whatever mode it was prepared in; call ``.train()`` to
    fine-tune it. After an error every module's train/eval mode is as it was."""
    cfg = config_of(model)
    layers = quant_modules(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for _, m in layers:
        m.start_calibration()
    try:
        run_calibration(model, calib_data, transform_fn=transform_fn, max_batches=max_batches, progress=progress,
                        example_inputs=check_example_inputs(example_inputs))
        for _, m in layers:
            m.finish_calibration()
    except BaseException:
        for _, m in layers:
            m.calibrating = False
        for m, training in modes:
            m.training = training
        raise

    def run_batches(n: int | None) -> int:
        return run_calibration(model, calib_data, transform_fn=transform_fn, max_batches=n, progress=progress,
                               desc="re-estimating")

    bn_bytes = batchnorm_parameter_bytes(model)
    folded = cfg.calibrate_finish(model, run_batches) or []
    model.eval()
    report = getattr(model, _REPORT_ATTR)
    for layer, bn in folded:
        report.notes.append(f"BatchNorm {bn!r} folded into {layer!r} after calibration")
        report.folded.append((layer, bn))
        report.folded_bytes += bn_bytes.get(bn, 0)
    report.stage = "calibrated"
    refresh_report(model, report)
    return model


def quantize(model: nn.Module, scheme: str | SchemeConfig, calib_data: Any, example_inputs: tuple | None = None, *,
             inplace: bool = False, transform_fn: Callable | None = None, max_batches: int | None = None,
             progress: bool = True, **overrides: Any) -> nn.Module:
    """Post-training quantization in one call: prepare + calibrate. Returns the calibrated simulated model in eval
    mode (an inference model, whatever the input's mode; the input model keeps its own); pass it to :func:`convert`
    for the deploy model or to :func:`quantkit.export_onnx`."""
    if calib_data is None:
        raise ConfigError("quantize needs calib_data (an iterable of batches or a callable that runs the model)")
    prepared = prepare(model, scheme, example_inputs, inplace=False, **overrides)
    calibrate(prepared, calib_data, transform_fn=transform_fn, max_batches=max_batches, progress=progress,
              example_inputs=example_inputs)
    return _commit(model, prepared, inplace)


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Raise UnsupportedModelError naming the first layer whose parameters or buffers hold NaN/Inf (a quantized
    model derived from them is meaningless, and comparisons with NaN would pass silently)."""
    for mod_name, mod in model.named_modules():
        tensors = list(mod.named_parameters(recurse=False))
        if not type(mod).__module__.startswith("quantkit."):  # quantkit's observers keep +-inf sentinels
            tensors += list(mod.named_buffers(recurse=False))
        for t_name, t in tensors:
            if t is None or not t.is_floating_point() or t.device.type == "meta":
                continue
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                layer = mod_name or type(model).__name__
                raise UnsupportedModelError(
                    f"layer {layer!r} ({type(mod).__name__}): {t_name} has {bad} NaN/Inf value(s) in {what}; fix the "
                    "checkpoint or the training run that produced them (quantkit cannot quantize or verify them)")


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Freeze a prepared (calibrated or trained) model into its deploy form: every simulated layer becomes a deploy
    layer holding only packed / integer tensors that runs on quantkit's kernels. The deploy model is in eval mode
    (it is inference-only).

    Refuses (UnsupportedModelError, naming the layer) a PTQ model that was not calibrated and a model with NaN/Inf
    parameters."""
    cfg = config_of(model)
    check_finite(model, "the model to convert")
    work = copy.deepcopy(model)
    report: QuantReport = copy.deepcopy(getattr(model, _REPORT_ATTR))
    layers = quant_modules(work)
    names = [name for name, _ in layers]
    for name, m in layers:
        if any(name.startswith(other + ".") for other in names):
            continue  # nested: converted by its parent
        deployed = m.to_deploy()
        replace_module(work, name, deployed)
        kept_float = type(deployed).__module__.startswith("torch.nn")
        if kept_float:
            report.notes.append(f"layer {name!r} runs in full precision at the current training stage (e.g. "
                                "stage 1 of a cross-layer binarization schedule) and is deployed as the float "
                                f"{type(deployed).__name__} it computes")
        try:
            fill_deployed_record(report[name], deployed, kept_float)
        except KeyError:
            pass
    work.eval()
    for layer, bn in fold_batchnorms(work):
        report.notes.append(f"BatchNorm {bn!r} folded into the epilogue of {layer!r}")
        report.folded.append((layer, bn))
    from .graph.block_fusion import fuse_deploy_blocks

    report.notes.extend(fuse_deploy_blocks(work))
    from .graph.conv_pool import tile_conv_pools

    report.notes.extend(tile_conv_pools(work))
    from .graph.block_fusion import link_block_chain

    report.notes.extend(link_block_chain(work))
    report.stage = "deployed"
    report.other_bytes = other_parameter_bytes(work, report)  # folded BatchNorms are gone
    setattr(work, _REPORT_ATTR, report)
    setattr(work, _CONFIG_ATTR, cfg)
    return _commit(model, work, inplace)


def report(model: nn.Module) -> QuantReport:
    """The structured per-layer report of a prepared, calibrated or converted model (prints as a table)."""
    rep = getattr(model, _REPORT_ATTR, None)
    if rep is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no quantkit report; it was not prepared by quantkit")
    return rep
