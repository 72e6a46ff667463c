"""The cache folder for generated data: ``$E2KD_CACHE`` or ``<repo>/.cache/e2kd``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

__all__ = ["cache_dir", "cached_generate"]


def cache_dir() -> Path:
    """``$E2KD_CACHE`` if set, else ``.cache/e2kd`` under the repository (or the current
    folder when the package is installed elsewhere)."""
    env = os.environ.get("E2KD_CACHE")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "e2kd").is_dir():
            return parent / ".cache" / "e2kd"
    return Path.cwd() / ".cache" / "e2kd"


# -- generated datasets: written once, atomically, with a manifest, then reused -------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_generate(
    kind: str,
    key: dict,
    generate: Callable[[], dict[str, dict[str, torch.Tensor]]],
    *,
    verify: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Load generated tensors from the cache, or generate and store them once.

    Parameters
    ----------
    kind : dataset name, the sub-folder of the cache
    key : JSON-able description that fully determines the data (seed, generator version,
        sizes, counts); a different key is a different cache entry, so changing the seed or
        the generator version regenerates
    generate : returns ``{part: {name: tensor}}`` (e.g. one part per split)
    verify : check the SHA-256 of every file against the manifest when loading

    The entry is a folder ``<cache>/<kind>/<hash of key>`` with one safetensors file per part
    and ``manifest.json`` (key, counts, file hashes). It is written into a temporary folder
    next to it and renamed into place, so a reader never sees half-written data. A damaged
    entry is regenerated with a warning.
    """
    from safetensors.torch import load_file, save_file

    blob = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    base = cache_dir() / kind
    folder = base / digest
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("key") != key:
                raise ValueError("manifest key differs")
            out = {}
            for part, info in manifest["files"].items():
                p = folder / f"{part}.safetensors"
                if verify and _sha256(p) != info["sha256"]:
                    raise ValueError(f"{p} does not match its manifest hash")
                out[part] = load_file(str(p))
            return out
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            warnings.warn(f"{kind}: cached copy in {folder} is damaged ({err}); regenerating", stacklevel=2)
            shutil.rmtree(folder, ignore_errors=True)
    parts = generate()
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=base))
    try:
        files = {}
        for part, tensors in parts.items():
            p = tmp / f"{part}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(p))
            files[part] = {"sha256": _sha256(p), "count": int(next(iter(tensors.values())).shape[0])}
        manifest = {"key": key, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            tmp.replace(folder)
        except OSError:
            # Another process finished the same entry first: keep theirs.
            if not (folder / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return parts
