"""``e2kd evaluate``: evaluate a finished run folder, or a model file named in a config."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml

from .._atomic import check_writable_folder
from .batches import build_datasets
from .build import build_explainers, build_model, build_teacher, load_model_file
from .config import ExperimentConfig, config_from_dict, load_config
from .distributed import init_distributed, shutdown
from .loop import _amp_dtype, evaluate_model, resolve_multilabel
from .runfolder import atomic_write_json

__all__ = ["evaluate_target"]


def _has_teacher(cfg: ExperimentConfig) -> bool:
    return cfg.teacher.checkpoint is not None or bool(cfg.teacher.kwargs.get("pretrained", False))


# config keys holding paths, which a saved config.yaml keeps as they were given (relative to the
# directory the run was started in)
PATH_KEYS = ("model.checkpoint", "teacher.checkpoint", "teacher.frozen", "teacher.frozen_eval", "data.root", "data.eval_root")


def _start_dirs(run_dir: Path, values: dict) -> list:
    """Where the run in ``run_dir`` was started: the ``cwd`` its env.json records, else (runs
    that predate that record) the folder holding ``output_dir/name`` when the run folder sits
    there."""
    found = []
    try:
        cwd = json.loads((run_dir / "env.json").read_text()).get("cwd")
    except (OSError, ValueError, AttributeError):
        cwd = None
    if isinstance(cwd, str) and cwd:
        found.append(Path(cwd))
    out, name = values.get("output_dir"), values.get("name")
    if isinstance(out, str) and isinstance(name, str) and not Path(out).is_absolute():
        rel = Path(os.path.normpath(Path(out) / name)).parts
        here = run_dir.resolve().parts
        if ".." not in rel and len(here) > len(rel) and here[-len(rel):] == rel:
            inferred = Path(*here[: -len(rel)])
            if inferred not in found:
                found.append(inferred)
    return found


def _rebase_saved_paths(values: dict, starts: list) -> dict:
    """A relative path of the saved config that does not exist from the current directory is
    taken from the directory the run was started in, where it exists there."""
    for key in PATH_KEYS:
        section, field = key.split(".")
        value = (values.get(section) or {}).get(field)
        if not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists():
            continue
        for start in starts:
            if (start / value).exists():
                values[section][field] = str(start / value)
                break
    return values


def _check_paths(cfg: ExperimentConfig, keys: Sequence[str], where: str, starts: list) -> None:
    """Every path the evaluation reads exists, or a message that names the key."""
    for key in keys:
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        if value is None or Path(value).exists():
            continue
        if Path(value).is_absolute():
            raise ValueError(f"{key}={value!r} (from {where!r}) does not exist; give an existing path with {key}=PATH")
        tried = "".join(f" nor from {str(s)!r}" for s in starts)
        raise ValueError(
            f"{key}={value!r} (from {where!r}) does not exist from the current directory {os.getcwd()!r}{tried}: relative "
            f"paths in a config are resolved from the current directory; run e2kd evaluate from the directory the run "
            f"was started in, or give the path absolute ({key}=/absolute/path)"
        )


def _result_place(checkpoint: Path) -> Tuple[Path, str]:
    """(folder, file-name prefix) of the results of evaluating the weights ``checkpoint``: a run
    folder (or the ``model.safetensors`` of one) keeps them beside its own results; a plain
    weights file gets ``<stem>.eval_<dataset>_<split>.json`` beside it."""
    if checkpoint.is_dir():
        return checkpoint, ""
    if checkpoint.name == "model.safetensors" and (checkpoint.parent / "config.yaml").is_file():
        return checkpoint.parent, ""
    return checkpoint.parent, f"{checkpoint.stem}."


def evaluate_target(target: str, overrides: Sequence[str] = (), output: Optional[str] = None) -> Tuple[Optional[Path], Dict[str, Any]]:
    """Evaluate ``target`` (run folder or config file); write ``eval_<dataset>_<split>.json``.

    Where the results go: ``output`` if given; else into the evaluated run folder (the target,
    or the run folder that ``model.checkpoint`` of a config names); else, for a plain weights
    file, beside it as ``<stem>.eval_<dataset>_<split>.json``. A config's own run folder
    (``output_dir/name``) is never written: it may hold another model's run.

    Returns the written path (None on ranks other than 0) and the results.
    """
    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(
            f"{target!r} is neither a run folder nor a config file (it does not exist); give a finished run "
            "folder (runs/NAME) or a config file with model.checkpoint set"
        )
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{target!r} is a folder without config.yaml; give an e2kd run folder or a config file")
        saved = path / "config.yaml"
        try:
            values = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(saved)!r} is not valid YAML: {err}") from None
        starts = _start_dirs(path, values) if isinstance(values, dict) else []
        if starts:
            values = _rebase_saved_paths(values, starts)
        cfg = config_from_dict(values, overrides, where=str(saved))
        run_dir, prefix = path, ""
        where = str(saved)
    else:
        cfg = load_config(path, overrides)
        starts, where = [], str(path)
        if cfg.model.checkpoint is None:
            raise ValueError(
                "evaluate with a config needs model.checkpoint (a weights file or run folder): add "
                "model.checkpoint=PATH, or give the run folder itself (e2kd evaluate runs/NAME)"
            )
        run_dir, prefix = _result_place(Path(cfg.model.checkpoint))
    if output is not None:
        out_dir, what = Path(output).absolute().parent, f"the folder of --output {output!r}:"
    else:
        out_dir, what = run_dir, "the run folder" if path.is_dir() else "the folder of model.checkpoint"
    check_writable_folder(out_dir, what, "evaluate writes eval_*.json there: make it writable, or name the file to "
                          "write with --output")
    used = [] if path.is_dir() else ["model.checkpoint"]  # a run folder's model.checkpoint only started its training
    used += ["teacher.checkpoint"] if _has_teacher(cfg) else ["teacher.frozen_eval"]
    _check_paths(cfg, used, where, starts)
    if output is not None and Path(output).is_dir():
        raise ValueError(f"--output {output!r} is a folder; give the path of the JSON file to write")
    info = init_distributed(cfg.device)
    try:
        data = build_datasets(cfg)
        data.pop("train")
        ds = data["eval"]
        multilabel = resolve_multilabel(cfg, ds, "evaluation")
        in_chans = int(ds.in_chans)
        if path.is_dir():
            model = load_model_file(path, in_chans=in_chans)
        else:
            ckpt = Path(cfg.model.checkpoint)
            if ckpt.is_dir() or ckpt.suffix == ".safetensors" and _has_record(ckpt):
                model = load_model_file(ckpt, in_chans=in_chans)
            else:
                from ..models.weights import load_weights

                model = build_model(cfg.model.name, cfg.model.kwargs, num_classes=int(ds.num_classes), in_chans=in_chans)
                load_weights(model, ckpt, source=cfg.model.source)
        teacher = explainers = None
        note = None
        if _has_teacher(cfg):
            teacher = build_teacher(cfg, num_classes=int(ds.num_classes), in_chans=in_chans).to(info.device)
            explainers = build_explainers(cfg.distill)
        elif cfg.teacher.frozen_eval is not None:  # the teacher's stored logits and maps of the evaluation split
            from ..frozen import FrozenDataset
            from .frozen import open_store

            explainers = build_explainers(cfg.distill)
            opened = open_store(cfg, "eval", ds, teacher_explainer=explainers[0], verify_teacher=False)
            data["eval"] = FrozenDataset(ds, opened.store, check_dataset=False)
        elif cfg.teacher.frozen is not None:
            note = ("agreement unavailable: no teacher weights (teacher.checkpoint) and no store of the evaluation split "
                    "(teacher.frozen_eval)")
        model.to(info.device)
        results = evaluate_model(cfg, model, teacher, explainers, data, info, multilabel, _amp_dtype(cfg, info.device))
        if note is not None:
            results["agreement_note"] = note
        out = None
        if info.is_main:
            tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.data.eval_name or cfg.data.name}_{cfg.data.eval_split}")
            out = Path(output) if output is not None else run_dir / f"{prefix}eval_{tag}.json"
            atomic_write_json(out, results)
        return out, results
    finally:
        shutdown(info)


def _has_record(path: Path) -> bool:
    from .build import read_record

    from safetensors import SafetensorError

    try:
        return read_record(path) is not None
    except (SafetensorError, OSError, ValueError):  # not a safetensors file: read it as plain weights
        return False
