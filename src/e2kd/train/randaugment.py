"""RandAugment (Cubuk et al., NeurIPS 2020) on whole tensor batches, one draw per image.

The op set and magnitude ranges are torchvision's (``transforms.v2.RandAugment``, 31
magnitude bins): identity, shear x / y, translate x / y, rotate, brightness, colour,
contrast, sharpness, posterize, solarize, autocontrast, equalize, ``num_ops`` of them drawn
uniformly per image, signed magnitudes with a random sign. Two things differ from applying
torchvision's transform image by image:

- the draws come from the trainer's ``(seed, step)`` generator, so a resumed or data-parallel
  run sees exactly the augmentations of one uninterrupted process;
- the geometric ops (shear, translate, rotate) are composed with the random resized crop and
  the flip into one affine map applied once (one bilinear resampling instead of torchvision's
  nearest-neighbour resampling per op), in torchvision's order (crop, flip, RandAugment), before
  the photometric ops; what they bring in from outside the crop is black, as in torchvision.
  That map also moves masks and, in frozen distillation, the teacher's stored explanation maps;
  the photometric ops touch the image only.

The photometric ops follow torchvision's definitions for float images in [0, 1]
(``transforms.v2.functional``), applied to each image's own magnitude.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["OPS", "NUM_BINS", "draw_ops", "geometric_matrix", "photometric"]

OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
    "brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)
NUM_BINS = 31
_IDX = {name: i for i, name in enumerate(OPS)}


def _level(magnitude: int, top: float) -> float:
    """Bin ``magnitude`` of ``linspace(0, top, NUM_BINS)``."""
    return top * magnitude / (NUM_BINS - 1)


def check_magnitude(num_ops: int, magnitude: int) -> None:
    if int(num_ops) < 1:
        raise ValueError(f"RandAugment needs num_ops >= 1, got {num_ops}")
    if not 0 <= int(magnitude) < NUM_BINS:
        raise ValueError(f"RandAugment magnitude must be in 0..{NUM_BINS - 1} (torchvision's bins), got {magnitude}")


def draw_ops(n: int, num_ops: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Op indices (n, num_ops) into :data:`OPS` and signs ±1 (n, num_ops) for ``n`` images."""
    ops = torch.randint(len(OPS), (n, num_ops), generator=generator)
    signs = torch.where(torch.rand(n, num_ops, generator=generator) < 0.5, -1.0, 1.0)
    return ops, signs


def geometric_matrix(ops: torch.Tensor, signs: torch.Tensor, magnitude: int, height: int, width: int) -> torch.Tensor:
    r"""The geometric ops of each draw as one map from output to input coordinates, (n, 3, 3).

    In pixel coordinates centred on the image (x right, y down), each op maps an output point
    p to the input point it reads: rotate by angle a (up to 30°) about the centre:
    :math:`R(a)\,p`; shear x by s (up to 0.3) about the top-left corner:
    :math:`(x + s\,(y + H/2),\ y)`; shear y: :math:`(x,\ y + s\,(x + W/2))`; translate x by t
    whole pixels (up to 150/331 of the width): :math:`(x - t, y)`. The ops compose in
    their drawn order; the result is returned in the normalised coordinates of
    ``affine_grid`` (:math:`u = 2x / W`, :math:`v = 2y / H`).
    """
    n = ops.shape[0]
    m = torch.eye(3).repeat(n, 1, 1)
    for k in range(ops.shape[1]):
        step = torch.eye(3).repeat(n, 1, 1)
        s = signs[:, k]
        op = ops[:, k]
        shear = s * _level(magnitude, 0.3)
        angle = s * math.radians(_level(magnitude, 30.0))
        # shears about the top-left corner, as torchvision's RandAugment (centre [0, 0])
        sel = op == _IDX["shear_x"]
        step[sel, 0, 1] = shear[sel]
        step[sel, 0, 2] = shear[sel] * (height / 2.0)
        sel = op == _IDX["shear_y"]
        step[sel, 1, 0] = shear[sel]
        step[sel, 1, 2] = shear[sel] * (width / 2.0)
        # whole pixels, as torchvision
        sel = op == _IDX["translate_x"]
        step[sel, 0, 2] = -s[sel] * float(int(_level(magnitude, 150.0 / 331.0 * width)))
        sel = op == _IDX["translate_y"]
        step[sel, 1, 2] = -s[sel] * float(int(_level(magnitude, 150.0 / 331.0 * height)))
        sel = op == _IDX["rotate"]
        c, si = torch.cos(angle[sel]), torch.sin(angle[sel])
        step[sel, 0, 0], step[sel, 0, 1], step[sel, 1, 0], step[sel, 1, 1] = c, -si, si, c
        # op k acts on the image the earlier ops produced: its output point is read through
        # the earlier maps afterwards
        m = m @ step
    scale = torch.diag(torch.tensor([2.0 / width, 2.0 / height, 1.0]))
    unscale = torch.diag(torch.tensor([width / 2.0, height / 2.0, 1.0]))
    return scale @ m @ unscale


def _grey(img: torch.Tensor) -> torch.Tensor:
    if img.shape[1] == 1:
        return img
    r, g, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    return 0.2989 * r + 0.587 * g + 0.114 * b


def _blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor · img + (1 − factor) · other``, clamped to [0, 1]."""
    return (factor * img + (1.0 - factor) * other).clamp_(0.0, 1.0)


def _sharp_blur(img: torch.Tensor) -> torch.Tensor:
    """torchvision's sharpness reference: 3 × 3 smoothing ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside,
    the border pixels kept."""
    c = img.shape[1]
    kernel = torch.ones(3, 3, dtype=img.dtype, device=img.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    inner = F.conv2d(img, kernel, groups=c)
    out = img.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def _apply(name: str, img: torch.Tensor, sign: torch.Tensor, magnitude: int) -> torch.Tensor:
    """One photometric op on images (k, C, H, W) with per-image signs (k,)."""
    factor = (1.0 + sign * _level(magnitude, 0.9)).view(-1, 1, 1, 1).to(img)
    if name == "brightness":
        return _blend(img, torch.zeros_like(img), factor)
    if name == "color":
        return img if img.shape[1] == 1 else _blend(img, _grey(img).expand_as(img), factor)
    if name == "contrast":
        mean = _grey(img).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(img, mean.expand_as(img), factor)
    if name == "sharpness":
        if min(img.shape[-2:]) <= 2:
            return img
        return _blend(img, _sharp_blur(img), factor)
    if name == "posterize":
        bits = 8 - int(round(magnitude / ((NUM_BINS - 1) / 4)))
        levels = 1 << bits
        return img.mul(levels).floor_().clamp_(0, levels - 1).mul_(1.0 / levels)
    if name == "solarize":
        threshold = 1.0 - _level(magnitude, 1.0)
        return torch.where(img >= threshold, 1.0 - img, img)
    if name == "autocontrast":
        lo = img.amin(dim=(2, 3), keepdim=True)
        hi = img.amax(dim=(2, 3), keepdim=True)
        flat = hi <= lo
        scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo).clamp_min(1e-12))
        lo = torch.where(flat, torch.zeros_like(lo), lo)
        return ((img - lo) * scale).clamp_(0.0, 1.0)
    if name == "equalize":
        from torchvision.transforms.v2 import functional as TF

        return TF.equalize(img)  # torchvision's histogram equalisation, per image and channel
    raise AssertionError(name)


def photometric(images: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor, magnitude: int) -> torch.Tensor:
    """The photometric ops of each draw, in their drawn order, on images (n, C, H, W) in [0, 1]."""
    out = images.float() if not images.is_floating_point() else images.clone()
    ops, signs = ops.to(out.device), signs.to(out.device)
    for k in range(ops.shape[1]):
        for name in OPS[6:]:
            sel = (ops[:, k] == _IDX[name]).nonzero().flatten()
            if sel.numel():
                out[sel] = _apply(name, out[sel], signs[sel, k], magnitude)
    return out
