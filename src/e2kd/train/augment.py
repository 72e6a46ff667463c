"""Batched geometric augmentation on tensor batches (no per-sample PIL work).

Random parameters are drawn for the whole *global* batch from a generator seeded by
``(seed, step)``: a resumed run redraws exactly the same augmentations without saving any
generator state, and each DDP rank takes its own slice of the same draws, so N processes
see exactly what one process sees.

Everything a sample carries in pixel coordinates moves with the image under the same draw:
masks (nearest neighbour) and, in frozen distillation, the teacher's stored explanation maps
``teacher_maps`` (bilinear, zeros outside the image: no evidence there; a map coarser than
the image is moved at its own resolution by the same affine map).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..data.transforms import warp
from .config import Augment
from .randaugment import check_magnitude, draw_ops, geometric_matrix, photometric

__all__ = ["augment_batch", "MIRRORED", "check_mirrored"]

# Augmentations whose every random draw is a geometric map that can be applied to an
# explanation map as well as to the image (frozen distillation needs exactly these).
# RandAugment qualifies: its geometric ops move the maps and its photometric ops touch the
# image only, as the paper's frozen recipe asks.
MIRRORED = frozenset({Augment.none, Augment.flip, Augment.crop_flip, Augment.rrc_flip, Augment.rrc_flip_randaug})
MAP_KEY = "teacher_maps"


def check_mirrored(kind) -> None:
    """Raise ValueError unless augmentation ``kind`` can move a stored explanation map with its image."""
    if kind not in MIRRORED:
        name = getattr(kind, "value", kind)
        raise ValueError(
            f"data.augment={name} cannot be mirrored on the stored explanation maps of a frozen store (only "
            f"geometric draws can move a map with its image); use one of "
            f"{', '.join(sorted(a.value for a in MIRRORED))}, or distil from the live teacher (teacher.frozen=null)"
        )


def _generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + 17) % (2**63 - 1))
    return g


def _affine(batch: Dict[str, torch.Tensor], theta: torch.Tensor) -> Dict[str, torch.Tensor]:
    out = dict(batch)
    out["image"] = warp(batch["image"], theta, mode="bilinear")
    if "mask" in batch:
        out["mask"] = warp(batch["mask"], theta, mode="nearest")
    if batch.get(MAP_KEY) is not None:
        out[MAP_KEY] = warp(batch[MAP_KEY].float(), theta, mode="bilinear")
    return out


def augment_batch(
    batch: Dict[str, torch.Tensor], kind: Augment, *, seed: int, step: int, offset: int = 0, global_batch: Optional[int] = None,
    randaug_ops: int = 2, randaug_magnitude: int = 9,
) -> Dict[str, torch.Tensor]:
    """Augment ``batch`` (images (B, C, H, W) in [0, 1], optional masks (B, K, H, W) and
    stored teacher maps ``teacher_maps`` (B, K, h, w)) for training step ``step``.

    ``offset`` and ``global_batch`` select this rank's rows of the draws made for the whole
    global batch. A batch with ``teacher_maps`` is refused (ValueError) for an augmentation
    outside :data:`MIRRORED`. ``randaug_ops`` / ``randaug_magnitude``: RandAugment's settings
    for ``rrc_flip_randaug``.
    """
    if batch.get(MAP_KEY) is not None:
        check_mirrored(kind)
    if kind == Augment.none:
        return batch
    b = batch["image"].shape[0]
    n = global_batch or b
    g = _generator(seed, step)
    flip_all = torch.rand(n, generator=g) < 0.5
    flip = flip_all[offset : offset + b]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if kind == Augment.crop_flip:
        # Pad by 1/8 of the side (zeros) and crop back: a shift of up to ±1/8 of the image
        # (±1/4 in normalised coordinates), in whole pixels.
        h, w = batch["image"].shape[-2:]
        ph, pw = max(h // 8, 1), max(w // 8, 1)
        dy = torch.randint(-ph, ph + 1, (n,), generator=g).float() * 2.0 / h
        dx = torch.randint(-pw, pw + 1, (n,), generator=g).float() * 2.0 / w
        theta[:, 0, 2] = dx
        theta[:, 1, 2] = dy
    elif kind in (Augment.rrc_flip, Augment.rrc_flip_randaug):
        area = torch.empty(n).uniform_(0.08, 1.0, generator=g)
        log_r = torch.empty(n).uniform_(torch.log(torch.tensor(3 / 4)).item(), torch.log(torch.tensor(4 / 3)).item(), generator=g)
        ratio = torch.exp(log_r)
        sw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        sh = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - sw)
        cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - sh)
        theta[:, 0, 0], theta[:, 1, 1] = sw, sh
        theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    ops = signs = None
    if kind == Augment.rrc_flip_randaug:
        check_magnitude(randaug_ops, randaug_magnitude)
        h, w = batch["image"].shape[-2:]
        ops, signs = draw_ops(n, randaug_ops, g)
        # torchvision's order: crop, flip, then RandAugment on the flipped crop. As maps from
        # output to input coordinates: RandAugment's geometry, then the flip, then the crop.
        full = torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(n, 1, 3)], dim=1)
        mirror = torch.eye(3).repeat(n, 1, 1)
        mirror[flip_all, 0, 0] = -1.0
        geometry = geometric_matrix(ops, signs, randaug_magnitude, h, w)
        theta = (full @ mirror @ geometry)[:, :2]
        ops, signs, geometry = ops[offset : offset + b], signs[offset : offset + b], geometry[offset : offset + b]
        flip = torch.zeros_like(flip)  # already in theta
    theta = theta[offset : offset + b]
    if kind != Augment.flip:
        batch = _affine(batch, theta)
    out = dict(batch)
    if bool(flip.any()):
        fl = flip.to(batch["image"].device)
        for key in ("image", "mask", MAP_KEY):
            if out.get(key) is not None:
                t = out[key]
                out[key] = torch.where(fl[:, None, None, None], t.flip(-1), t)
    if ops is not None:
        # as torchvision: what RandAugment's geometry brings in from outside the crop is black
        # (no evidence, for a stored map), although the one warp could read the image there
        inside: Dict[tuple, torch.Tensor] = {}  # one mask per resolution
        for key in ("image", "mask", MAP_KEY):
            if out.get(key) is not None:
                size = tuple(out[key].shape[-2:])
                if size not in inside:
                    inside[size] = _inside(geometry, out[key])
                out[key] = out[key] * inside[size].to(out[key].dtype)
        out["image"] = photometric(out["image"], ops, signs, randaug_magnitude)  # the image only
    return out


def _inside(geometry: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w): whether each output pixel of ``x``'s size reads a point inside the crop
    under the output-to-crop maps ``geometry`` (B, 3, 3) (pixel centres as ``affine_grid``
    with ``align_corners=False`` places them; by broadcasting, no grid is built)."""
    h, w = x.shape[-2:]
    g = geometry.to(x.device, torch.float32)[:, :2, :, None, None]  # (B, 2, 3, 1, 1)
    xs = ((torch.arange(w, device=x.device, dtype=torch.float32) * 2 + 1) / w - 1).view(1, w)
    ys = ((torch.arange(h, device=x.device, dtype=torch.float32) * 2 + 1) / h - 1).view(h, 1)
    coords = g[:, :, 0] * xs + g[:, :, 1] * ys + g[:, :, 2]  # (B, 2, h, w)
    return (coords.abs() <= 1.0).all(dim=1, keepdim=True)
