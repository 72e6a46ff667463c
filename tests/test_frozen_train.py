"""Frozen explanations through the trainer and the CLI: `e2kd freeze`, then
`e2kd distill teacher.frozen=PATH` with no teacher in memory."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _train_helpers import base_config
from e2kd.cli import main
from e2kd.train import config_from_dict, read_metrics, run
from e2kd.train.augment import augment_batch, check_mirrored
from e2kd.train.build import load_model_file, save_model
from e2kd.train.config import Augment


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return run(config_from_dict(base_config(out, "teacher", **{"optim.epochs": 3})), mode="teacher")


def _config_file(tmp_path, teacher, **extra):
    values = base_config(tmp_path, "student", **{"teacher.checkpoint": str(teacher), **extra})
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_freeze_then_distill_from_the_store_with_no_teacher_in_memory(tmp_path, teacher, monkeypatch, capsys):
    cfg = _config_file(tmp_path, teacher)
    store = tmp_path / "store"
    assert main(["freeze", cfg, f"teacher.frozen={store}", "--map-dtype", "float16"]) == 0
    assert "froze 64 images" in capsys.readouterr().out
    manifest = json.loads((store / "manifest.json").read_text())
    from e2kd.frozen import teacher_fingerprint

    assert manifest["teacher_id"] == teacher_fingerprint(load_model_file(teacher))
    assert manifest["dataset"]["size"] == 64 and manifest["dataset"]["name"] == "synthetic"

    # 1. Teacher weights named: checked against the store before training, used only to evaluate.
    assert main(["distill", cfg, f"teacher.frozen={store}", "name=with-weights"]) == 0
    res = _results(tmp_path / "with-weights")
    assert res["frozen_store"]["teacher_check"] == "fingerprint"
    assert 0.0 <= res["agreement"] <= 1.0 and "agreement_note" not in res
    env = json.loads((tmp_path / "with-weights" / "env.json").read_text())
    assert env["frozen_store"]["path"] == str(store)

    # 2. No teacher weights anywhere: loading a teacher at all would fail this run.
    def no_teacher(*a, **k):
        raise AssertionError("a teacher was built during a frozen run without teacher weights")

    monkeypatch.setattr("e2kd.train.loop.build_teacher", no_teacher)
    monkeypatch.setattr("e2kd.train.frozen.build_teacher", no_teacher)
    seen = []

    class Spy:
        def on_step_end(self, ctx):
            seen.append(ctx.teacher)

    values = base_config(tmp_path, "no-weights", **{"teacher.frozen": str(store)})
    run(config_from_dict(values), mode="distill", callbacks=[Spy()])
    res2 = _results(tmp_path / "no-weights")
    assert seen and all(t is None for t in seen)
    assert "agreement" not in res2 and "explanation_similarity" not in res2
    assert "agreement unavailable" in res2["agreement_note"] and res2["frozen_store"]["teacher_check"] == "explainer+dataset"
    # The student never depends on how the teacher was identified: identical weights.
    w1, w2 = load_file(tmp_path / "with-weights" / "model.safetensors"), load_file(tmp_path / "no-weights" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert res2["accuracy"] == res["accuracy"]

    # 3. A store of the evaluation split gives the same agreement as the teacher's weights did.
    monkeypatch.undo()
    estore = tmp_path / "estore"
    assert main(["freeze", cfg, "--split", "eval", f"teacher.frozen_eval={estore}", "progress=false"]) == 0
    monkeypatch.setattr("e2kd.train.loop.build_teacher", no_teacher)
    values = base_config(tmp_path, "eval-store", **{"teacher.frozen": str(store), "teacher.frozen_eval": str(estore)})
    run(config_from_dict(values), mode="distill")
    res3 = _results(tmp_path / "eval-store")
    assert res3["agreement"] == res["agreement"] and res3["teacher_accuracy"] == res["teacher_accuracy"]
    assert res3["explanation_similarity"] == pytest.approx(res["explanation_similarity"], abs=2e-3)  # fp16 maps


def test_frozen_and_live_distillation_give_the_same_first_loss(tmp_path, teacher):
    """No augmentation, fp32 maps: the trainer's first step has the same loss terms either way."""
    cfg = _config_file(tmp_path, teacher, **{"data.augment": "none", "optim.max_steps": 1, "log_every": 1})
    assert main(["freeze", cfg, f"teacher.frozen={tmp_path / 'store'}", "--map-dtype", "float32", "progress=false"]) == 0
    assert main(["distill", cfg, "name=live"]) == 0
    assert main(["distill", cfg, f"teacher.frozen={tmp_path / 'store'}", "name=frozen"]) == 0
    live, frozen = (read_metrics(tmp_path / n / "metrics.jsonl")[0] for n in ("live", "frozen"))
    assert live["step"] == frozen["step"] == 1 and live["exp_loss"] > 0
    for key in ("loss", "kd_loss", "exp_loss", "agreement"):
        assert frozen[key] == pytest.approx(live[key], rel=1e-5, abs=1e-7), key


@pytest.fixture
def frozen_store(tmp_path, teacher):
    cfg = _config_file(tmp_path, teacher)
    assert main(["freeze", cfg, f"teacher.frozen={tmp_path / 'store'}", "progress=false"]) == 0
    return cfg, tmp_path / "store"


def _other_teacher(tmp_path, teacher):
    model = load_model_file(teacher)
    with torch.no_grad():
        model.fc.weight.add_(0.01)
    (tmp_path / "other").mkdir()
    save_model(tmp_path / "other" / "model.safetensors", model)
    return tmp_path / "other"


@pytest.mark.parametrize(
    "override, field",
    [
        ("teacher.checkpoint={other}", "teacher_id"),
        ("distill.explainer_kwargs={{layer: layer3}}", "explainer"),
        ("distill.explainer=inputxgradient", "explainer"),
        ("data.seed=1", "dataset_id"),
        ("data.kwargs.num_samples=48", "dataset_size"),
    ],
)
def test_store_of_another_teacher_explainer_or_dataset_is_refused_before_training(
    tmp_path, teacher, frozen_store, capsys, override, field
):
    cfg, store = frozen_store
    capsys.readouterr()
    override = override.format(other=_other_teacher(tmp_path, teacher))
    assert main(["distill", cfg, f"teacher.frozen={store}", override, "name=refused"]) == 2
    err = capsys.readouterr().err
    assert f"was built for a different {field}" in err, err
    assert not (tmp_path / "refused").exists()  # nothing was trained or written


def test_augmentation_outside_the_mirrored_set_is_refused():
    with pytest.raises(ValueError, match="cannot be mirrored on the stored explanation maps"):
        check_mirrored("mixup")
    for kind in Augment:
        check_mirrored(kind)


@pytest.mark.parametrize("kind", [Augment.flip, Augment.crop_flip, Augment.rrc_flip])
def test_batched_augmentation_moves_stored_maps_with_the_images(kind):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 1, 16, 16, generator=g)
    # A map equal to the image must stay equal to it; a 3-channel map moves channel by channel.
    batch = {"image": image, "teacher_maps": torch.cat([image, 2 * image, image.flip(-2)], dim=1)}
    out = augment_batch(batch, kind, seed=3, step=7)
    assert not torch.equal(out["image"], image)
    torch.testing.assert_close(out["teacher_maps"][:, :1], out["image"], rtol=0, atol=0)
    torch.testing.assert_close(out["teacher_maps"][:, 1:2], 2 * out["image"], rtol=1e-6, atol=1e-6)
    # Maps coarser than the image: a flip is exact at any resolution.
    if kind == Augment.flip:
        coarse = torch.nn.functional.avg_pool2d(image, 2)
        out = augment_batch({"image": image, "teacher_maps": coarse}, kind, seed=3, step=7)
        torch.testing.assert_close(out["teacher_maps"], torch.nn.functional.avg_pool2d(out["image"], 2))


def test_interrupted_freeze_continues_and_gives_the_same_store(tmp_path, teacher, monkeypatch, capsys):
    import e2kd.frozen.freezer as freezer

    cfg = _config_file(tmp_path, teacher)
    args = ["--shard-size", "16", "progress=false"]
    assert main(["freeze", cfg, f"teacher.frozen={tmp_path / 'ref'}", *args]) == 0
    real = freezer._write_shard
    calls = []

    def write_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(freezer, "_write_shard", write_then_stop)
    assert main(["freeze", cfg, f"teacher.frozen={tmp_path / 'cut'}", *args]) == 130
    assert not (tmp_path / "cut" / "manifest.json").exists()
    monkeypatch.setattr(freezer, "_write_shard", real)
    capsys.readouterr()
    assert main(["freeze", cfg, f"teacher.frozen={tmp_path / 'cut'}", *args]) == 0
    assert "3 shards written, 1 already complete" in capsys.readouterr().out
    ref, cut = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("ref", "cut"))
    assert [s["sha256"] for s in cut["shards"]] == [s["sha256"] for s in ref["shards"]] and len(ref["shards"]) == 4


def test_freeze_needs_an_output_folder_and_teacher_weights(tmp_path, teacher, capsys):
    cfg = _config_file(tmp_path, teacher)
    assert main(["freeze", cfg]) == 2
    assert "set teacher.frozen=PATH or pass --out PATH" in capsys.readouterr().err
    assert main(["freeze", cfg, "--out", str(tmp_path / "s"), "teacher.checkpoint=null"]) == 2
    assert "needs the teacher's weights" in capsys.readouterr().err
    assert main(["freeze", cfg, "--out", str(tmp_path / "s0"), "--batch-size", "0"]) == 2
    assert "freeze: the batch size must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "s0").exists()


def test_evaluate_a_frozen_run_from_the_eval_store(tmp_path, teacher, capsys):
    cfg = _config_file(tmp_path, teacher, **{"optim.max_steps": 2})
    assert main(["freeze", cfg, f"teacher.frozen={tmp_path / 's'}", "progress=false"]) == 0
    assert main(["freeze", cfg, "--split", "eval", "--out", str(tmp_path / "e"), "progress=false"]) == 0
    assert main(["distill", cfg, f"teacher.frozen={tmp_path / 's'}", "name=fz"]) == 0
    trained = _results(tmp_path / "fz")
    run_dir = str(tmp_path / "fz")
    assert main(["evaluate", run_dir, f"teacher.frozen_eval={tmp_path / 'e'}", "teacher.checkpoint=null"]) == 0
    again = json.loads((tmp_path / "fz" / "eval_synthetic_test.json").read_text())
    assert again["agreement"] == trained["agreement"] and again["accuracy"] == trained["accuracy"]
    assert main(["evaluate", run_dir, "teacher.checkpoint=null"]) == 0
    alone = json.loads((tmp_path / "fz" / "eval_synthetic_test.json").read_text())
    assert "agreement" not in alone and "agreement unavailable" in alone["agreement_note"]


@pytest.mark.slow
def test_freeze_under_torchrun_gives_the_one_process_store(tmp_path, teacher):
    """Two gloo ranks: each freezes its own shards, rank 0 writes the manifest; same bytes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = _config_file(tmp_path, teacher, **{"device": "cpu", "progress": False})
    assert main(["freeze", cfg, "--out", str(tmp_path / "one"), "--shard-size", "16"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0", "--rdzv-backend=c10d",
         "--rdzv-endpoint=localhost:0", "-m", "e2kd", "freeze", cfg, "--out", str(tmp_path / "two"), "--shard-size", "16"],
        check=True, env=env, timeout=300, capture_output=True,
    )
    one, two = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("one", "two"))
    assert len(two["shards"]) == 4 and [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]


def test_frozen_run_inputs_are_checked_before_training(tmp_path, teacher, frozen_store, capsys):
    """A missing or mismatched teacher.frozen_eval or teacher.checkpoint stops the run before any
    step: no run folder, so the corrected command starts afresh instead of being refused on resume."""
    cfg, store = frozen_store
    small = ["data.eval_limit=16"]
    assert main(["freeze", cfg, "--split", "eval", "--out", str(tmp_path / "e16"), "progress=false", *small]) == 0
    other = _other_teacher(tmp_path, teacher)
    assert main(["freeze", cfg, "--split", "eval", "--out", str(tmp_path / "eo"), f"teacher.checkpoint={other}",
                 "progress=false", *small]) == 0
    capsys.readouterr()
    frozen_only = [f"teacher.frozen={store}", "teacher.checkpoint=null", "name=refused"]
    cases = [
        ([*frozen_only, f"teacher.frozen_eval={tmp_path / 'nope'}"],
         f"teacher.frozen_eval={str(tmp_path / 'nope')!r}: no frozen store at"),
        ([*frozen_only, f"teacher.frozen_eval={tmp_path / 'e16'}", "data.eval_limit=8"],
         "was built for a different dataset_size"),
        ([*frozen_only, f"teacher.frozen_eval={tmp_path / 'eo'}", *small], "freeze both splits from the same teacher"),
        ([f"teacher.frozen={store}", f"teacher.checkpoint={tmp_path / 'nope'}", "name=refused"],
         f"teacher.checkpoint={str(tmp_path / 'nope')!r} does not exist; give the teacher's train-teacher run folder"),
        ([f"teacher.frozen={store}", f"teacher.checkpoint={tmp_path}", "name=refused"],
         "is a folder without model.safetensors"),
        ([f"teacher.frozen={store}", f"teacher.frozen_eval={tmp_path / 'nope'}", "name=refused"],
         f"teacher.frozen_eval={str(tmp_path / 'nope')!r}: no frozen store at"),
    ]
    for overrides, message in cases:
        assert main(["distill", cfg, *overrides, "optim.max_steps=1"]) == 2, overrides
        err = capsys.readouterr().err
        assert message in err, err
        assert "larger than" not in err  # no false note about the size of missing weights
        assert not (tmp_path / "refused").exists()
    # the matching store of the evaluation split is accepted, and gives agreement without teacher weights
    assert main(["distill", cfg, *frozen_only[:2], f"teacher.frozen_eval={tmp_path / 'e16'}", *small,
                 "optim.max_steps=1", "name=ok"]) == 0
    assert "larger than" not in capsys.readouterr().err
    res = _results(tmp_path / "ok")
    assert res["num_images"] == 16 and 0.0 <= res["agreement"] <= 1.0 and "agreement_note" not in res


def test_a_training_image_overwritten_after_freezing_is_refused_before_training(tmp_path, teacher, capsys):
    # e2kd freeze, then one training image file gets new content, then e2kd distill with the
    # store: the store's explanations are of the old image, so the run must not start.
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for split in ("train", "test"):
        for c in range(4):
            (tmp_path / "data" / split / str(c)).mkdir(parents=True)
            for i in range(5):
                files.append(tmp_path / "data" / split / str(c) / f"{i}.png")
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(files[-1])
    cfg = _config_file(tmp_path, teacher, **{"data.name": "imagefolder", "data.root": str(tmp_path / "data"),
                                             "data.kwargs": {}, "data.eval_kwargs": {}})
    store = tmp_path / "store"
    assert main(["freeze", cfg, f"teacher.frozen={store}", "progress=false"]) == 0
    target = files[2]  # train/0/2.png: position 2 is not among the 16 probed positions of 20
    assert 2 not in {round(i * 19 / 15) for i in range(16)}
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write, whatever the clock's tick
    capsys.readouterr()
    assert main(["distill", cfg, f"teacher.frozen={store}", "name=stale"]) == 2
    err = capsys.readouterr().err
    assert "no longer matches the dataset's files" in err and "0/2.png" in err and "freeze the store again" in err, err
    assert not (tmp_path / "stale").exists()


def test_a_top_k_store_is_refused_for_multilabel_data_when_opened(tmp_path, teacher):
    """freeze refuses top-k logits for multi-label data; a store opened for a run whose data are
    multi-label is checked again (a softmax-style top-k cannot stand in for sigmoid classes)."""
    from e2kd.train.batches import build_datasets
    from e2kd.train.build import build_explainers
    from e2kd.train.config import load_config
    from e2kd.train.frozen import open_store

    cfg_file = _config_file(tmp_path, teacher)
    assert main(["freeze", cfg_file, "--topk", "2", f"teacher.frozen={tmp_path / 'store'}", "progress=false"]) == 0
    cfg = load_config(cfg_file, [f"teacher.frozen={tmp_path / 'store'}"])
    ds = build_datasets(cfg)["train"]
    explainers = build_explainers(cfg.distill)
    assert open_store(cfg, "train", ds, teacher_explainer=explainers[0]).store.topk == 2
    ds.multilabel = True
    with pytest.raises(ValueError, match=r"keeps only the top-2 logits.*multi-label.*freeze again without --topk"):
        open_store(cfg, "train", ds, teacher_explainer=explainers[0])
