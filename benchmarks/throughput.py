"""Throughput of a short e²KD training run on synthetic images: images/s including data loading.

    python -m benchmarks.throughput --teacher bcos_resnet34 --student bcos_resnet18 --explainer bcos \
        --size 224 --batch 128 --steps 100 --device cuda --amp bf16 --channels-last

A real training loop around :class:`e2kd.Distiller` (the trainer's inner loop, without
evaluation or checkpoints): a DataLoader over in-memory synthetic images in [0, 1] with a
random horizontal flip per batch, pinned memory and non-blocking copies on CUDA, SGD with
momentum, ``loss.backward()`` and the optimiser step. No network access: models have random
weights. Reports the median data time and step time per batch, the images/s over all timed
steps (wall clock from the first timed batch to the last synchronised step) and, on CUDA, the
peak allocated memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

import e2kd
from e2kd.models import create_model
from e2kd.train.config import OptimConfig, OptimizerName
from e2kd.train.optim import build_optimizer


class SyntheticImages(torch.utils.data.Dataset):
    """``n`` random images (C, H, W) in [0, 1] and labels, held in memory."""

    def __init__(self, n: int, size: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="bcos_resnet34")
    p.add_argument("--student", default="bcos_resnet18")
    p.add_argument("--explainer", default="bcos")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps must be >= 1, --warmup >= 0 and --batch >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    teacher = create_model(args.teacher, num_classes=args.classes).to(args.device, memory_format=fmt)
    student = create_model(args.student, num_classes=args.classes).to(args.device, memory_format=fmt)
    distiller = e2kd.Distiller(teacher, student, explainer=args.explainer, lam=args.lam).train()
    opt = build_optimizer(distiller.parameters(), OptimConfig(name=OptimizerName.sgd, lr=1e-3, momentum=0.9))
    params = [p for p in distiller.parameters() if p.requires_grad]
    total = args.steps + args.warmup
    data = SyntheticImages(min(total * args.batch, 8 * args.batch), args.size, args.classes)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=cuda, persistent_workers=args.workers > 0,
    )
    amp = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()

    def batches():
        while True:
            yield from loader

    data_t, step_t = [], []
    it = batches()
    start = None
    for step in range(total):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        t0 = time.perf_counter()
        images, _ = next(it)
        images = images.to(args.device, non_blocking=True).contiguous(memory_format=fmt)
        flip = torch.rand(images.shape[0], device=images.device) < 0.5  # batched augmentation
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        t1 = time.perf_counter()
        with amp:
            out = distiller(images)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward(inputs=params)  # as the trainer: no gradient for the explained input
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= args.warmup:
            data_t.append(t1 - t0)
            step_t.append(t2 - t1)
    wall = time.perf_counter() - start
    res = {
        "argv": sys.argv, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "pair": f"{args.teacher} -> {args.student} ({args.explainer}, lam {args.lam})",
        "size": args.size, "batch": args.batch, "steps": args.steps, "amp": args.amp, "channels_last": args.channels_last,
        "images_per_s": args.steps * args.batch / wall,
        "median_step_ms": 1000 * statistics.median(step_t),
        "median_data_ms": 1000 * statistics.median(data_t),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "final_loss": float(out["loss"]),
    }
    print(f"# {' '.join(sys.argv)}")
    print(f"{res['pair']} on {res['device']}, {args.size} px, batch {args.batch}, {args.steps} steps after "
          f"{args.warmup} warm-up, amp {args.amp}, channels-last {args.channels_last}: "
          f"{res['images_per_s']:.1f} images/s, median step {res['median_step_ms']:.1f} ms, "
          f"median data {res['median_data_ms']:.1f} ms"
          + (f", peak {res['peak_mib']:.0f} MiB" if cuda else "") + f", final loss {res['final_loss']:.4f}")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
