"""Soak: 2,000 steps of live B-cos e²KD (tiny B-cos ResNets, 12×12 images, batch 4) keep the
resident memory flat, and the long run's metrics log stays consistent across a resume.

The run is stopped by SIGTERM after step 200 and resumed (the same process), so the log is
checked across a resume too. Resident memory (/proc/self/statm) is sampled every 100 steps of
the resumed run; from step 400 (warm-up done) to step 2,000 it may grow by at most
``RSS_BOUND_MB``.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from _train_helpers import base_config
from e2kd.train import config_from_dict, read_metrics, run
from e2kd.train.build import build_model, save_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")]

STEPS = 2000
STOP_AT = 200
WARM = 400
RSS_BOUND_MB = 30.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE / 2**20


class _Probe:
    """SIGTERM to this process after step ``stop_at``; resident memory every 100 steps."""

    def __init__(self, stop_at=None):
        self.stop_at, self.rss = stop_at, {}

    def on_step_end(self, ctx):
        if ctx.step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if ctx.step % 100 == 0:
            self.rss[ctx.step] = _rss_mb()


def test_2000_steps_of_live_bcos_e2kd_keep_memory_flat_and_logs_consistent(tmp_path):
    torch.set_num_threads(1)
    mkldnn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # oneDNN's per-call overhead dominates convolutions this small
    try:
        torch.manual_seed(0)
        teacher = build_model("bcos_resnet8_small", {"width": 2}, num_classes=2, in_chans=1)
        save_model(tmp_path / "teacher" / "model.safetensors", teacher)
        values = base_config(tmp_path, "soak", **{
            "teacher.checkpoint": str(tmp_path / "teacher"), "model.name": "bcos_resnet8_small", "model.kwargs": {"width": 2},
            "distill.explainer": "bcos", "distill.lam": 1.0, "data.image_size": 12, "data.augment": "none",
            "data.kwargs": {"num_samples": 16, "num_classes": 2, "in_chans": 1},
            "data.eval_kwargs": {"num_samples": 4, "num_classes": 2, "in_chans": 1},
            "optim.name": "sgd", "optim.lr": 0.01, "optim.batch_size": 4, "optim.max_steps": STEPS, "log_every": 1})
        cfg = config_from_dict(values)
        t0, c0 = time.time(), time.process_time()
        with pytest.raises(SystemExit, match=f"stopped after step {STOP_AT} "):
            run(cfg, mode="distill", callbacks=[_Probe(stop_at=STOP_AT)])
        probe = _Probe()
        run_dir = run(cfg, mode="distill", callbacks=[probe])
        seconds, cpu = time.time() - t0, time.process_time() - c0
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    growth = probe.rss[STEPS] - probe.rss[WARM]
    peak = max(v for k, v in probe.rss.items() if k >= WARM) - probe.rss[WARM]
    print(f"soak: {STEPS} steps in {seconds:.1f} s ({cpu:.1f} s CPU); RSS at step {WARM} {probe.rss[WARM]:.1f} MB, "
          f"at {STEPS} {probe.rss[STEPS]:.1f} MB (growth {growth:+.1f} MB, peak {peak:+.1f} MB)")
    assert growth < RSS_BOUND_MB and peak < RSS_BOUND_MB, probe.rss

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # one line per step, across the resume
    assert all(r["exp_loss"] == r["exp_loss"] and r["kd_loss"] == r["kd_loss"] for r in train)  # no NaN logged
    assert [r["split"] for r in records if r["split"] != "train"] == ["eval"]
    assert records[-1]["step"] == STEPS
