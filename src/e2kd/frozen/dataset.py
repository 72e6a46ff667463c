"""The dataset of frozen distillation: images with the teacher's stored logits and maps."""

from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import torch

from .augment import JointAugment
from .manifest import dataset_fingerprint
from .store import FrozenStore

__all__ = ["FrozenDataset", "frozen_forward"]


class FrozenDataset(torch.utils.data.Dataset):
    """Wrap an un-augmented dataset and its frozen store for distillation without a teacher.

    ``dataset[i]`` is the base sample dict (``image``, ``label``, ``index``, and ``mask`` /
    ``group`` where present) plus ``teacher_logits`` (C,) float32 and ``teacher_maps``
    (K, h, w) float32 from the store, augmented by :class:`JointAugment`: one random geometric
    augmentation moves image, map and mask alike, photometric ones change the image only. A
    default-collated batch feeds :class:`e2kd.Distiller` directly (see :func:`frozen_forward`).

    Parameters
    ----------
    base_dataset : map-style dataset
        The dataset the store was frozen from, without random augmentation (same images,
        same order, same size).
    store : FrozenStore or path
    geometric, photometric : sequences of torchvision.transforms.v2 transforms
    check_dataset : bool
        Compare :func:`e2kd.frozen.dataset_fingerprint` of ``base_dataset`` with the store's
        dataset identity (default). Turn off only for a store frozen with a custom
        ``dataset_id`` or checked by the caller.

    When ``base_dataset`` stacks whole batches (``batch(indices)``, as the in-memory datasets
    of :mod:`e2kd.data` do) and no augmentation is given, the wrapper has ``batch(indices)``
    too: the base batch plus ``teacher_logits`` (B, C) float32 and ``teacher_maps`` (B, K, h, w)
    in the store's dtype (float16 by default: half the bytes to move; the augmentation, the
    ``Distiller`` and the evaluation convert them where they run), for a trainer that augments
    whole batches itself (:func:`e2kd.train.augment.augment_batch`
    moves ``teacher_maps`` with the images).
    """

    def __init__(
        self, base_dataset, store, *, geometric: Sequence = (), photometric: Sequence = (), check_dataset: bool = True
    ):
        if not isinstance(store, FrozenStore):
            store = FrozenStore(store)
        if len(base_dataset) != len(store):
            raise ValueError(
                f"the dataset has {len(base_dataset)} images but the frozen store {str(store.path)!r} was built from "
                f"{len(store)}; pass the dataset the store was frozen from (same split, sampling and size)"
            )
        if check_dataset:
            stored = store.manifest["dataset"]
            store.check(
                {"dataset_id": dataset_fingerprint(base_dataset, name=stored.get("name"), split=stored.get("split"))}
            )
        self.base = base_dataset
        self.store = store
        self.augment = JointAugment(geometric=geometric, photometric=photometric)
        for attr in ("num_classes", "in_chans", "class_names", "multilabel", "group_names", "name", "split", "sampling"):
            if hasattr(base_dataset, attr):
                setattr(self, attr, getattr(base_dataset, attr))
        if callable(getattr(base_dataset, "batch", None)) and not geometric and not photometric:
            self.batch = self._batch
            if callable(getattr(base_dataset, "to_device", None)):
                self.to_device = self._to_device

    @property
    def nbytes(self) -> int:
        """Bytes of the base dataset's tensors (what :meth:`to_device` moves; the store stays)."""
        return int(getattr(self.base, "nbytes", 0))

    def _to_device(self, device) -> "FrozenDataset":
        """The same wrapper over the base dataset placed on ``device`` (its ``to_device``); the
        store stays where it is (it is read shard by shard)."""
        moved = copy.copy(self)
        moved.base = self.base.to_device(device)
        moved.batch = moved._batch
        moved.to_device = moved._to_device
        return moved

    def _batch(self, indices) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = dict(self.base.batch(idx))
        if tuple(out["image"].shape[1:]) != self.store.image_shape:
            raise ValueError(
                f"the base dataset returns images of shape {tuple(out['image'].shape[1:])} but the store was frozen "
                f"from images of shape {self.store.image_shape}; build the dataset with the same image size"
            )
        stored = self.store.batch(idx.tolist())
        out["teacher_logits"] = stored["logits"].float()
        out["teacher_maps"] = stored["maps"]
        return out

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        sample = self.base[i]
        if not isinstance(sample, Mapping) or "image" not in sample:
            raise ValueError("the base dataset must return sample dicts with an 'image' tensor")
        sample = dict(sample)
        index = int(sample.get("index", i))
        if index != int(i):
            raise ValueError(f"sample {i} carries index {index}; the base dataset's 'index' must be the sample's position")
        image = sample["image"]
        if tuple(image.shape) != self.store.image_shape:
            raise ValueError(
                f"the base dataset returns images of shape {tuple(image.shape)} but the store was frozen from images of "
                f"shape {self.store.image_shape} (transform {self.store.manifest['transform']}); build the dataset "
                "with the same image size and no random augmentation"
            )
        stored = self.store[index]
        image, maps, mask = self.augment(image, stored["maps"], sample.get("mask"))
        sample["image"] = image
        if mask is not None:
            sample["mask"] = mask
        sample["teacher_logits"] = stored["logits"].float()
        sample["teacher_maps"] = maps.float()
        return sample


def frozen_forward(distiller, batch: Mapping, device: Optional[torch.device] = None) -> dict:
    """``distiller(image, teacher_logits=..., teacher_maps=...)`` for a collated FrozenDataset batch.

    Parameters
    ----------
    distiller : e2kd.Distiller
        Built with ``teacher=None``.
    batch : dict with ``image`` (B, C, H, W), ``teacher_logits`` (B, C), ``teacher_maps`` (B, K, h, w)
    device : optional
        Where to move the tensors (default: leave them where they are).
    """
    x, z, m = batch["image"], batch["teacher_logits"], batch["teacher_maps"]
    if device is not None:
        x, z, m = x.to(device), z.to(device), m.to(device)
    return distiller(x, teacher_logits=z, teacher_maps=m)
