"""Two gloo processes under torchrun give the loss and student gradients of one process on
the full batch (the test model has no batch statistics, so sharding cannot change them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import TinyBcosNet, TinyNet
from e2kd.train.checkpoint import save_weights

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _env():
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize("kind", ["gradcam", "bcos"])  # bcos: the explanation's second-order pass under DDP
def test_two_process_ddp_matches_one_process(tmp_path, kind):
    torch.manual_seed(3)
    teacher = tmp_path / "teacher.safetensors"
    net = TinyBcosNet if kind == "bcos" else TinyNet
    save_weights(teacher, net(num_classes=4, in_chans=3, width=6).state_dict())
    worker = str(HERE / "_ddp_worker.py")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, worker, str(teacher), str(one), str(tmp_path / "w1"), kind], check=True, env=_env(),
                   timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0", "--rdzv-backend=c10d",
         "--rdzv-endpoint=localhost:0", worker, str(teacher), str(two), str(tmp_path / "w2"), kind],
        check=True, env=_env(), timeout=300,
    )
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys() and len(a) > 1
    assert float(a["loss"]) > 0
    torch.testing.assert_close(b["loss"], a["loss"], atol=1e-5, rtol=0)
    for k in a:
        assert a[k].abs().max() > 0, k  # every student parameter gets a gradient
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    # Both runs wrote their results; the DDP run evaluated on both ranks and reduced the counts.
    import json

    r1 = json.loads((tmp_path / "w1" / "ddp" / "results.json").read_text())
    r2 = json.loads((tmp_path / "w2" / "ddp" / "results.json").read_text())
    assert r2["world_size"] == 2 and r2["num_images"] == r1["num_images"] == 32
    assert r2["accuracy"] == pytest.approx(r1["accuracy"]) and r2["agreement"] == pytest.approx(r1["agreement"])


def _evaluate_on_rank(rank, init_file, out_dir):
    """Rank ``rank`` of two gloo processes evaluates its share of a one-image split (rank 1's
    share is empty, as ``eval_batches`` gives it) and writes what it got back."""
    import json

    import torch.distributed as dist

    from e2kd.train.distributed import DistInfo, all_reduce_sum
    from e2kd.train.evaluate import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        torch.manual_seed(0)
        student, teacher = TinyNet(num_classes=4, in_chans=3, width=4), TinyNet(num_classes=4, in_chans=3, width=4)
        x = torch.rand(1, 3, 16, 16)
        batches = [{"image": x, "label": torch.tensor([2])}] if rank == 0 else []
        res = evaluate(student, batches, teacher=teacher, info=info)
        # the reduction itself: keys only one rank holds are summed with 0 from the other
        sums = all_reduce_sum({"a": 1.0, "only0": 5.0} if rank == 0 else {"a": 2.0}, info)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"res": res, "sums": sums}))
    finally:
        dist.destroy_process_group()


def test_evaluation_with_an_empty_rank_equals_one_process(tmp_path):
    """A split smaller than the number of ranks leaves a rank with no images: it used to send a
    shorter list of sums than the others (no labels, no teacher outputs seen), and the reduction
    failed on every rank. The ranks now reduce the union of their keys."""
    import json

    import torch.multiprocessing as mp

    from e2kd.train.evaluate import evaluate

    mp.spawn(_evaluate_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    student, teacher = TinyNet(num_classes=4, in_chans=3, width=4), TinyNet(num_classes=4, in_chans=3, width=4)
    x = torch.rand(1, 3, 16, 16)
    alone = evaluate(student, [{"image": x, "label": torch.tensor([2])}], teacher=teacher)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sums"] == {"a": 3.0, "only0": 5.0}
        assert got["res"].keys() == alone.keys() and got["res"]["num_images"] == 1
        for k, v in alone.items():
            assert got["res"][k] == pytest.approx(v), k
