"""Any timm model as a teacher or student: ``create_model("timm/<architecture>")``.

Needs the optional extra ``e2kd[timm]``. The model is built with random weights
(``pretrained=False``: timm downloads weights, which needs the internet); load a local timm
checkpoint with ``model.checkpoint`` / :func:`e2kd.models.load_weights` (the keys are timm's
own). Two things are added, neither of them in the state dict:

- ``input_norm``: the model takes [0, 1] images like every e2kd model and standardises them
  with the statistics its weights were trained with (``pretrained_cfg["mean"/"std"]`` of the
  architecture's default weights, e.g. ImageNet's or 0.5 / 0.5). ``input_norm=`` overrides
  them (a preset name, ``"none"``, or ``{mean: [...], std: [...]}``).
- ``feature_map``: an identity on the output of ``forward_features``, the last feature map
  before the classifier's pooling. GradCAM explains it by default, for every timm CNN
  (ResNet ``layer4``, EfficientNet after ``conv_head``, ConvNeXt after its last stage).
  Transformers return tokens there, which GradCAM refuses; explain them with ``gradient``,
  ``inputxgradient`` or B-cos.

``forward(x)`` is ``forward_head(feature_map(forward_features(input_norm(x))))``, timm's own
split of every model's forward.
"""

from __future__ import annotations

import difflib
from typing import Tuple

from torch import nn

from .inputs import InputNorm, InputNormalisation, adapted_class, fit_channels, resolve_input_norm

__all__ = ["TIMM_PREFIX", "create_timm_model", "is_timm_model", "list_timm_models", "check_image_size"]

TIMM_PREFIX = "timm/"


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need the optional extra: pip install 'e2kd[timm]'") from None
    return timm


class _TimmForward:
    """Mixin: [0, 1] input → standardised → timm's features → marked feature map → head."""

    gradcam_layer = "feature_map"

    def forward(self, x):
        return self.forward_head(self.feature_map(self.forward_features(self.input_norm(x))))


def is_timm_model(name: str) -> bool:
    """Whether ``name`` is ``timm/<architecture>`` with an architecture timm knows (False without timm)."""
    if not name.startswith(TIMM_PREFIX):
        return False
    try:
        timm = _timm()
    except ValueError:
        return False
    return bool(timm.is_model(name[len(TIMM_PREFIX):]))


def list_timm_models(pattern: str = "") -> list:
    """``timm/<architecture>`` names whose architecture contains ``pattern``."""
    return [TIMM_PREFIX + n for n in _timm().list_models(f"*{pattern}*")]


def create_timm_model(name: str, *, num_classes: int, in_chans: int, input_norm: InputNorm = "pretrained", **kwargs) -> nn.Module:
    """Build ``timm/<architecture>`` with random weights, taking [0, 1] images (see the module)."""
    if not name.startswith(TIMM_PREFIX) or len(name) == len(TIMM_PREFIX):
        raise ValueError(f"a timm model is named 'timm/<architecture>', e.g. 'timm/resnet50', got {name!r}")
    arch = name[len(TIMM_PREFIX):]
    timm = _timm()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(repr(TIMM_PREFIX + c) for c in close)}?" if close else ""
        raise ValueError(f"timm has no architecture {arch!r}.{hint} (timm.list_models() lists them)")
    for key in ("pretrained", "checkpoint_path", "pretrained_cfg_overlay"):
        if kwargs.get(key):
            raise ValueError(
                f"{name}: {key}= would make timm download or unpickle weights; give a local weights file as "
                "model.checkpoint (teacher.checkpoint) with source: timm instead"
            )
        kwargs.pop(key, None)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    for method in ("forward_features", "forward_head"):
        if not callable(getattr(model, method, None)):
            raise ValueError(f"{name}: the timm model has no {method}(); e2kd needs timm's forward_features / forward_head split")
    for attr in ("input_norm", "feature_map"):
        if hasattr(model, attr):
            raise ValueError(f"{name}: the timm model already has an attribute {attr!r}, which e2kd adds")

    if input_norm == "pretrained":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is None or std is None:
            raise ValueError(f"{name}: timm records no input mean/std for this architecture; set input_norm (e.g. 'imagenet' or 'none')")
        stats = fit_channels(mean, std, in_chans, what=f"{name}: timm's pretrained_cfg")
    else:
        stats = resolve_input_norm(input_norm, in_chans, what=name)

    model.input_norm = nn.Identity() if stats is None else InputNormalisation(*stats)
    model.feature_map = nn.Identity()
    model.__class__ = adapted_class(_TimmForward, type(model))
    return model


def check_image_size(model: nn.Module, image_hw: Tuple[int, int], *, kwargs_key: str) -> None:
    """Raise a ValueError when ``model`` holds a patch embedding built for one image size only
    (timm's ``PatchEmbed`` with ``strict_img_size``, as in ViTs) and the data's images have
    another; ``kwargs_key`` names the config section of the model's arguments (``model.kwargs``)."""
    h, w = int(image_hw[0]), int(image_hw[1])
    for module in model.modules():
        size = getattr(module, "img_size", None)
        if type(module).__name__ != "PatchEmbed" or size is None or not getattr(module, "strict_img_size", False):
            continue
        mh, mw = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
        if (mh, mw) != (h, w):
            patch = getattr(module, "patch_size", None)
            patch_hint = ""
            if isinstance(patch, (tuple, list)) and (h % int(patch[0]) or w % int(patch[1])):
                patch_hint = f" and a patch_size that divides it ({kwargs_key}.patch_size; now {int(patch[0])})"
            raise ValueError(
                f"model {getattr(model, 'model_name', type(model).__name__)!r} takes {mh}×{mw} images (its img_size) but the "
                f"data's images are {h}×{w}; set {kwargs_key}.img_size={h if h == w else [h, w]}{patch_hint}, "
                f"or data.image_size={mh if mh == mw else [mh, mw]}"
            )
