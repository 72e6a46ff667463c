"""TuxBirds: exact masks (also after augmentation), documented group counts, identity split,
and the generated-data cache."""

import json

import pytest
import torch

from e2kd.data import build_dataset
from e2kd.data import tuxbirds as tb
from e2kd.data.transforms import JointTransform

COUNTS = {"train": 24, "val": 8, "test": 32}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture()
def splits(cache):
    return {sp: build_dataset("tuxbirds", sp, image_size=32, counts=COUNTS, workers=1) for sp in COUNTS}


def test_group_and_label_counts_as_documented(splits):
    tr, va, te = splits["train"], splits["val"], splits["test"]
    assert (len(tr), len(va), len(te)) == (24, 8, 32)
    # Distillation split: 100 % correlated, half land birds on land, half water birds on water.
    assert torch.bincount(tr.groups, minlength=4).tolist() == [12, 0, 0, 12]
    assert torch.equal(tr.groups, 3 * tr.labels)
    # Validation and test: all four groups equally.
    assert torch.bincount(te.groups, minlength=4).tolist() == [8, 8, 8, 8]
    assert torch.bincount(va.groups, minlength=4).tolist() == [2, 2, 2, 2]
    assert torch.equal(te.labels, te.groups // 2)
    assert tr.group_names == ["landbird_on_land", "landbird_on_water", "waterbird_on_land", "waterbird_on_water"]
    assert tr.num_classes == 2 and tr.in_chans == 3 and tr.image_shape == (32, 32)
    s = te[5]
    assert set(s) >= {"image", "label", "index", "mask", "group", "identity"}
    assert s["mask"].shape == (1, 32, 32) and int(s["group"]) == 1


def test_labels_follow_the_bird_and_no_identity_in_train_and_test(splits):
    names = splits["train"].identity_names
    for ds in splits.values():
        for ident, y in zip(ds.extras["identity"].tolist(), ds.labels.tolist()):
            assert y == int(names[ident] in tb.WATER_BIRDS)
    train_ids = set(splits["train"].extras["identity"].tolist()) | set(splits["val"].extras["identity"].tolist())
    test_ids = set(splits["test"].extras["identity"].tolist())
    assert not train_ids & test_ids
    split = tb.bird_split(0)
    assert not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["test"]) == 35
    water_test = [b for b in split["test"] if b in tb.WATER_BIRDS]
    assert len(water_test) == 4 and len(split["test"]) == 4 + 7


@pytest.mark.parametrize("split,i", [("train", 3), ("test", 6), ("test", 11)])
def test_mask_is_exactly_where_the_bird_changed_the_background(splits, split, i):
    r = tb.render_tuxbirds_image(i, split, image_size=32)
    changed = (r["image"] != r["background"]).any(0, keepdim=True).float()
    assert torch.equal(changed, r["mask"]) and r["mask"].sum() > 20
    # The cached dataset holds the same image and mask.
    s = splits[split][i]
    assert torch.equal(s["mask"], r["mask"])
    assert torch.equal(s["image"], r["image"])
    # After a random crop/flip (nearest resampling, so pixels are moved, not mixed) the
    # augmented mask is exactly where the augmented image differs from the augmented background.
    t = JointTransform(size=40, scale=(0.3, 1.0), image_interpolation="nearest")
    g = torch.Generator().manual_seed(i)
    for _ in range(5):
        p = t.draw(g)
        a = t.apply({"image": r["image"], "mask": r["mask"]}, p)
        b = t.apply({"image": r["background"]}, p)
        assert torch.equal((a["image"] != b["image"]).any(0, keepdim=True).float(), a["mask"])


def test_cache_is_reused_and_manifest_records_the_key(cache, monkeypatch):
    a = build_dataset("tuxbirds", "test", image_size=32, counts=COUNTS, workers=1)
    manifests = list(cache.glob("tuxbirds/*/manifest.json"))
    assert len(manifests) == 1
    m = json.loads(manifests[0].read_text())
    assert m["key"]["seed"] == 0 and m["key"]["generator_version"] == tb.GENERATOR_VERSION
    assert {k: v["count"] for k, v in m["files"].items()} == COUNTS
    assert all(len(v["sha256"]) == 64 for v in m["files"].values())

    def boom(**kw):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(tb, "generate_tuxbirds", boom)
    b = build_dataset("tuxbirds", "test", image_size=32, counts=COUNTS, workers=1)
    assert a.content_hash() == b.content_hash()
    # A new seed or generator version is a new entry: generation is called.
    with pytest.raises(AssertionError, match="regenerated"):
        build_dataset("tuxbirds", "test", image_size=32, counts=COUNTS, seed=1)
    monkeypatch.setattr(tb, "GENERATOR_VERSION", tb.GENERATOR_VERSION + 1)
    with pytest.raises(AssertionError, match="regenerated"):
        build_dataset("tuxbirds", "test", image_size=32, counts=COUNTS)


def test_damaged_cache_is_regenerated_with_a_warning(cache):
    a = build_dataset("tuxbirds", "val", image_size=32, counts=COUNTS, workers=1)
    f = next(cache.glob("tuxbirds/*/val.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="damaged.*regenerating"):
        b = build_dataset("tuxbirds", "val", image_size=32, counts=COUNTS, workers=1)
    assert a.content_hash() == b.content_hash()
    assert not list(cache.glob("tuxbirds/.*"))  # no temporary folder left behind


def test_seed_changes_the_data_and_workers_do_not(cache):
    c = {"test": 8}
    a = tb.generate_tuxbirds(image_size=24, seed=0, counts=c)
    b = tb.generate_tuxbirds(image_size=24, seed=0, counts=c, workers=2)
    d = tb.generate_tuxbirds(image_size=24, seed=5, counts=c)
    assert torch.equal(a["test"]["images"], b["test"]["images"])
    assert not torch.equal(a["test"]["images"], d["test"]["images"])


def test_bad_arguments(cache):
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        build_dataset("tuxbirds", "holdout")
    with pytest.raises(ValueError, match="counts"):
        build_dataset("tuxbirds", "train", counts={"train": -1})
