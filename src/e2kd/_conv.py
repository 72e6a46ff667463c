"""Convolutions whose backward is assembled from chosen operations (torch only).

:class:`_Conv2d` is ``F.conv2d`` (no bias, groups 1, dilation 1) with an input gradient that is
itself an autograd node (:class:`_ConvInputGrad`), so that a second-order pass through it (the
explanation term of e²KD) uses fast kernels, and with weight gradients from
:func:`conv2d_weight_grad`, which on the CPU replaces oneDNN's slow kernel at tiny outputs by one
matrix product. The B-cos layers use it for trained weights (:func:`e2kd.bcos.layers.conv2d`);
:func:`use_fast_small_convs` gives ordinary ``nn.Conv2d`` modules the same choice.

Which of the two a convolution takes (:func:`prefer_conv2d_function`) depends on the device,
the output size, the stride and on whether its backward will be differentiated again: an
explainer that differentiates a student's input gradient runs the student's forward inside
:func:`expect_second_order`, and there strided convolutions use :class:`_Conv2d` on the CPU
too (``python -m benchmarks.second_order`` times both on every layer of a model).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "conv2d_function",
    "conv2d_weight_grad",
    "expect_second_order",
    "matmul_weight_grad",
    "nchw_for_onednn_1x1",
    "onednn_1x1_bug",
    "prefer_conv2d_function",
    "second_order_expected",
    "use_fast_small_convs",
]


# On the CPU, oneDNN's weight gradient of a 3 x 3 convolution whose output has only a few pixels
# (the last stage of an ImageNet-stem ResNet at 64 px: 2 x 2) is 1.3-13x slower than the same sum
# written as one matrix product over unfolded patches (``python -m benchmarks.conv_weight_grad``);
# from about 3 x 3 output pixels on, oneDNN is as fast or faster.
_MATMUL_WEIGHT_GRAD_MAX_PIXELS = 4


_SECOND_ORDER = [0]


@contextmanager
def expect_second_order() -> Iterator[None]:
    """Forward passes inside this block build graphs whose backward will itself be
    differentiated (a student's explanation taken with ``create_graph=True``): trained
    convolutions then use :class:`_Conv2d`, whose second-order pass is cheaper than the native
    ``_convolution_double_backward``. Values and gradients are the same either way; only speed
    changes. Process-wide (like :func:`e2kd.bcos.mode.constant_factors_backward`), so forward
    passes of other models must not run concurrently in other threads meanwhile."""
    _SECOND_ORDER[0] += 1
    try:
        yield
    finally:
        _SECOND_ORDER[0] -= 1


def second_order_expected() -> bool:
    """Whether a forward pass running now is inside :func:`expect_second_order`."""
    return _SECOND_ORDER[0] > 0


def _output_pixels(size, kernel, stride, padding) -> int:
    n = 1
    for i in range(2):
        n *= (size[i] + 2 * padding[i] - kernel[i]) // stride[i] + 1
    return n


def conv2d_weight_grad(
    x: torch.Tensor, g: torch.Tensor, weight_shape, stride, padding, *, channels_last: bool = False
) -> torch.Tensor:
    r"""Weight gradient of ``y = conv2d(x, w)`` (no bias, groups 1, dilation 1) for an output
    gradient ``g``:

    .. math:: \frac{\partial L}{\partial w_{o,c,i,j}} = \sum_{n,p}
              g_{n,o,p}\; x_{n,c,\,s p + (i,j) - \text{pad}}

    On the CPU, where the output has at most ``_MATMUL_WEIGHT_GRAD_MAX_PIXELS`` pixels, computed as
    one matrix product of ``g`` with the unfolded input patches; elsewhere by the native kernel.
    Differentiable in ``x`` and ``g`` either way. ``channels_last``: the weight is stored
    channels-last, and the matrix product writes its gradient in that layout (no copy later).
    """
    if x.device.type != "cpu" or g.shape[-2] * g.shape[-1] > _MATMUL_WEIGHT_GRAD_MAX_PIXELS:
        if x.device.type == "cpu" and onednn_1x1_bug(weight_shape, stride):  # in NCHW (see nchw_for_onednn_1x1)
            x, g = x.contiguous(), g.contiguous()
        return torch.nn.grad.conv2d_weight(x, weight_shape, g, stride, padding)
    return matmul_weight_grad(x, g, weight_shape, stride, padding, channels_last=channels_last)


def matmul_weight_grad(
    x: torch.Tensor, g: torch.Tensor, weight_shape, stride, padding, *, channels_last: bool = False
) -> torch.Tensor:
    """The sum of :func:`conv2d_weight_grad` as one matrix product of ``g`` with the unfolded
    input patches, on any device and output size; with ``channels_last`` the result is laid out
    channels-last (the patches' columns are reordered, not the weight-sized result)."""
    o, c, kh, kw = weight_shape
    patches = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (N, C·kh·kw, P)
    cols = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·P, C·kh·kw)
    if channels_last:  # columns in (kh, kw, C) order: the memory order of a channels-last weight
        cols = cols.view(-1, c, kh * kw).transpose(1, 2).reshape(cols.shape)
    rows = g.flatten(2).transpose(0, 1).reshape(o, -1)  # (O, N·P), same (n, p) order
    if torch.is_grad_enabled():
        out = rows @ cols
        if channels_last:
            return out.view(o, kh, kw, c).permute(0, 3, 1, 2)
        return out.view(weight_shape)
    # Outside a differentiated backward, the product is written into a weight-shaped tensor
    # that is returned itself, not a view: autograd adds a second gradient of the same weight
    # in place only into a tensor that solely owns its memory (a view shares it with its base),
    # and otherwise allocates and writes a new weight-sized sum.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(weight_shape, dtype=rows.dtype, device=rows.device, memory_format=fmt)
    flat = out.permute(0, 2, 3, 1) if channels_last else out  # memory order (O, kh, kw, C) / (O, C, kh, kw)
    torch.mm(rows, cols, out=flat.view(o, cols.shape[1]))
    return out


def _needed(ctx, i: int) -> bool:
    """Whether the running backward pass needs the gradient of input ``i`` of a custom autograd
    function. ``ctx.needs_input_grad`` only says that the input requires grad; autograd does not
    prune a Python function's outputs, so without this check an explanation pass
    (``torch.autograd.grad(score, x, create_graph=True)``) would also compute every weight
    gradient. Falls back to ``needs_input_grad`` where the engine cannot tell (a leaf input
    under ``torch.autograd.grad``) and in a backward traced by ``torch.compile``, which runs
    ahead of any engine pass (and which torch 2.11 refuses ``ctx.next_functions`` in)."""
    if not ctx.needs_input_grad[i]:
        return False
    if torch.compiler.is_compiling():
        return True
    node = ctx.next_functions[i][0]
    try:
        return node is not None and bool(torch._C._will_engine_execute_node(node))
    except Exception:  # noqa: BLE001 - no answer (an old torch, a tracing backend): compute it
        return True


def _channels_last(weight: torch.Tensor) -> bool:
    """Whether a 4-D weight is stored channels-last (and not also contiguous, as 1 x 1 ones are)."""
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


class _ConvInputGrad(torch.autograd.Function):
    """Input gradient of a convolution, ``conv_transpose2d(g, w)``, as an autograd node whose own
    backward uses :func:`conv2d_weight_grad` for ``∂/∂w`` (a student's explanation is
    differentiated through it once more) and a plain convolution for ``∂/∂g``."""

    @staticmethod
    def forward(ctx, g, weight, input_shape, stride, padding):
        ctx.save_for_backward(g, weight)
        ctx.geometry = (stride, padding)
        kh, kw = weight.shape[-2:]
        full = [(g.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + (kh, kw)[i] for i in range(2)]
        extra = tuple(input_shape[-2 + i] - full[i] for i in range(2))
        return F.conv_transpose2d(g, weight, None, stride, padding, extra)

    @staticmethod
    def backward(ctx, u):
        g, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        gg = F.conv2d(u, weight, None, stride, padding) if _needed(ctx, 0) else None
        gw = None
        if _needed(ctx, 1):
            gw = conv2d_weight_grad(u, g, weight.shape, stride, padding, channels_last=_channels_last(weight))
        return gg, gw, None, None, None


class _Conv2d(torch.autograd.Function):
    """``F.conv2d(x, w)`` (no bias, groups 1, dilation 1) whose backward is built from operations
    chosen for a trained B-cos weight, so that the second-order pass of a student's explanation
    stays cheap.

    The input gradient is :class:`_ConvInputGrad`. When it is taken with ``create_graph=True``
    (a student's explanation), its own backward is a convolution for ``∂/∂g`` and a weight
    gradient for ``∂/∂w``. Through the native convolution the same second-order pass goes to
    ``_convolution_double_backward``, which on CUDA forms the weight term as a convolution over
    the batch with an output-sized kernel (dilated by the stride): 9-18 ms a call for a batch of
    128 at 224 px on an H100. The live B-cos e²KD step (B-cos ResNet-34 -> ResNet-18, bf16)
    went from 175 to 112 ms with this function (``python -m benchmarks.bcos_conv``). Weight
    gradients go through :func:`conv2d_weight_grad`.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding)
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        gx = gw = None
        if _needed(ctx, 0):
            w = weight.to(g.dtype)  # under autocast the forward ran in the gradient's dtype
            gx = _ConvInputGrad.apply(g, w, tuple(x.shape), stride, padding).to(x.dtype)
        if _needed(ctx, 1):
            gw = conv2d_weight_grad(
                x.to(g.dtype), g, weight.shape, stride, padding, channels_last=_channels_last(weight)
            ).to(weight.dtype)
        return gx, gw, None, None


def conv2d_function(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """:class:`_Conv2d` as autocast runs ``F.conv2d``: under autocast both operands are cast to
    its dtype once, before the function (differentiable casts, so that a second-order pass still
    reaches the float32 weight; float64 is left alone, as autocast leaves it), and the function
    runs on them with autocast off. Its backward then casts nothing, and it keeps the input for
    the weight gradient at the autocast dtype's size."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point() and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _Conv2d.apply(x.to(dtype), weight.to(dtype), tuple(stride), tuple(padding))
    return _Conv2d.apply(x, weight, tuple(stride), tuple(padding))


def onednn_1x1_bug(weight_shape, stride) -> bool:
    """Whether a convolution with a weight of ``weight_shape`` (out, in / groups, kh, kw) and
    ``stride`` has the geometry whose channels-last CPU weight gradient oneDNN gets wrong (see
    :func:`nchw_for_onednn_1x1`)."""
    return tuple(weight_shape[-2:]) == (1, 1) and 1 < weight_shape[1] < 8 and any(s > 1 for s in stride)


def nchw_for_onednn_1x1(x: torch.Tensor, weight: torch.Tensor, stride) -> tuple:
    """``(x, weight)`` in PyTorch's default (NCHW) layout where oneDNN's CPU weight gradient of a
    channels-last convolution is broken: a 1 x 1 kernel, a stride above 1 and 2-7 input
    channels. There the AVX2 kernel writes past its workspace (uxlfoundation/oneDNN#6035):
    wrong weight gradients, a hang with two threads, heap corruption with one (measured with
    torch 2.14.1; 8 or more channels, stride 1 and the NCHW layout are unaffected). Unchanged
    elsewhere; values and gradients are the same either way. :func:`conv2d_weight_grad` (the
    weight gradients of :class:`_Conv2d`, first and second order) does the same with its inputs."""
    if x.device.type == "cpu" and onednn_1x1_bug(weight.shape, stride) and torch.is_grad_enabled() and weight.requires_grad:
        # a 1 x 1 weight converted to channels-last counts as contiguous but keeps channels-last
        # strides, which alone select the broken kernel: copy it (at most 7 values per filter)
        standard = weight.stride() == (weight.shape[1], 1, 1, 1)
        return x.contiguous(), weight if standard else weight.clone(memory_format=torch.contiguous_format)
    return x, weight


def prefer_conv2d_function(x: torch.Tensor, weight: torch.Tensor, stride, padding, *, cuda_always: bool = True) -> bool:
    """Whether a trained convolution should run through :class:`_Conv2d` rather than the native
    one. On CUDA: inside :func:`expect_second_order` (the native second-order pass is the slow
    one there), and with ``cuda_always`` (the B-cos layers, measured on an H100) for first-order
    steps too. On the CPU: at most ``_MATMUL_WEIGHT_GRAD_MAX_PIXELS`` output pixels, and, inside
    :func:`expect_second_order`, strided convolutions, whose native second-order pass forms the
    weight term as a convolution with a stride-dilated kernel. Measured per layer by
    ``python -m benchmarks.second_order``: for a student's e²KD step, ``_Conv2d`` takes 0.56-0.94x
    the native time on strided and tiny-output convolutions of a B-cos ResNet-18 at 64 px and
    1.01-1.13x on the others; for a first-order step 0.40-0.87x at <= 4 pixels, 1.02-1.18x elsewhere."""
    if x.is_cuda:
        return cuda_always or second_order_expected()
    if small_output_on_cpu(x, weight, stride, padding):
        return True
    return second_order_expected() and any(s > 1 for s in stride)


def small_output_on_cpu(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> bool:
    """Whether a convolution of ``x`` runs on the CPU with at most
    ``_MATMUL_WEIGHT_GRAD_MAX_PIXELS`` output pixels (where :class:`_Conv2d` is the faster path)."""
    return x.device.type == "cpu" and (
        _output_pixels(x.shape[-2:], weight.shape[-2:], stride, padding) <= _MATMUL_WEIGHT_GRAD_MAX_PIXELS
    )


class FastSmallConv2d(nn.Conv2d):
    """``nn.Conv2d`` that trains through :class:`_Conv2d` where :func:`prefer_conv2d_function`
    says so: on the CPU where its output has at most ``_MATMUL_WEIGHT_GRAD_MAX_PIXELS`` pixels
    (its weight gradient is then a matrix product, 2-13x faster than oneDNN's); inside
    :func:`expect_second_order` (a student explained by its input gradient) when strided, and on
    CUDA; the native convolution everywhere else, first-order steps on CUDA included. Same
    parameters and state-dict keys as ``nn.Conv2d``."""

    def _conv_forward(self, input, weight, bias):
        input, weight = nchw_for_onednn_1x1(input, weight, self.stride)
        if (
            torch.is_grad_enabled()
            and weight.requires_grad
            and isinstance(self.padding, tuple)
            and prefer_conv2d_function(input, weight, self.stride, self.padding, cuda_always=False)
        ):
            out = conv2d_function(input, weight, self.stride, self.padding)
            return out if bias is None else out + bias.to(out.dtype).view(1, -1, 1, 1)
        return super()._conv_forward(input, weight, bias)


def use_fast_small_convs(model: nn.Module) -> nn.Module:
    """Give every plain ``nn.Conv2d`` of ``model`` that :class:`_Conv2d` can represent (groups 1,
    dilation 1, zero padding) the behaviour of :class:`FastSmallConv2d`, in place; returns
    ``model``. Values, gradients and state dict are unchanged; only CPU training steps with
    tiny feature maps (an ImageNet-stem ResNet's last stage at 64 px) and steps that
    differentiate an input-gradient explanation get faster."""
    for m in model.modules():
        if (
            type(m) is nn.Conv2d
            and m.groups == 1
            and m.dilation == (1, 1)
            and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple)
        ):
            m.__class__ = FastSmallConv2d
    return model
