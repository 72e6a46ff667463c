"""`e2kd reproduce frozen --quick` end to end (Fashion-MNIST slice, about half a minute)."""

from __future__ import annotations

import json

import pytest

from e2kd.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.mark.timeout(180)
def test_reproduce_frozen_quick(tmp_path, capsys):
    assert main(["reproduce", "frozen", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "frozen" / "results.json").read_text())
    rows = {(r["pair"], r["method"]): r for r in res["rows"]}
    assert list(rows) == [
        ("GradCAM", "live KD"), ("GradCAM", "live e²KD"), ("GradCAM", "frozen e²KD"),
        ("B-cos", "live KD"), ("B-cos", "live e²KD"), ("B-cos", "frozen e²KD"), ("B-cos", "frozen e²KD, explain every 4"),
    ] and res["seeds"] == [0]
    for row in rows.values():
        assert len(row["agreement"]) == 1 and 0.0 <= row["agreement"][0] <= 100.0
        assert row["wall_s"][0] > 0 and 0 < row["train_s"][0] <= row["wall_s"][0]
    stores = res["stores"]
    assert stores["gradcam"]["images"] == 100 and stores["gradcam"]["bytes_per_image"] > 28 * 28 * 2  # fp16 28×28 maps
    # B-cos maps: the dynamic weights of the [x, 1 - x] encoding, 2 channels at 28×28 in fp16
    assert stores["bcos"]["images"] == 100 and stores["bcos"]["bytes_per_image"] > 2 * 28 * 28 * 2
    # explain_every=4: the explanation term is computed on steps 1 and 5 of 8 only
    log = (tmp_path / "frozen" / "bcos-e2kd-frozen-every4-quick-s0" / "metrics.jsonl").read_text().splitlines()
    exp = {r["step"]: r["exp_loss"] for r in map(json.loads, log) if r.get("split") == "train"}
    assert sorted(exp) == list(range(1, 9)) and [s for s, v in exp.items() if v > 0] == [1, 5]
    frozen_run = json.loads((tmp_path / "frozen" / "e2kd-frozen-quick-s0" / "results.json").read_text())
    assert frozen_run["frozen_store"]["teacher_check"] == "fingerprint"
    table = (tmp_path / "frozen" / "table.md").read_text()
    assert "frozen e²KD" in table and "Stores, built once" in table and "B-cos frozen e²KD" in table
    # The teacher goes to <out>/teachers/<name>, where other experiments find and reuse it.
    assert (tmp_path / "teachers" / "fmnist-teacher-quick" / "results.json").is_file()
