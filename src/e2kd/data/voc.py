"""Pascal VOC as multi-label classification with boxes, through torchvision's VOC reader.

``root`` holds ``VOCdevkit/VOC<year>/{JPEGImages, Annotations, ImageSets/Main/<split>.txt}``.
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


def voc(root, split: str, *, year: str = "2012", image_size=224, skip_difficult: bool = False, transform=None):
    """VOC ``split`` ("train", "val", "trainval", "test") as a multi-label dataset."""
    from torchvision.datasets import VOCDetection

    if root is None:
        raise ValueError("voc reads data from disk: pass root= the folder holding VOCdevkit/")
    try:
        det = VOCDetection(str(root), year=str(year), image_set=split, download=False)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        raise FileNotFoundError(
            f"voc: cannot open VOC{year} {split!r} under {Path(root) / 'VOCdevkit'} ({err}); expected "
            f"VOCdevkit/VOC{year}/ImageSets/Main/{split}.txt, JPEGImages/ and Annotations/"
        ) from err
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
