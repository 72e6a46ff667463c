"""What glibc's heap trimming costs a training step on the CPU: a side-by-side check.

    python -m benchmarks.heap --pair bcos --size 64 --batch 16 --threads 2 --steps 8
    python -m benchmarks.heap --pair all --variants kd,e2kd,frozen --pads 0,256,1024

Times the steps of :mod:`benchmarks.step` (KD, live and frozen e²KD, ...) in one process under
several settings of glibc's ``M_TOP_PAD`` (``--pads``, MiB; see :mod:`e2kd.train.heap`), in
rounds that alternate the order of the settings. Under each setting every variant first takes
one untimed step (so that the heap is in that setting's steady state), then one timed step.
Reported per variant and setting: median step time, minor page faults per timed step, and the
paired ratio (median over rounds of this step / the same variant's step under the first
setting); and per setting the paired e²KD / KD ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from e2kd.train.heap import glibc_malloc, set_malloc_top_pad

from .step import (
    EVERY, PAIRS, VARIANTS, Variant, add_step_args, build_teacher, check_pair_and_variants, make_input, minor_faults,
    paired_ratio, sync,
)


def run_pair(pair: str, args) -> dict:
    teacher = build_teacher(pair, args) if any(not v.startswith("frozen") for v in args.variants) else None
    x = make_input(args)
    variants = {name: Variant(name, teacher, pair, args) for name in args.variants}
    for v in variants.values():
        v.first_step(x)
    times = {(p, n): [] for p in args.pads for n in variants}
    faults = {(p, n): [] for p in args.pads for n in variants}
    for r in range(args.steps):
        for pad in args.pads if r % 2 == 0 else args.pads[::-1]:
            set_malloc_top_pad(pad)
            for name, v in variants.items():
                v(x)  # untimed: the heap settles into this setting
                sync(args.device)
                f0, t0 = minor_faults(), time.perf_counter()
                v(x)
                sync(args.device)
                times[pad, name].append(time.perf_counter() - t0)
                faults[pad, name].append(minor_faults() - f0)
    return {"times": times, "faults": faults, "variants": list(variants)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=[*PAIRS, "all"], default="bcos")
    p.add_argument("--variants", default="kd,e2kd,frozen", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--pads", default="0,1024", help="comma-separated M_TOP_PAD settings in MiB; the first is the reference")
    add_step_args(p, steps=8)
    args = p.parse_args(argv)
    if glibc_malloc() is None:
        p.error("this benchmark needs glibc's malloc (Linux with glibc)")
    check_pair_and_variants(p, args)
    if any(v in EVERY for v in args.variants):
        p.error(f"variants {sorted(EVERY)} explain on some steps only; time them with benchmarks.step")
    try:
        args.pads = [int(s) for s in args.pads.split(",") if s.strip()]
    except ValueError:
        p.error(f"--pads must be whole numbers of MiB, got {args.pads!r}")
    if len(args.pads) < 2 or len(set(args.pads)) != len(args.pads) or min(args.pads) < 0:
        p.error("--pads needs at least two different settings >= 0")
    args.compile = False
    torch.set_num_threads(args.threads)
    pairs = ["gradcam", "bcos"] if args.pair == "all" else [args.pair]
    ref = args.pads[0]
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, {args.size} px, "
          f"batch {args.batch}, {args.steps} rounds (settings in alternating order), M_TOP_PAD settings {args.pads} MiB")
    print(f"| pair | variant | M_TOP_PAD (MiB) | median step (ms) | page faults / step | paired ratio to {ref} MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for pair in pairs:
        res = run_pair(pair, args)
        times, faults = res["times"], res["faults"]
        for name in res["variants"]:
            for pad in args.pads:
                t = times[pad, name]
                print(f"| {pair} | {name} | {pad} | {1000 * statistics.median(t):.0f} | "
                      f"{statistics.median(faults[pad, name]):.0f} | {paired_ratio(t, times[ref, name]):.3f} |", flush=True)
        if "kd" in res["variants"]:
            for pad in args.pads:
                ratios = ", ".join(
                    f"{name} {paired_ratio(times[pad, name], times[pad, 'kd']):.2f}" for name in res["variants"] if name != "kd"
                )
                print(f"#   {pair}, M_TOP_PAD {pad} MiB: paired ratio to KD: {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
