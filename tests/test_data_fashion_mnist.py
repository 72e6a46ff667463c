"""Fashion-MNIST from the Debian package: official counts, masks, the IDX reader, errors."""

import gzip
import struct

import numpy as np
import pytest
import torch

from e2kd.data import build_dataset
from e2kd.data import fashion_mnist as fm
from e2kd.data.idx import read_idx


@pytest.fixture(scope="module")
def train():
    return build_dataset("fashion_mnist", "train")


def test_official_counts(train):
    test = build_dataset("fashion_mnist", "test")
    assert len(train) == 60_000 and len(test) == 10_000
    assert torch.bincount(train.labels, minlength=10).tolist() == [6_000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1_000] * 10
    assert train.num_classes == 10 and train.in_chans == 1 and not train.multilabel
    assert train.class_names[9] == "Ankle boot"


def test_sample_dict_and_mask_is_nonzero_pixels(train):
    s = train[123]
    assert s["image"].shape == (1, 28, 28) and s["image"].dtype == torch.float32
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["label"].dtype == torch.long and s["label"].dim() == 0
    assert int(s["index"]) == 123
    assert torch.equal(s["mask"], (s["image"] > 0).float())
    # The raw bytes agree with the IDX file read independently with gzip + numpy.
    raw = gzip.decompress(open(fm.DEBIAN_DIR / "train-images-idx3-ubyte.gz", "rb").read())
    first = np.frombuffer(raw, dtype=np.uint8, offset=16, count=28 * 28).reshape(28, 28)
    assert torch.equal(train.images[0, 0], torch.from_numpy(first.copy()))


def test_image_size_resizes_image_and_mask():
    ds = build_dataset("fashion_mnist", "test", image_size=32)
    s = ds[0]
    assert s["image"].shape == (1, 32, 32) and s["mask"].shape == (1, 32, 32)
    assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}


def _write_idx(path, arr, code=0x08):
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = head + arr.astype(">u1").tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_reader_round_trip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    _write_idx(tmp_path / "b", a)
    assert np.array_equal(read_idx(tmp_path / "b"), a)


def test_truncated_file_is_a_clear_error(tmp_path):
    for split in ("train", "test"):
        for stem in fm._FILES[split]:
            n = 3
            arr = np.zeros((n, 28, 28), np.uint8) if "images" in stem else np.zeros(n, np.uint8)
            _write_idx(tmp_path / f"{stem}.gz", arr)
    good = build_dataset("fashion_mnist", "test", root=tmp_path)
    assert len(good) == 3
    # Cut the gzip stream short: decompression fails.
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:20])
    fm._load_arrays.cache_clear()
    with pytest.raises(ValueError, match="truncated or corrupt"):
        build_dataset("fashion_mnist", "test", root=tmp_path)
    # A well-formed gzip whose IDX payload is short.
    arr = np.zeros((3, 28, 28), np.uint8)
    head = bytes([0, 0, 8, 3]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    p.write_bytes(gzip.compress(head + arr.tobytes()[:-5]))
    fm._load_arrays.cache_clear()
    with pytest.raises(ValueError, match="truncated or corrupt.*apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", "test", root=tmp_path)


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", "train", root=tmp_path)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setenv("E2KD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("E2KD_FASHION_MNIST", raising=False)
    monkeypatch.setattr(fm, "_internet", lambda *a, **k: False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*make install"):
        build_dataset("fashion_mnist", "train")


def test_bad_split():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        build_dataset("fashion_mnist", "validation")
