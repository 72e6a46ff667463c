"""Group robustness (desideratum 2): accuracy and teacher agreement per group, in and out of
distribution, and the worst group.

On Waterbirds-style data (Sagawa et al., ICLR 2020) a group is a (class, background) pair;
the distillation data hold only some groups (in-distribution, ID) and the test asks about all
of them, so out-of-distribution (OOD) accuracy and agreement show whether a student learned
the teacher's features or the shortcut (Parchami-Araghi et al., ECCV 2024, Sec. 4.2).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._streaming import StreamingMetric, ratio
from .classification import agreement

__all__ = ["GroupRobustnessMeter", "group_robustness"]


class GroupRobustnessMeter(StreamingMetric):
    r"""Accuracy and agreement per group, ID vs OOD, and worst group, accumulated over batches.

    For group :math:`g` with samples :math:`S_g`,
    :math:`\mathrm{acc}_g = \frac{1}{|S_g|}\sum_{b\in S_g}[\arg\max z_b = y_b]` and likewise the
    agreement :math:`\mathrm{agr}_g` with the teacher's argmax. ID and OOD figures pool the
    samples of the ID groups and of all other groups (sample-weighted means, as the accuracy
    of an ID or OOD test split would be). The worst group is the group with the lowest
    accuracy among those with samples (ties: the lowest index); ``mean_group_accuracy`` is
    the unweighted mean over those groups.

    ``compute()`` returns ``accuracy``, ``agreement``, ``id_accuracy``, ``ood_accuracy``,
    ``id_agreement``, ``ood_agreement``, ``worst_group`` (name), ``worst_group_accuracy``,
    ``worst_group_agreement`` (lowest agreement over groups), ``mean_group_accuracy`` and
    ``groups`` ({name: {count, accuracy, agreement, in_distribution}}). Figures without
    samples (or without teacher logits, for agreement) are None.

    Parameters
    ----------
    num_groups : int
    id_groups : sequence of int
        Indices of the in-distribution groups.
    group_names : sequence of str, optional
        Default ``"0"``, ``"1"``, ...
    """

    def __init__(self, *, num_groups: int, id_groups: Sequence[int], group_names: Optional[Sequence[str]] = None):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"GroupRobustnessMeter: num_groups must be >= 1, got {num_groups}")
        ids = sorted({int(g) for g in id_groups})
        if any(g < 0 or g >= num_groups for g in ids):
            raise ValueError(f"GroupRobustnessMeter: id_groups {ids} must lie in [0, {num_groups - 1}]")
        names = [str(i) for i in range(num_groups)] if group_names is None else [str(n) for n in group_names]
        if len(names) != num_groups or len(set(names)) != num_groups:
            raise ValueError(f"GroupRobustnessMeter: need {num_groups} distinct group names, got {list(names)}")
        self.num_groups = num_groups
        self.id_groups = ids
        self.group_names = names
        for name in ("count", "correct", "agree", "agree_count"):
            self._register(name, (num_groups,))

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        *,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> None:
        """Add one batch: logits (B, C), labels (B,), groups (B,), teacher logits (B, C)."""
        if not torch.is_tensor(logits) or logits.dim() != 2:
            raise ValueError("GroupRobustnessMeter.update: logits must have shape (B, C)")
        n = logits.shape[0]
        labels = torch.as_tensor(labels).reshape(-1).to(logits.device)
        groups = torch.as_tensor(groups).reshape(-1).to(logits.device)
        if labels.numel() != n or groups.numel() != n:
            raise ValueError(f"GroupRobustnessMeter.update: {n} logits, {labels.numel()} labels, {groups.numel()} groups")
        if groups.is_floating_point() or (n and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups)):
            raise ValueError(f"GroupRobustnessMeter.update: groups must be integers in [0, {self.num_groups - 1}]")
        groups = groups.long()
        correct = (logits.detach().argmax(dim=1) == labels).double()
        ones = torch.ones(n, dtype=torch.float64, device=logits.device)
        zeros = torch.zeros(self.num_groups, dtype=torch.float64, device=logits.device)
        self._add("count", zeros.index_add(0, groups, ones))
        self._add("correct", zeros.index_add(0, groups, correct))
        if teacher_logits is not None:
            self._add("agree", zeros.index_add(0, groups, agreement(logits, teacher_logits).double()))
            self._add("agree_count", zeros.index_add(0, groups, ones))

    def compute(self) -> dict:
        s = self._state
        is_id = torch.zeros(self.num_groups, dtype=torch.bool)
        is_id[self.id_groups] = True
        groups = {}
        for g, name in enumerate(self.group_names):
            groups[name] = {
                "count": int(s["count"][g]),
                "accuracy": ratio(s["correct"][g], s["count"][g]),
                "agreement": ratio(s["agree"][g], s["agree_count"][g]),
                "in_distribution": bool(is_id[g]),
            }
        seen = [g for g in range(self.num_groups) if s["count"][g] > 0]
        accs = {g: float(s["correct"][g] / s["count"][g]) for g in seen}
        agrs = {g: float(s["agree"][g] / s["agree_count"][g]) for g in seen if s["agree_count"][g] > 0}
        worst = min(seen, key=lambda g: (accs[g], g)) if seen else None
        return {
            "accuracy": ratio(s["correct"].sum(), s["count"].sum()),
            "agreement": ratio(s["agree"].sum(), s["agree_count"].sum()),
            "id_accuracy": ratio(s["correct"][is_id].sum(), s["count"][is_id].sum()),
            "ood_accuracy": ratio(s["correct"][~is_id].sum(), s["count"][~is_id].sum()),
            "id_agreement": ratio(s["agree"][is_id].sum(), s["agree_count"][is_id].sum()),
            "ood_agreement": ratio(s["agree"][~is_id].sum(), s["agree_count"][~is_id].sum()),
            "worst_group": None if worst is None else self.group_names[worst],
            "worst_group_accuracy": None if worst is None else accs[worst],
            "worst_group_agreement": min(agrs.values()) if agrs else None,
            "mean_group_accuracy": sum(accs.values()) / len(accs) if accs else None,
            "groups": groups,
        }


def group_robustness(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    *,
    num_groups: int,
    id_groups: Sequence[int],
    teacher_logits: Optional[torch.Tensor] = None,
    group_names: Optional[Sequence[str]] = None,
) -> dict:
    """Group robustness of one set of predictions; see :class:`GroupRobustnessMeter`."""
    meter = GroupRobustnessMeter(num_groups=num_groups, id_groups=id_groups, group_names=group_names)
    meter.update(logits, labels, groups, teacher_logits=teacher_logits)
    return meter.compute()
