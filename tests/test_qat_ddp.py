"""quantkit.QAT under torch.nn.parallel.DistributedDataParallel: gloo backend, 2 real processes.

Equality by construction: the model has no batch-statistics layer, the loss is a batch mean and each rank gets one
half of the batch, so DDP's averaged gradient equals the full-batch gradient of a single process; after the same
optimizer steps the parameters agree up to float rounding, and the two ranks agree exactly."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import quantkit


@pytest.fixture(autouse=True)
def _one_thread():
    """These small models run fastest single-threaded (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORLD = 2
STEPS = 3


class NoBatchStatsCNN(nn.Module):
    """conv (FP stem) -> ReLU -> conv -> ReLU -> conv -> ReLU -> mean -> linear (FP); GroupNorm, not BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(4, 16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.relu0(self.stem(x))
        x = self.relu1(self.gn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _setup():
    torch.manual_seed(0)
    qat = quantkit.QAT(NoBatchStatsCNN(), "adabin")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    return qat, x, y


def _train(qat, model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(STEPS):
        qat.epoch_start(step, STEPS)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


RENDEZVOUS_TIMEOUT = timedelta(seconds=120)  # a collective that waits longer fails with an error, never hangs
RUN_TIMEOUT_S = 300.0  # both workers together, start-up included (the suite may share 2 cores with other jobs)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=RENDEZVOUS_TIMEOUT)
    try:
        qat, x, y = _setup()
        half = x.shape[0] // WORLD
        ddp = nn.parallel.DistributedDataParallel(qat.model)
        losses = _train(qat, ddp, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        dist.all_reduce(losses)  # mean of the two half-batch losses = full-batch loss
        torch.save({"state": qat.model.state_dict(), "losses": losses / WORLD},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp  # its reducer holds the process group: release it before the group goes
        # Every rank finishes its last collective before any rank tears the group down: a rank that destroys its
        # group while the other still talks to it makes gloo's background thread abort that other process.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_workers(tmp: str) -> None:
    """Spawn the workers with a fresh rendezvous file of their own, and fail (not hang) if they do not finish."""
    init_file = os.path.join(tempfile.mkdtemp(prefix="rendezvous-", dir=tmp), "init")
    ctx = mp.start_processes(_worker, args=(init_file, tmp), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} DDP workers did not finish within {RUN_TIMEOUT_S:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo "
                    "is not available in this torch build")
@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous with gloo is POSIX-only here")
def test_ddp_two_processes_equals_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        _run_workers(tmp)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]

    qat, x, y = _setup()
    losses = _train(qat, qat.model, x, y)
    single = qat.model.state_dict()
    assert qat.model.relu1.__class__.__name__ == "Maxout"  # the pass ran in every process alike
    for key, value in single.items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key  # ranks stay in sync exactly
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(ranks[0]["losses"], losses, rtol=1e-5, atol=1e-6)
    # the parameters did move: the comparison is not trivially between initial states
    torch.manual_seed(0)
    fresh = quantkit.QAT(NoBatchStatsCNN(), "adabin").model.state_dict()
    assert not torch.equal(fresh["conv1.weight"], single["conv1.weight"])
    assert single["conv2.ede_t"].item() != fresh["conv2.ede_t"].item()
