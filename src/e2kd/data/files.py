"""Datasets of image files on disk, loaded one sample at a time with PIL."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "FileImageDataset", "read_image", "list_images", "scan_images", "warn_skipped"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image(path: str | Path, *, mode: str = "RGB") -> torch.Tensor:
    """Read an image file as uint8 (C, H, W).

    Raises
    ------
    ValueError
        Naming the file when it is truncated, corrupt or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"cannot read image {path} ({err}): the file is truncated, corrupt or not an image; "
            "replace or delete it"
        ) from err
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def scan_images(folder: Path, *, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(image files, other files) of ``folder``, sorted; hidden files are ignored."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in it if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def warn_skipped(skipped: Sequence[Path], where: str) -> None:
    """One warning that counts the non-image files left out."""
    if skipped:
        warnings.warn(
            f"{where}: skipped {len(skipped)} non-image file(s) (e.g. {skipped[0].name!r}); "
            f"image extensions are {', '.join(IMAGE_EXTENSIONS)}",
            stacklevel=3,
        )


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
