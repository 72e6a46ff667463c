"""End to end at small size: teacher training, KD and e²KD, evaluation, resume, faults."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import base_config
from e2kd.train import NonFiniteLossError, config_from_dict, read_metrics, run
from e2kd.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("teacher")
    cfg = config_from_dict(base_config(out, "teacher", **{"optim.epochs": 2}))
    return run(cfg, mode="teacher")


def _distill_cfg(tmp_path, name, teacher_dir, **extra):
    values = base_config(tmp_path, name, **{"teacher.checkpoint": str(teacher_dir), **extra})
    return config_from_dict(values)


def test_teacher_run_folder(teacher_dir):
    for f in ("config.yaml", "metrics.jsonl", "results.json", "env.json", "model.safetensors"):
        assert (teacher_dir / f).is_file(), f
    res = json.loads((teacher_dir / "results.json").read_text())
    assert res["num_images"] == 32 and 0.0 <= res["accuracy"] <= 1.0 and res["top5"] == 1.0  # 4 classes: top-5 is trivial
    env = json.loads((teacher_dir / "env.json").read_text())
    assert env["packages"]["torch"] and env["data"]["datasets"]["train"]["n"] == 64
    # the default heap padding is applied where the C library is glibc, and recorded
    from e2kd.train.heap import glibc_malloc

    assert env["malloc_top_pad_mib"] == (1024 if glibc_malloc() is not None else None)
    recs = read_metrics(teacher_dir / "metrics.jsonl")
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]  # 64 images / batch 16 = 4 steps per epoch, 2 epochs
    assert all("data_time" in r and "images_per_s" in r for r in train)


def test_kd_and_e2kd_end_to_end(tmp_path, teacher_dir):
    from e2kd.cli import main

    kd = run(_distill_cfg(tmp_path, "kd", teacher_dir, **{"distill.lam": 0.0}), mode="distill")
    e2 = run(_distill_cfg(tmp_path, "e2kd", teacher_dir, **{"distill.lam": 1.0}), mode="distill")
    teacher_acc = json.loads((teacher_dir / "results.json").read_text())["accuracy"]
    for d in (kd, e2):
        res = json.loads((d / "results.json").read_text())
        for key in ("accuracy", "top5", "agreement", "explanation_similarity"):
            assert 0.0 <= res[key] <= 1.0 + 1e-6, key
        # Synthetic images carry object masks: localisation of student and teacher explanations.
        for key in ("epg", "iou", "teacher_epg", "teacher_iou"):
            assert 0.0 <= res[key] <= 1.0, key
        # The teacher's accuracy measured during the student's evaluation is the teacher run's.
        assert res["teacher_accuracy"] == pytest.approx(teacher_acc)
    kd_log = [r for r in read_metrics(kd / "metrics.jsonl") if r["split"] == "train"]
    e2_log = [r for r in read_metrics(e2 / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["exp_loss"] == 0.0 for r in kd_log)  # lam=0 computes no explanation
    assert all(r["exp_loss"] > 0.0 for r in e2_log)
    # `e2kd evaluate RUN_DIR` reproduces the end-of-training evaluation.
    assert main(["evaluate", str(e2)]) == 0
    again = json.loads((e2 / "eval_synthetic_test.json").read_text())
    first = json.loads((e2 / "results.json").read_text())
    for key in ("accuracy", "agreement", "explanation_similarity"):
        assert again[key] == pytest.approx(first[key], abs=1e-6)


class _Crash(Exception):
    pass


class _CrashAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, ctx):
        if ctx.step == self.step:
            raise _Crash


class _SigtermAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, ctx):
        if ctx.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_resume_after_kill_gives_identical_weights(tmp_path, teacher_dir):
    extra = {"deterministic": True, "checkpoint_every": 2, "optim.epochs": 2, "distill.explain_every": 3}
    ref = run(_distill_cfg(tmp_path / "a", "r", teacher_dir, **extra), mode="distill")
    cfg = _distill_cfg(tmp_path / "b", "r", teacher_dir, **extra)
    with pytest.raises(_Crash):
        run(cfg, mode="distill", callbacks=[_CrashAt(5)])  # dies after step 5; last checkpoint: step 4
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "r" / "checkpoints")][-1] == "step_00000004.safetensors"
    resumed = run(cfg, mode="distill")
    a, b = _weights(ref), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [2, 4, 6, 8]  # lines logged after the checkpoint and before the kill were dropped


def test_sigterm_saves_a_checkpoint_and_resume_matches(tmp_path, teacher_dir):
    extra = {"deterministic": True, "optim.epochs": 2}
    ref = run(_distill_cfg(tmp_path / "a", "s", teacher_dir, **extra), mode="distill")
    cfg = _distill_cfg(tmp_path / "b", "s", teacher_dir, **extra)
    with pytest.raises(SystemExit, match="SIGTERM received: stopped after step 3"):
        run(cfg, mode="distill", callbacks=[_SigtermAt(3)])
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "s" / "checkpoints")] == ["step_00000003.safetensors"]
    resumed = run(cfg, mode="distill")
    a, b = _weights(ref), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _PoisonTeacherAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, ctx):
        if ctx.step == self.step:
            with torch.no_grad():
                for p in ctx.teacher.parameters():
                    p.fill_(float("nan"))


def test_non_finite_loss_stops_with_step_and_term(tmp_path, teacher_dir):
    cfg = _distill_cfg(tmp_path, "nan", teacher_dir, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss term 'kd_loss' is nan") as err:
        run(cfg, mode="distill", callbacks=[_PoisonTeacherAt(3)])
    assert "step_00000002.safetensors" in str(err.value)
    ckpts = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002.safetensors"]
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpts[0])).values() if t.is_floating_point())
    assert not (tmp_path / "nan" / "model.safetensors").exists()
    assert not (tmp_path / "nan" / "results.json").exists()


def test_bcos_pair_end_to_end(tmp_path, monkeypatch):
    """B-cos teacher → B-cos student with B-cos explanations (dynamic linear weights)."""
    teacher = run(config_from_dict(base_config(tmp_path, "bt", **{
        "model.name": "bcos_resnet8_small", "model.kwargs": {"width": 4}, "optim.max_steps": 1, "optim.agc_clip": 0.01,
        "data.image_size": 12, "data.eval_kwargs": {"num_samples": 8}})), mode="teacher")
    # every training backward differentiates the trained parameters only, not the explained input
    backward, calls = torch.Tensor.backward, []
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append(k.get("inputs")) or backward(self, *a, **k))
    student = run(config_from_dict(base_config(tmp_path, "bs", **{
        "model.name": "bcos_resnet8_small", "model.kwargs": {"width": 4}, "teacher.checkpoint": str(teacher),
        "distill.explainer": "bcos", "optim.max_steps": 2, "optim.agc_clip": 0.01,
        "data.image_size": 12, "data.eval_kwargs": {"num_samples": 8}, "log_every": 1})), mode="distill")
    monkeypatch.undo()
    from e2kd.models import create_model
    n_trained = sum(1 for p in create_model("bcos_resnet8_small", num_classes=4, width=4).parameters() if p.requires_grad)
    assert len(calls) == 2 and all(c is not None and len(c) == n_trained for c in calls), calls
    res = json.loads((student / "results.json").read_text())
    assert 0.0 <= res["agreement"] <= 1.0 and -1.0 <= res["explanation_similarity"] <= 1.0 + 1e-6
    log = [r for r in read_metrics(student / "metrics.jsonl") if r["split"] == "train"]
    assert log and all(r["exp_loss"] > 0 for r in log)


@pytest.mark.data
def test_fashion_mnist_configs_run_at_small_size(tmp_path):
    """The shipped Fashion-MNIST configs, on a slice: teacher, then e²KD with 5 shots per class."""
    from pathlib import Path

    from e2kd.cli import main
    from e2kd.train import load_config

    configs = Path(__file__).resolve().parent.parent / "configs" / "fmnist"
    small = [f"output_dir={tmp_path}", "progress=false", "data.eval_limit=200", "model.kwargs.width=4", "log_every=1"]
    teacher = run(load_config(configs / "teacher.yaml", small + ["data.limit=256", "optim.max_steps=2"]), mode="teacher")
    student = run(load_config(configs / "fewshot_gradcam_e2kd.yaml", small + [
        f"teacher.checkpoint={teacher}", "data.shots=5", "data.val_per_class=2", "optim.max_steps=2"]), mode="distill")
    res = json.loads((student / "results.json").read_text())
    assert res["num_images"] == 200 and res["dataset"].startswith("fashion_mnist")
    assert res["val"]["num_images"] == 20  # 2 held-out images per class
    for key in ("accuracy", "top5", "agreement", "explanation_similarity", "epg"):
        assert 0.0 <= res[key] <= 1.0 + 1e-6, key
    env = json.loads((student / "env.json").read_text())
    assert len(env["data"]["sampling"]["train"]["indices_hash"]) > 8  # the k-shot selection is recorded
    # `e2kd evaluate CONFIG` with model.checkpoint: the same numbers from the saved weights.
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text((student / "config.yaml").read_text())
    assert main(["evaluate", str(cfg_file), f"model.checkpoint={student}", "name=evalcfg"]) == 0
    # written into the evaluated run's folder, never into the config's own run folder (output_dir/name)
    assert not (tmp_path / "evalcfg").exists()
    again = json.loads((student / "eval_fashion_mnist_test.json").read_text())
    assert again["accuracy"] == pytest.approx(res["accuracy"]) and again["agreement"] == pytest.approx(res["agreement"])
