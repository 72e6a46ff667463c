"""ImageFolder / ImageNet and SUN397 on disk (for users who have the data).

- ``imagefolder`` / ``imagenet``: ``root/<split>/<class>/<image>`` (the ImageNet layout after
  the usual validation-set script); classes are the sorted sub-folder names. Files that are
  not images are skipped with one warning that counts them; an unreadable image is an error
  naming the file when it is loaded.
- ``sun397``: the official layout ``root/ClassName.txt`` (lines like ``/a/abbey``) and images
  under ``root/a/abbey/``; split "all" is every listed image (the paper's unrelated
  distillation set), "train" / "test" follow ``root/Partitions/Training_<NN>.txt`` /
  ``Testing_<NN>.txt`` (``partition=1`` to 10).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._registry import register_dataset
from .files import FileImageDataset, scan_images, warn_skipped

__all__ = ["image_folder", "sun397"]


def _need_root(name, root):
    if root is None:
        raise ValueError(f"{name} reads data from disk: pass root= the dataset folder")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: folder {root} does not exist")
    return root


def image_folder(root, split: str | None, *, image_size=None, transform=None, name="imagefolder") -> FileImageDataset:
    """``root/<split>/<class>/*`` (or ``root/<class>/*`` when ``split`` is None)."""
    base = _need_root(name, root)
    folder = base / split if split else base
    if not folder.is_dir():
        subs = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise FileNotFoundError(f"{name}: split folder {folder} not found (sub-folders of {base}: {subs})")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{name}: no class folders in {folder}; expected {folder}/<class>/<image>")
    paths, labels, skipped = [], [], []
    for c, cls in enumerate(classes):
        imgs, other = scan_images(folder / cls)
        paths += imgs
        labels += [c] * len(imgs)
        skipped += other
    warn_skipped(skipped, f"{name} {folder}")
    if not paths:
        raise FileNotFoundError(f"{name}: no images in {folder}/<class>/")
    return FileImageDataset(
        paths=paths, labels=torch.tensor(labels), class_names=classes, image_size=image_size,
        transform=transform, name=f"{name}/{split}" if split else name,
    )


@register_dataset("imagefolder")
def _build_imagefolder(split, *, root=None, image_size=None, seed=0, transform=None):
    return image_folder(root, split, image_size=image_size, transform=transform)


@register_dataset("imagenet")
def _build_imagenet(split, *, root=None, image_size=None, seed=0, transform=None):
    # ImageNet's labelled evaluation set is "val"; "test" is accepted as its name here.
    split = "val" if split == "test" else split
    return image_folder(root, split, image_size=image_size or 224, transform=transform, name="imagenet")


def sun397(root, split: str = "all", *, partition: int = 1, image_size=None, transform=None) -> FileImageDataset:
    """SUN397 from its official layout (see the module docstring)."""
    base = _need_root("sun397", root)
    names_file = base / "ClassName.txt"
    if not names_file.is_file():
        raise FileNotFoundError(f"sun397: {names_file} not found; root must be the SUN397 folder holding ClassName.txt")
    keys = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    index = {k: c for c, k in enumerate(keys)}
    class_names = [k.strip("/").split("/", 1)[1].replace("/", "_") for k in keys]
    if split == "all":
        rel, skipped = [], []
        for k in keys:
            imgs, other = scan_images(base / k.strip("/"))
            rel += ["/" + p.relative_to(base).as_posix() for p in imgs]
            skipped += other
        warn_skipped(skipped, f"sun397 {base}")
    elif split in ("train", "test"):
        if not 1 <= int(partition) <= 10:
            raise ValueError(f"sun397 partition must be 1..10, got {partition}")
        part = base / "Partitions" / f"{'Training' if split == 'train' else 'Testing'}_{int(partition):02d}.txt"
        if not part.is_file():
            raise FileNotFoundError(f"sun397: {part} not found; split 'all' needs no partition files")
        rel = [ln.strip() for ln in part.read_text().splitlines() if ln.strip()]
    else:
        raise ValueError(f"sun397 split must be 'all', 'train' or 'test', got {split!r}")
    paths, labels = [], []
    for r in rel:
        key = r.rsplit("/", 1)[0]
        if key not in index:
            raise ValueError(f"sun397: {r} is in no class of ClassName.txt")
        paths.append(base / r.lstrip("/"))
        labels.append(index[key])
    return FileImageDataset(paths=paths, labels=torch.tensor(labels), class_names=class_names,
                            image_size=image_size, transform=transform, name=f"sun397/{split}")


@register_dataset("sun397")
def _build_sun397(split, *, root=None, image_size=None, seed=0, partition=1, transform=None):
    return sun397(root, split, partition=partition, image_size=image_size or 224, transform=transform)
