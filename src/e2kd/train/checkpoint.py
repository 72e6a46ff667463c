"""Training checkpoints: one safetensors file per checkpoint, no pickles.

Tensors (model, optimiser state, RNG states) are safetensors entries under prefixes
``model/``, ``optim/`` and ``rng/``; everything else (step, data position, optimiser
hyper-parameters, scheduler, grad-scaler and Python/NumPy RNG states) is JSON in the file's
metadata. Files are written atomically (temporary file, then ``os.replace``), so a kill at any
moment leaves either the previous checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .runfolder import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "check_checkpoint", "rng_state", "set_rng_state", "save_weights"]

_NAME = re.compile(r"^step_(\d{8})\.safetensors$")
FORMAT = "e2kd-checkpoint-1"


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views that share storage: give every entry its own memory.
    return t.detach().to("cpu").contiguous().clone()


def save_weights(path: str | os.PathLike, state_dict: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """A model state dict as one safetensors file, written atomically."""
    tensors = {k: _contiguous(v) for k, v in state_dict.items() if torch.is_tensor(v)}
    meta = {"format": "e2kd-weights-1"}
    if metadata:
        meta["info"] = json.dumps(metadata, sort_keys=True)
    atomic_write_bytes(path, save(tensors, metadata=meta))


def rng_state() -> Tuple[Dict[str, torch.Tensor], dict]:
    """Tensors and JSON values that restore every random generator the trainer uses."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    values = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, values


def set_rng_state(tensors: Dict[str, torch.Tensor], values: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    n = values["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = values["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: Dict[str, torch.Tensor], values: dict) -> dict:
    state: Dict[int, Dict[str, Any]] = {}
    for name, t in tensors.items():
        if not name.startswith("optim/"):
            continue
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = t
    for pid, entry in values["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": values["param_groups"]}


def save_checkpoint(
    folder: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write ``folder/step_XXXXXXXX.safetensors`` atomically and keep the newest ``keep`` files.

    ``state`` holds JSON values (data position, scheduler, scaler, counters); the RNG states
    are added here.
    """
    folder = Path(folder)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_values = _optimizer_parts(optimizer)
    tensors.update(opt_tensors)
    rng_tensors, rng_values = rng_state()
    tensors.update(rng_tensors)
    tensors = {k: _contiguous(v) for k, v in tensors.items()}
    meta = {"format": FORMAT, "step": step, "optimizer": opt_values, "rng": rng_values, "state": state}
    path = folder / f"step_{step:08d}.safetensors"
    atomic_write_bytes(path, save(tensors, metadata={"e2kd": json.dumps(meta)}))
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | os.PathLike) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(folder: str | os.PathLike) -> Optional[Path]:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise a ValueError unless ``path`` is a readable e2kd training checkpoint (header and
    metadata only; the tensors are not read). For a checkpoint named by ``resume=PATH``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("e2kd")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"resume={str(path)!r}: the named checkpoint is not a readable safetensors file (corrupt, truncated or another format: {err}); "
            "pass another checkpoint file, or resume=auto to continue from the run folder's newest one"
        ) from None
    if raw is None:
        raise ValueError(
            f"resume={str(path)!r} is a safetensors file but not an e2kd training checkpoint (no 'e2kd' metadata); "
            "pass a checkpoints/step_*.safetensors file of a run, or resume=auto"
        )


def load_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a checkpoint: (tensors, metadata). Only safetensors; nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("e2kd")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file ({err}); delete it to resume from an earlier one") from None
    if raw is None:
        raise ValueError(f"{str(path)!r} is a safetensors file but not an e2kd training checkpoint (no 'e2kd' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    return tensors, meta


def restore(
    tensors: Dict[str, torch.Tensor], meta: dict, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Load model, optimiser and RNG states in place; return the JSON ``state``."""
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in model_sd.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(
            f"checkpoint does not fit the model: shapes differ ({', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}: "
            "checkpoint vs model); it was written for another architecture (start a new run or fix the model config)"
        )
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
            "it was written for another architecture (start a new run or fix the model config)"
        )
    optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    match_state_layout(optimizer)
    set_rng_state(tensors, meta["rng"])
    return meta["state"]


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter optimiser state tensor of its parameter's shape that parameter's
    memory layout, in place. Checkpoints hold contiguous tensors, and ``load_state_dict`` keeps
    them so; PyTorch's fused CPU Adam walks a parameter, its gradient and its state in memory
    order, so a channels-last parameter with a contiguous state would update the wrong elements
    (measured with torch 2.14.1: a resumed channels-last run diverged from the uninterrupted one)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
