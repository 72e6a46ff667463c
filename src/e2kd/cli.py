"""The ``e2kd`` command line.

Every subcommand is one small function registered with :func:`command`; its first docstring
line is its one-line help in ``e2kd --help``. Commands that run an experiment take a YAML
config plus dotted overrides: ``e2kd distill configs/fmnist/e2kd_gradcam.yaml distill.lam=5 seed=2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "command"]

_COMMANDS: Dict[str, Tuple[Callable[[argparse.Namespace], int], Optional[Callable[[argparse.ArgumentParser], None]]]] = {}


def command(name: str, *, arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """Register ``fn(args) -> exit code`` as subcommand ``name``; ``arguments(parser)`` adds its options."""

    def deco(fn):
        if name in _COMMANDS:
            raise ValueError(f"command {name!r} is already registered")
        _COMMANDS[name] = (fn, arguments)
        return fn

    return deco


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (configs/...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.lam=5 seed=2")


@command("train-teacher", arguments=_config_arguments)
def _train_teacher(args) -> int:
    """Train a teacher on labels (cross-entropy, or BCE for multi-label data)."""
    from .train import load_config, run

    run_dir = run(load_config(args.config, args.overrides), mode="teacher")
    _print_results(run_dir)
    return 0


@command("distill", arguments=_config_arguments)
def _distill(args) -> int:
    """Distil a teacher into a student with KD (distill.lam=0) or e²KD (teacher.frozen=PATH: from a store)."""
    from .train import load_config, run

    run_dir = run(load_config(args.config, args.overrides), mode="distill")
    _print_results(run_dir)
    return 0


def _freeze_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="store folder (default: teacher.frozen, or teacher.frozen_eval with --split eval)")
    parser.add_argument("--split", default="train", choices=["train", "val", "eval"],
                        help="which split of the config's data to freeze (default train)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval_batch_size or optim.batch_size")
    parser.add_argument("--map-size", type=int, default=None, help="store maps resized to this side (default: as explained)")
    parser.add_argument("--map-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--topk", type=int, default=None, help="keep the k largest logits and the log-sum-exp of the rest")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard (the unit of resuming)")


@command("freeze", arguments=_freeze_arguments)
def _freeze(args) -> int:
    """Run the teacher once over the un-augmented data and store its logits and explanations."""
    from .train import load_config
    from .train.frozen import freeze_run

    report = freeze_run(
        load_config(args.config, args.overrides), split=args.split, out=args.out, batch_size=args.batch_size,
        map_size=args.map_size, map_dtype=args.map_dtype, topk=args.topk, shard_size=args.shard_size,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.summary())
    return 0


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a run folder (runs/NAME) or a config file with model.checkpoint set")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.eval_name=fashion_mnist")
    parser.add_argument("-o", "--output", default=None,
                        help="JSON file to write (default: eval_<dataset>_<split>.json in the evaluated run folder, or "
                             "<stem>.eval_<dataset>_<split>.json beside a plain weights file)")


@command("evaluate", arguments=_evaluate_arguments)
def _evaluate(args) -> int:
    """Evaluate a trained model: accuracy, top-5, agreement and explanation similarity."""
    from .train.evaluate_run import evaluate_target

    out_path, results = evaluate_target(args.target, args.overrides, output=args.output)
    if out_path is not None:
        print(json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {out_path}", file=sys.stderr)
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (runs/NAME) to show or compare")
    parser.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/report.html for one run, report.html for several)")


@command("report", arguments=_report_arguments)
def _report(args) -> int:
    """Write a self-contained HTML report (tables, curves, figures) for one run or a comparison of runs."""
    from .report import write_html_report

    out = args.output or (Path(args.run_dirs[0]) / "report.html" if len(args.run_dirs) == 1 else Path("report.html"))
    print(f"wrote {write_html_report(args.run_dirs, out)}")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a tiny version (a data slice, a few steps) for smoke tests")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("demo", arguments=_demo_arguments)
def _demo(args) -> int:
    """The default demo: teacher, then KD vs e²KD from 50 Fashion-MNIST images per class, with a report."""
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=("models", "explainers", "datasets"), help="what to list")
    parser.add_argument("pattern", nargs="?", default="",
                        help="only names containing it; for models, 'timm/...' lists timm's architectures")


@command("list", arguments=_list_arguments)
def _list(args) -> int:
    """List the registered models, explainers or datasets (names for model.name, distill.explainer, data.name)."""
    pattern = args.pattern
    if args.kind == "models" and pattern.startswith("timm/"):
        from .models.timm_models import TIMM_PREFIX, list_timm_models

        names = list_timm_models(pattern[len(TIMM_PREFIX):])
    elif args.kind == "models":
        from .models import list_models

        names = list_models(pattern) + ([] if pattern else ["timm/<architecture>  (any timm model: e2kd list models timm/)"])
    elif args.kind == "explainers":
        import e2kd.bcos  # noqa: F401  (registers the B-cos explainer)
        from .explain.base import available

        names = [n for n in available() if pattern in n]
    else:
        from .data import list_datasets

        names = [n for n in list_datasets() if pattern in n]
    if not names:
        raise ValueError(f"no {args.kind} match {pattern!r}")
    print("\n".join(names))
    return 0


def _reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="an experiment name (see `e2kd reproduce list`), `all`, or `list`")
    parser.add_argument("--quick", action="store_true", help="the small size that CI runs (one seed)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/reproduce, with --quick runs/reproduce-quick)")


@command("reproduce", arguments=_reproduce_arguments)
def _reproduce(args) -> int:
    """Reproduce a claim of the paper at CPU scale (fewshot, unrelated, unrelated_photos, waterbirds, multilabel, vit, frozen, all)."""
    from .reproduce import available, run_experiment

    names = available()
    if args.experiment == "list":
        width = max(map(len, names)) + 2
        for name, summary in names.items():
            print(f"{name:<{width}}{summary}")
        return 0
    todo = list(names) if args.experiment == "all" else [args.experiment]
    seeds = None if args.seeds is None else list(range(args.seeds))
    for name in todo:
        out = args.out if args.out is not None else ("runs/reproduce-quick" if args.quick else "runs/reproduce")
        print(f"wrote {run_experiment(name, out_dir=out, quick=args.quick, seeds=seeds)}")
    return 0


def _print_results(run_dir: Path) -> None:
    path = Path(run_dir) / "results.json"
    if int(os.environ.get("RANK", "0")) == 0 and path.is_file():
        res = json.loads(path.read_text())
        keys = ("accuracy", "top5", "agreement", "explanation_similarity", "teacher_accuracy", "worst_group_accuracy", "f1")
        shown = ", ".join(f"{k} {res[k]:.4f}" for k in keys if isinstance(res.get(k), (int, float)))
        print(f"{run_dir}: {shown}")
        if res.get("agreement_note"):
            print(f"{run_dir}: {res['agreement_note']}")


def _summary(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""


def build_parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in _COMMANDS) + 2
    listing = "\n".join(f"  {name:<{width}}{_summary(fn)}" for name, (fn, _) in _COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="e2kd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Explanation-enhanced knowledge distillation (Parchami-Araghi et al., ECCV 2024).",
        epilog=f"commands:\n{listing}\n\nRun 'e2kd COMMAND --help' for a command's arguments.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, arguments) in _COMMANDS.items():
        p = sub.add_parser(name, description=_summary(fn))
        if arguments is not None:
            arguments(p)
    return parser


def _os_error_text(err: BaseException) -> Optional[str]:
    """One line for an operating-system error on a path (``[Errno 13] ...`` becomes
    "cannot use PATH: Permission denied ..."), or None for other errors."""
    if not isinstance(err, OSError) or err.errno is None or not err.filename:
        return None
    paths = f"{str(err.filename)!r}" + (f" or {str(err.filename2)!r}" if err.filename2 else "")
    return (f"cannot use {paths}: {err.strerror or type(err).__name__}; check that the path is right and that "
            "its folder exists and can be written (or read)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Options may sit between dotted overrides (`freeze CFG --split eval a=1 b=2`): argparse
    # leaves the overrides after an option unparsed, so they are taken back here.
    if extra:
        if not isinstance(getattr(args, "overrides", None), list) or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    fn, _ = _COMMANDS[args.command]
    try:
        return int(fn(args) or 0)
    except (ValueError, OSError, FloatingPointError) as err:  # OSError: a path found unusable only when used
        if os.environ.get("E2KD_DEBUG"):
            raise
        print(f"e2kd {args.command}: error: {_os_error_text(err) or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"e2kd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
