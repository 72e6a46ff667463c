"""Which convolution a student's layers should run through, layer by layer: native or ``_Conv2d``.

    python -m benchmarks.second_order --model bcos_resnet18 --size 64 --batch 16 --threads 2

Records the convolutions of one forward pass of ``--model`` (input shape, weight shape, stride,
padding of each distinct one) and times, interleaved in one process, two patterns on each:

* ``first order`` (a KD step): ``y = conv(x, w)``, then the backward of a loss on ``y`` to
  ``w``;
* ``second order`` (a student's e²KD step): ``y = conv(x, w)`` with ``x`` requiring grad, the
  input gradient ``g = ∂⟨y, r⟩/∂x`` taken with ``create_graph=True`` where ``r`` depends on
  ``w`` as an upper layer's gradient does, and one backward of a loss on ``y`` and ``g`` to
  ``w`` only (as the trainer calls it);

each through the native ``F.conv2d`` and through :class:`e2kd._conv._Conv2d`, and prints the
medians and the ratios ``_Conv2d`` / native (< 1: ``_Conv2d`` is faster), after checking that both
give the same gradients. This is the measurement
behind the B-cos layers' dispatch (:func:`e2kd.bcos.layers.conv2d`): ``_Conv2d`` inside
:func:`e2kd._conv.expect_second_order`, the native convolution for first-order steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from e2kd._conv import _Conv2d
from e2kd.bcos import layers
from e2kd.models import create_model


def record_convolutions(model: torch.nn.Module, size: int, batch: int):
    """The distinct ``(input shape, weight shape, stride, padding)`` of the B-cos convolutions of
    one forward pass of ``model``, with how often each occurs, in order of first use."""
    seen: dict = {}
    dispatch = layers.conv2d

    def spy(x, weight, stride, padding, **kw):
        key = (tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding))
        seen[key] = seen.get(key, 0) + 1
        return dispatch(x, weight, stride, padding, **kw)

    layers.conv2d = spy
    try:
        with torch.no_grad():
            model(torch.rand(batch, 3, size, size))
    finally:
        layers.conv2d = dispatch
    return seen


def _conv(cheap: bool, x, w, stride, padding):
    return _Conv2d.apply(x, w, stride, padding) if cheap else F.conv2d(x, w, None, stride, padding)


def make_steps(x_shape, w_shape, stride, padding):
    """The two patterns on one convolution, as functions of ``cheap``."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(x_shape, generator=g)
    w = (torch.randn(w_shape, generator=g) / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5).requires_grad_(True)
    with torch.no_grad():
        y_shape = F.conv2d(x0[:1], w, None, stride, padding).shape[1:]
    r0 = torch.randn((x_shape[0], *y_shape), generator=g)
    q = torch.randn(x_shape, generator=g)
    scale = torch.ones((), requires_grad=True)  # stands in for the upper layers' weights in r

    def first(cheap: bool) -> torch.Tensor:
        w.grad = None
        y = _conv(cheap, x0, w, stride, padding)
        (y * r0).sum().backward(inputs=[w])
        return w.grad

    def second(cheap: bool) -> torch.Tensor:
        w.grad = scale.grad = None
        x = x0.detach().requires_grad_(True)
        y = _conv(cheap, x, w, stride, padding)
        r = r0 * scale  # the incoming gradient of an explanation depends on trained weights
        (gx,) = torch.autograd.grad((y * r).sum(), x, create_graph=True)
        ((y * r0).sum() + (gx * q).sum()).backward(inputs=[w, scale])
        return torch.cat([w.grad.flatten(), scale.grad.flatten()])

    return first, second


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bcos_resnet18", help="a B-cos registry model whose convolutions are timed")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9, help="interleaved timings per cell")
    args = p.parse_args(argv)
    if args.size < 16 or args.batch < 1 or args.rounds < 1:
        p.error("--size must be >= 16, --batch and --rounds >= 1")
    torch.set_num_threads(args.threads)
    try:
        model = create_model(args.model, num_classes=1000)
    except (KeyError, ValueError) as err:
        p.error(str(err))
    convs = record_convolutions(model, args.size, args.batch)
    if not convs:
        p.error(f"{args.model} runs no B-cos convolution (give a B-cos model, e.g. bcos_resnet18)")
    print(f"# {args.model} convolutions at {args.size} px, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}; times in ms")
    print("| input | weight | stride | count | first order native | _Conv2d | ratio | second order native | _Conv2d | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = {k: 0.0 for k in ("1n", "1c", "2n", "2c")}
    for (x_shape, w_shape, stride, padding), count in convs.items():
        first, second = make_steps(x_shape, w_shape, stride, padding)
        cells = {k: [] for k in totals}
        for fn, tag in ((first, "1"), (second, "2")):
            native, function = fn(False).clone(), fn(True).clone()  # warm-up, and both give the same gradients
            if not torch.allclose(native, function, rtol=1e-4, atol=1e-5 * float(native.abs().max())):
                raise SystemExit(f"{x_shape} * {w_shape}: _Conv2d and the native convolution disagree "
                                 f"(max difference {float((native - function).abs().max()):.3g})")
            for i in range(args.rounds):
                for cheap in ((False, True) if i % 2 == 0 else (True, False)):
                    t = time.perf_counter()
                    fn(cheap)
                    cells[tag + ("c" if cheap else "n")].append(time.perf_counter() - t)
        med = {k: 1e3 * statistics.median(v) for k, v in cells.items()}
        for k in totals:
            totals[k] += count * med[k]
        print(f"| {list(x_shape)} | {list(w_shape)} | {stride[0]} | {count} | {med['1n']:.2f} | {med['1c']:.2f} | "
              f"{med['1c'] / med['1n']:.2f} | {med['2n']:.2f} | {med['2c']:.2f} | {med['2c'] / med['2n']:.2f} |")
    print(f"| all (× count) | | | | {totals['1n']:.1f} | {totals['1c']:.1f} | {totals['1c'] / totals['1n']:.2f} | "
          f"{totals['2n']:.1f} | {totals['2c']:.1f} | {totals['2c'] / totals['2n']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
