"""TuxBirds: a Waterbirds-style benchmark (Sagawa et al., ICLR 2020) made of real bird photos.

The bird photos of ``tuxpaint-stamps-default`` (alpha = exact mask) are pasted onto water
backgrounds (GIMP water and sky patterns) or land backgrounds (GIMP wood, stone and plant
patterns; scikit-image grass, gravel and brick) with random size, position and flip.

- label ``y``: 0 = land bird, 1 = water bird
- place: 0 = land background, 1 = water background
- group = 2·y + place: 0 land bird on land, 1 land bird on water, 2 water bird on land,
  3 water bird on water (the Waterbirds numbering)

Splits are by bird identity: about 30 % of the water birds and of the land birds (chosen from
the seed) appear only in "test"; "train" and "val" use the others.

- ``train`` (the distillation split) is 100 % correlated: image i has y = i mod 2 and
  place = y, so half the images are group 0 and half group 3.
- ``val`` and ``test`` hold all four groups equally: image i is in group i mod 4.

Every sample has ``mask`` (1, S, S), exactly the pixels the bird changed, ``group`` and
``identity`` (index into ``identity_names``). Images are generated at the requested
``image_size`` (no resampling afterwards) and cached (:func:`e2kd.data.cache.cached_generate`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ._registry import register_dataset
from .base import InMemoryImageDataset, square_size
from .cache import cached_generate
from .stamps import load_stamp, load_texture, paste_at_random, stamp_paths, texture_canvas

__all__ = ["WATER_BIRDS", "WATER_TEXTURES", "LAND_TEXTURES", "GENERATOR_VERSION", "generate_tuxbirds", "load_tuxbirds", "render_tuxbirds_image", "bird_split"]

GENERATOR_VERSION = 2
CLASS_NAMES = ["landbird", "waterbird"]
GROUP_NAMES = ["landbird_on_land", "landbird_on_water", "waterbird_on_land", "waterbird_on_water"]
WATER_BIRDS = frozenset({
    "crowned_crane", "drake", "duck", "gander", "heron_greatblue", "heron_greatblue_flying",
    "little-penguin", "magellanic_penguin", "pelican", "penguin", "pink_flamingo", "seagull",
    "silver-gull",
})
WATER_TEXTURES = ("Water/pool.pat", "Water/rain.pat", "Water/ice.pat", "Sky/sky.pat")
LAND_TEXTURES = (
    "Wood/bark.pat", "Wood/pine.pat", "Wood/walnut.pat", "Wood/wood1.pat", "Wood/wood2.pat",
    "Stone/rock.pat", "Stone/granite1.pat", "Stone/ground1.pat", "Stone/slate.pat",
    "Stone/stone33.pat", "Stone/terra.pat", "Plant/leaves.pat",
    "skimage:grass", "skimage:gravel", "skimage:brick",
)
DEFAULT_COUNTS = {"train": 6000, "val": 1000, "test": 3000}
TEST_FRACTION = 0.3
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}


def bird_split(seed: int) -> dict[str, list[str]]:
    """Bird names per identity split: {"train": [...], "test": [...]} (train also serves val)."""
    names = [p.stem for p in stamp_paths("animals/birds", recursive=False)]
    missing = sorted(WATER_BIRDS - set(names))
    if missing:
        raise FileNotFoundError(f"water-bird stamps missing: {missing}; reinstall tuxpaint-stamps-default")
    rng = np.random.Generator(np.random.PCG64([int(seed), 7]))
    out = {"train": [], "test": []}
    for kind in (sorted(n for n in names if n not in WATER_BIRDS), sorted(WATER_BIRDS)):
        perm = [kind[i] for i in rng.permutation(len(kind))]
        n_test = max(1, round(TEST_FRACTION * len(kind)))
        out["test"] += sorted(perm[:n_test])
        out["train"] += sorted(perm[n_test:])
    return out


def _one_image(i, split, birds_by_y, size, seed, keep_background=False):
    rng = np.random.Generator(np.random.PCG64([int(seed), _SPLIT_ID[split], int(i)]))
    if split == "train":
        y = i % 2
        place = y
    else:
        g = i % 4
        y, place = g // 2, g % 2
    textures = WATER_TEXTURES if place == 1 else LAND_TEXTURES
    tex = load_texture(textures[int(rng.integers(len(textures)))], size / 128)
    canvas = texture_canvas(tex, size, rng)
    canvas = (canvas * 255).round_().div_(255)
    background = canvas.clone() if keep_background else None
    pool = birds_by_y[y]
    ident, path = pool[int(rng.integers(len(pool)))]
    canvas, mask = paste_at_random(canvas, load_stamp(path), rng, (0.45, 0.8))
    if keep_background:
        return canvas, mask, y, 2 * y + place, ident, background
    return canvas, mask, y, 2 * y + place, ident


def _birds_by_y(sp, seed):
    split = bird_split(seed)
    paths = {p.stem: str(p) for p in stamp_paths("animals/birds", recursive=False)}
    ident_of = {n: k for k, n in enumerate(sorted(paths))}
    by_y = {0: [], 1: []}
    for b in split["test"] if sp == "test" else split["train"]:
        by_y[int(b in WATER_BIRDS)].append((ident_of[b], paths[b]))
    return by_y


def render_tuxbirds_image(i: int, split: str, *, seed: int = 0, image_size: int = 64) -> dict:
    """Image ``i`` of ``split`` exactly as the generator makes it, with the background it was
    pasted on (for checking masks): dict of ``image``, ``background`` (3, S, S) float,
    ``mask`` (1, S, S) float, ``label``, ``group``, ``identity``."""
    img, m, y, g, ident, bg = _one_image(int(i), split, _birds_by_y(split, seed), int(image_size), int(seed), True)
    return {"image": img, "background": bg, "mask": m[None].float(), "label": y, "group": g, "identity": ident}


def _generate_range(args):
    sp, lo, hi, by_y, image_size, seed = args
    n = hi - lo
    images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    masks = torch.empty((n, 1, image_size, image_size), dtype=torch.uint8)
    meta = torch.empty((n, 3), dtype=torch.long)
    for j, i in enumerate(range(lo, hi)):
        img, m, y, g, ident = _one_image(i, sp, by_y, image_size, seed)
        images[j] = img.mul_(255).round_().to(torch.uint8)
        masks[j, 0] = m
        meta[j, 0], meta[j, 1], meta[j, 2] = y, g, ident
    return images, masks, meta


def generate_tuxbirds(
    *, image_size: int, seed: int, counts: dict[str, int], workers: int = 1
) -> dict[str, dict[str, torch.Tensor]]:
    """Generate all splits: ``{split: {"images", "masks", "labels", "groups", "identities"}}``.

    Every image has its own random stream (PCG64 of seed, split, index), so the result does
    not depend on ``workers`` (processes used).
    """
    jobs = []
    for sp, n in counts.items():
        by_y = _birds_by_y(sp, seed)
        step = max(1, -(-n // max(1, workers * 4)))
        jobs += [(sp, lo, min(n, lo + step), by_y, image_size, seed) for lo in range(0, n, step)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            results = pool.map(_generate_range, jobs)
    else:
        results = [_generate_range(j) for j in jobs]
    out = {}
    s = image_size
    for sp in counts:
        parts = [r for j, r in zip(jobs, results) if j[0] == sp]
        if parts:
            images = torch.cat([p[0] for p in parts])
            masks = torch.cat([p[1] for p in parts])
            meta = torch.cat([p[2] for p in parts])
        else:
            images, masks = torch.zeros((0, 3, s, s), dtype=torch.uint8), torch.zeros((0, 1, s, s), dtype=torch.uint8)
            meta = torch.zeros((0, 3), dtype=torch.long)
        out[sp] = {
            "images": images,
            "masks": masks,
            "labels": meta[:, 0].clone(),
            "groups": meta[:, 1].clone(),
            "identities": meta[:, 2].clone(),
        }
    return out


def load_tuxbirds(
    split: str,
    *,
    image_size: int = 64,
    seed: int = 0,
    counts: dict[str, int] | None = None,
    transform=None,
    workers: int | None = None,
) -> InMemoryImageDataset:
    """TuxBirds ``split`` ("train", "val", "test"), from the cache or generated once.

    ``counts`` gives the number of images per split (default 6,000 / 1,000 / 3,000);
    ``workers`` the processes used to generate (default: up to 2; the data do not depend
    on it).
    """
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if split not in _SPLIT_ID:
        raise ValueError(f"TuxBirds split must be 'train', 'val' or 'test', got {split!r}")
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    for sp, n in counts.items():
        if sp not in _SPLIT_ID or int(n) < 0:
            raise ValueError(f"TuxBirds counts must map train/val/test to counts >= 0, got {counts}")
    if split not in counts:
        raise ValueError(f"TuxBirds split {split!r} not in counts {counts}")
    if int(image_size) < 16:
        raise ValueError(f"TuxBirds image_size must be >= 16, got {image_size}")
    names = sorted(p.stem for p in stamp_paths("animals/birds", recursive=False))
    key = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "counts": {k: int(v) for k, v in sorted(counts.items())},
        "birds": names,
        "water_textures": list(WATER_TEXTURES),
        "land_textures": list(LAND_TEXTURES),
    }
    data = cached_generate(
        "tuxbirds",
        key,
        lambda: generate_tuxbirds(image_size=int(image_size), seed=int(seed), counts=counts, workers=workers),
        part=split,
    )[split]
    ds = InMemoryImageDataset(
        images=data["images"],
        labels=data["labels"],
        masks=data["masks"],
        groups=data["groups"],
        group_names=GROUP_NAMES,
        class_names=CLASS_NAMES,
        transform=transform,
        name=f"tuxbirds/{split}",
        extras={"identity": data["identities"]},
    )
    ds.identity_names = names
    return ds


@register_dataset("tuxbirds")
def _build(split, *, root=None, image_size=None, seed=0, counts=None, transform=None, workers=None):
    return load_tuxbirds(
        split,
        image_size=square_size(image_size, "TuxBirds", 64),
        seed=seed,
        counts=counts,
        transform=transform,
        workers=workers,
    )
