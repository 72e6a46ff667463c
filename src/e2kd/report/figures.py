"""Figures: explanation grids (image | teacher | KD student | e²KD student) and metric curves.

Everything renders with matplotlib's Agg canvas on a private :class:`~matplotlib.figure.Figure`
(no pyplot, no global backend switch), returns the PNG bytes, and writes them atomically when a
path is given.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..train.runfolder import atomic_write_bytes, read_metrics

__all__ = ["normalise_map", "explanation_figure", "curve_figure", "training_curves_figure", "TRAINING_CURVE_KEYS"]

#: Metrics of ``metrics.jsonl`` drawn by :func:`training_curves_figure`, in this order, when present.
TRAINING_CURVE_KEYS = ("loss", "kd_loss", "exp_loss", "gt_loss", "agreement", "accuracy", "explanation_similarity", "lr")


def _as_array(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; converted without importing torch here
        x = x.detach().cpu().float().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be an array or tensor of numbers ({err})") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds NaN or infinite values; pass finite numbers")
    return arr


def normalise_map(m: Any) -> np.ndarray:
    """Scale one explanation map to [0, 1] for display.

    ``m' = (m - min m) / (max m - min m)``; a constant map becomes all zeros (it highlights nothing).

    Parameters
    ----------
    m : array or tensor, shape (H, W)

    Returns
    -------
    numpy.ndarray, shape (H, W), values in [0, 1]
    """
    a = _as_array(m, "the explanation map")
    if a.ndim != 2:
        raise ValueError(f"normalise_map takes one (H, W) map, got shape {a.shape}")
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 0.0:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def _images_hwc(images: Any) -> np.ndarray:
    a = _as_array(images, "images")
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C = 1 or 3, got {a.shape}")
    if a.min() < -1e-6 or a.max() > 1 + 1e-6:
        raise ValueError(
            f"images must be in [0, 1] (got values in [{a.min():.3g}, {a.max():.3g}]); pass the un-normalised images"
        )
    return np.clip(a, 0.0, 1.0).transpose(0, 2, 3, 1)


def _maps_nhw(maps: Any, name: str, n: int) -> np.ndarray:
    a = _as_array(maps, f"the maps of column {name!r}")
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise ValueError(
                f"the maps of column {name!r} have {a.shape[1]} channels (shape {a.shape}); pass one map per image, "
                "e.g. the target class's map: maps[torch.arange(N), target] or an Explanation for one target"
            )
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"the maps of column {name!r} must have shape (N, H, W) or (N, 1, H, W), got {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"column {name!r} has {a.shape[0]} maps but there are {n} images; give one map per image")
    return a


def _new_figure(width_in: float, height_in: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig, path: Optional[str | os.PathLike], dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(Path(path), data)
    return data


def explanation_figure(
    images: Any,
    columns: Mapping[str, Any],
    path: Optional[str | os.PathLike] = None,
    *,
    titles: Optional[Sequence[str]] = None,
    image_title: str = "image",
    cmap: str = "jet",
    alpha: float = 0.5,
    cell_inches: float = 1.6,
    dpi: int = 100,
) -> bytes:
    """A grid with one row per image: the image, then each named explanation as a heat map over it.

    Each map is scaled on its own with :func:`normalise_map` (so columns of different scales are
    comparable by shape, not magnitude) and drawn with colour map ``cmap`` at opacity ``alpha``
    over the image; maps of another resolution than the image (e.g. GradCAM before upsampling)
    are stretched over it bilinearly.

    The canvas is exactly ``(cell_inches·(1 + len(columns)) + left) × (cell_inches·N + top)``
    inches at ``dpi``, where ``top`` = 0.35 in holds the column headings and ``left`` = 0.35 in
    holds the row titles when ``titles`` is given (0 otherwise).

    Parameters
    ----------
    images : array or tensor, shape (N, C, H, W), C in {1, 3}, values in [0, 1]
    columns : mapping of column heading -> maps of shape (N, H', W') or (N, 1, H', W')
        e.g. ``{"teacher": t_maps, "KD student": kd_maps, "e²KD student": e2kd_maps}``.
    path : file to write the PNG to (atomically), or None
    titles : N row titles (e.g. the true class), or None

    Returns
    -------
    bytes : the PNG
    """
    imgs = _images_hwc(images)
    n = imgs.shape[0]
    if n == 0:
        raise ValueError("explanation_figure needs at least one image")
    if not isinstance(columns, Mapping) or not columns:
        raise ValueError("columns must be a non-empty mapping of heading -> maps, e.g. {'teacher': maps}")
    maps = {str(k): _maps_nhw(v, str(k), n) for k, v in columns.items()}
    if titles is not None:
        titles = [str(t) for t in titles]
        if len(titles) != n:
            raise ValueError(f"titles has {len(titles)} entries but there are {n} images; give one title per image")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    from matplotlib import colormaps

    if cmap not in colormaps:
        raise ValueError(f"unknown colour map {cmap!r}; pick one of matplotlib.colormaps, e.g. 'jet' or 'inferno'")
    top, left = 0.35, (0.35 if titles is not None else 0.0)
    ncols = 1 + len(maps)
    width, height = left + ncols * cell_inches, top + n * cell_inches
    fig = _new_figure(width, height, dpi)
    pad = 0.03 * cell_inches  # a thin gap between cells
    h, w = imgs.shape[1:3]
    for r in range(n):
        gray = imgs[r].shape[-1] == 1
        shown = imgs[r][..., 0] if gray else imgs[r]
        for c in range(ncols):
            x0 = left + c * cell_inches + pad
            y0 = height - top - (r + 1) * cell_inches + pad
            ax = fig.add_axes([x0 / width, y0 / height, (cell_inches - 2 * pad) / width, (cell_inches - 2 * pad) / height])
            ax.set_axis_off()
            ax.imshow(shown, cmap="gray" if gray else None, vmin=0.0, vmax=1.0, interpolation="nearest", extent=(0, w, h, 0))
            if c > 0:
                m = normalise_map(list(maps.values())[c - 1][r])
                ax.imshow(m, cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, interpolation="bilinear", extent=(0, w, h, 0))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
    headings = [image_title, *maps.keys()]
    for c, head in enumerate(headings):
        fig.text((left + (c + 0.5) * cell_inches) / width, (height - top / 2) / height, head, ha="center", va="center", fontsize=9)
    if titles is not None:
        for r, t in enumerate(titles):
            y = (height - top - (r + 0.5) * cell_inches) / height
            fig.text((left / 2) / width, y, t, ha="center", va="center", rotation=90, fontsize=8)
    return _finish(fig, path, dpi)


def _curve_arrays(name: str, spec: Any) -> Tuple[List[Any], np.ndarray, Optional[np.ndarray]]:
    if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
        raise ValueError(f"curve {name!r} must be (x, y) or (x, mean, std), got {type(spec).__name__}")
    x = list(spec[0])
    y = _as_array(spec[1], f"the y values of curve {name!r}").reshape(-1)
    err = _as_array(spec[2], f"the std of curve {name!r}").reshape(-1) if len(spec) == 3 else None
    if len(x) != len(y) or (err is not None and len(err) != len(y)):
        raise ValueError(
            f"curve {name!r}: x has {len(x)} values, y {len(y)}" + (f", std {len(err)}" if err is not None else "") + "; they must match"
        )
    if len(x) == 0:
        raise ValueError(f"curve {name!r} has no points")
    return x, y, err


def curve_figure(
    curves: Mapping[str, Any],
    path: Optional[str | os.PathLike] = None,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: Optional[str] = None,
    logx: bool = False,
    size_inches: Tuple[float, float] = (5.0, 3.5),
    dpi: int = 100,
) -> bytes:
    """One axes with a line per named curve, with a ±std band where a std is given.

    Parameters
    ----------
    curves : mapping of label -> ``(x, y)`` or ``(x, mean, std)``
        x values are numbers, or strings for a categorical axis (e.g. shots ``["10", "50",
        "200", "all"]``); every curve of a categorical figure must use the same categories.
        e.g. ``{"KD": (shots, acc_mean, acc_std), "e²KD": (shots, ...)}`` for agreement vs shots,
        ``{"B-cos ViT": (shift_px, equivariance)}`` for a shift-equivariance curve.
    path : file to write the PNG to (atomically), or None

    Returns
    -------
    bytes : the PNG of exactly ``size_inches · dpi`` pixels
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty mapping of label -> (x, y) or (x, mean, std)")
    parsed = {str(k): _curve_arrays(str(k), v) for k, v in curves.items()}
    categorical = any(isinstance(v, str) for x, _, _ in parsed.values() for v in x)
    categories: List[str] = []
    if categorical:
        for x, _, _ in parsed.values():
            for v in x:
                if str(v) not in categories:
                    categories.append(str(v))
        if logx:
            raise ValueError("logx needs numeric x values; this figure has categorical x values")
    fig = _new_figure(size_inches[0], size_inches[1], dpi)
    ax = fig.add_subplot(1, 1, 1)
    for label, (x, y, err) in parsed.items():
        xs = np.array([categories.index(str(v)) for v in x], dtype=float) if categorical else _as_array(x, f"the x values of curve {label!r}")
        (line,) = ax.plot(xs, y, marker="o", markersize=3, label=label)
        if err is not None:
            ax.fill_between(xs, y - err, y + err, color=line.get_color(), alpha=0.2, linewidth=0)
    if categorical:
        ax.set_xticks(range(len(categories)), categories)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path, dpi)


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def training_curves_figure(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Optional[str | os.PathLike] = None,
    *,
    keys: Optional[Sequence[str]] = None,
    split: str = "train",
    panel_inches: Tuple[float, float] = (3.6, 2.6),
    max_columns: int = 3,
    dpi: int = 90,
) -> Optional[bytes]:
    """Training curves from ``metrics.jsonl`` records: one panel per metric, one line per run.

    Parameters
    ----------
    runs : mapping of run name -> records (as from :func:`e2kd.train.runfolder.read_metrics`), or
        -> a run folder / ``metrics.jsonl`` path, read with that function (a torn last line is skipped)
    keys : the metrics to draw; default: those of :data:`TRAINING_CURVE_KEYS` that the runs logged
    split : which records to draw (their ``split`` field), ``"train"`` by default

    Returns
    -------
    bytes or None : the PNG, or None when no run logged any of the metrics for ``split``
    """
    series: Dict[str, Dict[str, Tuple[List[float], List[float]]]] = {}
    for run, records in runs.items():
        if isinstance(records, (str, os.PathLike)):
            log = Path(records)
            log = log / "metrics.jsonl" if log.is_dir() else log
            if not log.is_file():
                raise FileNotFoundError(f"{log} does not exist; pass a run folder or its metrics.jsonl")
            records = read_metrics(log)
        for rec in records:
            if rec.get("split", "train") != split or not _numeric(rec.get("step")):
                continue
            for k, v in rec.items():
                if _numeric(v) and k not in ("step", "epoch"):
                    xs, ys = series.setdefault(k, {}).setdefault(run, ([], []))
                    xs.append(float(rec["step"]))
                    ys.append(float(v))
    wanted = [k for k in (keys if keys is not None else TRAINING_CURVE_KEYS) if k in series]
    if not wanted:
        return None
    from matplotlib.ticker import MaxNLocator

    ncols = min(max_columns, len(wanted))
    nrows = math.ceil(len(wanted) / ncols)
    fig = _new_figure(panel_inches[0] * ncols, panel_inches[1] * nrows, dpi)
    for i, k in enumerate(wanted):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for run, (xs, ys) in series[k].items():
            ax.plot(xs, ys, linewidth=1.2, label=run)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0 and len(runs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _finish(fig, path, dpi)
