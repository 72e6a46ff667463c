"""Where a training step's time goes: the top operators of KD / e²KD / frozen steps, by device time.

    python -m benchmarks.op_profile --pair bcos --variants kd,e2kd --device cuda --size 224 --batch 128 --amp bf16 --channels-last

Builds the same steps as :mod:`benchmarks.step` (same models, Distiller and stored outputs),
runs ``--warmup`` steps, then records ``--steps`` steps of each variant with
``torch.profiler`` and prints, per variant, the operators with the largest self time on the
device (CUDA kernels' time on a GPU, CPU time otherwise), their call counts and their share of
the step. Use it to find what makes one variant dearer than another.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from .step import (
    PAIRS, VARIANTS, Variant, add_heap_arg, add_step_args, apply_heap_arg, build_teacher, make_input, override_pair, sync,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=list(PAIRS), default="bcos")
    p.add_argument("--variants", default="kd,e2kd", help=f"comma-separated subset of {','.join(VARIANTS)}")
    add_step_args(p, steps=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=25, help="operators shown per variant")
    p.add_argument("--shapes", action="store_true", help="one row per operator and input shapes")
    add_heap_arg(p)
    args = p.parse_args(argv)
    apply_heap_arg(p, args)
    override_pair(args, args.pair)
    args.compile = False
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {','.join(VARIANTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    teacher = build_teacher(args.pair, args)
    x = make_input(args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    print(f"# {args.pair}: {PAIRS[args.pair][0]} -> {PAIRS[args.pair][1]} ({PAIRS[args.pair][2]}), "
          f"{args.size} px, batch {args.batch}, amp {args.amp}, channels-last {args.channels_last}, "
          f"{args.steps} profiled steps after {args.warmup} warm-up, device {args.device}, "
          f"malloc top pad {args.malloc_top_pad} MiB")
    for name in variants:
        step = Variant(name, teacher, args.pair, args)
        for _ in range(args.warmup):
            step(x)
        sync(args.device)
        with profile(activities=activities, record_shapes=args.shapes) as prof:
            for _ in range(args.steps):
                step(x)
            sync(args.device)
        events = prof.key_averages(group_by_input_shape=args.shapes)
        attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        total = sum(getattr(e, attr, 0.0) for e in events)
        rows = sorted(events, key=lambda e: getattr(e, attr, 0.0), reverse=True)[: args.top]
        print(f"\n## {name}: {total / 1e3 / args.steps:.1f} ms of {'device' if cuda else 'CPU'} self time per step")
        print("| operator | calls / step | ms / step | share |")
        print("|---|---:|---:|---:|")
        for e in rows:
            t = getattr(e, attr, 0.0)
            key = e.key[:90] + (f" {e.input_shapes}"[:160] if args.shapes else "")
            print(f"| {key} | {e.count / args.steps:.0f} | {t / 1e3 / args.steps:.2f} | {100 * t / max(total, 1e-9):.1f} % |")
        del step
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
