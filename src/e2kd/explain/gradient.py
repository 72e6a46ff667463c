"""Input-gradient explanations: saliency (Simonyan et al., 2014) and input × gradient
(Shrikumar et al., 2016), both differentiable for training."""

from __future__ import annotations

from typing import Optional

import torch

from .._conv import expect_second_order
from .base import Explainer, Explanation, check_logits, register_explainer, resolve_target, target_score

__all__ = ["Gradient", "InputXGradient", "input_gradient"]


def input_gradient(model, x, target, *, create_graph: bool, who: str):
    """One forward pass; returns ``(logits, target, x_leaf, ∂z_target/∂x)``."""
    x_in = x.detach().requires_grad_(True)
    if create_graph:  # the gradient will be differentiated again: second-order-friendly convolutions
        with expect_second_order():
            logits = model(x_in)
    else:
        logits = model(x_in)
    check_logits(logits, x, who)
    tgt = resolve_target(logits, target, who)
    score = target_score(logits, tgt)
    (grad,) = torch.autograd.grad(score, x_in, create_graph=create_graph)
    return logits, tgt, x_in, grad


_REDUCTIONS = ("sum", "max", "none")


def _reduce(m: torch.Tensor, how: str) -> torch.Tensor:
    if how == "sum":
        return m.sum(dim=1, keepdim=True)
    if how == "max":
        return m.amax(dim=1, keepdim=True)
    return m


@register_explainer("inputxgradient")
class InputXGradient(Explainer):
    r"""Input × gradient: :math:`M = \sum_{ch} x \odot \partial z_c / \partial x`.

    Parameters
    ----------
    reduce_channels : {"sum", "max", "none"}
        How the per-channel attributions become a map; ``"none"`` keeps shape (B, C, H, W).

    Returns maps of shape (B, 1, H, W) (or (B, C, H, W) with ``reduce_channels="none"``).
    """

    name = "inputxgradient"

    def __init__(self, reduce_channels: str = "sum"):
        if reduce_channels not in _REDUCTIONS:
            raise ValueError(f"reduce_channels must be one of {_REDUCTIONS}, got {reduce_channels!r}")
        self.reduce_channels = reduce_channels

    def explain(self, model, x, target, *, create_graph):
        logits, tgt, x_in, grad = input_gradient(model, x, target, create_graph=create_graph, who="InputXGradient")
        return Explanation(logits, _reduce(x_in * grad, self.reduce_channels), tgt)


@register_explainer("gradient")
class Gradient(Explainer):
    r"""Saliency: :math:`M = \max_{ch} |\partial z_c / \partial x|` (Simonyan et al., 2014).

    Parameters
    ----------
    absolute : bool
        Take absolute values before reducing (default True, as in the original).
    reduce_channels : {"max", "sum", "none"}

    Returns maps of shape (B, 1, H, W) (or (B, C, H, W) with ``reduce_channels="none"``).
    """

    name = "gradient"

    def __init__(self, absolute: bool = True, reduce_channels: Optional[str] = "max"):
        if reduce_channels not in _REDUCTIONS:
            raise ValueError(f"reduce_channels must be one of {_REDUCTIONS}, got {reduce_channels!r}")
        self.absolute = absolute
        self.reduce_channels = reduce_channels

    def explain(self, model, x, target, *, create_graph):
        logits, tgt, _, grad = input_gradient(model, x, target, create_graph=create_graph, who="Gradient")
        g = grad.abs() if self.absolute else grad
        return Explanation(logits, _reduce(g, self.reduce_channels), tgt)
