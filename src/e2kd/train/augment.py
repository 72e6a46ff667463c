"""Batched geometric augmentation on tensor batches (no per-sample PIL work).

Random parameters are drawn for the whole *global* batch from a generator seeded by
``(seed, step)``: a resumed run redraws exactly the same augmentations without saving any
generator state, and each DDP rank takes its own slice of the same draws, so N processes
see exactly what one process sees. Masks get the same geometric transform as their images.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .config import Augment

__all__ = ["augment_batch"]


def _generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + 17) % (2**63 - 1))
    return g


def _affine(batch: Dict[str, torch.Tensor], theta: torch.Tensor) -> Dict[str, torch.Tensor]:
    x = batch["image"]
    grid = F.affine_grid(theta.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
    out = dict(batch)
    out["image"] = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if "mask" in batch:
        m = batch["mask"]
        out["mask"] = F.grid_sample(m, grid.to(m.dtype), mode="nearest", padding_mode="zeros", align_corners=False)
    return out


def augment_batch(
    batch: Dict[str, torch.Tensor], kind: Augment, *, seed: int, step: int, offset: int = 0, global_batch: Optional[int] = None
) -> Dict[str, torch.Tensor]:
    """Augment ``batch`` (images (B, C, H, W) in [0, 1], optional masks) for training step ``step``.

    ``offset`` and ``global_batch`` select this rank's rows of the draws made for the whole
    global batch.
    """
    if kind == Augment.none:
        return batch
    b = batch["image"].shape[0]
    n = global_batch or b
    g = _generator(seed, step)
    flip = (torch.rand(n, generator=g) < 0.5)[offset : offset + b]
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
    elif kind == Augment.rrc_flip:
        area = torch.empty(n).uniform_(0.08, 1.0, generator=g)
        log_r = torch.empty(n).uniform_(torch.log(torch.tensor(3 / 4)).item(), torch.log(torch.tensor(4 / 3)).item(), generator=g)
        ratio = torch.exp(log_r)
        sw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        sh = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - sw)
        cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - sh)
        theta[:, 0, 0], theta[:, 1, 1] = sw, sh
        theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    theta = theta[offset : offset + b]
    if kind != Augment.flip:
        batch = _affine(batch, theta)
    out = dict(batch)
    fl = flip.to(batch["image"].device)
    for key in ("image", "mask"):
        if key in out:
            t = out[key]
            out[key] = torch.where(fl[:, None, None, None], t.flip(-1), t)
    return out
