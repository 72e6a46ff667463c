"""Where the CPU's native convolution weight gradient is slow: native kernel vs one matrix product.

    python -m benchmarks.conv_weight_grad --batch 16 --threads 2

For 3 x 3 convolutions (stride 1, padding 1) with C -> C channels and an H x H output, times,
side by side in one process, ``torch.nn.grad.conv2d_weight`` (oneDNN on the CPU) and the same
sum computed as one matrix product of the output gradient with the unfolded input patches
(:func:`e2kd._conv.matmul_weight_grad`, what :func:`e2kd._conv.conv2d_weight_grad` uses for
outputs of at most 4 pixels on the CPU),
checks that both agree, and prints the ratio native / matrix product (> 1: the matrix product
is faster).

With ``--steps N`` it also times, interleaved in one process, N KD and live e²KD steps of the
GradCAM pair (torchvision ResNet-34 -> ResNet-18, ``--size`` px) with the student's convolutions
as plain ``nn.Conv2d`` and as :class:`e2kd._conv.FastSmallConv2d` (what ``create_model`` gives
them), and prints the paired ratios fast / plain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from e2kd._conv import matmul_weight_grad


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels", default="64,128,256,512")
    p.add_argument("--sides", default="1,2,3,4,7,8,14", help="output sides H (H x H pixels)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=0, help="also time N whole GradCAM-pair steps, plain vs fast convolutions")
    p.add_argument("--size", type=int, default=64, help="image size of the whole-step comparison")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    channels = [int(c) for c in args.channels.split(",")]
    sides = [int(s) for s in args.sides.split(",")]
    gen = torch.Generator().manual_seed(0)
    print(f"# 3x3 convolution weight gradient, batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}; cells: native ms / matrix-product ms = ratio")
    print("| channels | " + " | ".join(f"{s}x{s}" for s in sides) + " |")
    print("|---|" + "---:|" * len(sides))
    for c in channels:
        cells = []
        for s in sides:
            x = torch.randn(args.batch, c, s, s, generator=gen)
            g = torch.randn(args.batch, c, s, s, generator=gen)
            shape = (c, c, 3, 3)
            ref = torch.nn.grad.conv2d_weight(x, shape, g, 1, 1)
            mine = matmul_weight_grad(x, g, shape, (1, 1), (1, 1))
            err = (mine - ref).abs().max().item() / ref.abs().max().item()
            if err > 1e-4:
                raise SystemExit(f"matrix-product weight gradient differs from the native one by {err:.2e} (C={c}, {s}x{s})")
            native = _median_ms(lambda: torch.nn.grad.conv2d_weight(x, shape, g, 1, 1), args.repeats)
            matmul = _median_ms(lambda: matmul_weight_grad(x, g, shape, (1, 1), (1, 1)), args.repeats)
            cells.append(f"{native:.2f} / {matmul:.2f} = {native / matmul:.2f}")
        print(f"| {c} | " + " | ".join(cells) + " |")
    if args.steps:
        _whole_steps(args)
    return 0


def _whole_steps(args) -> None:
    from torch import nn

    from e2kd._conv import FastSmallConv2d

    from .step import Variant, add_step_args, build_teacher, make_input, paired_ratio

    sp = argparse.ArgumentParser()
    add_step_args(sp, steps=args.steps)
    step_args = sp.parse_args(["--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads)])
    step_args.compile = False
    teacher = build_teacher("gradcam", step_args)
    x = make_input(step_args)
    variants = {}
    for kind in ("kd", "e2kd"):
        for conv in ("plain", "fast"):
            v = Variant(kind, teacher, "gradcam", step_args)
            if conv == "plain":
                for m in v.eager_student.modules():
                    if type(m) is FastSmallConv2d:
                        m.__class__ = nn.Conv2d
            variants[(kind, conv)] = v
    times = {key: [] for key in variants}
    for i in range(args.steps + 1):
        for key, v in variants.items():
            t = time.perf_counter()
            v(x)
            if i:
                times[key].append(time.perf_counter() - t)
    print(f"\n# GradCAM pair (ResNet-34 -> ResNet-18), {args.size} px, batch {args.batch}, {args.threads} threads, "
          f"{args.steps} interleaved rounds")
    print("| step | plain nn.Conv2d (ms) | FastSmallConv2d (ms) | paired ratio fast / plain |")
    print("|---|---:|---:|---:|")
    for kind in ("kd", "e2kd"):
        plain, fast = times[(kind, "plain")], times[(kind, "fast")]
        print(f"| {'KD' if kind == 'kd' else 'live e²KD'} | {1e3 * statistics.median(plain):.0f} | "
              f"{1e3 * statistics.median(fast):.0f} | {paired_ratio(fast, plain):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
