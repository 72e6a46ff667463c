"""The KD and explanation losses equal values worked out by hand."""

import math

import pytest
import torch

from e2kd import explanation_loss, kd_loss, multilabel_kd_loss


def test_kd_loss_by_hand_t1():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_by_hand_temperature_and_batch_mean():
    s = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [5.0, 5.0]])  # second row: identical distributions, KL 0
    temp = 2.0
    a = math.sqrt(3.0)  # exp(log(3)/2)
    p = (a / (a + 1), 1 / (a + 1))
    kl_row0 = p[0] * math.log(p[0] / 0.5) + p[1] * math.log(p[1] / 0.5)
    expected = temp**2 * (kl_row0 + 0.0) / 2
    assert kd_loss(s, t, temperature=temp).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_treats_teacher_as_constant():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_multilabel_kd_by_hand():
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), -math.log(3.0)]])  # sigmoid -> 3/4 and 1/4
    per_class = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert multilabel_kd_loss(s, t).item() == pytest.approx(2 * per_class, rel=1e-6)


def test_multilabel_kd_saturated_logits_stay_finite():
    s = torch.tensor([[-200.0, 200.0]], requires_grad=True)
    t = torch.tensor([[200.0, -200.0]])
    loss = multilabel_kd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_a_teacher_logit_of_minus_infinity_adds_nothing():
    """A masked class (teacher logit -inf, probability 0) follows 0 log 0 = 0: the loss equals the
    loss over the remaining classes, worked out by hand, with finite gradients."""
    s = torch.tensor([[0.0, 0.0, 5.0]], requires_grad=True)
    t = torch.tensor([[math.log(3.0), 0.0, -math.inf]])  # p = (3/4, 1/4, 0)
    e5 = math.exp(5.0)
    q = (1 / (2 + e5), 1 / (2 + e5))
    expected = 0.75 * math.log(0.75 / q[0]) + 0.25 * math.log(0.25 / q[1])
    loss = kd_loss(s, t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # multi-label: a class with sigmoid probability 0 contributes -log(1 - q) only
    s2 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    t2 = torch.tensor([[-math.inf, math.log(3.0)]])  # p = (0, 3/4)
    q1 = 1 / (1 + math.exp(-1.0))
    expected2 = -math.log(0.5) + 0.75 * math.log(0.75 / q1) + 0.25 * math.log(0.25 / (1 - q1))
    loss2 = multilabel_kd_loss(s2, t2)
    assert loss2.item() == pytest.approx(expected2, rel=1e-6)
    loss2.backward()
    assert torch.isfinite(s2.grad).all()
    # a NaN teacher is not a masked class: it must still show as NaN
    assert torch.isnan(kd_loss(s, torch.full((1, 3), math.nan)))
    assert torch.isnan(multilabel_kd_loss(s2, torch.tensor([[math.nan, 0.0]])))


def test_explanation_loss_by_hand():
    s = torch.tensor([[[[1.0, 0.0]]], [[[2.0, 2.0]]]])
    t = torch.tensor([[[[1.0, 1.0]]], [[[1.0, 1.0]]]])
    expected = ((1 - 1 / math.sqrt(2)) + 0.0) / 2
    assert explanation_loss(s, t).item() == pytest.approx(expected, abs=1e-7)


def test_losses_keep_float64_and_compute_half_precision_in_float32():
    """Double inputs stay double (a finite-difference check needs it); fp16/bf16 are widened."""
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    out = kd_loss(s, t)
    assert out.dtype == torch.float64 and abs(out.item() - expected) < 1e-15
    assert multilabel_kd_loss(s, t).dtype == torch.float64
    maps = torch.tensor([[[[1.0, 1e-4]]]], dtype=torch.float64)
    ref = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    # 1 - cos = 1 - 1/sqrt(1 + 1e-8) ≈ 5e-9, below float32's resolution of 1 - cos near 1
    exp = explanation_loss(maps, ref)
    assert exp.dtype == torch.float64
    assert exp.item() == pytest.approx(1 - 1 / math.sqrt(1 + 1e-8), rel=1e-6)
    for dtype in (torch.float16, torch.bfloat16):
        assert kd_loss(s.to(dtype), t.to(dtype)).dtype == torch.float32
        assert explanation_loss(maps.to(dtype), ref.to(dtype)).dtype == torch.float32


def test_explanation_loss_zero_map_is_one_and_finite():
    s = torch.zeros(2, 1, 3, 3, requires_grad=True)
    t = torch.rand(2, 1, 3, 3)
    loss = explanation_loss(s, t)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert torch.isfinite(s.grad).all()
    t0 = torch.zeros(2, 1, 3, 3)
    s2 = torch.rand(2, 1, 3, 3, requires_grad=True)
    loss2 = explanation_loss(s2, t0)
    loss2.backward()
    assert loss2.item() == pytest.approx(1.0)
    assert torch.equal(s2.grad, torch.zeros_like(s2))


def test_explanation_loss_scale_invariant_and_teacher_constant():
    s = torch.rand(4, 6, 5, 5, requires_grad=True)
    t = torch.rand(4, 6, 5, 5, requires_grad=True)
    a = explanation_loss(s, t)
    b = explanation_loss(3.0 * s, 0.5 * t)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    a.backward()
    assert t.grad is None


@pytest.mark.parametrize(
    "fn,args,match",
    [
        (kd_loss, (torch.zeros(2, 3), torch.zeros(3, 3)), "batch-size mismatch"),
        (kd_loss, (torch.zeros(2, 3), torch.zeros(2, 4)), "classes"),
        (kd_loss, (torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature"),
        (explanation_loss, (torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 5, 5)), "differ in shape"),
    ],
)
def test_bad_input_is_a_clear_error(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
