"""B-cos explanations as an e2kd explainer: the dynamic linear weights W(x) of the target logit."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .._conv import expect_second_order
from ..explain.base import Explainer, Explanation, check_logits, register_explainer, resolve_target, target_score, unwrap
from .layers import InputEncoding
from .mode import constant_factors_backward, explanation_mode

__all__ = ["BcosExplainer", "find_encoding"]


def find_encoding(model: nn.Module) -> InputEncoding:
    """The :class:`InputEncoding` module of a B-cos model; a clear error for other models."""
    inner = unwrap(model)
    found = [m for m in inner.modules() if isinstance(m, InputEncoding)]
    if len(found) != 1:
        raise ValueError(
            f"BcosExplainer needs a B-cos model with one e2kd.bcos InputEncoding as its first operation; "
            f"{type(inner).__name__} has {len(found)}. Build one with "
            "e2kd.models.create_model('bcos_resnet18', ...) or use explainer='gradcam' for standard models"
        )
    return found[0]


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@register_explainer("bcos")
class BcosExplainer(Explainer):
    r"""B-cos explanation of the target class (Böhle et al., TPAMI 2024), differentiable.

    A B-cos network is dynamic linear: with its dynamic factors held constant,
    :math:`z_c(x) = W_c(x)^\top \tilde x + b` with :math:`\tilde x = [x, 1-x]` the encoded input
    and :math:`b = \log(1/(C-1))` the logit bias, and

    .. math:: W_c(x) = \frac{\partial z_c}{\partial \tilde x}\Big|_{\text{factors constant}}

    Parameters
    ----------
    output : {"weights", "contributions"}
        ``"weights"``: :math:`W_c(x)`, maps of shape (B, 2·C_in, H, W), what the e²KD loss
        compares (as in the paper). ``"contributions"``: :math:`\sum_{ch} W_c(x)\odot\tilde x`,
        shape (B, 1, H, W), what one visualises and scores for localisation.

    With ``create_graph=True`` (a student) the model runs **one** ordinary forward pass; the
    factors become constants only inside the ``torch.autograd.grad`` call that yields
    :math:`W_c(x)` (see :mod:`e2kd.bcos.mode`), so the maps are differentiable in every
    parameter and the same logits carry the full gradient of any other loss term. With
    ``create_graph=False`` (a teacher) the forward pass runs in explanation mode with the
    parameters frozen, so only the input gradient is computed and no graph is kept.
    """

    name = "bcos"

    def __init__(self, output: str = "weights"):
        if output not in ("weights", "contributions"):
            raise ValueError(f"BcosExplainer: output must be 'weights' or 'contributions', got {output!r}")
        self.output = output

    def explain(self, model, x, target, *, create_graph):
        encoding = find_encoding(model)
        captured: list[torch.Tensor] = []

        def hook(_mod, _inp, out):
            if captured:
                raise ValueError("BcosExplainer: the model encoded its input twice in one forward pass")
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            captured.append(out)
            return out

        handle = encoding.register_forward_hook(hook)
        try:
            if create_graph:
                with expect_second_order():
                    logits = model(x)
            else:
                with explanation_mode(unwrap(model)), _frozen_parameters(unwrap(model)):
                    logits = model(x)
        finally:
            handle.remove()
        check_logits(logits, x, "BcosExplainer")
        if not captured:
            raise ValueError("BcosExplainer: the model's InputEncoding was not called in the forward pass")
        x_enc = captured[0]
        tgt = resolve_target(logits, target, "BcosExplainer")
        score = target_score(logits, tgt)
        if create_graph:
            with constant_factors_backward():
                (weights,) = torch.autograd.grad(score, x_enc, create_graph=True)
        else:
            (weights,) = torch.autograd.grad(score, x_enc)
            logits, x_enc = logits.detach(), x_enc.detach()
        if self.output == "contributions":
            maps = (weights * x_enc).sum(dim=1, keepdim=True)
        else:
            maps = weights
        return Explanation(logits, maps, tgt)
