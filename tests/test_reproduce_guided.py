"""The guided-teacher reproductions (``waterbirds``, ``multilabel``) and the evaluation columns
they read (teacher F1, teacher accuracy per group)."""

import json
import math

import pytest
import torch
from torch import nn

from e2kd.reproduce._guided import pick_lambda
from e2kd.reproduce.waterbirds import group_split_metrics
from e2kd.train.evaluate import evaluate


class _ReadLogits(nn.Module):
    """Logits stored in the image: channel ``c``, row 0 holds them (no parameters)."""

    def __init__(self, channel):
        super().__init__()
        self.channel = channel

    def forward(self, x):
        return x[:, self.channel, 0, :]


def _images(student, teacher):
    s, t = torch.tensor(student, dtype=torch.float), torch.tensor(teacher, dtype=torch.float)
    return torch.stack([s, t], dim=1)[:, :, None, :]  # (B, 2, 1, C)


def test_evaluate_reports_teacher_f1_beside_student_f1():
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float)
    # Teacher predicts {0}, {0, 1}, {0, 1, 2}: TP = 1 + 1 + 2, FP = 0 + 1 + 1, FN = 1 + 0 + 0.
    teacher = [[2, -1, -1], [1, 1, -1], [1, 1, 1]]
    # Student predicts {2}, {1}, {}: TP = 1 + 1 + 0, FP = 0, FN = 1 + 0 + 2.
    student = [[-1, -2, 3], [-1, 2, -1], [-1, -1, -1]]
    batch = {"image": _images(student, teacher), "label": labels}
    res = evaluate(_ReadLogits(0), [batch], teacher=_ReadLogits(1), multilabel=True)
    assert res["teacher_f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))
    assert res["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 3))
    # top-1: teacher 0, 0 (tie -> first), 0 -> present in images 0, 2; student 2, 1, 0 -> 0, 1, 2 all present
    assert res["teacher_accuracy"] == pytest.approx(2 / 3)
    assert res["accuracy"] == pytest.approx(3 / 3)


def test_evaluate_reports_teacher_accuracy_per_group():
    labels = torch.tensor([0, 1, 0, 1])
    groups = torch.tensor([0, 0, 1, 1])
    teacher = [[1, 0], [1, 0], [1, 0], [0, 1]]  # top-1 0, 0, 0, 1: correct 1, 0, 1, 1
    student = [[1, 0], [0, 1], [0, 1], [0, 1]]  # top-1 0, 1, 1, 1: correct 1, 1, 0, 1
    batch = {"image": _images(student, teacher), "label": labels, "group": groups}
    res = evaluate(_ReadLogits(0), [batch], teacher=_ReadLogits(1), group_names=["a", "b"])
    assert res["group/a/teacher_accuracy"] == pytest.approx(0.5)
    assert res["group/b/teacher_accuracy"] == pytest.approx(1.0)
    assert res["teacher_worst_group_accuracy"] == pytest.approx(0.5)
    assert res["group/a/accuracy"] == pytest.approx(1.0)
    assert res["group/b/accuracy"] == pytest.approx(0.5)
    assert res["worst_group_accuracy"] == pytest.approx(0.5)
    # agreement per image 1, 0, 0, 1
    assert res["group/a/agreement"] == pytest.approx(0.5)
    assert res["group/b/agreement"] == pytest.approx(0.5)


def test_group_split_metrics_weights_groups_by_images():
    res = {
        "group/landbird_on_land/n": 30, "group/landbird_on_land/accuracy": 0.9, "group/landbird_on_land/agreement": 1.0,
        "group/waterbird_on_water/n": 10, "group/waterbird_on_water/accuracy": 0.5,
        "group/waterbird_on_water/agreement": 0.6,
        "group/landbird_on_water/n": 20, "group/landbird_on_water/accuracy": 0.2,
        "group/landbird_on_water/agreement": 0.4,
        "group/waterbird_on_land/n": 20, "group/waterbird_on_land/accuracy": 0.6,
        "group/waterbird_on_land/agreement": 0.8,
    }
    out = group_split_metrics(res)
    assert out["accuracy_id"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
    assert out["accuracy_ood"] == pytest.approx(0.4)
    assert out["agreement_id"] == pytest.approx((30 * 1.0 + 10 * 0.6) / 40)
    assert out["agreement_ood"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="per-group counts"):
        group_split_metrics({"accuracy": 0.5})


def test_pick_lambda_uses_the_validation_metric_and_prefers_the_smaller_lambda_on_ties():
    assert pick_lambda({1.0: {"accuracy": 0.7}, 5.0: {"accuracy": 0.8}}, "accuracy") == 5.0
    assert pick_lambda({5.0: {"f1": 0.6}, 1.0: {"f1": 0.6}, 0.2: {"f1": 0.5}}, "f1") == 1.0
    with pytest.raises(ValueError, match="lack 'f1'"):
        pick_lambda({1.0: {"accuracy": 0.7}}, "f1")
    with pytest.raises(ValueError, match="at least one"):
        pick_lambda({}, "f1")


def _check_rows(exp_dir, expected_keys, metrics):
    res = json.loads((exp_dir / "results.json").read_text())
    assert res["quick"] is True and res["seeds"] == [0]
    rows = {tuple(r[k] for k in expected_keys[0]): r for r in res["rows"]}
    assert set(rows) == set(expected_keys[1])
    for row in rows.values():
        assert row["seeds"] == 1
        for m in metrics:
            assert len(row[m]) == 1 and 0.0 <= row[m][0] <= 1.0 and not math.isnan(row[m][0]), (row, m)
    table = (exp_dir / "table.md").read_text()
    return res, table


def _mtimes(folder):
    """Modification times of every file of the teacher and student run folders under ``folder``."""
    times = {p: p.stat().st_mtime_ns for p in folder.rglob("*")
             if p.is_file() and ("teachers" in p.parts or "students" in p.parts)}
    assert any("teachers" in p.parts for p in times) and any("students" in p.parts for p in times)
    return times


@pytest.mark.slow
def test_waterbirds_quick_end_to_end(tmp_path, monkeypatch):
    from e2kd.reproduce import run_experiment

    monkeypatch.setenv("E2KD_CACHE", str(tmp_path / "cache"))
    exp_dir = run_experiment("waterbirds", out_dir=tmp_path / "out", quick=True)
    keys = (("model", "lam"), {("teacher (guided)", "–"), ("teacher (unguided)", "–"), ("KD", 0.0), ("e²KD", 1.0)})
    res, table = _check_rows(exp_dir, keys, ["accuracy_id", "accuracy_ood", "worst_group_accuracy", "epg"])
    students = [r for r in res["rows"] if r["model"] in ("KD", "e²KD")]
    assert all(len(r["agreement_ood"]) == 1 for r in students)
    assert (exp_dir.parent / "teachers" / "tuxbirds-teacher-guided" / "results.json").is_file()
    for name in ("teacher (guided)", "teacher (unguided)", "KD", "e²KD", "Acc OOD", "EPG (bird)"):
        assert name in table
    assert res["lambda"] == 1.0 and "1" in res["lambda_selection"]
    # The student's evaluation carries its teacher's per-group accuracy and EPG beside its own.
    student = json.loads((exp_dir / "students" / "tuxbirds-kd-seed0" / "results.json").read_text())
    teacher = res["teachers"]["guided"]
    for g in ("landbird_on_land", "landbird_on_water", "waterbird_on_land", "waterbird_on_water"):
        assert student[f"group/{g}/teacher_accuracy"] == pytest.approx(teacher[f"group/{g}/accuracy"], abs=1e-6)
    assert student["teacher_epg"] == pytest.approx(teacher["epg"], abs=1e-6)
    # A second call reuses the teachers (and the students) instead of training them again.
    before = _mtimes(tmp_path / "out")
    run_experiment("waterbirds", out_dir=tmp_path / "out", quick=True)
    assert _mtimes(tmp_path / "out") == before


@pytest.mark.slow
def test_multilabel_quick_end_to_end(tmp_path, monkeypatch):
    from e2kd.reproduce import run_experiment

    monkeypatch.setenv("E2KD_CACHE", str(tmp_path / "cache"))
    exp_dir = run_experiment("multilabel", out_dir=tmp_path / "out", quick=True)
    keys = (("teacher", "model"),
            {(f"{t} teacher", m) for t in ("EPG", "IoU") for m in ("teacher", "student on labels", "KD", "e²KD")})
    res, table = _check_rows(exp_dir, keys, ["epg", "iou", "f1"])
    for kind in ("epg", "iou"):
        assert (exp_dir.parent / "teachers" / f"tuxscenes-teacher-{kind}" / "results.json").is_file()
    # The teacher rows are the teachers' own evaluations; students report the same teacher's scores.
    for kind in ("EPG", "IoU"):
        t = res["teachers"][kind]
        for rec in res["records"]:
            if rec["teacher"] == f"{kind} teacher" and rec["model"] in ("KD", "e²KD"):
                assert rec["teacher_epg"] == pytest.approx(t["epg"], abs=1e-6)
                assert rec["teacher_f1"] == pytest.approx(t["f1"], abs=1e-6)
    # The student on labels is one run per seed, shown under both teachers.
    on_labels = [r for r in res["records"] if r["model"] == "student on labels"]
    assert len(on_labels) == 2 and on_labels[0]["epg"] == on_labels[1]["epg"] and "teacher_epg" not in on_labels[0]
    assert (exp_dir / "students" / "tuxscenes-labels-seed0" / "results.json").is_file()
    assert "Published" in table and "75.7 / 21.3 / 72.5" in table
