"""Input scaling inside the model: every e2kd model takes images in [0, 1].

Released weights were trained on standardised inputs (torchvision and most timm models:
ImageNet mean and std), so a model built for such weights standardises its own input. The
dataset, the explainers and the frozen store then all see the same [0, 1] image whatever the
model, and an input-space explanation (gradient, input × gradient) is taken with respect to
that image.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

__all__ = ["InputNormalisation", "IMAGENET_MEAN", "IMAGENET_STD", "resolve_input_norm", "fit_channels", "normalise_inputs",
           "adapted_class"]

# torchvision's ImageNet statistics (also timm's default)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PRESETS: Dict[str, Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": None,
}

InputNorm = Union[None, str, Dict[str, Sequence[float]]]


class InputNormalisation(nn.Module):
    r"""Per-channel standardisation :math:`x_c \mapsto (x_c - \mu_c) / \sigma_c`.

    ``mean`` and ``std`` are buffers outside the state dict: weights files keep the key
    layout of their source (torchvision, timm), and the statistics belong to how the model
    was built (they are recorded with its construction arguments).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise ValueError(f"input normalisation needs one mean and one std per channel, got {mean_t.numel()} and {std_t.numel()}")
        if not bool(torch.all(std_t > 0)):
            raise ValueError(f"input normalisation: every std must be > 0, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"input normalisation expects images (B, {self.mean.shape[1]}, H, W) in [0, 1], got shape {tuple(x.shape)}"
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, std={[round(v, 4) for v in self.std.flatten().tolist()]}"


def fit_channels(mean: Sequence[float], std: Sequence[float], in_chans: int, *, what: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Colour statistics for a model with ``in_chans`` channels: as they are, or their average
    for a 1-channel model; any other mismatch is an error naming ``what``."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) == in_chans:
        return mean, std
    if in_chans == 1 and len(mean) == 3:
        return (sum(mean) / 3,), (sum(std) / 3,)
    raise ValueError(
        f"{what} gives statistics for {len(mean)} channels, the model has {in_chans}; "
        "set input_norm to {mean: [...], std: [...]} or 'none'"
    )


def resolve_input_norm(spec: InputNorm, in_chans: int, *, what: str) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """``(mean, std)`` per channel for ``spec``, or None for no normalisation.

    ``spec`` is a preset name (``"imagenet"``, ``"inception"`` = mean and std 0.5,
    ``"none"``), None (= ``"none"``) or ``{"mean": [...], "std": [...]}``. A 3-channel
    preset on a 1-channel model uses the channels' average.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in _PRESETS:
            raise ValueError(f"{what}: unknown input_norm {spec!r}; use one of {', '.join(_PRESETS)} or {{mean: [...], std: [...]}}")
        pair = _PRESETS[spec]
        return None if pair is None else fit_channels(*pair, in_chans, what=f"{what}: input_norm {spec!r}")
    if hasattr(spec, "keys") and set(spec.keys()) == {"mean", "std"}:
        mean, std = tuple(float(v) for v in spec["mean"]), tuple(float(v) for v in spec["std"])
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"{what}: input_norm needs {in_chans} means and stds (one per input channel), got {len(mean)} and {len(std)}")
        return mean, std
    raise ValueError(f"{what}: input_norm must be a preset name ({', '.join(_PRESETS)}) or {{mean: [...], std: [...]}}, got {spec!r}")


class _NormalisedForward:
    """Mixin: standardise the [0, 1] input, then run the wrapped class's own forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return super().forward(self.input_norm(x), *args, **kwargs)


_CLASSES: Dict[Tuple[type, Type[nn.Module]], Type[nn.Module]] = {}


def adapted_class(mixin: type, base: Type[nn.Module]) -> Type[nn.Module]:
    """The subclass of ``base`` whose methods come first from ``mixin`` (one per pair, reused).

    It keeps ``base``'s name, so reprs and name-based defaults read as before.
    """
    if any(cls is mixin for cls in base.__mro__):
        raise ValueError(f"{base.__name__} is already adapted by {mixin.__name__}")
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        cls = type(base.__name__, (mixin, base), {"__module__": base.__module__, "__qualname__": base.__qualname__})
        _CLASSES[(mixin, base)] = cls
    return cls


def normalise_inputs(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make ``model`` standardise its input before its own forward, in place.

    The model keeps its modules, state-dict keys and class ancestry (so name-based defaults,
    such as GradCAM's ``layer4`` for a ResNet, still apply); it gains a submodule
    ``input_norm`` and becomes an instance of a subclass of its class whose ``forward`` runs
    ``input_norm`` first.
    """
    cls = adapted_class(_NormalisedForward, type(model))
    model.input_norm = InputNormalisation(mean, std)
    model.__class__ = cls
    return model
