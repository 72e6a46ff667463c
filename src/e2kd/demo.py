"""The embedded default demo: KD vs e²KD with 50 images per class on Fashion-MNIST.

``e2kd demo`` (``make demo``) trains a teacher on the 60,000 labelled training images (or
reuses the one an earlier demo left in ``runs/demo/teacher``), distils a smaller student with
plain KD and with e²KD from 50 images per class, evaluates both on the 10,000 test images and
writes ``runs/demo/results.json``, ``runs/demo/results.md`` and ``runs/demo/explanations.png``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["DEMO", "run_demo"]

# Values only; each dict is an ExperimentConfig (see e2kd.train.config).
DEMO: Dict[str, Dict[str, Any]] = {
    "teacher": {
        "name": "teacher",
        "data": {"name": "fashion_mnist", "augment": "crop_flip"},
        "model": {"name": "resnet18_small", "kwargs": {"width": 16}},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "grad_clip": 1.0, "epochs": 1, "batch_size": 128},
        "eval": {"localisation": False},
        "checkpoint_every": 100,
        "log_every": 20,
    },
    "student": {
        "data": {"name": "fashion_mnist", "shots": 50, "val_per_class": 10, "augment": "crop_flip", "seed": 0},
        "model": {"name": "resnet8_small", "kwargs": {"width": 16}},
        "distill": {"explainer": "gradcam", "temperature": 1.0},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "grad_clip": 1.0, "epochs": 60, "batch_size": 50},
        "eval": {"localisation": False},
        "checkpoint_every": 200,
        "log_every": 20,
    },
    "lam": {"kd": 0.0, "e2kd": 1.0},
}

# A smaller variant for tests: a slice of the data and a handful of steps.
QUICK_OVERRIDES = {
    "teacher": ["data.limit=512", "data.eval_limit=256", "optim.max_steps=8", "log_every=4"],
    "student": ["data.shots=5", "data.val_per_class=2", "data.eval_limit=256", "optim.max_steps=6", "log_every=3"],
}


def _config(values: dict, overrides, out_dir: Path, name: str, progress: bool):
    from .train import config_from_dict

    values = copy.deepcopy(values)
    values.update({"name": name, "output_dir": str(out_dir), "progress": progress})
    return config_from_dict(values, list(overrides), where=f"the demo's {name} config")


def _finished(run_dir: Path) -> bool:
    return (run_dir / "results.json").is_file() and (run_dir / "model.safetensors").is_file()


def _figure(out_dir: Path, teacher_dir: Path, student_dirs: Dict[str, Path], path: Path, per_class: int = 1) -> None:
    """Image | teacher GradCAM | KD student | e²KD student, for the first test image of each class."""
    from .data import build_dataset
    from .explain import GradCAM
    from .report import explanation_figure
    from .train.build import load_model_file

    test = build_dataset("fashion_mnist", "test")
    picked, seen = [], {}
    for i in range(len(test)):
        label = int(test[i]["label"])
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            picked.append(i)
        if len(picked) == per_class * test.num_classes:
            break
    x = torch.stack([test[i]["image"] for i in picked])
    cam = GradCAM()
    teacher = load_model_file(teacher_dir).eval()
    t = cam(teacher, x)
    columns = {"teacher": t.maps}
    for label, run_dir in student_dirs.items():
        student = load_model_file(run_dir).eval()
        columns[label] = cam(student, x, t.target).maps
    names = list(getattr(test, "class_names", [str(c) for c in range(test.num_classes)]))
    titles = [f"{names[int(test[i]['label'])]} (T: {names[int(k)]})" for i, k in zip(picked, t.target)]
    explanation_figure(x, columns, path, titles=titles)


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, progress: bool = True, figure: bool = True) -> Path:
    """Run the demo and return the folder holding ``results.json``."""
    from .report import markdown_table, terminal_table
    from .train import run
    from .train.runfolder import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    start = time.time()
    teacher_dir = out_dir / "teacher"
    q = QUICK_OVERRIDES if quick else {"teacher": [], "student": []}
    if _finished(teacher_dir):
        print(f"e2kd demo: reusing the teacher in {teacher_dir}")
    else:
        print("e2kd demo: training the teacher on the 60,000 Fashion-MNIST training images")
        run(_config(DEMO["teacher"], q["teacher"], out_dir, "teacher", progress), mode="teacher")
    import json

    teacher_res = json.loads((teacher_dir / "results.json").read_text())
    runs: Dict[str, Path] = {}
    for method, lam in DEMO["lam"].items():
        name = f"student_{method}"
        overrides = [*q["student"], f"distill.lam={lam}", f"teacher.checkpoint={teacher_dir}"]
        print(f"e2kd demo: distilling with {'KD' if lam == 0 else 'e²KD (GradCAM, λ=%g)' % lam} from 50 images per class")
        runs[method] = run(_config(DEMO["student"], overrides, out_dir, name, progress), mode="distill")

    keys = ("accuracy", "agreement", "explanation_similarity")
    results: Dict[str, Any] = {"teacher": {"accuracy": teacher_res["accuracy"]}}
    for method, run_dir in runs.items():
        res = json.loads((run_dir / "results.json").read_text())
        results[method] = {k: res[k] for k in keys if k in res}
        if "val" in res:
            results[method]["val"] = {k: res["val"][k] for k in keys if k in res["val"]}
    results["setup"] = {
        "dataset": "fashion_mnist",
        "shots_per_class": None if quick else DEMO["student"]["data"]["shots"],
        "teacher": DEMO["teacher"]["model"],
        "student": DEMO["student"]["model"],
        "lam": DEMO["lam"],
        "quick": quick,
    }
    results["wall_time_s"] = round(time.time() - start, 1)

    rows = [
        {"method": "teacher", "accuracy": results["teacher"]["accuracy"]},
        *({"method": label, **results[m]} for m, label in (("kd", "KD"), ("e2kd", "e²KD"))),
    ]
    columns = {"method": "method", "accuracy": "accuracy %", "agreement": "agreement %", "explanation_similarity": "expl. sim. %"}
    scale = {"accuracy": 100.0, "agreement": 100.0, "explanation_similarity": 100.0}
    atomic_write_json(out_dir / "results.json", results)
    md = markdown_table(rows, columns, digits=1, scale=scale)
    atomic_write_text(out_dir / "results.md", f"# e2kd demo: Fashion-MNIST, 50 images per class\n\n{md}\n")
    if figure:
        _figure(out_dir, teacher_dir, {"KD student": runs["kd"], "e²KD student": runs["e2kd"]}, out_dir / "explanations.png")
    print(terminal_table(rows, columns, digits=1, scale=scale, title="Fashion-MNIST test set (10,000 images)" if not quick else "quick demo"))
    print(f"e2kd demo: results in {out_dir / 'results.json'}, {out_dir / 'results.md'}" + (f", {out_dir / 'explanations.png'}" if figure else "")
          + f" ({results['wall_time_s']:.0f} s)")
    return out_dir
