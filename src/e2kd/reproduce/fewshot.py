"""``fewshot``: KD vs e²KD on Fashion-MNIST with k images per class (desideratum 1).

Parchami-Araghi et al. (ECCV 2024, Table 1) find e²KD ahead of KD in accuracy and agreement
when the distillation data is scarce (ImageNet, 50 and 200 shots), with the gap closing on the
full data. This experiment asks the same on Fashion-MNIST with a GradCAM pair (ResNet-18 →
ResNet-8, width 16) and a B-cos pair (B-cos ResNet-18 → B-cos ResNet-8).

Protocol
--------
* ``val_per_class`` training images per class are held out as a validation split; the k shots
  are drawn (per seed) from the rest; the seed also sets the student's initialisation.
* λ and T are chosen on the validation split, never on test, at one size (``sweep_k``) with one
  seed: first T ∈ {1, 5} for KD (λ = 0), then λ ∈ {0.2, 1, 5, 10} for e²KD at that T, each by
  validation accuracy (ties: agreement). The chosen values are used for every k and seed.
* Every run gets the same budget of optimiser steps (the larger k, the fewer epochs).
* Accuracy and agreement are measured on the whole test split (10,000 images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..report.tables import markdown_table
from ._common import ExperimentResult, read_results, register_experiment, run_config
from ._fmnist import TestSet, config_path, ensure_teacher, score_run

__all__ = ["FewshotSize", "FULL", "QUICK", "fewshot"]

PAPER = """| Teacher → student, explanation | Method | 50 shots Acc/Agr | 200 shots Acc/Agr | full data Acc/Agr |
|---|---|---|---|---|
| ResNet-34 (73.3 %) → ResNet-18, GradCAM | KD | 49.8 / 55.5 | 63.1 / 71.9 | 71.8 / 81.2 |
| | e²KD | 54.9 / 61.7 | 64.1 / 73.2 | 71.8 / 81.6 |
| B-cos ResNet-34 (72.3 %) → B-cos ResNet-18, B-cos | KD | 35.3 / 38.4 | 56.5 / 62.9 | 70.3 / 79.9 |
| | e²KD | 43.9 / 48.4 | 58.8 / 66.0 | 70.6 / 80.3 |
| B-cos DenseNet-169 (75.2 %) → B-cos ResNet-18, B-cos | KD | 37.3 / 40.2 | 51.3 / 55.6 | 71.2 / 78.8 |
| | e²KD | 45.4 / 49.0 | 55.7 / 60.7 | 71.9 / 79.8 |"""


@dataclass(frozen=True)
class Pair:
    label: str
    key: str  # config infix: fewshot_<key>_{kd,e2kd}.yaml
    teacher_config: str
    teacher_name: str


# The teachers of the full size: configs/fmnist/teacher.yaml and teacher_bcos.yaml as they are
# (one epoch over the 60,000 labelled images, the demo's recipe).
TEACHER_NAME = "fmnist-teacher-1epoch"
TEACHER = ("data.eval_limit=2000", "eval.localisation=false")
BCOS_TEACHER_NAME = "fmnist-teacher-bcos-1epoch"
BCOS_TEACHER = ("data.eval_limit=2000", "eval.localisation=false")

PAIRS = {
    "gradcam": Pair("GradCAM", "gradcam", "configs/fmnist/teacher.yaml", TEACHER_NAME),
    "bcos": Pair("B-cos", "bcos", "configs/fmnist/teacher_bcos.yaml", BCOS_TEACHER_NAME),
}


@dataclass(frozen=True)
class FewshotSize:
    """How big the experiment is; :data:`FULL` is what ``e2kd reproduce fewshot`` runs."""

    shots: Dict[str, Tuple[Optional[int], ...]]  # pair -> k values (None: all training images)
    steps: Dict[str, int]  # pair -> optimiser steps per run
    batch_size: int
    sweep_k: int
    temperatures: Tuple[float, ...]
    lams: Tuple[float, ...]
    val_per_class: int
    eval_limit: int  # test images of the trainer's own evaluation (explanation similarity)
    test_limit: Optional[int]  # test images for accuracy / agreement (None: all 10,000)
    student_kwargs: Tuple[str, ...] = ()
    teacher_suffix: str = ""
    teacher_overrides: Dict[str, Tuple[str, ...]] = None  # pair -> overrides of its teacher config
    pairs: Tuple[str, ...] = ("gradcam", "bcos")


FULL = FewshotSize(
    shots={"gradcam": (10, 50, 200, None), "bcos": (10, 50, 200, None)},
    steps={"gradcam": 600, "bcos": 600},  # the demo's student budget: 60 epochs of 50 shots
    batch_size=50,
    sweep_k=50,
    temperatures=(1.0, 5.0),
    lams=(0.2, 1.0, 5.0, 10.0),
    val_per_class=20,
    eval_limit=500,
    test_limit=None,
    teacher_overrides={"gradcam": TEACHER, "bcos": BCOS_TEACHER},
)

# A tiny teacher for the quick size (CI): a few steps on a few hundred images.
QUICK_TEACHER = ("data.limit=256", "optim.max_steps=4", "optim.batch_size=64", "model.kwargs.width=8",
                 "data.eval_limit=100", "eval.localisation=false")

QUICK = FewshotSize(
    shots={"gradcam": (10, None), "bcos": (10,)},
    steps={"gradcam": 3, "bcos": 2},
    batch_size=20,
    sweep_k=10,
    temperatures=(1.0,),
    lams=(1.0,),
    val_per_class=5,
    eval_limit=50,
    test_limit=300,
    student_kwargs=("model.kwargs.width=8",),
    teacher_suffix="-quick",
    teacher_overrides={"gradcam": QUICK_TEACHER, "bcos": QUICK_TEACHER},
)


def _k_label(k: Optional[int]) -> str:
    return "all" if k is None else str(k)


def _fmt(v: float) -> str:
    return f"{v:g}"


class _Runner:
    def __init__(self, exp_dir: Path, size: FewshotSize, test: TestSet):
        self.exp_dir, self.size, self.test = exp_dir, size, test
        self.teachers: Dict[str, Path] = {}

    def teacher(self, pair: Pair) -> Path:
        if pair.key not in self.teachers:
            self.teachers[pair.key] = ensure_teacher(
                self.exp_dir, pair.teacher_config, pair.teacher_name + self.size.teacher_suffix,
                self.size.teacher_overrides[pair.key],
            )
        return self.teachers[pair.key]

    def run(self, pair: Pair, k: Optional[int], lam: float, temperature: float, seed: int) -> Dict[str, float]:
        s = self.size
        method = "kd" if lam == 0 else "e2kd"
        steps = s.steps[pair.key]
        name = f"{pair.key}-k{_k_label(k)}-lam{_fmt(lam)}-T{_fmt(temperature)}-s{seed}"
        overrides = [
            f"teacher.checkpoint={self.teacher(pair)}",
            f"data.shots={'null' if k is None else k}",
            f"data.val_per_class={s.val_per_class}",
            "data.seed=null",  # the run's seed draws the shots
            f"data.eval_limit={s.eval_limit}",
            f"distill.lam={lam}",
            f"distill.temperature={temperature}",
            f"optim.max_steps={steps}",
            f"optim.batch_size={s.batch_size}",
            "optim.warmup_epochs=0",
            f"optim.warmup_steps={max(steps // 10, 0)}",
            "eval.localisation=false",
            "eval_batch_size=250",
            f"checkpoint_every=0",
            f"log_every={max(steps // 4, 1)}",
            "progress=false",
            f"seed={seed}",
            *s.student_kwargs,
        ]
        run_dir = run_config(
            config_path(f"configs/fmnist/fewshot_{pair.key}_{method}.yaml"), overrides,
            mode="distill", out_dir=self.exp_dir / "runs", name=name,
        )
        return score_run(run_dir, self.test, self.teacher(pair))


def best_on_validation(rows: List[Dict], key: str) -> Dict:
    """The row with the highest validation accuracy (ties: agreement, then the smaller ``key``
    when it is ``lam``)."""
    return max(rows, key=lambda r: (r["val_accuracy"], r.get("val_agreement", 0.0), -r[key] if key == "lam" else 0))


def _sweep(runner: _Runner, pair: Pair, size: FewshotSize, seed: int) -> Tuple[float, float, List[Dict]]:
    """T for KD, then λ for e²KD at that T, each by validation accuracy; returns (T, λ, rows)."""
    rows = []
    kd_rows = []
    for t in size.temperatures:
        r = runner.run(pair, size.sweep_k, 0.0, t, seed)
        kd_rows.append({"pair": pair.label, "method": "KD", "lam": 0.0, "T": t, **r})
    temperature = best_on_validation(kd_rows, "T")["T"]
    e2_rows = []
    for lam in size.lams:
        r = runner.run(pair, size.sweep_k, lam, temperature, seed)
        e2_rows.append({"pair": pair.label, "method": "e²KD", "lam": lam, "T": temperature, **r})
    lam = best_on_validation(e2_rows, "lam")["lam"]
    rows = kd_rows + e2_rows
    return temperature, lam, rows


def run_fewshot(exp_dir: Path, *, size: FewshotSize, seeds: Sequence[int], pairs: Optional[Sequence[str]] = None) -> ExperimentResult:
    """Run the sweep and the k × method × seed grid of :data:`size` for each pair (default
    ``size.pairs``); see the module doc."""
    exp_dir = Path(exp_dir)
    pairs = tuple(size.pairs if pairs is None else pairs)
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        raise ValueError(f"unknown teacher/student pair(s) {unknown}; choose from {sorted(PAIRS)}")
    test = TestSet(limit=size.test_limit)
    runner = _Runner(exp_dir, size, test)
    records: List[Dict] = []
    sweeps: List[Dict] = []
    chosen: Dict[str, Dict[str, float]] = {}
    teacher_acc: Dict[str, float] = {}
    for key in pairs:
        pair = PAIRS[key]
        tdir = runner.teacher(pair)
        teacher_acc[pair.label] = float((test.teacher_pred(tdir) == test.y).float().mean())
        temperature, lam, rows = _sweep(runner, pair, size, seeds[0])
        chosen[pair.label] = {"T": temperature, "lam": lam}
        sweeps.extend(rows)
        for k in size.shots[key]:
            for method, m_lam in (("KD", 0.0), ("e²KD", lam)):
                for seed in seeds:
                    r = runner.run(pair, k, m_lam, temperature, seed)
                    records.append({"pair": pair.label, "k": _k_label(k), "method": method, "seed": seed, **r})
    sweep_table = markdown_table(
        sweeps,
        {"pair": "pair", "method": "method", "lam": "λ", "T": "T", "val_accuracy": "val Acc", "val_agreement": "val Agr",
         "accuracy": "test Acc", "agreement": "test Agr"},
        digits=1, scale={"val_accuracy": 100.0, "val_agreement": 100.0, "accuracy": 100.0, "agreement": 100.0},
    )
    n_test = len(test)
    notes = (
        f"Teacher accuracy on the {n_test} test images: "
        + ", ".join(f"{p} {100 * a:.1f} %" for p, a in teacher_acc.items())
        + f". Validation: {size.val_per_class} training images per class held out. "
        + f"Budget per run: {', '.join(f'{PAIRS[p].label} {size.steps[p]} steps' for p in pairs)} of batch {size.batch_size}. "
        + "Chosen on validation (k = " + str(size.sweep_k) + f", seed {seeds[0]}): "
        + ", ".join(f"{p} T = {c['T']:g}, λ = {c['lam']:g}" for p, c in chosen.items())
        + ".\n\nSweep (selection by val Acc; test columns shown for information only):\n\n" + sweep_table
    )
    return ExperimentResult(
        records=records,
        by=["pair", "k", "method"],
        metrics={"accuracy": "Acc", "agreement": "Agr", "explanation_similarity": "Exp. sim."},
        paper=PAPER,
        notes=notes,
        extra={"sweep": sweeps, "chosen": chosen, "teacher_accuracy": teacher_acc, "num_test_images": n_test,
               "size": {"shots": {p: [_k_label(k) for k in size.shots[p]] for p in pairs}, "steps": size.steps,
                        "batch_size": size.batch_size, "sweep_k": size.sweep_k}},
    )


@register_experiment("fewshot")
def fewshot(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult:
    """Fashion-MNIST, k ∈ {10, 50, 200, all} shots: KD vs e²KD, GradCAM and B-cos pairs (desideratum 1)."""
    return run_fewshot(out_dir, size=QUICK if quick else FULL, seeds=seeds)
