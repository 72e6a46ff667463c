"""``e2kd reproduce multilabel``: interpretability learned from a guided teacher (desideratum 3a).

TuxScenes (a VOC-style multi-label set: 1-3 object stamps of 6 categories on a photo
background, a box per object). As in the paper's Pascal VOC table:

1. Two B-cos teachers trained with binary cross-entropy plus model guidance (Rao et al.,
   ICCV 2023) on their B-cos contribution maps: the energy loss (optimises EPG) and the L1 loss
   (optimises IoU).
2. A student trained on the labels alone (binary cross-entropy, no teacher, no guidance): the
   paper's "student trained on labels" row, the same for both teacher columns.
3. From each teacher, a KD student (the per-class Bernoulli KD of multi-label data, λ = 0) and an e²KD
   student (B-cos explanations of the teacher's top-1 class). e²KD's λ is chosen on the
   validation split (micro F1) from the EPG teacher's first-seed runs and used for both
   teachers and all seeds.

Reported on the test split: EPG and IoU of the B-cos contribution maps of every present class
against its boxes, and micro F1 of ``logit > 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from ._common import ExperimentResult, read_results, register_experiment, run_config
from ._guided import data_overrides, length_overrides, pick_lambda, student_run, teacher_run, val_results

__all__ = ["SIZES", "multilabel"]

_CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "tuxscenes"

#: Experiment sizes. "full" is the default of ``e2kd reproduce multilabel`` (the documented
#: table); "quick" is the CI size.
SIZES: Dict[str, Dict[str, Any]] = {
    "full": dict(
        image_size=32,
        counts={"train": 1000, "val": 200, "test": 300},
        teacher_width=16,
        student_width=16,
        # 16 steps an epoch: teachers 30 epochs (480 steps), students 15 (240 steps); the first
        # version's 6 / 2 epochs left every student at F1 0 (no logit above 0 yet)
        teacher_epochs=30,
        student_epochs=15,
        batch_size=64,
        lr=3e-3,
        # chosen on the validation split (docs/results/reproduce_multilabel.md): per teacher, the
        # weight whose validation EPG (energy loss) / IoU (L1 loss) is highest among those whose
        # validation F1 is at least the unguided teacher's; grids {0.1, 0.3, 0.5, 1} and {0.5, 1, 3}
        guidance_weights={"EPG": 0.5, "IoU": 3.0},
        lams=(1.0, 5.0),
    ),
    "quick": dict(
        image_size=16,
        counts={"train": 96, "val": 32, "test": 48},
        teacher_width=4,
        student_width=4,
        teacher_steps=4,
        student_steps=3,
        batch_size=32,
        lr=3e-3,
        guidance_weights={"EPG": 1.0, "IoU": 1.0},
        lams=(1.0,),
    ),
}

_PAPER = """| | EPG teacher: EPG / IoU / F1 | IoU teacher: EPG / IoU / F1 |
|---|---|---|
| Teacher ResNet-50 | 75.7 / 21.3 / 72.5 | 65.0 / 49.7 / 72.8 |
| Student trained on labels | 50.0 / 29.0 / 58.0 | 50.0 / 29.0 / 58.0 |
| KD | 60.1 / 31.6 / 60.1 | 58.9 / 35.7 / 62.7 |
| e²KD | 71.1 / 24.8 / 67.6 | 60.3 / 45.7 / 64.8 |

(Pascal VOC, B-cos ResNet-50 teachers → B-cos ResNet-18 students, B-cos explanations.)"""

_GUIDANCE = {"EPG": "energy", "IoU": "l1"}


class _Runs:
    """The experiment's runs, each trained once into its folder (and reused when finished)."""

    def __init__(self, out_dir: Path, size: Dict[str, Any]):
        self.out_dir, self.size = out_dir, size
        self.data = data_overrides("tuxscenes", size, "distill.multilabel=true")
        self.common = ["model.name=bcos_resnet8_small", "distill.explainer=bcos",
                       f"optim.batch_size={size['batch_size']}", f"optim.lr={size['lr']}"]
        self.teachers: Dict[str, Dict[str, Any]] = {}

    def teacher(self, kind: str) -> Dict[str, Any]:
        """The guided teacher of ``kind`` ("EPG": energy loss, "IoU": L1 loss)."""
        if kind not in self.teachers:
            size = self.size
            self.teachers[kind] = teacher_run(
                _CONFIGS / f"teacher_{kind.lower()}.yaml",
                [*self.data, *self.common, f"model.kwargs.width={size['teacher_width']}",
                 *length_overrides(size, "teacher"), f"guidance.kind={_GUIDANCE[kind]}",
                 f"guidance.weight={size['guidance_weights'][kind]}", "guidance.explainer=bcos",
                 "guidance.explainer_kwargs.output=contributions", "seed=0"],
                out_dir=self.out_dir, name=f"tuxscenes-teacher-{kind.lower()}",
            )
        return self.teachers[kind]

    def student(self, kind: str, lam: float, seed: int) -> Dict[str, Any]:
        """A KD (``lam`` 0) or e²KD student of the ``kind`` teacher."""
        tag = "kd" if lam == 0 else f"e2kd-lam{lam:g}"
        method = "kd" if lam == 0 else "e2kd"
        return student_run(
            _CONFIGS / f"{kind.lower()}_teacher_{method}.yaml",
            [*self.data, *self.common, f"model.kwargs.width={self.size['student_width']}",
             *length_overrides(self.size, "student"), f"teacher.checkpoint={self.teacher(kind)['dir']}",
             f"distill.lam={lam}", "distill.temperature=1.0", f"seed={seed}"],
            out_dir=self.out_dir, name=f"tuxscenes-{kind.lower()}_teacher-{tag}-seed{seed}",
        )

    def labels_student(self, seed: int) -> Dict[str, Any]:
        """The student's architecture trained on the labels alone (BCE, no guidance)."""
        run_dir = run_config(
            _CONFIGS / "teacher_epg.yaml",
            [*self.data, *self.common, f"model.kwargs.width={self.size['student_width']}",
             *length_overrides(self.size, "student"), "guidance.kind=null", f"seed={seed}"],
            mode="teacher", out_dir=self.out_dir / "students", name=f"tuxscenes-labels-seed{seed}",
        )
        return read_results(run_dir)


@register_experiment("multilabel")
def multilabel(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult:
    """TuxScenes: EPG- and IoU-guided teachers; KD vs e²KD students; EPG, IoU, F1 (desideratum 3a)."""
    size = SIZES["quick" if quick else "full"]
    runs = _Runs(Path(out_dir), size)
    teachers = {kind: runs.teacher(kind) for kind in _GUIDANCE}

    first = seeds[0]
    sweep = {lam: runs.student("EPG", lam, first) for lam in size["lams"]}
    val = {lam: val_results(run["dir"], "tuxscenes") for lam, run in sweep.items()}
    lam = pick_lambda(val, "f1")

    records: List[Dict[str, Any]] = []
    for kind in _GUIDANCE:
        t = teachers[kind]["results"]
        records.append({"teacher": f"{kind} teacher", "model": "teacher", "lam": "–",
                        "epg": t.get("epg"), "iou": t.get("iou"), "f1": t.get("f1")})
        for seed in seeds:
            r = runs.labels_student(seed)
            records.append({"teacher": f"{kind} teacher", "model": "student on labels", "lam": "–", "seed": seed,
                            "epg": r.get("epg"), "iou": r.get("iou"), "f1": r.get("f1")})
        for seed in seeds:
            for method, lam_ in (("KD", 0.0), ("e²KD", lam)):
                run = sweep[lam] if (kind == "EPG" and lam_ == lam and lam_ != 0 and seed == first) else runs.student(kind, lam_, seed)
                r = run["results"]
                records.append({"teacher": f"{kind} teacher", "model": method, "lam": lam_, "seed": seed,
                                "epg": r.get("epg"), "iou": r.get("iou"), "f1": r.get("f1"),
                                "agreement": r.get("agreement"), "teacher_epg": r.get("teacher_epg"),
                                "teacher_iou": r.get("teacher_iou"), "teacher_f1": r.get("teacher_f1")})

    metrics = {"epg": "EPG", "iou": "IoU", "f1": "F1", "agreement": "top-1 agreement"}
    sweep_lines = ", ".join(
        f"λ={lam_:g}: val F1 {100 * v['f1']:.1f}, val agreement {100 * v.get('agreement', float('nan')):.1f}"
        for lam_, v in sorted(val.items())
    )
    notes = (
        f"Teachers: 1 seed (seed 0), B-cos ResNet-8 (width {size['teacher_width']}), BCE + guidance, weight "
        + ", ".join(f"{w:g} ({k})" for k, w in size["guidance_weights"].items())
        + f"; the student on labels: BCE alone, same size and schedule as the distilled "
        f"students; students B-cos ResNet-8 (width {size['student_width']}). e²KD's λ chosen on "
        f"the validation split (micro F1 of the EPG teacher's seed-{first} students): {sweep_lines}; chosen "
        f"λ={lam:g}, used for both teachers. EPG / IoU: B-cos contribution maps of every present class against "
        "its boxes (IoU binarised at half the map's maximum); F1: micro F1 of logit > 0 (test split)."
    )
    extra = {
        "lambda": lam,
        "lambda_selection": {f"{k:g}": v for k, v in val.items()},
        "size": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()},
        "teachers": {k: v["results"] for k, v in teachers.items()},
    }
    return ExperimentResult(records=records, by=("teacher", "model", "lam"), metrics=metrics, paper=_PAPER,
                            notes=notes, extra=extra)
