"""Few-shot sampling and held-out validation: exact counts, disjoint, stable, clear errors."""

import numpy as np
import pytest
import torch

from e2kd.data import build_dataset, fewshot_split, indices_hash, kshot_indices, train_val_split

LABELS = torch.arange(200) % 10  # 20 per class


def test_kshot_exactly_k_per_class_and_disjoint_from_val():
    shots, val = fewshot_split(LABELS, shots=4, val_per_class=3, seed=7)
    assert torch.bincount(LABELS[shots], minlength=10).tolist() == [4] * 10
    assert torch.bincount(LABELS[val], minlength=10).tolist() == [3] * 10
    assert not set(shots.tolist()) & set(val.tolist())
    train, val2 = train_val_split(LABELS, val_per_class=3, seed=7)
    assert torch.equal(val, val2)
    assert sorted(train.tolist() + val.tolist()) == list(range(200))


def test_stable_across_runs_pinned_hash():
    # Values computed once with numpy's PCG64 and written here: a change of the selection
    # (or of the generator) on any machine fails this test.
    shots, val = fewshot_split(LABELS, shots=4, val_per_class=3, seed=7)
    assert indices_hash(shots) == "8d45e014fa0888ab"
    assert indices_hash(val) == "5d25bbd10fa630de"
    assert indices_hash(kshot_indices(LABELS, 2, seed=0)) == "beafdd332cc9283e"


def test_seed_changes_selection_and_hash_is_order_free():
    a = kshot_indices(LABELS, 5, seed=0)
    b = kshot_indices(LABELS, 5, seed=1)
    assert not torch.equal(a, b)
    assert indices_hash(a) == indices_hash(a.flip(0))
    # The hash is SHA-256 of the sorted int64 little-endian bytes.
    import hashlib

    assert indices_hash(a) == hashlib.sha256(np.sort(a.numpy()).astype("<i8").tobytes()).hexdigest()[:16]


def test_k_too_large_names_the_class():
    y = torch.tensor([0] * 5 + [1] * 2 + [2] * 5)
    with pytest.raises(ValueError, match=r"class 1 \('bird'\).*only 2"):
        kshot_indices(y, 3, class_names=["cat", "bird", "dog"])
    # Validation takes from the pool first: 5 - 3 = 2 left for class 0.
    with pytest.raises(ValueError, match=r"class 0 \('cat'\).*only 2"):
        fewshot_split(torch.tensor([0] * 5 + [1] * 9), shots=3, val_per_class=3, class_names=["cat", "bird"])


def test_build_dataset_with_shots_and_val():
    kw = dict(num_samples=120, num_classes=4, image_size=16)
    tr = build_dataset("synthetic", "train", shots=5, val_per_class=4, seed=2, **kw)
    va = build_dataset("synthetic", "val", shots=5, val_per_class=4, seed=2, **kw)
    assert len(tr) == 20 and len(va) == 16
    assert torch.bincount(tr.labels, minlength=4).tolist() == [5] * 4
    assert not set(tr.source_indices.tolist()) & set(va.source_indices.tolist())
    assert tr.sampling["indices_hash"] == indices_hash(tr.source_indices)
    assert [int(tr[i]["index"]) for i in range(3)] == [0, 1, 2]
    full = build_dataset("synthetic", "train", seed=2, **kw)
    j = int(tr.source_indices[3])
    assert torch.equal(tr[3]["image"], full[j]["image"]) and tr[3]["label"] == full[j]["label"]
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        build_dataset("synthetic", "test", shots=5, **kw)
    with pytest.raises(ValueError, match="multi-label"):
        build_dataset("synthetic", "train", shots=1, multilabel=True, **kw)


@pytest.mark.data
def test_fashion_mnist_kshot_pinned():
    ds = build_dataset("fashion_mnist", "train", shots=5, val_per_class=3, seed=0)
    assert len(ds) == 50
    assert ds.sampling["indices_hash"] == "7ece174eae99238b"
