"""Time one training step of KD, live e²KD and frozen e²KD side by side (forward, loss, backward, optimiser step).

    python -m benchmarks.step --pair bcos|gradcam|bcos_densenet|all --size 64 --batch 32 --steps 10 --threads 2

Pairs: ``gradcam`` = torchvision ResNet-34 -> ResNet-18 with GradCAM; ``bcos`` = B-cos
ResNet-34 -> B-cos ResNet-18 with B-cos explanations; ``bcos_densenet`` = B-cos DenseNet-169 ->
B-cos ResNet-18 (meant for a GPU; not part of ``all``).

Variants (``--variants``, comma-separated):

* ``kd``      plain KD written by hand: teacher forward under ``no_grad`` + student step.
* ``e2kd``    Distiller(teacher, student, lam=1): teacher explanation + student explanation step.
* ``frozen``  Distiller(None, student, lam=1) fed with stored teacher outputs: fp16 maps of the
  teacher's map shape and fp32 logits, already in memory (no teacher at all).
* ``lam0``    Distiller(teacher, student, lam=0) with the explainer configured (must cost
  what ``kd`` costs).
* ``every4``  e²KD with ``explain_every=4``: timed over whole multiples of 4 steps and compared
  by its mean with ``(3·KD + e²KD) / 4``.
* ``frozen_every4``  frozen e²KD with ``explain_every=4`` (three steps in four are student-only
  KD steps on the stored logits): the approximation that makes a frozen B-cos step cheaper
  than live KD; compared by its mean.
* ``every2``  e²KD with ``explain_every=2`` (not in the default set): compared by its mean
  with ``(KD + e²KD) / 2``.

The variants of a pair are measured interleaved (A B C A B C ...) in one process, so that a
noisy machine slows all of them alike. Reported per variant: median and mean step time,
images/s, median process CPU time, saved-for-backward memory of one step (tensors packed by
autograd, each storage counted once), peak memory (CUDA: peak allocated per variant; CPU with
``--rss``: peak resident memory of a fresh subprocess that builds and steps that variant
alone), and the ratios to the KD step of the same pair by wall time and by CPU time.

GPU options: ``--device cuda --amp bf16 --channels-last --compile``. ``--compile`` compiles the
student where it works; double backward (the student's explanation) is not supported by
``torch.compile``, so variants that fail to compile fall back to eager and are marked so.
``--json PATH`` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import torch

import e2kd
from e2kd.models import create_model
from e2kd.train.config import OptimConfig, OptimizerName
from e2kd.train.heap import DEFAULT_TOP_PAD_MIB, set_malloc_top_pad
from e2kd.train.optim import build_optimizer

from .flops import count_flops, gemm_size, matmul_rate

PAIRS = {
    "gradcam": ("resnet34", "resnet18", "gradcam"),
    "bcos": ("bcos_resnet34", "bcos_resnet18", "bcos"),
    "bcos_densenet": ("bcos_densenet169", "bcos_resnet18", "bcos"),
}
VARIANTS = ("kd", "e2kd", "frozen", "lam0", "every4", "frozen_every4", "every2")
DEFAULT_VARIANTS = VARIANTS[:6]  # every2 on request
# explain_every of the variants that explain on some steps only (timed over whole cycles, compared by means)
EVERY = {"every4": 4, "frozen_every4": 4, "every2": 2}


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def map_shape(explainer: str, batch: int, size: int) -> tuple:
    """Shape of the teacher's maps for a batch: GradCAM (upsampled) 1 channel, B-cos weights 2·3."""
    return (batch, 1 if explainer == "gradcam" else 6, size, size)


class Variant:
    """One benchmarked training step: a student, its optimiser and the Distiller around it."""

    def __init__(self, name: str, teacher, pair: str, args):
        teacher_name, student_name, explainer = PAIRS[pair]
        self.name = name
        self.compiled = False
        self.note = ""
        torch.manual_seed(1)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        student = create_model(student_name, num_classes=args.classes).to(args.device).to(memory_format=fmt).train()
        lam = 0.0 if name in ("kd", "lam0") else 1.0
        frozen = name.startswith("frozen")
        self.distiller = e2kd.Distiller(
            None if frozen else teacher, student, explainer=explainer, lam=lam, explain_every=EVERY.get(name, 1)
        )
        self.plain_kd = name == "kd"
        self.teacher = teacher
        # the trainer's optimiser (fused Adam on CPU and CUDA)
        self.opt = build_optimizer(student.parameters(), OptimConfig(name=OptimizerName.adam, lr=1e-4))
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.prune_backward = True
        self.eager_student = student
        if args.compile:
            self.distiller.student = torch.compile(student)
            self.compiled = True
        self.stored = None
        if frozen:
            g = torch.Generator().manual_seed(3)
            logits = torch.randn(args.batch, args.classes, generator=g)
            maps = torch.rand(map_shape(explainer, args.batch, args.size), generator=g).half()
            self.stored = (logits.to(args.device), maps.to(args.device))
        self.amp = (
            torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
            if args.amp == "bf16"
            else contextlib.nullcontext()
        )

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The step's loss on ``x`` (forward only)."""
        with self.amp:
            if self.plain_kd:  # the baseline, written by hand: no Distiller, no explainer
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                return e2kd.kd_loss(self.distiller.student(x), teacher_logits, 1.0)
            if self.stored is not None:
                return self.distiller(x, teacher_logits=self.stored[0], teacher_maps=self.stored[1])["loss"]
            return self.distiller(x)["loss"]

    def __call__(self, x: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        # as the trainer: gradients of the trained parameters only, none for the explained input
        self.loss(x).backward(inputs=self.params if self.prune_backward else None)
        self.opt.step()

    def first_step(self, x: torch.Tensor) -> None:
        """Run one step; a compiled student that fails (double backward) falls back to eager."""
        try:
            self(x)
        except Exception as err:  # noqa: BLE001 - any compile failure means: run eager
            if not self.compiled:
                raise
            self.distiller.student = self.eager_student
            self.compiled = False
            self.note = f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); eager"
            torch._dynamo.reset()
            self(x)


def build_teacher(pair: str, args):
    teacher_name, _, _ = PAIRS[pair]
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return create_model(teacher_name, num_classes=args.classes).to(args.device).to(memory_format=fmt).eval()


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


def make_input(args) -> torch.Tensor:
    torch.manual_seed(2)
    x = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _restart_cycles(variants: Dict[str, "Variant"]) -> None:
    """Start the partial variants' explain-every cycles afresh (their next step explains)."""
    for name in EVERY:
        if name in variants:
            variants[name].distiller.calls = 0


def run_pair(pair: str, args) -> dict:
    teacher = build_teacher(pair, args) if any(not v.startswith("frozen") for v in args.variants) else None
    x = make_input(args)
    variants: Dict[str, Variant] = {}
    for name in args.variants:
        variants[name] = Variant(name, teacher, pair, args)
        variants[name].first_step(x)
    _restart_cycles(variants)  # the saved-for-backward figure of a partial variant is that of an explaining step
    flops = {}
    if getattr(args, "flops", False):
        for name, v in variants.items():  # a partial variant: the mean over one whole cycle
            k = EVERY.get(name, 1)
            student = v.distiller.student
            v.distiller.student = v.eager_student  # counted eagerly: a compiled graph bypasses the dispatcher
            try:
                flops[name] = count_flops(lambda: [v(x) for _ in range(k)]).total / k
            finally:
                v.distiller.student = student
        _restart_cycles(variants)
    memory = {}
    for name, v in variants.items():
        try:
            memory[name] = saved_bytes(v, x)
        except Exception as err:  # noqa: BLE001 - e.g. saved-tensor hooks inside a compiled graph
            if not v.compiled:
                raise
            memory[name] = float("nan")
            v.note = (v.note + "; " if v.note else "") + f"saved bytes not measured ({type(err).__name__})"
    cycle = math.lcm(*[EVERY[n] for n in variants if n in EVERY], 1)
    steps = cycle * -(-args.steps // cycle)  # whole cycles of every partial variant
    for _ in range(args.warmup):
        for v in variants.values():
            v(x)
    _restart_cycles(variants)
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    faults = {name: [] for name in variants}
    peaks = {}
    for _ in range(steps):
        for name, v in variants.items():  # interleaved: A B C A B C ...
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(args.device)
            f0 = minor_faults()
            t0, c0 = time.perf_counter(), time.process_time()
            v(x)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            faults[name].append(minor_faults() - f0)
            if args.device.startswith("cuda"):
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    rows = {}
    for name, v in variants.items():
        med = statistics.median(times[name])
        rows[name] = dict(
            median_ms=1000 * med,
            mean_ms=1000 * statistics.fmean(times[name]),
            cpu_ms=1000 * statistics.median(cpu[name]),
            cpu_mean_ms=1000 * statistics.fmean(cpu[name]),
            page_faults=statistics.median(faults[name]),
            images_per_s=args.batch / med,
            saved_mib=memory[name] / 2**20,
            peak_mib=peaks.get(name, 0) / 2**20,
            compiled=v.compiled,
            note=v.note,
            times_ms=[round(1000 * t, 1) for t in times[name]],
        )
        if name in flops:
            rows[name]["gflop"] = flops[name] / 1e9
            step_s = statistics.fmean(times[name]) if name in EVERY else med
            rows[name]["gflop_per_s"] = flops[name] / 1e9 / step_s
    if "kd" in times:
        for name in variants:
            rows[name]["paired_ratio"] = paired_ratio(times[name], times["kd"], EVERY.get(name, 1))
    return rows


def paired_ratio(times, reference, cycle: int = 1) -> float:
    """Median over rounds of ``time / reference time`` of the same round (interleaved steps).

    A round is ``cycle`` consecutive steps (a whole explain-every cycle), compared by their sums.
    Steps taken back to back see the same load on a shared machine, so this ratio is steadier
    than the ratio of two medians.
    """
    n = len(times) // cycle
    if n < 1 or len(reference) < n * cycle:
        raise ValueError(f"paired_ratio needs at least one whole cycle of {cycle} steps in both lists")
    return statistics.median(
        sum(times[i * cycle:(i + 1) * cycle]) / sum(reference[i * cycle:(i + 1) * cycle]) for i in range(n)
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    On Linux ``VmHWM`` of /proc/self/status (reset by exec, unlike ``ru_maxrss``, which a child
    inherits from the process that forked it); elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024


def child_rss(pair: str, variant: str, args) -> float:
    """Peak RSS (MiB) of a fresh process that builds ``variant`` alone and runs a few steps."""
    cmd = [
        sys.executable, "-m", "benchmarks.step", "--pair", pair, "--variants", variant, "--steps", "1",
        "--warmup", "0", "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads),
        "--classes", str(args.classes), "--device", args.device, "--rss-child",
        "--teacher", PAIRS[pair][0], "--student", PAIRS[pair][1],
        "--malloc-top-pad", str(-1 if args.malloc_top_pad is None else args.malloc_top_pad),
    ]
    if args.channels_last:
        cmd.append("--channels-last")
    if args.amp != "none":
        cmd += ["--amp", args.amp]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"RSS subprocess for {pair}/{variant} failed:\n{out.stderr[-2000:]}")
    for line in out.stdout.splitlines():
        if line.startswith("# process peak RSS:"):
            return float(line.split(":")[1].split()[0])
    raise RuntimeError(f"RSS subprocess for {pair}/{variant} printed no peak RSS:\n{out.stdout[-2000:]}")


def add_step_args(p: argparse.ArgumentParser, *, steps: int) -> None:
    """The arguments that build a benchmarked step (shared by the benchmarks built on this one)."""
    p.add_argument("--teacher", help="override the pair's teacher (a registry name), e.g. for a quick dry run")
    p.add_argument("--student", help="override the pair's student (a registry name)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype (bf16 on GPU)")


def add_heap_arg(p: argparse.ArgumentParser) -> None:
    """``--malloc-top-pad``: glibc's heap padding, set as the trainer sets it (shared by the
    benchmarks built on this one; apply with :func:`apply_heap_arg`)."""
    p.add_argument("--malloc-top-pad", type=int, default=DEFAULT_TOP_PAD_MIB,
                   help="glibc M_TOP_PAD in MiB, as the trainer sets it (e2kd.train.heap); -1: leave the C library's setting")


def apply_heap_arg(p: argparse.ArgumentParser, args) -> None:
    """Set the heap padding of ``--malloc-top-pad``; ``args.malloc_top_pad`` becomes the MiB set,
    or None where nothing was set (-1, or not glibc)."""
    if args.malloc_top_pad >= 0:
        try:
            args.malloc_top_pad = args.malloc_top_pad if set_malloc_top_pad(args.malloc_top_pad) else None
        except ValueError as err:
            p.error(str(err))
    else:
        args.malloc_top_pad = None


def override_pair(args, pair: str) -> None:
    """Apply ``--teacher`` / ``--student`` to ``PAIRS[pair]``."""
    if args.teacher or args.student:
        t, s_, e = PAIRS[pair]
        PAIRS[pair] = (args.teacher or t, args.student or s_, e)


def check_pair_and_variants(p: argparse.ArgumentParser, args) -> None:
    """Validate ``--pair``, ``--teacher``/``--student``, ``--variants`` (turned into a list) and
    ``--steps``, applying the model overrides (shared by the benchmarks built on this one)."""
    if (args.teacher or args.student) and args.pair == "all":
        p.error("--teacher/--student override one pair: give --pair too")
    if args.pair != "all":
        override_pair(args, args.pair)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")


def print_flops(pair: str, rows: dict, gemm: float) -> None:
    """The ``--flops`` table of one pair: counted GFLOP per step (a partial variant's mean over
    a cycle), its ratio to KD's, the rate reached (by the median step; a partial variant's mean)
    and that rate as a share of the device's matrix-product rate ``gemm`` (GFLOP/s)."""
    kd = rows.get("kd", {}).get("gflop")
    print("| pair | variant | GFLOP / step | FLOP ratio to KD | GFLOP/s reached | share of the matrix-product rate |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        ratio = r["gflop"] / kd if kd else float("nan")
        print(f"| {pair} | {name} | {r['gflop']:.2f} | {ratio:.2f} | {r['gflop_per_s']:.0f} | "
              f"{100 * r['gflop_per_s'] / gemm:.0f} % |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=[*PAIRS, "all"], default="all")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    add_step_args(p, steps=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the student where it works")
    p.add_argument("--rss", action="store_true", help="also measure each variant's peak RSS in a fresh subprocess")
    p.add_argument("--json", help="write all figures to this JSON file")
    p.add_argument("--flops", action="store_true",
                   help="also count each step's convolution and matrix-product FLOPs and the rate reached, "
                        "against this device's large matrix-product rate")
    add_heap_arg(p)
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    apply_heap_arg(p, args)
    check_pair_and_variants(p, args)
    if args.size < 32 or args.batch < 1:
        p.error("--size must be >= 32 and --batch >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    if args.rss_child:
        run_pair(args.pair, args)
        print(f"# process peak RSS: {peak_rss_mib():.0f} MiB")
        return 0
    pairs = ["gradcam", "bcos"] if args.pair == "all" else [args.pair]
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
          + f", threads {torch.get_num_threads()}, {args.size} px, batch {args.batch}, "
          f"{args.steps} interleaved steps after {args.warmup} warm-up, amp {args.amp}, "
          f"channels-last {args.channels_last}, compile {args.compile}, malloc top pad {args.malloc_top_pad} MiB")
    print("| pair | variant | median step (ms) | mean step (ms) | images/s | saved for backward (MiB) | peak memory (MiB) "
          "| ratio to KD (wall) | paired ratio to KD (wall) | median CPU time (ms) | ratio to KD (CPU) "
          "| page faults / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    gemm = None
    if args.flops:
        dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
        gemm = matmul_rate(args.device, dtype) / 1e9
        print(f"# {args.device} {str(dtype).removeprefix('torch.')} {gemm_size(args.device)}² matrix product: {gemm:.0f} GFLOP/s")
    report = {"argv": sys.argv, "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()},
              "gemm_gflop_per_s": gemm, "pairs": {}}
    for pair in pairs:
        rows = run_pair(pair, args)
        if args.rss:
            for name in rows:
                rows[name]["rss_mib"] = child_rss(pair, name, args)
        kd = rows.get("kd")
        for name, r in rows.items():
            use_mean = name in EVERY
            wall = r["mean_ms"] if use_mean else r["median_ms"]
            cpu_t = r["cpu_mean_ms"] if use_mean else r["cpu_ms"]
            if kd:
                r["ratio_wall"] = wall / (kd["mean_ms"] if use_mean else kd["median_ms"])
                r["ratio_cpu"] = cpu_t / (kd["cpu_mean_ms"] if use_mean else kd["cpu_ms"])
            peak = r["peak_mib"] if args.device.startswith("cuda") else r.get("rss_mib", float("nan"))
            tag = " (compiled)" if r["compiled"] else ""
            print(f"| {pair} | {name}{tag} | {r['median_ms']:.0f} | {r['mean_ms']:.0f} | {r['images_per_s']:.1f} | "
                  f"{r['saved_mib']:.0f} | {peak:.0f} | {r.get('ratio_wall', float('nan')):.2f} | "
                  f"{r.get('paired_ratio', float('nan')):.2f} | {r['cpu_ms']:.0f} | "
                  f"{r.get('ratio_cpu', float('nan')):.2f} | {r['page_faults']:.0f} |", flush=True)
        for name in ("every4", "every2"):
            if not (kd and "e2kd" in rows and name in rows):
                continue
            k = EVERY[name]
            for key, label in (("mean_ms", "wall"), ("cpu_mean_ms", "CPU")):
                expect = ((k - 1) * kd[key] + rows["e2kd"][key]) / k
                print(f"#   {pair}/{name} mean {label} {rows[name][key]:.0f} ms vs ({k - 1}·KD + e²KD)/{k} = {expect:.0f} ms "
                      f"(ratio {rows[name][key] / expect:.2f})")
        for name, r in rows.items():
            print(f"#   {pair}/{name} step times (ms): {r['times_ms']}" + (f"  [{r['note']}]" if r["note"] else ""))
        if args.flops:
            print_flops(pair, rows, gemm)
        report["pairs"][pair] = rows
    print(f"# process peak RSS (all variants together): {peak_rss_mib():.0f} MiB")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
