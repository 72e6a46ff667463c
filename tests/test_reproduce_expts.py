"""The fewshot, unrelated and vit reproductions at their quick size, end to end.

Each test runs ``run_experiment(NAME, quick=True)`` into one shared folder (the tiny quick
teachers are trained once, by the first test that needs them, and reused), then checks the
written ``results.json`` / ``table.md`` and recomputes accuracy and agreement of one student
from its saved weights.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from e2kd.data import build_dataset
from e2kd.reproduce import run_experiment
from e2kd.reproduce._fmnist import ensure_teacher
from e2kd.train.build import load_model_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("reproduce")


def _load(exp_dir: Path):
    with open(exp_dir / "results.json", encoding="utf-8") as fh:
        return json.load(fh), (exp_dir / "table.md").read_text(encoding="utf-8")


def _recompute(run_dir: Path, teacher_dir: Path, n: int):
    """Accuracy and agreement on the first n Fashion-MNIST test images, computed here."""
    ds = build_dataset("fashion_mnist", "test")
    x, y = ds.images[:n].float() / 255.0, ds.labels[:n]
    with torch.no_grad():
        s = load_model_file(run_dir, in_chans=1).eval()(x).argmax(1)
        t = load_model_file(teacher_dir, in_chans=1).eval()(x).argmax(1)
    return float((s == y).float().mean()), float((s == t).float().mean())


@pytest.mark.timeout(300)
def test_fewshot_quick(out):
    t0 = time.time()
    exp = run_experiment("fewshot", out_dir=out, quick=True)
    wall = time.time() - t0
    res, table = _load(exp)
    settings = {(r["pair"], r["k"], r["method"]) for r in res["rows"]}
    assert settings == {("GradCAM", "10", "KD"), ("GradCAM", "10", "e²KD"), ("GradCAM", "all", "KD"),
                        ("GradCAM", "all", "e²KD"), ("B-cos", "10", "KD"), ("B-cos", "10", "e²KD")}
    for row in res["rows"]:
        assert row["seeds"] == 1 and all(0.0 <= v <= 1.0 for v in row["accuracy"] + row["agreement"])
        assert f"| {row['pair']} | {row['k']} | {row['method']} |" in table
    assert "Published (Parchami-Araghi" in table and "Sweep (selection by val Acc" in table
    # the selection: KD's T and e²KD's λ maximise validation accuracy among the sweep runs
    for pair, chosen in res["chosen"].items():
        kd = [r for r in res["sweep"] if r["pair"] == pair and r["method"] == "KD"]
        e2 = [r for r in res["sweep"] if r["pair"] == pair and r["method"] == "e²KD"]
        assert chosen["T"] in [r["T"] for r in kd if r["val_accuracy"] == max(q["val_accuracy"] for q in kd)]
        assert chosen["lam"] in [r["lam"] for r in e2 if r["val_accuracy"] == max(q["val_accuracy"] for q in e2)]
        assert all(r["T"] == chosen["T"] for r in e2)
    # one student's scores, recomputed from its weights on the same test images
    rec = next(r for r in res["records"] if r["pair"] == "GradCAM" and r["k"] == "10" and r["method"] == "KD")
    acc, agr = _recompute(exp / "runs" / "gradcam-k10-lam0-T1-s0", out / "teachers" / "fmnist-teacher-1epoch-quick",
                          res["num_test_images"])
    assert rec["accuracy"] == pytest.approx(acc, abs=1e-6) and rec["agreement"] == pytest.approx(agr, abs=1e-6)
    # the k=10 run saw 10 images per class; "all" drew from the whole training split minus validation
    cfg = (exp / "runs" / "gradcam-k10-lam0-T1-s0" / "config.yaml").read_text()
    assert "shots: 10" in cfg and "val_per_class: 5" in cfg
    print(f"fewshot quick: {wall:.0f} s")


@pytest.mark.timeout(300)
def test_unrelated_quick(out):
    exp = run_experiment("unrelated", out_dir=out, quick=True)
    res, table = _load(exp)
    assert {(r["distilled with"], r["method"]) for r in res["rows"]} == {
        ("MNIST digits", "KD"), ("MNIST digits", "e²KD"), ("animal silhouettes", "KD"), ("animal silhouettes", "e²KD")}
    for name in ("MNIST digits", "animal silhouettes"):
        assert f"| {name} | KD |" in table and f"| {name} | e²KD |" in table
    # students were distilled on the unrelated images and scored on Fashion-MNIST test
    run = exp / "runs" / f"mnist-e2kd-lam{res['lam']:g}-T{res['temperature']:g}-s0"
    cfg = (run / "config.yaml").read_text()
    assert "name: mnist_digits" in cfg and "eval_name: fashion_mnist" in cfg
    rec = next(r for r in res["records"] if r["distilled with"] == "MNIST digits" and r["method"] == "e²KD")
    acc, agr = _recompute(run, out / "teachers" / "fmnist-teacher-1epoch-quick", res["num_test_images"])
    assert rec["accuracy"] == pytest.approx(acc, abs=1e-6) and rec["agreement"] == pytest.approx(agr, abs=1e-6)
    # T and λ were chosen on Fashion-MNIST training images 59000..59199 (validation), not on test
    assert [(r["method"], r["lam"], r["T"]) for r in res["sweep"]] == [("KD", 0.0, 1.0), ("e²KD", 1.0, 1.0)]
    val = json.loads((run / "train59000_scores.json").read_text())
    assert val["num_test_images"] == 200
    ds = build_dataset("fashion_mnist", "train")
    x, y = ds.images[59000:59200].float() / 255.0, ds.labels[59000:59200].long()
    with torch.no_grad():
        pred = load_model_file(run, in_chans=1).eval()(x).argmax(1)
    assert val["accuracy"] == pytest.approx(float((pred == y).float().mean()), abs=1e-6)
    assert res["sweep"][1]["val_accuracy"] == pytest.approx(val["accuracy"], abs=1e-6)


@pytest.mark.timeout(300)
def test_unrelated_photos_quick(out):
    from e2kd.models import create_model

    # two seeds: they share the store, so the photos must not depend on the run's seed
    exp = run_experiment("unrelated_photos", out_dir=out, quick=True, seeds=[0, 1])
    res, table = _load(exp)
    assert [(r["method"], r["seeds"]) for r in res["rows"]] == [("KD", 2), ("e²KD", 2)]
    assert "| KD |" in table and "| e²KD |" in table and "No labels, so no accuracy" in table
    assert (Path(res["store"]) / "manifest.json").is_file()
    rec = {r["method"]: r for r in res["records"] if r["seed"] == 0}
    for r in rec.values():
        assert 0.0 <= r["agreement"] <= 1.0 and -1.0 <= r["explanation_similarity"] <= 1.0
        assert r["num_test_images"] == 24 and r["num_val_images"] == 24 and 0.0 <= r["val_agreement"] <= 1.0
    # both students read the teacher from the store; the e2KD run's loss has the explanation term
    for method, lam in (("kd", 0.0), ("e2kd", 1.0)):
        cfg = (exp / "runs" / f"{method}-quick-test-s0" / "config.yaml").read_text()
        assert f"lam: {lam}" in cfg and "frozen: " + res["store"] in cfg
    # agreement recomputed here on the same 24 test images with the pretrained teacher
    ds = build_dataset("tuxobjects", "test", image_size=32, renders=1, counts={"train": 48})
    x = ds.images[:24].float() / 255.0
    with torch.no_grad():
        s = load_model_file(exp / "runs" / "e2kd-quick-test-s0", in_chans=3).eval()(x).argmax(1)
        t = create_model("efficientnet_lite0", pretrained=True).eval()(x).argmax(1)
    assert rec["e²KD"]["agreement"] == pytest.approx(float((s == t).float().mean()), abs=1e-6)


@pytest.mark.timeout(300)
def test_vit_quick(out):
    exp = run_experiment("vit", out_dir=out, quick=True)
    res, table = _load(exp)
    models = [r["model"] for r in res["rows"]]
    assert models == ["B-cos ResNet-18 teacher", "ViT on labels", "ViT KD", "ViT e²KD"]
    for m in models:
        assert f"| {m} |" in table
    png = (exp / "shift_equivariance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for label, c in res["curves"].items():
        assert c["shift"] == list(range(len(c["shift"])))
        # shift 0 compares a map with itself: cosine 1 (or 0 for an all-zero map), prediction unchanged
        assert c["cosine"][0] == pytest.approx(1.0, abs=1e-4) or c["cosine"][0] == pytest.approx(0.0, abs=1e-6)
        assert c["prediction_stability"][0] == 1.0
    vit_cfg = (exp / "runs" / "vit-e2kd-s0" / "config.yaml").read_text()
    assert "bcos_vit_tiny_small" in vit_cfg and "explainer: bcos" in vit_cfg


def test_ensure_teacher_waits_for_a_run_being_written(tmp_path):
    """A teacher folder that another process is writing (fresh files, no results.json) is not
    trained a second time: ensure_teacher waits, and gives up with a TimeoutError."""
    exp = tmp_path / "fewshot"
    busy = tmp_path / "teachers" / "t"
    busy.mkdir(parents=True)
    (busy / "metrics.jsonl").write_text("{}\n")
    t0 = time.time()
    with pytest.raises(TimeoutError, match="still being trained"):
        ensure_teacher(exp, "configs/fmnist/teacher.yaml", "t", wait_s=0.3, poll_s=0.1)
    assert 0.3 <= time.time() - t0 < 5
    assert sorted(p.name for p in busy.iterdir()) == ["metrics.jsonl"]  # nothing started


def test_ensure_teacher_reuses_a_finished_run(tmp_path):
    done = tmp_path / "teachers" / "t"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    old = time.time() - 10
    os.utime(done / "results.json", (old, old))
    assert ensure_teacher(tmp_path / "fewshot", "configs/fmnist/teacher.yaml", "t") == done


def test_a_finished_run_made_with_other_settings_is_refused_not_reused(tmp_path):
    """Quick and full runs of an experiment share run names: a full reproduction into the folder
    of a quick one reused the quick teachers and students and mixed them into its table."""
    import sys

    import yaml

    from e2kd.reproduce._common import run_config

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train_helpers import base_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, "x", **{"optim.max_steps": 1, "model.name": "tiny_test_net"})))
    first = run_config(cfg, ["optim.max_steps=1"], mode="teacher", out_dir=tmp_path / "out", name="t")
    stamp = (first / "results.json").stat().st_mtime_ns
    assert run_config(cfg, ["optim.max_steps=1", "log_every=1"], mode="teacher", out_dir=tmp_path / "out", name="t") == first
    assert (first / "results.json").stat().st_mtime_ns == stamp  # reused, not retrained
    with pytest.raises(ValueError, match=r"holds a finished run made with other settings \(changed: optim\).*--out"):
        run_config(cfg, ["optim.max_steps=2"], mode="teacher", out_dir=tmp_path / "out", name="t")


def test_quick_and_full_reproductions_default_to_separate_folders(monkeypatch):
    from e2kd import cli

    seen = []
    monkeypatch.setattr("e2kd.reproduce.run_experiment", lambda name, out_dir, quick, seeds: seen.append(out_dir) or out_dir)
    assert cli.main(["reproduce", "fewshot", "--quick"]) == 0 and cli.main(["reproduce", "fewshot"]) == 0
    assert cli.main(["reproduce", "fewshot", "--quick", "--out", "elsewhere"]) == 0
    assert seen == ["runs/reproduce-quick", "runs/reproduce", "elsewhere"]
