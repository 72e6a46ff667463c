"""e2kd: explanation-enhanced knowledge distillation (Parchami-Araghi et al., ECCV 2024).

The core API (losses, explainers, :class:`Distiller`) depends on torch alone and fits any
training loop::

    distiller = e2kd.Distiller(teacher, student, explainer="gradcam", lam=1.0, temperature=1.0)
    out = distiller(images)
    out["loss"].backward()  # or backward(inputs=trained parameters): see Distiller
"""

from . import explain as explainers
from .distiller import Distiller
from .explain import Explainer, Explanation, GradCAM, Gradient, InputXGradient
from .losses import explanation_loss, kd_loss, multilabel_kd_loss

__version__ = "0.1.0"

__all__ = [
    "Distiller",
    "Explainer",
    "Explanation",
    "GradCAM",
    "Gradient",
    "InputXGradient",
    "explainers",
    "explanation_loss",
    "kd_loss",
    "multilabel_kd_loss",
]


def __getattr__(name):
    # B-cos names resolve lazily so that `import e2kd` stays light.
    if name in ("BcosExplainer", "bcos"):
        import importlib

        mod = importlib.import_module("e2kd.bcos")
        return mod if name == "bcos" else getattr(mod, name)
    raise AttributeError(f"module 'e2kd' has no attribute {name!r}")
