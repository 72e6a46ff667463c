"""Where the CPU's native convolution weight gradient is slow: native kernel vs one matrix product.

    python -m benchmarks.conv_weight_grad --batch 16 --threads 2

For 3 x 3 convolutions (stride 1, padding 1) with C -> C channels and an H x H output, times,
side by side in one process, ``torch.nn.grad.conv2d_weight`` (oneDNN on the CPU) and the same
sum computed as one matrix product of the output gradient with the unfolded input patches (what
:func:`e2kd.bcos.layers.conv2d_weight_grad` does for outputs of at most 4 pixels on the CPU),
checks that both agree, and prints the ratio native / matrix product (> 1: the matrix product
is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _matmul_weight_grad(x, g, weight_shape):
    patches = F.unfold(x, tuple(weight_shape[-2:]), padding=1)
    cols = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return (g.flatten(2).transpose(0, 1).reshape(weight_shape[0], -1) @ cols).view(weight_shape)


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
            mine = _matmul_weight_grad(x, g, shape)
            err = (mine - ref).abs().max().item() / ref.abs().max().item()
            if err > 1e-4:
                raise SystemExit(f"matrix-product weight gradient differs from the native one by {err:.2e} (C={c}, {s}x{s})")
            native = _median_ms(lambda: torch.nn.grad.conv2d_weight(x, shape, g, 1, 1), args.repeats)
            matmul = _median_ms(lambda: _matmul_weight_grad(x, g, shape), args.repeats)
            cells.append(f"{native:.2f} / {matmul:.2f} = {native / matmul:.2f}")
        print(f"| {c} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
