"""EPG, IoU and the grid pointing game against values worked out by hand."""

import math

import pytest
import torch
from torch import nn

from e2kd.explain.base import Explainer, Explanation, resolve_target
from e2kd.metrics import (
    LocalisationMeter,
    binarise,
    build_grids,
    energy_pointing_game,
    explain_present_classes,
    grid_cell_energy,
    grid_pointing_game,
    iou,
    model_confidences,
    present_class_pairs,
)

RAMP = torch.arange(16.0).view(1, 4, 4)  # 0..15 row by row


def box(h, w, *boxes):
    m = torch.zeros(1, h, w)
    for r0, r1, c0, c1 in boxes:
        m[0, r0:r1, c0:c1] = 1
    return m


class ChannelMean(nn.Module):
    """Logit of class c = mean of image channel c."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


class ChannelMap(Explainer):
    """The 'explanation' of class c is image channel c: a known map for every target."""

    def explain(self, model, x, target, *, create_graph):
        logits = model(x)
        tgt = resolve_target(logits, target, "ChannelMap")
        return Explanation(logits, x[torch.arange(x.shape[0]), tgt][:, None], tgt)


# --- EPG -------------------------------------------------------------------------------------


def test_epg_counts_positive_energy_only():
    a = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])
    # Positive energy 1 + 2 + 3 = 6; the -4 is ignored wherever it lies.
    assert energy_pointing_game(a, box(2, 2, (0, 1, 0, 1))).item() == pytest.approx(1 / 6)
    assert energy_pointing_game(a, box(2, 2, (0, 1, 1, 2), (1, 2, 0, 2))).item() == pytest.approx(5 / 6)


def test_epg_edge_cases():
    zero = torch.zeros(1, 4, 4)
    assert energy_pointing_game(zero, box(4, 4, (0, 2, 0, 2))).item() == 0.0
    assert energy_pointing_game(-RAMP - 1, box(4, 4, (0, 2, 0, 2))).item() == 0.0
    full = torch.ones(1, 4, 4)
    assert energy_pointing_game(RAMP, full).item() == pytest.approx(1.0)
    assert energy_pointing_game(zero, full).item() == 0.0


def test_epg_several_boxes_of_one_class_count_each_pixel_once():
    # Boxes rows 0-1 x cols 0-1 and rows 1-2 x cols 1-2 overlap at (1, 1); union of 7 pixels
    # holding 0, 1, 4, 5, 6, 9, 10 = 35 of the total 0 + ... + 15 = 120.
    two = torch.clamp(box(4, 4, (0, 2, 0, 2)) + box(4, 4, (1, 3, 1, 3)), max=1)
    assert energy_pointing_game(RAMP, two).item() == pytest.approx(35 / 120)


def test_epg_is_batched_and_accepts_a_channel_axis():
    a = torch.stack([RAMP, torch.zeros(1, 4, 4)])  # (2, 1, 4, 4)
    m = torch.stack([box(4, 4, (3, 4, 0, 4)), box(4, 4, (3, 4, 0, 4))])
    # Last row holds 12 + 13 + 14 + 15 = 54 of 120.
    assert energy_pointing_game(a, m).tolist() == pytest.approx([54 / 120, 0.0])


def test_epg_has_finite_gradients_even_for_a_zero_map():
    a = torch.stack([RAMP[0], torch.zeros(4, 4)]).requires_grad_(True)
    energy_pointing_game(a, torch.cat([box(4, 4, (0, 2, 0, 2))] * 2)).sum().backward()
    assert torch.isfinite(a.grad).all()


# --- IoU -------------------------------------------------------------------------------------


def test_binarise_fraction_of_max_by_hand():
    # max 15, threshold 7.5 -> pixels 8..15 (rows 2 and 3)
    assert binarise(RAMP).flatten().tolist() == [False] * 8 + [True] * 8
    assert binarise(RAMP, value=0.0).flatten().tolist() == [False] + [True] * 15  # 0 is not positive


def test_iou_fraction_of_max_by_hand():
    # binarised rows 2-3 vs mask rows 1-2: intersection 4, union 12.
    assert iou(RAMP, box(4, 4, (1, 3, 0, 4))).item() == pytest.approx(1 / 3)


def test_iou_top_fraction_by_hand():
    # top 25 % of 16 pixels = 4 highest = row 3; mask rows 2-3: intersection 4, union 8.
    assert iou(RAMP, box(4, 4, (2, 4, 0, 4)), rule="top_fraction", value=0.25).item() == pytest.approx(0.5)
    # Ties at the threshold are all kept: three 1s tie for the single top pixel.
    ties = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    assert binarise(ties, rule="top_fraction", value=0.25).sum().item() == 3
    assert iou(ties, box(2, 2, (0, 1, 0, 1)), rule="top_fraction", value=0.25).item() == pytest.approx(1 / 3)


def test_iou_edge_cases():
    zero = torch.zeros(1, 4, 4)
    assert iou(zero, box(4, 4, (0, 2, 0, 2))).item() == 0.0
    assert iou(zero, torch.zeros(1, 4, 4)).item() == 0.0  # empty union scores 0
    # A mask over the whole image: 8 binarised pixels of 16.
    assert iou(RAMP, torch.ones(1, 4, 4)).item() == pytest.approx(0.5)
    two = torch.clamp(box(4, 4, (2, 4, 0, 2)) + box(4, 4, (2, 4, 2, 4)), max=1)  # two boxes = rows 2-3
    assert iou(RAMP, two).item() == pytest.approx(1.0)


def test_a_map_holding_nan_scores_nan_not_a_plausible_value():
    """NaN used to fall through every comparison: EPG 0, IoU 0, energy guidance loss 1 with no
    gradient, indistinguishable from a dead map."""
    from e2kd.guidance import energy_loss

    maps = torch.stack([RAMP[0], RAMP[0]]).clone()
    maps[1, 0, 0] = float("nan")
    m = torch.cat([box(4, 4, (2, 4, 0, 4))] * 2)
    epg = energy_pointing_game(maps, m)
    assert epg[0].item() == pytest.approx(sum(range(8, 16)) / sum(range(16))) and torch.isnan(epg[1])
    scores = iou(maps, m)
    assert scores[0].item() == pytest.approx(8 / 8) and torch.isnan(scores[1])  # top half >= 7.5: rows 2-3
    assert torch.isnan(energy_loss(maps[1:], m[1:])).all()
    meter = LocalisationMeter()
    meter.update(maps, m)
    assert math.isnan(meter.compute()["epg"])


def test_localisation_meter_checks_its_binarisation_when_built():
    with pytest.raises(ValueError, match=r"LocalisationMeter: rule 'fraction_of_max' needs value in \[0, 1\], got 7"):
        LocalisationMeter(iou_value=7)
    with pytest.raises(ValueError, match="LocalisationMeter: unknown rule 'foo'"):
        LocalisationMeter(iou_rule="foo")


def test_bad_maps_and_masks_are_refused():
    with pytest.raises(ValueError, match="one channel"):
        energy_pointing_game(torch.zeros(1, 6, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        iou(torch.zeros(1, 4, 4), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="binary"):
        energy_pointing_game(RAMP, RAMP)
    with pytest.raises(ValueError, match="unknown rule"):
        binarise(RAMP, rule="otsu")


# --- (image, present class) pairs and the meter ----------------------------------------------


def test_present_class_pairs_multilabel_skips_images_without_classes():
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    masks = torch.arange(3 * 3).float().view(3, 3, 1, 1).expand(3, 3, 2, 2)
    img, cls, m = present_class_pairs(labels, masks)
    assert img.tolist() == [0, 0, 2] and cls.tolist() == [0, 2, 1]
    assert m[:, 0, 0].tolist() == [0.0, 2.0, 7.0]


def test_explain_present_classes_and_meter_by_hand():
    # Three images of 3 classes, 2x2; the "explanation" of class c is channel c.
    x = torch.zeros(3, 3, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # all energy top-left
    x[0, 2] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # spread evenly
    x[2, 1] = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # all energy bottom-right
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    masks = torch.zeros(3, 3, 2, 2)
    masks[:, :, 0, 0] = 1  # every class's box is the top-left pixel
    out = explain_present_classes(ChannelMean(), ChannelMap(), x, labels, masks)
    assert out["image_index"].tolist() == [0, 0, 2] and out["class_index"].tolist() == [0, 2, 1]
    assert torch.equal(out["attributions"][1], x[0, 2])
    meter = LocalisationMeter()
    meter.update(out["attributions"][:1], out["masks"][:1])
    meter.update(out["attributions"][1:], out["masks"][1:])
    res = meter.compute()
    # EPG: 1, 1/4, 0. IoU (half of max): {tl} vs {tl} = 1; all four vs {tl} = 1/4; {br} vs {tl} = 0.
    assert res["count"] == 3
    assert res["epg"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert res["iou"] == pytest.approx((1 + 0.25 + 0) / 3)


def test_explain_present_classes_single_label_explains_the_true_class():
    x = torch.zeros(2, 2, 2, 2)
    x[0, 1, 1, 1] = 1.0
    x[1, 0, 0, 0] = 1.0
    out = explain_present_classes(ChannelMean(), ChannelMap(), x, torch.tensor([1, 0]), torch.ones(2, 1, 2, 2))
    assert out["class_index"].tolist() == [1, 0]
    assert torch.equal(out["attributions"], torch.stack([x[0, 1], x[1, 0]]))


# --- grid pointing game ----------------------------------------------------------------------


def test_grid_cell_energy_by_hand():
    # 4x4 map = 2x2 grid of 2x2 cells. Cell sums: TL 0+1+4+5=10, TR 2+3+6+7=18,
    # BL 8+9+12+13=42, BR 10+11+14+15=50; total 120.
    maps = RAMP.expand(4, 4, 4)
    got = grid_cell_energy(maps, torch.tensor([0, 1, 2, 3]))
    assert got.tolist() == pytest.approx([10 / 120, 18 / 120, 42 / 120, 50 / 120])
    assert grid_cell_energy(torch.zeros(1, 4, 4), torch.tensor([0])).item() == 0.0
    with pytest.raises(ValueError, match="even"):
        grid_cell_energy(torch.zeros(1, 3, 4), torch.tensor([0]))


def _toy_dataset():
    # Six images of 5 classes (2x2, 5 channels): image i lights channel label_i with brightness v.
    spec = [(0, 0.9), (1, 0.8), (2, 0.7), (3, 0.6), (4, 0.5), (0, 0.95)]
    data = []
    for i, (c, v) in enumerate(spec):
        img = torch.zeros(5, 2, 2)
        img[c] = v
        data.append({"image": img, "label": torch.tensor(c), "index": torch.tensor(i)})
    return data


def test_build_grids_uses_confident_correct_images_of_distinct_classes():
    data = _toy_dataset()
    conf = torch.full((6, 5), 0.05)
    for i, d in enumerate(data):
        conf[i, int(d["label"])] = 0.8
    conf[4] = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.6])
    conf[4, 3], conf[4, 4] = 0.7, 0.1  # sample 4 (class 4) is misclassified -> not a candidate
    conf[5, 0] = 0.9  # sample 5 is the more confident class-0 image
    grids = build_grids(data, conf, num_grids=3, seed=1)
    assert grids.images.shape == (3, 5, 4, 4)
    for g in range(3):
        labs = grids.labels[g].tolist()
        assert sorted(labs) == [0, 1, 2, 3]  # class 4 has no candidate; four distinct classes
        for cell, (src, lab) in enumerate(zip(grids.sources[g].tolist(), labs)):
            assert int(data[src]["label"]) == lab
            r, c = divmod(cell, 2)
            assert torch.equal(grids.images[g, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2], data[src]["image"])
    # class 0 uses its most confident image first (sample 5), then cycles to sample 0.
    class0 = [int(grids.sources[g][grids.labels[g].tolist().index(0)]) for g in range(3)]
    assert class0 == [5, 0, 5]
    with pytest.raises(ValueError, match="4 are needed"):
        build_grids(data, conf, num_grids=1, min_confidence=0.85)


def test_grid_pointing_game_scores_every_cell():
    data = _toy_dataset()
    model = ChannelMean()
    conf = model_confidences(model, data, batch_size=4)
    assert conf.shape == (6, 5) and torch.allclose(conf.sum(1), torch.ones(6))
    grids = build_grids(data, conf, num_grids=2, min_confidence=0.0)
    scores = grid_pointing_game(model, ChannelMap(), grids)
    # Channel c is non-zero only in the cell holding the class-c image: every cell scores 1.
    assert scores.shape == (2, 4) and torch.allclose(scores, torch.ones(2, 4))
    # Swap the labels of two cells: their explanations now point into the other cell.
    swapped = grids.labels.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    scores = grid_pointing_game(model, ChannelMap(), grids.images, swapped)
    assert scores[:, :2].eq(0).all() and scores[:, 2:].eq(1).all()


def test_epg_of_a_mask_and_its_complement_add_up_to_one():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 8, 8, generator=g)
    m = (torch.rand(16, 8, 8, generator=g) > 0.7).float()
    inside, outside = energy_pointing_game(a, m), energy_pointing_game(a, 1 - m)
    assert torch.allclose(inside + outside, torch.ones(16), atol=1e-6)
    assert bool(((inside >= 0) & (inside <= 1)).all())
    # Scaling a map by a positive factor changes neither EPG nor IoU.
    assert torch.allclose(energy_pointing_game(7.5 * a, m), inside, atol=1e-6)
    assert torch.equal(iou(7.5 * a, m), iou(a, m))
