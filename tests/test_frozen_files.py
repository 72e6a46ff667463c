"""A frozen store of a dataset of image files knows every file it was frozen from: a file
overwritten, added or removed after freezing makes the store refuse to serve the run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import e2kd
from e2kd.data.folders import image_folder
from e2kd.frozen import FrozenDataset, FrozenStore, StoreMismatchError, dataset_fingerprint, freeze
from frozen_testlib import TinyImages, tiny_resnet

torch.set_num_threads(1)

N = 40  # more than the 16 probed positions: file 1 is never probed


def _write(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def _folder(root):
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
    for i in range(N):
        _write(root / "train" / ("a" if i < N // 2 else "b") / f"{i:03d}.png", i)
    return root


@pytest.fixture
def frozen(tmp_path):
    root = _folder(tmp_path / "data")
    ds = image_folder(root, "train", image_size=8)
    path = tmp_path / "store"
    freeze(tiny_resnet(classes=2), e2kd.GradCAM(), ds, path, batch_size=20, progress=False)
    return root, path


def test_sixteen_probes_leave_file_one_unread():
    # The premise of the other tests: position 1 of 40 is not among the probed positions.
    positions = {round(i * (N - 1) / 15) for i in range(16)}
    assert 1 not in positions


def test_unchanged_files_match_and_the_manifest_records_them(frozen):
    root, path = frozen
    ds = image_folder(root, "train", image_size=8)
    ident = dataset_fingerprint(ds)
    stored = json.loads((path / "manifest.json").read_text())["dataset"]
    assert stored == ident
    assert ident["files"]["count"] == N
    FrozenStore(path, expect={"dataset_id": ident})
    assert len(FrozenDataset(ds, path)) == N


def test_an_overwritten_unprobed_file_is_refused(frozen):
    root, path = frozen
    target = root / "train" / "a" / "001.png"
    before = os.stat(target)
    _write(target, 1000)
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)
    ds = image_folder(root, "train", image_size=8)
    with pytest.raises(StoreMismatchError, match="no longer matches the dataset's files: a file was replaced") as err:
        FrozenDataset(ds, path)
    assert err.value.field == "dataset_id"
    assert "a/001.png" in str(err.value) and "freeze the store again" in str(err.value)


def test_a_touched_file_counts_as_changed(frozen):
    # Only path, size and modification time are read, never the bytes: a newer mtime is a change.
    root, path = frozen
    target = root / "train" / "b" / "030.png"
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StoreMismatchError, match="a file was replaced.*'b/030.png'"):
        FrozenDataset(image_folder(root, "train", image_size=8), path)


def test_a_moved_copy_with_the_same_files_still_matches(frozen, tmp_path):
    # Paths enter relative to the files' common folder; copy2 keeps sizes and mtimes.
    root, path = frozen
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "data", copy_function=shutil.copy2)
    assert len(FrozenDataset(image_folder(moved, "train", image_size=8), path)) == N


def test_a_removed_file_is_named_by_the_count(frozen):
    root, path = frozen
    (root / "train" / "a" / "001.png").unlink()
    ds = image_folder(root, "train", image_size=8)
    with pytest.raises(StoreMismatchError, match=f"frozen from {N} files, the dataset now has {N - 1}"):
        FrozenStore(path, expect={"dataset_id": dataset_fingerprint(ds, name=ds.name)})


def test_a_store_of_the_earlier_identity_scheme_asks_to_refreeze(frozen):
    # A manifest written before files entered the identity: no "files" entry, a probe-only id.
    root, path = frozen
    m = json.loads((path / "manifest.json").read_text())
    del m["dataset"]["files"]
    m["dataset"]["id"] = "sha256:" + "0" * 64
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreMismatchError, match="earlier e2kd.*16 sampled images.*freeze the store again"):
        FrozenDataset(image_folder(root, "train", image_size=8), path)


def test_a_subset_hashes_only_its_own_files(frozen):
    root, _ = frozen
    ds = image_folder(root, "train", image_size=8)
    sub = ds.subset([0, 2, 4])
    before = dataset_fingerprint(sub)
    assert before["files"]["count"] == 3
    st = os.stat(ds.paths[1])
    os.utime(ds.paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # not in the subset
    assert dataset_fingerprint(sub)["id"] == before["id"]
    st = os.stat(ds.paths[2])
    os.utime(ds.paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert dataset_fingerprint(sub)["id"] != before["id"]


def test_in_memory_identity_is_unchanged():
    # The identity of a dataset held in memory is computed as before files entered the scheme,
    # so its existing stores still open.
    ident = dataset_fingerprint(TinyImages(n=6, size=8))
    assert ident == {"id": "sha256:ff86858a33054baa8010cb0c7220da1851129cff0ce9aa10db5e04e92187c0e8",
                     "name": "tiny", "split": "train", "size": 6}
