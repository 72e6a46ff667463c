"""``unrelated``: distil the Fashion-MNIST teacher with images of other datasets only.

Parchami-Araghi et al. (ECCV 2024, Table 2) distil a SUN397 teacher with ImageNet images and
an ImageNet teacher with SUN397 images: the student never sees an image of the task it is
scored on, and e²KD keeps it closer to the teacher than KD does. Here the Fashion-MNIST
GradCAM teacher (ResNet-18, width 16) is distilled into a ResNet-8 with MNIST digits only and
with animal silhouettes only (``mnist_digits`` / ``animal_shapes`` in :mod:`e2kd.data`), and
the students are scored on the 10,000 Fashion-MNIST test images.

λ and T are fixed (:data:`LAM`, :data:`TEMPERATURE`): λ = 1, T = 1, not tuned for this
experiment (the ``fewshot`` validation sweep prefers T = 1 and λ = 10 for the same pair at
k = 50); no value is tuned on test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ._common import ExperimentResult, register_experiment, run_config
from ._fmnist import TestSet, config_path, ensure_teacher, score_run
from .fewshot import QUICK_TEACHER, TEACHER, TEACHER_NAME

__all__ = ["UnrelatedSize", "FULL", "QUICK", "LAM", "TEMPERATURE", "unrelated"]

# Fixed, not tuned for this experiment.
LAM = 1.0
TEMPERATURE = 1.0

PAPER = """| | SUN397 teacher, distilled with ImageNet images: Acc / Agr | ImageNet teacher, distilled with SUN397 images: Acc / Agr |
|---|---|---|
| Teacher | 60.5 / – | 75.2 / – |
| Student trained on labels | 57.7 / 67.9 | 68.7 / 75.5 |
| KD | 53.5 / 65.0 | 14.9 / 16.7 |
| e²KD | 54.9 / 67.7 | 19.8 / 22.1 |"""

SOURCES = {"mnist_digits": ("MNIST digits", "mnist"), "animal_shapes": ("animal silhouettes", "animal_shapes")}


@dataclass(frozen=True)
class UnrelatedSize:
    """How big the experiment is; :data:`FULL` is what ``e2kd reproduce unrelated`` runs."""

    limit: int  # distillation images taken from each unrelated dataset
    steps: int
    batch_size: int
    eval_limit: int
    test_limit: Optional[int]
    student_kwargs: Tuple[str, ...] = ()
    teacher_name: str = TEACHER_NAME
    teacher_overrides: Tuple[str, ...] = TEACHER


FULL = UnrelatedSize(limit=5000, steps=50, batch_size=50, eval_limit=500, test_limit=None)
QUICK = UnrelatedSize(
    limit=200, steps=3, batch_size=20, eval_limit=50, test_limit=300,
    student_kwargs=("model.kwargs.width=8",), teacher_name=TEACHER_NAME + "-quick", teacher_overrides=QUICK_TEACHER,
)


def distil_one(exp_dir: Path, size: UnrelatedSize, teacher: Path, source: str, lam: float, seed: int) -> Path:
    """One student distilled on ``source`` images (KD when ``lam`` is 0); returns its run folder."""
    cfg_key = SOURCES[source][1]
    method = "kd" if lam == 0 else "e2kd"
    overrides = [
        f"teacher.checkpoint={teacher}",
        f"data.name={source}",
        f"data.limit={size.limit}",
        f"data.eval_limit={size.eval_limit}",
        f"distill.lam={lam}",
        f"distill.temperature={TEMPERATURE}",
        f"optim.max_steps={size.steps}",
        f"optim.batch_size={size.batch_size}",
        "eval.localisation=false",
        "eval_batch_size=250",
        "checkpoint_every=0",
        f"log_every={max(size.steps // 4, 1)}",
        "progress=false",
        f"seed={seed}",
        *size.student_kwargs,
    ]
    return run_config(
        config_path(f"configs/fmnist/unrelated_{cfg_key}_{method}.yaml"), overrides,
        mode="distill", out_dir=Path(exp_dir) / "runs", name=f"{cfg_key}-{method}-lam{lam:g}-T{TEMPERATURE:g}-s{seed}",
    )


def run_unrelated(exp_dir: Path, *, size: UnrelatedSize, seeds: Sequence[int]) -> ExperimentResult:
    """KD and e²KD students distilled on each unrelated dataset, every seed; scored on Fashion-MNIST test."""
    exp_dir = Path(exp_dir)
    test = TestSet(limit=size.test_limit)
    teacher = ensure_teacher(exp_dir, "configs/fmnist/teacher.yaml", size.teacher_name, size.teacher_overrides)
    records: List[Dict] = []
    for source, (label, _) in SOURCES.items():
        for method, lam in (("KD", 0.0), ("e²KD", LAM)):
            for seed in seeds:
                run_dir = distil_one(exp_dir, size, teacher, source, lam, seed)
                records.append({"distilled with": label, "method": method, "seed": seed, **score_run(run_dir, test, teacher)})
    teacher_acc = float((test.teacher_pred(teacher) == test.y).float().mean())
    notes = (
        f"Teacher (Fashion-MNIST ResNet-18, width 16) accuracy on the {len(test)} Fashion-MNIST test images: "
        f"{100 * teacher_acc:.1f} %. Students: ResNet-8 (width 16), {size.steps} steps of batch {size.batch_size} on the "
        f"first {size.limit} images of the unrelated dataset; λ = {LAM:g}, T = {TEMPERATURE:g} (fixed, not tuned)."
    )
    return ExperimentResult(
        records=records,
        by=["distilled with", "method"],
        metrics={"accuracy": "Acc", "agreement": "Agr", "explanation_similarity": "Exp. sim."},
        paper=PAPER,
        notes=notes,
        extra={"teacher_accuracy": teacher_acc, "num_test_images": len(test), "lam": LAM, "temperature": TEMPERATURE},
    )


@register_experiment("unrelated")
def unrelated(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult:
    """Distil the Fashion-MNIST teacher with MNIST digits / animal silhouettes only; KD vs e²KD on Fashion-MNIST test."""
    return run_unrelated(out_dir, size=QUICK if quick else FULL, seeds=seeds)
