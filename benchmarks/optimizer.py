"""What the optimiser update costs: fused vs per-parameter kernels, side by side.

    python -m benchmarks.optimizer --model bcos_resnet18 --optimizer adam --threads 2 --steps 10

Builds ``--model`` (1000 classes), gives every parameter a random gradient and times, interleaved
in one process, ``optimizer.step()`` of the same optimiser built three ways: ``per-parameter``
(``foreach=False``: about ten element-wise operations per tensor), ``foreach`` (multi-tensor
operations) and ``fused`` (one kernel per parameter group; what ``e2kd.train.optim.build_optimizer``
uses by default). Prints median times and the ratio to the fused update.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from e2kd.models import create_model

_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bcos_resnet18")
    p.add_argument("--optimizer", choices=sorted(_CLASSES), default="adam")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    kinds = {"per-parameter": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    extra = {"momentum": 0.9} if args.optimizer == "sgd" else {}
    opts, numel = {}, 0
    for name, kw in kinds.items():
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=1000)
        params = [q for q in model.parameters() if q.requires_grad]
        numel = sum(q.numel() for q in params)
        for q in params:
            q.grad = torch.randn_like(q)
        opts[name] = _CLASSES[args.optimizer](params, lr=1e-4, **extra, **kw)
        opts[name].step()  # creates the state
    times = {name: [] for name in kinds}
    for _ in range(args.steps):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    fused = statistics.median(times["fused"])
    print(f"# {args.model}: {numel / 1e6:.1f} M parameters, {args.optimizer}, {args.threads} threads, "
          f"{args.steps} interleaved steps, torch {torch.__version__}")
    print("| update | median (ms) | ratio to fused |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {1e3 * m:.1f} | {m / fused:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
