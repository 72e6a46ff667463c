"""Keep freed memory inside the process between training steps (glibc's ``M_TOP_PAD`` and
``M_MMAP_THRESHOLD``).

A CPU training step allocates its activations, saved tensors and gradients and frees them all
at the end. glibc's malloc gives memory back to the operating system in two ways: it trims the
freed top of its heap once that exceeds the trim threshold, and it serves every block above
the mmap threshold with a fresh ``mmap`` that ``free`` unmaps. Either way the next step takes
the same memory back page by page: every 4 KiB page is a page fault and is zeroed by the
kernel before PyTorch writes it. How much of a step goes that way depends on the order of
allocations and on where glibc's dynamic mmap threshold happens to stand, so it comes and goes
between runs: 3,500-6,400 faults a step for the KD and e²KD steps of ResNet-34 -> ResNet-18 at
64 px and batch 32, 43,000-46,000 for the B-cos e²KD and frozen steps of one benchmark
layout and none for another. :func:`set_malloc_top_pad` lets the heap keep ``n`` MiB of free
space at its top when it trims (and ask for as much extra when it grows) and serves blocks
below ``n`` MiB from the heap, so the memory of one step is reused by the next
(docs/results/perf.md has the measurements).

The setting is process-wide and cannot be read back; the trainer applies it at the start of a
run (``malloc_top_pad_mib``, default :data:`DEFAULT_TOP_PAD_MIB`). Resident memory between steps
then stays near the step's peak instead of dropping. Where the C library is not glibc (macOS,
Windows, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from typing import Optional

__all__ = ["DEFAULT_TOP_PAD_MIB", "glibc_malloc", "set_malloc_top_pad"]

#: The trainer's default: enough for the transient memory of the CPU-scale steps in this project.
DEFAULT_TOP_PAD_MIB = 1024

_M_TOP_PAD = -2  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_THRESHOLD = 128 << 10  # glibc's default, before its dynamic adjustment
# mallopt takes an int: the largest padding it can express
_MAX_MIB = (2**31 - 1) >> 20


def glibc_malloc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (whose ``mallopt`` knows ``M_TOP_PAD``), else ``None``."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def set_malloc_top_pad(mib: int) -> bool:
    """Let glibc's malloc keep up to ``mib`` MiB of freed memory at the top of each heap.

    Parameters
    ----------
    mib : int
        The padding in MiB, ``0 <= mib <= 2047``; ``0`` is glibc's trimming without a pad.

    Blocks smaller than the pad are then served from the heap (``M_MMAP_THRESHOLD`` = the pad):
    setting ``M_TOP_PAD`` alone switches off glibc's dynamic mmap threshold and freezes it where
    it stands (128 KiB in a fresh process), so that every larger tensor would be a fresh
    ``mmap`` that faults page by page each time it is allocated, whatever the pad. ``0`` sets
    glibc's defaults (no pad, 128 KiB threshold) without the dynamic adjustment.

    Returns
    -------
    bool
        ``True`` when glibc accepted the setting; ``False`` where the C library is not glibc
        (nothing changed).
    """
    if isinstance(mib, bool) or not isinstance(mib, int):
        raise ValueError(f"the malloc top pad must be a whole number of MiB, got {mib!r}")
    if not 0 <= mib <= _MAX_MIB:
        raise ValueError(f"the malloc top pad must be between 0 and {_MAX_MIB} MiB, got {mib}")
    libc = glibc_malloc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(_M_TOP_PAD, mib << 20) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_TOP_PAD, {mib << 20})")
    threshold = mib << 20 if mib else _GLIBC_MMAP_THRESHOLD
    if libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_MMAP_THRESHOLD, {threshold}); set malloc_top_pad_mib to at most 32")
    return True
