"""A small deterministic synthetic dataset with learnable class patterns and exact masks.

No files are needed: the images are generated from the seed in a few milliseconds, so tests
of every other part (trainer, metrics, frozen explanations) can use it.

Each image holds one object (or, with ``multilabel=True``, one or two objects of distinct
classes) on a dark noise background. The object of class ``c`` out of ``K`` is a square of
stripes oriented at angle ``pi * c / K`` whose intensities lie in [0.6, 1.0] while the
background lies in [0, 0.3], so the mask is exactly where the object is.
"""

from __future__ import annotations

import math

import torch

from ._registry import register_dataset
from .base import InMemoryImageDataset, square_size

__all__ = ["make_synthetic"]

_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}
_DEFAULT_N = {"train": 256, "val": 64, "test": 128}


def _stripes(c: int, k: int, side: int, chans: int) -> torch.Tensor:
    """(chans, side, side) float pattern of class ``c``: stripes at angle pi*c/k, period 4 px."""
    theta = math.pi * c / k
    yy, xx = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    phase = 2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / 4.0
    bright = (torch.cos(phase) > 0).float()
    base = 0.6 + 0.4 * bright
    if chans == 1:
        return base.unsqueeze(0)
    # A class-dependent colour tint that never leaves [0.6, 1].
    tint = torch.tensor([0.6 + 0.4 * ((c + j) % 3 == 0) for j in range(chans)])
    return (0.6 + (base - 0.6) * tint.view(-1, 1, 1) / 1.0).clamp(0.6, 1.0)


def make_synthetic(
    *,
    num_samples: int,
    num_classes: int = 4,
    image_size: int = 32,
    in_chans: int = 3,
    multilabel: bool = False,
    seed: int = 0,
) -> dict:
    """Generate the tensors of the synthetic dataset.

    Returns
    -------
    dict with ``images`` uint8 (N, C, S, S), ``labels`` long (N,) or float (N, K), ``masks``
    uint8 (N, 1, S, S) or (N, K, S, S) for multi-label.
    """
    if num_classes < 2:
        raise ValueError(f"synthetic data needs num_classes >= 2, got {num_classes}")
    if image_size < 12:
        raise ValueError(f"synthetic image_size must be >= 12, got {image_size}")
    g = torch.Generator().manual_seed(int(seed))
    n, s, k = int(num_samples), int(image_size), int(num_classes)
    images = (torch.rand((n, in_chans, s, s), generator=g) * 0.3)
    if multilabel:
        labels = torch.zeros((n, k))
        masks = torch.zeros((n, k, s, s), dtype=torch.uint8)
    else:
        labels = torch.randint(0, k, (n,), generator=g)
        masks = torch.zeros((n, 1, s, s), dtype=torch.uint8)
    patterns = {}
    for i in range(n):
        if multilabel:
            count = 1 + int(torch.randint(0, 2, (1,), generator=g))
            classes = torch.randperm(k, generator=g)[:count].tolist()
        else:
            classes = [int(labels[i])]
        side = s // 2 if len(classes) == 1 else s // 3
        for slot, c in enumerate(classes):
            if len(classes) == 1:
                y0 = int(torch.randint(0, s - side + 1, (1,), generator=g))
                x0 = int(torch.randint(0, s - side + 1, (1,), generator=g))
            else:
                # Two objects: left and right halves, so they never overlap.
                half = s // 2
                y0 = int(torch.randint(0, s - side + 1, (1,), generator=g))
                x0 = slot * half + int(torch.randint(0, half - side + 1, (1,), generator=g))
            key = (c, side)
            if key not in patterns:
                patterns[key] = _stripes(c, k, side, in_chans)
            images[i, :, y0 : y0 + side, x0 : x0 + side] = patterns[key]
            if multilabel:
                labels[i, c] = 1.0
                masks[i, c, y0 : y0 + side, x0 : x0 + side] = 1
            else:
                masks[i, 0, y0 : y0 + side, x0 : x0 + side] = 1
    return {"images": (images * 255).round().to(torch.uint8), "labels": labels, "masks": masks}


@register_dataset("synthetic")
def _build(
    split,
    *,
    root=None,
    image_size=None,
    seed=0,
    num_samples=None,
    num_classes=4,
    in_chans=3,
    multilabel=False,
    transform=None,
):
    """``split`` in train/val/test; each split comes from its own derived seed."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
    t = make_synthetic(
        num_samples=num_samples if num_samples is not None else _DEFAULT_N[split],
        num_classes=num_classes,
        image_size=square_size(image_size, "synthetic", 32),
        in_chans=in_chans,
        multilabel=multilabel,
        seed=int(seed) * 10 + _SPLIT_OFFSET[split] + 1_000_003,
    )
    return InMemoryImageDataset(
        images=t["images"],
        labels=t["labels"],
        masks=t["masks"],
        class_names=[f"class{c}" for c in range(num_classes)],
        multilabel=multilabel,
        transform=transform,
        name=f"synthetic/{split}",
    )
