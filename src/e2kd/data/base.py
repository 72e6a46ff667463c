"""An in-memory image dataset: one uint8 tensor of all images, masks, labels and groups.

Every dataset of :mod:`e2kd.data` returns sample dicts::

    image  (C, H, W) float in [0, 1]
    label  long scalar, or (num_classes,) float multi-hot for multi-label data
    index  long, position in this dataset
    mask   (K, H, W) float {0, 1}; K = 1 (object) or K = num_classes (per-class)   [optional]
    group  long                                                                     [optional]

Small datasets (Fashion-MNIST, the generated benchmarks) keep everything in memory as uint8,
which is both compact and fast: :meth:`InMemoryImageDataset.batch` returns a whole augmented
batch without any per-sample PIL work.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["InMemoryImageDataset", "resize_uint8", "square_size"]


def square_size(image_size, name: str, default: int) -> int:
    """``image_size`` as one int for generators that draw square images."""
    if image_size is None:
        return default
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ValueError(f"{name} images are square: give image_size as an int, got {image_size}")
        image_size = image_size[0]
    return int(image_size)


def resize_uint8(x: torch.Tensor, size: int | tuple[int, int], *, mode: str) -> torch.Tensor:
    """Resize a uint8 batch ``(N, C, H, W)`` to ``size`` in chunks (bounded memory).

    ``mode="bilinear"`` (antialiased) for images, ``"nearest"`` for masks.
    """
    if isinstance(size, int):
        size = (size, size)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    out = torch.empty((*x.shape[:-2], *size), dtype=torch.uint8)
    step = 4096
    for i in range(0, x.shape[0], step):
        chunk = x[i : i + step].float()
        if mode == "nearest":
            r = F.interpolate(chunk, size=size, mode="nearest")
        else:
            r = F.interpolate(chunk, size=size, mode=mode, align_corners=False, antialias=True)
        out[i : i + step] = r.round_().clamp_(0, 255).to(torch.uint8)
    return out


class InMemoryImageDataset(torch.utils.data.Dataset):
    """Images, labels, optional masks and groups held as tensors.

    Parameters
    ----------
    images : uint8 tensor (N, C, H, W)
    labels : long tensor (N,), or float tensor (N, num_classes) multi-hot when ``multilabel``;
        a single label of -1 means "no label" (distillation data: evaluation reports agreement
        for such images and leaves them out of accuracy; training on labels refuses them)
    class_names : sequence of str, length num_classes
    masks : uint8 tensor (N, K, H, W) with values {0, 1}, optional
    groups : long tensor (N,), optional; needs ``group_names``
    group_names : sequence of str, optional
    multilabel : bool
    transform : callable(sample dict) -> sample dict, optional (a :class:`JointTransform`)
    image_size : int or (H, W), optional: resize everything once, at construction
    name : str, for messages and logs
    extras : dict of name -> tensor (N, ...), optional: more per-sample fields returned in
        every sample (e.g. ``identity``, the source object of a generated image, or padded
        ``boxes`` with ``box_labels``)
    """

    def __init__(
        self,
        *,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        masks: Optional[torch.Tensor] = None,
        groups: Optional[torch.Tensor] = None,
        group_names: Optional[Sequence[str]] = None,
        multilabel: bool = False,
        transform: Optional[Callable[[dict], dict]] = None,
        image_size: int | tuple[int, int] | None = None,
        name: str = "dataset",
        extras: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        n = images.shape[0]
        if labels.shape[0] != n:
            raise ValueError(f"{n} images but {labels.shape[0]} labels")
        if multilabel:
            if labels.dim() != 2 or labels.shape[1] != len(class_names):
                raise ValueError(f"multi-label labels must be (N, {len(class_names)}), got {tuple(labels.shape)}")
            labels = labels.float()
        else:
            if labels.dim() != 1:
                raise ValueError(f"labels must be (N,), got {tuple(labels.shape)}")
            labels = labels.long()
        if masks is not None:
            if masks.dtype != torch.uint8 or masks.dim() != 4 or masks.shape[0] != n or masks.shape[-2:] != images.shape[-2:]:
                raise ValueError(
                    f"masks must be uint8 (N, K, H, W) matching the images {tuple(images.shape)}, got "
                    f"{masks.dtype} {tuple(masks.shape)}"
                )
        if groups is not None:
            if group_names is None:
                raise ValueError("groups need group_names")
            groups = groups.long()
        if image_size is not None:
            images = resize_uint8(images, image_size, mode="bilinear")
            if masks is not None:
                masks = resize_uint8(masks, image_size, mode="nearest")
        extras = dict(extras or {})
        for k, v in extras.items():
            if v.shape[0] != n:
                raise ValueError(f"extra field {k!r} has {v.shape[0]} rows for {n} images")
            if k in ("image", "label", "index", "mask", "group"):
                raise ValueError(f"extra field name {k!r} is reserved")
        self.extras = extras
        self.images = images
        self.labels = labels
        self.masks = masks
        self.groups = groups
        self.class_names = list(class_names)
        self.group_names = list(group_names) if group_names is not None else None
        self.multilabel = bool(multilabel)
        self.transform = transform
        self.name = name
        self.source_indices: Optional[torch.Tensor] = None

    # -- the attributes every dataset exposes ----------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def targets(self) -> torch.Tensor:
        """Labels of all samples: (N,) long, or (N, num_classes) multi-hot."""
        return self.labels

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {self.name} of size {len(self)}")
        sample = {
            "image": self.images[i].float().div_(255.0),
            "label": self.labels[i].clone(),
            "index": torch.tensor(i, dtype=torch.long),
        }
        if self.masks is not None:
            sample["mask"] = self.masks[i].float()
        if self.groups is not None:
            sample["group"] = self.groups[i].clone()
        for k, v in self.extras.items():
            sample[k] = v[i].clone()
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def batch(self, indices: torch.Tensor | Sequence[int], *, transform=None, generator: torch.Generator | None = None) -> dict:
        """A whole batch as one dict of stacked tensors, without per-sample work.

        Parameters
        ----------
        indices : (B,) positions in this dataset
        transform : a :class:`e2kd.data.transforms.BatchAugment` (or any callable taking and
            returning a batch dict plus ``generator=``), optional
        generator : torch.Generator for the random augmentation, optional

        Returns
        -------
        dict with ``image`` (B, C, H, W) float, ``label``, ``index`` (B,), and ``mask`` /
        ``group`` where the dataset has them.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        idx = index.to(self.images.device)  # the rows, where the tensors are (a GPU: to_device)
        out = {
            "image": self.images[idx].float().div_(255.0),
            "label": self.labels[idx].clone(),
            "index": index.clone(),
        }
        if self.masks is not None:
            out["mask"] = self.masks[idx].float()
        if self.groups is not None:
            out["group"] = self.groups[idx].clone()
        for k, v in self.extras.items():
            out[k] = v[idx].clone()
        if transform is not None:
            out = transform(out, generator=generator)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the dataset's tensors (images, labels, masks, groups, extras)."""
        tensors = [self.images, self.labels, self.masks, self.groups, *self.extras.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to_device(self, device: torch.device | str) -> "InMemoryImageDataset":
        """The same dataset with its tensors on ``device``: ``batch`` then indexes and converts
        there (uint8 images travel once, not as float batches every step). Shares everything
        else with this one; on the device it already uses, returns ``self``."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        moved = copy.copy(self)
        moved.images = self.images.to(device)
        moved.labels = self.labels.to(device)
        moved.masks = None if self.masks is None else self.masks.to(device)
        moved.groups = None if self.groups is None else self.groups.to(device)
        moved.extras = {k: v.to(device) for k, v in self.extras.items()}
        return moved

    def subset(self, indices: torch.Tensor | Sequence[int], *, name: str | None = None) -> "InMemoryImageDataset":
        """A new dataset of the given positions (``index`` restarts at 0; the positions in
        the parent are kept in ``source_indices``)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        sub = InMemoryImageDataset(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=self.class_names,
            masks=None if self.masks is None else self.masks[idx],
            groups=None if self.groups is None else self.groups[idx],
            group_names=self.group_names,
            multilabel=self.multilabel,
            transform=self.transform,
            name=name or self.name,
            extras={k: v[idx] for k, v in self.extras.items()},
        )
        for attr in ("identity_names",):
            if hasattr(self, attr):
                setattr(sub, attr, getattr(self, attr))
        parent = self.source_indices
        sub.source_indices = idx.clone() if parent is None else parent[idx]
        return sub

    def content_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of images, labels, masks and groups."""
        h = hashlib.sha256()
        for t in (self.images, self.labels, self.masks, self.groups, *self.extras.values()):
            if t is not None:
                h.update(str(tuple(t.shape)).encode())
                h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, in_chans={self.in_chans}, "
            f"size={self.image_shape}, num_classes={self.num_classes}, multilabel={self.multilabel})"
        )
