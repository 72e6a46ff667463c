"""The synthetic dataset: deterministic, exact masks, the sample-dict convention."""

import pytest
import torch

from e2kd.data import build_dataset, list_datasets


def test_registered_and_unknown_name():
    assert {"fashion_mnist", "synthetic"} <= set(list_datasets())
    with pytest.raises(ValueError, match="unknown dataset 'synthtic'.*Did you mean 'synthetic'"):
        build_dataset("synthtic", "train")


def test_deterministic_for_a_seed_and_different_across_seeds_and_splits():
    a = build_dataset("synthetic", "train", seed=3, num_samples=20)
    b = build_dataset("synthetic", "train", seed=3, num_samples=20)
    c = build_dataset("synthetic", "train", seed=4, num_samples=20)
    t = build_dataset("synthetic", "test", seed=3, num_samples=20)
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != c.content_hash() != t.content_hash()


@pytest.mark.parametrize("chans", [1, 3])
def test_mask_is_exactly_the_object(chans):
    ds = build_dataset("synthetic", "train", num_samples=30, in_chans=chans, image_size=20, num_classes=3)
    assert ds.in_chans == chans and ds.num_classes == 3 and ds.image_shape == (20, 20)
    for i in range(len(ds)):
        s = ds[i]
        # Object pixels are >= 0.6 in every channel, the background <= 0.3.
        obj = (s["image"] >= 0.6 - 1e-6).all(0)
        bg = (s["image"] <= 0.3 + 1e-6).all(0)
        assert torch.equal(obj, s["mask"][0].bool()) and torch.equal(bg, ~obj)
        assert s["mask"].sum() == 10 * 10


def test_classes_have_distinct_patterns():
    ds = build_dataset("synthetic", "train", num_samples=60, in_chans=1, num_classes=4)
    patches = {}
    for i in range(len(ds)):
        s = ds[i]
        m = s["mask"][0].bool()
        patches.setdefault(int(s["label"]), s["image"][0][m].view(16, 16))
    assert len(patches) == 4
    vals = list(patches.values())
    assert all(not torch.equal(vals[i], vals[j]) for i in range(4) for j in range(i + 1, 4))


def test_multilabel_variant():
    ds = build_dataset("synthetic", "train", num_samples=25, multilabel=True, num_classes=5)
    assert ds.multilabel
    for i in range(len(ds)):
        s = ds[i]
        assert s["label"].dtype == torch.float32 and s["label"].shape == (5,)
        assert s["mask"].shape == (5, 32, 32)
        present = s["mask"].flatten(1).amax(1)
        assert torch.equal(present, s["label"])
        assert 1 <= s["label"].sum() <= 2
