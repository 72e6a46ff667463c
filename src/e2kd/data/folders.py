"""ImageFolder / ImageNet and SUN397 on disk (for users who have the data).

- ``imagefolder`` / ``imagenet``: ``root/<split>/<class>/<image>`` (the ImageNet layout after
  the usual validation-set script); classes are the sorted sub-folder names (hidden ones
  left out). A class folder without images is an error naming it (an empty folder, or an
  archive's leftover ``__MACOSX`` holding only hidden files, would otherwise be a class).
  Files that are not images, files beside the class folders and broken symbolic links are
  skipped with one warning that counts them; an unreadable image is an error naming the file
  when it is loaded.
- ``sun397``: the official layout ``root/ClassName.txt`` (lines like ``/a/abbey``; the leading
  ``/`` may be left out, here and in the partition files) and images under ``root/a/abbey/``;
  split "all" is every listed image (the paper's unrelated distillation set) and needs every
  listed class folder, "train" / "test" follow ``root/Partitions/Training_<NN>.txt`` /
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
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    classes = [p.name for p in entries if p.is_dir()]
    if not classes:
        raise FileNotFoundError(f"{name}: no class folders in {folder}; expected {folder}/<class>/<image>")
    # Files beside the class folders (and broken links) belong to no class: counted in the warning.
    paths, labels, skipped = [], [], [p for p in entries if not p.is_dir()]
    empty = []
    for c, cls in enumerate(classes):
        imgs, other = scan_images(folder / cls)
        if not imgs:
            empty.append(cls)
        paths += imgs
        labels += [c] * len(imgs)
        skipped += other
    if empty:
        raise FileNotFoundError(
            f"{name}: {len(empty)} class folder(s) of {folder} hold no images: {empty[:10]}"
            f"{f' and {len(empty) - 10} more' if len(empty) > 10 else ''}. Every sub-folder is a class, so an "
            "empty one would be a class without images (and would shift the labels of the classes after it); "
            "delete these folders (e.g. an archive's leftover __MACOSX) or put their images in them"
        )
    warn_skipped(skipped, f"{name} {folder}")
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
    # Keys are normalised to "/a/abbey" (a ClassName.txt or partition file written without the
    # leading "/" means the same classes).
    keys = []
    for line, ln in enumerate(names_file.read_text().splitlines(), start=1):
        k = ln.strip().strip("/")
        if not k:
            continue
        if "/" not in k:
            raise ValueError(
                f"sun397: {names_file} line {line} is {ln.strip()!r}; each line names a class folder as "
                "/<letter>/<class> (e.g. /a/abbey)"
            )
        keys.append("/" + k)
    if not keys:
        raise ValueError(f"sun397: {names_file} lists no classes; expected lines like /a/abbey")
    index = {k: c for c, k in enumerate(keys)}
    if len(index) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"sun397: {names_file} lists classes more than once: {dup[:10]}; list each class once")
    class_names = [k.strip("/").split("/", 1)[1].replace("/", "_") for k in keys]
    if split == "all":
        missing = [k for k in keys if not (base / k.lstrip("/")).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"sun397: {len(missing)} of the {len(keys)} class folders listed in {names_file} are missing under "
                f"{base}: {[str(base / k.lstrip('/')) for k in missing[:5]]}"
                f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}; unpack the whole SUN397 archive "
                "into root (or list only the classes present in ClassName.txt)"
            )
        rel, skipped = [], []
        for k in keys:
            imgs, other = scan_images(base / k.lstrip("/"))
            rel += ["/" + p.relative_to(base).as_posix() for p in imgs]
            skipped += other
        warn_skipped(skipped, f"sun397 {base}")
    elif split in ("train", "test"):
        if not 1 <= int(partition) <= 10:
            raise ValueError(f"sun397 partition must be 1..10, got {partition}")
        part = base / "Partitions" / f"{'Training' if split == 'train' else 'Testing'}_{int(partition):02d}.txt"
        if not part.is_file():
            raise FileNotFoundError(f"sun397: {part} not found; split 'all' needs no partition files")
        rel = ["/" + ln.strip().lstrip("/") for ln in part.read_text().splitlines() if ln.strip()]
    else:
        raise ValueError(f"sun397 split must be 'all', 'train' or 'test', got {split!r}")
    paths, labels = [], []
    for r in rel:
        key = r.rsplit("/", 1)[0]
        if key not in index:
            raise ValueError(
                f"sun397: {r} is in no class of {names_file} (its folder {key} is not listed there; "
                f"listed e.g. {keys[:3]}); use the ClassName.txt that came with the partition files"
            )
        paths.append(base / r.lstrip("/"))
        labels.append(index[key])
    return FileImageDataset(paths=paths, labels=torch.tensor(labels), class_names=class_names,
                            image_size=image_size, transform=transform, name=f"sun397/{split}")


@register_dataset("sun397")
def _build_sun397(split, *, root=None, image_size=None, seed=0, partition=1, transform=None):
    return sun397(root, split, partition=partition, image_size=image_size or 224, transform=transform)
