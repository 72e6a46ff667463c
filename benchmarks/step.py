"""Time one training step of KD and e²KD side by side (forward, loss, backward, optimiser step).

    python -m benchmarks.step --pair bcos|gradcam|all --size 64 --batch 32 --steps 10 --threads 2

Pairs: ``gradcam`` = torchvision ResNet-34 -> ResNet-18 with GradCAM; ``bcos`` = B-cos
ResNet-34 -> B-cos ResNet-18 with B-cos explanations. The variants of a pair are measured
interleaved (A B A B ...) so that a noisy machine slows all of them alike. Reported per
variant: median step time, images/s, saved-for-backward memory of one step (tensors packed by
autograd, each storage counted once) and, on CUDA, the peak allocated memory; then the ratio
to the KD step of the same pair.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from typing import Callable, Dict

import torch

import e2kd
from e2kd.models import create_model

PAIRS = {
    "gradcam": ("resnet34", "resnet18", "gradcam"),
    "bcos": ("bcos_resnet34", "bcos_resnet18", "bcos"),
}


def build_variants(pair: str, args) -> Dict[str, Callable[[torch.Tensor], None]]:
    """name -> step function for one teacher/student pair; every variant owns its student."""
    teacher_name, student_name, explainer = PAIRS[pair]
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=args.classes).to(args.device).eval()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher = teacher.to(memory_format=fmt)
    variants = {}

    def make(lam: float):
        torch.manual_seed(1)
        student = create_model(student_name, num_classes=args.classes).to(args.device).to(memory_format=fmt).train()
        distiller = e2kd.Distiller(teacher, student, explainer=explainer, lam=lam, temperature=1.0)
        opt = torch.optim.Adam(student.parameters(), lr=1e-4)

        def step(x):
            opt.zero_grad(set_to_none=True)
            out = distiller(x)
            out["loss"].backward()
            opt.step()

        return step

    variants["kd"] = make(0.0)
    variants["e2kd"] = make(1.0)
    # A `frozen` variant (stored teacher logits and maps, no teacher forward) is added here:
    # variants["frozen"] = make_frozen(...)
    return variants


def saved_bytes(step: Callable[[torch.Tensor], None], x: torch.Tensor) -> int:
    """Bytes autograd saves for backward during one step (each storage once)."""
    seen: dict = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(x)
    return sum(seen.values())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_pair(pair: str, args) -> dict:
    variants = build_variants(pair, args)
    torch.manual_seed(2)
    x = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    memory = {name: saved_bytes(fn, x) for name, fn in variants.items()}
    for _ in range(args.warmup):
        for fn in variants.values():
            fn(x)
    times = {name: [] for name in variants}
    peaks = {}
    for _ in range(args.steps):
        for name, fn in variants.items():  # interleaved: A B A B ...
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(args.device)
            t0 = time.perf_counter()
            fn(x)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
            if args.device.startswith("cuda"):
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    rows = {}
    for name in variants:
        med = statistics.median(times[name])
        rows[name] = dict(median_ms=1000 * med, images_per_s=args.batch / med, saved_mib=memory[name] / 2**20,
                          peak_mib=peaks.get(name, 0) / 2**20, times_ms=[round(1000 * t, 1) for t in times[name]])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=["bcos", "gradcam", "all"], default="all")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    pairs = list(PAIRS) if args.pair == "all" else [args.pair]
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{args.size} px, batch {args.batch}, {args.steps} interleaved steps after {args.warmup} warm-up")
    print("| pair | variant | median step (ms) | images/s | saved for backward (MiB) | peak CUDA (MiB) | ratio to KD |")
    print("|---|---|---|---|---|---|---|")
    for pair in pairs:
        rows = run_pair(pair, args)
        base = rows["kd"]["median_ms"]
        for name, r in rows.items():
            print(f"| {pair} | {name} | {r['median_ms']:.0f} | {r['images_per_s']:.1f} | {r['saved_mib']:.0f} | "
                  f"{r['peak_mib']:.0f} | {r['median_ms'] / base:.2f} |", flush=True)
        for name, r in rows.items():
            print(f"#   {pair}/{name} step times (ms): {r['times_ms']}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# process peak RSS: {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
