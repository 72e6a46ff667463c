"""Datasets for a run and resumable, DDP-sharded batch streams.

Order: epoch ``e`` visits the training set in the permutation drawn from ``(seed, e)``, in
global batches of ``batch_size`` (the last incomplete batch is dropped); rank ``r`` of ``W``
takes rows ``r·B/W … (r+1)·B/W`` of each global batch (what ``DistributedSampler`` does, but
per batch, so the union of the ranks' batches is exactly the one-process batch). The position
is a single integer (global batches drawn so far), saved in checkpoints; resuming skips to it
without replaying data.

In-memory datasets (``e2kd.data.InMemoryImageDataset``) are sliced as whole tensor batches
(``dataset.batch``), on a GPU from tensors kept there (:func:`place_on_device`); other datasets
go through a ``DataLoader`` with workers and pinned memory.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterator, List, Optional

import torch

from .config import ExperimentConfig
from .distributed import DistInfo

__all__ = ["build_datasets", "TrainStream", "eval_batches", "place_on_device", "ON_DEVICE_FRACTION"]

#: ``data.on_device=null`` keeps an in-memory dataset on the GPU when its tensors take at most
#: this fraction of the GPU's free memory.
ON_DEVICE_FRACTION = 0.25


def _build(
    name: str, split: str, *, root, image_size, seed, shots=None, val_per_class=0, limit=None, kwargs=None,
    limit_field="data.limit",
):
    from ..data import build_dataset
    from ..data.files import FileImageDataset

    kw = dict(kwargs or {})
    ds = build_dataset(
        name, split, root=root, image_size=image_size, seed=seed, shots=shots, val_per_class=val_per_class or None, **kw
    )
    if isinstance(ds, FileImageDataset) and ds.image_shape is None:
        raise ValueError(
            f"data.image_size=null keeps each image file's own size, but {name!r} split {split!r} is read from "
            "files whose sizes may differ, and a batch needs images of one size; set data.image_size "
            "(e.g. data.image_size=224)"
        )
    if limit is not None and limit < len(ds):
        if not hasattr(ds, "subset"):
            raise ValueError(f"data limit needs a dataset with subset(); {name} has none")
        sampling = getattr(ds, "sampling", None)
        full = _classes_present(ds)
        # The first ``limit`` items, as recorded runs took them (not a per-class draw).
        ds = ds.subset(torch.arange(limit), name=getattr(ds, "name", name))
        if sampling is not None:
            ds.sampling = dict(sampling, n=len(ds), limit=limit)
        kept = _classes_present(ds)
        if full is not None and kept is not None and len(kept) < len(full):
            warnings.warn(
                f"{limit_field}={limit} keeps the first {limit} images of {name!r} split {split!r}, which hold "
                f"{len(kept)} of its {len(full)} classes (the split is ordered by class); results cover those "
                f"classes only. Raise {limit_field} (or set it to null) to cover every class",
                stacklevel=3,
            )
    if len(ds) == 0:
        raise ValueError(f"dataset {name!r} split {split!r} is empty; check data.root / data.shots / data.limit")
    return ds


def _classes_present(ds) -> Optional[set]:
    """The classes with at least one labelled image in ``ds``; None when it has no targets()
    or no labels (unlabelled images are -1)."""
    targets = getattr(ds, "targets", None)
    if not callable(targets):
        return None
    t = targets()
    if not torch.is_tensor(t):
        return None
    if t.dim() == 2:  # multi-hot
        present = set(torch.nonzero(t.sum(0) > 0).flatten().tolist())
    else:
        present = set(t[t >= 0].unique().tolist())
    return present or None


def build_datasets(cfg: ExperimentConfig) -> Dict[str, object]:
    """The training, evaluation (and, with ``val_per_class``, validation) datasets of a run."""
    d = cfg.data
    seed = cfg.seed if d.seed is None else d.seed
    common = dict(root=d.root, image_size=d.image_size, seed=seed, kwargs=d.kwargs)
    out = {
        "train": _build(d.name, d.train_split, shots=d.shots, val_per_class=d.val_per_class, limit=d.limit, **common)
    }
    if d.val_per_class:
        out["val"] = _build(d.name, "val", shots=d.shots, val_per_class=d.val_per_class, **common)
    eval_name = d.eval_name or d.name
    eval_common = dict(
        root=d.eval_root if d.eval_name else d.root,
        image_size=d.image_size,
        seed=seed,
        kwargs=d.eval_kwargs if d.eval_name else dict(d.kwargs, **d.eval_kwargs),
    )
    out["eval"] = _build(eval_name, d.eval_split, limit=d.eval_limit, limit_field="data.eval_limit", **eval_common)
    if eval_name == d.name:
        _check_same_classes(d, out["train"], out["eval"])
    return out


def _check_same_classes(d, train, ev) -> None:
    """Train and evaluation splits of one dataset must name the same classes in the same order:
    folder datasets number each split's own sorted class folders, so a class present in one
    split only shifts the labels of every class after it."""
    a, b = getattr(train, "class_names", None), getattr(ev, "class_names", None)
    if a is None or b is None or list(a) == list(b):
        return
    a, b = list(a), list(b)
    in_a, in_b = set(a), set(b)
    only_train = [c for c in a if c not in in_b]
    only_eval = [c for c in b if c not in in_a]

    def show(names):
        return f"{names[:10]}{f' and {len(names) - 10} more' if len(names) > 10 else ''}"

    if only_train or only_eval:
        what = f"only in {d.train_split!r}: {show(only_train)}; only in {d.eval_split!r}: {show(only_eval)}"
    else:
        what = f"the same {len(a)} classes in another order ({d.train_split!r}: {show(a)}; {d.eval_split!r}: {show(b)})"
    raise ValueError(
        f"data {d.name!r}: the training split {d.train_split!r} has {len(a)} classes and the evaluation split "
        f"{d.eval_split!r} has {len(b)}, and they differ ({what}); each split numbers its own classes, so the "
        "evaluation labels would not match the training labels. Give both splits the same class folders"
    )


def _in_memory(ds, flag: Optional[bool]) -> bool:
    has = callable(getattr(ds, "batch", None))
    if flag and not has:
        raise ValueError(f"data.in_memory=true but {type(ds).__name__} has no batch(); set data.in_memory=null")
    return has if flag is None else bool(flag)


def place_on_device(ds, flag: Optional[bool], device: torch.device, in_memory: Optional[bool] = None):
    """``ds`` with its tensors on ``device`` (a GPU) where it stacks whole batches from tensors
    (``to_device``): its batches are then indexed, converted to float and augmented there, and
    no image crosses the bus after the first step. ``flag`` is ``data.on_device``: true always
    (a ValueError for a dataset read from files), false never, None when the tensors take at most
    :data:`ON_DEVICE_FRACTION` of the GPU's free memory. On the CPU ``ds`` is returned as it is."""
    movable = _in_memory(ds, in_memory) and callable(getattr(ds, "to_device", None))
    if flag and not movable:
        raise ValueError(
            f"data.on_device=true needs a dataset held in memory as tensors; {getattr(ds, 'name', type(ds).__name__)} "
            "is read from files (or data.in_memory=false). Set data.on_device=null"
        )
    if device.type != "cuda" or flag is False or not movable:
        return ds
    if flag is None and int(getattr(ds, "nbytes", 0)) > ON_DEVICE_FRACTION * torch.cuda.mem_get_info(device)[0]:
        return ds
    return ds.to_device(device)


def _collate_dicts(samples: List[dict]) -> dict:
    shapes = sorted({tuple(s["image"].shape) for s in samples if "image" in s})
    if len(shapes) > 1:
        raise ValueError(
            f"images of one batch have different sizes {shapes[:4]}; a batch needs one size: build the dataset "
            "with an image_size (data.image_size in a run config)"
        )
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class TrainStream:
    """Resumable training batches for this rank; see the module docstring."""

    def __init__(self, ds, *, batch_size: int, seed: int, info: DistInfo, in_memory: Optional[bool], num_workers: int):
        if batch_size % info.world_size:
            raise ValueError(
                f"optim.batch_size={batch_size} is the global batch and must divide evenly over "
                f"{info.world_size} processes; use a multiple of {info.world_size}"
            )
        if len(ds) < batch_size:
            raise ValueError(
                f"the training set has {len(ds)} images, fewer than one batch of {batch_size}; "
                f"lower optim.batch_size to at most {len(ds)}"
            )
        self.ds, self.batch_size, self.seed, self.info = ds, batch_size, seed, info
        self.local = batch_size // info.world_size
        self.per_epoch = len(ds) // batch_size
        self.in_memory = _in_memory(ds, in_memory)
        self.num_workers = num_workers
        self.position = 0  # global batches drawn so far

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(int(self.seed) * 100_003 + int(epoch))
        return torch.randperm(len(self.ds), generator=g)

    def _rows(self, perm: torch.Tensor, i: int) -> torch.Tensor:
        start = i * self.batch_size + self.info.rank * self.local
        return perm[start : start + self.local]

    def batches(self) -> Iterator[dict]:
        """Endless batches from the current position; ``position`` counts them."""
        while True:
            epoch, i = divmod(self.position, self.per_epoch)
            perm = self._perm(epoch)
            if self.in_memory:
                for j in range(i, self.per_epoch):
                    batch = self.ds.batch(self._rows(perm, j))
                    self.position += 1
                    yield batch
            else:
                loader = torch.utils.data.DataLoader(
                    self.ds,
                    batch_sampler=[self._rows(perm, j).tolist() for j in range(i, self.per_epoch)],
                    num_workers=self.num_workers,
                    pin_memory=self.info.device.type == "cuda",
                    collate_fn=_collate_dicts,
                )
                for batch in loader:
                    self.position += 1
                    yield batch

    @property
    def epoch(self) -> float:
        return self.position / self.per_epoch


def eval_batches(ds, *, batch_size: int, info: DistInfo, in_memory: Optional[bool], num_workers: int) -> Iterator[dict]:
    """This rank's contiguous share of ``ds`` in order, in batches of ``batch_size``."""
    n = len(ds)
    per = -(-n // info.world_size)
    lo, hi = min(info.rank * per, n), min((info.rank + 1) * per, n)
    idx = torch.arange(lo, hi)
    if _in_memory(ds, in_memory):
        for s in range(0, len(idx), batch_size):
            yield ds.batch(idx[s : s + batch_size])
    else:
        chunks = [idx[s : s + batch_size].tolist() for s in range(0, len(idx), batch_size)]
        yield from torch.utils.data.DataLoader(
            ds, batch_sampler=chunks, num_workers=num_workers, pin_memory=info.device.type == "cuda", collate_fn=_collate_dicts
        )
