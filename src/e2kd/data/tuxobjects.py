"""TuxObjects: real object photos for an ImageNet teacher, split into unrelated and target images.

The photographic stamps of ``tuxpaint-stamps-default`` (alpha = exact mask; drawings and toys
left out) are pasted onto GIMP / scikit-image textures with random size, position and flip,
one object per image. They are split by *kind* of object:

- ``train``: the distillation images, man-made things and signs only (vehicles, household
  objects, clothes, sports gear, letters, coins, …: every stamp outside the three natural
  folders); ``counts["train"]`` images, each of a stamp drawn at random.
- ``val`` / ``test``: natural things only (the ``animals``, ``food`` and ``plants`` folders),
  never seen in ``train``. Those stamps are split by identity, about 30 % to ``val`` and the
  rest to ``test`` (chosen from the seed); each stamp is rendered ``renders`` times per split.

So a student distilled on ``train`` never sees an image of the kind it is scored on: the
paper's "distil an ImageNet teacher with SUN397 images" (Table 2) with a real ImageNet teacher
(the pretrained ``efficientnet_lite0``) and real photos.

The images carry **no class labels**: the label space is ImageNet's 1000 classes (names from
torchvision) and every label is ``-1`` ("no label"), so evaluation reports agreement with the
teacher and explanation similarity, never accuracy. ``mask`` is exactly the pixels the object
changed; ``identity`` indexes ``identity_names`` (``<folder>/<stem>``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ._registry import register_dataset
from .base import InMemoryImageDataset, square_size
from .cache import cached_generate
from .stamps import STAMPS_DIR, STAMPS_HINT, load_stamp, load_texture, paste_at_random, texture_canvas
from .tuxbirds import LAND_TEXTURES, WATER_TEXTURES

__all__ = ["NATURAL_FOLDERS", "GENERATOR_VERSION", "load_tuxobjects", "object_split", "imagenet_class_names"]

GENERATOR_VERSION = 1
NATURAL_FOLDERS = ("animals", "food", "plants")
TEXTURES = LAND_TEXTURES + WATER_TEXTURES
DEFAULT_COUNTS = {"train": 6000}
DEFAULT_RENDERS = 4
VAL_FRACTION = 0.3
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}
_SKIP = {"cartoon", "plastic", "toys"}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (shipped inside torchvision)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def _all_photos() -> list[str]:
    """Every photographic PNG stamp as ``<folder>/.../<stem>.png`` relative to the stamp root."""
    if not STAMPS_DIR.is_dir():
        raise FileNotFoundError(f"stamp folder {STAMPS_DIR} not found. {STAMPS_HINT}")
    rel = sorted(
        str(p.relative_to(STAMPS_DIR)) for p in STAMPS_DIR.glob("**/*.png") if not _SKIP & set(p.relative_to(STAMPS_DIR).parts)
    )
    if not rel:
        raise FileNotFoundError(f"no PNG stamps under {STAMPS_DIR}. {STAMPS_HINT}")
    return rel


def object_split(seed: int) -> dict[str, list[str]]:
    """Stamp paths (relative to the stamp root) per split: ``train`` = every non-natural
    photo; ``val`` / ``test`` = the natural photos, split by identity from ``seed``."""
    photos = _all_photos()
    natural = [p for p in photos if p.split("/", 1)[0] in NATURAL_FOLDERS]
    other = [p for p in photos if p.split("/", 1)[0] not in NATURAL_FOLDERS]
    if not natural or not other:
        raise FileNotFoundError(f"stamps under {STAMPS_DIR} lack natural or man-made photos. {STAMPS_HINT}")
    rng = np.random.Generator(np.random.PCG64([int(seed), 11]))
    perm = [natural[i] for i in rng.permutation(len(natural))]
    n_val = max(1, round(VAL_FRACTION * len(natural)))
    return {"train": other, "val": sorted(perm[:n_val]), "test": sorted(perm[n_val:])}


def _render(i: int, split: str, stamp_path: str, size: int, seed: int):
    rng = np.random.Generator(np.random.PCG64([int(seed), 100 + _SPLIT_ID[split], int(i)]))
    tex = load_texture(TEXTURES[int(rng.integers(len(TEXTURES)))], size / 128)
    canvas = (texture_canvas(tex, size, rng) * 255).round_().div_(255)
    return paste_at_random(canvas, load_stamp(str(STAMPS_DIR / stamp_path)), rng, (0.5, 0.85))


def _sources(split: str, paths: list[str], count: int, seed: int) -> list[int]:
    """Index into ``paths`` of the stamp shown in each image of the split."""
    if split == "train":
        rng = np.random.Generator(np.random.PCG64([int(seed), 12]))
        return [int(k) for k in rng.integers(len(paths), size=count)]
    return [k for k in range(len(paths)) for _ in range(count)]


def _generate_range(args):
    split, lo, hi, paths, sources, size, seed = args
    n = hi - lo
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    masks = torch.empty((n, 1, size, size), dtype=torch.uint8)
    for j, i in enumerate(range(lo, hi)):
        img, m = _render(i, split, paths[sources[i]], size, seed)
        images[j] = img.mul_(255).round_().to(torch.uint8)
        masks[j, 0] = m
    return images, masks


def _generate(split: str, paths: list[str], sources: list[int], size: int, seed: int, workers: int) -> dict:
    n = len(sources)
    step = max(1, -(-n // max(1, workers * 4)))
    jobs = [(split, lo, min(n, lo + step), paths, sources, size, seed) for lo in range(0, n, step)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            parts = pool.map(_generate_range, jobs)
    else:
        parts = [_generate_range(j) for j in jobs]
    if parts:
        images, masks = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    else:
        images = torch.zeros((0, 3, size, size), dtype=torch.uint8)
        masks = torch.zeros((0, 1, size, size), dtype=torch.uint8)
    return {split: {"images": images, "masks": masks, "identities": torch.tensor(sources, dtype=torch.long)}}


def load_tuxobjects(
    split: str,
    *,
    image_size: int = 96,
    seed: int = 0,
    counts: dict[str, int] | None = None,
    renders: int = DEFAULT_RENDERS,
    transform=None,
    workers: int | None = None,
) -> InMemoryImageDataset:
    """TuxObjects ``split`` ("train", "val", "test"), from the cache or generated once.

    ``counts["train"]``: distillation images (default 6,000); ``renders``: images per natural
    stamp in ``val`` and ``test`` (default 4); ``workers``: processes used to generate
    (default: up to 2; the data do not depend on it).
    """
    if split not in _SPLIT_ID:
        raise ValueError(f"TuxObjects split must be 'train', 'val' or 'test', got {split!r}")
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    if set(counts) - {"train"} or any(int(v) < 1 for v in counts.values()):
        raise ValueError(f"TuxObjects counts take only 'train' (images >= 1), got {counts}; val/test size is set by renders")
    if int(renders) < 1:
        raise ValueError(f"TuxObjects renders must be >= 1, got {renders}")
    if int(image_size) < 16:
        raise ValueError(f"TuxObjects image_size must be >= 16, got {image_size}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    paths = object_split(seed)[split]
    count = int(counts["train"]) if split == "train" else int(renders)
    sources = _sources(split, paths, count, seed)
    key = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "split": split,
        "count": count,
        "stamps": paths,
        "textures": list(TEXTURES),
    }
    data = cached_generate(
        "tuxobjects", key, lambda: _generate(split, paths, sources, int(image_size), int(seed), workers), part=split
    )[split]
    n = data["images"].shape[0]
    ds = InMemoryImageDataset(
        images=data["images"],
        labels=torch.full((n,), -1, dtype=torch.long),
        masks=data["masks"],
        class_names=imagenet_class_names(),
        transform=transform,
        name=f"tuxobjects/{split}",
        extras={"identity": data["identities"]},
    )
    ds.identity_names = [p[: -len(".png")] for p in paths]
    return ds


@register_dataset("tuxobjects")
def _build(split, *, root=None, image_size=None, seed=0, counts=None, renders=DEFAULT_RENDERS, transform=None, workers=None):
    return load_tuxobjects(
        split,
        image_size=square_size(image_size, "TuxObjects", 96),
        seed=seed,
        counts=counts,
        renders=renders,
        transform=transform,
        workers=workers,
    )
