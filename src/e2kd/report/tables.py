"""Results tables: markdown and plain-text, with mean ± std over seeds.

A cell holds a number, a string, None (shown as "–") or a list of numbers, one per seed, shown as
``mean ± std``. :func:`group_seeds` turns per-seed records into such rows.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["mean_std", "format_cell", "group_seeds", "markdown_table", "terminal_table"]

Columns = Union[Sequence[str], Mapping[str, str]]
MISSING = "–"


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation of per-seed values.

    ``mean = Σ v_i / n``, ``std = sqrt(Σ (v_i - mean)² / (n - 1))`` (Bessel-corrected: the seeds
    are a sample); ``std`` is None for a single value.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))


def _fmt_number(v: float, digits: int, scale: float) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) and scale == 1:
        return str(v)
    v = float(v) * scale
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}"


def format_cell(value: Any, *, digits: int = 4, scale: float = 1.0) -> str:
    """Text of one cell: numbers with ``digits`` decimals after multiplying by ``scale`` (100 for
    percentages), a list/tuple of numbers as ``mean ± std`` over seeds, None as "–"."""
    if value is None:
        return MISSING
    if isinstance(value, (list, tuple)):
        if not value:
            return MISSING
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"a list cell must hold one number per seed, got {value!r}")
        mean, std = mean_std(value)
        text = _fmt_number(mean, digits, scale)
        return text if std is None else f"{text} ± {_fmt_number(std, digits, scale)}"
    if isinstance(value, (int, float)):
        return _fmt_number(value, digits, scale)
    return str(value)


def _columns(columns: Columns) -> Tuple[List[str], List[str]]:
    if isinstance(columns, Mapping):
        keys, heads = [str(k) for k in columns], [str(v) for v in columns.values()]
    elif isinstance(columns, str):
        raise ValueError("columns must be a sequence of keys (or key -> heading mapping), not one string")
    else:
        keys = [str(k) for k in columns]
        heads = list(keys)
    if not keys:
        raise ValueError("a table needs at least one column")
    return keys, heads


def _is_numeric_cell(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cells(rows: Sequence[Mapping[str, Any]], keys: List[str], digits: int, scale: Mapping[str, float] | float):
    if isinstance(rows, Mapping):
        raise ValueError("rows must be a sequence of mappings (one per table row), not one mapping")
    out, numeric = [], [True] * len(keys)
    any_value = [False] * len(keys)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i} is a {type(row).__name__}; each row must be a mapping of column key -> value")
        line = []
        for j, k in enumerate(keys):
            v = row.get(k)
            s = scale.get(k, 1.0) if isinstance(scale, Mapping) else scale
            line.append(format_cell(v, digits=digits, scale=s))
            if v is not None:
                any_value[j] = True
                numeric[j] = numeric[j] and _is_numeric_cell(v)
        out.append(line)
    return out, [n and a for n, a in zip(numeric, any_value)]


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Columns,
    *,
    digits: int = 4,
    scale: Mapping[str, float] | float = 1.0,
) -> str:
    """A GitHub-flavoured markdown table; numeric columns are right-aligned.

    Parameters
    ----------
    rows : one mapping per row, column key -> value (number, string, None, or per-seed list)
    columns : column keys, or a mapping of key -> heading
    digits : decimals of numbers
    scale : factor for numbers (100 for percentages), one for all or per column key

    Returns
    -------
    str : the table, ending with a newline
    """
    keys, heads = _columns(columns)
    cells, numeric = _cells(rows, keys, digits, scale)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in heads) + " |"]
    lines.append("| " + " | ".join("---:" if n else ":---" for n in numeric) + " |")
    lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in cells]
    return "\n".join(lines) + "\n"


def terminal_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Columns,
    *,
    digits: int = 4,
    scale: Mapping[str, float] | float = 1.0,
    title: Optional[str] = None,
) -> str:
    """The same table as :func:`markdown_table` as aligned plain text for a terminal."""
    keys, heads = _columns(columns)
    cells, numeric = _cells(rows, keys, digits, scale)
    widths = [max(len(h), *(len(line[j]) for line in cells)) if cells else len(h) for j, h in enumerate(heads)]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(line, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [fmt(heads), "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in cells]
    return "\n".join(out) + "\n"


def group_seeds(records: Sequence[Mapping[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> List[Dict[str, Any]]:
    """Collect per-seed records into one row per setting, each metric a list of per-seed values.

    ``group_seeds([{"method": "KD", "seed": 0, "accuracy": .8}, {"method": "KD", "seed": 1,
    "accuracy": .82}], by=["method"], metrics=["accuracy"])`` gives ``[{"method": "KD",
    "accuracy": [.8, .82], "seeds": 2}]``; rows keep the order in which settings first appear.
    A record without a metric contributes nothing to it.
    """
    if isinstance(by, str) or isinstance(metrics, str):
        raise ValueError("by and metrics must be sequences of keys, e.g. by=['method'], not one string")
    groups: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    for rec in records:
        missing = [k for k in by if k not in rec]
        if missing:
            raise ValueError(f"a record lacks the grouping key(s) {missing}; every record needs {list(by)}")
        key = tuple(rec[k] for k in by)
        row = groups.setdefault(key, {**{k: rec[k] for k in by}, **{m: [] for m in metrics}, "seeds": 0})
        row["seeds"] += 1
        for m in metrics:
            v = rec.get(m)
            if v is not None:
                if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
                    raise ValueError(f"metric {m!r} must be a number, got {v!r}")
                row[m].append(v)
    return list(groups.values())
