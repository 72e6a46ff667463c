"""Atomic file writes shared by every layer that writes files (frozen stores, run folders)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional

__all__ = ["atomic_write_bytes", "remove_stale_temp_files", "check_writable_folder"]


def _current_umask() -> int:
    """The process umask. On Linux read from ``/proc/self/status`` (no change to process state);
    elsewhere set and restore it at once, the only portable way to read it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, fsync it, then ``os.replace``.

    A kill mid-write leaves only ``.<name>.*.tmp``, which no reader takes for the real file and
    :func:`remove_stale_temp_files` deletes. The file gets the mode a plain ``open()`` would give
    it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o666 & ~_current_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(folder: str | os.PathLike, name: Optional[str] = None) -> List[Path]:
    """Delete the temporary files a killed :func:`atomic_write_bytes` left in ``folder`` (only
    those of ``folder/name`` when ``name`` is given); returns what was removed. Call it only
    where no other process is writing."""
    removed = []
    for tmp in Path(folder).glob(f".{name}.*.tmp" if name else ".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def check_writable_folder(path: str | os.PathLike, what: str, fix: str) -> None:
    """Raise a ValueError unless files can be written in folder ``path`` (made if missing).

    For output folders, before any work starts: the nearest existing part of ``path`` must be a
    folder in which a file can be created. Nothing is left behind: the probe file is removed at
    once (and, were the process killed in between, it is a ``.*.tmp`` file that
    :func:`remove_stale_temp_files` deletes). ``what`` names the folder in the message (e.g.
    "output_dir"), ``fix`` says what to do.
    """
    path = Path(path)
    here = path.absolute()
    while not here.exists() and here.parent != here:
        here = here.parent
    if not here.is_dir():
        if here == path.absolute():
            raise ValueError(f"{what} {str(path)!r} is a file, not a folder; {fix}")
        raise ValueError(f"{what} {str(path)!r} cannot be made: {str(here)!r} in its path is a file, not a folder; {fix}")
    try:
        fd, tmp = tempfile.mkstemp(dir=here, prefix=".e2kd-write-check.", suffix=".tmp")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{what} {str(path)!r} is not writable: cannot create files in {str(here)!r} ({reason}); {fix}") from None
    os.close(fd)
    os.unlink(tmp)
