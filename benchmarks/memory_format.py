"""Channels-last against the default (contiguous) memory format, side by side in one process.

    python -m benchmarks.memory_format --pair bcos --variants kd,e2kd --size 64 --batch 16 --threads 2 --steps 8

Builds the steps of :mod:`benchmarks.step` twice, once with teacher, student and input in
PyTorch's default NCHW layout and once in channels-last (NHWC), and times them interleaved
(contiguous KD, channels-last KD, contiguous e²KD, channels-last e²KD, ...). Both copies start
from the same weights. Prints the median step time of every variant in both formats and the
paired ratio channels-last / contiguous (median over rounds of the two steps taken back to
back), and checks that one step of each gives the same loss in both formats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from .step import (
    EVERY, PAIRS, Variant, add_heap_arg, add_step_args, apply_heap_arg, build_teacher, check_pair_and_variants,
    make_input, paired_ratio, sync,
)

FORMATS = ("contiguous", "channels_last")


def _loss(step: Variant, x: torch.Tensor) -> float:
    """The loss of one step of ``step`` on ``x``, without updating the student (the random
    number generator seeded alike for both layouts: dropout and drop-connect)."""
    torch.manual_seed(0)
    loss = float(step.loss(x).detach())
    step.opt.zero_grad(set_to_none=True)
    return loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=list(PAIRS), default="bcos")
    p.add_argument("--variants", default="kd,e2kd", help="comma-separated variants of benchmarks.step")
    add_step_args(p, steps=8)
    p.add_argument("--warmup", type=int, default=1)
    add_heap_arg(p)
    args = p.parse_args(argv)
    apply_heap_arg(p, args)
    if args.channels_last:
        p.error("--channels-last is what this benchmark compares; leave it out")
    check_pair_and_variants(p, args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    args.compile = False
    torch.set_num_threads(args.threads)
    cycle = max([EVERY.get(v, 1) for v in args.variants])
    steps = cycle * -(-args.steps // cycle)
    built = {}
    for fmt in FORMATS:
        a = copy.copy(args)
        a.channels_last = fmt == "channels_last"
        teacher = build_teacher(args.pair, a) if any(not v.startswith("frozen") for v in args.variants) else None
        x = make_input(a)
        built[fmt] = (x, {v: Variant(v, teacher, args.pair, a) for v in args.variants})
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {args.pair}: {PAIRS[args.pair][0]} -> {PAIRS[args.pair][1]}, device "
          f"{args.device}, threads {torch.get_num_threads()}, {args.size} px, batch {args.batch}, amp {args.amp}, "
          f"{steps} interleaved rounds after {args.warmup} warm-up, malloc top pad {args.malloc_top_pad} MiB")
    for v in args.variants:  # same weights and input: same loss in both layouts
        losses = [_loss(built[fmt][1][v], built[fmt][0]) for fmt in FORMATS]
        if abs(losses[0] - losses[1]) > 1e-3 * max(1.0, abs(losses[0])):
            raise SystemExit(f"{v}: the loss differs between the layouts ({losses[0]} vs {losses[1]})")
        print(f"#   {v}: loss {losses[0]:.5f} (contiguous) vs {losses[1]:.5f} (channels-last)")
    for _ in range(args.warmup * cycle):
        for v in args.variants:
            for fmt in FORMATS:
                built[fmt][1][v](built[fmt][0])
    for fmt in FORMATS:
        for v in args.variants:
            if v in EVERY:
                built[fmt][1][v].distiller.calls = 0
    times = {(v, fmt): [] for v in args.variants for fmt in FORMATS}
    for _ in range(steps):
        for v in args.variants:
            for fmt in FORMATS:
                x, steps_of = built[fmt]
                sync(args.device)
                t0 = time.perf_counter()
                steps_of[v](x)
                sync(args.device)
                times[v, fmt].append(time.perf_counter() - t0)
    print("| variant | contiguous (ms) | channels-last (ms) | paired ratio channels-last / contiguous |")
    print("|---|---:|---:|---:|")
    for v in args.variants:
        k = EVERY.get(v, 1)
        med = [1000 * (statistics.fmean if k > 1 else statistics.median)(times[v, fmt]) for fmt in FORMATS]
        ratio = paired_ratio(times[v, "channels_last"], times[v, "contiguous"], k)
        print(f"| {v} | {med[0]:.0f} | {med[1]:.0f} | {ratio:.2f} |", flush=True)
    for key, t in times.items():
        print(f"#   {key[0]}/{key[1]} step times (ms): {[round(1000 * s, 1) for s in t]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
