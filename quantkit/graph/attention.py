"""BiViT's rewriting pass: self-attention blocks -> binary attention, MLP linears -> binary PWS linears.

Recognized self-attention forms (anything else that looks like attention stays full precision and is reported):

1. ``torch.nn.MultiheadAttention`` (torchvision ``vit_b_16`` calls it as ``self_attention(x, x, x,
   need_weights=False)``) -> :class:`~quantkit.nn.bivit.BinaryMultiheadAttention`;
2. torchvision's Swin ``ShiftedWindowAttention`` (exact type; v2's cosine attention is not) ->
   :class:`~quantkit.nn.bivit.BinaryShiftedWindowAttention` (relative position bias and shift masks stay FP);
3. timm-style modules: a ``qkv`` Linear (C -> 3C), a ``proj`` Linear (C -> C), an integer ``num_heads``, no other
   parameters, and a forward that torch.fx traces to matmul -> softmax -> matmul or ``F.scaled_dot_product_attention``
   -> :class:`~quantkit.nn.bivit.BinaryQKVAttention`.

MLP linears are the ``nn.Linear`` children of an MLP block (torchvision's ``MLP``/``MLPBlock``, a module with
``fc1``/``fc2`` Linears, or an ``nn.Sequential`` of Linear, activation, Linear). Patch embedding, classification head,
Swin's patch merging, LayerNorms, residuals and GELU stay full precision (BiViT Sec. 4.1); every Linear/Conv2d left
FP gets a report line saying why.
"""
from __future__ import annotations

import inspect
import operator
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.base import QuantModule
from ..nn.bivit import BinaryLinearPWS, BinaryMultiheadAttention, BinaryQKVAttention, BinaryShiftedWindowAttention
from .passes import PassContext, swap_layer
from .records import new_record

try:  # torchvision is optional
    from torchvision.models.swin_transformer import ShiftedWindowAttention as _TVShiftedWindowAttention
    from torchvision.ops.misc import MLP as _TVMLP
except Exception:  # pragma: no cover - torchvision missing
    _TVShiftedWindowAttention = None
    _TVMLP = None

_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid)
_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm, torch.einsum}


# ------------------------------------------------------------------------------------------------ recognition
def classify_attention(module: nn.Module) -> tuple[str | None, str | None]:
    """``(form, None)`` for a recognized self-attention module (form: "mha", "swin", "qkv"); ``(None, reason)`` for an
    attention-like module that cannot be rewritten; ``(None, None)`` when the module is not attention."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha", None
    if _TVShiftedWindowAttention is not None and isinstance(module, _TVShiftedWindowAttention):
        if type(module) is _TVShiftedWindowAttention:
            return "swin", None
        return None, (f"{type(module).__name__} (a variant of torchvision's ShiftedWindowAttention, e.g. Swin v2 "
                      "cosine attention with logit scale and CPB MLP) is not supported by binary attention; left FP")
    if isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "proj", None), nn.Linear):
        reason = _check_qkv_form(module)
        return ("qkv", None) if reason is None else (None, reason)
    if _looks_like_attention(module):
        return None, (f"{type(module).__name__} looks like attention but is none of the supported forms "
                      "(nn.MultiheadAttention, torchvision ShiftedWindowAttention, timm-style qkv/proj); left FP")
    return None, None


def _looks_like_attention(module: nn.Module) -> bool:
    if isinstance(module, QuantModule):
        return False
    if "attention" in type(module).__name__.lower():
        return True
    names = {n for n, c in module.named_children() if isinstance(c, nn.Linear)}
    return any(trio <= names for trio in ({"q", "k", "v"}, {"query", "key", "value"}, {"q_proj", "k_proj", "v_proj"}))


class _ChildLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True  # every child is opaque: only the attention arithmetic of this module is traced


def _check_qkv_form(module: nn.Module) -> str | None:
    """None if ``module`` is a plain timm-style qkv/proj self-attention, else the reason it is not."""
    what = type(module).__name__
    qkv, proj = module.qkv, module.proj
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or proj.in_features != dim:
        return f"{what}: qkv {qkv.in_features}->{qkv.out_features} / proj {proj.in_features}->{proj.out_features} is not the C->3C / C->C layout; left FP"
    heads = getattr(module, "num_heads", None)
    if not isinstance(heads, int) or heads < 1 or dim % heads:
        return f"{what}: no integer num_heads dividing {dim}; left FP"
    extra = [n for n, _ in list(module.named_parameters()) + list(module.named_buffers())
             if not (n.startswith("qkv.") or n.startswith("proj."))]
    if extra:
        return (f"{what}: has parameters/buffers {extra[:4]} beyond qkv/proj (relative position bias, q/k norms, ...) "
                "that the binary qkv attention does not model; left FP")
    for cname, child in module.named_children():
        if cname in ("qkv", "proj"):
            continue
        if not isinstance(child, (nn.Dropout, nn.Identity)):
            return f"{what}: child {cname!r} ({type(child).__name__}) is not part of the plain qkv attention form; left FP"
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    if any(p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return f"{what}: forward takes required arguments besides x; left FP"
    # the replacement is called exactly as the original: it must accept every argument the original accepts
    unknown = [p.name for p in params if p.name not in _QKV_FORWARD_ARGS or p.kind in (p.VAR_POSITIONAL,
                                                                                       p.VAR_KEYWORD)]
    if unknown:
        return (f"{what}: forward accepts argument(s) {unknown} besides x that the binary qkv attention does not "
                f"implement (it takes {list(_QKV_FORWARD_ARGS)}); left FP")
    try:
        graph = _ChildLeafTracer().trace(module)
    except Exception as exc:
        return f"{what}: torch.fx could not trace its forward ({type(exc).__name__}); left FP"
    n_softmax = n_matmul = n_sdpa = 0
    for node in graph.nodes:
        target = node.target
        if node.op == "call_method":
            n_softmax += target == "softmax"
            n_matmul += target in ("matmul", "bmm", "__matmul__")
        elif node.op == "call_function":
            if target is F.scaled_dot_product_attention:
                if node.kwargs.get("is_causal", False) is True:
                    return f"{what}: causal scaled_dot_product_attention is not supported; left FP"
                n_sdpa += 1
            n_softmax += target in _SOFTMAX
            n_matmul += target in _MATMUL
    if n_sdpa == 1 or (n_softmax == 1 and n_matmul >= 2):
        return None
    return (f"{what}: its forward is not matmul -> softmax -> matmul or scaled_dot_product_attention "
            f"(found {n_matmul} matmul, {n_softmax} softmax, {n_sdpa} sdpa); left FP")


def is_mlp_block(module: nn.Module) -> bool:
    """torchvision MLP/MLPBlock, timm-style fc1/fc2, or an nn.Sequential with >= 2 Linears and an activation."""
    if _TVMLP is not None and isinstance(module, _TVMLP):
        return True
    if isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(getattr(module, "fc2", None), nn.Linear):
        return True
    if isinstance(module, nn.Sequential):
        children = list(module.children())
        return sum(isinstance(c, nn.Linear) for c in children) >= 2 and any(isinstance(c, _ACTIVATIONS) for c in children)
    return False


#: keyword arguments of a timm-style attention forward that BinaryQKVAttention implements (timm's signature)
_QKV_FORWARD_ARGS = ("attn_mask", "is_causal")

_WRAPPERS = {"mha": BinaryMultiheadAttention, "swin": BinaryShiftedWindowAttention, "qkv": BinaryQKVAttention}


# ------------------------------------------------------------------------------------------------ the pass
class BiViTPass:
    """Rewrite attention blocks to binary attention, then MLP linears to :class:`BinaryLinearPWS` (see module doc).

    Per-layer rules of the scheme (``skip=``, ``only=``, ``rules=``) apply to attention modules and MLP linears by
    their qualified names; a user rule with a dict value also binarizes a Linear outside the attention/MLP blocks.
    """

    label = "bivit"

    def __init__(self) -> None:
        # module types fx keeps opaque while tracing the model (for the execution order)
        self.targets: dict[type, type] = {nn.MultiheadAttention: BinaryMultiheadAttention}
        if _TVShiftedWindowAttention is not None:
            self.targets[_TVShiftedWindowAttention] = BinaryShiftedWindowAttention

    def run(self, model: nn.Module, ctx: PassContext) -> None:
        cfg = ctx.config
        handled: list[str] = []  # attention blocks (rewritten or left FP): their inner Linears are not MLP linears

        def inside(name: str) -> bool:
            return any(name.startswith(h + ".") for h in handled)

        # 1. attention blocks, each swapped as one unit
        for name, module in list(model.named_modules()):
            if not name or inside(name) or isinstance(module, QuantModule):
                continue
            form, reason = classify_attention(module)
            if form is None and reason is None:
                continue
            handled.append(name)
            if form is None:
                ctx.report.add(new_record(name, module, "attention pass", reason, recursive=True))
                continue
            decision = ctx.selector.decide(name, module, False, False)
            swap_layer(model, ctx, name, module, decision,
                       lambda layer_cfg, cls=_WRAPPERS[form], module=module, name=name:
                       cls.from_float(module, layer_cfg, name), recursive=True)

        # 2. MLP linears (and a report line for every other Linear / Conv2d, which stays FP)
        modules = dict(model.named_modules())
        for name, module in list(modules.items()):
            if not name or inside(name) or isinstance(module, QuantModule):
                continue
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            parent = modules.get(name.rpartition(".")[0]) if "." in name else model
            in_mlp = isinstance(module, nn.Linear) and parent is not None and is_mlp_block(parent)
            decision = ctx.selector.decide(name, module, False, False)
            user_rule = decision.rule.startswith("user rule")
            why = None
            if isinstance(module, nn.Conv2d):
                why = "convolution / patch embedding stays full precision in BiViT"
            elif not in_mlp and not user_rule:
                why = ("not in an attention or MLP block (classification head, patch merging, ...): BiViT keeps it "
                       "full precision (binarize it with rules={name: {}})")
            elif in_mlp and not cfg.binarize_mlp and not user_rule:
                why = "MLP binarization is off (binarize_mlp=False)"
            swap_layer(model, ctx, name, module, decision,
                       lambda layer_cfg, module=module, name=name, in_mlp=in_mlp: BinaryLinearPWS.from_float(
                           module, layer_cfg, name, binary_input=layer_cfg.mlp_binary_act,
                           role="mlp" if in_mlp else "other"),
                       kept_fp_reason=why, recursive=True)

        if cfg.clb and cfg.binarize_mlp:
            ctx.report.notes.append(
                f"cross-layer binarization: with quantkit.QAT, MLP linears run in full precision for the first "
                f"{cfg.clb_split:.0%} of the epochs (stage 1, attention binary) and binary afterwards (stage 2); "
                "the prepared model itself is fully binarized")


__all__ = ["BiViTPass", "classify_attention", "is_mlp_block"]
