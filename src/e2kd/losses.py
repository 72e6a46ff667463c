"""Distillation losses of e²KD (Parchami-Araghi et al., "Good Teachers Explain", ECCV 2024).

The full objective is ``L = L_KD + λ · L_exp``; :class:`e2kd.Distiller` puts the pieces together.
Every function here takes the teacher's side as constants (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "multilabel_kd_loss", "explanation_loss", "explanation_cosine"]


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, name: str) -> None:
    if not (torch.is_tensor(student_logits) and torch.is_tensor(teacher_logits)):
        raise ValueError(f"{name}: logits must be tensors")
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            f"{name}: logits must have shape (batch, classes); got student {tuple(student_logits.shape)} "
            f"and teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"{name}: batch-size mismatch: student has {student_logits.shape[0]} rows, teacher "
            f"{teacher_logits.shape[0]}; pass the same batch to both models"
        )
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(
            f"{name}: teacher has {teacher_logits.shape[1]} classes but student has "
            f"{student_logits.shape[1]}; build the student with num_classes={teacher_logits.shape[1]}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Knowledge-distillation loss of Hinton et al. (2015), as used by e²KD.

    .. math::
        L_{KD} = T^2 \cdot \frac{1}{B}\sum_{b=1}^{B} \sum_{c=1}^{C}
                 p_{bc}\,(\log p_{bc} - \log q_{bc}),\qquad
        p = \mathrm{softmax}(z_T / T),\; q = \mathrm{softmax}(z_S / T)

    i.e. ``T² · KL(p ‖ q)`` summed over classes and averaged over the batch, with
    ``0 · log 0 = 0`` (a teacher logit of −inf, a masked class, adds nothing).

    Parameters
    ----------
    student_logits : Tensor, shape (B, C)
    teacher_logits : Tensor, shape (B, C)
        Treated as constants (detached).
    temperature : float
        Softening temperature ``T > 0``.

    Returns
    -------
    Tensor, shape ()
    """
    _check_logits(student_logits, teacher_logits, "kd_loss")
    _check_temperature(temperature)
    t = temperature
    log_q = F.log_softmax(_wide(student_logits) / t, dim=1)
    log_p = F.log_softmax(_wide(teacher_logits.detach()) / t, dim=1)
    kl = _plogp_ratio(log_p, log_q).sum(dim=1)
    return kl.mean() * (t * t)


def multilabel_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    r"""Per-class Bernoulli KD loss for multi-label teachers (sigmoid outputs).

    .. math::
        L_{KD}^{ml} = T^2 \cdot \frac{1}{B}\sum_{b}\sum_{c}
          \Big[p_{bc}\log\frac{p_{bc}}{q_{bc}} + (1-p_{bc})\log\frac{1-p_{bc}}{1-q_{bc}}\Big],\qquad
        p = \sigma(z_T/T),\; q = \sigma(z_S/T)

    Computed with log-sigmoids, so saturated logits stay finite.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor, shape (B, C)
    temperature : float

    Returns
    -------
    Tensor, shape ()
    """
    _check_logits(student_logits, teacher_logits, "multilabel_kd_loss")
    _check_temperature(temperature)
    t = temperature
    s = _wide(student_logits) / t
    z = _wide(teacher_logits.detach()) / t
    log_p, log_1mp = F.logsigmoid(z), F.logsigmoid(-z)
    log_q, log_1mq = F.logsigmoid(s), F.logsigmoid(-s)
    kl = _plogp_ratio(log_p, log_q) + _plogp_ratio(log_1mp, log_1mq)
    return kl.sum(dim=1).mean() * (t * t)


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p · (log p − log q)`` element-wise, with ``0 · log 0 = 0``: a teacher probability of
    exactly 0 (a logit of −inf, e.g. a masked class) adds nothing instead of NaN; a NaN stays NaN."""
    return torch.where(log_p != -torch.inf, log_p.exp() * (log_p - log_q), 0.0)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 or wider: half and bfloat16 are computed in float32, float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _unit_max(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N) divided row-wise by its largest absolute value, taken as a constant."""
    peak = x.detach().abs().amax(dim=1, keepdim=True)
    return x / torch.where(peak > 0, peak, torch.ones_like(peak))


def explanation_cosine(student_maps: torch.Tensor, teacher_maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Per-sample cosine similarity of two explanations, the term inside :func:`explanation_loss`.

    .. math::
        \cos_b = \frac{\langle e^S_b, e^T_b\rangle}{\max(\|e^S_b\|\,\|e^T_b\|,\ \epsilon)}

    where :math:`e_b` is the flattened explanation of sample ``b``. An all-zero map gives 0.
    Each map is first divided by its largest absolute value (a constant: no gradient flows
    through that factor), which leaves the cosine and its gradient unchanged but keeps the
    squares from overflowing or underflowing in float32 (maps from 1e-30 to 1e30 give the
    exact cosine); after it every non-zero map has norm >= 1, so ``eps`` only affects zero maps.
    The mean explanation similarity reported for students is the batch mean of this value,
    i.e. ``1 - explanation_loss``.

    Parameters
    ----------
    student_maps : Tensor, shape (B, ...)
    teacher_maps : Tensor, shape (B, ...)
        Same shape as ``student_maps``; treated as constants (detached).
    eps : float
        Floor of the product of norms.

    Returns
    -------
    Tensor, shape (B,)
    """
    if not (torch.is_tensor(student_maps) and torch.is_tensor(teacher_maps)):
        raise ValueError("explanation_loss: maps must be tensors")
    if student_maps.shape != teacher_maps.shape:
        raise ValueError(
            f"explanation_loss: student maps {tuple(student_maps.shape)} and teacher maps "
            f"{tuple(teacher_maps.shape)} differ in shape; resize them to a common size first "
            "(e2kd.Distiller does this for you)"
        )
    if student_maps.dim() < 2 or student_maps.shape[0] == 0:
        raise ValueError(f"explanation_loss: expected maps of shape (B, ...) with B > 0, got {tuple(student_maps.shape)}")
    s = _unit_max(_wide(student_maps.flatten(1)))
    t = _unit_max(_wide(teacher_maps.detach().flatten(1)))
    dot = (s * t).sum(dim=1)
    norms = s.square().sum(dim=1) * t.square().sum(dim=1)
    return dot / norms.clamp_min(eps * eps).sqrt()


def explanation_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Explanation-similarity loss of e²KD (Parchami-Araghi et al., ECCV 2024, Eq. 2).

    .. math::
        L_{exp} = \frac{1}{B}\sum_{b=1}^{B} \big(1 - \cos_b\big)

    with :math:`\cos_b` the cosine between the flattened student and teacher explanations of
    sample ``b`` (:func:`explanation_cosine`; any shape after the batch dimension, e.g.
    ``(1, H, W)`` for GradCAM or ``(6, H, W)`` for B-cos dynamic weights).

    An all-zero map (dead ReLUs, saturated teacher) has cosine 0 with anything, so that sample
    contributes exactly 1 to the loss; values and gradients stay finite, never NaN.

    Parameters
    ----------
    student_maps : Tensor, shape (B, ...)
    teacher_maps : Tensor, shape (B, ...)
        Same shape as ``student_maps``; treated as constants (detached).
    eps : float
        Floor of the product of norms.

    Returns
    -------
    Tensor, shape ()
    """
    return (1.0 - explanation_cosine(student_maps, teacher_maps, eps)).mean()
