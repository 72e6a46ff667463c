"""The in-memory batch path and the "distil on A, evaluate on B" pairing."""

import pytest
import torch

from e2kd.data import BatchAugment, InMemoryLoader, build_dataset, distill_eval_pair


def test_loader_covers_every_sample_once_per_epoch():
    ds = build_dataset("synthetic", "train", num_samples=23, image_size=16)
    loader = InMemoryLoader(ds, batch_size=5, shuffle=True, seed=3)
    assert len(loader) == 5
    seen = torch.cat([b["index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(23))
    b = next(iter(loader))
    i = int(b["index"][0])
    s = ds[i]
    assert torch.equal(b["image"][0], s["image"]) and torch.equal(b["mask"][0], s["mask"])
    assert b["label"][0] == s["label"]
    assert len(InMemoryLoader(ds, batch_size=5, drop_last=True)) == 4


def test_loader_is_reproducible_and_augments_jointly():
    ds = build_dataset("synthetic", "train", num_samples=12, image_size=16, in_chans=1)
    aug = BatchAugment(size=16, scale=(0.4, 1.0), image_interpolation="nearest")
    a = [b for b in InMemoryLoader(ds, batch_size=4, shuffle=True, transform=aug, seed=9)]
    b = [b for b in InMemoryLoader(ds, batch_size=4, shuffle=True, transform=aug, seed=9)]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
        # Object pixels are >= 0.6, background <= 0.3: the mask still marks the object.
        assert torch.equal((x["image"] >= 0.6 - 1e-6).float(), x["mask"])
    with pytest.raises(TypeError, match="InMemoryImageDataset"):
        InMemoryLoader([1, 2], batch_size=1)


@pytest.mark.data
def test_distill_on_animal_shapes_evaluate_on_fashion_mnist():
    dv, ev = distill_eval_pair("animal_shapes", "fashion_mnist", image_size=32)
    assert ev.image_shape == (32, 32) and len(ev) == 10_000
    assert dv.image_shape == (32, 32) and dv.in_chans == 1 and len(dv) == 9_716


def test_distill_on_grey_evaluate_on_rgb():
    dv, ev = distill_eval_pair("synthetic", "synthetic", distill_kw={"in_chans": 1, "num_samples": 8},
                               eval_kw={"in_chans": 3, "num_samples": 4}, image_size=24)
    assert dv.in_chans == 3 and dv.image_shape == (24, 24) and len(dv) == 8
    # Grey repeated on three channels.
    assert torch.equal(dv.images[:, 0], dv.images[:, 2])
