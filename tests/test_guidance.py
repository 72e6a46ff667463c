"""Model guidance (Rao et al., ICCV 2023): losses by hand, gradients, and a toy task where
guidance moves the explanation onto the object."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e2kd import GradCAM
from e2kd.explain.base import Explainer, Explanation, resolve_target
from e2kd.guidance import GuidanceLoss, energy_loss, l1_loss
from e2kd.metrics import LocalisationMeter, explain_present_classes, multilabel_f1

MAP = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])
TOP_LEFT = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])


def test_energy_loss_by_hand():
    # Positive energy 6, 1 of it in the top-left pixel.
    assert energy_loss(MAP, TOP_LEFT).item() == pytest.approx(5 / 6)
    assert energy_loss(torch.zeros(1, 2, 2), TOP_LEFT).item() == 1.0
    assert energy_loss(MAP, torch.ones(1, 2, 2)).item() == pytest.approx(0.0)


def test_l1_loss_by_hand():
    # Positive part / max = (1/3, 2/3, 1, 0) against the mask (1, 0, 0, 0):
    # |1/3 - 1| + 2/3 + 1 + 0 = 7/3 over 4 pixels.
    assert l1_loss(MAP, TOP_LEFT).item() == pytest.approx(7 / 12)
    # An all-zero map costs the mask's area fraction.
    assert l1_loss(torch.zeros(1, 2, 2), TOP_LEFT).item() == pytest.approx(1 / 4)
    # A mask over the whole image: (1 - 0) + (1 - 1/4) + (1 - 1/2) + (1 - 1) = 2.25 over 4.
    assert l1_loss(torch.tensor([[[0.0, 1.0], [2.0, 4.0]]]), torch.ones(1, 2, 2)).item() == pytest.approx(0.5625)


class TinyCNN(nn.Module):
    gradcam_layer = "features"

    def __init__(self, classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def toy_batch(n: int, seed: int):
    """Class c lights a 4x4 square of channel c at a random place (the object, whose mask we
    know) and also a stripe of channel c along the top rows (a shortcut off the object)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.2
    masks = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        r, c = torch.randint(4, 12, (2,), generator=g).tolist()
        x[i, int(y[i]), r : r + 4, c : c + 4] = 1.0
        x[i, int(y[i]), 0:2, :] = 1.0
        masks[i, 0, r : r + 4, c : c + 4] = 1
    return x, y, masks


def test_forward_is_cls_loss_plus_weighted_energy_loss():
    torch.manual_seed(0)
    model = TinyCNN()
    x, y, masks = toy_batch(6, seed=1)
    out = GuidanceLoss(kind="energy", explainer=GradCAM(), weight=2.5)(model, x, y, masks)
    ref = GradCAM()(model, x, y)  # an independent, non-differentiable pass
    assert torch.allclose(out["logits"], ref.logits, atol=1e-6)
    assert out["cls_loss"].item() == pytest.approx(F.cross_entropy(ref.logits, y).item(), abs=1e-6)
    assert out["guidance_loss"].item() == pytest.approx(energy_loss(ref.maps, masks).mean().item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["cls_loss"].item() + 2.5 * out["guidance_loss"].item(), abs=1e-6)


@pytest.mark.parametrize("kind", ["energy", "l1"])
def test_guidance_gradient_reaches_the_model_parameters(kind):
    torch.manual_seed(0)
    model = TinyCNN()
    x, y, masks = toy_batch(4, seed=2)
    out = GuidanceLoss(kind=kind, explainer={"name": "gradcam", "relu": False}, weight=1.0)(model, x, y, masks)
    grads = torch.autograd.grad(out["guidance_loss"], [model.features[0].weight, model.features[2].weight, model.head.weight])
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_multilabel_guides_one_present_class_per_image_and_skips_empty_images():
    # Logits = channel means; the "explanation" of class c is channel c (as in the
    # localisation tests), so every per-image loss is known.
    class ChannelMap(Explainer):
        def explain(self, model, x, target, *, create_graph):
            logits = model(x)
            tgt = resolve_target(logits, target, "ChannelMap")
            return Explanation(logits, x[torch.arange(x.shape[0]), tgt][:, None], tgt)

    class ChannelMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    x = torch.zeros(3, 3, 2, 2)
    x[0, 1] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # image 0, class 1: all energy top-left
    x[2, 0] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # image 2, class 0: spread over 4 pixels
    labels = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # image 1: no class
    masks = torch.zeros(3, 3, 2, 2)
    masks[:, :, 0, 0] = 1
    crit = GuidanceLoss(kind="energy", explainer=ChannelMap(), weight=1.0)
    out = crit(ChannelMean(), x, labels, masks)
    # Energy losses 0 and 3/4 for the two guided images; image 1 is left out.
    assert out["guidance_loss"].item() == pytest.approx(3 / 8)
    logits = x.mean(dim=(2, 3))
    assert out["cls_loss"].item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, labels).item())
    assert out["zero_maps"].item() == 0.0
    # No image with a present class: no guidance at all.
    out = crit(ChannelMean(), x[1:2], labels[1:2], masks[1:2])
    assert out["guidance_loss"].item() == 0.0 and out["loss"].item() == pytest.approx(out["cls_loss"].item())


def test_multilabel_draws_only_present_classes_and_each_of_them():
    drawn = []

    class Recorder(Explainer):
        def explain(self, model, x, target, *, create_graph):
            drawn.append(target.clone())
            logits = model(x)
            return Explanation(logits, x[:, :1], target)

    class ChannelMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    crit = GuidanceLoss(explainer=Recorder(), generator=torch.Generator().manual_seed(0))
    for _ in range(40):
        crit(ChannelMean(), torch.rand(2, 4, 2, 2), labels, torch.ones(2, 4, 2, 2))
    drawn = torch.stack(drawn)
    assert set(drawn[:, 0].tolist()) == {0, 2}
    assert set(drawn[:, 1].tolist()) == {3}


def test_bad_arguments_are_refused():
    model = TinyCNN()
    x, y, masks = toy_batch(2, seed=0)
    with pytest.raises(ValueError, match="unknown kind"):
        GuidanceLoss(kind="rrr")
    with pytest.raises(ValueError, match="unknown explainer"):
        GuidanceLoss(explainer="nonsense")
    with pytest.raises(ValueError, match="differ; explain at the image resolution"):
        GuidanceLoss(explainer=GradCAM(upsample=False))(TinyCNN(), x, y, masks[..., :8, :8])
    with pytest.raises(ValueError, match="binary"):
        GuidanceLoss()(model, x, y, masks * 0.5 + 0.25)
    with pytest.raises(ValueError, match=r"multi-label masks must have shape"):
        GuidanceLoss()(model, x, torch.ones(2, 2), masks)


def _train(model, crit, x, y, masks, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        out = crit(model, x, y, masks)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model


class BiasFreeHeadCNN(TinyCNN):
    """GradCAM's map then averages to logit / (H W): a present class (positive logit under the
    binary cross-entropy) always keeps some positive attribution."""

    def __init__(self, classes: int = 2):
        super().__init__(classes)
        self.head = nn.Linear(8, classes, bias=False)


def multilabel_toy(n: int, seed: int):
    """Two classes, each present with probability 1/2: class c is a 4x4 square of channel c at
    a random place (its box), and each present class also lights its half of a stripe of
    channel 2 along the top (a shortcut off the object)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 2, generator=g) < 0.5).float()
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.2
    masks = torch.zeros(n, 2, 16, 16)
    for i in range(n):
        for c in range(2):
            if y[i, c]:
                r, col = torch.randint(4, 12, (2,), generator=g).tolist()
                x[i, c, r : r + 4, col : col + 4] = 1.0
                masks[i, c, r : r + 4, col : col + 4] = 1
                x[i, 2, 0:2, 8 * c : 8 * c + 8] = 1.0
    return x, y, masks


def test_energy_guidance_moves_the_explanation_onto_the_object():
    # As Rao et al. do, guidance fine-tunes a classifier: first train on labels alone (the
    # model also uses the stripe), then fine-tune with and without the energy loss.
    torch.set_num_threads(1)
    x, y, masks = multilabel_toy(64, seed=0)
    x_test, y_test, m_test = multilabel_toy(64, seed=1)
    torch.manual_seed(0)
    cam = GradCAM()

    def crit(weight):
        return GuidanceLoss(kind="energy", explainer=cam, weight=weight, generator=torch.Generator().manual_seed(0))

    base = _train(BiasFreeHeadCNN(), crit(0.0), x, y, masks, steps=40, lr=1e-2)
    plain = _train(copy.deepcopy(base), crit(0.0), x, y, masks, steps=40, lr=1e-2)
    guided = _train(copy.deepcopy(base), crit(1.0), x, y, masks, steps=40, lr=1e-2)

    def scores(model):
        pairs = explain_present_classes(model, cam, x_test, y_test, m_test)
        meter = LocalisationMeter()
        meter.update(pairs["attributions"], pairs["masks"])
        return meter.compute()["epg"], multilabel_f1(model(x_test), y_test)["f1"]

    epg_plain, _ = scores(plain)
    epg_guided, f1_guided = scores(guided)
    assert f1_guided > 0.95
    # Each object covers 1/16 of the image; the guided model puts most of its energy there.
    assert epg_guided > 0.55
    assert epg_guided > epg_plain + 0.15


def test_guidance_on_bcos_contributions_reaches_every_parameter():
    from e2kd.bcos import BcosExplainer
    from e2kd.models import create_model

    torch.manual_seed(0)
    model = create_model("bcos_resnet8_small", num_classes=2, width=8)
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    masks = torch.zeros(4, 2, 16, 16)
    masks[:, 0, 2:8, 2:8] = 1
    masks[:, 1, 8:14, 6:12] = 1
    crit = GuidanceLoss(kind="energy", explainer=BcosExplainer(output="contributions"), weight=1.0)
    out = crit(model, x, y, masks)
    # The explained forward pass is the one whose logits carry the classification loss.
    ref = BcosExplainer(output="contributions")(model, x, out["logits"].argmax(1))
    assert torch.allclose(out["logits"], ref.logits, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["guidance_loss"], params, allow_unused=True)
    missing = [n for (n, p), g in zip(model.named_parameters(), grads) if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not missing, f"no guidance gradient for {missing}"


def test_contrast_weights_by_hand():
    from e2kd.guidance import contrast_weights

    w = contrast_weights(torch.tensor([0, 2]), torch.zeros(2, 3))
    assert torch.equal(w, torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]]))
    assert torch.equal(contrast_weights(torch.tensor([1]), torch.zeros(1, 2)), torch.tensor([[-1.0, 1.0]]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        contrast_weights(torch.tensor([0]), torch.zeros(1, 1))
    w64 = contrast_weights(torch.tensor([0]), torch.zeros(1, 4, dtype=torch.float64))
    assert w64.dtype == torch.float64 and w64[0, 1].item() == -1 / 3  # exactly, not float32's -0.33333334


def test_l1_loss_refuses_masks_that_are_not_binary_as_energy_loss_does():
    from e2kd.guidance import energy_loss, l1_loss

    a, m = torch.rand(2, 4, 4), (torch.rand(2, 4, 4) > 0.5).float()
    for fn in (l1_loss, energy_loss):
        with pytest.raises(ValueError, match=r"(l1_loss|energy_pointing_game): masks must be binary \(0/1 entries\)"):
            fn(a, 0.5 * m)
    with pytest.raises(ValueError, match="l1_loss: attributions .* differ in shape"):
        l1_loss(a, m[:, :2])


def test_contrast_guidance_charges_the_other_class_evidence_by_hand():
    """Linear model z = W·vec(x), input×gradient maps: the contrast map of a 2-class model is
    x ⊙ (W_y - W_other). The background pixel lowers the other logit only: invisible to the
    true-class energy loss, charged by the contrast one."""
    from e2kd.explain import InputXGradient

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -3.0]]))
    x = torch.ones(1, 1, 2, 2)
    y = torch.tensor([0])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # the object is pixel (0, 0); pixel (1, 1) is background
    plain = GuidanceLoss(kind="energy", explainer=InputXGradient(), weight=1.0)(model, x, y, mask)
    contrast = GuidanceLoss(kind="energy", explainer=InputXGradient(), weight=1.0, contrast=True)(model, x, y, mask)
    # true-class map [2, 0, 0, 0]: all positive energy on the object
    assert plain["guidance_loss"].item() == pytest.approx(0.0)
    # contrast map (z_0 - z_1): [2, 0, 0, 3]; energy inside 2 of 5
    assert contrast["guidance_loss"].item() == pytest.approx(1 - 2 / 5)
    assert contrast["cls_loss"].item() == pytest.approx(F.cross_entropy(torch.tensor([[2.0, -3.0]]), y).item())
    contrast["loss"].backward()
    assert model[1].weight.grad[1, 3] != 0  # the other class's background weight is pushed


def test_contrast_is_refused_for_multilabel():
    loss = GuidanceLoss(kind="energy", explainer=GradCAM(), contrast=True)
    with pytest.raises(ValueError, match="contrast=True is for single-label"):
        loss(nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), torch.rand(2, 1, 4, 4),
             torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2, 2, 4, 4))
