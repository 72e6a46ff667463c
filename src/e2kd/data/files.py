"""Datasets of image files on disk, loaded one sample at a time with PIL."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "FileImageDataset", "read_image", "list_images", "scan_images", "warn_skipped"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image(path: str | Path, *, mode: str = "RGB") -> torch.Tensor:
    """Read an image file as uint8 (C, H, W).

    Grey images of more than 8 bits are scaled to 8 bits before the conversion to ``mode``
    (PIL's own conversion would clip them, so most pixels would read as white): 16-bit
    (modes ``I;16*``) as ``round(v · 255 / 65535)``; 32-bit integer (mode ``I``, what 16-bit
    PNG and TIFF files may open as) the same way when every value lies in 0..65535; 32-bit
    float (mode ``F``) as ``round(v · 255)`` when every value lies in [0, 1].

    Raises
    ------
    ValueError
        Naming the file when it is truncated, corrupt or not an image, or when a 32-bit image
        holds values outside the ranges above.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                src_mode, arr = im.mode, np.asarray(im)
            else:
                src_mode, arr = None, np.asarray(im.convert(mode), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"cannot read image {path} ({err}): the file is truncated, corrupt or not an image; "
            "replace or delete it"
        ) from err
    if src_mode is not None:
        grey = _deep_grey_to_uint8(arr, src_mode, path)
        arr = grey if mode == "L" else np.asarray(Image.fromarray(grey, mode="L").convert(mode), dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _deep_grey_to_uint8(arr: np.ndarray, src_mode: str, path) -> np.ndarray:
    """A grey image of PIL mode ``I;16*``, ``I`` or ``F`` scaled to uint8 (see read_image)."""
    if src_mode == "F":
        a = arr.astype(np.float64)
        if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 1)):
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 0.0)
            raise ValueError(
                f"cannot read image {path}: a 32-bit float image must hold values in [0, 1] "
                f"(this one spans {lo:g} .. {hi:g}); save it as an 8- or 16-bit image"
            )
        return np.rint(a * 255.0).astype(np.uint8)
    a = arr.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError(
            f"cannot read image {path}: a 32-bit integer image must hold 16-bit values 0..65535 "
            f"(this one spans {int(a.min())} .. {int(a.max())}); save it as an 8- or 16-bit image"
        )
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def scan_images(folder: Path, *, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(image files, other files) of ``folder``, sorted; hidden files are ignored. Broken
    symbolic links are among the other files (so :func:`warn_skipped` counts them)."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(
        p for p in it if not p.name.startswith(".") and (p.is_file() or (p.is_symlink() and not p.exists()))
    )
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p.exists()]
    keep = set(images)
    return images, [p for p in files if p not in keep]


def warn_skipped(skipped: Sequence[Path], where: str) -> None:
    """One warning that counts the files left out: non-image files, and broken symbolic links
    (named apart, with their missing targets)."""
    if not skipped:
        return
    broken = [p for p in skipped if p.is_symlink() and not p.exists()]
    gone = set(broken)
    other = [p for p in skipped if p not in gone]
    parts = []
    if other:
        parts.append(
            f"{len(other)} non-image file(s) (e.g. {other[0].name!r}; image extensions are {', '.join(IMAGE_EXTENSIONS)})"
        )
    if broken:
        shown = ", ".join(f"{p} -> {os.readlink(p)}" for p in broken[:3])
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        parts.append(f"{len(broken)} broken symbolic link(s) whose target does not exist ({shown}{more}); fix or delete them")
    warnings.warn(f"{where}: skipped {' and '.join(parts)}", stacklevel=3)


def list_images(folder: Path, *, recursive: bool = False, what: str = "") -> list[Path]:
    """Image files of ``folder`` (sorted); other files are skipped with one warning that
    counts them."""
    images, skipped = scan_images(folder, recursive=recursive)
    warn_skipped(skipped, what or str(folder))
    return images


def resize_center_crop(img: torch.Tensor, size: int | tuple[int, int] | None, *, crop: bool) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, S, S): shorter side to S·8/7 then a centre crop of S (the
    usual ImageNet evaluation view) when ``crop``, else a direct resize to S x S."""
    from torchvision.transforms.v2 import functional as TF

    if size is None:
        return img
    sh, sw = (size, size) if isinstance(size, int) else size
    if not crop:
        return TF.resize(img, [sh, sw], antialias=True)
    short = round(min(sh, sw) * 8 / 7)
    img = TF.resize(img, short, antialias=True)
    return TF.center_crop(img, [sh, sw])


class FileImageDataset(torch.utils.data.Dataset):
    """Images read from files on access; the sample-dict convention of :mod:`e2kd.data`.

    Parameters
    ----------
    paths : image files
    labels : long (N,) or float (N, num_classes) multi-hot when ``multilabel``
    class_names : sequence of str
    groups, group_names : optional group ids (N,) and their names
    image_size : int or (H, W); None keeps each file's size (then batches need equal sizes)
    crop : resize the shorter side and centre-crop (True) or resize to the square (False)
    transform : callable(sample dict) -> sample dict, optional
    mask_fn : callable(i, (H0, W0)) -> float (K, H0, W0) mask in the original image frame,
        optional; resized like the image, nearest
    """

    def __init__(
        self,
        *,
        paths: Sequence[Path],
        labels: torch.Tensor,
        class_names: Sequence[str],
        groups: Optional[torch.Tensor] = None,
        group_names: Optional[Sequence[str]] = None,
        multilabel: bool = False,
        image_size=None,
        crop: bool = True,
        transform: Optional[Callable[[dict], dict]] = None,
        mask_fn: Optional[Callable[[int, tuple[int, int]], torch.Tensor]] = None,
        name: str = "files",
    ) -> None:
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} files but {labels.shape[0]} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = labels.float() if multilabel else labels.long()
        self.class_names = list(class_names)
        self.groups = groups.long() if groups is not None else None
        self.group_names = list(group_names) if group_names is not None else None
        self.multilabel = bool(multilabel)
        self.image_size = image_size
        self.crop = crop
        self.transform = transform
        self.mask_fn = mask_fn
        self.name = name
        self._rows = torch.arange(len(self.paths))
        self.source_indices: Optional[torch.Tensor] = None

    num_classes = property(lambda self: len(self.class_names))
    in_chans = 3

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(H, W) of every sample, or None when images keep their own sizes."""
        if self.image_size is None:
            return None
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    def __len__(self) -> int:
        return len(self._rows)

    def targets(self) -> torch.Tensor:
        return self.labels[self._rows]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        row = int(self._rows[i])
        img = read_image(self.paths[row])
        sample = {"label": self.labels[row].clone(), "index": torch.tensor(i, dtype=torch.long)}
        if self.mask_fn is not None:
            m = self.mask_fn(row, tuple(img.shape[-2:]))
            stacked = torch.cat([img.float(), m.float() * 255], 0)
            out = resize_center_crop(stacked, self.image_size, crop=self.crop)
            # Masks are resized with the image, then re-binarised (nearest would need a second pass).
            sample["mask"] = (out[3:] >= 127.5).float()
            img = out[:3].round().clamp(0, 255).to(torch.uint8)
        else:
            img = resize_center_crop(img, self.image_size, crop=self.crop)
        sample["image"] = img.float().div_(255.0)
        if self.groups is not None:
            sample["group"] = self.groups[row].clone()
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def subset(self, indices, *, name: str | None = None) -> "FileImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        sub = object.__new__(type(self))
        sub.__dict__.update(self.__dict__)
        sub._rows = self._rows[idx]
        sub.name = name or self.name
        sub.source_indices = idx.clone() if self.source_indices is None else self.source_indices[idx]
        return sub

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, num_classes={self.num_classes})"
