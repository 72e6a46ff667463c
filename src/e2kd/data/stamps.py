"""Real object photos and background textures from Debian packages, and how they are pasted.

- Objects: the photographic stamps of ``tuxpaint-stamps-default`` (RGBA PNG; the alpha
  channel is the exact object mask). GPL-2: read from the installed package at run time,
  never copied into the repository.
- Backgrounds: GIMP patterns of ``gimp-data`` (``.pat``: a big-endian header of header size,
  version, width, height, bytes per pixel and the magic ``GPAT``, then a name and raw pixels)
  and scikit-image's bundled textures (grass, gravel, brick).

:func:`paste` composites hard-edged objects so that the object mask is exactly the set of
pixels the object changed (see its docstring); the generated benchmarks rely on this.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "STAMPS_DIR",
    "PATTERNS_DIR",
    "Stamp",
    "load_stamp",
    "stamp_paths",
    "read_pat",
    "load_texture",
    "texture_canvas",
    "paste",
    "paste_at_random",
]

STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
PATTERNS_DIR = Path("/usr/share/gimp/2.0/patterns")
STAMPS_HINT = (
    "Install the Debian package with `sudo apt-get install tuxpaint-stamps-default` (or "
    "`make install`, which runs scripts/install-system-deps.sh)."
)
PATTERNS_HINT = (
    "Install the Debian package with `sudo apt-get install gimp-data` (or `make install`, "
    "which runs scripts/install-system-deps.sh)."
)


@dataclass
class Stamp:
    """An object photo cropped to its alpha box: ``rgba`` float (4, h, w) in [0, 1]."""

    name: str
    rgba: torch.Tensor


def stamp_paths(category: str, *, recursive: bool = True) -> list[Path]:
    """PNG stamps of a category folder (e.g. "animals/birds"), sorted; drawings and toys
    (sub-folders "cartoon", "plastic", "toys") are left out: only photos remain."""
    d = STAMPS_DIR / category
    if not d.is_dir():
        raise FileNotFoundError(f"stamp folder {d} not found. {STAMPS_HINT}")
    pattern = "**/*.png" if recursive else "*.png"
    skip = {"cartoon", "plastic", "toys"}
    paths = sorted(p for p in d.glob(pattern) if not skip & set(p.relative_to(d).parts))
    if not paths:
        raise FileNotFoundError(f"no PNG stamps in {d}. {STAMPS_HINT}")
    return paths


@functools.lru_cache(maxsize=1024)
def load_stamp(path: str) -> Stamp:
    """Read an RGBA stamp and crop it to the bounding box of its alpha >= 0.5."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"stamp {path} not found. {STAMPS_HINT}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"stamp {path} is unreadable ({err}); reinstall the package. {STAMPS_HINT}") from err
    t = torch.from_numpy(rgba.copy()).permute(2, 0, 1).float().div_(255.0)
    ys, xs = torch.nonzero(t[3] >= 0.5, as_tuple=True)
    if len(ys) == 0:
        raise ValueError(f"stamp {path} has an empty alpha channel")
    t = t[:, int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1].contiguous()
    return Stamp(Path(path).stem, t)


def read_pat(path: str | Path) -> np.ndarray:
    """Read a GIMP ``.pat`` pattern as uint8 (h, w, 3)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"pattern {path} not found. {PATTERNS_HINT}") from None
    if len(raw) < 24 or raw[20:24] != b"GPAT":
        raise ValueError(f"{path}: not a GIMP pattern (no GPAT magic); the file is corrupt. {PATTERNS_HINT}")
    header, _version, w, h, bpp = struct.unpack(">5I", raw[:20])
    if bpp not in (1, 2, 3, 4):
        raise ValueError(f"{path}: unsupported bytes per pixel {bpp}")
    n = w * h * bpp
    if len(raw) < header + n:
        raise ValueError(f"{path}: truncated pattern ({len(raw)} bytes, need {header + n}). {PATTERNS_HINT}")
    px = np.frombuffer(raw, dtype=np.uint8, count=n, offset=header).reshape(h, w, bpp)
    if bpp in (1, 2):
        px = np.repeat(px[..., :1], 3, axis=2)
    return np.ascontiguousarray(px[..., :3])


@functools.lru_cache(maxsize=256)
def _texture_native(name: str) -> torch.Tensor:
    if name.startswith("skimage:"):
        try:
            import skimage.data
        except ImportError:
            raise ImportError(
                "scikit-image provides the grass/gravel/brick textures: `pip install scikit-image` "
                "(or `pip install e2kd[data]`)"
            ) from None
        arr = getattr(skimage.data, name.split(":", 1)[1])()
        t = torch.from_numpy(np.asarray(arr, dtype=np.uint8).copy()).float()
        t = t.unsqueeze(0).repeat(3, 1, 1) if t.dim() == 2 else t.permute(2, 0, 1)[:3]
        # The 512 px scans are on a finer scale than the 20-156 px GIMP tiles: bring to 128.
        t = F.interpolate(t[None], size=(128, 128), mode="bilinear", antialias=True, align_corners=False)[0]
        return t.div_(255.0)
    arr = read_pat(PATTERNS_DIR / name)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


@functools.lru_cache(maxsize=512)
def load_texture(name: str, scale: float) -> torch.Tensor:
    """Texture ``name`` ("Water/pool.pat" or "skimage:grass") as float (3, h, w), resized by
    ``scale`` (the generators draw at ``image_size / 128`` of the native tile size)."""
    t = _texture_native(name)
    if scale != 1.0:
        h, w = t.shape[-2:]
        size = (max(4, round(h * scale)), max(4, round(w * scale)))
        t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)
    return t


@functools.lru_cache(maxsize=512)
def _tiled(tex_id: int, size: int, tex: torch.Tensor) -> torch.Tensor:
    h, w = tex.shape[-2:]
    return tex.repeat(1, size // h + 2, size // w + 2).contiguous()


def texture_canvas(tex: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A (3, size, size) background: the tileable texture repeated, at a random offset."""
    h, w = tex.shape[-2:]
    tiled = _tiled(id(tex), size, tex)
    y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
    return tiled[:, y0 : y0 + size, x0 : x0 + size].clone()


_PM_CACHE: dict = {}


def _premultiplied(stamp: Stamp, canvas_size: int) -> torch.Tensor:
    """The stamp with premultiplied colour, pre-shrunk (once per canvas size) so that its
    longer side is at most 2 * canvas_size: later resizes then stay cheap."""
    key = (id(stamp), canvas_size)
    hit = _PM_CACHE.get(key)
    if hit is not None and hit[0] is stamp:
        return hit[1]
    rgba = stamp.rgba
    pm = torch.cat([rgba[:3] * rgba[3:], rgba[3:]], 0)
    h, w = pm.shape[-2:]
    f = 2 * canvas_size / max(h, w)
    if f < 1:
        pm = F.interpolate(pm[None], size=(max(2, round(h * f)), max(2, round(w * f))), mode="bilinear",
                           antialias=True, align_corners=False)[0]
    _PM_CACHE[key] = (stamp, pm)
    return pm


_RESIZED_CACHE: dict = {}


def _resized(stamp: Stamp, canvas_size: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside (h, w) bool, colour (3, h, w) float in 0..255) of the stamp resized to
    ``height``; memoised, since the generators draw the same sizes many times."""
    key = (id(stamp), canvas_size, height)
    hit = _RESIZED_CACHE.get(key)
    if hit is not None and hit[0] is stamp:
        return hit[1], hit[2]
    pm = _premultiplied(stamp, canvas_size)
    h0, w0 = pm.shape[-2:]
    width = max(2, round(w0 * height / h0))
    r = F.interpolate(pm[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    alpha = r[3]
    inside = alpha >= 0.5
    colour = (r[:3] / alpha.clamp_min(1e-6)).clamp_(0, 1).mul_(255).round_()
    if len(_RESIZED_CACHE) > 8192:
        _RESIZED_CACHE.clear()
    _RESIZED_CACHE[key] = (stamp, inside, colour)
    return inside, colour


def paste(
    canvas: torch.Tensor,
    stamp: Stamp,
    *,
    height: int,
    top: int,
    left: int,
    flip: bool,
    background: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``stamp`` resized to ``height`` pixels high at (top, left), flipped if asked.

    The stamp is resized with premultiplied alpha (antialiased bilinear); pixels whose
    resized alpha is >= 0.5 take the stamp colour, all others keep the background (a hard
    edge). A stamp pixel that would round to exactly the background's uint8 colour is moved
    one grey level on its first channel, so that after quantisation the object mask is
    **exactly** the set of pixels the paste changed.

    Parameters
    ----------
    canvas : float (3, S, S) in [0, 1] whose values are multiples of 1/255 (modified in place)
    background : float (3, S, S), optional: when pasting several objects, the bare
        background; the one-level move then keeps every object pixel different from it (so
        the union of the object masks is exactly where the image differs from the background)

    Returns
    -------
    canvas : float (3, S, S)
    mask : bool (S, S), the visible pixels of this object
    """
    s = canvas.shape[-1]
    inside, colour = _resized(stamp, s, max(2, int(height)))
    if flip:
        inside, colour = inside.flip(-1), colour.flip(-1)
    height, width = inside.shape
    # Clip the stamp to the canvas.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, s), min(left + width, s)
    mask = torch.zeros(s, s, dtype=torch.bool)
    if y1 <= y0 or x1 <= x0:
        return canvas, mask
    sy, sx = y0 - top, x0 - left
    win_in = inside[sy : sy + (y1 - y0), sx : sx + (x1 - x0)]
    win_col = colour[:, sy : sy + (y1 - y0), sx : sx + (x1 - x0)]
    ref = canvas if background is None else background
    bg = (ref[:, y0:y1, x0:x1] * 255).round()
    same = (win_col == bg).all(0) & win_in
    if same.any():
        win_col = win_col.clone()  # never touch the memoised stamp
        c0 = win_col[0]
        c0[same] = torch.where(c0[same] >= 255, c0[same] - 1, c0[same] + 1)
    region = canvas[:, y0:y1, x0:x1]
    region[:, win_in] = win_col[:, win_in] / 255.0
    mask[y0:y1, x0:x1] = win_in
    return canvas, mask


def paste_at_random(
    canvas: torch.Tensor, stamp: Stamp, rng: np.random.Generator, frac: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`paste` ``stamp`` with its longer side a uniform draw from ``frac`` (fractions of the
    canvas side), at a uniformly drawn position that keeps it inside the canvas, flipped with
    probability 1/2; the draws are taken from ``rng`` in that order. Returns (canvas, mask)."""
    size = canvas.shape[-1]
    h0, w0 = stamp.rgba.shape[-2:]
    f = rng.uniform(*frac)
    height = max(4, round(f * size * min(1.0, h0 / w0)))
    width = max(1, round(w0 * height / h0))
    top = int(rng.integers(0, max(1, size - height + 1)))
    left = int(rng.integers(0, max(1, size - width + 1)))
    return paste(canvas, stamp, height=height, top=top, left=left, flip=bool(rng.integers(2)))
