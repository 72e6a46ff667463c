"""Frozen explanations vs live e²KD on Fashion-MNIST few-shot, GradCAM and B-cos pairs.

Per pair, the teacher (ResNet-18 width 16 with GradCAM, or B-cos ResNet-18 width 16 with B-cos
dynamic weights: the fewshot experiment's teachers) is frozen once over the 500 few-shot
training images (50 per class, un-augmented): its logits and explanation maps go into a store
(``e2kd freeze``). Then, per seed, the student (ResNet-8 / B-cos ResNet-8, width 16) is
distilled with the same config and the same ``crop_flip`` augmentation as

* live KD (``distill.lam=0``): the reference;
* live e²KD: teacher forward and explanation on every augmented batch;
* frozen e²KD (``teacher.frozen=STORE``): no teacher while training; the stored maps are
  moved with each image's crop and flip;
* B-cos pair only, frozen e²KD with ``distill.explain_every=4``: the student's B-cos explanation
  (a second-order pass through the whole student) costs more than the teacher forward it
  replaces, so an exact frozen B-cos step stays dearer than live KD; explaining every fourth
  step is the approximation that makes it cheaper (``python -m benchmarks.step``).

e²KD's λ and T are the fewshot experiment's validated choices at 50 shots (GradCAM λ = 1,
B-cos λ = 10; T = 1). Reported per setting: test accuracy, agreement with the teacher,
explanation similarity, wall-clock time per run (training plus final evaluation) and training
time; the store's build time is reported separately (it is paid once for all seeds).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ._common import ExperimentResult, read_results, register_experiment, run_config
from .fewshot import BCOS_TEACHER as FEWSHOT_BCOS_TEACHER
from .fewshot import BCOS_TEACHER_NAME as FEWSHOT_BCOS_TEACHER_NAME
from .fewshot import TEACHER as FEWSHOT_TEACHER
from .fewshot import TEACHER_NAME as FEWSHOT_TEACHER_NAME

__all__ = ["frozen_experiment", "prepare", "seed_runs", "FULL_EPOCHS", "FULL_EVAL_IMAGES", "PAIRS"]

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "fmnist"
# Distillation epochs of the full size: the shipped configs' 60 (600 steps of batch 50).
FULL_EPOCHS = 60
# Test images scored per run (the first ones of the test split; the same for every run).
FULL_EVAL_IMAGES = 10000


@dataclass(frozen=True)
class Setting:
    label: str
    method: str  # config suffix: fewshot_<pair>_<method>.yaml
    run_name: str
    frozen: bool = False
    explain_every: int = 1


@dataclass(frozen=True)
class FrozenPair:
    label: str
    key: str  # config infix and store name
    teacher_config: str
    teacher_name: str
    quick_teacher_name: str
    teacher_overrides: Tuple[str, ...]
    prefix: str  # run-folder prefix
    e2kd_overrides: Tuple[str, ...]
    settings: Tuple[Setting, ...]


_BASE = (
    Setting("live KD", "kd", "kd"),
    Setting("live e²KD", "e2kd", "e2kd-live"),
    Setting("frozen e²KD", "e2kd", "e2kd-frozen", frozen=True),
)
PAIRS: Dict[str, FrozenPair] = {
    "gradcam": FrozenPair("GradCAM", "gradcam", "teacher.yaml", FEWSHOT_TEACHER_NAME, "fmnist-teacher-quick",
                          FEWSHOT_TEACHER, "",
                          ("distill.lam=1.0",), _BASE),
    "bcos": FrozenPair("B-cos", "bcos", "teacher_bcos.yaml", FEWSHOT_BCOS_TEACHER_NAME, "fmnist-teacher-bcos-quick",
                       FEWSHOT_BCOS_TEACHER, "bcos-",
                       ("distill.lam=5.0",),  # the fewshot sweep's validated λ for the B-cos pair
                       _BASE + (Setting("frozen e²KD, explain every 4", "e2kd", "e2kd-frozen-every4", frozen=True,
                                        explain_every=4),)),
}


def _config(name: str) -> Path:
    path = CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} is missing; run e2kd reproduce from a source checkout")
    return path


def _sizes(quick: bool) -> Dict[str, List[str]]:
    if quick:
        common = ["progress=false", "data.eval_limit=200", "eval.localisation=false", "log_every=1"]
        return {
            "teacher": common + ["data.limit=256", "optim.max_steps=8", "model.kwargs.width=4", "optim.batch_size=64"],
            "student": common + ["data.shots=10", "data.val_per_class=0", "optim.max_steps=8", "optim.batch_size=25",
                                 "model.kwargs.width=8"],
        }
    return {
        "teacher": ["progress=false"],  # plus the pair's fewshot teacher overrides (shared folder)
        "student": ["progress=false", f"optim.epochs={FULL_EPOCHS}", f"data.eval_limit={FULL_EVAL_IMAGES}",
                    "eval.localisation=false"],
    }


def _train_seconds(run_dir: Path) -> float:
    """Sum of the logged per-step times (forward, backward, update and batch loading)."""
    total, last = 0.0, 0
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("split") == "train" and "step_time" in rec:
                total += rec["step_time"] * (rec["step"] - last)
                last = rec["step"]
    return total


def _freeze(cfg_path: Path, overrides: Sequence[str], store: Path) -> dict:
    """Build the store once (timed); later calls reuse it and its recorded build time."""
    from ..train import load_config
    from ..train.frozen import freeze_run

    record = store.parent / (store.name + ".build.json")
    if (store / "manifest.json").is_file() and record.is_file():
        return json.loads(record.read_text())
    start = time.time()
    report = freeze_run(load_config(str(cfg_path), [*overrides, f"teacher.frozen={store}"]), progress=False)
    info = {
        "build_s": time.time() - start,
        "freeze_s": report.seconds,
        "images": report.store_size,
        "images_per_s": report.images_per_s,
        "bytes_per_image": report.bytes_per_image,
    }
    from ..train.runfolder import atomic_write_json

    atomic_write_json(record, info)
    return info


@register_experiment("frozen")
def frozen_experiment(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult:
    """Frozen explanations: frozen vs live e²KD (and live KD) on Fashion-MNIST few-shot, GradCAM and B-cos."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: one thread per run gives steadier timings
    try:
        return _experiment(Path(out_dir), quick=quick, seeds=seeds)
    finally:
        torch.set_num_threads(threads)


def prepare(out_dir: Path, *, quick: bool, pair: str = "gradcam") -> tuple:
    """The pair's teacher (trained into ``<out>/teachers`` when missing) and its store (built
    once): returns (student overrides, store folder, store build record)."""
    spec = PAIRS[pair]
    size = _sizes(quick)
    tag = "-quick" if quick else ""
    teacher_overrides = size["teacher"] if quick else [*size["teacher"], *spec.teacher_overrides]
    teacher = run_config(_config(spec.teacher_config), teacher_overrides, mode="teacher",
                         out_dir=Path(out_dir).parent / "teachers",
                         name=spec.quick_teacher_name if quick else spec.teacher_name)
    student = [*size["student"], f"teacher.checkpoint={teacher}"]
    store = Path(out_dir) / f"store-{spec.key}{tag}"
    cfg = _config(f"fewshot_{spec.key}_e2kd.yaml")
    return student, store, _freeze(cfg, [*student, *spec.e2kd_overrides], store)


def seed_runs(out_dir: Path, student: Sequence[str], store: Path, *, quick: bool, seed: int,
              pair: str = "gradcam") -> List[dict]:
    """The distillations of one seed for one pair (each reused when its results.json exists)."""
    spec = PAIRS[pair]
    tag = "-quick" if quick else ""
    records = []
    for st in spec.settings:
        overrides = [*student, f"seed={seed}"]
        if st.method == "e2kd":
            overrides += list(spec.e2kd_overrides)
        if st.frozen:
            overrides.append(f"teacher.frozen={store}")
        if st.explain_every != 1:
            overrides.append(f"distill.explain_every={st.explain_every}")
        run_dir = run_config(_config(f"fewshot_{spec.key}_{st.method}.yaml"), overrides, mode="distill",
                             out_dir=Path(out_dir), name=f"{spec.prefix}{st.run_name}{tag}-s{seed}")
        res = read_results(run_dir)
        if "agreement" not in res:
            raise ValueError(f"{run_dir}: no agreement in results.json ({res.get('agreement_note')})")
        records.append({
            "pair": spec.label,
            "method": st.label,
            "seed": seed,
            "accuracy": 100 * res["accuracy"],
            "agreement": 100 * res["agreement"],
            "explanation_similarity": 100 * res["explanation_similarity"],
            "wall_s": res["wall_time_s"],
            "train_s": _train_seconds(run_dir),
        })
    return records


def _experiment(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult:
    records: List[dict] = []
    builds: Dict[str, dict] = {}
    stores: Dict[str, str] = {}
    for pair in PAIRS:
        student, store, builds[pair] = prepare(out_dir, quick=quick, pair=pair)
        stores[pair] = str(store)
        records += [rec for seed in seeds for rec in seed_runs(out_dir, student, store, quick=quick, seed=seed, pair=pair)]

    def mean(pair: str, method: str, key: str) -> float:
        vals = [r[key] for r in records if r["pair"] == PAIRS[pair].label and r["method"] == method]
        return sum(vals) / len(vals)

    gaps = {
        f"{spec.label} {st.label}": mean(pair, st.label, "agreement") - mean(pair, "live e²KD", "agreement")
        for pair, spec in PAIRS.items() for st in spec.settings if st.frozen
    }
    epochs = ("a few steps (quick size)" if quick else
              f"{FULL_EPOCHS} epochs (the shipped configs), {FULL_EVAL_IMAGES} test images")
    lines = [
        f"Fashion-MNIST, {'10' if quick else '50'} images per class, "
        f"{'teachers width 4 → students width 8' if quick else 'ResNet-18 → ResNet-8 (GradCAM) and B-cos ResNet-18 → B-cos ResNet-8 (B-cos), width 16'}, "
        f"crop_flip augmentation, {epochs}; e²KD λ = 1 (GradCAM), 10 (B-cos), T = 1; accuracy, agreement and "
        "explanation similarity in % on the test set; wall_s = whole run (data, training, evaluation), "
        "train_s = training steps only.",
        "",
        "Stores, built once: " + "; ".join(
            f"{PAIRS[p].label} {b['build_s']:.1f} s ({b['images']} images, {b['images_per_s']:.1f} images/s in the "
            f"teacher, {b['bytes_per_image']:.0f} bytes/image)" for p, b in builds.items()) + ".",
        "",
        "Agreement minus live e²KD's (mean over seeds): " + "; ".join(
            f"{k} {v:+.2f} points "
            f"({'within' if abs(v) <= 2.0 else 'NOT within'} 2)" for k, v in gaps.items()) + ".",
    ]
    return ExperimentResult(
        records=records,
        by=["pair", "method"],
        metrics={"accuracy": "accuracy (%)", "agreement": "agreement (%)", "explanation_similarity": "expl. sim. (%)",
                 "wall_s": "wall (s)", "train_s": "train (s)"},
        percent=False,
        notes="\n".join(lines),
        extra={"stores": builds, "agreement_gap_minus_live": gaps, "store_paths": stores,
               "agreement_gap_frozen_minus_live": gaps["GradCAM frozen e²KD"]},
    )
