"""In-memory datasets kept on the training device: batches are indexed, converted and augmented
there. No GPU is needed: the ``meta`` device stands in for one (tensors there have shapes and
dtypes but no values), and the GPU's free memory is a patched figure."""

import pytest
import torch

from e2kd.data import build_dataset
from e2kd.frozen import FrozenDataset, FrozenStore, freeze
from e2kd.train import batches as B
from e2kd.train.loop import _to_device
from frozen_testlib import tiny_resnet


def _synthetic(n=12):
    return build_dataset("synthetic", "train", image_size=16, num_samples=n, num_classes=3)


def test_dataset_on_another_device_indexes_there_and_keeps_the_cpu_index():
    ds = _synthetic()
    assert ds.to_device("cpu") is ds  # already there
    moved = ds.to_device("meta")
    assert moved is not ds and ds.images.device.type == "cpu"  # the original is untouched
    batch = moved.batch(torch.tensor([5, 0, 7]))
    assert batch["image"].device.type == "meta" and batch["image"].dtype == torch.float32
    assert batch["image"].shape == (3, 3, 16, 16) and batch["label"].device.type == "meta"
    assert batch["mask"].device.type == "meta"
    assert batch["index"].device.type == "cpu" and batch["index"].tolist() == [5, 0, 7]
    # what a placement decision weighs: every tensor's bytes (uint8 images, labels, masks)
    expected = sum(t.numel() * t.element_size() for t in (ds.images, ds.labels, ds.masks))
    assert ds.nbytes == expected and moved.nbytes == expected


def test_frozen_dataset_moves_its_images_and_leaves_the_store(tmp_path):
    ds = _synthetic(6)
    freeze(tiny_resnet(classes=3), "gradcam", ds, tmp_path, batch_size=6, progress=False)
    frozen = FrozenDataset(ds, FrozenStore(tmp_path))
    moved = frozen.to_device("meta")
    batch = moved.batch(torch.tensor([1, 2]))
    assert batch["image"].device.type == "meta"
    assert batch["teacher_maps"].device.type == "cpu"  # read from the store; the loop moves it
    # in the store's dtype (half the bytes to move), converted where it is used
    store = FrozenStore(tmp_path)
    assert store.map_dtype == "float16" and batch["teacher_maps"].dtype == torch.float16
    assert torch.equal(batch["teacher_maps"], store.batch([1, 2])["maps"])
    ref = frozen.batch(torch.tensor([1, 2]))
    torch.testing.assert_close(batch["teacher_logits"], ref["teacher_logits"])
    assert frozen.batch(torch.tensor([1]))["image"].device.type == "cpu"  # the original stays


def test_placement_rule(monkeypatch):
    ds = _synthetic()
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    moved = []
    monkeypatch.setattr(type(ds), "to_device", lambda self, device: moved.append(device) or "moved")
    free = {"bytes": 4 * ds.nbytes}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10 * free["bytes"]))
    assert B.place_on_device(ds, None, cpu) is ds and B.place_on_device(ds, True, cpu) is ds  # the CPU: nothing moves
    assert B.place_on_device(ds, None, cuda) == "moved"  # a quarter of the free memory: it fits
    free["bytes"] = 4 * ds.nbytes - 4
    assert B.place_on_device(ds, None, cuda) is ds  # just over a quarter: stays in host memory
    assert B.place_on_device(ds, True, cuda) == "moved"  # asked for: moved regardless
    assert B.place_on_device(ds, False, cuda) is ds
    assert B.place_on_device(ds, None, cuda, in_memory=False) is ds  # the DataLoader path
    assert moved == [cuda, cuda]


def test_on_device_true_refuses_data_read_from_files():
    class Files(torch.utils.data.Dataset):
        name = "folder"

        def __len__(self):
            return 4

    with pytest.raises(ValueError, match="on_device=true needs a dataset held in memory.*on_device=null"):
        B.place_on_device(Files(), True, torch.device("cuda"))
    with pytest.raises(ValueError, match="on_device=true"):
        B.place_on_device(_synthetic(), True, torch.device("cpu"), in_memory=False)


def test_the_loop_moves_every_tensor_of_a_batch():
    batch = {"image": torch.rand(2, 3, 4, 4), "label": torch.tensor([0, 1]), "name": "kept"}
    out = _to_device(batch, torch.device("meta"))
    assert out["image"].device.type == "meta" and out["label"].device.type == "meta" and out["name"] == "kept"
