"""Quantization-aware training inside the user's own loop.

    qat = quantkit.QAT(model, "adabin")
    opt = torch.optim.SGD(qat.model.parameters(), lr=0.1)
    for epoch in range(E):
        qat.epoch_start(epoch, E)          # schedules: AdaBin EDE temperature, BiViT CLB stage switch
        for x, y in loader:
            loss = criterion(qat.model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
    deployed = qat.convert()

``qat.model`` is a plain ``nn.Module``: wrap it in DistributedDataParallel, run it under ``torch.autocast``,
``torch.compile`` it, save and load its ``state_dict`` -- the wrapper keeps no hidden training state besides the
epoch counters it is given.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import api
from .schemes.base import SchemeConfig


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) between the output distributions (ReActNet's distribution loss; BiViT uses it):

        L = T^2 * sum_c p_t(c) * (log p_t(c) - log p_s(c)),  p = softmax(logits / T), averaged over the batch.

    The teacher is detached."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The prepared model inside the usual wrappers: DistributedDataParallel / DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``), nested in any order. Only these wrapper types are unwrapped: a user model that
    merely has a child called ``module`` is returned as it is."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model


class QAT:
    """Prepare ``model`` for quantization-aware training with ``scheme`` and drive its schedules."""

    def __init__(self, model: nn.Module, scheme: str | SchemeConfig, example_inputs: tuple | None = None,
                 *, inplace: bool = False, **overrides: Any) -> None:
        self.model: nn.Module = api.prepare(model, scheme, example_inputs, inplace=inplace, **overrides)
        self.config: SchemeConfig = api.config_of(self.model)
        self.epoch: int | None = None
        self.total_epochs: int | None = None

    def epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Call at the start of every epoch (0-based ``epoch`` of ``total_epochs``)."""
        if total_epochs <= 0 or not 0 <= epoch < total_epochs:
            from .errors import ConfigError

            raise ConfigError(f"epoch_start(epoch={epoch}, total_epochs={total_epochs}): need 0 <= epoch < total_epochs")
        self.epoch, self.total_epochs = epoch, total_epochs
        target = unwrap_model(self.model)
        for _, m in api.quant_modules(target):
            m.epoch_start(epoch, total_epochs)
        self.config.epoch_start(target, epoch, total_epochs)

    @staticmethod
    def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
        return distillation_loss(student_logits, teacher_logits, temperature)

    def report(self):
        return api.report(unwrap_model(self.model))

    def convert(self) -> nn.Module:
        """The deploy model (a new module; the training model is left as it is). Works at any point, also before
        the first training step, and with ``self.model`` wrapped in DDP or ``torch.compile``."""
        with torch.no_grad():
            return api.convert(unwrap_model(self.model))
