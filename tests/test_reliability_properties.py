"""Property tests: the losses, explainers and metrics driven with random shapes and extreme
values (huge and tiny logits, zero maps, constant maps) return a correct, finite result or raise
a clear ValueError; never a silent NaN.

"Huge" means magnitudes up to 1e30 (float32 holds 3.4e38: squares and differences of values
near that limit are not representable in the input's own precision)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from e2kd import GradCAM, InputXGradient, explanation_loss, kd_loss, multilabel_kd_loss
from e2kd.metrics import agreement, energy_pointing_game, iou, multilabel_f1

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HUGE = 1e30

magnitudes = st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e3, 1e15, HUGE])


@st.composite
def arrays(draw, shape, *, signed=True, kind=None):
    """A float32 array of ``shape``: random, constant, all-zero, or one spike, at a drawn scale."""
    kind = kind or draw(st.sampled_from(["random", "constant", "zero", "spike"]))
    scale = draw(magnitudes)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if kind == "random":
        a = rng.standard_normal(n) if signed else rng.random(n)
    elif kind == "constant":
        a = np.full(n, draw(st.sampled_from([-1.0, 1.0])) if signed else 1.0)
    elif kind == "zero":
        a = np.zeros(n)
    else:
        a = np.zeros(n)
        a[rng.integers(n)] = 1.0
    return torch.from_numpy((a * scale).reshape(shape).astype(np.float32))


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _kl_reference(s: np.ndarray, t: np.ndarray, temp: float, sigmoid: bool) -> float:
    """KD losses in float64 numpy: T² · mean_b Σ_c KL, independently of the library."""
    s, t = s.astype(np.float64) / temp, t.astype(np.float64) / temp
    if sigmoid:
        def logsig(z):
            return -np.logaddexp(0.0, -z)
        lp, l1p, lq, l1q = logsig(t), logsig(-t), logsig(s), logsig(-s)
        kl = np.exp(lp) * (lp - lq) + np.exp(l1p) * (l1p - l1q)
    else:
        def logsm(z):
            m = z.max(axis=1, keepdims=True)
            return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
        lp, lq = logsm(t), logsm(s)
        kl = np.where(lp > -np.inf, np.exp(lp) * (lp - lq), 0.0)
    return float(kl.sum(axis=1).mean() * temp * temp)


@SETTINGS
@given(st.data(), st.integers(1, 5), st.integers(1, 9), st.sampled_from([0.1, 1.0, 4.0, 20.0]), st.booleans())
def test_kd_losses_are_finite_nonnegative_and_match_float64(data, b, c, temp, sigmoid):
    s = data.draw(arrays((b, c))).requires_grad_(True)
    t = data.draw(arrays((b, c)))
    fn = multilabel_kd_loss if sigmoid else kd_loss
    loss = fn(s, t, temp)
    assert _finite(loss), (s, t)
    ref = _kl_reference(s.detach().numpy(), t.numpy(), temp, sigmoid)
    assert loss.item() >= -1e-4 * max(1.0, abs(ref))
    assert loss.item() == pytest.approx(ref, rel=1e-3, abs=1e-4 * max(1.0, temp * temp))
    loss.backward()
    assert _finite(s.grad)


@SETTINGS
@given(st.data())
def test_kd_losses_refuse_bad_shapes_and_temperatures(data):
    b, c, c2 = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    s, t = torch.zeros(b, c), torch.zeros(b + data.draw(st.integers(0, 2)), c2)
    temp = data.draw(st.sampled_from([1.0, 0.0, -1.0, float("nan")]))
    fn = data.draw(st.sampled_from([kd_loss, multilabel_kd_loss]))
    if s.shape == t.shape and temp > 0:
        assert _finite(fn(s, t, temp))
    else:
        with pytest.raises(ValueError, match="mismatch|classes|temperature"):
            fn(s, t, temp)


@SETTINGS
@given(st.data(), st.integers(1, 4), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7))
def test_explanation_loss_is_finite_bounded_and_is_one_minus_the_cosine(data, b, k, h, w):
    s = data.draw(arrays((b, k, h, w))).requires_grad_(True)
    t = data.draw(arrays((b, k, h, w)))
    loss = explanation_loss(s, t)
    assert _finite(loss)
    assert -1e-5 <= loss.item() <= 2 + 1e-5
    s64, t64 = s.detach().double().flatten(1), t.double().flatten(1)
    ns, nt = s64.norm(dim=1), t64.norm(dim=1)
    cos = torch.where((ns > 0) & (nt > 0), (s64 / ns.clamp_min(1e-300)[:, None] * (t64 / nt.clamp_min(1e-300)[:, None])).sum(1), 0)
    assert loss.item() == pytest.approx(float((1 - cos).mean()), abs=1e-4)
    loss.backward()
    assert _finite(s.grad)


class _TinyCNN(nn.Module):
    gradcam_layer = "features"

    def __init__(self, chans: int, classes: int, scale: float):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(chans, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


@SETTINGS
@given(st.data(), st.integers(1, 3), st.sampled_from([1, 3]), st.integers(2, 9), st.integers(2, 9),
       st.integers(1, 5), st.sampled_from([1e-20, 1e-3, 1.0, 1e4]), st.booleans())
def test_explainers_give_finite_maps_of_the_right_shape(data, b, c, h, w, classes, scale, gradcam):
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    model = _TinyCNN(c, classes, scale).eval()
    x = data.draw(arrays((b, c, h, w), signed=False)).clamp(0, 1)  # images live in [0, 1]
    explainer = GradCAM() if gradcam else InputXGradient()
    out = explainer(model, x, None, create_graph=data.draw(st.booleans()))
    assert out.maps.dim() == 4 and out.maps.shape[0] == b and tuple(out.maps.shape[2:]) == (h, w)
    assert _finite(out.maps) and _finite(out.logits)
    if gradcam:
        assert (out.maps >= 0).all()  # ReLU of the weighted activations
    assert torch.equal(out.target, out.logits.argmax(1))


@SETTINGS
@given(st.data(), st.integers(1, 4), st.integers(1, 8), st.integers(1, 8))
def test_epg_and_iou_are_in_zero_one_and_epg_matches_float64(data, n, h, w):
    a = data.draw(arrays((n, h, w)))
    m = data.draw(st.sampled_from(["random", "zero", "ones"]))
    seed = data.draw(st.integers(0, 1000))
    mask = {"random": (torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) > 0.5).float(),
            "zero": torch.zeros(n, h, w), "ones": torch.ones(n, h, w)}[m]
    epg = energy_pointing_game(a, mask)
    assert _finite(epg) and ((epg >= 0) & (epg <= 1 + 1e-6)).all()
    pos = np.clip(a.double().numpy().reshape(n, -1), 0, None)
    total = pos.sum(1)
    inside = (pos * mask.numpy().reshape(n, -1)).sum(1)
    ref = np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0)
    np.testing.assert_allclose(epg.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    for rule, value in (("fraction_of_max", 0.5), ("top_fraction", 0.25)):
        v = iou(a, mask, rule=rule, value=value)
        assert _finite(v) and ((v >= 0) & (v <= 1)).all()
    if m == "zero" or bool((a <= 0).all()):
        assert (epg == 0).all()


@SETTINGS
@given(st.data(), st.integers(1, 6), st.integers(1, 6))
def test_f1_and_agreement_are_finite_and_match_counting(data, b, c):
    s = data.draw(arrays((b, c)))
    t = data.draw(arrays((b, c)))
    targets = (torch.rand(b, c, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999)))) > 0.5).float()
    res = multilabel_f1(s, targets)
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in [res["f1"], res["f1_macro"], *res["f1_per_class"]])
    p, y = s.numpy() > 0, targets.numpy() > 0.5  # sigma(z) > 0.5 exactly when z > 0 (no rounding of sigma)
    tp, fp, fn = (p & y).sum(), (p & ~y).sum(), (~p & y).sum()
    assert res["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
    agr = agreement(s, t)
    assert agr.dtype == torch.bool and agr.tolist() == list(np.argmax(s.numpy(), 1) == np.argmax(t.numpy(), 1))
