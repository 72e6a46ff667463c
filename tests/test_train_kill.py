"""A distillation killed with SIGKILL (no chance to clean up) and restarted with resume=auto
ends with exactly the weights of an uninterrupted run (CPU, deterministic mode)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _train_helpers import base_config
from e2kd.train import config_from_dict, read_metrics, run
from e2kd.train.build import build_model, save_model

pytestmark = pytest.mark.slow

SRC = str(Path(__file__).resolve().parent.parent / "src")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("resnet8_small", {"width": 4}, num_classes=4, in_chans=3)
    save_model(tmp_path / "teacher" / "model.safetensors", teacher)
    values = base_config(tmp_path / "killed", "k", **{
        "teacher.checkpoint": str(tmp_path / "teacher"), "deterministic": True, "checkpoint_every": 2,
        "optim.epochs": 25, "log_every": 1, "progress": False})
    cfg_file = tmp_path / "k.yaml"
    cfg_file.write_text(yaml.safe_dump(values))
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "e2kd", "distill", str(cfg_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "killed" / "k" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.is_dir() and any(ckpts.glob("step_00000004*"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))  # somewhere in the middle of a later step (or a write)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "k" / "model.safetensors").exists()
    subprocess.run(cmd, env=env, check=True, timeout=240, stdout=subprocess.DEVNULL)

    import json

    env_rec = json.loads((tmp_path / "killed" / "k" / "env.json").read_text())
    resumed_at = int(Path(env_rec["resumed_from"]).stem.split("_")[1])
    assert 4 <= resumed_at < 100  # killed mid-run, not after the last step
    torch.set_num_threads(1)  # the same thread count as the subprocesses: the same summation order
    ref_values = dict(values, output_dir=str(tmp_path / "ref"))
    ref = run(config_from_dict(ref_values), mode="distill")
    a = load_file(str(ref / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "k" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(tmp_path / "killed" / "k" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 101))  # 4 steps per epoch, 25 epochs, each logged once
