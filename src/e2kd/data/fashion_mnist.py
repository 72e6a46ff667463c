"""Fashion-MNIST (Xiao et al., 2017) from the Debian package ``dataset-fashion-mnist``.

60,000 training and 10,000 test images, 28x28 grey, 10 classes, 6,000 / 1,000 per class.
The background is exactly 0, so the object mask is ``image > 0``.

Where the files are looked for, in order: ``root`` (a folder with the four IDX ``.gz``
files), ``$E2KD_FASHION_MNIST``, ``/usr/share/datasets/fashion-mnist`` (the Debian package),
the cache folder (a previous torchvision download), and finally a torchvision download into
the cache when the internet is reachable.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import numpy as np
import torch

from ._registry import register_dataset
from .base import InMemoryImageDataset
from .cache import cache_dir
from .idx import read_idx

__all__ = ["FASHION_MNIST_CLASSES", "load_fashion_mnist", "find_fashion_mnist"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = (
    "Install the Debian package with `sudo apt-get install dataset-fashion-mnist` "
    "(or `make install`, which runs scripts/install-system-deps.sh), or pass root= a folder "
    "holding the four IDX .gz files."
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _has_files(d: Path) -> bool:
    return all((d / f"{f}.gz").is_file() or (d / f).is_file() for pair in _FILES.values() for f in pair)


def _internet(host: str = "fashion-mnist.s3-website.eu-central-1.amazonaws.com", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 80), timeout=timeout):
            return True
    except OSError:
        return False


def find_fashion_mnist(root: str | Path | None = None, *, download: bool = True) -> Path:
    """The folder holding the Fashion-MNIST IDX files.

    Raises
    ------
    FileNotFoundError
        Naming ``apt-get install dataset-fashion-mnist`` when no copy exists and none can
        be downloaded.
    """
    if root is not None:
        root = Path(root)
        if _has_files(root):
            return root
        raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {root}. {INSTALL_HINT}")
    candidates = [Path(p) for p in [os.environ.get("E2KD_FASHION_MNIST")] if p]
    tv_dir = cache_dir() / "torchvision" / "FashionMNIST" / "raw"
    candidates += [DEBIAN_DIR, tv_dir]
    for d in candidates:
        if _has_files(d):
            return d
    if download and _internet():
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(cache_dir() / "torchvision"), train=train, download=True)
        if _has_files(tv_dir):
            return tv_dir
    raise FileNotFoundError(
        f"Fashion-MNIST not found (looked in {', '.join(str(c) for c in candidates)}) and the "
        f"torchvision download is not possible here. {INSTALL_HINT}"
    )


@functools.lru_cache(maxsize=4)
def _load_arrays(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(folder)
    out = []
    for stem in _FILES[split]:
        p = d / f"{stem}.gz"
        if not p.is_file():
            p = d / stem
        out.append(read_idx(p, fix=f"Reinstall it: {INSTALL_HINT}"))
    images, labels = out
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: Fashion-MNIST {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.max() >= 10:
        raise ValueError(f"{d}: Fashion-MNIST labels must be 0..9, found {labels.max()}")
    return images, labels


def load_fashion_mnist(
    split: str, *, root=None, image_size=None, download: bool = True, transform=None
) -> InMemoryImageDataset:
    """Fashion-MNIST ``split`` ("train" or "test") as an :class:`InMemoryImageDataset`.

    Samples carry ``mask`` (1, H, W) = ``image > 0`` (the object; the background is 0).
    """
    if split not in _FILES:
        raise ValueError(
            f"Fashion-MNIST split must be 'train' or 'test', got {split!r}; for a validation split "
            "held out of train use build_dataset(..., 'val', val_per_class=n)"
        )
    folder = find_fashion_mnist(root, download=download)
    images, labels = _load_arrays(str(folder), split)
    x = torch.from_numpy(images).unsqueeze(1)
    return InMemoryImageDataset(
        images=x,
        labels=torch.from_numpy(labels.astype(np.int64)),
        masks=(x > 0).to(torch.uint8),
        class_names=FASHION_MNIST_CLASSES,
        image_size=image_size,
        transform=transform,
        name=f"fashion_mnist/{split}",
    )


@register_dataset("fashion_mnist")
def _build(split, *, root=None, image_size=None, seed=0, download=True, transform=None):
    return load_fashion_mnist(split, root=root, image_size=image_size, download=download, transform=transform)
