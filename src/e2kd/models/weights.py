"""Loading weights from local files without unpickling anything.

``load_weights(model, path)`` reads safetensors files directly and every other file with
``torch.load(weights_only=True)``; it unwraps the usual containers (``state_dict``, ``model``,
``module.`` prefixes), maps known key layouts (torchvision's old DenseNet keys, B-cos v2
releases through ``e2kd.bcos.weights``) and checks the result against the model
before anything is loaded: a file for another architecture or another number of classes is a
clear error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["read_state_dict", "load_weights", "check_state_dict"]

_CONTAINERS = ("state_dict", "model_state_dict", "model", "net", "module", "student")
_SOURCES = ("auto", "e2kd", "torchvision", "timm", "bcos")


def read_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or ``torch.load(weights_only=True)`` for others."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            raise FileNotFoundError(f"{str(path)!r} is a folder without model.safetensors; give a weights file or a finished run folder")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; check the checkpoint path in the config")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"weights file {str(path)!r} is not a readable safetensors file: {err}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # the weights-only unpickler refuses code and unknown globals
        imports = _pickle_imports(path, err)
        if imports is None:
            raise ValueError(
                f"weights file {str(path)!r} is not a readable checkpoint (corrupt, truncated, or not a torch.save / "
                f"safetensors file: {_unreadable_reason(err)}); check the path, or copy or export the weights file again"
            ) from None
        raise ValueError(
            f"weights file {str(path)!r} could not be read safely (torch.load(weights_only=True) refused it: the file "
            f"imports {imports}, which a weights-only load does not run); convert it to safetensors from a trusted source"
        ) from None
    for _ in range(3):
        if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"weights file {str(path)!r} holds no state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def _unreadable_reason(err: BaseException) -> str:
    """A short reason for a file torch could not read at all (torch's own text for such files
    can carry advice meant for refused pickles)."""
    import pickle

    if isinstance(err, EOFError):
        return "the file ends early: empty or truncated"
    if isinstance(err, pickle.UnpicklingError):
        return "its contents are not a pickle stream"
    text = str(err).strip()
    return text.split(". ")[0].splitlines()[0] if text else type(err).__name__


def _pickle_imports(path: Path, err: BaseException) -> Optional[str]:
    """Why ``torch.load(weights_only=True)`` failed: the Python names the pickle imports (a file
    it refused as unsafe), or None for a file that is not a well-formed pickle or torch archive
    at all (corrupt, truncated, another format). Only inspects opcodes; nothing is unpickled."""
    import io
    import pickle
    import pickletools
    import zipfile

    found = re.findall(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return ", ".join(dict.fromkeys(found))
    if not isinstance(err, pickle.UnpicklingError):  # a broken archive, an empty file, a failed read
        return None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if name is None:
                    return None
                stream = io.BytesIO(zf.read(name))
        else:
            stream = io.BytesIO(path.read_bytes())
        names, strings = [], []
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name in ("STACK_GLOBAL",):
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "a global")
            elif op.name == "OBJ":
                names.append("an object")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle stream (or a broken archive): nothing was refused, it is unreadable
        return None
    try:  # names torch's weights-only loader accepts are not why it refused the file
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):
        allowed = set()
    return ", ".join(dict.fromkeys(n for n in names if n not in allowed)) or None


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys without the prefixes that wrappers add, in any order and nesting (DDP ``module.``,
    torch.compile ``_orig_mod.``, a Distiller's ``student.``: e.g. ``student.module._orig_mod.``)."""
    stripped = True
    while sd and stripped:
        stripped = False
        for prefix in ("module.", "_orig_mod.", "student."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _map_torchvision(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # Old torchvision/timm DenseNet files name layers "norm.1"; the modules are "norm1".
    out = {}
    for k, v in sd.items():
        m = _OLD_DENSENET.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _load_bcos(model: nn.Module, sd: Dict[str, torch.Tensor]) -> nn.Module:
    try:
        from e2kd.bcos.weights import load_bcos_v2_weights
    except ImportError:
        raise ValueError("source='bcos' needs the B-cos models (e2kd.bcos), which are not installed") from None
    return load_bcos_v2_weights(model, sd)


def check_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], *, what: str = "checkpoint") -> None:
    """Raise a ValueError naming the problem when ``sd`` does not fit ``model`` exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    name = getattr(model, "model_name", type(model).__name__)
    if missing or unexpected:
        share = 1 - len(missing) / max(len(own), 1)
        kind = "another architecture" if share < 0.5 else "a different variant of this architecture"
        raise ValueError(
            f"{what} does not fit model {name!r}: it looks like weights for {kind} "
            f"({len(missing)} of the model's {len(own)} tensors missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}); set the matching model name or weights file"
        )
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            if v.dim() >= 1 and sd[k].dim() == v.dim() and sd[k].shape[1:] == v.shape[1:] and _is_head(model, k):
                raise ValueError(
                    f"{what} has {sd[k].shape[0]} classes ({k} has shape {tuple(sd[k].shape)}) but model {name!r} "
                    f"was built with {v.shape[0]}; set num_classes={sd[k].shape[0]} or use weights for {v.shape[0]} classes"
                )
            raise ValueError(
                f"{what} does not fit model {name!r}: {k} has shape {tuple(sd[k].shape)} in the file and "
                f"{tuple(v.shape)} in the model (another architecture or width?)"
            )


def _is_head(model: nn.Module, key: str) -> bool:
    return key in _head_keys(model)


def _head_keys(model: nn.Module) -> list:
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
    if not last:
        return []
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] == last[-1]]


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, source: str = "auto", what: Optional[str] = None, reset_head: bool = False
) -> nn.Module:
    """Load a local weights file into ``model`` (strictly, after checking keys and shapes).

    Parameters
    ----------
    model : nn.Module
    path : str or Path
        A ``.safetensors`` file, a ``torch.save`` file of tensors (read with
        ``weights_only=True``), or a run folder with ``model.safetensors``.
    source : {"auto", "e2kd", "torchvision", "timm", "bcos"}
        Key layout of the file. ``auto`` strips wrapper prefixes and maps old torchvision
        DenseNet keys; ``bcos`` loads B-cos v2 release files through ``e2kd.bcos.weights``.
    reset_head : bool
        Keep the model's own (freshly initialised) classifier and load everything else: to
        fine-tune ImageNet weights on another label set.
    """
    if source not in _SOURCES:
        raise ValueError(f"unknown weights source {source!r}; choose one of {', '.join(_SOURCES)}")
    what = what or f"weights file {str(path)!r}"
    sd = _strip_prefixes(read_state_dict(path))
    if source == "bcos":
        if reset_head:
            own = model.state_dict()
            sd.update({k: own[k] for k in _head_keys(model)})
        return _load_bcos(model, sd)
    if source in ("auto", "torchvision", "timm"):
        sd = _map_torchvision(sd)
    if reset_head:
        own = model.state_dict()
        for k in _head_keys(model):
            sd[k] = own[k]
    # BatchNorm's step counter is optional in many released files.
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    check_state_dict(model, sd, what=what)
    model.load_state_dict(sd, strict=True)
    return model
