"""Pascal VOC as multi-label classification with boxes, through torchvision's VOC reader.

``root`` holds ``VOCdevkit/VOC<year>/{JPEGImages, Annotations, ImageSets/Main/<split>.txt}``
(``root`` may also be that ``VOCdevkit`` folder itself). The splits are train, val and trainval
for every year 2007-2012, plus test for 2007 only: the test annotations of the later years were
never published.
Each sample has a multi-hot ``label`` over the 20 classes (every annotated object; with
``skip_difficult=True`` objects marked difficult are left out) and ``mask`` (20, S, S): the
union of each class's boxes rasterised, in the frame of the resized image (VOC images are
resized to S x S without cropping so that no box is cut).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._registry import register_dataset
from .files import FileImageDataset

__all__ = ["VOC_CLASSES", "voc", "rasterise_boxes"]

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]


def rasterise_boxes(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """Per-class masks (K, H, W) from boxes.

    Parameters
    ----------
    boxes : (N, 4) xyxy in pixels with VOC's 1-based inclusive corners converted to
        0-based half-open ``[x1, x2) x [y1, y2)``
    labels : (N,) class ids
    """
    h, w = size
    m = torch.zeros((num_classes, h, w))
    for (x1, y1, x2, y2), c in zip(boxes.round().long().tolist(), labels.tolist()):
        m[c, max(0, y1) : min(h, y2), max(0, x1) : min(w, x2)] = 1.0
    return m


_YEARS = tuple(str(y) for y in range(2007, 2013))


def voc(root, split: str, *, year: str = "2012", image_size=224, skip_difficult: bool = False, transform=None):
    """VOC ``split`` ("train", "val", "trainval"; "test" with year 2007) as a multi-label dataset."""
    from torchvision.datasets import VOCDetection

    if root is None:
        raise ValueError("voc reads data from disk: pass root= the folder holding VOCdevkit/")
    year = str(year)
    if year not in _YEARS:
        raise ValueError(f"voc: year must be one of {', '.join(_YEARS)}, got {year!r}")
    splits = ("train", "val", "trainval", "test") if year == "2007" else ("train", "val", "trainval")
    if split not in splits:
        hint = (" (VOC has public test annotations for 2007 only: set year 2007 to evaluate on its test split, "
                "or evaluate on val)" if split == "test" else "")
        raise ValueError(f"voc: VOC{year} has no split {split!r}; its splits are {', '.join(splits)}{hint}")
    root = Path(root)
    if root.name == "VOCdevkit" and (root / f"VOC{year}").is_dir() and not (root / "VOCdevkit").is_dir():
        root = root.parent  # root named the VOCdevkit folder itself
    base = root / "VOCdevkit" / f"VOC{year}"
    need = [base / "ImageSets" / "Main" / f"{split}.txt", base / "JPEGImages", base / "Annotations"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"voc: cannot open VOC{year} {split!r} under {root}: missing {', '.join(missing)}; root must hold "
            f"VOCdevkit/VOC{year}/ with ImageSets/Main/{split}.txt, JPEGImages/ and Annotations/"
        )
    try:
        det = VOCDetection(str(root), year=year, image_set=split, download=False)
    except (RuntimeError, ValueError, OSError) as err:
        raise FileNotFoundError(f"voc: cannot open VOC{year} {split!r} under {base}: {err}") from err
    index = {c: k for k, c in enumerate(VOC_CLASSES)}
    labels, all_boxes = [], []
    for p in det.annotations:
        ann = det.parse_voc_xml(_read_xml(p))["annotation"]
        objs = ann.get("object", [])
        objs = objs if isinstance(objs, list) else [objs]
        boxes, cls = [], []
        for o in objs:
            if o["name"] not in index:
                raise ValueError(f"{p}: unknown VOC class {o['name']!r}")
            if skip_difficult and int(o.get("difficult", 0)):
                continue
            b = o["bndbox"]
            boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
            cls.append(index[o["name"]])
        y = torch.zeros(len(VOC_CLASSES))
        y[cls] = 1.0
        labels.append(y)
        all_boxes.append((torch.tensor(boxes).view(-1, 4), torch.tensor(cls, dtype=torch.long)))

    def mask_fn(i, hw):
        b, c = all_boxes[i]
        return rasterise_boxes(b, c, len(VOC_CLASSES), hw)

    ds = FileImageDataset(
        paths=det.images, labels=torch.stack(labels) if labels else torch.zeros(0, len(VOC_CLASSES)),
        class_names=VOC_CLASSES, multilabel=True, image_size=image_size, crop=False, transform=transform,
        mask_fn=mask_fn, name=f"voc{year}/{split}",
    )
    ds.boxes = all_boxes
    ds.annotation_paths = list(det.annotations)  # read at construction: part of a frozen store's identity
    return ds


def _read_xml(path):
    from xml.etree.ElementTree import ParseError, parse

    try:
        return parse(path).getroot()
    except ParseError as err:
        raise ValueError(f"{path}: corrupt annotation XML ({err})") from err


@register_dataset("voc")
def _build(split, *, root=None, image_size=None, seed=0, year="2012", skip_difficult=False, transform=None):
    return voc(root, split, year=year, image_size=image_size or 224, skip_difficult=skip_difficult, transform=transform)
