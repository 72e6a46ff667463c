"""Which convolution path makes a live B-cos e²KD step fastest: a side-by-side check.

    python -m benchmarks.bcos_conv --device cuda --size 224 --batch 128 --amp bf16 --channels-last

Times, interleaved in one process, the live e²KD step of B-cos ResNet-34 -> B-cos ResNet-18
(and plain KD as the reference) with the student's convolutions run two ways: ``native``
(``F.conv2d``, whose second-order pass goes through ``_convolution_double_backward``) and
``cheap`` (:class:`e2kd.bcos.layers._Conv2d`, what the B-cos layers use on CUDA). Prints median
step times and the ratios to KD.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch

from e2kd.bcos import layers

from .step import PAIRS, Variant, add_step_args, build_teacher, make_input, override_pair, sync


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, steps=6)
    args = p.parse_args(argv)
    args.compile = False
    torch.set_num_threads(args.threads)
    override_pair(args, "bcos")
    teacher = build_teacher("bcos", args)
    x = make_input(args)
    dispatch = layers.conv2d
    modes = {"kd": dispatch, "native": partial(dispatch, cheap=False), "cheap": partial(dispatch, cheap=True)}
    steps = {name: Variant("kd" if name == "kd" else "e2kd", teacher, "bcos", args) for name in modes}
    times = {name: [] for name in modes}
    try:
        for i in range(args.steps + 1):
            for name, conv in modes.items():
                layers.conv2d = conv
                sync(args.device)
                t = time.perf_counter()
                steps[name](x)
                sync(args.device)
                if i:
                    times[name].append(time.perf_counter() - t)
    finally:
        layers.conv2d = dispatch
    kd = statistics.median(times["kd"])
    print(f"# {PAIRS['bcos'][0]} -> {PAIRS['bcos'][1]}, {args.size} px, batch {args.batch}, amp {args.amp}, "
          f"channels-last {args.channels_last}, device {args.device}, {args.steps} interleaved steps")
    print("| student convolution | median step (ms) | ratio to KD |")
    print("|---|---:|---:|")
    for name in modes:
        m = statistics.median(times[name])
        print(f"| {name if name != 'kd' else 'KD (reference)'} | {1e3 * m:.1f} | {m / kd:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
