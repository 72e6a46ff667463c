"""Interrupted runs lose nothing.

A distillation and a freeze killed with SIGKILL at random moments (twice in a row) and
started again finish with exactly the result of an uninterrupted run (CPU, deterministic mode);
after every kill, each file present in the run folder or the store parses. SIGTERM and Ctrl-C
(SIGINT) save a checkpoint before the process exits.
"""

from __future__ import annotations

import json
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
from e2kd.train.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(TESTS)]), OMP_NUM_THREADS="1")
STEPS = 40  # 4 steps an epoch (64 images, batch 16), 10 epochs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher file, the distillation config (as a YAML file) and the uninterrupted run's weights."""
    root = tmp_path_factory.mktemp("interrupt")
    torch.manual_seed(0)
    teacher = build_model("resnet8_small", {"width": 4}, num_classes=4, in_chans=3)
    save_model(root / "teacher" / "model.safetensors", teacher)
    values = base_config(root / "ref", "r", **{
        "teacher.checkpoint": str(root / "teacher"), "deterministic": True, "checkpoint_every": 1,
        "optim.epochs": STEPS // 4, "log_every": 1, "distill.explain_every": 2})
    torch.set_num_threads(1)  # the subprocesses' thread count: the same summation order
    ref = run(config_from_dict(values), mode="distill")
    return root, values, load_file(str(ref / "model.safetensors"))


def _config_file(root: Path, values: dict, out: Path) -> Path:
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(dict(values, output_dir=str(out))))
    return path


def _check_run_folder_parses(run_dir: Path) -> int:
    """Every file of a run folder parses; returns the number of checkpoints found."""
    for path in run_dir.rglob("*"):
        if not path.is_file() or path.name.startswith("."):  # ".<name>.*.tmp": an unfinished atomic write
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".jsonl":
            steps = [r["step"] for r in read_metrics(path) if r["split"] == "train"]
            assert steps == list(range(1, len(steps) + 1)), steps
        elif path.parent.name == "checkpoints":
            load_checkpoint(path)
        elif path.suffix == ".safetensors":
            load_file(str(path))
        else:
            raise AssertionError(f"unexpected file {path}")
    return len(list_checkpoints(run_dir / "checkpoints"))


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the process ended early: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_repeated_sigkill_then_resume_gives_the_uninterrupted_weights(setup, tmp_path):
    root, values, ref = setup
    cfg = _config_file(tmp_path, values, tmp_path / "killed")
    run_dir = tmp_path / "killed" / "r"
    cmd = [sys.executable, "-m", "e2kd", "distill", str(cfg)]
    rng = random.Random(os.getpid())
    kills, last_lines = 0, 0
    for attempt in range(2):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until this attempt has trained at least one step, then kill at a random moment:
        # inside a step, a checkpoint write or a metrics append.
        _wait_for(lambda: _metric_lines(run_dir) > last_lines or proc.poll() is not None, proc)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        _check_run_folder_parses(run_dir)
        assert not (run_dir / "results.json").exists() or (run_dir / "model.safetensors").exists()
        last_lines = _metric_lines(run_dir)
    assert kills >= 2
    subprocess.run(cmd, env=ENV, check=True, timeout=240, stdout=subprocess.DEVNULL)
    _check_run_folder_parses(run_dir)
    assert not list(run_dir.rglob(".*.tmp"))  # unfinished writes of the killed runs were cleared
    got = load_file(str(run_dir / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert [r["split"] for r in records if r["split"] != "train"] == ["eval"]  # the final evaluation, once


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_checkpoint_before_exiting(setup, tmp_path, sig):
    root, values, ref = setup
    values = dict(values, checkpoint_every=0)  # no periodic checkpoints: the one found comes from the signal
    cfg = _config_file(tmp_path, values, tmp_path / "stopped")
    run_dir = tmp_path / "stopped" / "r"
    cmd = [sys.executable, "-m", "e2kd", "distill", str(cfg)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: _metric_lines(run_dir) >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode not in (0, -sig), err
    name = signal.Signals(sig).name
    stopped = int(err.split(f"{name} received: stopped after step ")[1].split()[0])
    assert 2 <= stopped < STEPS
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [f"step_{stopped:08d}.safetensors"]
    _check_run_folder_parses(run_dir)
    assert not (run_dir / "model.safetensors").exists()
    if sig == signal.SIGINT:
        return  # resuming is the same as after SIGTERM, checked once
    subprocess.run(cmd, env=ENV, check=True, timeout=240, stdout=subprocess.DEVNULL)
    got = load_file(str(run_dir / "model.safetensors"))
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def _store_files(path: Path) -> dict:
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path)) if not f.startswith(".")}


def _check_store_parses(path: Path) -> None:
    for f in path.rglob("*"):
        if not f.is_file() or (f.name.startswith(".") and f.suffix == ".tmp"):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".tmp":  # an unfinished atomic write (hidden name only)
            raise AssertionError(f"temporary file without a hidden name: {f}")
        else:
            assert f.suffix == ".safetensors", f
            load_file(str(f))


def test_freeze_killed_at_random_moments_gives_a_byte_identical_store(tmp_path):
    import _reliability_worker as worker

    torch.set_num_threads(1)
    worker.freeze_store(str(tmp_path / "ref"))
    out = tmp_path / "killed"
    cmd = [sys.executable, str(TESTS / "_reliability_worker.py"), "freeze", str(out)]
    rng = random.Random(os.getpid())
    kills = 0
    for attempt in range(2):
        before = len(list(out.glob("shard-*"))) if out.exists() else 0
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # killed after a random number of new shards (of 80), at a random moment within the next
        # ones: a kill timed only from the first new shard could come after a fast machine had
        # finished the whole store, leaving nothing to interrupt
        target = before + rng.randint(1, 10)
        _wait_for(lambda: len(list(out.glob("shard-*"))) >= target or proc.poll() is not None, proc)
        time.sleep(rng.uniform(0.0, 0.02))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        _check_store_parses(out)
    assert kills >= 2
    subprocess.run(cmd, env=ENV, check=True, timeout=240, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _store_files(out) == _store_files(tmp_path / "ref")
    assert not (out / ".parts").exists()
    assert not list(out.glob(".shard-*.tmp"))  # unfinished shard writes of the killed runs were cleared


def test_rerun_after_a_kill_between_the_final_checkpoint_and_results_logs_the_evaluation_once(setup, tmp_path):
    """Killed after the final checkpoint and the evaluation lines but before results.json: the
    rerun resumes at the last step, evaluates again, and the log still holds one evaluation."""
    root, values, ref = setup
    values = dict(values, output_dir=str(tmp_path), **{"optim": dict(values["optim"], epochs=1)})
    run_dir = run(config_from_dict(values), mode="distill")
    (run_dir / "results.json").unlink()
    (run_dir / "checkpoints" / ".step_00000004.safetensors.abc.tmp").write_bytes(b"half a checkpoint")
    run(config_from_dict(values), mode="distill")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval")]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4
    assert not list(run_dir.rglob(".*.tmp"))
