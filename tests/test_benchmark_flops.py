"""The arithmetic of a training step, counted (``benchmarks.flops``) and checked against the
counts worked out by hand: a convolution's input gradient and its weight gradient each cost
what its forward costs, so a step's FLOPs follow from the forward FLOPs of its models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import step as step_bench  # noqa: E402
from benchmarks.flops import count_flops  # noqa: E402
from e2kd.bcos import BcosExplainer  # noqa: E402


def _conv_flops(n, o, c, k, h_out, w_out):
    """2 · N · O · C · k² · H' · W': one multiply and one add per weight tap and output value."""
    return 2 * n * o * c * k * k * h_out * w_out


def test_counts_a_convolution_and_a_linear_layer_by_hand():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    w = torch.rand(5, 3, 3, 3, requires_grad=True)
    lin = torch.rand(7, 5 * 4 * 4, requires_grad=True)

    def forward():
        y = F.conv2d(x, w, stride=2, padding=1)  # 4 x 4 output
        return F.linear(y.flatten(1), lin)

    conv = _conv_flops(2, 5, 3, 3, 4, 4)
    linear = 2 * 2 * 80 * 7
    assert count_flops(forward).total == conv + linear
    assert count_flops(lambda: forward().sum().backward()).total == 3 * (conv + linear)
    # no input gradient asked for: the forward and the weight gradients only
    x.requires_grad_(False)
    counted = count_flops(lambda: forward().sum().backward())
    assert counted.total == 2 * conv + 3 * linear  # the linear layer's input gradient still feeds the convolution's
    assert set(counted.by_op) == {"convolution", "convolution_backward", "mm"}


def test_counts_through_an_explanation_taken_with_respect_to_a_leaf_input():
    """torch's FlopCounterMode fails here (its module tracker hooks the gradients); a B-cos
    teacher explanation is one forward pass plus one input-gradient pass: twice the forward."""
    torch.manual_seed(0)
    from e2kd.models import create_model

    teacher = create_model("bcos_resnet8_small", num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        forward = count_flops(lambda: teacher(x)).total
    explained = count_flops(lambda: BcosExplainer()(teacher, x, None, create_graph=False)).total
    assert forward > 0 and explained == 2 * forward


@pytest.fixture()
def small_bcos_pair(monkeypatch):
    monkeypatch.setitem(step_bench.PAIRS, "bcos", ("bcos_resnet18_small", "bcos_resnet8_small", "bcos"))
    return types.SimpleNamespace(channels_last=False, device="cpu", classes=4, batch=2, size=32, amp="none",
                                 compile=False)


def test_step_flops_follow_from_the_forward_flops_of_teacher_and_student(small_bcos_pair):
    """Per convolution: KD = forward + input gradient + weight gradient (the stem's input
    gradient is not needed); exact e²KD adds the explanation's input gradient (stem included)
    and its second-order pass (one convolution for the incoming gradient, one weight gradient):
    the student's step is 6 forwards less the stem's, and the teacher's explanation 2 forwards."""
    args = small_bcos_pair
    teacher = step_bench.build_teacher("bcos", args)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        t_fwd = count_flops(lambda: teacher(x)).total
        variant = step_bench.Variant("kd", teacher, "bcos", args)
        s_fwd = count_flops(lambda: variant.distiller.student(x)).total
    stem = _conv_flops(2, 16, 6, 3, 32, 32)  # bcos_resnet8_small's first layer: 6 -> 16 channels, 3 x 3, stride 1
    expected = {
        "kd": t_fwd + 3 * s_fwd - stem,
        "lam0": t_fwd + 3 * s_fwd - stem,
        "frozen": 6 * s_fwd - stem,
        "e2kd": 2 * t_fwd + 6 * s_fwd - stem,
    }
    for name, flops in expected.items():
        v = step_bench.Variant(name, teacher, "bcos", args)
        v(x)
        assert count_flops(lambda: v(x)).total == flops, name
    assert expected["e2kd"] / expected["kd"] > 1.9  # why B-cos e2KD / KD stays near 2 at equal efficiency


@pytest.mark.slow
def test_step_benchmark_prints_the_flop_table(tmp_path):
    out = tmp_path / "step.json"
    cmd = [sys.executable, "-m", "benchmarks.step", "--pair", "bcos", "--teacher", "bcos_resnet8_small",
           "--student", "bcos_resnet8_small", "--variants", "kd,e2kd,every2", "--size", "32", "--batch", "2",
           "--steps", "2", "--warmup", "0", "--threads", "1", "--classes", "4", "--flops", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["pairs"]["bcos"]
    assert report["gemm_gflop_per_s"] > 0
    # same teacher and student: KD = 4 forwards - stem, e2KD = 8 - stem, every2 their mean
    assert rows["e2kd"]["gflop"] / rows["kd"]["gflop"] == pytest.approx(2.0, rel=0.03)
    assert rows["every2"]["gflop"] == pytest.approx((rows["kd"]["gflop"] + rows["e2kd"]["gflop"]) / 2, rel=1e-9)
    assert all(r["gflop_per_s"] > 0 for r in rows.values())
    assert "| bcos | e2kd | " in res.stdout and "share of the matrix-product rate" in res.stdout
