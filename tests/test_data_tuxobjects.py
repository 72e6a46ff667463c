"""TuxObjects: distillation photos of man-made things, scored on photos of natural things never
seen in training; no labels (-1) in ImageNet's label space; exact masks; seeded and cached."""

import pytest
import torch

from e2kd.data import build_dataset
from e2kd.data import tuxobjects as tx
from e2kd.data.stamps import STAMPS_DIR


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_CACHE", str(tmp_path))
    return tmp_path


def _load(split, **kw):
    return build_dataset("tuxobjects", split, image_size=32, counts={"train": 20}, renders=2, workers=1, **kw)


def test_train_holds_only_man_made_things_and_val_test_split_the_natural_ones(cache):
    split = tx.object_split(0)
    natural = [p for p in split["val"] + split["test"]]
    assert all(p.split("/", 1)[0] in tx.NATURAL_FOLDERS for p in natural)
    assert not any(p.split("/", 1)[0] in tx.NATURAL_FOLDERS for p in split["train"])
    assert not set(split["val"]) & set(split["test"])
    # every natural photo is in exactly one of val / test, about 30 % in val
    everything = sorted(str(p.relative_to(STAMPS_DIR)) for p in STAMPS_DIR.glob("**/*.png")
                        if not {"cartoon", "plastic", "toys"} & set(p.relative_to(STAMPS_DIR).parts))
    assert sorted(split["train"] + natural) == everything
    assert abs(len(split["val"]) - 0.3 * len(natural)) <= 1
    assert tx.object_split(1)["val"] != split["val"] and tx.object_split(0) == split


def test_sizes_labels_identities_and_masks(cache):
    tr, va, te = _load("train"), _load("val"), _load("test")
    split = tx.object_split(0)
    assert len(tr) == 20 and len(va) == 2 * len(split["val"]) and len(te) == 2 * len(split["test"])
    for ds in (tr, va, te):
        assert ds.num_classes == 1000 and ds.class_names[0] == "tench" and ds.in_chans == 3
        assert bool((ds.labels == -1).all())
    # val / test: each natural stamp rendered `renders` times, in order
    assert te.extras["identity"].tolist() == [k for k in range(len(split["test"])) for _ in range(2)]
    assert [te.identity_names[i] for i in te.extras["identity"][::2].tolist()] == [p[:-4] for p in split["test"]]
    # the two renders of a stamp differ (own random stream per image)
    assert not torch.equal(te.images[0], te.images[1])
    # masks: the pasted object, between 4 % and 72 % of the image (longer side 50-85 % of it)
    frac = te.masks.float().mean(dim=(1, 2, 3))
    assert bool((frac > 0.02).all()) and bool((frac < 0.75).all())


def test_the_mask_is_exactly_the_pixels_the_object_changed(cache):
    import numpy as np

    from e2kd.data.stamps import load_texture, texture_canvas

    te = _load("test")
    path = tx.object_split(0)["test"][0]
    for i in (0, 1):  # re-draw the background of image i from its random stream
        rng = np.random.Generator(np.random.PCG64([0, 102, i]))
        tex = load_texture(tx.TEXTURES[int(rng.integers(len(tx.TEXTURES)))], 32 / 128)
        bg = (texture_canvas(tex, 32, rng) * 255).round().to(torch.uint8)
        img, _ = tx._render(i, "test", path, 32, 0)
        assert torch.equal((img * 255).round().to(torch.uint8), te.images[i])
        changed = (te.images[i] != bg).any(dim=0)
        assert torch.equal(changed, te.masks[i, 0].bool())


def test_same_seed_same_images_and_the_cache_is_reused(cache):
    a = _load("train")
    entries = list((cache / "tuxobjects").iterdir())
    b = _load("train")
    assert torch.equal(a.images, b.images) and torch.equal(a.extras["identity"], b.extras["identity"])
    assert list((cache / "tuxobjects").iterdir()) == entries
    c = build_dataset("tuxobjects", "train", image_size=32, counts={"train": 20}, renders=2, workers=1, seed=1)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("kw, match", [
    ({"counts": {"train": 4, "test": 3}}, "counts take only 'train'"),
    ({"counts": {"train": 0}}, "counts take only 'train'"),
    ({"renders": 0}, "renders must be >= 1"),
    ({"image_size": 8}, "image_size must be >= 16"),
])
def test_bad_arguments_name_the_problem(cache, kw, match):
    args = {"image_size": 32, "counts": {"train": 4}, "renders": 1, "workers": 1, **kw}
    with pytest.raises(ValueError, match=match):
        build_dataset("tuxobjects", "test", **args)
    with pytest.raises(ValueError, match="split must be"):
        build_dataset("tuxobjects", "validation", image_size=32)
