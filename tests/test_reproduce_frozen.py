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
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["live KD", "live e²KD", "frozen e²KD"] and res["seeds"] == [0]
    for row in rows.values():
        assert len(row["agreement"]) == 1 and 0.0 <= row["agreement"][0] <= 100.0
        assert row["wall_s"][0] > 0 and 0 < row["train_s"][0] <= row["wall_s"][0]
    assert res["store"]["images"] == 100 and res["store"]["bytes_per_image"] > 28 * 28 * 2  # fp16 28×28 maps
    frozen_run = json.loads((tmp_path / "frozen" / "e2kd-frozen-quick-s0" / "results.json").read_text())
    assert frozen_run["frozen_store"]["teacher_check"] == "fingerprint"
    table = (tmp_path / "frozen" / "table.md").read_text()
    assert "frozen e²KD" in table and "Store: built once" in table
    # The teacher goes to <out>/teachers/<name>, where other experiments find and reuse it.
    assert (tmp_path / "teachers" / "fmnist-teacher-quick" / "results.json").is_file()
