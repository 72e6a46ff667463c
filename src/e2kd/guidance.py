"""Model guidance: train a teacher whose explanations look at the object (Rao et al., ICCV 2023).

Rao, Böhle, Parchami-Araghi, Schiele, "Studying How to Efficiently and Effectively Guide Models
with Explanations", ICCV 2023. A localisation loss on a differentiable explanation of each
guided class is added to the classification loss:

    loss = cls_loss + weight · guidance_loss

Parchami-Araghi et al. (ECCV 2024) use such guided teachers for Waterbirds (a teacher that
looks at the bird) and Pascal VOC (an EPG-optimised and an IoU-optimised teacher).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .explain.base import Explainer, create
from .metrics.localisation import as_attribution_maps, energy_pointing_game, maps_and_masks

__all__ = ["GuidanceLoss", "energy_loss", "l1_loss", "contrast_weights", "GUIDANCE_KINDS"]

GUIDANCE_KINDS = ("energy", "l1")


def energy_loss(attributions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    r"""Energy loss of Rao et al. (ICCV 2023, Sec. 3.3): one minus the energy pointing game.

    .. math:: L_{energy} = 1 - \mathrm{EPG}(A, M)

    with :math:`\mathrm{EPG}` the share of positive attribution energy inside the mask
    (:func:`e2kd.metrics.energy_pointing_game`). Only positive attributions count; pushing
    energy into the boxes does not force the attribution to cover them. A map with no positive
    energy has loss 1 (and no gradient through the ratio).

    Parameters
    ----------
    attributions : Tensor, shape (N, H, W) or (N, 1, H, W), differentiable
    masks : Tensor, same shape, entries in {0, 1}

    Returns
    -------
    Tensor, shape (N,)
    """
    return 1.0 - energy_pointing_game(attributions, masks)


def l1_loss(attributions: torch.Tensor, masks: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""L1 localisation loss of Rao et al. (ICCV 2023, Sec. 3.3, after Gao et al.'s GRADIA).

    The positive attribution is normalised by its maximum and compared with the box mask:

    .. math::
        \hat A = \frac{\max(A, 0)}{\max(\max_{ij} A_{ij},\ \epsilon)},\qquad
        L_{1} = \frac{1}{HW}\sum_{ij} \big|\hat A_{ij} - M_{ij}\big|

    It penalises attribution outside the boxes (:math:`\hat A > 0` where :math:`M = 0`) and
    attribution missing inside them (:math:`\hat A < 1` where :math:`M = 1`), so it makes the
    attribution *fill* the boxes; this suits IoU, whereas the energy loss suits EPG. An
    all-zero map has loss equal to the mask's area fraction.

    Parameters
    ----------
    attributions : Tensor, shape (N, H, W) or (N, 1, H, W), differentiable
    masks : Tensor, same shape, entries in {0, 1}

    Returns
    -------
    Tensor, shape (N,)
    """
    a, m = maps_and_masks(attributions, masks, "l1_loss")  # same shape, binary masks (as energy_loss checks them)
    pos = a.clamp_min(0).flatten(1)
    norm = pos / pos.amax(dim=1, keepdim=True).clamp_min(eps)
    return (norm - m.flatten(1)).abs().mean(dim=1)


_LOSSES = {"energy": energy_loss, "l1": l1_loss}


def contrast_weights(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    r"""Logit weights (B, C) of the contrast :math:`z_y - \frac{1}{C-1}\sum_{k \ne y} z_k`:
    1 at the true class, :math:`-1/(C-1)` elsewhere (for :math:`C = 2`, the margin
    :math:`z_y - z_{1-y}`). A target for any explainer (see ``e2kd.explain.resolve_target``)."""
    batch, classes = logits.shape
    if classes < 2:
        raise ValueError(f"contrast_weights: a contrast needs at least 2 classes, the model has {classes}")
    labels = labels.reshape(-1).long().to(logits.device)
    if labels.numel() != batch:
        raise ValueError(f"contrast_weights: {labels.numel()} labels for {batch} rows of logits")
    onehot = F.one_hot(labels, classes).to(logits.dtype if logits.is_floating_point() else torch.float32)
    return onehot - (1.0 - onehot) / (classes - 1)


class GuidanceLoss(nn.Module):
    r"""Classification loss plus a model-guidance loss on differentiable explanations.

    ``forward(model, x, labels, masks)`` runs ONE explained forward pass
    (``explainer(model, x, target, create_graph=True)`` returns the logits and the maps
    together) and returns ``dict(loss, cls_loss, guidance_loss, logits)`` with
    ``loss = cls_loss + weight · guidance_loss``; call ``loss.backward()``.

    * **Single-label** (``labels``: LongTensor (B,), ``masks``: (B, 1, H, W) or (B, H, W)):
      the true class is explained; ``cls_loss`` is the cross-entropy.
    * **Multi-label** (``labels``: multi-hot float (B, C), ``masks``: per-class (B, C, H, W)):
      each step explains ONE present class per image, drawn uniformly at random among its
      present classes, as Rao et al. do for efficiency (the expected loss equals the mean over
      present classes); ``cls_loss`` is the binary cross-entropy with logits. Images with no
      present class are left out of the guidance loss.

    ``guidance_loss`` is the mean of :func:`energy_loss` or :func:`l1_loss` over the guided
    images (0 when there are none). The explainer must give one map per image at the masks'
    resolution: ``GradCAM()`` (upsampled, the default) or
    ``BcosExplainer(output="contributions")``.

    A failure mode to watch (``zero_maps`` in the output): a map with no positive attribution
    has energy loss 1 but no gradient, and the energy loss rewards raising a uniform threshold
    under the map, so a fast optimiser can push a class's whole map below zero and leave it
    there. It happens with GradCAM on softmax classifiers, where a class can win by the other
    classes' negative evidence alone, so its own map need not stay positive. It happens with
    B-cos contributions too: they sum to the logit (minus the fixed logit bias), and under a
    softmax the true logit may sit below zero as long as the others sit lower (a TuxBirds
    B-cos teacher guided this way, weight 5, had 99 % dead maps from step 160 on, EPG 0.2 %).
    Maps whose sum a loss keeps positive do not die: with ``contrast=True`` the map sums to the
    margin :math:`z_y - \mathrm{mean}_{k \ne y} z_k`, which the cross-entropy pushes up (the
    same teacher: no dead map, EPG 52 %); in multi-label training, maps of present classes
    whose logits the binary cross-entropy pushes above zero (B-cos contributions, or GradCAM
    before global average pooling with a bias-free head). Otherwise fine-tune a trained
    classifier (as Rao et al. do) with a small learning rate and watch ``zero_maps``.

    Parameters
    ----------
    kind : {"energy", "l1"}
        The localisation loss of Rao et al. (ICCV 2023).
    explainer : str, dict or Explainer
        A name for :func:`e2kd.explainers.create`, a dict with ``name`` and keyword arguments,
        or an instance; default ``"gradcam"``.
    weight : float
        Weight of the guidance loss (Rao et al.'s λ_loc).
    contrast : bool
        Single-label only. False (Rao et al.): explain the true logit :math:`z_y`. True:
        explain the contrast :math:`z_y - \frac{1}{C-1}\sum_{k \ne y} z_k` (for two classes the
        margin that decides the prediction), whose map also holds the other classes' evidence.
        Guiding :math:`z_y` alone leaves a shortcut open: the background may still lower the
        *other* logit (negative evidence, which the energy loss does not see), and a
        100 %-correlated training set rewards exactly that. The contrast map charges it.
    generator : torch.Generator, optional
        Source of the per-step class draws for multi-label batches (on the CPU).
    """

    def __init__(
        self,
        *,
        kind: str = "energy",
        explainer: Union[str, dict, Explainer] = "gradcam",
        weight: float = 1.0,
        contrast: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        if kind not in GUIDANCE_KINDS:
            raise ValueError(f"GuidanceLoss: unknown kind {kind!r}; choose one of {GUIDANCE_KINDS}")
        if not weight >= 0:
            raise ValueError(f"GuidanceLoss: weight must be >= 0, got {weight}")
        if isinstance(explainer, dict):
            spec = dict(explainer)
            if "name" not in spec:
                raise ValueError("GuidanceLoss: an explainer dict needs a 'name' key, e.g. {'name': 'gradcam'}")
            explainer = create(spec.pop("name"), **spec)
        elif isinstance(explainer, str):
            explainer = create(explainer)
        elif not isinstance(explainer, Explainer):
            raise ValueError(f"GuidanceLoss: explainer must be a name, a dict or an Explainer, got {type(explainer).__name__}")
        self.kind = kind
        self.explainer = explainer
        self.weight = float(weight)
        self.contrast = bool(contrast)
        self.generator = generator

    def _targets(self, labels: torch.Tensor, masks: torch.Tensor, batch: int):
        """Class to explain per image, the mask of that class, and which images are guided."""
        if labels.is_floating_point():
            if labels.dim() != 2 or labels.shape[0] != batch:
                raise ValueError(f"GuidanceLoss: multi-hot labels must have shape ({batch}, C), got {tuple(labels.shape)}")
            if masks.dim() != 4 or masks.shape[:2] != labels.shape:
                raise ValueError(
                    f"GuidanceLoss: multi-label masks must have shape (B, C, H, W) = ({batch}, {labels.shape[1]}, H, W), "
                    f"got {tuple(masks.shape)}"
                )
            if self.contrast:
                raise ValueError(
                    "GuidanceLoss: contrast=True is for single-label classification (one true class per image); "
                    "with multi-hot labels each present class is guided on its own mask: set contrast=False"
                )
            present = labels.detach() > 0.5
            guided = present.any(dim=1)
            weights = present.float().cpu()
            weights[~guided.cpu()] = 1.0  # any class; these rows are left out of the loss
            target = torch.multinomial(weights, 1, generator=self.generator)[:, 0].to(labels.device)
            return target, masks[torch.arange(batch, device=masks.device), target.to(masks.device)], guided
        labels = labels.reshape(-1)
        if labels.numel() != batch:
            raise ValueError(f"GuidanceLoss: {labels.numel()} labels for a batch of {batch} images")
        m = as_attribution_maps(masks, "GuidanceLoss", "masks")
        if m.shape[0] != batch:
            raise ValueError(f"GuidanceLoss: {m.shape[0]} masks for a batch of {batch} images")
        return labels.long(), m, torch.ones(batch, dtype=torch.bool, device=labels.device)

    def forward(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> dict:
        """One guided training step's losses.

        Parameters
        ----------
        model : nn.Module
        x : Tensor, shape (B, C, H, W)
        labels : LongTensor (B,) or multi-hot float (B, K)
        masks : Tensor (B, 1, H, W) / (B, H, W), or per-class (B, K, H, W); entries in {0, 1}

        Returns
        -------
        dict with ``loss``, ``cls_loss``, ``guidance_loss`` (scalars), ``logits`` (B, K) and
        ``zero_maps`` (share of guided maps without positive attribution; detached)
        """
        if not torch.is_tensor(labels) or not torch.is_tensor(masks):
            raise ValueError("GuidanceLoss: labels and masks must be tensors")
        target, target_masks, guided = self._targets(labels, masks, x.shape[0])
        if self.contrast:
            target = functools.partial(contrast_weights, target)
        out = self.explainer(model, x, target, create_graph=True)
        logits = out.logits
        if labels.is_floating_point():
            cls_loss = F.binary_cross_entropy_with_logits(logits, labels.to(device=logits.device, dtype=logits.dtype))
        else:
            cls_loss = F.cross_entropy(logits, labels.reshape(-1).long().to(logits.device))
        maps = as_attribution_maps(out.maps, "GuidanceLoss", "explanation maps")
        if maps.shape[-2:] != target_masks.shape[-2:]:
            raise ValueError(
                f"GuidanceLoss: explanation maps of size {tuple(maps.shape[-2:])} and masks of size "
                f"{tuple(target_masks.shape[-2:])} differ; explain at the image resolution (GradCAM(upsample=True))"
            )
        per_image = _LOSSES[self.kind](maps, target_masks.to(maps.device))
        guided = guided.to(per_image.device)
        if bool(guided.any()):
            guidance = per_image[guided].mean()
        else:
            guidance = (per_image * 0.0).sum()
        with torch.no_grad():
            dead = (maps.detach().flatten(1).amax(dim=1) <= 0) & guided
            zero_maps = dead.sum().float() / guided.sum().clamp_min(1)
        return {
            "loss": cls_loss + self.weight * guidance,
            "cls_loss": cls_loss,
            "guidance_loss": guidance,
            "logits": logits,
            "zero_maps": zero_maps,
        }

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, explainer={self.explainer!r}, weight={self.weight}, contrast={self.contrast}"
