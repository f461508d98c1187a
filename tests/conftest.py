import contextlib
import os

import pytest
import torch
from torch import nn

# Tests are small; two threads match the CI machine and keep timings stable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: faster than two and immune to contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def settle_bn(model: nn.Module, shape: tuple, batches: int = 3) -> nn.Module:
    """Give BatchNorm layers running statistics from random data (a freshly built model's outputs are otherwise
    degenerate: BN(mean 0, var 1) of adder outputs is all negative and ReLU zeroes everything)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, *shape))
    return model.eval()


def hypothesis_examples(default: int) -> int:
    """Hypothesis examples per test; QUANTKIT_HYPOTHESIS_EXAMPLES lowers it (the ASan run uses fewer)."""
    return min(default, int(os.environ.get("QUANTKIT_HYPOTHESIS_EXAMPLES", default)))


def use_isa_level(level: str, monkeypatch, have_kernels: bool) -> str:
    """The body of the kernel tests' per-ISA fixtures: skip without compiled kernels or where this CPU lacks
    ``level``, else set QUANTKIT_CPU_ISA for the test and return ``level``."""
    from quantkit import ops

    if not have_kernels:
        pytest.skip("compiled quantkit kernels not built")
    if level not in ops.supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    monkeypatch.setenv("QUANTKIT_CPU_ISA", level)
    assert ops.cpu_isa() == level
    return level


@contextlib.contextmanager
def cpu_isa(isa: str):
    """Set QUANTKIT_CPU_ISA for the duration of a block (the kernels read it on every call)."""
    saved = os.environ.get("QUANTKIT_CPU_ISA")
    os.environ["QUANTKIT_CPU_ISA"] = isa
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("QUANTKIT_CPU_ISA", None)
        else:
            os.environ["QUANTKIT_CPU_ISA"] = saved
