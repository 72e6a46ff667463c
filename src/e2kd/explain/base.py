"""The explainer interface shared by every explanation family, and the explainer registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

__all__ = [
    "Explanation", "Explainer", "TargetOutOfRange", "register_explainer", "create", "available", "resolve_target",
    "target_score",
]


@dataclass
class Explanation:
    r"""The output of one explained forward pass.

    Attributes
    ----------
    logits : Tensor, shape (B, C)
        The model's logits from the same forward pass that produced the maps.
    maps : Tensor, shape (B, K, H, W)
        One explanation per sample for its target class (``K`` = 1 for GradCAM-like maps,
        6 for B-cos dynamic weights, ...).
    target : Tensor, shape (B,) or (B, C)
        The explained class of each sample, or, when the explainer was given logit weights,
        those weights (B, C): the explained score was :math:`\sum_c w_{bc} z_{bc}`.
    """

    logits: torch.Tensor
    maps: torch.Tensor
    target: torch.Tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel / compiled wrapper (only
    those: any other module is returned as it is, whatever its attributes are called)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's wrapper (torch._dynamo.eval_frame), not imported here
        else:
            return model


def check_input(x: torch.Tensor, who: str) -> None:
    if not torch.is_tensor(x):
        raise ValueError(f"{who}: input must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{who}: input must be a floating-point image batch, got dtype {x.dtype}; "
            "convert it with x.float() (and scale to the range the model expects)"
        )
    if x.dim() != 4:
        raise ValueError(f"{who}: input must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{who}: input batch is empty")


class TargetOutOfRange(ValueError):
    """A target class index that the model does not have."""

    def __init__(self, message: str, classes: int):
        super().__init__(message)
        self.classes = classes


def resolve_target(logits: torch.Tensor, target: Optional[torch.Tensor | int], who: str) -> torch.Tensor:
    r"""Class indices to explain (the model's own top-1 when ``target`` is None), or logit weights.

    A floating-point ``target`` of shape (B, C) holds logit weights: the explained score of image
    b is :math:`\sum_c w_{bc} z_{bc}` (see :func:`target_score`), e.g. a margin
    :math:`z_y - z_j` with :math:`w = e_y - e_j`. They are returned on the logits' device, in fp32.
    A callable ``target`` is called with the detached logits and returns either form (targets
    that depend on the prediction, e.g. the runner-up class).
    """
    batch, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    if callable(target) and not torch.is_tensor(target):
        target = target(logits.detach())
    if isinstance(target, bool) or (torch.is_tensor(target) and target.dtype == torch.bool):
        raise ValueError(
            f"{who}: target must hold class indices or logit weights, got booleans; for a mask over classes "
            "pass its float weights (mask.float()), for class indices an integer tensor"
        )
    if isinstance(target, int):
        target = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    if not torch.is_tensor(target):
        raise ValueError(
            f"{who}: target must be None, an int, a tensor of class indices or logit weights, or a callable "
            f"of the logits, got {type(target).__name__}"
        )
    if target.is_complex():
        raise ValueError(f"{who}: target must hold integer class indices or real logit weights, got dtype {target.dtype}")
    if target.is_floating_point():
        if target.dim() != 2 or tuple(target.shape) != (batch, classes):
            raise ValueError(
                f"{who}: a floating-point target holds logit weights of shape (batch, classes) = "
                f"{(batch, classes)}, got {tuple(target.shape)}; pass integer class indices of shape "
                f"({batch},) to explain single classes"
            )
        if not bool(torch.isfinite(target).all()):
            raise ValueError(f"{who}: logit weights must be finite")
        return target.detach().to(device=logits.device, dtype=torch.float32)
    target = target.reshape(-1).to(device=logits.device, dtype=torch.long)
    if target.numel() != batch:
        raise ValueError(
            f"{who}: batch-size mismatch: {target.numel()} targets for a batch of {batch} images"
        )
    if target.numel():
        lo, hi = torch.stack(torch.aminmax(target)).tolist()  # one device synchronisation, not two
        if lo < 0 or hi >= classes:
            bad = hi if hi >= classes else lo
            raise TargetOutOfRange(f"{who}: target index {bad} is out of range for a model with {classes} classes", classes)
    return target


def target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""The scalar whose gradient the explainers take: :math:`\sum_b z_{b,t_b}` for class
    indices ``target`` (B,), or :math:`\sum_b \sum_c w_{bc} z_{bc}` for logit weights (B, C)
    (as returned by :func:`resolve_target`)."""
    if target.dim() == 2:
        return (logits * target.to(logits.dtype)).sum()
    return logits.gather(1, target[:, None]).sum()


def check_logits(logits: torch.Tensor, x: torch.Tensor, who: str) -> None:
    if not torch.is_tensor(logits) or logits.dim() != 2:
        raise ValueError(
            f"{who}: the model must return logits of shape (B, classes), got "
            f"{tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__}"
        )
    if logits.shape[0] != x.shape[0]:
        raise ValueError(f"{who}: the model returned {logits.shape[0]} rows for a batch of {x.shape[0]}")


class Explainer:
    """Base class: ``explainer(model, x, target=None, *, create_graph=False) -> Explanation``.

    Subclasses implement :meth:`explain`. One forward pass yields both the logits and the maps.

    * ``target=None`` explains each sample's own top-1 class; an int or a tensor of shape (B,)
      explains those classes.
    * ``create_graph=True`` keeps the maps (and logits) differentiable with respect to the
      model's parameters (double backpropagation through :func:`torch.autograd.grad`);
      ``False`` returns detached tensors and keeps no graph. A ``torch.compile``-d model is
      refused here (ValueError): its graph has no second-order gradient, and depending on the
      graph torch fails or drops the maps' dependence on the parameters without an error.
    """

    name: str = "explainer"

    def __call__(self, model: nn.Module, x: torch.Tensor, target=None, *, create_graph: bool = False) -> Explanation:
        check_input(x, type(self).__name__)
        if create_graph and is_compiled(model):
            raise ValueError(
                f"{type(self).__name__}: the model is compiled (torch.compile), and create_graph=True (what e²KD's "
                "student and model guidance need) differentiates its explanation a second time, which compiled "
                "graphs do not support: torch fails, or drops the explanation's gradient without an error. Explain "
                "the uncompiled model (e2kd.Distiller: give it the uncompiled student, or lam=0 for plain KD; "
                "compiling the teacher is fine)"
            )
        with torch.enable_grad():
            out = self.explain(model, x, target, create_graph=create_graph)
        if not create_graph:
            out = Explanation(out.logits.detach(), out.maps.detach(), out.target)
        return out

    def explain(self, model: nn.Module, x: torch.Tensor, target, *, create_graph: bool) -> Explanation:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


_REGISTRY: Dict[str, Callable[..., Explainer]] = {}


def register_explainer(name: str) -> Callable:
    """Class or factory decorator: make an explainer constructible by name from configs."""

    def deco(factory):
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"explainer {name!r} is already registered")
        _REGISTRY[key] = factory
        return factory

    return deco


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(_REGISTRY)


def create(name: str | Explainer, **kwargs) -> Explainer:
    """Build a registered explainer: ``create("gradcam", layer="layer4")``."""
    if isinstance(name, Explainer):
        if kwargs:
            raise ValueError("create(): keyword arguments given with an explainer instance")
        return name
    key = str(name).lower()
    if key not in _REGISTRY:
        # B-cos explainers register when their package is imported: import it before looking
        # again, or listing what is available.
        import importlib

        importlib.import_module("e2kd.bcos")
        if key not in _REGISTRY:
            import difflib

            close = difflib.get_close_matches(key, available(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown explainer {name!r}; {hint}available: {', '.join(available())}")
    return _REGISTRY[key](**kwargs)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper, directly or inside a data-parallel
    wrapper (``.module``)."""
    for m in (module, getattr(module, "module", None)):
        if m is not None and type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod"):
            return True
    return False
