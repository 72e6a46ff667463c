"""``vit``: a B-cos CNN teacher distilled into a B-cos ViT student (desideratum 3b).

Parchami-Araghi et al. (ECCV 2024, Sec. 4.3) distil a B-cos DenseNet-169 into a B-cos ViT-Tiny
on ImageNet: e²KD gives the best accuracy and agreement (labels 60.0 / 64.6, KD 64.8 / 70.1,
e²KD 66.3 / 71.8), and the e²KD ViT inherits the CNN's shift equivariance: its explanations
move with the image instead of jumping with the patch grid.

Here the Fashion-MNIST B-cos ResNet-18 teacher (``configs/fmnist/teacher_bcos.yaml``) is
distilled into a B-cos ViT with 4×4 patches (``bcos_vit_tiny_small``, depth 2 at CPU scale),
next to the same ViT trained on labels. For the teacher and every student, the shift
equivariance of the B-cos contribution maps is measured with
:func:`e2kd.metrics.shift_equivariance` (crop mode: test images padded by ``max_shift`` black
pixels, 28×28 windows moved 0..``max_shift`` pixels diagonally); the curves are saved as
``shift_equivariance.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..bcos.explainer import BcosExplainer
from ..metrics import shift_equivariance
from ..report.figures import curve_figure
from ..train.build import load_model_file
from ._common import ExperimentResult, register_experiment, run_config
from ._fmnist import TestSet, config_path, ensure_teacher, score_run
from .fewshot import BCOS_TEACHER, BCOS_TEACHER_NAME, QUICK_TEACHER

__all__ = ["VitSize", "FULL", "QUICK", "vit", "measure_shift"]

PAPER = """| B-cos DenseNet-169 → B-cos ViT-Tiny (ImageNet) | Acc | Agr |
|---|---|---|
| Trained on labels | 60.0 | 64.6 |
| KD | 64.8 | 70.1 |
| e²KD | 66.3 | 71.8 |

The e²KD ViT's explanations are shift-equivariant like the CNN teacher's."""

METHODS = (("labels", "ViT on labels"), ("kd", "ViT KD"), ("e2kd", "ViT e²KD"))


@dataclass(frozen=True)
class VitSize:
    """How big the experiment is; :data:`FULL` is what ``e2kd reproduce vit`` runs."""

    steps: int
    batch_size: int
    depth: int
    eval_limit: int
    test_limit: Optional[int]
    shift_images: int
    max_shift: int
    teacher_name: str = BCOS_TEACHER_NAME
    teacher_overrides: Tuple[str, ...] = BCOS_TEACHER


FULL = VitSize(steps=600, batch_size=32, depth=2, eval_limit=300, test_limit=None, shift_images=100, max_shift=8)
QUICK = VitSize(
    steps=2, batch_size=8, depth=1, eval_limit=20, test_limit=200, shift_images=8, max_shift=4,
    teacher_name=BCOS_TEACHER_NAME + "-quick", teacher_overrides=QUICK_TEACHER,
)


def measure_shift(model: torch.nn.Module, x: torch.Tensor, *, max_shift: int, batch_size: int = 50):
    """Shift equivariance of ``model``'s B-cos contribution maps on ``x`` (N, 1, 28 + P, 28 + P).

    Returns ``(curves, summary)`` of :class:`e2kd.metrics.ShiftEquivariance`.
    """
    explainer = BcosExplainer(output="contributions")
    res = None
    for i in range(0, x.shape[0], batch_size):
        r = shift_equivariance(model, explainer, x[i : i + batch_size], max_shift=max_shift, mode="crop")
        res = r if res is None else res.merge(r)
    return res.curves(), res.summary()


def train_student(exp_dir: Path, size: VitSize, teacher: Path, key: str, seed: int) -> Path:
    """One ViT student: ``key`` "labels" (cross-entropy), "kd" or "e2kd"; returns its run folder."""
    overrides = [
        f"model.kwargs.depth={size.depth}",
        f"data.eval_limit={size.eval_limit}",
        f"optim.max_steps={size.steps}",
        f"optim.batch_size={size.batch_size}",
        f"optim.warmup_steps={max(size.steps // 10, 0)}",
        "eval_batch_size=100",
        "checkpoint_every=0",
        f"log_every={max(size.steps // 4, 1)}",
        "progress=false",
        f"seed={seed}",
    ]
    if key != "labels":
        overrides.insert(0, f"teacher.checkpoint={teacher}")
    return run_config(
        config_path(f"configs/fmnist/vit_bcos_{key}.yaml"), overrides,
        mode="teacher" if key == "labels" else "distill", out_dir=Path(exp_dir) / "runs", name=f"vit-{key}-s{seed}",
    )


def shift_of_run(run_dir: Path, x: torch.Tensor, *, max_shift: int):
    """:func:`measure_shift` of a run's model, cached in ``run_dir/shift_equivariance.json``."""
    import json

    from ..train.runfolder import atomic_write_json

    cache = Path(run_dir) / "shift_equivariance.json"
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("num_images") == int(x.shape[0]) and saved.get("max_shift") == max_shift:
            return saved["curves"], saved["summary"]
    curves, summary = measure_shift(load_model_file(Path(run_dir), in_chans=1), x, max_shift=max_shift)
    atomic_write_json(cache, {"num_images": int(x.shape[0]), "max_shift": max_shift, "curves": curves, "summary": summary})
    return curves, summary


def run_vit(exp_dir: Path, *, size: VitSize, seeds: Sequence[int]) -> ExperimentResult:
    """ViT on labels, KD and e²KD students for every seed; accuracy, agreement, shift equivariance."""
    exp_dir = Path(exp_dir)
    test = TestSet(limit=size.test_limit)
    shifted = TestSet(limit=size.shift_images, pad=size.max_shift // 2 + size.max_shift % 2)
    # pad P/2 on each side (rounded up): windows of 28 + 2·pad − P >= 28 pixels cover the garment
    teacher = ensure_teacher(
        exp_dir, "configs/fmnist/teacher_bcos.yaml", size.teacher_name, size.teacher_overrides
    )
    t_model = load_model_file(teacher, in_chans=1)
    t_curves, t_summary = measure_shift(t_model, shifted.x, max_shift=size.max_shift)
    teacher_acc = float((test.teacher_pred(teacher) == test.y).float().mean())
    records: List[Dict] = [{"model": "B-cos ResNet-18 teacher", "seed": 0, "accuracy": teacher_acc, **t_summary}]
    curves: Dict[str, Dict[str, List[float]]] = {"teacher": t_curves}
    for key, label in METHODS:
        for seed in seeds:
            run_dir = train_student(exp_dir, size, teacher, key, seed)
            scores = score_run(run_dir, test, teacher)
            s_curves, s_summary = shift_of_run(run_dir, shifted.x, max_shift=size.max_shift)
            records.append({"model": label, "seed": seed, **scores, **s_summary})
            curves[f"{label} (seed {seed})"] = s_curves
    fig = {"B-cos ResNet-18 teacher": (t_curves["shift"], t_curves["cosine"])}
    for key, label in METHODS:
        per_seed = [curves[f"{label} (seed {s})"]["cosine"] for s in seeds]
        c = torch.tensor(per_seed)
        fig[label] = (t_curves["shift"], c.mean(0).tolist(), c.std(0, unbiased=False).tolist())
    curve_figure(fig, exp_dir / "shift_equivariance.png", xlabel="shift (pixels)", ylabel="explanation cosine",
                 title="Shift equivariance of B-cos explanations")
    notes = (
        f"Shift equivariance: cosine between the contribution map of the shifted image and the shifted map of the "
        f"unshifted image, mean over shifts 1..{size.max_shift} px (diagonal) on the first {size.shift_images} test "
        f"images (×100 in the table); curves in shift_equivariance.png. The ViT has 4×4 patches, so shifts of 4 and 8 "
        f"px move the image by whole patches. Students: {size.steps} steps of batch {size.batch_size}, depth {size.depth}; "
        f"λ = 1, T = 1 (not tuned)."
    )
    return ExperimentResult(
        records=records,
        by=["model"],
        metrics={"accuracy": "Acc", "agreement": "Agr", "explanation_similarity": "Exp. sim.",
                 "shift_cosine": "Shift cos", "shift_prediction_stability": "Pred. stab."},
        paper=PAPER,
        notes=notes,
        extra={"curves": curves, "teacher_accuracy": teacher_acc, "num_test_images": len(test), "figure": "shift_equivariance.png"},
    )


@register_experiment("vit")
def vit(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult:
    """B-cos CNN teacher -> B-cos ViT student on Fashion-MNIST: labels vs KD vs e²KD, shift equivariance (desideratum 3b)."""
    return run_vit(out_dir, size=QUICK if quick else FULL, seeds=seeds)
