"""Waterbirds (Sagawa et al., ICLR 2020) in the layout of the group_DRO code.

``root/metadata.csv`` with the columns ``img_id, img_filename, y, split, place`` (split 0 =
train, 1 = val, 2 = test; y 1 = water bird; place 1 = water background) and the images at
``root/<img_filename>``. group = 2·y + place, as in group_DRO. Every listed image of the
split is checked to exist when the dataset is built.

Object masks (for model guidance and localisation scores) come from CUB-200-2011, whose birds
Waterbirds pastes onto its backgrounds at the CUB image's size and position: with
``cub_root`` (the folder holding ``images.txt`` and ``bounding_boxes.txt``), ``mask`` (1, H, W)
is the bird's box (``masks="box"``, the guidance target of the paper's Waterbirds teacher) or its
segmentation (``masks="segmentation"``: ``cub_root/segmentations/<img_filename>.png``, the
annotators' soft masks binarised at one half). Images are matched by ``img_filename``, the
relative path both datasets use.
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


def waterbirds(root, split: str, *, image_size=224, transform=None, cub_root=None, masks: str = "box") -> FileImageDataset:
    """The ``split`` of Waterbirds listed in ``root/metadata.csv``; with ``cub_root``, the birds'
    masks from CUB-200-2011 (``masks`` = "box" or "segmentation")."""
    if root is None:
        raise ValueError("waterbirds reads data from disk: pass root= the folder holding metadata.csv")
    if split not in _SPLITS:
        raise ValueError(f"waterbirds split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"waterbirds: {meta} not found; root must hold group_DRO's metadata.csv")
    if masks not in ("box", "segmentation"):
        raise ValueError(f"waterbirds: masks must be 'box' or 'segmentation', got {masks!r}")
    paths, names, ys, groups = [], [], [], []
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
                names.append(row["img_filename"])
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
    mask_fn = None if cub_root is None else _cub_masks(Path(cub_root), names, masks)
    ds = FileImageDataset(
        paths=paths, labels=torch.tensor(ys, dtype=torch.long), class_names=CLASS_NAMES,
        groups=torch.tensor(groups, dtype=torch.long), group_names=GROUP_NAMES, image_size=image_size,
        transform=transform, name=f"waterbirds/{split}", mask_fn=mask_fn,
    )
    if cub_root is not None:  # each image's mask file: part of a frozen store's identity
        cub = Path(cub_root)
        ds.annotation_paths = (
            [cub / "segmentations" / Path(n).with_suffix(".png") for n in names] if masks == "segmentation"
            else [cub / "bounding_boxes.txt"] * len(names)
        )
    return ds


def _read_table(path: Path, columns: int, what: str) -> dict:
    """``id -> fields`` of a whitespace-separated CUB table with ``columns`` fields per line."""
    if not path.is_file():
        raise FileNotFoundError(f"waterbirds: {path} not found; cub_root must be the CUB_200_2011 folder holding {what}")
    table = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns:
            raise ValueError(f"waterbirds: {path} line {line_no} has {len(fields)} fields, expected {columns}: {line!r}")
        table[fields[0]] = fields[1:]
    return table


def _cub_masks(cub: Path, names: list, kind: str):
    """``mask_fn(i, (H, W))`` of the birds of ``names`` (Waterbirds' img_filename values)."""
    ids = {rel[0]: image_id for image_id, rel in _read_table(cub / "images.txt", 2, "images.txt").items()}
    missing = [n for n in names if n not in ids]
    if missing:
        raise ValueError(
            f"waterbirds: {len(missing)} of the {len(names)} images are not listed in {cub / 'images.txt'}, e.g. "
            f"{missing[:3]}; cub_root must be the CUB-200-2011 release the Waterbirds images were made from"
        )
    if kind == "segmentation":
        files = [cub / "segmentations" / Path(n).with_suffix(".png") for n in names]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(
                f"waterbirds: {len(absent)} of the {len(files)} segmentation masks are missing under {cub / 'segmentations'}, "
                f"e.g. {[str(f) for f in absent[:3]]}; unpack CUB's segmentations there or use masks=box"
            )

        def segmentation(i, hw):
            from .files import read_image

            m = read_image(files[i], mode="L")[:1].float() / 255.0
            if tuple(m.shape[-2:]) != tuple(hw):
                raise ValueError(
                    f"waterbirds: the segmentation {files[i]} is {tuple(m.shape[-2:])} but its Waterbirds image is "
                    f"{tuple(hw)}; the masks must come from the CUB images the Waterbirds images were made from"
                )
            return (m >= 0.5).float()

        return segmentation
    table = _read_table(cub / "bounding_boxes.txt", 5, "bounding_boxes.txt")
    boxes = []
    for n in names:
        if ids[n] not in table:
            raise ValueError(f"waterbirds: image {n} (CUB id {ids[n]}) has no line in {cub / 'bounding_boxes.txt'}")
        x, y, w, h = (float(v) for v in table[ids[n]])
        boxes.append((x, y, x + w, y + h))

    def box(i, hw):
        x1, y1, x2, y2 = boxes[i]
        h, w = hw
        if x2 > w + 1 or y2 > h + 1:
            raise ValueError(
                f"waterbirds: the CUB box of {names[i]} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside its {w}x{h} "
                "Waterbirds image; the boxes must come from the CUB images the Waterbirds images were made from"
            )
        m = torch.zeros((1, h, w))
        m[0, max(0, round(y1)) : min(h, round(y2)), max(0, round(x1)) : min(w, round(x2))] = 1.0
        return m

    return box


@register_dataset("waterbirds")
def _build(split, *, root=None, image_size=None, seed=0, transform=None, cub_root=None, masks="box"):
    return waterbirds(root, split, image_size=image_size or 224, transform=transform, cub_root=cub_root, masks=masks)
