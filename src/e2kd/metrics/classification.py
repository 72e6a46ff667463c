"""Classification metrics: top-k accuracy, teacher agreement, explanation similarity, F1.

The functions score one batch; the ``*Meter`` classes accumulate sums over a test set in
batches (and over DDP ranks with :meth:`~e2kd.metrics.StreamingMetric.all_reduced`).
"""

from __future__ import annotations

import math

from typing import Optional, Sequence

import torch

from ..losses import explanation_cosine
from ._streaming import StreamingMetric, ratio

__all__ = [
    "ClassificationMeter",
    "MultilabelF1Meter",
    "agreement",
    "class_rank",
    "explanation_similarity",
    "multilabel_f1",
    "multilabel_predictions",
    "topk_correct",
]


def _check_logits(logits: torch.Tensor, who: str) -> None:
    if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] == 0:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{who}: logits must be a non-empty tensor of shape (B, classes), got {shape}")


def _check_labels(labels: torch.Tensor, logits: torch.Tensor, who: str) -> torch.Tensor:
    if not torch.is_tensor(labels) or labels.is_floating_point():
        raise ValueError(
            f"{who}: labels must be an integer tensor of class indices of shape (B,); for multi-hot "
            "labels use MultilabelF1Meter / multilabel_f1"
        )
    labels = labels.reshape(-1)
    if labels.numel() != logits.shape[0]:
        raise ValueError(f"{who}: {labels.numel()} labels for {logits.shape[0]} rows of logits")
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"{who}: labels must lie in [0, {logits.shape[1] - 1}], got {int(labels.min())}..{int(labels.max())}")
    return labels.to(logits.device)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    r"""Whether the true class is among the ``k`` highest logits: top-k accuracy per sample.

    .. math:: \mathrm{acc}@k = \frac{1}{B}\sum_b [\,y_b \in \mathrm{top}_k(z_b)\,]

    (the standard ImageNet top-1 / top-5 accuracy). ``k`` larger than the number of classes is
    clipped to it, so top-5 of a 2-class problem is 1. Ties are ranked as ``argmax`` ranks them
    (the lower class index first), so top-1 is exactly ``argmax == y`` and top-k never falls
    below top-1: ``y`` is among the top ``k`` when fewer than ``k`` classes have a larger logit
    or an equal one at a lower index.

    Parameters
    ----------
    logits : Tensor, shape (B, C)
    labels : LongTensor, shape (B,)
    k : int

    Returns
    -------
    BoolTensor, shape (B,)
    """
    _check_logits(logits, "topk_correct")
    labels = _check_labels(labels, logits, "topk_correct")
    if k < 1:
        raise ValueError(f"topk_correct: k must be >= 1, got {k}")
    return class_rank(logits, labels) < k


def class_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of class ``labels[b]`` among the logits of sample ``b``, ties broken by the
    lower class index (as ``argmax`` breaks them): rank 0 is the argmax. Labels must be valid
    class indices."""
    z = logits.detach()
    zy = z.gather(1, labels[:, None])
    lower = torch.arange(z.shape[1], device=z.device)[None, :] < labels[:, None]
    return ((z > zy) | ((z == zy) & lower)).sum(dim=1)


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    r"""Top-1 agreement with the teacher (Parchami-Araghi et al., ECCV 2024; Stanton et al., 2021).

    .. math:: \mathrm{agr} = \frac{1}{B}\sum_b [\arg\max_c z^S_{bc} = \arg\max_c z^T_{bc}]

    Returns
    -------
    BoolTensor, shape (B,)
        Per sample: does the student's argmax equal the teacher's.
    """
    _check_logits(student_logits, "agreement")
    _check_logits(teacher_logits, "agreement")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"agreement: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; score the same batch with both models"
        )
    return student_logits.detach().argmax(dim=1) == teacher_logits.detach().to(student_logits.device).argmax(dim=1)


def explanation_similarity(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine between student and teacher explanations, ``1 - `` the per-sample e²KD loss.

    The definition is :func:`e2kd.losses.explanation_cosine` (Parchami-Araghi et al., ECCV
    2024, Eq. 2); the reported *mean explanation similarity* is the mean of these values over
    the test set. Maps must have the same shape (resize first, e.g. with
    :func:`e2kd.distiller.match_maps`).

    Returns
    -------
    Tensor, shape (B,)
    """
    return explanation_cosine(student_maps.detach(), teacher_maps.detach())


class ClassificationMeter(StreamingMetric):
    """Accumulates top-k accuracy, teacher agreement and explanation similarity over batches.

    ``update(logits, labels, teacher_logits=None, student_maps=None, teacher_maps=None)`` per
    batch; ``compute()`` returns a dict with ``accuracy`` (top-1), ``top{k}`` for every other
    ``k`` in ``topk``, ``agreement`` and ``explanation_similarity`` (None when never given),
    and ``count``. Definitions: :func:`topk_correct`, :func:`agreement`,
    :func:`explanation_similarity`; each is a mean over samples.

    Parameters
    ----------
    topk : sequence of int
        The k of the top-k accuracies (default (1, 5)).
    """

    def __init__(self, *, topk: Sequence[int] = (1, 5)):
        super().__init__()
        self.topk = tuple(int(k) for k in topk)
        if not self.topk or any(k < 1 for k in self.topk):
            raise ValueError(f"ClassificationMeter: topk must be positive integers, got {topk}")
        for k in self.topk:
            self._register(f"correct@{k}")
        for name in ("count", "agree", "agree_count", "similarity", "similarity_count"):
            self._register(name)

    def update(
        self,
        logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        teacher_logits: Optional[torch.Tensor] = None,
        student_maps: Optional[torch.Tensor] = None,
        teacher_maps: Optional[torch.Tensor] = None,
    ) -> None:
        """Add one batch: logits (B, C), labels (B,), teacher logits (B, C), maps (B, K, H, W)."""
        _check_logits(logits, "ClassificationMeter.update")
        if labels is not None:
            for k in self.topk:
                self._add(f"correct@{k}", topk_correct(logits, labels, k).sum())
            self._add("count", logits.shape[0])
        if teacher_logits is not None:
            self._add("agree", agreement(logits, teacher_logits).sum())
            self._add("agree_count", logits.shape[0])
        if (student_maps is None) != (teacher_maps is None):
            raise ValueError("ClassificationMeter.update: pass both student_maps and teacher_maps, or neither")
        if student_maps is not None:
            if student_maps.shape[0] != logits.shape[0]:
                raise ValueError(f"ClassificationMeter.update: {student_maps.shape[0]} maps for {logits.shape[0]} logits")
            self._add("similarity", explanation_similarity(student_maps, teacher_maps).sum())
            self._add("similarity_count", student_maps.shape[0])

    def compute(self) -> dict:
        s = self._state
        out = {}
        for k in self.topk:
            out["accuracy" if k == 1 else f"top{k}"] = ratio(s[f"correct@{k}"], s["count"])
        out["agreement"] = ratio(s["agree"], s["agree_count"])
        out["explanation_similarity"] = ratio(s["similarity"], s["similarity_count"])
        out["count"] = int(s["count"])
        return out


def multilabel_predictions(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    r"""The thresholding rule of the multi-label metrics: class ``c`` is predicted present iff
    :math:`\sigma(z_c) > \tau` (default :math:`\tau = 0.5`, i.e. a positive logit).

    Returns
    -------
    BoolTensor, shape (B, C)
    """
    _check_logits(logits, "multilabel_predictions")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"multilabel threshold must lie in (0, 1), got {threshold}")
    # sigma(z) > tau  <=>  z > log(tau / (1 - tau)): compared on the logit, so a logit just above
    # the cut is not rounded onto it by float32's sigmoid (sigma(5e-8) == 0.5 in float32).
    return logits.detach().float() > math.log(threshold / (1.0 - threshold))


def _check_multihot(targets: torch.Tensor, logits: torch.Tensor, who: str) -> torch.Tensor:
    if not torch.is_tensor(targets) or targets.shape != logits.shape:
        shape = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise ValueError(f"{who}: targets must be a multi-hot tensor of shape {tuple(logits.shape)}, got {shape}")
    t = targets.detach().to(logits.device)
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{who}: targets must be multi-hot (0/1 entries only)")
    return t.bool()


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.zeros_like(den))


def multilabel_f1(logits: torch.Tensor, targets: torch.Tensor, *, threshold: float = 0.5) -> dict:
    """Multi-label F1 of one batch; see :class:`MultilabelF1Meter` for the definitions."""
    meter = MultilabelF1Meter(num_classes=logits.shape[1], threshold=threshold)
    meter.update(logits, targets)
    return meter.compute()


class MultilabelF1Meter(StreamingMetric):
    r"""Multi-label F1, micro-averaged and per class, accumulated over batches.

    Predictions follow :func:`multilabel_predictions` (:math:`\sigma(z_c) > \tau`). With
    true/false positives and false negatives counted over all (sample, class) pairs,

    .. math::
        F_1^{micro} = \frac{2\,TP}{2\,TP + FP + FN},\qquad
        F_{1,c} = \frac{2\,TP_c}{2\,TP_c + FP_c + FN_c},\qquad
        F_1^{macro} = \frac{1}{C}\sum_c F_{1,c}

    (the F1 of the Pascal VOC experiments of Parchami-Araghi et al., ECCV 2024, Table 4, and
    of Rao et al., ICCV 2023). A class never present and never predicted has ``0/0``; it gets
    F1 = 0, as scikit-learn's default ``zero_division``. With ``teacher_logits``, also
    ``agreement``: the share of samples whose predicted label sets match the teacher's exactly.

    Parameters
    ----------
    num_classes : int
    threshold : float
        :math:`\tau`, on the sigmoid probability.
    """

    def __init__(self, *, num_classes: int, threshold: float = 0.5):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MultilabelF1Meter: num_classes must be >= 1, got {num_classes}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"MultilabelF1Meter: threshold must lie in (0, 1), got {threshold}")
        self.num_classes = num_classes
        self.threshold = threshold
        for name in ("tp", "fp", "fn"):
            self._register(name, (num_classes,))
        for name in ("count", "agree", "agree_count"):
            self._register(name)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, *, teacher_logits: Optional[torch.Tensor] = None) -> None:
        """Add one batch: logits (B, C), multi-hot targets (B, C), optionally teacher logits (B, C)."""
        _check_logits(logits, "MultilabelF1Meter.update")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"MultilabelF1Meter.update: expected {self.num_classes} classes, got logits {tuple(logits.shape)}")
        t = _check_multihot(targets, logits, "MultilabelF1Meter.update")
        p = multilabel_predictions(logits, self.threshold)
        self._add("tp", (p & t).sum(dim=0))
        self._add("fp", (p & ~t).sum(dim=0))
        self._add("fn", (~p & t).sum(dim=0))
        self._add("count", logits.shape[0])
        if teacher_logits is not None:
            if teacher_logits.shape != logits.shape:
                raise ValueError(
                    f"MultilabelF1Meter.update: teacher logits {tuple(teacher_logits.shape)} and student logits "
                    f"{tuple(logits.shape)} differ in shape"
                )
            q = multilabel_predictions(teacher_logits.to(logits.device), self.threshold)
            self._add("agree", (p == q).all(dim=1).sum())
            self._add("agree_count", logits.shape[0])

    def compute(self) -> dict:
        s = self._state
        per_class = _f1(s["tp"], s["fp"], s["fn"])
        micro = _f1(s["tp"].sum(), s["fp"].sum(), s["fn"].sum())
        return {
            "f1": float(micro),
            "f1_macro": float(per_class.mean()),
            "f1_per_class": [float(v) for v in per_class],
            "agreement": ratio(s["agree"], s["agree_count"]),
            "count": int(s["count"]),
        }
