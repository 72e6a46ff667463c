"""One table of trainer runs: how each ran and how fast (the trainer section of ``gpu.sh``).

    python -m benchmarks.runs runs/teacher runs/e2kd ...

Per run folder: world size, device, autocast, channels-last, compile, optimiser steps, the median
logged step time and images/s (the first logged interval, which holds compilation and cuDNN's
algorithm search, is left out where there are more), the median data time per step, the wall
time, and the final evaluation (accuracy, agreement, explanation similarity).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import List, Optional, Sequence

from e2kd.report.html import load_run


def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _fmt(v, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if v is None else f"{v * scale:,.{digits}f}"


def run_row(run_dir: str) -> List[str]:
    run = load_run(run_dir)
    env_path = Path(run_dir) / "env.json"
    env = json.loads(env_path.read_text(encoding="utf-8")) if env_path.is_file() else {}
    train = [m for m in run.metrics if m.get("split") == "train" and "step_time" in m]
    timed = train[1:] if len(train) > 1 else train
    evals = [m for m in run.metrics if m.get("split") == "eval"]
    last = evals[-1] if evals else {}
    device = (env.get("devices") or ["?"])[0]
    cfg = run.config
    return [
        run.name,
        str(env.get("world_size", "?")),
        device if device == "cpu" else f"{device} (CUDA {env.get('cuda')})",
        str(cfg.get("amp", "?")),
        str(env.get("channels_last", cfg.get("channels_last"))),
        str(cfg.get("compile", "?")),
        str(last.get("steps", train[-1]["step"] if train else "?")),
        _fmt(_median([m["step_time"] for m in timed]), 1000.0),
        _fmt(_median([m["images_per_s"] for m in timed if "images_per_s" in m]), 1.0, 0),
        _fmt(_median([m["data_time"] for m in timed if "data_time" in m]), 1000.0, 2),
        _fmt(last.get("wall_time_s"), 1.0, 0),
        _fmt(last.get("accuracy"), 100.0),
        _fmt(last.get("agreement"), 100.0),
        _fmt(last.get("explanation_similarity"), 100.0),
    ]


HEAD = [
    "run", "ranks", "device", "amp", "channels-last", "compile", "steps", "step (ms)", "images/s",
    "data (ms)", "wall (s)", "accuracy", "agreement", "exp. sim.",
]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders written by e2kd train-teacher / distill")
    args = p.parse_args(argv)
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "|".join("---" if i < 6 else "---:" for i in range(len(HEAD))) + "|")
    for r in args.runs:
        print("| " + " | ".join(run_row(r)) + " |")


if __name__ == "__main__":
    main()
