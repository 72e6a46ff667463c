"""Waterbirds (Sagawa et al., ICLR 2020) in the layout of the group_DRO code.

``root/metadata.csv`` with the columns ``img_id, img_filename, y, split, place`` (split 0 =
train, 1 = val, 2 = test; y 1 = water bird; place 1 = water background) and the images at
``root/<img_filename>``. group = 2·y + place, as in group_DRO. Every listed image of the
split is checked to exist when the dataset is built.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from ._registry import register_dataset
from .files import FileImageDataset

__all__ = ["waterbirds"]

_SPLITS = {"train": 0, "val": 1, "test": 2}
CLASS_NAMES = ["landbird", "waterbird"]
GROUP_NAMES = ["landbird_on_land", "landbird_on_water", "waterbird_on_land", "waterbird_on_water"]


def waterbirds(root, split: str, *, image_size=224, transform=None) -> FileImageDataset:
    """The ``split`` of Waterbirds listed in ``root/metadata.csv``."""
    if root is None:
        raise ValueError("waterbirds reads data from disk: pass root= the folder holding metadata.csv")
    if split not in _SPLITS:
        raise ValueError(f"waterbirds split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"waterbirds: {meta} not found; root must hold group_DRO's metadata.csv")
    paths, ys, groups = [], [], []
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        need = {"img_filename", "y", "split", "place"}
        if not need <= set(reader.fieldnames or []):
            raise ValueError(f"{meta}: columns {sorted(need - set(reader.fieldnames or []))} missing")
        for line, row in enumerate(reader, start=2):
            try:
                y, sp, place = int(row["y"]), int(row["split"]), int(row["place"])
            except ValueError as err:
                raise ValueError(f"{meta} line {line}: {err}") from None
            if y not in (0, 1) or place not in (0, 1) or sp not in (0, 1, 2):
                raise ValueError(f"{meta} line {line}: y, place must be 0/1 and split 0/1/2, got {y}, {place}, {sp}")
            if sp == _SPLITS[split]:
                paths.append(root / row["img_filename"])
                ys.append(y)
                groups.append(2 * y + place)
    if not paths:
        raise ValueError(
            f"waterbirds: {meta} has no rows of split {split!r} (column split = {_SPLITS[split]}); "
            "use group_DRO's metadata.csv, which lists train (0), val (1) and test (2) images"
        )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"waterbirds: {len(missing)} of the {len(paths)} {split} images listed in {meta} are missing, e.g. "
            f"{[str(p) for p in missing[:3]]}; img_filename is read relative to root ({root}): unpack the images "
            "there (the folders named in img_filename, e.g. 001.Black_footed_Albatross/)"
        )
    return FileImageDataset(
        paths=paths, labels=torch.tensor(ys, dtype=torch.long), class_names=CLASS_NAMES,
        groups=torch.tensor(groups, dtype=torch.long), group_names=GROUP_NAMES, image_size=image_size,
        transform=transform, name=f"waterbirds/{split}",
    )


@register_dataset("waterbirds")
def _build(split, *, root=None, image_size=None, seed=0, transform=None):
    return waterbirds(root, split, image_size=image_size or 224, transform=transform)
