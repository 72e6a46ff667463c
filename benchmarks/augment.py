"""Time the trainer's batched augmentations side by side, one batch at a time, interleaved.

    PYTHONPATH=src python -m benchmarks.augment [--size 224 --batch 64 --threads 1 --rounds 7]

Each round augments the same batch of random images (with masks) once with every kind, in
turn, for a new training step (new draws); prints the median time per batch and the paired
ratio to ``rrc_flip`` (median over rounds of the two times of the same round).
"""

from __future__ import annotations

import argparse
import statistics
import time

KINDS = ("flip", "crop_flip", "rrc_flip", "rrc_flip_randaug")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--magnitude", type=int, default=9)
    args = ap.parse_args()
    if min(args.size, args.batch, args.threads, args.rounds) < 1:
        ap.error("--size, --batch, --threads and --rounds must be >= 1")

    import torch

    from e2kd.train.augment import augment_batch
    from e2kd.train.config import Augment

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(args.batch, 3, args.size, args.size, generator=gen),
        "mask": (torch.rand(args.batch, 1, args.size, args.size, generator=gen) > 0.5).float(),
    }
    times = {k: [] for k in KINDS}
    for kind in KINDS:  # warm-up
        augment_batch(batch, Augment(kind), seed=0, step=0, randaug_magnitude=args.magnitude)
    for r in range(args.rounds):
        for kind in KINDS:
            t = time.perf_counter()
            augment_batch(batch, Augment(kind), seed=0, step=r + 1, randaug_magnitude=args.magnitude)
            times[kind].append(time.perf_counter() - t)
    print(f"batch {args.batch} x 3 x {args.size} x {args.size} (with masks), {args.threads} thread(s), {args.rounds} rounds")
    print("| augment | median ms / batch | paired ratio to rrc_flip |")
    print("|---|---:|---:|")
    for kind in KINDS:
        ratio = statistics.median(a / b for a, b in zip(times[kind], times["rrc_flip"]))
        print(f"| {kind} | {statistics.median(times[kind]) * 1000:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
