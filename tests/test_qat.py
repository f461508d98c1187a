"""quantkit.QAT in ordinary training setups: plain loop, bf16 autocast, resume from a state_dict, torch.compile,
convert before training, wrapped models. (DDP with 2 real processes: tests/test_qat_ddp.py.)"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkit
from quantkit.nn.adabin import AdaBinConv2d, Maxout
from quantkit.qat import distillation_loss, unwrap_model


@pytest.fixture(autouse=True)
def _one_thread():
    """These small models run fastest single-threaded (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.relu0(self.bn0(self.stem(x)))
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.arange(n) % 4
    x = protos[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


def _qat(seed=0, **overrides):
    torch.manual_seed(seed)
    return quantkit.QAT(TinyCNN(), "adabin", **overrides)


def _step(model, opt, x, y):
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out.detach(), loss.item()


def test_plain_loop_trains_and_drives_ede_schedule():
    qat = _qat()
    assert isinstance(qat.model.conv1, AdaBinConv2d) and isinstance(qat.model.relu1, Maxout)
    x, y = _data()
    opt = torch.optim.SGD(qat.model.parameters(), lr=0.05, momentum=0.9)
    epochs, losses = 4, []
    for epoch in range(epochs):
        qat.epoch_start(epoch, epochs)
        assert qat.model.conv1.ede_t.item() == pytest.approx(10 ** (-3 + 4 * epoch / epochs), rel=1e-6)
        assert qat.model.conv2.ede_k.item() == pytest.approx(max(1 / 10 ** (-3 + 4 * epoch / epochs), 1), rel=1e-6)
        epoch_loss = 0.0
        for i in range(0, 64, 16):
            epoch_loss += _step(qat.model, opt, x[i:i + 16], y[i:i + 16])[1]
        losses.append(epoch_loss)
    assert losses[-1] < losses[0]
    assert qat.model.conv1.alpha_a.item() != 1.0 and qat.model.relu1.neg_scale.grad is not None
    assert (qat.epoch, qat.total_epochs) == (3, 4)


def test_epoch_start_rejects_bad_epochs():
    qat = _qat()
    with pytest.raises(quantkit.ConfigError):
        qat.epoch_start(4, 4)
    with pytest.raises(quantkit.ConfigError):
        qat.epoch_start(0, 0)


def test_autocast_bf16_cpu():
    qat = _qat()
    x, y = _data(16)
    with torch.no_grad():
        ref = qat.model(x)
    opt = torch.optim.SGD(qat.model.parameters(), lr=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = qat.model(x)
        loss = F.cross_entropy(out, y)
    assert out.dtype == torch.bfloat16
    loss.backward()
    for name, p in qat.model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert qat.model.conv1.alpha_a.grad.abs() > 0
    opt.step()
    # bf16 rounding may flip a few binary activations near the threshold; the logits stay close overall
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.3


def test_resume_from_state_dict_gives_identical_next_step():
    x, y = _data(32)
    qat = _qat(seed=0)
    opt = torch.optim.SGD(qat.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for epoch in range(2):
        qat.epoch_start(epoch, 3)
        _step(qat.model, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": qat.model.state_dict(), "opt": opt.state_dict(), "epoch": 1}, buf)
    out_next, _ = _step(qat.model, opt, x, y)
    params_next = {k: v.clone() for k, v in qat.model.state_dict().items()}

    resumed = _qat(seed=123)  # different initial weights: everything must come from the checkpoint
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed.model.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(resumed.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt2.load_state_dict(ckpt["opt"])
    assert resumed.model.conv1.ede_t.item() == qat.model.conv1.ede_t.item()  # schedule state travels along
    out_resumed, _ = _step(resumed.model, opt2, x, y)
    assert torch.equal(out_resumed, out_next)
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, params_next[k]), k


def test_convert_before_any_training_step():
    qat = _qat()
    deployed = qat.convert()
    assert qat.model.training  # the training model is untouched
    x, _ = _data(8)
    qat.model.eval()
    with torch.no_grad():
        ref, out = qat.model(x), deployed(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert quantkit.report(deployed).stage == "deployed"


def test_unwrap_only_real_wrappers():
    class HasModuleChild(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
            self.head = nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.head(self.module(x)).mean((2, 3)))

    qat = quantkit.QAT(HasModuleChild(), "adabin")
    assert unwrap_model(qat.model) is qat.model
    qat.epoch_start(3, 4)  # t = 10^(-3 + 4*3/4) = 1
    # layers outside the child called "module" get the schedule too
    assert qat.model.head.ede_t.item() == pytest.approx(1.0, rel=1e-6)
    assert qat.model.module[1].ede_t.item() == pytest.approx(1.0, rel=1e-6)
    dp = nn.DataParallel(qat.model)
    assert unwrap_model(dp) is qat.model


def test_distillation_loss():
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    loss = distillation_loss(s, t, temperature=2.0)
    p_t = F.softmax(t.detach() / 2, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert distillation_loss(s, s.detach()).abs().item() < 1e-6
    assert quantkit.QAT.distillation_loss is not None


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available in this torch build")
def test_torch_compile_smoke():
    """torch.compile of the prepared model: forward and backward run and match eager. Uses the aot_eager backend
    (dynamo graph capture + AOT autograd, which is what must understand quantkit's autograd Functions) to keep the
    test fast (inductor also compiles this model with fullgraph=True, in about 40 s on 2 CPU cores); inductor code
    generation adds nothing quantkit-specific. fullgraph=True: the prepared model has no graph breaks."""
    qat = _qat()
    x, y = _data(8)
    compiled = torch.compile(qat.model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    F.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in qat.model.named_parameters()}
    qat.model.zero_grad()
    ref = qat.model(x)
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n, p in qat.model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    # the EDE parameters are tensors: a new epoch changes them without breaking the compiled graph
    qat.epoch_start(1, 2)
    compiled(x).sum().backward()
    assert unwrap_model(compiled) is qat.model
    assert qat.convert() is not None
