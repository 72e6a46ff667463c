"""Evaluation of a model (and its agreement with a teacher) over a whole split.

Every metric is accumulated as sums and counts, reduced over DDP ranks, then divided, so N
processes report what one process reports. Metrics (fractions in [0, 1]):

* ``accuracy`` / ``top5``: the label is the top-1 / among the top-5 logits (single-label;
  over the labelled images: a label of -1 means "no label", and with no labelled image both
  are absent and ``num_labelled`` says 0);
  for multi-label data ``accuracy`` is the share of images whose top-1 class is present and
  ``f1`` the micro-F1 of ``logit > 0``.
* ``agreement``: the student's top-1 equals the teacher's top-1 (``teacher_accuracy`` too).
* ``explanation_similarity``: mean over images of cos(E(S, x, ŷ_T), E(T, x, ŷ_T))
  (:func:`e2kd.losses.explanation_cosine`).
* per group (``group/<name>/accuracy``, ``.../agreement``, ``.../teacher_accuracy``) and
  ``worst_group_accuracy`` (``teacher_worst_group_accuracy``) when the dataset has groups;
  ``teacher_f1`` beside ``f1`` for multi-label data, so student and teacher read side by side.

* ``epg`` / ``iou`` (and ``teacher_epg`` / ``teacher_iou``) when a ``localisation`` explainer
  is given and batches carry masks: the energy pointing game and IoU of the explanation of
  every (image, true or present class) pair (:class:`e2kd.metrics.LocalisationMeter`).

Further metrics plug in through ``extra``: objects with ``update(batch, outputs)`` and
``compute(reduce) -> dict``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..distiller import match_maps
from ..explain.base import Explainer
from ..losses import explanation_cosine
from ..metrics.classification import class_rank
from .distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate"]


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate(
    model: nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    *,
    teacher: Optional[nn.Module] = None,
    explainers: Optional[Sequence[Explainer]] = None,
    multilabel: bool = False,
    group_names: Optional[Sequence[str]] = None,
    info: DistInfo = DistInfo(),
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    localisation: Optional[Explainer] = None,
    localisation_kwargs: Optional[dict] = None,
    extra: Sequence[object] = (),
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> Dict[str, float]:
    """Metrics of ``model`` on ``batches`` (dicts with ``image``, ``label``, optional ``group``).

    Parameters
    ----------
    model : the evaluated network (student or teacher), in eval mode during the call
    batches : iterable of batch dicts, already sharded for this rank; batches of a frozen
        store (:class:`e2kd.frozen.FrozenDataset`) carry the teacher's ``teacher_logits``
        (B, C) and ``teacher_maps`` (B, K, h, w), used when ``teacher`` is None
    teacher : optional; enables ``agreement`` (and, with ``explainers``, the similarity)
    explainers : (teacher_explainer, student_explainer) or None
    """
    was_training = model.training
    model.eval()
    sums: Dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    device = info.device
    meters = {}
    if localisation is not None:
        from ..metrics import LocalisationMeter

        meters = {"": LocalisationMeter(**(localisation_kwargs or {}))}
        if teacher is not None:
            meters["teacher_"] = LocalisationMeter(**(localisation_kwargs or {}))
    it = progress(batches) if progress is not None else batches
    try:
        for batch in it:
            x = batch["image"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["label"].to(device)
            out: Dict[str, torch.Tensor] = {}
            with _autocast(device, amp_dtype):
                stored = teacher is None and batch.get("teacher_logits") is not None
                if (teacher is not None or (stored and batch.get("teacher_maps") is not None)) and explainers is not None:
                    t_exp, s_exp = explainers
                    if stored:
                        t_logits = batch["teacher_logits"].to(device).float()
                        t_maps = batch["teacher_maps"].to(device).float()
                        se = s_exp(model, x, t_logits.argmax(dim=1), create_graph=False)
                    else:
                        te = t_exp(teacher, x, None, create_graph=False)
                        se = s_exp(model, x, te.target, create_graph=False)
                        t_logits, t_maps = te.logits.float(), te.maps.float()
                    logits = se.logits.float()
                    s_maps = match_maps(se.maps.float(), t_maps)
                    b = x.shape[0]
                    add("_sim_sum", explanation_cosine(s_maps, t_maps).sum().item())
                    out.update(student_maps=s_maps, teacher_maps=t_maps)
                else:
                    with torch.no_grad():
                        logits = model(x).float()
                        if teacher is not None:
                            t_logits = teacher(x).float()
                        elif stored:
                            t_logits = batch["teacher_logits"].to(device).float()
                        else:
                            t_logits = None
            b = x.shape[0]
            add("_n", b)
            top1 = logits.argmax(dim=1)
            if multilabel:
                present = y.float() > 0.5
                add("_acc", present.gather(1, top1[:, None]).float().sum().item())
                pred = logits > 0
                add("_tp", (pred & present).sum().item())
                add("_fp", (pred & ~present).sum().item())
                add("_fn", (~pred & present).sum().item())
                correct = present.gather(1, top1[:, None]).squeeze(1).float()
            else:
                # a label of -1 means "no label" (e.g. tuxobjects): such images never count as
                # correct and are left out of the accuracies' denominators
                correct = (top1 == y).float()
                add("_nlab", (y >= 0).sum().item())
                add("_acc", correct.sum().item())
                # ranked as argmax ranks ties, so top-5 never falls below top-1
                labelled = y >= 0
                rank = class_rank(logits, y.clamp(min=0))
                add("_top5", ((rank < 5) & labelled).sum().item())
            agree = None
            if t_logits is not None:
                t_top1 = t_logits.argmax(dim=1)
                agree = (top1 == t_top1).float()
                add("_agr", agree.sum().item())
                if multilabel:
                    t_correct = present.gather(1, t_top1[:, None]).squeeze(1).float()
                    t_pred = t_logits > 0
                    add("_ttp", (t_pred & present).sum().item())
                    add("_tfp", (t_pred & ~present).sum().item())
                    add("_tfn", (~t_pred & present).sum().item())
                else:
                    t_correct = (t_top1 == y).float()
                add("_tacc", t_correct.sum().item())
            if group_names is not None and "group" in batch:
                g = batch["group"].to(device)
                for gi in range(len(group_names)):
                    sel = g == gi
                    add(f"_g{gi}_n", sel.sum().item())
                    if not multilabel:
                        add(f"_g{gi}_nlab", (sel & (y >= 0)).sum().item())
                    add(f"_g{gi}_acc", correct[sel].sum().item())
                    if agree is not None:
                        add(f"_g{gi}_agr", agree[sel].sum().item())
                        add(f"_g{gi}_tacc", t_correct[sel].sum().item())
            if meters and "mask" in batch:
                from ..metrics import explain_present_classes

                if not multilabel and bool((y < 0).any()):
                    raise ValueError(
                        "localisation scores explain each image's labelled class, but this evaluation split has "
                        "unlabelled images (label -1); set eval.localisation=false for it"
                    )

                mask = batch["mask"].to(device)
                for prefix, meter in meters.items():
                    who = model if prefix == "" else teacher
                    pairs = explain_present_classes(who, localisation, x, y, mask)
                    meter.update(pairs["attributions"].float(), pairs["masks"])
            out.update(logits=logits, teacher_logits=t_logits)
            for metric in extra:
                metric.update(batch, out)
    finally:
        model.train(was_training)

    keys = sorted(set(sums) | {"_n"})
    sums = all_reduce_sum({k: sums.get(k, 0.0) for k in keys}, info)
    n = sums["_n"]
    if n == 0:
        raise ValueError("evaluation saw no images: the evaluation split is empty")
    # single-label: accuracies over the labelled images only, and absent when none is labelled
    n_lab = n if multilabel else sums["_nlab"]
    res: Dict[str, float] = {"num_images": int(n)}
    if n_lab > 0:
        res["accuracy"] = sums["_acc"] / n_lab
    if multilabel:
        tp, fp, fn = sums["_tp"], sums["_fp"], sums["_fn"]
        res["f1"] = 2 * tp / max(2 * tp + fp + fn, 1.0)
    else:
        if n_lab > 0:
            res["top5"] = sums["_top5"] / n_lab
        if n_lab < n:
            res["num_labelled"] = int(n_lab)
    if "_agr" in sums:
        res["agreement"] = sums["_agr"] / n
        if n_lab > 0:
            res["teacher_accuracy"] = sums["_tacc"] / n_lab
        if multilabel:
            ttp, tfp, tfn = sums["_ttp"], sums["_tfp"], sums["_tfn"]
            res["teacher_f1"] = 2 * ttp / max(2 * ttp + tfp + tfn, 1.0)
    if "_sim_sum" in sums:
        res["explanation_similarity"] = sums["_sim_sum"] / n
    if group_names is not None and any(k.startswith("_g") for k in sums):
        worst = t_worst = None
        for gi, name in enumerate(group_names):
            gn = sums.get(f"_g{gi}_n", 0.0)
            if gn == 0:
                continue
            gl = sums.get(f"_g{gi}_nlab", gn)  # labelled images of the group
            res[f"group/{name}/n"] = int(gn)
            if f"_g{gi}_agr" in sums:
                res[f"group/{name}/agreement"] = sums[f"_g{gi}_agr"] / gn
            if gl == 0:
                continue
            acc = sums[f"_g{gi}_acc"] / gl
            res[f"group/{name}/accuracy"] = acc
            if f"_g{gi}_agr" in sums:
                t_acc = sums[f"_g{gi}_tacc"] / gl
                res[f"group/{name}/teacher_accuracy"] = t_acc
                t_worst = t_acc if t_worst is None else min(t_worst, t_acc)
            worst = acc if worst is None else min(worst, acc)
        if worst is not None:
            res["worst_group_accuracy"] = worst
        if t_worst is not None:
            res["teacher_worst_group_accuracy"] = t_worst
    for prefix, meter in meters.items():
        loc = (meter.all_reduced() if info.enabled else meter).compute()
        if loc["count"]:
            res[f"{prefix}epg"], res[f"{prefix}iou"] = loc["epg"], loc["iou"]
    for metric in extra:
        res.update(metric.compute(lambda d: all_reduce_sum(d, info)))
    return res
