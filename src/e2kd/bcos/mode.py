"""Explanation mode: the dynamic factors of a B-cos network treated as constants.

A B-cos network is dynamic linear: every layer computes ``y = f(x) · (linear map of x)``
where the factor ``f(x)`` (the ``|cos|^(B-1)`` scale of a B-cos unit, the ``1/σ`` of a
normalisation layer, the softmax attention matrix) depends on the input. Treating every such
factor as a constant turns the network into the linear map ``z = W(x)ᵀ x`` whose weights
``W(x) = ∂z/∂x`` are the B-cos explanation (Böhle et al., "B-cos Alignment for Inherently
Interpretable CNNs and Vision Transformers", TPAMI 2024).

Two ways to make the factors constant:

* **At forward time**, inside ``with explanation_mode(model):`` — the layers detach their
  factors while they compute them. Cheapest when only the explanation is needed (a teacher).
* **At backward time**: outside explanation mode the layers route every factor through the
  autograd functions below, whose backward asks :func:`factors_are_constant` which formula to
  use. :class:`e2kd.bcos.BcosExplainer` turns that switch on only while it calls
  ``torch.autograd.grad(logit, x_enc, create_graph=True)`` for ``W(x)``; the ordinary
  ``loss.backward()`` later sees the full derivative. So **one** student forward pass gives the
  exact explanation (differentiable in every parameter) and the full training gradient.

In the constant-factor backward the formulas use the factor as the forward pass computed it,
not a detached copy: the values of ``W(x)`` are the same, and with ``create_graph=True`` its
second-order graph reaches the parameters both through the linear parts and through the
factors' own dependence on the parameters. So ``loss.backward()`` gives the exact gradient of
any loss on ``W(x)`` (checked against finite differences in the tests), as the reference
implementation's backward-time switch does. A separate forward pass in explanation mode
detaches the factors and would drop the second part.

The switch is process-wide (the autograd engine may run backward on its own device threads),
so two explanation backward passes must not run concurrently in different threads.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = [
    "DynamicLinearModule",
    "explanation_mode",
    "constant_factors_backward",
    "factors_are_constant",
    "scale_by_factor",
    "scale_affine",
    "bcos_scale",
    "attend",
]

_CONSTANT_BACKWARD = [0]


def factors_are_constant() -> bool:
    """Whether a backward pass running now treats the dynamic factors as constants."""
    return _CONSTANT_BACKWARD[0] > 0


@contextmanager
def constant_factors_backward() -> Iterator[None]:
    """Within this block, backward passes through B-cos layers treat dynamic factors as constants.

    Wrap exactly the ``torch.autograd.grad`` call that computes an explanation; never a
    training ``loss.backward()``.
    """
    _CONSTANT_BACKWARD[0] += 1
    try:
        yield
    finally:
        _CONSTANT_BACKWARD[0] -= 1


class DynamicLinearModule(nn.Module):
    """Base of every layer with a dynamic factor; ``explanation_mode`` detaches it at forward."""

    explanation_mode: bool = False


@contextmanager
def explanation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Detach every dynamic factor of ``model`` in forward passes run inside the block.

    Exception-safe: the previous state of each layer is restored on exit, also when the block
    raises. Nested use is allowed.

    Parameters
    ----------
    model : nn.Module
        A B-cos model (or any module containing B-cos layers; wrappers such as
        DistributedDataParallel are looked through).

    Yields
    ------
    nn.Module
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"explanation_mode expects an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, DynamicLinearModule)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no B-cos layers (e2kd.bcos.layers); explanation mode only "
            "applies to B-cos models such as e2kd.models.create_model('bcos_resnet18')"
        )
    before = [m.explanation_mode for m in layers]
    try:
        for m in layers:
            m.explanation_mode = True
        yield model
    finally:
        for m, b in zip(layers, before):
            m.explanation_mode = b


class _ScaleByFactor(torch.autograd.Function):
    """``y = x · s`` with ``s`` a dynamic factor broadcast against ``x``."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, gy):
        x, s = ctx.saved_tensors
        gx = gy * s if ctx.needs_input_grad[0] else None
        if factors_are_constant():  # no gradient to the factor; s stays in the graph
            return gx, None
        gs = (gy * x).sum_to_size(s.shape) if ctx.needs_input_grad[1] else None
        return gx, gs


def scale_by_factor(x: torch.Tensor, s: torch.Tensor, *, detach: bool = False) -> torch.Tensor:
    """``x · s`` where ``s`` is a dynamic factor (constant in explanation backward passes).

    Parameters
    ----------
    x : Tensor, any shape
    s : Tensor, broadcastable to ``x``
    detach : bool
        Forward-time explanation mode: use ``s.detach()`` (plain product).
    """
    if detach:
        return x * s.detach()
    if not (x.requires_grad or s.requires_grad) or not torch.is_grad_enabled():
        return x * s
    return _ScaleByFactor.apply(x, s)


class _BcosScale(torch.autograd.Function):
    """``y = out · (|out| / n)^(B-1)``; see :func:`bcos_scale`. Saves ``out`` and ``1/n``."""

    @staticmethod
    def forward(ctx, out, inv_norm, b):
        ctx.b = b
        ctx.save_for_backward(out, inv_norm)
        return _bcos_value(out, inv_norm, b)

    @staticmethod
    def backward(ctx, gy):
        out, inv = ctx.saved_tensors
        b = ctx.b
        if factors_are_constant():
            return gy * _bcos_factor(out, inv, b), None, None
        if b == 2:
            # y = out|out|·r  =>  ∂y/∂out = 2|out|·r,  ∂y/∂r = out|out|
            t = gy * out.abs()
            gout = t * (2 * inv) if ctx.needs_input_grad[0] else None
            ginv = (t * out).sum_to_size(inv.shape) if ctx.needs_input_grad[1] else None
            return gout, ginv, None
        # y = out · c^(B-1) with c = |out|·r + ε  =>  ∂y/∂out = c^(B-2) · (c + (B-1)|out|·r),
        # ∂y/∂r = (B-1) · out|out| · c^(B-2)
        t = out.abs() * inv
        c = t + _COS_EPS
        factor = c.pow(b - 1)
        per_c = factor / c  # c^(B-2); c >= ε > 0
        gout = gy * (factor + (b - 1) * t * per_c) if ctx.needs_input_grad[0] else None
        ginv = (gy * out * out.abs() * per_c).mul(b - 1).sum_to_size(inv.shape) if ctx.needs_input_grad[1] else None
        return gout, ginv, None


# Added to |cos| before the power when B != 2, as the B-cos v2 reference implementation does
# (it keeps the factor's gradient finite at cos = 0 for B < 2); B = 2 uses |cos| itself there too.
_COS_EPS = 1e-6


def _bcos_factor(out: torch.Tensor, inv_norm: torch.Tensor, b: float) -> torch.Tensor:
    if b == 2:
        return out.abs() * inv_norm
    return (out.abs() * inv_norm + _COS_EPS).pow(b - 1)


def _bcos_value(out: torch.Tensor, inv_norm: torch.Tensor, b: float) -> torch.Tensor:
    if b == 2:
        return out * out.abs() * inv_norm
    return out * _bcos_factor(out, inv_norm, b)


def bcos_scale(out: torch.Tensor, norm: torch.Tensor, b: float, *, detach: bool = False) -> torch.Tensor:
    r"""The B-cos non-linearity applied to a linear response (Böhle et al., CVPR 2022, Eq. 3).

    .. math::
        y = |\cos(x, \hat w)|^{B-1}\, \hat w^\top x,\qquad
        \cos(x, \hat w) = \frac{\hat w^\top x}{\|x\|}

    For ``B != 2`` the power is taken of :math:`|\cos| + 10^{-6}`, as in the B-cos v2
    reference implementation (which the released checkpoints were trained with).

    Parameters
    ----------
    out : Tensor, shape (N, C_out, ...)
        The linear response ``ŵᵀx`` with unit-norm ``ŵ``.
    norm : Tensor, broadcastable to ``out`` (e.g. (N, 1, ...))
        ``‖x‖`` of the input patch or vector (strictly positive).
    b : float
        The exponent B (>= 1).
    detach : bool
        Forward-time explanation mode: the factor ``|cos|^(B-1)`` is detached.

    Returns
    -------
    Tensor, shape of ``out``
    """
    if b == 1:
        return out
    if detach:
        with torch.no_grad():
            factor = _bcos_factor(out, norm.reciprocal(), b)
        return out * factor
    inv = norm.reciprocal()
    if not (out.requires_grad or inv.requires_grad) or not torch.is_grad_enabled():
        return _bcos_value(out, inv, b)
    return _BcosScale.apply(out, inv, b)


class _ScaleAffine(torch.autograd.Function):
    """``y = x · s · γ`` with ``s`` a per-channel dynamic factor and ``γ`` a parameter."""

    @staticmethod
    def forward(ctx, x, s, gamma):
        ctx.save_for_backward(x, s, gamma)
        return x * (s * gamma)

    @staticmethod
    def backward(ctx, gy):
        x, s, gamma = ctx.saved_tensors
        gx = gy * (s * gamma) if ctx.needs_input_grad[0] else None
        if factors_are_constant():  # only the input gradient; s and γ stay in the graph
            return gx, None, None
        gs = ggamma = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gyx = gy * x
            if s.shape == gamma.shape:  # per-channel factor and weight (batch norm): one reduction
                r = gyx.sum_to_size(s.shape)
                gs, ggamma = r * gamma, r * s
            else:
                gs = (gyx * gamma).sum_to_size(s.shape) if ctx.needs_input_grad[1] else None
                ggamma = (gyx * s).sum_to_size(gamma.shape) if ctx.needs_input_grad[2] else None
            gs = gs if ctx.needs_input_grad[1] else None
            ggamma = ggamma if ctx.needs_input_grad[2] else None
        return gx, gs, ggamma


def scale_affine(x: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, *, detach: bool = False) -> torch.Tensor:
    """``x · s · γ``: a normalisation with dynamic factor ``s`` and affine weight ``γ`` (one pass).

    Parameters
    ----------
    x : Tensor, shape (N, C, ...) or (..., C)
    s : Tensor, broadcastable to ``x`` (the dynamic factor, e.g. ``1/σ``)
    gamma : Tensor, broadcastable to ``x`` (a parameter, never treated as constant)
    detach : bool
        Forward-time explanation mode: ``s`` is detached.
    """
    if detach:
        return x * (s.detach() * gamma)
    if not torch.is_grad_enabled() or not (x.requires_grad or s.requires_grad or gamma.requires_grad):
        return x * (s * gamma)
    return _ScaleAffine.apply(x, s, gamma)


class _Attend(torch.autograd.Function):
    """``attn @ v`` with ``attn`` a dynamic factor."""

    @staticmethod
    def forward(ctx, attn, v):
        ctx.save_for_backward(attn, v)
        return attn @ v

    @staticmethod
    def backward(ctx, gy):
        attn, v = ctx.saved_tensors
        gv = attn.transpose(-1, -2) @ gy if ctx.needs_input_grad[1] else None
        if factors_are_constant():  # no gradient to the attention matrix; it stays in the graph
            return None, gv
        ga = gy @ v.transpose(-1, -2) if ctx.needs_input_grad[0] else None
        return ga, gv


def attend(attn: torch.Tensor, v: torch.Tensor, *, detach: bool = False) -> torch.Tensor:
    """``attn @ v`` where the attention matrix is a dynamic factor.

    Parameters
    ----------
    attn : Tensor, shape (B, heads, N, N)
    v : Tensor, shape (B, heads, N, d)
    detach : bool
        Forward-time explanation mode.
    """
    if detach:
        return attn.detach() @ v
    if not (attn.requires_grad or v.requires_grad) or not torch.is_grad_enabled():
        return attn @ v
    return _Attend.apply(attn, v)
