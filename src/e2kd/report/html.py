"""The HTML report: one self-contained page for one run folder or a comparison of several.

The page needs no other file: figures are embedded as base64 PNG ``data:`` URIs and the style
sheet is inline. Every text taken from a run folder (config, keys, values, file names) is escaped
with :func:`html.escape`. A short inline script marks ``<body data-images-ok="true">`` once
every image has decoded (``naturalWidth > 0``), so a headless browser can check the page.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from .._atomic import check_writable_folder
from ..train.runfolder import atomic_write_text, read_metrics
from .figures import training_curves_figure
from .tables import format_cell, mean_std

__all__ = ["RunSummary", "load_run", "flatten", "comparison_metrics", "write_html_report", "METRIC_ORDER"]

#: Metrics shown first in the comparison table, in this order; then the other numeric results
#: alphabetically, then the bookkeeping keys of :data:`BOOKKEEPING`.
METRIC_ORDER = (
    "accuracy",
    "top5",
    "agreement",
    "explanation_similarity",
    "teacher_accuracy",
    "epg",
    "iou",
    "f1",
    "worst_group_accuracy",
    "mean_group_accuracy",
)
BOOKKEEPING = ("steps", "epochs", "wall_time_s", "world_size")
#: Config keys that differ between seeds of one setting; ignored when grouping runs by setting.
SEED_KEYS = ("seed", "name", "data.seed")
MAX_FIGURE_BYTES = 16 * 2**20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class RunSummary:
    """What the report shows of one run folder."""

    path: Path
    name: str
    config_text: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)  # flattened: "distill.lam" -> 1.0
    has_results: bool = False  # the folder holds results.json (an unfinished run does not)
    results: Dict[str, Any] = field(default_factory=dict)  # flattened: "val.accuracy" -> 0.8
    metrics: List[dict] = field(default_factory=list)
    figures: List[Tuple[str, bytes, Tuple[int, int]]] = field(default_factory=list)  # (relative path, PNG, (w, h))
    skipped: List[str] = field(default_factory=list)  # files not embedded, with the reason


def flatten(obj: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested mappings as one level with dotted keys: ``{"val": {"accuracy": .8}}`` -> ``{"val.accuracy": .8}``."""
    out: Dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _png_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a PNG's IHDR chunk, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return (w, h) if w > 0 and h > 0 else None


def load_run(run_dir: str | os.PathLike) -> RunSummary:
    """Read a run folder: ``config.yaml``, ``results.json``, ``metrics.jsonl`` and every ``*.png``.

    A torn last line of ``metrics.jsonl`` (an interrupted write) is skipped; damage elsewhere, an
    unparsable ``results.json`` or ``config.yaml`` is a ValueError naming the file.
    """
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"run folder {path} does not exist; pass folders written by the trainer, e.g. runs/NAME")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a run folder; pass the folder that holds results.json")
    files = {n: path / n for n in ("config.yaml", "results.json", "metrics.jsonl")}
    if not any(p.is_file() for p in files.values()):
        raise ValueError(
            f"{path} is not a run folder: it has none of config.yaml, results.json, metrics.jsonl. "
            "Pass folders written by `e2kd train-teacher` / `e2kd distill` (runs/NAME)"
        )
    run = RunSummary(path=path, name=path.resolve().name)
    if files["config.yaml"].is_file():
        run.config_text = files["config.yaml"].read_text(encoding="utf-8", errors="replace")
        try:
            cfg = yaml.safe_load(run.config_text)
        except yaml.YAMLError as err:
            raise ValueError(f"{files['config.yaml']} is not valid YAML ({err}); the run folder is damaged") from None
        if cfg is not None and not isinstance(cfg, Mapping):
            raise ValueError(f"{files['config.yaml']} must hold a mapping of config keys, got {type(cfg).__name__}")
        run.config = flatten(cfg or {})
    if files["results.json"].is_file():
        try:
            res = json.loads(files["results.json"].read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{files['results.json']} is not valid JSON ({err}); the run folder is damaged") from None
        if not isinstance(res, Mapping):
            raise ValueError(f"{files['results.json']} must hold a JSON object of metrics, got {type(res).__name__}")
        run.results = flatten(res)
        run.has_results = True
    run.metrics = read_metrics(files["metrics.jsonl"])
    for png in sorted(path.rglob("*.png")):
        rel = png.relative_to(path).as_posix()
        if any(part.startswith(".") for part in png.relative_to(path).parts) or not png.is_file():
            continue
        size = png.stat().st_size
        if size > MAX_FIGURE_BYTES:
            run.skipped.append(f"{rel}: {size / 2**20:.1f} MiB, over the {MAX_FIGURE_BYTES // 2**20} MiB limit for embedding")
            continue
        data = png.read_bytes()
        dims = _png_size(data)
        if dims is None:
            run.skipped.append(f"{rel}: not a PNG file (no PNG signature and IHDR header)")
            continue
        run.figures.append((rel, data, dims))
    return run


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metric_sort_key(k: str) -> Tuple[int, int, str]:
    leaf = k.rsplit(".", 1)[-1]
    prefix = k.count(".")
    if leaf in METRIC_ORDER:
        return (prefix, METRIC_ORDER.index(leaf), k)
    if k in BOOKKEEPING:
        return (10, BOOKKEEPING.index(k), k)
    return (prefix, len(METRIC_ORDER), k)


def comparison_metrics(runs: Sequence[RunSummary]) -> List[str]:
    """Rows of the comparison table: every numeric result key that any of ``runs`` reports (a run
    that lacks one shows "–"), ordered by :data:`METRIC_ORDER`, then by name."""
    keys = {
        k
        for r in runs
        for k, v in r.results.items()
        if _is_number(v) or (isinstance(v, str) and v in ("nan", "inf", "-inf"))
    }
    return sorted(keys, key=_metric_sort_key)


def _refuse_repeats(paths: Sequence[str | os.PathLike]) -> None:
    """A ValueError if two of ``paths`` are the same folder (after resolving ``..`` and links):
    the report would show one run as two and count it twice."""
    first: Dict[Path, str] = {}
    for p in paths:
        real = Path(p).resolve()
        if real in first:
            given = f"{first[real]!r} and {str(p)!r} are both" if first[real] != str(p) else f"{str(p)!r} is"
            raise ValueError(f"the same run folder is given twice: {given} {str(real)!r}; give each run folder once")
        first[real] = str(p)


def _unique_names(runs: Sequence[RunSummary]) -> None:
    seen: Dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.name = str(r.path)


# ---- HTML pieces -----------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#1d1d1f;background:#fff}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}h3{margin-bottom:6px}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #d0d0d0;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.side{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.side>div{flex:0 1 auto}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:480px;font-size:.85em}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
figure{margin:8px 0;display:inline-block;vertical-align:top}figcaption{font-size:.85em;color:#555}
img{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#8a4b00;font-size:.9em}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  document.body.setAttribute('data-images-ok', ok === imgs.length ? 'true' : 'false');
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _cell(v: Any) -> str:
    if _is_number(v):
        return f'<td class="num">{_e(format_cell(v))}</td>'
    if v is None:
        return "<td>–</td>"
    if isinstance(v, (list, dict)):
        return f"<td><code>{_e(json.dumps(v))}</code></td>"
    return f"<td>{_e(v)}</td>"


def _img(data: bytes, alt: str, dims: Optional[Tuple[int, int]] = None) -> str:
    size = f' width="{dims[0]}" height="{dims[1]}"' if dims else ""
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{_e(alt)}"{size}>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    h = "".join(f"<th>{_e(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _names(runs: Sequence[RunSummary]) -> str:
    return ", ".join(r.name for r in runs)


def _dataset_note(runs: Sequence[RunSummary]) -> str:
    """A warning when the runs' results.json name different datasets (``dataset``), or when some
    name one and others none, so that the check cannot be made."""
    evaluated = [r for r in runs if r.has_results]
    named = [r for r in evaluated if r.results.get("dataset") is not None]
    unnamed = [r for r in evaluated if r.results.get("dataset") is None]
    datasets = {str(r.results["dataset"]) for r in named}
    if len(datasets) > 1:
        per_run = "; ".join(f"{r.name}: {r.results.get('dataset') or 'not recorded'}" for r in evaluated)
        return (
            '<p class="note"><strong>Different datasets:</strong> the runs were evaluated on different data, '
            f"so their metrics are not comparable ({_e(per_run)}).</p>"
        )
    if named and unnamed:
        return (
            f'<p class="note">The results.json of {_e(_names(unnamed))} names no dataset; it cannot be checked that '
            f"{'it was' if len(unnamed) == 1 else 'they were'} evaluated on {_e(datasets.pop())} like "
            f"{_e(_names(named))}.</p>"
        )
    return ""


def _comparison(runs: Sequence[RunSummary]) -> str:
    unfinished = [r for r in runs if not r.has_results]
    if len(unfinished) == len(runs):
        which = "The run folder has no" if len(runs) == 1 else "None of the run folders has"
        return f'<p class="note">{which} results.json yet (unfinished, or not evaluated): {_e(_names(runs))}.</p>'
    parts = []
    if unfinished:
        parts.append(
            f'<p class="note">No results.json (unfinished, or not evaluated): {_e(_names(unfinished))}; '
            "their columns show “–”.</p>"
        )
    parts.append(_dataset_note(runs))
    keys = comparison_metrics(runs)
    if not keys:
        parts.append('<p class="note">No results.json holds numeric results.</p>')
        return "".join(parts)
    rows = []
    if any(r.results.get("dataset") is not None for r in runs):
        rows.append(["<th>dataset</th>", *(_cell(r.results.get("dataset")) for r in runs)])
    rows += [[f"<th>{_e(k)}</th>", *(_cell(r.results.get(k)) for r in runs)] for k in keys]
    parts.append(_table(["metric", *(r.name for r in runs)], rows))
    return "".join(parts)


def _config_differences(runs: Sequence[RunSummary]) -> str:
    keys = sorted({k for r in runs for k in r.config})
    diff = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1]
    if not diff:
        return "<p>The runs have the same configuration.</p>"
    rows = [[f"<th>{_e(k)}</th>", *(_cell(r.config.get(k)) for r in runs)] for k in diff]
    return _table(["config key", *(r.name for r in runs)], rows)


def _seed_groups(runs: Sequence[RunSummary]) -> List[List[RunSummary]]:
    """Runs of one setting: the same config but for :data:`SEED_KEYS`, evaluated on the same
    dataset (results.json ``dataset``)."""
    groups: Dict[str, List[RunSummary]] = {}
    for r in runs:
        if not r.config:
            continue
        setting = {k: v for k, v in r.config.items() if k not in SEED_KEYS}
        key = json.dumps([setting, r.results.get("dataset")], sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _seed_id(run: RunSummary) -> str:
    """The seeds that make a run of a setting independent: ``seed`` and the data seed
    (``data.seed``, which defaults to ``seed``)."""
    seed = run.config.get("seed")
    data_seed = run.config.get("data.seed")
    return json.dumps([seed, seed if data_seed is None else data_seed], default=str)


def _seed_label(run: RunSummary) -> str:
    seed = run.config.get("seed")
    data_seed = run.config.get("data.seed")
    text = "not recorded" if seed is None else str(seed)
    return text if data_seed is None or data_seed == seed else f"{text} (data.seed {data_seed})"


def _seed_table(runs: Sequence[RunSummary]) -> str:
    groups = [g for g in _seed_groups(runs) if len(g) > 1]
    if not groups:
        return ""
    keys = comparison_metrics(runs)
    rows, repeats = [], []
    for g in groups:
        by_seed: Dict[str, List[RunSummary]] = {}
        for r in g:
            by_seed.setdefault(_seed_id(r), []).append(r)
        shared = [same for same in by_seed.values() if len(same) > 1]
        if shared:
            if len(shared) == 1 and len(shared[0]) == len(g):
                which = f"and share seed {_seed_label(g[0])}"
            else:
                which = "but " + "; ".join(f"{_names(same)} share seed {_seed_label(same[0])}" for same in shared)
            repeats.append(
                f'<p class="note">Not averaged: {_e(_names(g))} have the same setting {_e(which)}. Runs with the '
                "same seed are repeats, not independent seeds; the mean ± std needs distinct seeds, "
                "so give each seed once.</p>"
            )
            continue
        seeds = ", ".join(_seed_label(r) for r in g)
        cells = [f"<th>{_e(_names(g))}</th>", f"<td>{_e(seeds)}</td>"]
        for k in keys:
            vals = [r.results[k] for r in g if _is_number(r.results.get(k))]
            if vals and all(isinstance(v, float) and math.isfinite(v) or isinstance(v, int) for v in vals):
                m, s = mean_std(vals)
                text = format_cell(m) if s is None else f"{format_cell(m)} ± {format_cell(s)}"
                cells.append(f'<td class="num">{_e(text)} <small>(n={len(vals)})</small></td>')
            else:
                cells.append("<td>–</td>")
        rows.append(cells)
    return (
        "<h2 id=\"seeds\">Mean ± std over seeds</h2>"
        "<p>Runs whose configurations differ only in <code>seed</code>, <code>name</code> or <code>data.seed</code>, "
        "evaluated on the same dataset; std is the sample standard deviation (n − 1).</p>"
        + (_table(["runs", "seeds", *keys], rows) if rows else "")
        + "".join(repeats)
    )


def _run_section(run: RunSummary, idx: int) -> str:
    parts = [f'<h2 id="run-{idx}">{_e(run.name)}</h2>', f'<p class="meta">{_e(run.path)}</p>']
    n = len(run.metrics)
    last = run.metrics[-1].get("step") if n else None
    parts.append(
        f"<p>metrics.jsonl: {n} records" + (f", last at step {_e(last)}" if last is not None else "") + "</p>"
    )
    if run.config_text is not None:
        parts.append(f"<details><summary>config.yaml</summary><pre>{_e(run.config_text)}</pre></details>")
    else:
        parts.append('<p class="note">no config.yaml</p>')
    for rel, data, dims in run.figures:
        parts.append(f"<figure>{_img(data, rel, dims)}<figcaption>{_e(rel)} ({dims[0]}×{dims[1]})</figcaption></figure>")
    for s in run.skipped:
        parts.append(f'<p class="note">not embedded: {_e(s)}</p>')
    return "\n".join(parts)


def _results_side_by_side(runs: Sequence[RunSummary]) -> str:
    blocks = []
    for r in runs:
        if r.results:
            rows = [[f"<th>{_e(k)}</th>", _cell(v)] for k, v in sorted(r.results.items(), key=lambda kv: _metric_sort_key(kv[0]))]
            table = _table(["key", "value"], rows)
        else:
            table = '<p class="note">no results.json</p>'
        blocks.append(f"<div><h3>{_e(r.name)}</h3>{table}</div>")
    return '<div class="side">' + "".join(blocks) + "</div>"


def render_html(runs: Sequence[RunSummary], *, title: Optional[str] = None) -> str:
    """The page for already-loaded runs (see :func:`write_html_report`)."""
    if not runs:
        raise ValueError("the report needs at least one run folder")
    _refuse_repeats([r.path for r in runs])
    title = title or ("e²KD report: " + ", ".join(r.name for r in runs))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{_e(title)}</h1>", f'<p class="meta">{len(runs)} run folder(s), generated {now}</p>']
    body.append("<h2 id=\"comparison\">Results</h2>" + _comparison(runs))
    body.append(_seed_table(runs))
    if len(runs) > 1:
        body.append("<h2 id=\"config-diff\">Configuration differences</h2>" + _config_differences(runs))
    curves = training_curves_figure({r.name: r.metrics for r in runs})
    if curves is not None:
        body.append("<h2 id=\"curves\">Training curves</h2>" + _img(curves, "training curves from metrics.jsonl"))
    shown = set(comparison_metrics(runs))
    if len(runs) > 1 or any(k not in shown for r in runs for k in r.results):  # else the table above showed it all
        body.append("<h2 id=\"all-results\">results.json</h2>" + _results_side_by_side(runs))
    body += [_run_section(r, i) for i, r in enumerate(runs)]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(b for b in body if b) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def write_html_report(run_dirs: Sequence[str | os.PathLike], out_path: str | os.PathLike, *, title: Optional[str] = None) -> Path:
    """Write one self-contained HTML page for one run folder or a comparison of several.

    The page holds: a comparison table of every numeric result any run reports (accuracy,
    agreement, explanation similarity first, then EPG, IoU, F1, group metrics, whatever else is
    there; "–" where a run lacks one) with the dataset each run was evaluated on, notes naming
    the runs without ``results.json`` and warning when the datasets differ, mean ± std over seeds
    for runs that differ only in their (distinct) seeds, the config keys that differ, training
    curves from ``metrics.jsonl``, each ``results.json`` side by side, and per run its
    ``config.yaml`` (collapsible) and every PNG found in its folder (e.g. ``figures/``).

    The same folder given twice (after resolving ``..`` and links) is a ValueError.

    Parameters
    ----------
    run_dirs : run folders (``runs/NAME``)
    out_path : the HTML file, written atomically

    Returns
    -------
    Path : ``out_path``
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("write_html_report needs at least one run folder")
    _refuse_repeats(run_dirs)
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the HTML file to write, e.g. {out / 'report.html'}")
    check_writable_folder(out.parent, f"-o {str(out)!r}: the report's folder", "give an HTML file in a folder you can write to (-o PATH)")
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    atomic_write_text(out, render_html(runs, title=title))
    return out
