"""Group robustness against a hand count."""

import pytest
import torch

from e2kd.metrics import GroupRobustnessMeter, group_robustness


def onehot_logits(classes):
    return torch.nn.functional.one_hot(torch.tensor(classes), 2).float()


# sample:         0  1  2  3  4  5
PRED = onehot_logits([0, 0, 1, 0, 0, 1])
LABELS = torch.tensor([0, 0, 0, 0, 1, 1])
GROUPS = torch.tensor([0, 0, 1, 1, 2, 3])
TEACHER = onehot_logits([0, 1, 0, 0, 0, 1])
NAMES = ["land_on_land", "land_on_water", "water_on_land", "water_on_water"]
# correct: 1 1 0 1 0 1; agree: 1 0 0 1 1 1


def test_group_robustness_by_hand():
    out = group_robustness(PRED, LABELS, GROUPS, num_groups=4, id_groups=[0, 3], teacher_logits=TEACHER, group_names=NAMES)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["agreement"] == pytest.approx(4 / 6)
    assert [out["groups"][n]["accuracy"] for n in NAMES] == pytest.approx([1.0, 0.5, 0.0, 1.0])
    assert [out["groups"][n]["agreement"] for n in NAMES] == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert [out["groups"][n]["count"] for n in NAMES] == [2, 2, 1, 1]
    assert [out["groups"][n]["in_distribution"] for n in NAMES] == [True, False, False, True]
    assert out["id_accuracy"] == pytest.approx(1.0)  # samples 0, 1, 5
    assert out["ood_accuracy"] == pytest.approx(1 / 3)  # samples 2, 3, 4
    assert out["id_agreement"] == pytest.approx(2 / 3)
    assert out["ood_agreement"] == pytest.approx(2 / 3)
    assert out["worst_group"] == "water_on_land"
    assert out["worst_group_accuracy"] == 0.0
    assert out["worst_group_agreement"] == pytest.approx(0.5)
    assert out["mean_group_accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_streaming_equals_one_shot_and_empty_groups_are_left_out():
    meter = GroupRobustnessMeter(num_groups=5, id_groups=[0, 3])
    meter.update(PRED[:3], LABELS[:3], GROUPS[:3], teacher_logits=TEACHER[:3])
    meter.update(PRED[3:], LABELS[3:], GROUPS[3:], teacher_logits=TEACHER[3:])
    out = meter.compute()
    assert out["groups"]["4"] == {"count": 0, "accuracy": None, "agreement": None, "in_distribution": False}
    assert out["worst_group"] == "2" and out["mean_group_accuracy"] == pytest.approx(0.625)
    assert out["ood_accuracy"] == pytest.approx(1 / 3)


def test_without_teacher_agreement_is_none():
    out = group_robustness(PRED, LABELS, GROUPS, num_groups=4, id_groups=[0])
    assert out["agreement"] is None and out["worst_group_agreement"] is None
    assert out["groups"]["0"]["agreement"] is None
    # ID = group 0 only (samples 0, 1); OOD = the rest (2 of 4 correct).
    assert out["id_accuracy"] == 1.0 and out["ood_accuracy"] == pytest.approx(0.5)


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match=r"id_groups \[7\] must lie in \[0, 3\]"):
        GroupRobustnessMeter(num_groups=4, id_groups=[7])
    with pytest.raises(ValueError, match="groups must be integers"):
        group_robustness(PRED, LABELS, GROUPS + 4, num_groups=4, id_groups=[0])
    with pytest.raises(ValueError, match="distinct group names"):
        GroupRobustnessMeter(num_groups=2, id_groups=[0], group_names=["a", "a"])
