"""``build_dataset``: the one entry point the trainer uses."""

from __future__ import annotations

from ._registry import get_builder
from .sampling import fewshot_split, indices_hash

__all__ = ["build_dataset"]


def build_dataset(
    name: str,
    split: str,
    *,
    root=None,
    image_size=None,
    seed: int = 0,
    shots: int | None = None,
    val_per_class: int | None = None,
    **kw,
):
    """Build dataset ``name`` for ``split``.

    Parameters
    ----------
    name : a registered name (:func:`e2kd.data.list_datasets`)
    split : "train", "test", or "val"; with ``val_per_class`` the "val" split is held out
        from "train" and "train" excludes it
    root : folder of the data for the real formats (ImageFolder, VOC, ...)
    image_size : int or (H, W); None keeps the native size
    seed : seeds generated benchmarks and the few-shot / validation selection
    shots : keep exactly ``shots`` images per class of the train split (disjoint from
        the validation split)
    val_per_class : hold out this many images per class of "train" as the "val" split
    **kw : passed to the builder (e.g. ``transform=``, ``num_samples=``)

    The selection is recorded in ``dataset.sampling`` (shots, val_per_class, seed, number of
    images and, when a selection was made, ``indices_hash``) for the run logs.
    """
    builder = get_builder(name)
    if shots is None and not val_per_class:
        ds = builder(split, root=root, image_size=image_size, seed=seed, **kw)
        ds.sampling = {"shots": None, "val_per_class": 0, "seed": int(seed), "n": len(ds)}
        return ds
    if split not in ("train", "val"):
        raise ValueError(
            f"shots / val_per_class select from the train split; split must be 'train' or 'val', got {split!r}"
        )
    if split == "val" and not val_per_class:
        raise ValueError("split='val' with shots needs val_per_class > 0 (the held-out images per class)")
    base = builder("train", root=root, image_size=image_size, seed=seed, **kw)
    if getattr(base, "multilabel", False):
        raise ValueError(f"{name}: shots / val_per_class need a single-label dataset; {name} is multi-label")
    chosen, val = fewshot_split(
        base.targets(), shots=shots, val_per_class=int(val_per_class or 0), seed=seed, class_names=base.class_names
    )
    idx = val if split == "val" else chosen
    ds = base.subset(idx, name=f"{name}/{split}")
    ds.sampling = {
        "shots": shots,
        "val_per_class": int(val_per_class or 0),
        "seed": int(seed),
        "n": len(ds),
        "indices_hash": indices_hash(idx),
    }
    return ds
