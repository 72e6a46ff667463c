"""Joint augmentation: one random geometric transform for everything a sample carries.

The frozen-explanation setting of the paper (Parchami-Araghi et al., ECCV 2024, Sec. 4)
stores the teacher's explanation of the whole image once and, during distillation, applies
the *same* geometric augmentation (random resized crop, horizontal flip) to the image and to
its stored map; photometric augmentations change the image only.

Two implementations with the same parameters:

- :class:`JointTransform` works on one sample dict with ``torchvision.transforms.v2``
  functionals and ``tv_tensors``: the image is an ``Image`` (bilinear, antialiased), masks are
  ``Mask`` (nearest), boxes are ``BoundingBoxes`` (moved with the crop/flip), and float maps
  (explanations) are resampled **bilinearly** as plain tensors (a map is not a label mask).
- :class:`BatchAugment` does the same on a whole batch at once with ``affine_grid`` /
  ``grid_sample`` (the fast path for in-memory datasets).

A geometric draw is a crop box in relative coordinates plus a flip flag, so it applies to
tensors of any resolution (e.g. a 7x7 map of a 224x224 image). :class:`JointTransform`
rounds the box to the image's pixels; a map or mask at another resolution is then sampled
at the relative positions of that same box (never a box rounded on its own coarse grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["CropFlip", "sample_crop_flip", "JointTransform", "BatchAugment", "warp"]


@dataclass(frozen=True)
class CropFlip:
    """A geometric draw: crop box ``(top, left, height, width)`` as fractions of the input
    size, then an optional horizontal flip."""

    top: float
    left: float
    height: float
    width: float
    flip: bool

    def pixels(self, h: int, w: int) -> tuple[int, int, int, int]:
        """The crop box in pixels for an input of size (h, w)."""
        top, left = round(self.top * h), round(self.left * w)
        ch, cw = max(1, round(self.height * h)), max(1, round(self.width * w))
        return top, left, min(ch, h - top), min(cw, w - left)


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def sample_crop_flip(
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> CropFlip:
    """Draw a random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``,
    log-uniform) and a flip with probability ``flip_p``, from ``generator``."""
    g = generator
    for _ in range(10):
        area = _uniform(g, *scale)
        r = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(area * r), math.sqrt(area / r)
        if w <= 1.0 and h <= 1.0:
            break
    else:
        w = h = math.sqrt(scale[1]) if scale[1] <= 1 else 1.0
    top, left = _uniform(g, 0.0, 1.0 - h), _uniform(g, 0.0, 1.0 - w)
    flip = float(torch.rand((), generator=g)) < flip_p
    return CropFlip(top, left, h, w, flip)


def _out_size(size, h, w, ref_h, ref_w):
    # A tensor at another resolution than the image keeps its relative resolution.
    if size is None:
        return [h, w]
    sh, sw = (size, size) if isinstance(size, int) else size
    return [max(1, round(sh * h / ref_h)), max(1, round(sw * w / ref_w))]


def _crop_relative(x: torch.Tensor, box, ref_size, size, *, nearest: bool) -> torch.Tensor:
    """Resized crop of ``x`` (K, h, w), a map or mask at another resolution than the image
    (ref_h, ref_w), by the image's pixel crop box, in relative coordinates.

    Rounding the box on the coarse grid of ``x`` would misplace it (a 7x7 map of a 224x224
    image: a crop starting at image column 16 would start at map column 0, 16 image pixels
    off). Instead each output cell samples ``x`` at the relative position of its centre
    (``grid_sample``, ``align_corners=False``, edge values beyond the outermost centres), so
    the identity box returns ``x`` unchanged. Where an output cell covers more than one cell
    of ``x``, it averages k x k bilinear samples (k = the covered cells, rounded up); masks
    take one nearest sample.
    """
    (top, left, ch, cw), (ref_h, ref_w) = box, ref_size
    h, w = x.shape[-2:]
    out_h, out_w = size
    ky = 1 if nearest else max(1, math.ceil(ch / ref_h * h / out_h - 1e-6))
    kx = 1 if nearest else max(1, math.ceil(cw / ref_w * w / out_w - 1e-6))
    theta = torch.tensor([[[cw / ref_w, 0.0, (2 * left + cw) / ref_w - 1],
                           [0.0, ch / ref_h, (2 * top + ch) / ref_h - 1]]])
    dtype = x.dtype
    y = warp(x[None].float(), theta, mode="nearest" if nearest else "bilinear", size=(out_h * ky, out_w * kx),
             padding_mode="border")
    if ky > 1 or kx > 1:
        y = F.avg_pool2d(y, (ky, kx))
    return y[0].to(dtype)


class JointTransform:
    """Random resized crop + flip applied identically to image, mask, boxes and maps;
    brightness/contrast jitter to the image only.

    Parameters
    ----------
    size : int or (H, W), output size of the image; None keeps the input size
    scale, ratio : range of the crop's area fraction and aspect ratio; ``scale=(1, 1)`` and
        ``ratio=(1, 1)`` disable cropping
    flip_p : probability of a horizontal flip
    brightness, contrast : jitter strength b: factors drawn uniformly in [1 - b, 1 + b]
    map_keys : keys of float maps (explanations) resampled bilinearly, e.g. ("teacher_maps",)
    image_interpolation : "bilinear" (default) or "nearest" (for exact pixel checks)

    Call with a sample dict holding ``image`` (C, H, W) and optionally ``mask`` (K, H, W),
    ``boxes`` (N, 4) xyxy in pixels and the map keys; other keys pass through. ``generator``
    (a torch.Generator) makes the draw reproducible.
    """

    def __init__(
        self,
        *,
        size: int | tuple[int, int] | None = None,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        brightness: float = 0.0,
        contrast: float = 0.0,
        map_keys: Sequence[str] = ("teacher_maps",),
        image_interpolation: str = "bilinear",
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if image_interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"image_interpolation must be 'bilinear' or 'nearest', got {image_interpolation!r}")
        self.size, self.scale, self.ratio, self.flip_p = size, scale, ratio, flip_p
        self.brightness, self.contrast = brightness, contrast
        self.map_keys = tuple(map_keys)
        self.image_interpolation = image_interpolation

    def draw(self, generator: torch.Generator | None = None) -> CropFlip:
        return sample_crop_flip(scale=self.scale, ratio=self.ratio, flip_p=self.flip_p, generator=generator)

    def apply(self, sample: dict, params: CropFlip, photometric: tuple[float, float] = (1.0, 1.0)) -> dict:
        """Apply a given geometric draw (and brightness/contrast factors) to ``sample``."""
        out = dict(sample)
        img = sample["image"]
        ref_h, ref_w = img.shape[-2:]

        box = params.pixels(ref_h, ref_w)  # the crop box on the image's grid, shared by all

        def geo(x, kind):
            h, w = x.shape[-2:]
            nearest = kind == "mask" or (kind == "image" and self.image_interpolation == "nearest")
            mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
            if kind != "image" and (h, w) != (ref_h, ref_w):
                x = _crop_relative(x.as_subclass(torch.Tensor), box, (ref_h, ref_w),
                                   _out_size(self.size, h, w, ref_h, ref_w), nearest=nearest)
            else:
                x = {"mask": tv_tensors.Mask, "image": tv_tensors.Image}.get(kind, torch.Tensor)(x)
                x = TF.resized_crop(x, *box, _out_size(self.size, h, w, ref_h, ref_w), interpolation=mode,
                                    antialias=not nearest)
            if params.flip:
                x = TF.horizontal_flip(x)
            return x.as_subclass(torch.Tensor)

        image = geo(img, "image")
        b, c = photometric
        if b != 1.0:
            image = TF.adjust_brightness(image, b)
        if c != 1.0:
            if image.shape[0] not in (1, 3):
                raise ValueError(f"contrast jitter needs a 1- or 3-channel image, got {image.shape[0]} channels; "
                                 "set contrast=0")
            image = TF.adjust_contrast(image, c)
        out["image"] = image.clamp(0.0, 1.0)
        if "mask" in sample:
            out["mask"] = geo(sample["mask"], "mask")
        for k in self.map_keys:
            if k in sample and sample[k] is not None:
                out[k] = geo(sample[k], "map")
        if "boxes" in sample:
            size = _out_size(self.size, ref_h, ref_w, ref_h, ref_w)
            boxes = tv_tensors.BoundingBoxes(sample["boxes"], format="XYXY", canvas_size=(ref_h, ref_w))
            boxes = TF.resized_crop(boxes, *box, size)
            if params.flip:
                boxes = TF.horizontal_flip(boxes)
            out["boxes"] = boxes.as_subclass(torch.Tensor)
        return out

    def draw_photometric(self, generator: torch.Generator | None = None) -> tuple[float, float]:
        b = _uniform(generator, 1 - self.brightness, 1 + self.brightness) if self.brightness else 1.0
        c = _uniform(generator, 1 - self.contrast, 1 + self.contrast) if self.contrast else 1.0
        return b, c

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        params = self.draw(generator)
        return self.apply(sample, params, self.draw_photometric(generator))


def warp(x: torch.Tensor, theta: torch.Tensor, *, mode: str, size=None, padding_mode: str = "zeros") -> torch.Tensor:
    """Resample a batch by one affine map per sample (``affine_grid`` / ``grid_sample``).

    ``theta`` maps output coordinates in [-1, 1] (``align_corners=False``) to input
    coordinates, so the same ``theta`` moves tensors of any resolution alike: an image, its
    mask and a coarser explanation map stay aligned.

    Parameters
    ----------
    x : Tensor, shape (B, K, h, w)
    theta : Tensor, shape (B, 2, 3)
    mode : "bilinear" (images, explanation maps) or "nearest" (masks)
    size : (h', w') of the output, optional (default: that of ``x``)
    padding_mode : "zeros" or "border"

    Returns
    -------
    Tensor, shape (B, K, h', w')
    """
    size = list(x.shape[-2:]) if size is None else list(size)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [x.shape[0], x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


class BatchAugment:
    """:class:`JointTransform` for a whole batch: one independent draw per sample, applied
    with ``affine_grid`` / ``grid_sample`` (image and maps bilinear, masks nearest).

    Parameters are those of :class:`JointTransform` (no boxes: in-memory datasets carry
    their boxes rasterised as masks).

    A draw with crop box (t, l, h, w) and flip sign s = -1 if flipped else +1 maps output
    coordinates u, v in [-1, 1] to input coordinates
    ``x = s·w·u + (2l + w − 1)``, ``y = h·v + (2t + h − 1)``.
    """

    def __init__(self, **kw) -> None:
        self.joint = JointTransform(**kw)

    def thetas(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Affine matrices (n, 2, 3) and photometric factors (n, 2) of n draws."""
        theta = torch.zeros(n, 2, 3)
        photo = torch.ones(n, 2)
        for i in range(n):
            p = self.joint.draw(generator)
            s = -1.0 if p.flip else 1.0
            theta[i, 0, 0] = s * p.width
            theta[i, 0, 2] = 2 * p.left + p.width - 1
            theta[i, 1, 1] = p.height
            theta[i, 1, 2] = 2 * p.top + p.height - 1
            photo[i] = torch.tensor(self.joint.draw_photometric(generator))
        return theta, photo

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        img = batch["image"]
        n, c, h, w = img.shape
        theta, photo = self.thetas(n, generator)
        out = dict(batch)

        def move(x, mode):
            size = _out_size(self.joint.size, x.shape[-2], x.shape[-1], h, w)
            return warp(x, theta, mode=mode, size=size, padding_mode="border")

        mode = "nearest" if self.joint.image_interpolation == "nearest" else "bilinear"
        image = move(img.float(), mode)
        b = photo[:, 0].view(n, 1, 1, 1).to(image)
        cf = photo[:, 1].view(n, 1, 1, 1).to(image)
        image = image * b
        if self.joint.contrast:
            if c not in (1, 3):
                raise ValueError(f"contrast jitter needs 1- or 3-channel images, got {c} channels; set contrast=0")
            grey = image if c == 1 else (
                0.2989 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3])
            mean = grey.mean((2, 3), keepdim=True)
            image = cf * image + (1 - cf) * mean
        out["image"] = image.clamp(0.0, 1.0)
        if "mask" in batch:
            out["mask"] = move(batch["mask"].float(), "nearest")
        for k in self.joint.map_keys:
            if k in batch and batch[k] is not None:
                out[k] = move(batch[k].float(), "bilinear")
        return out
