"""Helpers shared by the guided-teacher experiments (``waterbirds``, ``multilabel``).

Both train teachers with model guidance into ``<out>/teachers/<name>``, beside the
experiments' folders ``<out>/<experiment>`` (reused when their ``results.json`` exists), distil students from them with KD and e²KD, and pick e²KD's λ on
the validation split: every candidate run is trained with the test split as its evaluation
split (its ``results.json``), then re-evaluated on ``val`` (``eval_<dataset>_val.json``); only
the validation numbers choose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..train.evaluate_run import evaluate_target
from ._common import read_results, run_config

__all__ = ["teacher_run", "student_run", "val_results", "pick_lambda", "data_overrides", "length_overrides"]


def data_overrides(dataset: str, size: Dict[str, Any], *extra: str) -> List[str]:
    """Overrides that put a run on ``dataset`` at the experiment's size: image size, split
    counts, train on ``train``, evaluate on ``test``; ``extra`` overrides are added."""
    c = size["counts"]
    return [
        f"data.name={dataset}",
        f"data.image_size={size['image_size']}",
        "data.seed=0",
        f"data.kwargs.counts.train={c['train']}",
        f"data.kwargs.counts.val={c['val']}",
        f"data.kwargs.counts.test={c['test']}",
        "data.train_split=train",
        "data.eval_split=test",
        *extra,
        "progress=false",
        "checkpoint_every=0",
    ]


def length_overrides(size: Dict[str, Any], who: str) -> List[str]:
    """A run's length from the size: ``<who>_steps`` optimiser steps, else ``<who>_epochs``."""
    if f"{who}_steps" in size:
        return [f"optim.max_steps={size[who + '_steps']}", "log_every=1"]
    return [f"optim.epochs={size[who + '_epochs']}"]


def teacher_run(config: Path, overrides: Sequence[str], *, out_dir: Path, name: str) -> Dict[str, Any]:
    """Train (or reuse) a teacher into ``<out>/teachers/name``, where ``out_dir`` is the
    experiment's folder ``<out>/<experiment>``; return its folder and results."""
    run_dir = run_config(config, overrides, mode="teacher", out_dir=Path(out_dir).parent / "teachers", name=name)
    return {"dir": run_dir, "results": read_results(run_dir)}


def student_run(config: Path, overrides: Sequence[str], *, out_dir: Path, name: str) -> Dict[str, Any]:
    """Distil (or reuse) one student into ``out_dir/students/name``; return folder and results."""
    run_dir = run_config(config, overrides, mode="distill", out_dir=Path(out_dir) / "students", name=name)
    return {"dir": run_dir, "results": read_results(run_dir)}


def val_results(run_dir: Path, dataset: str) -> Dict[str, Any]:
    """The run's metrics on the validation split (computed once, then read back).

    Localisation is skipped: λ is chosen on classification quality (accuracy / F1) and
    agreement, which need no explanations of every present class.
    """
    path = Path(run_dir) / f"eval_{dataset}_val.json"
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    _, res = evaluate_target(str(run_dir), ["data.eval_split=val", "eval.localisation=false", "progress=false"])
    return res


def pick_lambda(candidates: Dict[float, Dict[str, Any]], key: str) -> float:
    """The λ whose validation ``key`` is highest (ties: the smaller λ).

    ``candidates`` maps λ to that run's validation results.
    """
    if not candidates:
        raise ValueError("pick_lambda needs at least one candidate run")
    missing = [lam for lam, res in candidates.items() if key not in res]
    if missing:
        raise ValueError(f"validation results of λ={missing} lack {key!r}; cannot choose λ by it")
    return max(sorted(candidates), key=lambda lam: (candidates[lam][key], -lam))
