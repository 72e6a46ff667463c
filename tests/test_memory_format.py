"""Channels-last training: the trainer's automatic choice, the guard around oneDNN's broken
channels-last 1x1 weight gradient, optimiser state restored in its parameter's layout, and the
memory-format benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _train_helpers import base_config
from e2kd.train import config_from_dict, read_metrics, run
from e2kd.train.checkpoint import match_state_layout
from e2kd.train.config import Amp
from e2kd.train.loop import use_channels_last

ROOT = Path(__file__).resolve().parent.parent

# A channels-last 1x1 convolution with stride 2 and 4 input channels, trained through the
# project's convolution classes; its weight gradient is checked against the NCHW computation.
# Without the guard oneDNN's AVX2 kernel gives wrong gradients, hangs or corrupts the heap, so
# the check runs in a fresh process under a timeout.
_GUARD_SCRIPT = r"""
import copy, sys, torch
from e2kd._conv import expect_second_order, use_fast_small_convs
from e2kd.bcos.layers import BcosConv2d
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)

def nchw(layer):
    ref = copy.deepcopy(layer)
    for p in ref.parameters():  # NCHW strides (a 1x1 weight's .contiguous() keeps channels-last ones)
        p.data = p.data.clone(memory_format=torch.contiguous_format)
    return ref

def weight_grad(layer, x, r, second_order):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    if second_order:  # an explanation's input gradient, differentiated once more
        with expect_second_order():
            y = layer(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        loss = (gx * r).sum() + y.sum()
    else:
        loss = layer(x).square().sum()
    loss.backward(inputs=list(layer.parameters()))
    return next(layer.parameters()).grad

plain = use_fast_small_convs(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, stride=2, bias=False)))[0]
for layer in (plain, BcosConv2d(4, 8, 1, stride=2)):
    ref = nchw(layer)
    layer.to(memory_format=torch.channels_last)
    for second_order in (False, True):
        for _ in range(6):
            x = torch.randn(16, 4, 16, 16)
            r = torch.randn(16, 4, 16, 16)
            cl = lambda t: t.contiguous(memory_format=torch.channels_last)
            got = weight_grad(layer, cl(x), cl(r), second_order)
            want = weight_grad(ref, x, r, second_order)
            err = (got - want).abs().max().item()
            assert err <= 1e-4 * max(1.0, want.abs().max().item()), (type(layer).__name__, second_order, err)
print("ok")
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_1x1_strided_weight_gradient_is_right(threads):
    out = subprocess.run(
        [sys.executable, "-c", _GUARD_SCRIPT, str(threads)],
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


class _Plain1x1(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.down = nn.Conv2d(cin, 8, 1, stride=2)

    def forward(self, x):
        return self.down(x).mean(dim=(2, 3))


def _cfg(**kw):
    return types.SimpleNamespace(channels_last=kw.get("channels_last"), amp=kw.get("amp", Amp.none))


def test_automatic_channels_last_follows_device_amp_and_model():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last(_cfg(), conv, cpu) is True
    assert use_channels_last(_cfg(), mlp, cpu) is False  # nothing to gain without 2-D convolutions
    assert use_channels_last(_cfg(), conv, cuda) is False  # fp32 on CUDA: left as it is
    assert use_channels_last(_cfg(amp=Amp.bf16), conv, cuda) is True
    assert use_channels_last(_cfg(amp=Amp.fp16), conv, cuda) is True
    assert use_channels_last(_cfg(channels_last=False), conv, cpu) is False
    assert use_channels_last(_cfg(channels_last=True), conv, cuda) is True


def test_a_plain_conv_with_the_broken_weight_gradient_keeps_nchw_or_is_refused():
    cpu = torch.device("cpu")
    assert use_channels_last(_cfg(), _Plain1x1(4), cpu) is False
    with pytest.raises(ValueError, match=r"layer 'down'.*1x1 kernel.*channels_last=false"):
        use_channels_last(_cfg(channels_last=True), _Plain1x1(4), cpu)
    assert use_channels_last(_cfg(), _Plain1x1(8), cpu) is True  # 8 channels: not affected
    frozen = _Plain1x1(4).requires_grad_(False)  # no weight gradient, no risk
    assert use_channels_last(_cfg(channels_last=True), frozen, cpu) is True


def test_restored_optimiser_state_takes_its_parameters_layout():
    """Fused Adam on a channels-last parameter with a contiguous state (as a checkpoint restores
    it) must give the update of the same state in the parameter's layout."""
    torch.manual_seed(0)
    p0 = torch.randn(4, 3, 3, 3)
    grads = [torch.randn(4, 3, 3, 3) for _ in range(3)]

    def steps(match: bool) -> torch.Tensor:
        p = nn.Parameter(p0.clone().contiguous(memory_format=torch.channels_last))
        opt = torch.optim.Adam([p], lr=0.1, fused=True)
        p.grad = grads[0].contiguous(memory_format=torch.channels_last)
        opt.step()
        state = opt.state_dict()
        for v in state["state"][0].values():  # what a checkpoint hands back: contiguous copies
            if torch.is_tensor(v) and v.dim() == 4:
                v.data = v.contiguous()
        opt = torch.optim.Adam([p], lr=0.1, fused=True)
        opt.load_state_dict(state)
        if match:
            match_state_layout(opt)
            assert opt.state[p]["exp_avg"].stride() == p.stride()
        for g in grads[1:]:
            p.grad = g.contiguous(memory_format=torch.channels_last)
            opt.step()
        return p.detach().contiguous()

    reference = nn.Parameter(p0.clone())
    opt = torch.optim.Adam([reference], lr=0.1)
    for g in grads:
        reference.grad = g.clone()
        opt.step()
    torch.testing.assert_close(steps(match=True), reference.detach(), rtol=1e-6, atol=1e-6)


def test_trainer_runs_channels_last_by_default_on_the_cpu_with_the_same_losses(tmp_path):
    runs = {}
    for setting in (None, False):
        values = base_config(tmp_path, f"cl_{setting}", **{"channels_last": setting, "log_every": 1, "deterministic": True})
        runs[setting] = run(config_from_dict(values), mode="teacher")
    env = {k: json.loads((d / "env.json").read_text()) for k, d in runs.items()}
    assert env[None]["channels_last"] is True and env[False]["channels_last"] is False
    losses = {k: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for k, d in runs.items()}
    assert len(losses[None]) == len(losses[False]) == 4  # 64 images, batches of 16
    assert losses[None][0] == pytest.approx(losses[False][0], rel=1e-5)  # same weights: rounding only
    assert losses[None] == pytest.approx(losses[False], rel=1e-2)
    channels_last_model = load_file(str(runs[None] / "model.safetensors"))
    assert all(t.is_contiguous() for t in channels_last_model.values())


def test_memory_format_benchmark_runs_and_compares_losses():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_format", "--pair", "gradcam", "--teacher", "resnet8_small",
         "--student", "resnet8_small", "--size", "32", "--batch", "2", "--classes", "4", "--steps", "1",
         "--threads", "1", "--warmup", "0"],
        cwd=str(ROOT), env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| kd |") or line.startswith("| e2kd |")]
    assert len(rows) == 2 and all(float(r.split("|")[4]) > 0 for r in rows), out.stdout
    assert "loss" in out.stdout and "contiguous" in out.stdout


def test_channels_last_weights_get_their_gradients_without_layout_copies():
    """The matrix-product weight gradient and the unit-norm backward of a channels-last B-cos
    weight give the NCHW values, already in the weight's layout (no weight-sized copy later)."""
    from e2kd._conv import matmul_weight_grad
    from e2kd.bcos.layers import _UnitRows

    torch.manual_seed(0)
    x, g = torch.randn(4, 6, 5, 5), torch.randn(4, 8, 3, 3)
    want = torch.nn.grad.conv2d_weight(x, (8, 6, 3, 3), g, 2, 1)
    got = matmul_weight_grad(x, g, (8, 6, 3, 3), (2, 2), (1, 1), channels_last=True)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul_weight_grad(x, g, (8, 6, 3, 3), (2, 2), (1, 1)), want, rtol=1e-5, atol=1e-5)

    w = torch.randn(8, 6, 3, 3)
    upstream = torch.randn(8, 6, 3, 3)
    grads = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        p = w.clone(memory_format=layout).requires_grad_(True)
        _UnitRows.apply(p).backward(upstream.contiguous(memory_format=layout))
        grads[layout] = p.grad
    assert grads[torch.channels_last].stride() == w.contiguous(memory_format=torch.channels_last).stride()
    # the hand formula: (g - u <g, u>) / ||w|| row by row
    n = w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    u = w / n
    expected = (upstream - u * (upstream * u).sum(dim=(1, 2, 3), keepdim=True)) / n
    for layout, grad in grads.items():
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=str(layout))
