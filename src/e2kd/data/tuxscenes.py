"""TuxScenes: a Pascal-VOC-style multi-label benchmark made of real object photos.

One to three photo stamps of ``tuxpaint-stamps-default`` from six categories (mammals,
birds, fish, fruit, flowers, vegetables; several objects of one category may appear) are
pasted onto a texture (GIMP patterns and scikit-image textures) with random size, position
and flip. Later objects may cover earlier ones; positions are redrawn (up to 10 times) so
that no two boxes overlap by more than a quarter of the smaller one.

Each sample has

- ``label``: (6,) float multi-hot, 1 for every category with a visible object
- ``mask``: (6, S, S) float, the visible pixels of each category's objects; their union is
  exactly the set of pixels that differ from the bare background
- ``boxes``: (3, 4) float xyxy boxes of the visible pixels (x2, y2 exclusive), padded with
  zeros, and ``box_labels`` (3,) long, the category of each box or -1 for padding
- ``identity`` (3,) long: the stamp index (into ``identity_names``) of each object or -1

Splits are by stamp identity: about 30 % of the stamps of each category (chosen from the
seed) appear only in "test"; "train" and "val" use the others.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ._registry import register_dataset
from .base import InMemoryImageDataset
from .cache import cached_generate
from .stamps import load_stamp, load_texture, paste, stamp_paths, texture_canvas
from .tuxbirds import LAND_TEXTURES, WATER_TEXTURES

__all__ = ["CATEGORIES", "GENERATOR_VERSION", "generate_tuxscenes", "load_tuxscenes", "render_tuxscenes_image",
           "stamp_split"]

GENERATOR_VERSION = 1
CATEGORIES = {
    "mammal": ("animals/mammals", True),
    "bird": ("animals/birds", False),
    "fish": ("animals/fish", True),
    "fruit": ("food/fruit", True),
    "flower": ("plants/flowers", True),
    "vegetable": ("food/vegetables", True),
}
CLASS_NAMES = list(CATEGORIES)
TEXTURES = WATER_TEXTURES + LAND_TEXTURES + ("Paper/paper.pat", "Fabric/burlap.pat")
DEFAULT_COUNTS = {"train": 3000, "val": 500, "test": 1500}
MAX_OBJECTS = 3
TEST_FRACTION = 0.3
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}


def _all_stamps() -> list[tuple[int, str, str]]:
    """(class id, identity name, path) of every stamp, in a fixed order."""
    out = []
    for c, (folder, recursive) in enumerate(CATEGORIES.values()):
        d = stamp_paths(folder, recursive=recursive)
        out += [(c, f"{CLASS_NAMES[c]}/{p.stem}", str(p)) for p in d]
    return out


def stamp_split(seed: int) -> dict[str, list[str]]:
    """Identity names per split: {"train": [...], "test": [...]} (train also serves val)."""
    rng = np.random.Generator(np.random.PCG64([int(seed), 11]))
    stamps = _all_stamps()
    out = {"train": [], "test": []}
    for c in range(len(CLASS_NAMES)):
        names = sorted(n for k, n, _ in stamps if k == c)
        perm = [names[i] for i in rng.permutation(len(names))]
        n_test = max(1, round(TEST_FRACTION * len(names)))
        out["test"] += sorted(perm[:n_test])
        out["train"] += sorted(perm[n_test:])
    return out


def _pools(sp: str, seed: int):
    stamps = _all_stamps()
    names = [n for _, n, _ in stamps]
    allowed = set(stamp_split(seed)["test" if sp == "test" else "train"])
    pools = {c: [] for c in range(len(CLASS_NAMES))}
    for ident, (c, n, p) in enumerate(stamps):
        if n in allowed:
            pools[c].append((ident, p))
    return pools, names


def _overlap(a, b) -> float:
    iy = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iy * ix / max(1, small)


def _one_image(i, sp, pools, size, seed, keep_background=False):
    rng = np.random.Generator(np.random.PCG64([int(seed), 100 + _SPLIT_ID[sp], int(i)]))
    k = len(CLASS_NAMES)
    tex = load_texture(TEXTURES[int(rng.integers(len(TEXTURES)))], size / 128)
    canvas = (texture_canvas(tex, size, rng) * 255).round_().div_(255)
    background = canvas.clone()
    n_obj = 1 + int(rng.integers(MAX_OBJECTS))
    masks = torch.zeros((k, size, size), dtype=torch.bool)
    obj_masks, obj_class, obj_ident, placed = [], [], [], []
    for _ in range(n_obj):
        c = int(rng.integers(k))
        ident, path = pools[c][int(rng.integers(len(pools[c])))]
        stamp = load_stamp(path)
        h0, w0 = stamp.rgba.shape[-2:]
        frac = rng.uniform(0.3, 0.55)
        height = max(4, round(frac * size * min(1.0, h0 / w0)))
        width = max(2, round(w0 * height / h0))
        for _try in range(10):
            top = int(rng.integers(0, max(1, size - height + 1)))
            left = int(rng.integers(0, max(1, size - width + 1)))
            box = (top, left, top + height, left + width)
            if all(_overlap(box, b) <= 0.25 for b in placed):
                break
        placed.append(box)
        canvas, m = paste(canvas, stamp, height=height, top=top, left=left, flip=bool(rng.integers(2)),
                          background=background)
        for om in obj_masks:
            om &= ~m
        obj_masks.append(m)
        obj_class.append(c)
        obj_ident.append(ident)
    label = torch.zeros(k)
    boxes = torch.zeros((MAX_OBJECTS, 4))
    box_labels = torch.full((MAX_OBJECTS,), -1, dtype=torch.long)
    idents = torch.full((MAX_OBJECTS,), -1, dtype=torch.long)
    j = 0
    for m, c, ident in zip(obj_masks, obj_class, obj_ident):
        if not m.any():
            continue  # completely covered: not visible, not labelled
        masks[c] |= m
        label[c] = 1.0
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes[j] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        box_labels[j], idents[j] = c, ident
        j += 1
    out = {"image": canvas, "mask": masks, "label": label, "boxes": boxes, "box_labels": box_labels, "identity": idents}
    if keep_background:
        out["background"] = background
    return out


def render_tuxscenes_image(i: int, split: str, *, seed: int = 0, image_size: int = 64) -> dict:
    """Image ``i`` of ``split`` exactly as generated, plus its bare ``background``."""
    pools, _ = _pools(split, seed)
    r = _one_image(int(i), split, pools, int(image_size), int(seed), keep_background=True)
    r["mask"] = r["mask"].float()
    return r


def _generate_range(args):
    sp, lo, hi, pools, size, seed = args
    n, k = hi - lo, len(CLASS_NAMES)
    out = {
        "images": torch.empty((n, 3, size, size), dtype=torch.uint8),
        "masks": torch.empty((n, k, size, size), dtype=torch.uint8),
        "labels": torch.empty((n, k)),
        "boxes": torch.empty((n, MAX_OBJECTS, 4)),
        "box_labels": torch.empty((n, MAX_OBJECTS), dtype=torch.long),
        "identities": torch.empty((n, MAX_OBJECTS), dtype=torch.long),
    }
    for j, i in enumerate(range(lo, hi)):
        r = _one_image(i, sp, pools, size, seed)
        out["images"][j] = r["image"].mul_(255).round_().to(torch.uint8)
        out["masks"][j] = r["mask"]
        out["labels"][j] = r["label"]
        out["boxes"][j] = r["boxes"]
        out["box_labels"][j] = r["box_labels"]
        out["identities"][j] = r["identity"]
    return out


def generate_tuxscenes(*, image_size: int, seed: int, counts: dict[str, int], workers: int = 1) -> dict:
    """Generate all splits: ``{split: {"images", "masks", "labels", "boxes", "box_labels",
    "identities"}}``; independent of ``workers``."""
    jobs = []
    for sp, n in counts.items():
        pools, _ = _pools(sp, seed)
        step = max(1, -(-n // max(1, workers * 4)))
        jobs += [(sp, lo, min(n, lo + step), pools, image_size, seed) for lo in range(0, n, step)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            results = pool.map(_generate_range, jobs)
    else:
        results = [_generate_range(j) for j in jobs]
    out = {}
    for sp, n in counts.items():
        parts = [r for j, r in zip(jobs, results) if j[0] == sp]
        if parts:
            out[sp] = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        else:
            out[sp] = {key: v[:0] for key, v in _generate_range((sp, 0, 0, None, image_size, seed)).items()}
    return out


def load_tuxscenes(
    split: str,
    *,
    image_size: int = 64,
    seed: int = 0,
    counts: dict[str, int] | None = None,
    transform=None,
    workers: int | None = None,
) -> InMemoryImageDataset:
    """TuxScenes ``split`` ("train", "val", "test"), from the cache or generated once
    (default counts 3,000 / 500 / 1,500)."""
    if split not in _SPLIT_ID:
        raise ValueError(f"TuxScenes split must be 'train', 'val' or 'test', got {split!r}")
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    for sp, n in counts.items():
        if sp not in _SPLIT_ID or int(n) < 0:
            raise ValueError(f"TuxScenes counts must map train/val/test to counts >= 0, got {counts}")
    if split not in counts:
        raise ValueError(f"TuxScenes split {split!r} not in counts {counts}")
    if int(image_size) < 16:
        raise ValueError(f"TuxScenes image_size must be >= 16, got {image_size}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    names = [n for _, n, _ in _all_stamps()]
    key = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "counts": {k: int(v) for k, v in sorted(counts.items())},
        "stamps": names,
        "textures": list(TEXTURES),
    }
    data = cached_generate(
        "tuxscenes", key,
        lambda: generate_tuxscenes(image_size=int(image_size), seed=int(seed), counts=counts, workers=workers),
    )[split]
    ds = InMemoryImageDataset(
        images=data["images"],
        labels=data["labels"],
        masks=data["masks"],
        class_names=CLASS_NAMES,
        multilabel=True,
        transform=transform,
        name=f"tuxscenes/{split}",
        extras={"boxes": data["boxes"], "box_labels": data["box_labels"], "identity": data["identities"]},
    )
    ds.identity_names = names
    return ds


@register_dataset("tuxscenes")
def _build(split, *, root=None, image_size=None, seed=0, counts=None, transform=None, workers=None):
    return load_tuxscenes(split, image_size=image_size or 64, seed=seed, counts=counts, transform=transform,
                          workers=workers)
