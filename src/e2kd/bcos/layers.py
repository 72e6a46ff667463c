"""B-cos layers (Böhle et al., CVPR 2022; B-cos v2, TPAMI 2024), torch only.

Every layer is dynamic linear: in explanation mode (:mod:`e2kd.bcos.mode`) it is a linear map
of its input without bias. Module and parameter names follow the public B-cos v2 code, so that
released checkpoints load into the models of :mod:`e2kd.bcos.models` unchanged
(``conv.linear.weight``, uncentred norms with ``weight`` and running statistics, no biases).
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _conv
from .mode import DynamicLinearModule, _bcos_factor, attend, bcos_scale, scale_affine

__all__ = [
    "InputEncoding",
    "encode_input",
    "BcosConv2d",
    "BcosLinear",
    "BatchNormUncentred2d",
    "BcosLayerNorm",
    "BcosAttention",
    "LogitBias",
]

_Pair = Union[int, Tuple[int, int]]


def encode_input(x: torch.Tensor) -> torch.Tensor:
    r"""The B-cos input encoding ``[x, 1 − x]`` (Böhle et al., TPAMI 2024, Sec. 3.3).

    .. math:: \tilde x = [x_1, \dots, x_C, 1 - x_1, \dots, 1 - x_C]

    Every pixel of the encoded image has the same norm direction-independent of brightness, so
    black pixels can contribute too.

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W), values in [0, 1]

    Returns
    -------
    Tensor, shape (B, 2C, H, W)
    """
    return torch.cat([x, 1.0 - x], dim=1)


class InputEncoding(nn.Module):
    """First operation of every B-cos model: checks the raw image and encodes it as ``[x, 1 − x]``.

    Parameters
    ----------
    in_chans : int
        Number of raw image channels C (3 for RGB); the model's first layer sees 2C.

    Raises
    ------
    ValueError
        On a wrong channel count or on values outside [0, 1] (the value check runs in eager
        calls; a graph traced by ``torch.compile`` leaves it out rather than split there).
    """

    def __init__(self, in_chans: int):
        super().__init__()
        if int(in_chans) < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.in_chans = int(in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"B-cos model: expected an image batch of shape (B, C, H, W), got {shape}")
        if x.shape[1] != self.in_chans:
            hint = ""
            if x.shape[1] == 2 * self.in_chans:
                hint = (
                    f" The input looks already encoded as [x, 1-x] ({2 * self.in_chans} channels); "
                    "pass the raw image in [0, 1]: the model encodes it itself."
                )
            raise ValueError(
                f"B-cos model: expected {self.in_chans} raw image channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}).{hint} Build the model with in_chans={x.shape[1]} "
                "if your images have that many channels."
            )
        if not x.is_floating_point():
            raise ValueError(f"B-cos model: expected a float image in [0, 1], got dtype {x.dtype}; use x.float() / 255")
        if not torch.compiler.is_compiling():  # a data-dependent check would split a compiled graph
            lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()  # one device synchronisation, not two
            if lo < 0.0 or hi > 1.0 or math.isnan(lo) or math.isnan(hi):
                raise ValueError(
                    f"B-cos model: image values must lie in [0, 1], got min {lo:.4g} and max {hi:.4g}. "
                    "Do not normalise with mean/std: pass the image scaled to [0, 1] "
                    "(the model encodes it as [x, 1-x] itself)."
                )
        return encode_input(x)

    def extra_repr(self) -> str:
        return f"in_chans={self.in_chans} -> {2 * self.in_chans} channels [x, 1-x]"


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    """``‖w_o‖`` of every row ``w_o = w[o]`` (all dimensions but the first), keeping dimensions."""
    return torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)  # any layout, no copy


def _memory_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, rest) in memory order: a view where every row is one dense block (NCHW or
    channels-last), a copy in the logical order otherwise."""
    k = t[0].numel() if t.shape[0] else 0
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    if dense and t.stride(0) == k:
        return t.as_strided((t.shape[0], k), (k, 1))
    return t.reshape(t.shape[0], -1)


class _UnitRows(torch.autograd.Function):
    r"""``u = w / ‖w‖`` row by row (all dimensions but the first), with its backward in three
    passes instead of autograd's generic division and norm nodes (a fifth of a B-cos ResNet-18
    KD step on the CPU went there):

    .. math:: \frac{\partial L}{\partial w_o} = \frac{g_o - u_o \langle g_o, u_o\rangle}{\|w_o\|}

    The backward is built from differentiable operations on the saved input and output, so it
    can itself be differentiated.
    """

    @staticmethod
    def forward(ctx, w):
        norms = _row_norms(w)
        u = w / norms
        ctx.save_for_backward(w, u)
        ctx.norms = norms
        return u

    @staticmethod
    def backward(ctx, g):
        w, u = ctx.saved_tensors
        # differentiated again (create_graph): the norms' own dependence on w must be in the graph;
        # traced by torch.compile, which takes no out= of a channels-last layout: the plain formula
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            norms = _row_norms(w) if torch.is_grad_enabled() else ctx.norms
            dot = torch.linalg.vecdot(g.flatten(1), u.flatten(1)).view_as(norms)
            return torch.addcmul(g, u, dot, value=-1) / norms
        norms = ctx.norms
        # row dots in memory order (1.5x faster than a batched matrix product), without copies when
        # g and u share a layout (channels-last weights included); the gradient takes w's layout,
        # which the parameter's gradient must have anyway
        same = g.stride() == u.stride()
        rows = _memory_rows if same else (lambda t: t.flatten(1))
        dot = torch.linalg.vecdot(rows(g), rows(u)).view_as(norms)
        return torch.addcmul(g, u, dot, value=-1, out=torch.empty_like(w)).div_(norms)


def _unit_rows(module: nn.Module) -> torch.Tensor:
    """``w / ‖w‖`` row by row (over all dimensions but the first); cached while the weight is frozen and unchanged.

    A trainable weight is normalised on every call (the normalisation is part of its graph), and
    seeing it trainable drops any cached copy: an optimiser may change it in place without
    bumping its version counter (PyTorch's fused kernels do), so a copy cached while the weight
    was frozen for a moment (a student explained at evaluation) could not be told apart from the
    current weight later. A frozen one (``requires_grad=False``, e.g. a distillation teacher) is
    normalised once and reused until the weight tensor is replaced or modified in place (checked
    by its storage pointer, version counter, dtype and device). Under autocast the frozen copy is
    also kept in the autocast dtype, which every convolution would otherwise cast it to on every
    call (the unit rows are computed in the weight's own dtype first, then rounded once).
    """
    w = module.weight
    if w.requires_grad:
        if "_unit_cache" in module.__dict__:  # (no call at all in the usual case: torch.compile cannot trace the pop)
            del module.__dict__["_unit_cache"]
        return _UnitRows.apply(w) if torch.is_grad_enabled() else w / _row_norms(w)
    key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
    cached = module.__dict__.get("_unit_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            unit = w / _row_norms(w)
        module.__dict__["_unit_cache"] = cached = (key, unit, {})
    unit, cast = cached[1], cached[2]
    device = w.device.type
    if w.is_floating_point() and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype != unit.dtype:
            if dtype not in cast:
                cast[dtype] = unit.to(dtype)
            return cast[dtype]
    return unit


class _NormedConv2d(nn.Conv2d):
    """Holds the weight (key ``linear.weight``); the B-cos layer uses its unit-norm rows."""

    def unit_weight(self) -> torch.Tensor:
        return _unit_rows(self)


class _ExplainedConv(torch.autograd.Function):
    """Forward-time explanation mode of a frozen B-cos convolution, input gradient only.

    ``y = (ŵ * x) · f`` with the factor ``f = |ŵ * x|^(B-1) / ‖x‖^(B-1)`` a constant. Saves
    only ``f`` and the weight (not the input patch tensor ``x``, which the input gradient
    ``ŵᵀ ⋆ (f · g)`` does not need).
    """

    @staticmethod
    def forward(ctx, x, weight, inv_norm, stride, padding, b):
        out = F.conv2d(x, weight, None, stride, padding)
        factor = _bcos_factor(out, inv_norm, b)
        ctx.save_for_backward(factor, weight)
        ctx.geometry = (tuple(x.shape), stride, padding, out.dtype)
        return out * factor

    @staticmethod
    def backward(ctx, gy):
        factor, weight = ctx.saved_tensors
        shape, stride, padding, dtype = ctx.geometry
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        # in the forward convolution's dtype (autocast's, if it ran under autocast), as autograd
        # runs a native convolution's backward; the engine casts gx to x's dtype
        g = (gy * factor).to(dtype)
        gx = torch.nn.grad.conv2d_input(shape, weight.to(dtype), g, stride, padding)
        return gx, None, None, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, *, cheap=None) -> torch.Tensor:
    """The B-cos layers' linear convolution: :class:`_Conv2d` where a weight is trained (its
    backward may be differentiated again) and ``cheap``, the native one otherwise.

    ``cheap=None`` (default) asks :func:`e2kd._conv.prefer_conv2d_function`: :class:`_Conv2d` on
    CUDA and, on the CPU, at most ``_MATMUL_WEIGHT_GRAD_MAX_PIXELS`` output pixels (its weight
    gradients then go through a matrix product, 2-13x faster there) and strided convolutions of
    a student whose explanation is differentiated (:func:`e2kd._conv.expect_second_order`); the
    native convolution for the rest, where it is the faster one
    (``python -m benchmarks.second_order``, ``python -m benchmarks.bcos_conv``)."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.conv2d(x, weight, None, stride, padding)
    x, weight = _conv.nchw_for_onednn_1x1(x, weight, stride)
    if cheap is None:
        cheap = _conv.prefer_conv2d_function(x, weight, stride, padding)
    if cheap:
        return _conv.conv2d_function(x, weight, stride, padding)
    return F.conv2d(x, weight, None, stride, padding)


class BcosConv2d(DynamicLinearModule):
    r"""B-cos convolution (Böhle et al., CVPR 2022; B-cos v2).

    For each output position with input patch ``x`` and unit-norm filter ``ŵ = w / ‖w‖``:

    .. math::
        y = |\cos(x, \hat w)|^{B-1}\,\hat w^\top x,\qquad
        \|x\| = \sqrt{\textstyle\sum_{\text{patch}} x^2 + 10^{-6}}

    With ``max_out = M > 1`` the layer holds ``M`` filters per output channel and keeps the
    largest linear response before the scaling. No bias.

    Parameters (keyword-only after ``kernel_size``)
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding : int or pair
    b : float
        The exponent B (default 2).
    max_out : int
        Number of max-out units per output channel (default 1: none).

    Shapes: input (N, C_in, H, W) -> output (N, C_out, H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Pair = 1,
        *,
        stride: _Pair = 1,
        padding: _Pair = 0,
        b: float = 2.0,
        max_out: int = 1,
    ):
        super().__init__()
        if b < 1:
            raise ValueError(f"B-cos exponent b must be >= 1, got {b}")
        if int(max_out) < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.b = float(b)
        self.max_out = int(max_out)
        self.linear = _NormedConv2d(
            in_channels, out_channels * self.max_out, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.kernel_size = self.linear.kernel_size
        self.stride = self.linear.stride
        self.padding = self.linear.padding
        self.patch_size = self.kernel_size[0] * self.kernel_size[1]

    def patch_norms(self, x: torch.Tensor) -> torch.Tensor:
        """``‖x‖`` of every input patch, shape (N, 1, H', W')."""
        sq = x.square().sum(dim=1, keepdim=True)
        if self.kernel_size == (1, 1) and self.stride == (1, 1):
            total = sq
        else:
            total = F.avg_pool2d(sq, self.kernel_size, self.stride, self.padding) * self.patch_size
        return (total + 1e-6).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.unit_weight()
        if (
            self.explanation_mode
            and self.b != 1
            and self.max_out == 1
            and not weight.requires_grad
            and torch.is_grad_enabled()
            and x.requires_grad
        ):
            # A frozen model explained at forward time (a teacher): keep the factor, not x.
            with torch.no_grad():
                inv_norm = self.patch_norms(x).reciprocal()
            return _ExplainedConv.apply(x, weight, inv_norm, self.stride, self.padding, self.b)
        out = conv2d(x, weight, self.stride, self.padding)
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_channels, self.max_out)).amax(dim=2)
        if self.b == 1:
            return out
        if self.explanation_mode:
            with torch.no_grad():
                norm = self.patch_norms(x)
            return bcos_scale(out, norm, self.b, detach=True)
        return bcos_scale(out, self.patch_norms(x), self.b)

    def extra_repr(self) -> str:
        return f"B={self.b:g}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")


class _NormedLinear(nn.Linear):
    def unit_weight(self) -> torch.Tensor:
        return _unit_rows(self)


class BcosLinear(DynamicLinearModule):
    r"""B-cos linear layer: the formula of :class:`BcosConv2d` on vectors.

    .. math:: y = |\cos(x, \hat w)|^{B-1}\,\hat w^\top x,\qquad \|x\| = \|x\|_2 + 10^{-12}

    Shapes: input (..., in_features) -> output (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, *, b: float = 2.0, max_out: int = 1):
        super().__init__()
        if b < 1:
            raise ValueError(f"B-cos exponent b must be >= 1, got {b}")
        if int(max_out) < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        self.in_features, self.out_features = in_features, out_features
        self.b = float(b)
        self.max_out = int(max_out)
        self.linear = _NormedLinear(in_features, out_features * self.max_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.linear.unit_weight())
        if self.max_out > 1:
            out = out.unflatten(-1, (self.out_features, self.max_out)).amax(dim=-1)
        if self.b == 1:
            return out
        if self.explanation_mode:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-12
            return bcos_scale(out, norm, self.b, detach=True)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-12
        return bcos_scale(out, norm, self.b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, B={self.b:g}" + (
            f", max_out={self.max_out}" if self.max_out > 1 else ""
        )


class _BatchVariance(torch.autograd.Function):
    """Biased per-channel variance of (N, C, H, W) from the native batch-norm statistics kernel
    (about 3x faster on the CPU than ``Tensor.var`` over dimensions (0, 2, 3))."""

    @staticmethod
    def forward(ctx, x):
        mean, var = torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)
        ctx.save_for_backward(x)
        ctx.mean = mean
        # an explanation's backward pass (factors constant) sends no gradient to the variance:
        # pass that on as no gradient instead of an input-sized tensor of zeros, which would also
        # be recorded for, and differentiated in, the second-order pass
        ctx.set_materialize_grads(False)
        return var

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None
        (x,) = ctx.saved_tensors
        # differentiated again (create_graph): the mean's own dependence on x must be in the graph
        mean = x.mean(dim=(0, 2, 3)) if torch.is_grad_enabled() else ctx.mean
        scale = g * (2.0 / (x.numel() // x.shape[1]))
        return (x - mean[:, None, None]).mul_(scale[:, None, None])


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    r"""Biased variance of every channel of a batch ``x`` of shape (N, C, H, W):

    .. math:: \sigma_c^2 = \frac{1}{NHW} \sum_{n,h,w} (x_{nchw} - \mu_c)^2

    Differentiable (twice); float32 / float64 through the native batch-norm statistics kernel,
    other dtypes, and graphs traced by ``torch.compile`` (whose fake tensors that kernel does not
    take), through ``Tensor.var``.
    """
    if (
        x.dtype in (torch.float32, torch.float64)
        and x.shape[0] * x.shape[2] * x.shape[3] > 0
        and not torch.compiler.is_compiling()
    ):
        return _BatchVariance.apply(x)
    return x.var(dim=(0, 2, 3), unbiased=False)


class BatchNormUncentred2d(nn.BatchNorm2d, DynamicLinearModule):
    r"""Uncentred batch norm without bias (B-cos v2, "BNU").

    .. math:: y_c = \gamma_c \, \frac{x_c}{\sqrt{\sigma_c^2 + \epsilon}}

    with :math:`\sigma_c^2` the (biased) batch variance of channel ``c`` in training and the
    running variance in evaluation. The mean is not subtracted, so the layer has no offset:
    ``1/σ`` is the dynamic factor. Buffers are those of :class:`torch.nn.BatchNorm2d`
    (``running_mean`` is kept for checkpoint compatibility but unused); there is no ``bias``.

    Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1):
        nn.BatchNorm2d.__init__(self, num_features, eps=eps, momentum=momentum)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchNormUncentred2d expects (N, C, H, W), got {tuple(x.shape)}")
        if not self.training:
            inv = torch.rsqrt(self.running_var + self.eps)
            return x * (self.weight * inv)[None, :, None, None]
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.explanation_mode):
            var = batch_variance(x)
        with torch.no_grad():
            self.running_var.mul_(1 - momentum).add_(var.detach(), alpha=momentum)
        inv = torch.rsqrt(var + self.eps)[None, :, None, None]
        return scale_affine(x, inv, self.weight[None, :, None, None], detach=self.explanation_mode)


class BcosLayerNorm(nn.LayerNorm, DynamicLinearModule):
    r"""Layer norm without bias over the last dimension (B-cos v2 transformers).

    .. math:: y = \gamma \odot \frac{x - \mu(x)}{\sqrt{\sigma^2(x) + \epsilon}}

    (``centred=False`` drops the ``− μ(x)``, with σ² then the mean of ``x²``). Subtracting the
    mean is linear; ``1/σ`` is the dynamic factor. State-dict key: ``weight`` only.

    Shapes: (..., D) -> (..., D).
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, centred: bool = True):
        nn.LayerNorm.__init__(self, dim, eps=eps)
        self.bias = None
        self.centred = bool(centred)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centred:
            x = x - x.mean(dim=-1, keepdim=True)
        if self.explanation_mode:
            with torch.no_grad():
                inv = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + self.eps)
        else:
            inv = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + self.eps)
        return scale_affine(x, inv, self.weight, detach=self.explanation_mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", centred={self.centred}, bias=False"


class BcosAttention(DynamicLinearModule):
    r"""Multi-head self-attention of the B-cos SimpleViT (B-cos v2, TPAMI 2024).

    .. math::
        A = \mathrm{softmax}\big(q k^\top / \sqrt{d}\big),\qquad
        y = \mathrm{BcosLinear}\big(A\, v\big)

    with ``q, k, v`` from one bias-free linear map of the layer-normed input. The attention
    matrix ``A`` is the dynamic factor; ``v`` is linear in the input.

    Keys: ``norm.weight``, ``to_qkv.weight`` (3·heads·d, dim), ``to_out.linear.weight``.
    Shapes: (B, N, dim) -> (B, N, dim).
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, b: float = 2.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = BcosLayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = BcosLinear(inner, dim, b=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.to_qkv(x).view(bsz, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.explanation_mode:
            with torch.no_grad():
                attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        else:
            attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        out = attend(attn, v, detach=self.explanation_mode)
        return self.to_out(out.transpose(1, 2).reshape(bsz, n, -1))


class LogitBias(nn.Module):
    r"""The fixed logit bias of B-cos classifiers (B-cos v2): ``z + log(1 / (C − 1))``.

    With all-zero contributions every class then has probability ``1/C`` under a sigmoid.
    A constant, not a parameter (no state-dict key).

    Shapes: (B, C) -> (B, C).
    """

    def __init__(self, num_classes: int):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"B-cos classifiers need num_classes >= 2 (logit bias log(1/(C-1))), got {num_classes}")
        self.bias = math.log(1.0 / (int(num_classes) - 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.bias

    def extra_repr(self) -> str:
        return f"bias={self.bias:.4f}"
