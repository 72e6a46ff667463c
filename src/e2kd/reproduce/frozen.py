"""Frozen explanations vs live e²KD on Fashion-MNIST few-shot (GradCAM pair).

The teacher (standard ResNet-18, width 16) is frozen once over the 500 few-shot training
images (50 per class, un-augmented): its logits and GradCAM maps go into a store
(``e2kd freeze``). Then, per seed, the student (ResNet-8, width 16) is distilled three ways
with the same config and the same ``crop_flip`` augmentation:

* live KD (``distill.lam=0``): the reference;
* live e²KD: teacher forward and GradCAM on every augmented batch;
* frozen e²KD (``teacher.frozen=STORE``): no teacher while training; the stored maps are
  moved with each image's crop and flip.

Reported per setting: test accuracy, agreement with the teacher, explanation similarity,
wall-clock time per run (training plus final evaluation) and training time; the store's
build time is reported separately (it is paid once for all seeds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

from ._common import ExperimentResult, read_results, register_experiment, run_config
from .fewshot import TEACHER as FEWSHOT_TEACHER
from .fewshot import TEACHER_NAME as FEWSHOT_TEACHER_NAME

__all__ = ["frozen_experiment", "prepare", "seed_runs", "FULL_EPOCHS", "FULL_EVAL_IMAGES"]

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "fmnist"
# Distillation epochs of the full size: the shipped configs' 60 (600 steps of batch 50).
FULL_EPOCHS = 60
# Test images scored per run (the first ones of the test split; the same for every run).
FULL_EVAL_IMAGES = 10000
SETTINGS = (
    ("live KD", "fewshot_gradcam_kd.yaml", False),
    ("live e²KD", "fewshot_gradcam_e2kd.yaml", False),
    ("frozen e²KD", "fewshot_gradcam_e2kd.yaml", True),
)


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
            "student": common + ["data.shots=10", "data.val_per_class=0", "optim.max_steps=6", "optim.batch_size=25",
                                 "model.kwargs.width=8"],
        }
    return {
        "teacher": ["progress=false", *FEWSHOT_TEACHER],  # the fewshot experiment's teacher (shared folder)
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
    """Frozen explanations: frozen vs live e²KD (and live KD) on Fashion-MNIST few-shot, GradCAM."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: one thread per run gives steadier timings
    try:
        return _experiment(Path(out_dir), quick=quick, seeds=seeds)
    finally:
        torch.set_num_threads(threads)


def prepare(out_dir: Path, *, quick: bool) -> tuple:
    """The teacher (trained into ``<out>/teachers`` when missing) and the store (built once):
    returns (student overrides, store folder, store build record)."""
    size = _sizes(quick)
    tag = "-quick" if quick else ""
    teacher = run_config(_config("teacher.yaml"), size["teacher"], mode="teacher", out_dir=Path(out_dir).parent / "teachers",
                         name=f"fmnist-teacher{tag}" if quick else FEWSHOT_TEACHER_NAME)
    student = [*size["student"], f"teacher.checkpoint={teacher}"]
    store = Path(out_dir) / f"store-gradcam{tag}"
    return student, store, _freeze(_config("fewshot_gradcam_e2kd.yaml"), student, store)


def seed_runs(out_dir: Path, student: Sequence[str], store: Path, *, quick: bool, seed: int) -> List[dict]:
    """The three distillations of one seed (each reused when its results.json exists)."""
    tag = "-quick" if quick else ""
    records = []
    for label, cfg_name, frozen in SETTINGS:
        run_name = {"live KD": "kd", "live e²KD": "e2kd-live", "frozen e²KD": "e2kd-frozen"}[label]
        overrides = [*student, f"seed={seed}"] + ([f"teacher.frozen={store}"] if frozen else [])
        run_dir = run_config(_config(cfg_name), overrides, mode="distill", out_dir=Path(out_dir), name=f"{run_name}{tag}-s{seed}")
        res = read_results(run_dir)
        if "agreement" not in res:
            raise ValueError(f"{run_dir}: no agreement in results.json ({res.get('agreement_note')})")
        records.append({
            "method": label,
            "seed": seed,
            "accuracy": 100 * res["accuracy"],
            "agreement": 100 * res["agreement"],
            "explanation_similarity": 100 * res["explanation_similarity"],
            "wall_s": res["wall_time_s"],
            "train_s": _train_seconds(run_dir),
        })
    return records


def _experiment(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult:
    student, store, build = prepare(out_dir, quick=quick)
    records = [rec for seed in seeds for rec in seed_runs(out_dir, student, store, quick=quick, seed=seed)]

    def mean(method: str, key: str) -> float:
        vals = [r[key] for r in records if r["method"] == method]
        return sum(vals) / len(vals)

    gap = mean("frozen e²KD", "agreement") - mean("live e²KD", "agreement")
    epochs = ("a few steps (quick size)" if quick else
              f"{FULL_EPOCHS} epochs (the shipped config), {FULL_EVAL_IMAGES} test images")
    notes = (
        f"Fashion-MNIST, {'10' if quick else '50'} images per class, "
        f"{'ResNet-18 (width 4) → ResNet-8 (width 8)' if quick else 'ResNet-18 (width 16) → ResNet-8 (width 16)'}, GradCAM, crop_flip augmentation, {epochs}; accuracy, agreement and explanation similarity in % "
        f"on the test set; wall_s = whole run (data, training, evaluation), train_s = training steps only.\n\n"
        f"Store: built once in {build['build_s']:.1f} s ({build['images']} images, "
        f"{build['images_per_s']:.1f} images/s in the teacher, {build['bytes_per_image']:.0f} bytes/image).\n\n"
        f"Agreement, frozen e²KD − live e²KD (mean over seeds): {gap:+.2f} points "
        f"({'within' if abs(gap) <= 2.0 else 'NOT within'} 2 points)."
    )
    return ExperimentResult(
        records=records,
        by=["method"],
        metrics={"accuracy": "accuracy (%)", "agreement": "agreement (%)", "explanation_similarity": "expl. sim. (%)",
                 "wall_s": "wall (s)", "train_s": "train (s)"},
        percent=False,
        notes=notes,
        extra={"store": build, "agreement_gap_frozen_minus_live": gap, "store_path": str(store)},
    )
