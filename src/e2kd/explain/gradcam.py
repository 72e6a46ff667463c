"""Differentiable GradCAM (Selvaraju et al., ICCV 2017)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import Explainer, Explanation, check_logits, register_explainer, resolve_target, target_score, unwrap

__all__ = ["GradCAM", "default_gradcam_layer", "find_layer"]

# Last convolutional stage of common torchvision families, by class name, so the core needs no
# torchvision import. Project models declare theirs in a ``gradcam_layer`` attribute.
_DEFAULT_LAYERS = {
    "ResNet": "layer4",
    "DenseNet": "features",
    "EfficientNet": "features",
    "MobileNetV2": "features",
    "MobileNetV3": "features",
    "ConvNeXt": "features",
    "VGG": "features",
    "RegNet": "trunk_output",
}


def default_gradcam_layer(model: nn.Module) -> str:
    """Dotted name of the layer GradCAM explains by default for ``model``."""
    model = unwrap(model)
    name = getattr(model, "gradcam_layer", None)
    if isinstance(name, str) and name:
        return name
    for cls in type(model).__mro__:
        if cls.__name__ in _DEFAULT_LAYERS:
            return _DEFAULT_LAYERS[cls.__name__]
    raise ValueError(
        f"GradCAM has no default layer for {type(model).__name__}; pass layer='<dotted name>' "
        f"(candidates: {_candidates(model)}) or set a `gradcam_layer` attribute on the model"
    )


def _candidates(model: nn.Module, most: int = 25) -> str:
    names = [n for n, m in model.named_modules() if n and (len(list(m.children())) > 0 or isinstance(m, nn.Conv2d))]
    shown = names[-most:]
    return (", ".join(shown) + (f" (and {len(names) - most} earlier)" if len(names) > most else "")) or "none"


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule of ``model`` at dotted path ``name``; a clear error listing candidates otherwise."""
    model = unwrap(model)
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise ValueError(
            f"{type(model).__name__} has no layer named {name!r}; candidate layers: {_candidates(model)}"
        )
    return modules[name]


@register_explainer("gradcam")
class GradCAM(Explainer):
    r"""GradCAM of the target class at one layer, differentiable for training.

    For the activation :math:`A \in \mathbb{R}^{K\times h\times w}` of ``layer`` and the target
    logit :math:`z_c`:

    .. math::
        \alpha_k = \frac{1}{hw}\sum_{i,j}\frac{\partial z_c}{\partial A_{kij}},\qquad
        M = \mathrm{ReLU}\Big(\sum_k \alpha_k A_k\Big)

    upsampled bilinearly (``align_corners=False``) to the input size unless ``upsample=False``.

    The gradient is taken with respect to the layer's activation only. With
    ``create_graph=False`` (a frozen teacher) the forward pass below the layer runs without
    autograd, so no graph is built there; with ``create_graph=True`` (the student) the map is
    differentiable in every parameter, and the second-order pass spans only the layers above
    ``layer`` (for a ResNet: pooling and the final linear layer).

    Parameters
    ----------
    layer : str, optional
        Dotted module name (``"layer4"``); default: see :func:`default_gradcam_layer`.
    upsample : bool
        Resize maps to the input's spatial size (default) or keep the layer's resolution.
    relu : bool
        Apply the ReLU of the GradCAM definition (default True).
    own_output : bool, optional
        What :math:`A` is when the model changes the layer's output in place after the layer ran
        (a residual ``out += identity`` after a torchvision block's ``bn2``, ``ReLU(inplace=True)``
        after a convolution, torchvision DenseNet's ``F.relu(features, inplace=True)``).
        ``True``: the layer's own output, as the layer returned it (as captum's
        ``LayerGradCam``; the model goes on with a copy). ``False``: the tensor as the layers above
        leave it, which is what they use (for DenseNet's ``features``: the post-ReLU features the
        classifier pools). ``None`` (default): ``False`` for a model's default layer (see
        :func:`default_gradcam_layer`); for a layer named with ``layer=``, an error if its output
        is changed in place, asking for one of the two.

    Returns maps of shape (B, 1, H, W).
    """

    name = "gradcam"
    # set on the instance only when chosen: the default stays out of vars(), so the identity of
    # a default GradCAM (frozen-store manifests) is what it was before the setting existed
    own_output: Optional[bool] = None

    def __init__(
        self,
        layer: Optional[str] = None,
        *,
        upsample: bool = True,
        relu: bool = True,
        own_output: Optional[bool] = None,
    ):
        if own_output is not None and not isinstance(own_output, bool):
            raise ValueError(f"GradCAM: own_output must be True, False or None, got {own_output!r}")
        self.layer = layer
        self.upsample = upsample
        self.relu = relu
        if own_output is not None:
            self.own_output = own_output

    def explain(self, model, x, target, *, create_graph):
        inner = unwrap(model)
        layer_name = self.layer or default_gradcam_layer(inner)
        module = find_layer(inner, layer_name)
        captured: list[torch.Tensor] = []
        versions: list[int] = []
        copy = bool(self.own_output)

        def hook(_mod, _inp, out):
            if captured:
                raise ValueError(f"GradCAM: layer {layer_name!r} ran twice in one forward pass; choose a layer used once")
            if not torch.is_tensor(out) or out.dim() != 4:
                shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                raise ValueError(
                    f"GradCAM: layer {layer_name!r} must output (B, K, h, w) activations, got {shape}; GradCAM needs a "
                    "convolutional feature map (explain a transformer with 'gradient', 'inputxgradient' or B-cos)"
                )
            if not create_graph or not out.requires_grad:
                # Start a fresh graph here: nothing below the layer is recorded. The model goes on
                # with a copy of the leaf, so that a model which continues in place (torchvision's
                # DenseNet: ``F.relu(features, inplace=True)``) changes the copy, as it changes the
                # layer's output in a student's pass, instead of failing on a leaf.
                torch.set_grad_enabled(True)
                leaf = out.detach().requires_grad_(True)
                passed = leaf.clone()
                own = leaf
            else:
                passed = out.clone() if copy else out
                own = out
            # own_output: the layer's output, the model goes on with a copy; otherwise the tensor
            # the model goes on with, as the layers above leave it (after any in-place change)
            captured.append(own if copy else passed)
            versions.append(passed._version)
            return passed

        handle = module.register_forward_hook(hook)
        grad_mode = torch.is_grad_enabled()
        try:
            if create_graph:
                logits = model(x)
            else:
                torch.set_grad_enabled(False)
                logits = model(x)
        finally:
            torch.set_grad_enabled(grad_mode)
            handle.remove()
        check_logits(logits, x, "GradCAM")
        if not captured:
            raise ValueError(f"GradCAM: layer {layer_name!r} was not used in the forward pass")
        act = captured[0]
        if self.own_output is None and self.layer is not None and act._version != versions[0]:
            raise ValueError(
                f"GradCAM: the model changes the output of layer {layer_name!r} in place after the layer ran "
                "(e.g. a residual `+=` or ReLU(inplace=True)), so its map is ambiguous: pass own_output=True "
                "for the map of the layer's own output (as captum's LayerGradCam) or own_output=False for the "
                "tensor as the layers above use it (config: explainer_kwargs.own_output)"
            )
        tgt = resolve_target(logits, target, "GradCAM")
        score = target_score(logits, tgt)
        (grad,) = torch.autograd.grad(score, act, create_graph=create_graph)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = (weights * act).sum(dim=1, keepdim=True)
        if self.relu:
            cam = F.relu(cam)
        if self.upsample and cam.shape[-2:] != x.shape[-2:]:
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return Explanation(logits, cam, tgt)
