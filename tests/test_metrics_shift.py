"""Shift equivariance: hand-made explainers with known behaviour, then a CNN vs a patch-16 net."""

import math

import pytest
import torch
from torch import nn

from e2kd import GradCAM
from e2kd.explain.base import Explainer, Explanation, resolve_target
from e2kd.metrics import shift_equivariance, shifted_view


class FirstChannel(Explainer):
    """The map is the image's first channel: perfectly shift-equivariant by construction."""

    def explain(self, model, x, target, *, create_graph):
        logits = model(x)
        return Explanation(logits, x[:, :1], resolve_target(logits, target, "FirstChannel"))


class Checkerboard(Explainer):
    """A fixed checkerboard whatever the input: it does not move with the image."""

    def explain(self, model, x, target, *, create_graph):
        logits = model(x)
        h, w = x.shape[-2:]
        board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2).float()
        return Explanation(logits, board.expand(x.shape[0], 1, h, w), resolve_target(logits, target, "Checkerboard"))


class TwoPixels(nn.Module):
    """Logits = the first two pixels of the top row: the prediction moves with the content."""

    def forward(self, x):
        return x[:, 0, 0, :2]


class ChannelMean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_shifted_view_moves_the_content():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    # crop: window s starts at (P - s, P - s); with P = 2 window 0 is x[2:6, 2:6].
    assert torch.equal(shifted_view(x, 0, max_shift=2), x[..., 2:6, 2:6])
    assert torch.equal(shifted_view(x, 2, max_shift=2), x[..., 0:4, 0:4])
    assert torch.equal(shifted_view(x, 1, max_shift=2, direction="horizontal"), x[..., :, 1:5])
    assert torch.equal(shifted_view(x, 1, max_shift=2, mode="circular"), torch.roll(x, (1, 1), (2, 3)))


@pytest.mark.parametrize("mode", ["crop", "circular"])
def test_an_equivariant_explainer_scores_one_at_every_shift(mode):
    x = torch.rand(3, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    res = shift_equivariance(ChannelMean(), FirstChannel(), x, max_shift=4, mode=mode)
    assert res.cosine.shape == (3, 5)
    assert torch.allclose(res.cosine, torch.ones(3, 5), atol=1e-6)
    assert res.summary()["shift_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_a_fixed_checkerboard_alternates_between_zero_and_one():
    # Shifted horizontally by an odd s, the board's overlap is its complement: cosine 0;
    # by an even s it coincides: cosine 1. Mean over s = 1..4: 0.5.
    x = torch.rand(2, 1, 8, 12)
    res = shift_equivariance(ChannelMean(), Checkerboard(), x, max_shift=4, direction="horizontal")
    assert res.curves()["cosine"] == pytest.approx([1, 0, 1, 0, 1], abs=1e-6)
    assert res.summary()["shift_cosine"] == pytest.approx(0.5, abs=1e-6)


def test_prediction_stability_and_kl_by_hand():
    # Top row [0, 3, 1, 2, 0, 0]; P = 2, horizontal windows of width 4 start at 2 - s, so the
    # logits are (x[2-s], x[3-s]): s=0 (1, 2) -> class 1; s=1 (3, 1) -> 0; s=2 (0, 3) -> 1.
    x = torch.zeros(1, 1, 2, 6)
    x[0, 0, 0] = torch.tensor([0.0, 3.0, 1.0, 2.0, 0.0, 0.0])
    res = shift_equivariance(TwoPixels(), FirstChannel(), x, max_shift=2, direction="horizontal")
    assert res.curves()["prediction_stability"] == [1.0, 0.0, 1.0]

    def kl(z0, z1):
        p = [math.exp(v) / sum(math.exp(u) for u in z0) for v in z0]
        q = [math.exp(v) / sum(math.exp(u) for u in z1) for v in z1]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    assert res.kl[0].tolist() == pytest.approx([0.0, kl([1, 2], [3, 1]), kl([1, 2], [0, 3])], abs=1e-6)
    assert res.summary()["shift_prediction_stability"] == 0.5


def test_merge_concatenates_batches():
    x = torch.rand(2, 1, 8, 8)
    a = shift_equivariance(ChannelMean(), FirstChannel(), x[:1], max_shift=2)
    b = shift_equivariance(ChannelMean(), FirstChannel(), x[1:], max_shift=2)
    assert a.merge(b).cosine.shape == (2, 3)
    with pytest.raises(ValueError, match="different shifts"):
        a.merge(shift_equivariance(ChannelMean(), FirstChannel(), x, max_shift=1))


def test_bad_arguments_are_refused():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown mode"):
        shift_equivariance(ChannelMean(), FirstChannel(), x, mode="reflect")
    with pytest.raises(ValueError, match="no overlap"):
        shift_equivariance(ChannelMean(), FirstChannel(), x, max_shift=4)


# --- a CNN against a patch-16 net, random weights ---------------------------------------------


class TinyCNN(nn.Module):
    """Stride-1 convolutions with circular padding and global average pooling: the feature map
    moves with the image, so GradCAM (constant channel weights under GAP) does too."""

    gradcam_layer = "features"

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular", bias=False),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", bias=False),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinyPatchNet(nn.Module):
    """ViT-like: non-overlapping 16x16 patch embedding, per-token MLP, mean over tokens. The
    tokens see the image through a 16-pixel grid, so only shifts by multiples of 16 move the
    tokens with the content."""

    gradcam_layer = "tokens"

    def __init__(self, classes: int = 5, patch: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, patch, stride=patch, bias=False)
        self.tokens = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 32, 1, bias=False), nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.tokens(self.embed(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def curves():
    torch.manual_seed(0)
    # Sparse dots on black, 96 px: 64-pixel windows for shifts 0..32. The models have no
    # biases, so the background maps to zero and the maps are made of the dots' responses.
    x = (torch.rand(4, 3, 96, 96) > 0.97).float()
    cnn, vit, cam = TinyCNN(), TinyPatchNet(), GradCAM(relu=False)
    # margin=8 measures the interior: away from the CNN's padding (2 px) and from the border
    # clamping of the bilinear upsampling of 16-pixel token maps (8 px).
    return {
        "cnn": shift_equivariance(cnn, cam, x, max_shift=32, margin=8),
        "vit": shift_equivariance(vit, cam, x, max_shift=32, margin=8),
        "cnn_circular": shift_equivariance(cnn, cam, x[..., :64, :64], max_shift=32, mode="circular"),
    }


def test_cnn_explanations_follow_every_shift(curves):
    cos = torch.tensor(curves["cnn"].curves()["cosine"])
    assert cos.tolist() == pytest.approx([1.0] * 33, abs=1e-5)
    # With circular padding and circular shifts, equivariance is exact up to the border.
    assert torch.allclose(curves["cnn_circular"].cosine, torch.ones(4, 33), atol=1e-5)
    assert curves["cnn"].summary()["shift_prediction_stability"] == 1.0


def test_patch16_explanations_drop_between_multiples_of_the_patch_size(curves):
    cos = torch.tensor(curves["vit"].curves()["cosine"])
    # A shift by whole patches moves every token with the content: exact.
    assert cos[[0, 16, 32]].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    # Any other shift re-cuts the patches: a clear drop at every one of them.
    off_grid = cos[[s for s in range(33) if s % 16]]
    assert off_grid.max() < 0.97 and off_grid.mean() < 0.9
    # The summary number separates the two architectures.
    assert curves["cnn"].summary()["shift_cosine"] > curves["vit"].summary()["shift_cosine"] + 0.1
