"""Numerical faults: a non-finite loss stops the run with a message naming the step and the loss
term, keeps the last good checkpoint and writes no NaN weights; all-zero explanations (dead
ReLUs, a saturated teacher) give a finite loss and finite gradients."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _train_helpers import TinyNet, base_config
from e2kd import Distiller, GradCAM
from e2kd.models import register_model
from e2kd.models._registry import _MODELS
from e2kd.train import NonFiniteLossError, config_from_dict, run
from e2kd.train.build import build_model, save_model
from e2kd.train.checkpoint import list_checkpoints


class _NanGradient(torch.autograd.Function):
    """Identity forward; the backward pass returns NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class FaultyNet(TinyNet):
    """TinyNet that goes wrong from its ``after+1``-th training forward pass on:
    ``fault="logits"`` returns NaN logits, ``fault="gradient"`` keeps finite logits but every
    gradient through the GradCAM layer's output is NaN (so GradCAM maps are NaN too)."""

    def __init__(self, *, fault: str, after: int, **kw):
        super().__init__(**kw)
        self.fault, self.after, self.calls = fault, after, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        broken = self.training and self.calls > self.after
        a = self.features(x)
        if broken and self.fault == "gradient":
            a = _NanGradient.apply(a)
        logits = self.fc(torch.flatten(self.pool(a), 1))
        return logits * float("nan") if broken and self.fault == "logits" else logits


def _register():
    if "faulty_test_net" not in _MODELS:

        @register_model
        def faulty_test_net(num_classes: int = 4, in_chans: int = 3, fault: str = "logits", after: int = 3, **kw):
            return FaultyNet(fault=fault, after=after, num_classes=num_classes, in_chans=in_chans, width=6)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("teacher") / "t"
    save_model(d / "model.safetensors", build_model("tiny_test_net", {}, num_classes=4, in_chans=3))
    return d


def _stops_cleanly(tmp_path, mode, match, **extra):
    _register()
    cfg = config_from_dict(base_config(tmp_path, "f", **{"checkpoint_every": 2, "optim.epochs": 2, "data.augment": "none", **extra}))
    with pytest.raises(NonFiniteLossError, match=match) as err:
        run(cfg, mode=mode)
    assert "last good checkpoint" in str(err.value) and "step_00000002.safetensors" in str(err.value)
    ckpts = list_checkpoints(tmp_path / "f" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002.safetensors"]
    for name, t in load_file(str(ckpts[0])).items():
        assert not t.is_floating_point() or torch.isfinite(t).all(), name
    assert not (tmp_path / "f" / "model.safetensors").exists()
    assert not (tmp_path / "f" / "results.json").exists()
    return str(err.value)


def test_nan_student_logits_name_the_kd_term(tmp_path, teacher_dir):
    msg = _stops_cleanly(tmp_path, "distill", r"^step 3: loss term 'kd_loss' is nan \(the KD term",
                         **{"model.name": "faulty_test_net", "model.kwargs": {"fault": "logits", "after": 3},
                            "teacher.checkpoint": str(teacher_dir), "teacher.name": "tiny_test_net"})
    assert "weights were not changed" in msg or "no weights were changed" in msg


def test_nan_explanations_name_the_explanation_term(tmp_path, teacher_dir):
    msg = _stops_cleanly(tmp_path, "distill", r"^step 3: loss term 'exp_loss' is nan \(the explanation term",
                         **{"model.name": "faulty_test_net", "model.kwargs": {"fault": "gradient", "after": 3},
                            "teacher.checkpoint": str(teacher_dir), "teacher.name": "tiny_test_net"})
    assert "'kd_loss'" not in msg.split("all non-finite terms:")[1]  # the logits stayed finite


def test_nan_logits_in_teacher_training_name_the_cross_entropy(tmp_path):
    _stops_cleanly(tmp_path, "teacher", r"^step 3: loss term 'cls_loss' is nan \(the cross-entropy on labels",
                   **{"model.name": "faulty_test_net", "model.kwargs": {"fault": "logits", "after": 3}})


def test_nan_gradient_behind_finite_losses_stops_before_the_update(tmp_path, teacher_dir):
    _stops_cleanly(tmp_path, "distill", r"^step 3: the gradient norm is nan although every loss term was finite",
                   **{"model.name": "faulty_test_net", "model.kwargs": {"fault": "gradient", "after": 3},
                      "teacher.checkpoint": str(teacher_dir), "teacher.name": "tiny_test_net", "distill.lam": 0.0})


def _dead(net: TinyNet) -> TinyNet:
    """Every class weight negative on non-negative (post-ReLU) features: each logit's gradient
    w.r.t. the GradCAM layer is negative, so the ReLU of the weighted sum is an all-zero map."""
    with torch.no_grad():
        net.fc.weight.copy_(-net.fc.weight.abs() - 0.1)
    return net


def test_all_zero_explanations_give_a_finite_loss_and_gradients():
    torch.manual_seed(0)
    teacher, student = _dead(TinyNet()).eval(), _dead(TinyNet())
    x = torch.rand(3, 3, 8, 8)
    for t, s in ((teacher, student), (teacher, TinyNet()), (TinyNet().eval(), student)):
        d = Distiller(t, s, explainer=GradCAM(), lam=1.0)
        out = d(x)
        assert torch.isfinite(out["loss"]) and torch.isfinite(out["exp_loss"])
        zero_t = (out["teacher_maps"].flatten(1).abs().sum(1) == 0).all()
        zero_s = (out["student_maps"].flatten(1).abs().sum(1) == 0).all()
        assert zero_t or zero_s
        # A zero map has cosine 0 with anything: each sample contributes exactly 1.
        assert out["exp_loss"].item() == pytest.approx(1.0)
        s.zero_grad()
        out["loss"].backward()
        grads = [p.grad for p in s.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_finiteness_check_reads_every_term_in_one_transfer():
    """The trainer's per-step check copies all loss terms to the host at once (one device
    synchronisation a step, not one per term before and after the backward pass) and hands the
    logged values on; a non-finite term still stops the step, a non-finite agreement does not."""
    from _train_helpers import ScalarReads
    from e2kd.train.distributed import DistInfo
    from e2kd.train.loop import _check_finite

    info = DistInfo()
    out = {"kd_loss": torch.tensor(0.25), "exp_loss": torch.tensor(0.5, dtype=torch.bfloat16),
           "agreement": torch.tensor(float("nan")), "loss": torch.tensor(0.75, requires_grad=True) * 1}
    with ScalarReads() as reads:
        values = _check_finite(out, 3, info, None)
    assert reads.count == 0
    assert values == {"kd_loss": 0.25, "exp_loss": 0.5, "agreement": values["agreement"], "loss": 0.75}
    out["exp_loss"] = torch.tensor(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss term 'exp_loss' is inf"):
        _check_finite(out, 3, info, None)
