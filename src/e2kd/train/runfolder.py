"""The run folder: atomic files, the metrics log and the environment record.

``runs/<name>/`` holds ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object a
line), ``results.json`` (final metrics), ``model.safetensors`` (final weights),
``checkpoints/`` and ``env.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, List, Optional

from .._atomic import atomic_write_bytes, remove_stale_temp_files

__all__ = ["remove_stale_temp_files", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "MetricsLog", "read_metrics", "environment_record"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "nan"/"inf": JSON has no literal for them
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return _jsonable(obj.item())
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object a line, flushed line by line.

    A crash can tear at most the last line; :func:`read_metrics` skips it. On resume,
    :meth:`truncate_after` drops lines logged after the checkpoint that is resumed, so the log
    of a resumed run reads like the log of an uninterrupted one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        line = json.dumps(_jsonable(record), sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Keep the records of steps before ``step`` and the training record of ``step``.

        Evaluation records logged at ``step`` itself come after its checkpoint (the final
        evaluation follows the final checkpoint), so they are written again by the resumed run.
        """
        if not self.path.exists():
            return
        kept = [
            r for r in read_metrics(self.path)
            if int(r.get("step", 0)) < step or (int(r.get("step", 0)) == step and r.get("split", "train") == "train")
        ]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def read_metrics(path: str | os.PathLike) -> List[dict]:
    """Records of a ``metrics.jsonl``; a torn (unparsable, unterminated) last line is skipped.

    A malformed line anywhere else is an error: that is damage, not an interrupted write.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: an interrupted append
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON; the metrics log is damaged") from None
    return records


def _git_commit() -> dict:
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _version(pkg: str) -> Optional[str]:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment_record(data: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """Package versions, git commit, platform, devices, and the given data hashes."""
    import torch

    rec = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in ("e2kd", "torch", "torchvision", "numpy", "safetensors", "omegaconf", "timm")},
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"],
        "threads": torch.get_num_threads(),
        "git": _git_commit(),
        "argv": sys.argv,
        "data": data or {},
    }
    rec.update(extra or {})
    return rec


def sha256_of(values: Iterable[int]) -> str:
    h = hashlib.sha256()
    for v in values:
        h.update(int(v).to_bytes(8, "little", signed=True))
    return h.hexdigest()
