"""Augment an image together with its stored explanation map: geometric transforms move both
with the same random parameters, photometric ones touch the image only."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["JointAugment", "GEOMETRIC", "PHOTOMETRIC"]

# Transforms of torchvision.transforms.v2 that only move pixels, so that the same parameters
# applied to a map move the explanation with the image.
GEOMETRIC = (
    "Resize",
    "CenterCrop",
    "RandomCrop",
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "RandomRotation",
    "RandomAffine",
    "RandomPerspective",
    "Pad",
)
# Transforms that change pixel values but never their position: applied to the image only.
PHOTOMETRIC = (
    "ColorJitter",
    "Grayscale",
    "RandomGrayscale",
    "GaussianBlur",
    "GaussianNoise",
    "RandomAdjustSharpness",
    "RandomAutocontrast",
    "RandomInvert",
    "RandomSolarize",
    "RandomPosterize",
    "RandomEqualize",
    "RandomPhotometricDistort",
)
_CONTAINERS = ("Compose", "RandomApply", "RandomChoice", "RandomOrder")


def _name(t) -> str:
    return type(t).__name__


def _check(transforms: Sequence, kind: str, allowed: Tuple[str, ...], other: Tuple[str, ...]) -> None:
    import torchvision.transforms.v2 as v2

    for t in transforms:
        name = _name(t)
        if not isinstance(t, v2.Transform):
            origin = type(t).__module__
            if name in allowed and origin.startswith("torchvision.transforms"):
                raise ValueError(
                    f"{name} from {origin} (transforms v1) cannot share its random parameters between an image "
                    f"and a map; use torchvision.transforms.v2.{name}"
                )
            raise ValueError(
                f"{kind} augmentation {t!r} is not a torchvision.transforms.v2 transform; it cannot be mirrored on "
                f"the explanation map. Allowed {kind} transforms: {', '.join(allowed)}"
            )
        if name in _CONTAINERS:
            _check(list(t.transforms), kind, allowed, other)
            continue
        if name not in allowed:
            if name in other:
                why = (
                    f"{name} is photometric: it changes pixel values, not positions, so it belongs in the "
                    "photometric list (image only)"
                    if kind == "geometric"
                    else f"{name} is geometric: it moves pixels, so it must go in the geometric list to move the "
                    "explanation map with the image"
                )
            else:
                why = f"{name} cannot be mirrored on an explanation map"
            raise ValueError(f"{kind} augmentation refused: {why}. Allowed {kind} transforms: {', '.join(allowed)}")
        if kind == "geometric":
            mode = getattr(t, "padding_mode", "constant")
            if mode != "constant":
                raise ValueError(
                    f"geometric augmentation refused: {name} has padding_mode={mode!r}, which would copy explanation "
                    "evidence from inside the image into the padding of the map; use padding_mode='constant' with "
                    "fill=0 (the map then reads 'no evidence' outside the image)"
                )
            fill = getattr(t, "fill", 0)
            values = fill.values() if isinstance(fill, dict) else [fill]
            for v in values:
                flat = v if isinstance(v, (list, tuple)) else [v]
                if any(x not in (None, 0) for x in flat):
                    raise ValueError(
                        f"geometric augmentation refused: {name} has fill={fill!r}, which would also fill the "
                        "explanation map; use fill=0 (the map then reads 'no evidence' outside the image)"
                    )


class JointAugment:
    """One random geometric augmentation shared by an image and its explanation map.

    The geometric transforms (from :data:`GEOMETRIC`, torchvision.transforms.v2) run in ONE
    call on the image, the map and the optional mask, so all three get the same random
    parameters (crop box, flip, angle). Image and map are resampled alike, with the
    transform's own interpolation (bilinear for the resizing crops, antialiased when
    shrinking; nearest for ``RandomRotation``/``RandomAffine`` unless told otherwise), so a
    map that is a per-pixel function of the image moves exactly with it up to interpolation
    error; the mask is resampled with nearest neighbours. A map smaller than the image is first upsampled bilinearly
    (``align_corners=False``) to the image's size, so it leaves at the augmented image's
    size. The photometric transforms (:data:`PHOTOMETRIC`) then change the image only.

    Anything else (a photometric transform in the geometric list, a geometric one in the
    photometric list, v1 transforms, lambdas, a non-zero ``fill``, a ``padding_mode`` other
    than ``"constant"``, which would mirror or repeat map values into the padding) is refused
    with a ValueError at construction.

    Parameters
    ----------
    geometric : sequence of torchvision.transforms.v2 transforms
    photometric : sequence of torchvision.transforms.v2 transforms
    """

    def __init__(self, *, geometric: Sequence = (), photometric: Sequence = ()):
        import torchvision.transforms.v2 as v2

        geometric, photometric = list(geometric or ()), list(photometric or ())
        _check(geometric, "geometric", GEOMETRIC, PHOTOMETRIC)
        _check(photometric, "photometric", PHOTOMETRIC, GEOMETRIC)
        self.geometric = v2.Compose(geometric) if geometric else None
        self.photometric = v2.Compose(photometric) if photometric else None

    def __call__(
        self, image: torch.Tensor, maps: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Augment ``image`` (C, H, W), ``maps`` (K, h, w) and ``mask`` (K', H, W)."""
        from torchvision import tv_tensors

        maps = maps.float()
        if self.geometric is not None:
            if tuple(maps.shape[-2:]) != tuple(image.shape[-2:]):
                maps = F.interpolate(maps[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
            inputs = [tv_tensors.Image(image), tv_tensors.Image(maps)]
            if mask is not None:
                inputs.append(tv_tensors.Mask(mask))
            out = self.geometric(*inputs)
            image, maps = out[0].as_subclass(torch.Tensor), out[1].as_subclass(torch.Tensor)
            if mask is not None:
                mask = out[2].as_subclass(torch.Tensor)
        if self.photometric is not None:
            image = self.photometric(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        return image, maps, mask

    def __repr__(self) -> str:
        return f"JointAugment(geometric={self.geometric!r}, photometric={self.photometric!r})"
