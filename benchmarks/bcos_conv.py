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

import torch
import torch.nn.functional as F

from e2kd.bcos import layers

from .step import Variant, build_teacher, make_input, sync

_DISPATCH = layers.conv2d


def _native(x, w, stride, padding):
    return F.conv2d(x, w, None, stride, padding)


def _cheap(x, w, stride, padding):
    if torch.is_grad_enabled() and w.requires_grad:
        return layers._Conv2d.apply(x, w, tuple(stride), tuple(padding))
    return F.conv2d(x, w, None, stride, padding)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--teacher", help="override the teacher (a registry name)")
    p.add_argument("--student", help="override the student (a registry name)")
    args = p.parse_args(argv)
    args.compile = False
    torch.set_num_threads(args.threads)
    from .step import PAIRS

    if args.teacher or args.student:
        t, s_, e = PAIRS["bcos"]
        PAIRS["bcos"] = (args.teacher or t, args.student or s_, e)
    teacher = build_teacher("bcos", args)
    x = make_input(args)
    modes = {"kd": None, "native": _native, "cheap": _cheap}
    steps = {name: Variant("kd" if name == "kd" else "e2kd", teacher, "bcos", args) for name in modes}
    times = {name: [] for name in modes}
    for i in range(args.steps + 1):
        for name, fn in modes.items():
            layers.conv2d = fn or _DISPATCH
            sync(args.device)
            t = time.perf_counter()
            steps[name](x)
            sync(args.device)
            if i:
                times[name].append(time.perf_counter() - t)
    layers.conv2d = _DISPATCH
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
