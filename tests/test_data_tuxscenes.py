"""TuxScenes: multi-hot labels, per-class masks that are exactly the pasted objects, boxes,
and the split by stamp identity."""

import pytest
import torch

from e2kd.data import build_dataset
from e2kd.data import tuxscenes as ts
from e2kd.data.transforms import CropFlip, JointTransform

COUNTS = {"train": 16, "val": 4, "test": 24}


@pytest.fixture()
def splits(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_CACHE", str(tmp_path))
    return {sp: build_dataset("tuxscenes", sp, image_size=40, counts=COUNTS, workers=1) for sp in COUNTS}


def test_labels_masks_and_boxes_agree(splits):
    te = splits["test"]
    assert te.multilabel and te.num_classes == 6 and te.class_names == ["mammal", "bird", "fish", "fruit", "flower", "vegetable"]
    assert len(te) == 24
    for i in range(len(te)):
        s = te[i]
        assert s["label"].shape == (6,) and s["label"].dtype == torch.float32
        assert s["mask"].shape == (6, 40, 40)
        # A category is labelled exactly when it has visible pixels; 1 to 3 objects.
        assert torch.equal(s["label"], s["mask"].flatten(1).amax(1))
        n_obj = int((s["box_labels"] >= 0).sum())
        assert 1 <= n_obj <= 3 and 1 <= s["label"].sum() <= n_obj
        # Per-class masks do not overlap (each pixel shows one object).
        assert s["mask"].sum(0).max() <= 1
        # The boxes of one class cover exactly the bounding box of that class's mask.
        for c in range(6):
            bl = s["boxes"][s["box_labels"] == c]
            if len(bl) == 0:
                continue
            ys, xs = torch.nonzero(s["mask"][c], as_tuple=True)
            assert bl[:, 0].min() == xs.min() and bl[:, 1].min() == ys.min()
            assert bl[:, 2].max() == xs.max() + 1 and bl[:, 3].max() == ys.max() + 1
    counts = (te.extras["box_labels"] >= 0).sum(1)
    assert set(counts.tolist()) <= {1, 2, 3} and len(set(counts.tolist())) >= 2


@pytest.mark.parametrize("i", [0, 5, 13])
def test_masks_are_exactly_where_objects_changed_the_background(splits, i):
    r = ts.render_tuxscenes_image(i, "test", image_size=40)
    changed = (r["image"] != r["background"]).any(0)
    assert torch.equal(changed, r["mask"].amax(0).bool())
    assert torch.equal(splits["test"][i]["image"], r["image"])
    # After a random geometric draw applied to image, background and masks alike.
    t = JointTransform(size=48, scale=(0.4, 1.0), image_interpolation="nearest")
    g = torch.Generator().manual_seed(i)
    for _ in range(4):
        p = t.draw(g)
        a = t.apply({"image": r["image"], "mask": r["mask"]}, p)
        b = t.apply({"image": r["background"]}, p)
        assert torch.equal((a["image"] != b["image"]).any(0), a["mask"].amax(0).bool())


def test_boxes_follow_a_flip_like_the_masks(splits):
    s = splits["test"][2]
    out = JointTransform().apply(s, CropFlip(0.0, 0.0, 1.0, 1.0, True))
    for j in range(3):
        c = int(s["box_labels"][j])
        if c < 0:
            continue
        x1, y1, x2, y2 = s["boxes"][j].tolist()
        assert out["boxes"][j].tolist() == [40 - x2, y1, 40 - x1, y2]
    assert torch.equal(out["mask"], s["mask"].flip(-1))


def test_split_by_stamp_identity(splits):
    split = ts.stamp_split(0)
    assert not set(split["train"]) & set(split["test"])
    names = splits["train"].identity_names
    train_ids = {int(k) for sp in ("train", "val") for k in splits[sp].extras["identity"].flatten() if k >= 0}
    test_ids = {int(k) for k in splits["test"].extras["identity"].flatten() if k >= 0}
    assert not train_ids & test_ids
    assert {names[k] for k in test_ids} <= set(split["test"])
    # Every identity's name starts with the category of its box.
    for ds in splits.values():
        for ids, bl in zip(ds.extras["identity"], ds.extras["box_labels"]):
            for k, c in zip(ids.tolist(), bl.tolist()):
                if c >= 0:
                    assert names[k].split("/")[0] == ds.class_names[c]
