"""Fashion-MNIST helpers shared by the ``fewshot``, ``unrelated`` and ``vit`` experiments.

Teachers are trained once into ``<out>/teachers/<name>`` and reused by every experiment that
writes under the same ``<out>``. Students are scored on the whole Fashion-MNIST test split
(10,000 images) by forward passes only: the teacher's test predictions are computed once per
teacher and reused for every student's agreement, which keeps the many small runs of an
experiment affordable on a CPU. The trainer's own evaluation (with explanations) runs on the
first ``eval_limit`` test images and gives ``explanation_similarity``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ..data import build_dataset
from ..train.build import load_model_file
from ..train.runfolder import atomic_write_json
from ._common import read_results, run_config

__all__ = ["config_path", "ensure_teacher", "TestSet", "predict", "score_run", "teacher_root"]

_REPO = Path(__file__).resolve().parents[3]


def config_path(rel: str) -> Path:
    """A shipped config (``configs/...``): looked up in the repository, then the working directory."""
    for base in (_REPO, Path.cwd()):
        p = base / rel
        if p.is_file():
            return p
    raise FileNotFoundError(f"config {rel!r} not found under {_REPO} or {Path.cwd()}; run from the e2kd repository")


def teacher_root(exp_dir: Path) -> Path:
    """``<out>/teachers`` for an experiment folder ``<out>/<experiment>``."""
    return Path(exp_dir).parent / "teachers"


def _last_write(run_dir: Path) -> float:
    times = [p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()]
    return max(times) if times else 0.0


def ensure_teacher(
    exp_dir: Path,
    config: str,
    name: str,
    overrides: Sequence[str] = (),
    *,
    busy_s: float = 1200.0,
    wait_s: float = 4 * 3600.0,
    poll_s: float = 10.0,
) -> Path:
    """The teacher run folder ``<out>/teachers/<name>``: reused when it holds ``results.json``.

    When the folder is being written by another process (a file in it changed within the last
    ``busy_s`` seconds) this waits for that training to finish instead of starting a second
    one; otherwise it trains (or resumes) the teacher through the trainer.
    """
    root = teacher_root(exp_dir)
    run_dir = root / name
    deadline = time.time() + wait_s
    while run_dir.is_dir() and not (run_dir / "results.json").is_file() and time.time() - _last_write(run_dir) < busy_s:
        if time.time() > deadline:
            raise TimeoutError(f"teacher {run_dir} is still being trained after {wait_s:.0f} s; try again later")
        time.sleep(poll_s)
    return run_config(config_path(config), [*overrides, "progress=false"], mode="teacher", out_dir=root, name=name)


class TestSet:
    """Fashion-MNIST images as tensors: ``x`` (N, 1, 28, 28) in [0, 1], ``y`` (N,).

    By default the test split (its first ``limit`` images). ``split="train"`` with ``offset``
    takes ``limit`` training images from ``offset`` on: a validation set for experiments whose
    students never train on Fashion-MNIST (``unrelated``).
    """

    def __init__(self, *, limit: Optional[int] = None, pad: int = 0, split: str = "test", offset: int = 0):
        ds = build_dataset("fashion_mnist", split)
        if not 0 <= int(offset) < len(ds):
            raise ValueError(f"TestSet: offset {offset} outside the {len(ds)} images of the {split} split")
        n = len(ds) - int(offset) if limit is None else min(int(limit), len(ds) - int(offset))
        self.split, self.offset = split, int(offset)
        self.x = ds.images[offset : offset + n].float() / 255.0
        if pad:
            self.x = torch.nn.functional.pad(self.x, (pad, pad, pad, pad))
        self.y = ds.labels[offset : offset + n].long()
        self._teacher_pred: Dict[str, torch.Tensor] = {}

    @property
    def tag(self) -> str:
        """Names this image set in cache files: ``test`` or e.g. ``train58000``."""
        return "test" if self.split == "test" and self.offset == 0 else f"{self.split}{self.offset}"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def teacher_pred(self, teacher_dir: Path) -> torch.Tensor:
        """Top-1 predictions of the teacher in ``teacher_dir``, shape (N,); computed once and kept
        in ``teacher_dir/<tag>_predictions_<N>.json`` (e.g. the first N test images)."""
        key = str(Path(teacher_dir).resolve())
        if key not in self._teacher_pred:
            cache = Path(teacher_dir) / f"{self.tag}_predictions_{len(self)}.json"
            weights = Path(teacher_dir) / "model.safetensors"
            if cache.is_file() and cache.stat().st_mtime >= weights.stat().st_mtime:
                self._teacher_pred[key] = torch.tensor(json.loads(cache.read_text(encoding="utf-8")), dtype=torch.long)
            else:
                self._teacher_pred[key] = predict(load_model_file(Path(teacher_dir), in_chans=1), self.x)
                atomic_write_json(cache, self._teacher_pred[key].tolist())
        return self._teacher_pred[key]


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
    """Top-1 class of every image of ``x`` (N, C, H, W) -> LongTensor (N,)."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)])


def score_run(run_dir: Path, test: TestSet, teacher_dir: Optional[Path]) -> Dict[str, float]:
    """Accuracy (and agreement with the teacher) of a run's model on the whole test set, plus
    the run's own ``explanation_similarity`` and validation metrics when it has them.

    The scores are cached in ``run_dir/<tag>_scores.json`` (``test_scores.json`` for the test
    split) keyed by the image-set size.
    """
    from ..train.runfolder import atomic_write_json
    import json

    cache = Path(run_dir) / f"{test.tag}_scores.json"
    if cache.is_file():
        with open(cache, encoding="utf-8") as fh:
            saved = json.load(fh)
        if saved.get("num_test_images") == len(test):
            return saved
    res = read_results(run_dir)
    pred = predict(load_model_file(Path(run_dir), in_chans=int(test.x.shape[1])), test.x)
    out: Dict[str, float] = {"num_test_images": len(test), "accuracy": float((pred == test.y).float().mean())}
    if teacher_dir is not None:
        out["agreement"] = float((pred == test.teacher_pred(teacher_dir)).float().mean())
    if "explanation_similarity" in res:
        out["explanation_similarity"] = float(res["explanation_similarity"])
    for k in ("accuracy", "agreement"):
        if k in res.get("val", {}):
            out[f"val_{k}"] = float(res["val"][k])
    out["train_wall_time_s"] = float(res.get("wall_time_s", 0.0))
    atomic_write_json(cache, out)
    return out
