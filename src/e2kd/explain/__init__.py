"""Explanations that a training loss can use: one forward pass gives logits and maps.

Every explainer has the signature ``explainer(model, x, target=None, *, create_graph=False)``
and returns an :class:`Explanation`. Build one by name with :func:`create`.
"""

from .base import Explainer, Explanation, available, create, register_explainer, resolve_target, target_score
from .gradcam import GradCAM, default_gradcam_layer, find_layer
from .gradient import Gradient, InputXGradient

__all__ = [
    "Explainer",
    "Explanation",
    "GradCAM",
    "Gradient",
    "InputXGradient",
    "available",
    "create",
    "default_gradcam_layer",
    "find_layer",
    "register_explainer",
    "resolve_target",
    "target_score",
]
