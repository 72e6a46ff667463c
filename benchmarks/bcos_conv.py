"""Which implementation of the B-cos layers' operations makes a distillation step fastest: a side-by-side check.

    python -m benchmarks.bcos_conv --size 64 --batch 16 --threads 2 --steps 8           # CPU
    python -m benchmarks.bcos_conv --device cuda --size 224 --batch 128 --amp bf16 --channels-last

Times, interleaved in one process, the KD and live e²KD steps of B-cos ResNet-34 -> B-cos
ResNet-18 with the B-cos layers' operations run several ways (``--modes``; all but ``previous``
and ``unpruned`` call ``loss.backward(inputs=trained parameters)`` as the trainer does):

* ``previous``: the operations as they were before 2026-11-27: native ``F.conv2d`` everywhere
  on the CPU (:class:`_Conv2d` on CUDA, computing weight gradients in explanation passes too),
  the unit-norm weights through autograd's division and norm nodes, the batch variance through
  ``Tensor.var``, a plain ``loss.backward()``;
* ``native``: ``F.conv2d`` everywhere (its second-order pass goes through
  ``_convolution_double_backward``, its weight gradients through oneDNN / cuDNN);
* ``cheap``: :class:`e2kd._conv._Conv2d` everywhere (transposed convolution for the input
  gradient, :func:`e2kd._conv.conv2d_weight_grad` for the weight gradients);
* ``unpruned``: ``first_order`` with a plain ``loss.backward()``, which also differentiates the
  loss with respect to the explained input (what every step did before the trainer called
  ``backward(inputs=trained parameters)``);
* ``first_order``: the dispatch of 2026-11-27 (``cheap`` on CUDA; on the CPU ``cheap`` only for
  convolutions with at most 4 output pixels, whether or not the step differentiates an
  explanation; fused unit-norm backward; native batch statistics);
* ``cast_each_call``: ``default`` with autocast handled as before 2026-11-27 (a difference
  only under ``--amp``): a frozen teacher's unit-norm weights kept in float32 and cast by every
  convolution, its input gradient computed in float32, and :class:`_Conv2d` casting its
  operands itself, in its forward and again in each backward;
* ``zero_variance_grads``: ``default`` with the batch variance of a training-mode batch norm
  given an input-sized tensor of zeros in an explanation's backward pass (computed there,
  recorded in its graph and differentiated again in the step's backward), as before
  2026-11-27, instead of no gradient;
* ``default``: what the B-cos layers do now: ``first_order``, and ``cheap`` for every trained
  convolution of a student whose explanation is differentiated
  (:func:`e2kd._conv.expect_second_order`).

Prints median step times, and for each row the paired ratio (median over rounds of this step /
the same round's step) to the KD step of ``default`` and to the same step of the first mode.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from functools import partial

import torch

from e2kd import _conv
from e2kd.bcos import layers

from .step import (
    PAIRS, Variant, add_heap_arg, add_step_args, apply_heap_arg, build_teacher, make_input, override_pair, paired_ratio, sync,
)

MODES = ("previous", "native", "cheap", "unpruned", "first_order", "cast_each_call", "zero_variance_grads", "default")


class _AutogradUnitRows:
    """The unit-norm weights as computed before :class:`e2kd.bcos.layers._UnitRows`."""

    @staticmethod
    def apply(w):
        return w / torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)


class _FloatBackwardExplainedConv(layers._ExplainedConv):
    """The teacher's explained convolution as before 2026-11-27: its input gradient in the
    factor's dtype (float32 under autocast), whatever dtype the forward convolution ran in."""

    @staticmethod
    def backward(ctx, gy):
        factor, weight = ctx.saved_tensors
        shape, stride, padding = ctx.geometry[:3]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        g = gy * factor
        return torch.nn.grad.conv2d_input(shape, weight.to(g.dtype), g, stride, padding), None, None, None, None, None


class _ZeroGradBatchVariance(layers._BatchVariance):
    """The batch variance as before 2026-11-27: autograd hands its backward zeros where no
    gradient reaches it (an explanation's backward pass), and it computes with them."""

    @staticmethod
    def forward(ctx, x):
        mean, var = torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)
        ctx.save_for_backward(x)
        ctx.mean = mean
        return var


def _unit_rows_without_autocast_copy(unit_rows, module):
    """The unit-norm weights in the weight's own dtype (convolutions under autocast cast them)."""
    device = module.weight.device.type
    with torch.autocast(device, enabled=False):
        return unit_rows(module)


@contextlib.contextmanager
def mode(name: str):
    """Patch the B-cos layers' operations for one configuration (restored on exit)."""
    saved = (layers.conv2d, layers._UnitRows, layers.batch_variance, _conv._needed, _conv.second_order_expected,
             layers._unit_rows, layers._ExplainedConv, _conv.conv2d_function, layers._BatchVariance)
    dispatch = saved[0]
    try:
        if name == "previous":
            layers.conv2d = lambda x, w, stride, padding: dispatch(x, w, stride, padding, cheap=x.is_cuda)
            layers._UnitRows = _AutogradUnitRows
            layers.batch_variance = lambda x: x.var(dim=(0, 2, 3), unbiased=False)
            _conv._needed = lambda ctx, i: ctx.needs_input_grad[i]
        elif name in ("native", "cheap"):
            layers.conv2d = partial(dispatch, cheap=name == "cheap")
        elif name in ("first_order", "unpruned"):
            _conv.second_order_expected = lambda: False
        elif name == "cast_each_call":
            layers._unit_rows = partial(_unit_rows_without_autocast_copy, saved[5])
            layers._ExplainedConv = _FloatBackwardExplainedConv
            _conv.conv2d_function = lambda x, w, stride, padding: _conv._Conv2d.apply(x, w, tuple(stride), tuple(padding))
        elif name == "zero_variance_grads":
            layers._BatchVariance = _ZeroGradBatchVariance
        yield
    finally:
        (layers.conv2d, layers._UnitRows, layers.batch_variance, _conv._needed, _conv.second_order_expected,
         layers._unit_rows, layers._ExplainedConv, _conv.conv2d_function, layers._BatchVariance) = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, steps=6)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    add_heap_arg(p)
    args = p.parse_args(argv)
    apply_heap_arg(p, args)
    args.compile = False
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = sorted(set(modes) - set(MODES))
    if bad or not modes:
        p.error(f"--modes takes a comma-separated subset of {','.join(MODES)} (got {args.modes!r})")
    if "default" not in modes:
        modes.append("default")
    torch.set_num_threads(args.threads)
    override_pair(args, "bcos")
    teacher = build_teacher("bcos", args)
    x = make_input(args)
    rows = [(kind, m) for kind in ("kd", "e2kd") for m in modes]
    steps = {row: Variant(row[0], teacher, "bcos", args) for row in rows}
    for row in rows:
        steps[row].prune_backward = row[1] not in ("previous", "unpruned")
    times = {row: [] for row in rows}
    for i in range(args.steps + 1):
        for row in rows:
            with mode(row[1]):
                sync(args.device)
                t = time.perf_counter()
                steps[row](x)
                sync(args.device)
            if i:
                times[row].append(time.perf_counter() - t)
    print(f"# {PAIRS['bcos'][0]} -> {PAIRS['bcos'][1]}, {args.size} px, batch {args.batch}, amp {args.amp}, "
          f"channels-last {args.channels_last}, threads {args.threads}, device {args.device}, "
          f"{args.steps} interleaved rounds, malloc top pad {args.malloc_top_pad} MiB")
    print(f"| step | B-cos operations | median step (ms) | paired ratio to KD (default) | paired ratio to {modes[0]} |")
    print("|---|---|---:|---:|---:|")
    ref = times[("kd", "default")]
    for row in rows:
        t = times[row]
        print(f"| {'KD' if row[0] == 'kd' else 'live e²KD'} | {row[1]} | {1e3 * statistics.median(t):.1f} | "
              f"{paired_ratio(t, ref):.2f} | {paired_ratio(t, times[(row[0], modes[0])]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
