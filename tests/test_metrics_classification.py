"""Accuracy, agreement, explanation similarity and F1 against hand counts."""

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from e2kd.losses import explanation_cosine, explanation_loss
from e2kd.metrics import (
    ClassificationMeter,
    MultilabelF1Meter,
    agreement,
    explanation_similarity,
    multilabel_f1,
    topk_correct,
)

# Three samples, four classes. Rankings: s0: 2 > 1 > 0 > 3; s1: 0 > 3 > 2 > 1; s2: 3 > 2 > 1 > 0.
LOGITS = torch.tensor([[0.1, 0.5, 0.9, -1.0], [2.0, -2.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
LABELS = torch.tensor([2, 3, 0])
TEACHER = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])  # argmax 2, 3, 3


def test_topk_accuracy_by_hand():
    assert topk_correct(LOGITS, LABELS, 1).tolist() == [True, False, False]
    assert topk_correct(LOGITS, LABELS, 2).tolist() == [True, True, False]
    assert topk_correct(LOGITS, LABELS, 4).tolist() == [True, True, True]
    # k beyond the number of classes is clipped: every label is in the "top 5" of 4 classes.
    assert topk_correct(LOGITS, LABELS, 5).all()


def test_ties_are_ranked_as_argmax_ranks_them():
    """Equal logits: the lower class index ranks first, as argmax picks it, so top-1 is argmax
    and top-k is never below top-1 (topk's own order among ties is unspecified)."""
    z = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 7, [0.0] * 7])
    y = torch.tensor([0, 0, 6])
    assert topk_correct(z, y, 1).tolist() == [True, True, False] == (z.argmax(1) == y).tolist()
    assert topk_correct(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1]), 1).tolist() == [False]
    assert topk_correct(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1]), 2).tolist() == [True]
    # class 6 among seven equal logits ranks 7th: in the top 5 it is not, in the top 7 it is
    assert topk_correct(z, y, 5).tolist() == [True, True, False]
    assert topk_correct(z, y, 7).tolist() == [True, True, True]


def test_evaluate_top5_is_never_below_top1_with_constant_logits():
    from torch import nn

    from e2kd.train.evaluate import evaluate

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.zeros(x.shape[0], 10) + self.p

    batch = {"image": torch.rand(4, 1, 2, 2), "label": torch.tensor([0, 0, 1, 9])}
    res = evaluate(Constant(), [batch])
    # argmax is class 0 for every image; ties ranked by index: classes 0-4 are the top 5
    assert res["accuracy"] == 0.5 and res["top5"] == 0.75


def test_agreement_by_hand():
    # Student argmax 2, 0, 3; teacher argmax 2, 3, 3.
    assert agreement(LOGITS, TEACHER).tolist() == [True, False, True]


def test_explanation_similarity_is_one_minus_the_per_sample_loss():
    s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 2.0], [3.0, 4.0]]]])
    sim = explanation_similarity(s, t)
    # identical -> 1; (1,1,0,0)·(1,0,0,0) / (sqrt2 * 1) = 1/sqrt2; an all-zero map -> 0.
    assert sim.tolist() == pytest.approx([1.0, 1 / math.sqrt(2), 0.0], abs=1e-6)
    for b in range(3):
        assert float(sim[b]) == pytest.approx(1 - float(explanation_loss(s[b : b + 1], t[b : b + 1])), abs=1e-6)
    assert float(explanation_loss(s, t)) == pytest.approx(float((1 - explanation_cosine(s, t)).mean()))


def test_classification_meter_streams_batches_by_hand():
    meter = ClassificationMeter(topk=(1, 2))
    maps_s = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]], [[[0.0, 1.0]]]])
    maps_t = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    meter.update(LOGITS[:2], LABELS[:2], teacher_logits=TEACHER[:2], student_maps=maps_s[:2], teacher_maps=maps_t[:2])
    meter.update(LOGITS[2:], LABELS[2:], teacher_logits=TEACHER[2:], student_maps=maps_s[2:], teacher_maps=maps_t[2:])
    out = meter.compute()
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["top2"] == pytest.approx(2 / 3)
    assert out["agreement"] == pytest.approx(2 / 3)
    assert out["explanation_similarity"] == pytest.approx((1 + 1 / math.sqrt(2) + 0) / 3, abs=1e-6)
    assert out["count"] == 3


def test_classification_meter_reports_none_for_what_it_never_saw():
    meter = ClassificationMeter()
    meter.update(LOGITS, LABELS)
    out = meter.compute()
    assert out["agreement"] is None and out["explanation_similarity"] is None
    assert out["accuracy"] == pytest.approx(1 / 3) and out["top5"] == 1.0


# Targets and predictions for the F1 hand count (sigmoid > 0.5 <=> logit > 0; a logit of
# exactly 0 is NOT a positive prediction).
F1_TARGETS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
F1_LOGITS = torch.tensor([[2.0, 1.0, -1.0], [-1.0, 3.0, -2.0], [0.5, 0.0, -0.5]])
# predictions:            [1, 1, 0]          [0, 1, 0]          [1, 0, 0]
# class 0: TP 2 FP 0 FN 0 -> 1; class 1: TP 1 FP 1 FN 1 -> 0.5; class 2: TP 0 FP 0 FN 1 -> 0
# micro: TP 3 FP 1 FN 2 -> 6 / 9


def test_multilabel_f1_by_hand():
    out = multilabel_f1(F1_LOGITS, F1_TARGETS)
    assert out["f1_per_class"] == pytest.approx([1.0, 0.5, 0.0])
    assert out["f1"] == pytest.approx(6 / 9)
    assert out["f1_macro"] == pytest.approx(0.5)


def test_multilabel_f1_threshold_rule_and_streaming():
    # With threshold sigmoid > 0.8 (logit > 1.386): predictions [1,0,0], [0,1,0], [0,0,0].
    meter = MultilabelF1Meter(num_classes=3, threshold=0.8)
    meter.update(F1_LOGITS[:1], F1_TARGETS[:1])
    meter.update(F1_LOGITS[1:], F1_TARGETS[1:])
    out = meter.compute()
    # class 0: TP 1 FN 1 -> 2/3; class 1: TP 1 FN 1 -> 2/3; class 2: FN 1 -> 0; micro TP 2 FN 3 -> 4/7
    assert out["f1_per_class"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert out["f1"] == pytest.approx(4 / 7)
    assert out["count"] == 3


def test_multilabel_agreement_counts_exact_label_set_matches():
    meter = MultilabelF1Meter(num_classes=3)
    teacher = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 1.0], [1.0, -1.0, -1.0]])  # [1,1,0] [0,1,1] [1,0,0]
    meter.update(F1_LOGITS, F1_TARGETS, teacher_logits=teacher)
    assert meter.compute()["agreement"] == pytest.approx(2 / 3)


def test_class_never_present_nor_predicted_scores_zero():
    out = multilabel_f1(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.0]]))
    assert out["f1_per_class"] == [1.0, 0.0]
    assert out["f1"] == 1.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="multi-hot"):
        multilabel_f1(F1_LOGITS, torch.tensor([[2.0, 0, 0]] * 3))
    with pytest.raises(ValueError, match="integer"):
        topk_correct(LOGITS, LABELS.float())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        topk_correct(LOGITS, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="both student_maps and teacher_maps"):
        ClassificationMeter().update(LOGITS, LABELS, student_maps=torch.zeros(3, 1, 2, 2))
    with pytest.raises(ValueError, match="threshold"):
        MultilabelF1Meter(num_classes=3, threshold=1.5)


def test_all_reduced_without_a_process_group_is_a_copy():
    meter = ClassificationMeter()
    meter.update(LOGITS, LABELS)
    copy = meter.all_reduced()
    copy.update(LOGITS, LABELS)
    assert meter.compute()["count"] == 3 and copy.compute()["count"] == 6


def _ddp_worker(rank: int, world: int, store: str, outdir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = slice(0, 1) if rank == 0 else slice(1, 3)
        cls = ClassificationMeter(topk=(1, 2))
        cls.update(LOGITS[rows], LABELS[rows], teacher_logits=TEACHER[rows])
        f1 = MultilabelF1Meter(num_classes=3)
        f1.update(F1_LOGITS[rows], F1_TARGETS[rows])
        result = {"cls": cls.all_reduced().compute(), "f1": f1.all_reduced().compute(), "local": cls.compute()}
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def test_all_reduced_sums_over_ddp_ranks(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["cls"]["count"] == 3
        assert res["cls"]["accuracy"] == pytest.approx(1 / 3)
        assert res["cls"]["top2"] == pytest.approx(2 / 3)
        assert res["cls"]["agreement"] == pytest.approx(2 / 3)
        assert res["f1"]["f1"] == pytest.approx(6 / 9)
        assert res["f1"]["f1_per_class"] == pytest.approx([1.0, 0.5, 0.0])
        # The local meter is untouched by the reduction.
        assert res["local"]["count"] == (1 if rank == 0 else 2)
