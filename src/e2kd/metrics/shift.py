"""Shift equivariance of explanations and stability of predictions (desideratum 3b).

Parchami-Araghi et al. (ECCV 2024, Sec. 4.3) show that an e²KD ViT student inherits a CNN
teacher's shift equivariance: its explanations move with the image when the image is shifted,
instead of jumping with the patch grid. This module measures it for any model and explainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..explain.base import Explainer
from ..losses import explanation_cosine

__all__ = ["ShiftEquivariance", "shift_equivariance", "shifted_view", "SHIFT_MODES", "SHIFT_DIRECTIONS"]

SHIFT_MODES = ("crop", "circular")
SHIFT_DIRECTIONS = ("diagonal", "horizontal", "vertical")


@dataclass
class ShiftEquivariance:
    """Per-sample results of :func:`shift_equivariance`; ``merge`` them over batches.

    Attributes
    ----------
    shifts : LongTensor, shape (S,)
        0, 1, ..., P pixels.
    cosine : Tensor, shape (B, S)
        Cosine between the explanation of the shifted image and the shifted explanation.
    same_prediction : BoolTensor, shape (B, S)
        Whether the argmax at this shift equals the argmax at shift 0.
    kl : Tensor, shape (B, S)
        KL(p_0 ‖ p_s) of the softmax outputs, in nats.
    """

    shifts: torch.Tensor
    cosine: torch.Tensor
    same_prediction: torch.Tensor
    kl: torch.Tensor

    def merge(self, other: "ShiftEquivariance") -> "ShiftEquivariance":
        """Results of two batches measured with the same shifts, concatenated."""
        if not torch.equal(self.shifts, other.shifts):
            raise ValueError("ShiftEquivariance.merge: the two results used different shifts")
        return ShiftEquivariance(
            self.shifts,
            torch.cat([self.cosine, other.cosine]),
            torch.cat([self.same_prediction, other.same_prediction]),
            torch.cat([self.kl, other.kl]),
        )

    def curves(self) -> dict:
        """Mean over samples per shift: ``shift``, ``cosine``, ``prediction_stability``, ``kl`` (lists)."""
        return {
            "shift": self.shifts.tolist(),
            "cosine": self.cosine.mean(dim=0).tolist(),
            "prediction_stability": self.same_prediction.float().mean(dim=0).tolist(),
            "kl": self.kl.mean(dim=0).tolist(),
        }

    def summary(self) -> dict:
        """One number each: means over the non-zero shifts 1..P (shift 0 is 1 by construction)."""
        nz = self.shifts > 0
        if not bool(nz.any()):
            raise ValueError("ShiftEquivariance.summary: no non-zero shift was measured; use max_shift >= 1")
        return {
            "shift_cosine": float(self.cosine[:, nz].mean()),
            "shift_prediction_stability": float(self.same_prediction[:, nz].float().mean()),
            "shift_kl": float(self.kl[:, nz].mean()),
        }


def _unit_max(m: torch.Tensor) -> torch.Tensor:
    """Each sample's map divided by its largest absolute value (all-zero maps stay zero)."""
    peak = m.flatten(1).abs().amax(dim=1).view(-1, *([1] * (m.dim() - 1)))
    return m / torch.where(peak > 0, peak, torch.ones_like(peak))


def _offsets(s: int, direction: str):
    return (s if direction in ("diagonal", "vertical") else 0, s if direction in ("diagonal", "horizontal") else 0)


def shifted_view(x: torch.Tensor, shift: int, *, max_shift: int, mode: str = "crop", direction: str = "diagonal") -> torch.Tensor:
    """The image batch with its content moved ``shift`` pixels right/down (see :func:`shift_equivariance`).

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W)

    Returns
    -------
    Tensor, shape (B, C, H - P, W - P) for ``mode="crop"`` (P = ``max_shift`` along the shifted
    axes), (B, C, H, W) for ``mode="circular"``.
    """
    dy, dx = _offsets(shift, direction)
    if mode == "circular":
        return torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    py, px = _offsets(max_shift, direction)
    h, w = x.shape[2] - py, x.shape[3] - px
    return x[:, :, py - dy : py - dy + h, px - dx : px - dx + w]


def shift_equivariance(
    model: nn.Module,
    explainer: Explainer,
    x: torch.Tensor,
    *,
    max_shift: int = 16,
    target: Optional[torch.Tensor] = None,
    mode: str = "crop",
    direction: str = "diagonal",
    margin: int = 0,
) -> ShiftEquivariance:
    r"""Shift equivariance of explanations and stability of predictions for shifts 0..P.

    For a shift of ``s`` pixels (right and down for ``direction="diagonal"``), let
    :math:`x_s` be the shifted image and :math:`E(\cdot)` the explanation of the target class
    (the model's top-1 at shift 0, or ``target``; the same class at every shift). Equivariance
    means :math:`E(x_s) = \mathrm{shift}_s(E(x_0))`, so per sample

    .. math::
        \cos_s = \cos\big(E(x_s)[\,s + m : h - m,\ s + m : w - m\,],\
                          E(x_0)[\,m : h - s - m,\ m : w - s - m\,]\big)

    compares the two on the overlapping region only (minus a ``margin`` m on every side, to
    measure the interior away from padding and upsampling effects), with the cosine of
    :func:`e2kd.losses.explanation_cosine`. Both regions are first divided by their largest
    absolute value: the cosine does not change, but the floor ε of that function then only
    acts on all-zero maps (cosine 0), not on maps of tiny scale (GradCAM values of 1e-6 are
    common for untrained models). Prediction stability is the share of samples whose
    argmax at shift ``s`` equals that at shift 0, and :math:`\mathrm{KL}(p_0 \| p_s)` of the
    softmax outputs measures how much the prediction moves.

    How images are shifted (``mode``):

    * ``"crop"`` (default, no synthetic pixels): windows of size (H − P, W − P) are cut from
      ``x``; window ``s`` starts at (P − s, P − s), so its content sits ``s`` pixels further
      right/down than in window 0. Give images P pixels larger than the model's input size
      (a ViT with patch 16 at 64 px: 80 px images for P = 16).
    * ``"circular"``: ``torch.roll`` by ``s`` (the same size; wrapped pixels form a seam).

    Parameters
    ----------
    model : nn.Module
    explainer : Explainer
        Maps may have any number of channels; they must have the model input's spatial size.
    x : Tensor, shape (B, C, H, W)
    max_shift : int
        P; shifts 0, 1, ..., P are measured (P + 1 explainer calls).
    target : LongTensor (B,), optional
    mode : {"crop", "circular"}
    direction : {"diagonal", "horizontal", "vertical"}
    margin : int

    Returns
    -------
    ShiftEquivariance
        Per-sample matrices; ``.curves()`` and ``.summary()`` give the per-shift means and the
        mean over shifts 1..P.
    """
    if mode not in SHIFT_MODES:
        raise ValueError(f"shift_equivariance: unknown mode {mode!r}; choose one of {SHIFT_MODES}")
    if direction not in SHIFT_DIRECTIONS:
        raise ValueError(f"shift_equivariance: unknown direction {direction!r}; choose one of {SHIFT_DIRECTIONS}")
    if not torch.is_tensor(x) or x.dim() != 4:
        raise ValueError("shift_equivariance: x must be an image batch of shape (B, C, H, W)")
    if max_shift < 0 or margin < 0:
        raise ValueError(f"shift_equivariance: max_shift and margin must be >= 0, got {max_shift}, {margin}")
    py, px = _offsets(max_shift, direction)
    h, w = (x.shape[2] - py, x.shape[3] - px) if mode == "crop" else tuple(x.shape[2:])
    if min(h - py, w - px) - 2 * margin < 1:
        raise ValueError(
            f"shift_equivariance: images of size {tuple(x.shape[2:])} leave no overlap for max_shift={max_shift}, "
            f"margin={margin} (mode {mode!r}); use larger images or smaller shifts"
        )
    was_training = model.training
    model.eval()
    maps, logits = [], []
    try:
        for s in range(max_shift + 1):
            xs = shifted_view(x, s, max_shift=max_shift, mode=mode, direction=direction)
            out = explainer(model, xs, target)
            if out.maps.shape[-2:] != xs.shape[-2:]:
                raise ValueError(
                    f"shift_equivariance: maps of size {tuple(out.maps.shape[-2:])} for inputs of size "
                    f"{tuple(xs.shape[-2:])}; use an explainer that returns maps at the input resolution"
                )
            if target is None:
                target = out.target
            maps.append(out.maps.detach())
            logits.append(out.logits.detach().float())
    finally:
        model.train(was_training)
    base_map, base_logp = maps[0], F.log_softmax(logits[0], dim=1)
    cos, same, kl = [], [], []
    for s, (m, z) in enumerate(zip(maps, logits)):
        dy, dx = _offsets(s, direction)
        cur = m[..., dy + margin : h - margin, dx + margin : w - margin]
        ref = base_map[..., margin : h - dy - margin, margin : w - dx - margin]
        cos.append(explanation_cosine(_unit_max(cur), _unit_max(ref)))
        same.append(z.argmax(dim=1) == logits[0].argmax(dim=1))
        logp = F.log_softmax(z, dim=1)
        kl.append((base_logp.exp() * (base_logp - logp)).sum(dim=1))
    return ShiftEquivariance(
        torch.arange(max_shift + 1),
        torch.stack(cos, dim=1).cpu(),
        torch.stack(same, dim=1).cpu(),
        torch.stack(kl, dim=1).cpu(),
    )
