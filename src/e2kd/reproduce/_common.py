"""Shared machinery of the reproduction experiments: registry, config runs, seed summaries."""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ..report.tables import group_seeds, markdown_table, terminal_table
from ..train import load_config, run
from ..train.runfolder import atomic_write_json, atomic_write_text

__all__ = [
    "Experiment",
    "ExperimentResult",
    "available",
    "register_experiment",
    "run_config",
    "run_experiment",
    "summarise",
]

# Modules holding one experiment each; importing one registers it.
_MODULES = ("fewshot", "unrelated", "unrelated_photos", "waterbirds", "multilabel", "vit", "frozen")


@dataclass
class ExperimentResult:
    """What an experiment returns: per-seed records and how to tabulate them.

    ``records`` hold one dict per (setting, seed) with the setting keys named in ``by`` and the
    metric keys named in ``metrics`` (values in [0, 1] for shares; shown ×100 in tables when
    ``percent`` is true). ``paper`` is the published table it mirrors, as markdown.
    """

    records: List[Dict[str, Any]]
    by: Sequence[str]
    metrics: Mapping[str, str]  # metric key -> column heading
    percent: bool = True
    paper: str = ""
    notes: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Experiment:
    name: str
    fn: Callable[..., ExperimentResult]
    summary: str


_EXPERIMENTS: Dict[str, Experiment] = {}


def register_experiment(name: str) -> Callable:
    """Register ``fn(out_dir: Path, *, quick: bool, seeds: Sequence[int]) -> ExperimentResult``."""

    def deco(fn):
        if name in _EXPERIMENTS:
            raise ValueError(f"experiment {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _EXPERIMENTS[name] = Experiment(name, fn, doc[0] if doc else "")
        return fn

    return deco


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as err:  # an experiment module that is not written yet
            if err.name != f"{__package__}.{mod}":
                raise


def available() -> Dict[str, str]:
    """Experiment name -> one-line summary."""
    _load_all()
    return {n: e.summary for n, e in sorted(_EXPERIMENTS.items())}


def run_config(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    mode: str,
    out_dir: Path,
    name: str,
    reuse: bool = True,
) -> Path:
    """Run one config through the trainer into ``out_dir/name`` and return the run folder.

    With ``reuse`` a run folder that already holds ``results.json`` is returned as it is when it
    was made with the same settings (an interrupted reproduction continues where it stopped; the
    trainer itself resumes a run that has checkpoints but no results); one made with other
    settings (a ``--quick`` run in the folder of a full one) is refused, never mixed in.
    """
    from ..train.loop import config_changes

    run_dir = Path(out_dir) / name
    cfg = load_config(str(config), [*overrides, f"output_dir={Path(out_dir)}", f"name={name}"])
    if reuse and (run_dir / "results.json").is_file():
        changed = config_changes(run_dir, cfg)
        if changed:
            raise ValueError(
                f"{str(run_dir)!r} holds a finished run made with other settings (changed: {', '.join(changed)}), e.g. "
                "a --quick run where a full one is asked for; reproduce into another folder (--out) or remove that run"
            )
        return run_dir
    return run(cfg, mode=mode)


def read_results(run_dir: str | Path) -> Dict[str, Any]:
    with open(Path(run_dir) / "results.json", encoding="utf-8") as fh:
        return json.load(fh)


def summarise(result: ExperimentResult) -> List[Dict[str, Any]]:
    """One row per setting, each metric a list of per-seed values (mean ± std in tables)."""
    return group_seeds(result.records, by=list(result.by), metrics=list(result.metrics))


def run_experiment(
    name: str,
    *,
    out_dir: str | Path = "runs/reproduce",
    quick: bool = False,
    seeds: Optional[Sequence[int]] = None,
) -> Path:
    """Run a registered experiment; write ``results.json`` and ``table.md``; print the table."""
    _load_all()
    if name not in _EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(_EXPERIMENTS))}")
    seeds = list(seeds) if seeds is not None else ([0] if quick else [0, 1, 2])
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    exp_dir = Path(out_dir) / name
    exp_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = _EXPERIMENTS[name].fn(exp_dir, quick=quick, seeds=seeds)
    wall = time.time() - start
    rows = summarise(result)
    columns = {**{k: k for k in result.by}, **dict(result.metrics), "seeds": "seeds"}
    scale = {k: 100.0 for k in result.metrics} if result.percent else 1.0
    table = markdown_table(rows, columns, digits=1 if result.percent else 3, scale=scale)
    text = f"# {name}{' (quick)' if quick else ''}\n\n{table}\n"
    if result.paper:
        text += f"\nPublished (Parchami-Araghi et al., ECCV 2024):\n\n{result.paper}\n"
    if result.notes:
        text += f"\n{result.notes}\n"
    text += f"\nSeeds {seeds}; wall time {wall:.0f} s.\n"
    atomic_write_text(exp_dir / "table.md", text)
    atomic_write_json(
        exp_dir / "results.json",
        {"experiment": name, "quick": quick, "seeds": seeds, "wall_time_s": wall, "rows": rows,
         "records": result.records, **result.extra},
    )
    print(terminal_table(rows, columns, digits=1 if result.percent else 3, scale=scale, title=name))
    return exp_dir
