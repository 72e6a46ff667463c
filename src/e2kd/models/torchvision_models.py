"""ImageNet-size standard models from torchvision (random weights; load local files with
:func:`e2kd.models.load_weights`).

Like every e2kd model they take images in [0, 1]; torchvision's released weights expect the
ImageNet-standardised image, so by default the model standardises its own input
(``input_norm="imagenet"``; ``"none"`` for the raw image, or ``{mean: [...], std: [...]}``).
The state-dict keys stay torchvision's.
"""

from __future__ import annotations

from torch import nn

from ._registry import register_model
from .inputs import InputNorm, normalise_inputs, resolve_input_norm


def _tv(builder: str, num_classes: int, in_chans: int, input_norm: InputNorm = "imagenet", **kwargs) -> nn.Module:
    import torchvision.models as tvm

    if in_chans != 3:
        raise ValueError(f"{builder}: torchvision models take 3 input channels, got in_chans={in_chans}")
    for key in ("weights", "pretrained"):
        if key in kwargs:
            raise ValueError(
                f"{builder}: weights come from local files (model.checkpoint / e2kd.models.load_weights), not "
                f"{key}=; nothing is downloaded"
            )
    stats = resolve_input_norm(input_norm, in_chans, what=builder)
    model = getattr(tvm, builder)(weights=None, num_classes=num_classes, **kwargs)
    return model if stats is None else normalise_inputs(model, *stats)


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("resnet18", num_classes, in_chans, **kw)


@register_model
def resnet34(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("resnet34", num_classes, in_chans, **kw)


@register_model
def resnet50(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("resnet50", num_classes, in_chans, **kw)


@register_model
def densenet121(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("densenet121", num_classes, in_chans, **kw)


@register_model
def densenet169(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("densenet169", num_classes, in_chans, **kw)


@register_model
def mobilenet_v3_small(num_classes: int = 1000, in_chans: int = 3, **kw) -> nn.Module:
    return _tv("mobilenet_v3_small", num_classes, in_chans, **kw)
