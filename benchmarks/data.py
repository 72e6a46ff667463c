"""Time generating TuxBirds (10,000 images at 64 px) and loading the cached copy.

    PYTHONPATH=src python -m benchmarks.data [--workers 2] [--size 64]

Generation writes into a fresh temporary cache folder (so it really generates); loading then
reads the same entry back through ``build_dataset`` in a new process, manifest hashes checked.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _load(size: int, counts: dict) -> float:
    import torch

    from e2kd.data import build_dataset

    torch.set_num_threads(1)
    t = time.perf_counter()
    n = 0
    for split in counts:
        n += len(build_dataset("tuxbirds", split, image_size=size, counts=counts))
    dt = time.perf_counter() - t
    assert n == sum(counts.values())
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--test", type=int, default=3000)
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    counts = {"train": args.train, "val": args.val, "test": args.test}
    if args.load_only:
        print(json.dumps({"load_s": _load(args.size, counts)}))
        return

    import torch

    from e2kd.data.tuxbirds import load_tuxbirds

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["E2KD_CACHE"] = cache
        t = time.perf_counter()
        load_tuxbirds("train", image_size=args.size, counts=counts, workers=args.workers)
        gen = time.perf_counter() - t
        cmd = [sys.executable, "-m", "benchmarks.data", "--load-only", "--size", str(args.size),
               "--train", str(args.train), "--val", str(args.val), "--test", str(args.test)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
        load = json.loads(out.strip().splitlines()[-1])["load_s"]
        size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs) / 1e6
    print(json.dumps({
        "images": sum(counts.values()), "image_size": args.size, "workers": args.workers,
        "generate_s": round(gen, 2), "load_cached_s": round(load, 3), "cache_mb": round(size_mb, 1),
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
