"""Localisation metrics: the energy pointing game (EPG) and IoU of binarised attributions.

Both score one attribution map against the mask (or rasterised boxes) of one object class;
a multi-label image is scored once per *present* class. :func:`explain_present_classes` makes
these (image, class) pairs from a batch and an explainer; :class:`LocalisationMeter` averages
the scores over a test set.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..explain.base import Explainer
from ._streaming import StreamingMetric, ratio

__all__ = [
    "BINARISATION_RULES",
    "LocalisationMeter",
    "as_attribution_maps",
    "binarise",
    "energy_pointing_game",
    "explain_present_classes",
    "iou",
    "present_class_pairs",
]

BINARISATION_RULES = ("fraction_of_max", "top_fraction")
#: The ``value`` each binarisation rule accepts: (test, the range written out).
BINARISATION_VALUES = {
    "fraction_of_max": (lambda v: 0.0 <= v <= 1.0, "[0, 1]"),  # NaN fails too
    "top_fraction": (lambda v: 0.0 < v <= 1.0, "(0, 1]"),
}


def as_attribution_maps(maps: torch.Tensor, who: str, what: str = "attributions") -> torch.Tensor:
    """``(N, H, W)`` view of single-channel maps given as ``(N, H, W)`` or ``(N, 1, H, W)``."""
    if not torch.is_tensor(maps):
        raise ValueError(f"{who}: {what} must be a tensor, got {type(maps).__name__}")
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            fix = (
                "pick the mask of the scored class first (see present_class_pairs)"
                if what == "masks"
                else "use an explainer that gives one map per image (GradCAM, "
                "BcosExplainer(output='contributions'), or InputXGradient(reduce_channels='sum'))"
            )
            raise ValueError(f"{who}: {what} must have one channel, got shape {tuple(maps.shape)}; {fix}")
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(f"{who}: {what} must have shape (N, H, W) or (N, 1, H, W), got {tuple(maps.shape)}")
    return maps


def maps_and_masks(attributions: torch.Tensor, masks: torch.Tensor, who: str) -> Tuple[torch.Tensor, torch.Tensor]:
    a = as_attribution_maps(attributions, who)
    m = as_attribution_maps(masks, who, "masks")
    if a.shape != m.shape:
        raise ValueError(
            f"{who}: attributions {tuple(a.shape)} and masks {tuple(m.shape)} differ in shape; explain at the "
            "image resolution (e.g. GradCAM(upsample=True)) or resize the masks to the maps"
        )
    m = m.to(a.device)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{who}: masks must be binary (0/1 entries); rasterise boxes to a {{0, 1}} mask first")
    return a, m.to(a.dtype if a.is_floating_point() else torch.float32)


def energy_pointing_game(attributions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    r"""Energy pointing game: the share of positive attribution energy inside the object mask.

    Wang et al., "Score-CAM", CVPR-W 2020; used for model guidance by Rao et al., ICCV 2023,
    and for the Pascal VOC students of Parchami-Araghi et al., ECCV 2024. For an attribution
    map :math:`A` and the union :math:`M \in \{0,1\}^{H\times W}` of the object's boxes (or its
    segmentation mask),

    .. math::
        \mathrm{EPG} = \frac{\sum_{ij} M_{ij}\,\max(A_{ij}, 0)}{\sum_{ij} \max(A_{ij}, 0)}

    A map with no positive energy (all zero, or all negative) points nowhere and scores 0; a
    map holding NaN scores NaN (not a plausible 0: the energy guidance loss then shows it, and
    a training run stops on it). A mask covering the whole image gives 1 for any map with
    positive energy. Several boxes of
    one class are one mask (their union), so overlapping boxes count each pixel once.

    Parameters
    ----------
    attributions : Tensor, shape (N, H, W) or (N, 1, H, W)
        One map per (image, class) pair. Differentiable (the energy guidance loss is
        ``1 - EPG``).
    masks : Tensor, same shape, entries in {0, 1}

    Returns
    -------
    Tensor, shape (N,)
    """
    a, m = maps_and_masks(attributions, masks, "energy_pointing_game")
    pos = a.clamp_min(0).flatten(1)
    total = pos.sum(dim=1)
    inside = (pos * m.flatten(1)).sum(dim=1)
    score = torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))
    return torch.where(torch.isnan(total), total, score)  # NaN anywhere in a map makes its total NaN


def binarise(attributions: torch.Tensor, *, rule: str = "fraction_of_max", value: float = 0.5) -> torch.Tensor:
    r"""Binarise attribution maps for :func:`iou`; only positive attributions are ever kept.

    * ``rule="fraction_of_max"`` (default, ``value`` = 0.5): keep pixel ``ij`` iff
      :math:`A_{ij} > 0` and :math:`A_{ij} \ge v \cdot \max_{kl} A_{kl}`.
    * ``rule="top_fraction"`` (``value`` = p in (0, 1]): keep the :math:`\lceil p\,HW\rceil`
      highest pixels, i.e. :math:`A_{ij} \ge` the :math:`\lceil p\,HW\rceil`-th largest value
      (ties at that value are all kept), and :math:`A_{ij} > 0`.

    Why relative thresholds: explanation maps have no common scale (GradCAM grows with the
    logit, B-cos contributions with the input), so an absolute threshold would compare models
    by their scale rather than by where they point. A fraction of the per-map maximum keeps
    the "hot" region of each map whatever its scale; a top fraction fixes the area instead,
    which suits comparisons at a known object size. Rao et al. (ICCV 2023) choose the
    threshold on held-out data; choose ``value`` the same way when it matters. An all-zero map
    binarises to the empty set.

    Parameters
    ----------
    attributions : Tensor, shape (N, H, W) or (N, 1, H, W)

    Returns
    -------
    BoolTensor, shape (N, H, W)
    """
    check_binarisation(rule, value, "binarise")
    a = as_attribution_maps(attributions, "binarise").detach()
    flat = a.flatten(1)
    if rule == "fraction_of_max":
        thresh = value * flat.amax(dim=1, keepdim=True)
    else:
        k = max(1, math.ceil(value * flat.shape[1] - 1e-9))
        thresh = flat.topk(k, dim=1).values[:, -1:]
    return ((flat >= thresh) & (flat > 0)).view_as(a)


def check_binarisation(rule: str, value: float, who: str) -> None:
    """A clear error unless ``rule`` and ``value`` are a binarisation :func:`binarise` accepts."""
    if rule not in BINARISATION_VALUES:
        raise ValueError(f"{who}: unknown rule {rule!r}; choose one of {BINARISATION_RULES}")
    accepts, text = BINARISATION_VALUES[rule]
    if not accepts(value):
        raise ValueError(f"{who}: rule {rule!r} needs value in {text}, got {value}")


def iou(attributions: torch.Tensor, masks: torch.Tensor, *, rule: str = "fraction_of_max", value: float = 0.5) -> torch.Tensor:
    r"""Intersection over union of the binarised attribution and the object mask.

    Used by Rao et al. (ICCV 2023) and for the Pascal VOC students of Parchami-Araghi et al.
    (ECCV 2024, Table 4). With :math:`\hat A` = :func:`binarise` (``rule``, ``value``) and the
    mask :math:`M` (union of the class's boxes),

    .. math:: \mathrm{IoU} = \frac{|\hat A \cap M|}{|\hat A \cup M|}

    An empty union (no positive attribution and an empty mask) scores 0; a map holding NaN
    scores NaN.

    Parameters
    ----------
    attributions : Tensor, shape (N, H, W) or (N, 1, H, W)
    masks : Tensor, same shape, entries in {0, 1}

    Returns
    -------
    Tensor, shape (N,)
    """
    a, m = maps_and_masks(attributions, masks, "iou")
    b = binarise(a, rule=rule, value=value).flatten(1)
    mb = m.flatten(1) > 0
    inter = (b & mb).sum(dim=1).double()
    union = (b | mb).sum(dim=1).double()
    score = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union)).float()
    return torch.where(torch.isnan(a.detach()).flatten(1).any(dim=1), torch.full_like(score, math.nan), score)


def present_class_pairs(labels: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (image, present class) pairs of a batch and the mask of each.

    Parameters
    ----------
    labels : Tensor
        Single-label: LongTensor (B,) with masks (B, 1, H, W) or (B, H, W) (the object mask).
        Multi-label: multi-hot float (B, C) with per-class masks (B, C, H, W).

    Returns
    -------
    image_index : LongTensor (N,)
    class_index : LongTensor (N,)
    pair_masks : Tensor (N, H, W)
        An image with no present class contributes no pair.
    """
    if not torch.is_tensor(labels) or not torch.is_tensor(masks):
        raise ValueError("present_class_pairs: labels and masks must be tensors")
    if labels.is_floating_point():
        if labels.dim() != 2 or masks.dim() != 4 or masks.shape[:2] != labels.shape:
            raise ValueError(
                f"present_class_pairs: multi-hot labels {tuple(labels.shape)} need per-class masks of shape "
                f"(B, C, H, W) with the same (B, C); got masks {tuple(masks.shape)}"
            )
        image_index, class_index = (labels.detach() > 0.5).nonzero(as_tuple=True)
        return image_index, class_index, masks[image_index.to(masks.device), class_index.to(masks.device)]
    labels = labels.reshape(-1)
    m = as_attribution_maps(masks, "present_class_pairs", "masks")
    if m.shape[0] != labels.numel():
        raise ValueError(f"present_class_pairs: {labels.numel()} labels for {m.shape[0]} masks")
    idx = torch.arange(labels.numel(), device=labels.device)
    return idx, labels.long(), m


def explain_present_classes(
    model: nn.Module, explainer: Explainer, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
) -> dict:
    """Explain every (image, present class) pair of a batch; the input to :class:`LocalisationMeter`.

    Single-label batches are explained for the true class (one explainer call); multi-label
    batches need one call per rank of present class (the ``r``-th present class of every image
    that has at least ``r`` + 1 of them), i.e. as many calls as the most classes any image has.

    Parameters
    ----------
    model : nn.Module
    explainer : Explainer
        Must give one map per image at the masks' resolution.
    x : Tensor, shape (B, C, H, W)
    labels, masks : see :func:`present_class_pairs`

    Returns
    -------
    dict with ``attributions`` (N, H, W), ``masks`` (N, H, W), ``image_index`` (N,),
    ``class_index`` (N,)
    """
    image_index, class_index, pair_masks = present_class_pairs(labels, masks)
    image_index = image_index.to(x.device)
    class_index = class_index.to(x.device)
    if labels.is_floating_point():
        # Rank of each pair among its image's present classes, counting from 0.
        rank = ((labels.detach() > 0.5).long().cumsum(dim=1) - 1).to(x.device)[image_index, class_index]
    else:
        rank = torch.zeros_like(image_index)
    maps = x.new_zeros((0,) + tuple(pair_masks.shape[1:]))
    for r in range(int(rank.max()) + 1 if rank.numel() else 0):
        sel = (rank == r).nonzero(as_tuple=True)[0]
        out = explainer(model, x[image_index[sel]], class_index[sel])
        m = as_attribution_maps(out.maps, "explain_present_classes", "explanation maps").detach()
        if r == 0:
            maps = m.new_zeros((image_index.numel(),) + tuple(m.shape[1:]))
        maps[sel] = m
    return {"attributions": maps, "masks": pair_masks.to(maps.device), "image_index": image_index, "class_index": class_index}


class LocalisationMeter(StreamingMetric):
    """Mean EPG and IoU over (image, present class) pairs, accumulated over batches.

    ``update(attributions, masks)`` with one map and one mask per pair (see
    :func:`explain_present_classes`); ``compute()`` returns ``epg`` (mean of
    :func:`energy_pointing_game`), ``iou`` (mean of :func:`iou`) and ``count`` (pairs).

    Parameters
    ----------
    iou_rule, iou_value : the binarisation of :func:`binarise` used for IoU.
    """

    def __init__(self, *, iou_rule: str = "fraction_of_max", iou_value: float = 0.5):
        super().__init__()
        check_binarisation(iou_rule, iou_value, "LocalisationMeter")  # at construction, not at the first update
        self.iou_rule = iou_rule
        self.iou_value = iou_value
        for name in ("epg", "iou", "count"):
            self._register(name)

    def update(self, attributions: torch.Tensor, masks: torch.Tensor) -> None:
        """Add the pairs of one batch: attributions and masks of shape (N, H, W) or (N, 1, H, W)."""
        a = as_attribution_maps(attributions, "LocalisationMeter.update").detach()
        if a.shape[0] == 0:
            return
        self._add("epg", energy_pointing_game(a, masks).sum())
        self._add("iou", iou(a, masks, rule=self.iou_rule, value=self.iou_value).sum())
        self._add("count", a.shape[0])

    def compute(self) -> dict:
        s = self._state
        return {"epg": ratio(s["epg"], s["count"]), "iou": ratio(s["iou"], s["count"]), "count": int(s["count"])}
