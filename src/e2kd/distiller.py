"""The e²KD module: one ``forward`` gives the distillation loss for any training loop."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .explain.base import Explainer, TargetOutOfRange, check_logits, create
from .losses import explanation_loss, kd_loss, multilabel_kd_loss

__all__ = ["Distiller"]


def _real(value, name: str) -> float:
    """``value`` as a float; a clear error for booleans and for what is not a number."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


ExplainerSpec = Union[str, Explainer, Sequence[Union[str, Explainer]]]


def _as_explainer(spec) -> Explainer:
    if isinstance(spec, Explainer):
        return spec
    if isinstance(spec, str):
        return create(spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        return create(spec.pop("name"), **spec)
    raise ValueError(f"explainer must be a name, an Explainer or a dict with 'name', got {type(spec).__name__}")


def match_maps(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """Resize the student's maps to the teacher's spatial size (bilinear, ``align_corners=False``;
    antialiased when shrinking, as ``e2kd freeze --map-size`` shrinks the teacher's stored maps,
    so that equal maps stay equal).

    The teacher's map is the target, so it is never resampled; channel counts must agree.
    """
    if student_maps.shape[:2] != teacher_maps.shape[:2]:
        raise ValueError(
            f"student maps {tuple(student_maps.shape)} and teacher maps {tuple(teacher_maps.shape)} differ in "
            "batch size or channels; use explainers that produce the same kind of map for both models"
        )
    if student_maps.shape[2:] != teacher_maps.shape[2:]:
        shrink = any(s > t for s, t in zip(student_maps.shape[2:], teacher_maps.shape[2:]))
        student_maps = F.interpolate(
            student_maps, size=teacher_maps.shape[2:], mode="bilinear", align_corners=False, antialias=shrink
        )
    return student_maps


class Distiller(nn.Module):
    r"""Explanation-enhanced knowledge distillation (Parchami-Araghi et al., ECCV 2024).

    ``loss = kd_loss(z_S, z_T; T) + lam · explanation_loss(E(S, x, ŷ_T), E(T, x, ŷ_T))`` where
    ``ŷ_T`` is the teacher's top-1 class; see :func:`e2kd.kd_loss` and
    :func:`e2kd.explanation_loss` for the formulas.

    The teacher is frozen (eval mode, ``requires_grad=False``) and hidden from
    :meth:`parameters` and :meth:`state_dict`, so an optimiser or checkpoint built from this
    module sees the student alone; ``.to()``/``.cuda()`` still move both. The student may be
    wrapped in DistributedDataParallel: inside, the explanation gradient is taken with
    ``torch.autograd.grad(create_graph=True)``; call one ordinary ``loss.backward()`` outside.
    With an explainer that differentiates the student's input (``"bcos"``, ``"gradient"``,
    ``"inputxgradient"``) the input is a leaf that requires grad, and a plain ``backward()``
    also computes the loss's gradient with respect to it, which no one uses;
    ``loss.backward(inputs=[p for p in student.parameters() if p.requires_grad])`` gives the
    same parameter gradients without it (the trainer does this; an input gradient of the first
    convolution less, about 1 % of a B-cos e²KD step on the CPU, ``docs/results/perf.md``).

    Parameters
    ----------
    teacher : nn.Module or None
        ``None`` for frozen explanations: then every ``forward`` must get ``teacher_logits``
        (and ``teacher_maps`` on steps that compute the explanation term).
    student : nn.Module
    explainer : str, Explainer, dict, or a (teacher, student) pair of these
        How both models are explained (default ``"gradcam"``).
    lam : float
        Weight λ of the explanation term; ``0`` is plain KD and computes no explanation.
    temperature : float
        KD temperature T.
    explain_every : int
        Compute the explanation term on every K-th call only (the other calls are plain KD).
    multilabel : bool
        Use the per-class Bernoulli KD loss (sigmoid teachers).

    Forward returns a dict: ``loss``, ``kd_loss``, ``exp_loss`` (undetached, so callers may
    re-weight them; log them with ``.item()``), ``student_logits``,
    ``teacher_logits``, ``student_maps`` and ``teacher_maps`` (``None`` when not computed) and
    ``agreement`` (share of the batch whose student and teacher argmax agree).
    """

    def __init__(
        self,
        teacher: Optional[nn.Module],
        student: nn.Module,
        *,
        explainer: ExplainerSpec = "gradcam",
        lam: float = 1.0,
        temperature: float = 1.0,
        explain_every: int = 1,
        multilabel: bool = False,
    ):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise ValueError(f"student must be an nn.Module, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        lam_value, t_value = _real(lam, "lam"), _real(temperature, "temperature")
        if not math.isfinite(lam_value) or lam_value < 0:  # NaN fails here too
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if not math.isfinite(t_value) or t_value <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        every = _real(explain_every, "explain_every")
        if not math.isfinite(every) or every != int(every) or every < 1:
            raise ValueError(f"explain_every must be a whole number >= 1, got {explain_every!r}")
        if teacher is not None:
            shared = {id(q) for q in teacher.parameters()} & {id(q) for q in student.parameters()}
            if shared:
                raise ValueError(
                    f"teacher and student share {len(shared)} parameter tensor(s); the Distiller freezes the "
                    "teacher's parameters, which would freeze the student's too. Distil into a separate copy "
                    "(e.g. copy.deepcopy(teacher)) or a separately built student"
                )
        self.student = student
        # Kept outside the module registry: no parameters(), no state_dict(), no DDP.
        self.__dict__["_teacher"] = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        if isinstance(explainer, (tuple, list)):
            if len(explainer) != 2:
                raise ValueError("an explainer pair must be (teacher_explainer, student_explainer)")
            self.teacher_explainer, self.student_explainer = (_as_explainer(e) for e in explainer)
        else:
            self.student_explainer = _as_explainer(explainer)
            self.teacher_explainer = self.student_explainer
        self.lam = lam_value
        self.temperature = t_value
        self.explain_every = int(every)
        self.multilabel = bool(multilabel)
        self.calls = 0

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self.__dict__["_teacher"]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def explains_this_step(self) -> bool:
        """Whether the next ``forward`` computes the explanation term."""
        return self.lam > 0 and self.calls % self.explain_every == 0

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor, explain: bool = True):
        """The teacher's logits and (if ``explain``) detached maps for its top-1 class."""
        if self.teacher is None:
            raise ValueError("this Distiller has no teacher; pass teacher_logits (and teacher_maps) to forward")
        if explain:
            out = self.teacher_explainer(self.teacher, x, None, create_graph=False)
            return out.logits, out.maps
        logits = self.teacher(x)
        check_logits(logits, x, "teacher")
        return logits, None

    def forward(
        self,
        x: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
        teacher_maps: Optional[torch.Tensor] = None,
    ) -> dict:
        explain = self.explains_this_step()
        self.calls += 1
        if teacher_logits is None:
            if teacher_maps is not None:
                raise ValueError("teacher_maps were given without teacher_logits; pass both (frozen explanations)")
            teacher_logits, teacher_maps = self.teacher_outputs(x, explain)
        else:
            if explain and teacher_maps is None:
                raise ValueError("teacher_logits were given without teacher_maps on a step that explains; pass both")
            if teacher_logits.shape[0] != x.shape[0]:
                raise ValueError(
                    f"batch-size mismatch: {teacher_logits.shape[0]} teacher logits for {x.shape[0]} images"
                )
            teacher_logits = teacher_logits.detach().to(x.device)
            if teacher_maps is not None:
                teacher_maps = teacher_maps.detach().to(device=x.device)
        if teacher_logits.dim() != 2:
            raise ValueError(f"teacher logits must have shape (B, classes), got {tuple(teacher_logits.shape)}")
        target = teacher_logits.argmax(dim=1)

        student_maps = None
        if explain:
            grad = torch.is_grad_enabled()
            try:
                out = self.student_explainer(self.student, x, target, create_graph=grad)
            except TargetOutOfRange as err:
                raise ValueError(
                    f"teacher has {teacher_logits.shape[-1]} classes but the student has {err.classes}; "
                    f"build the student with num_classes={teacher_logits.shape[-1]}"
                ) from None
            student_logits, student_maps = out.logits, out.maps
            if not grad:
                student_logits = student_logits.detach()
        else:
            student_logits = self.student(x)
            check_logits(student_logits, x, "student")
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(
                f"teacher has {teacher_logits.shape[-1]} classes but student has {student_logits.shape[-1]}; "
                f"build the student with num_classes={teacher_logits.shape[-1]}"
            )
        kd_fn = multilabel_kd_loss if self.multilabel else kd_loss
        kd = kd_fn(student_logits, teacher_logits, self.temperature)
        if explain:
            teacher_maps = teacher_maps.to(student_maps.dtype)
            exp = explanation_loss(match_maps(student_maps, teacher_maps), teacher_maps)
            loss = kd + self.lam * exp
        else:
            exp = kd.new_zeros(())
            loss = kd
        agreement = (student_logits.detach().argmax(dim=1) == target).float().mean()
        return {
            "loss": loss,
            "kd_loss": kd,
            "exp_loss": exp,
            "student_logits": student_logits,
            "teacher_logits": teacher_logits,
            "student_maps": student_maps,
            "teacher_maps": teacher_maps if explain else None,
            "agreement": agreement,
        }

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, temperature={self.temperature}, explain_every={self.explain_every}, "
            f"multilabel={self.multilabel}, teacher={type(self.teacher).__name__ if self.teacher is not None else None}, "
            f"explainer={self.teacher_explainer!r}/{self.student_explainer!r}"
        )
