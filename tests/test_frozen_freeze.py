"""freeze(): an interrupted run continues to byte-identical shards; ranks split the shards."""

import os

import pytest
import torch

from e2kd.frozen import FrozenStore, StoreCorruptedError, finalize, freeze
from frozen_testlib import TinyImages, tiny_resnet

torch.set_num_threads(1)

KW = dict(batch_size=2, shard_size=3, progress=False)


def _files(path):
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path)) if not f.startswith(".")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ds, teacher = TinyImages(n=11, size=16), tiny_resnet()
    path = tmp_path_factory.mktemp("ref")
    freeze(teacher, "gradcam", ds, path, **KW)
    return ds, teacher, path


class Interrupt(Exception):
    pass


def _interrupt_after(teacher, calls):
    count = {"n": 0}

    def hook(_mod, _inp):
        count["n"] += 1
        if count["n"] > calls:
            raise Interrupt("power cut")

    return teacher.register_forward_pre_hook(hook)


def test_resume_after_interrupt_gives_byte_identical_store(reference, tmp_path):
    ds, teacher, ref = reference
    handle = _interrupt_after(teacher, 5)  # batches of 2 in shards of 3: shards 0 and 1 complete, 2 half done
    try:
        with pytest.raises(Interrupt):
            freeze(teacher, "gradcam", ds, tmp_path, **KW)
    finally:
        handle.remove()
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        FrozenStore(tmp_path)
    report = freeze(teacher, "gradcam", ds, tmp_path, **KW)
    assert report.shards_skipped == [0, 1] and report.shards_written == [2, 3] and report.images == 5
    assert report.ranks == 1 and report.all_images == 5 and report.all_shards_written == [2, 3]
    assert report.summary().startswith("froze 5 images in ") and "; 2 shards written, 2 already complete; " in report.summary()
    assert _files(tmp_path) == _files(ref)


def test_corrupted_shard_is_recomputed_on_rerun(reference, tmp_path):
    ds, teacher, ref = reference
    freeze(teacher, "gradcam", ds, tmp_path, **KW)
    shard = tmp_path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = freeze(teacher, "gradcam", ds, tmp_path, **KW)
    assert report.shards_written == [2] and report.shards_skipped == [0, 1, 3]
    assert _files(tmp_path) == _files(ref)


def test_resume_with_other_settings_is_refused(reference, tmp_path):
    ds, teacher, _ = reference
    handle = _interrupt_after(teacher, 2)
    try:
        with pytest.raises(Interrupt):
            freeze(teacher, "gradcam", ds, tmp_path, **KW)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match='map_dtype: "float16" there vs "bfloat16" now'):
        freeze(teacher, "gradcam", ds, tmp_path, map_dtype="bfloat16", **KW)


def test_ranks_write_their_own_shards_and_the_last_one_finalises(reference, tmp_path):
    ds, teacher, ref = reference
    r0 = freeze(teacher, "gradcam", ds, tmp_path, rank=0, world_size=2, **KW)
    assert r0.shards_written == [0, 2] and not r0.complete
    with pytest.raises(StoreCorruptedError, match=r"shards \[1, 3\] are missing"):
        finalize(tmp_path)
    r1 = freeze(teacher, "gradcam", ds, tmp_path, rank=1, world_size=2, **KW)
    assert r1.shards_written == [1, 3] and r1.complete and r1.store_size == 11
    assert _files(tmp_path) == _files(ref)
    assert finalize(tmp_path)["size"] == 11


def test_finalize_merges_shards_of_independent_ranks(reference, tmp_path, monkeypatch):
    import e2kd.frozen.freezer as fz

    ds, teacher, ref = reference
    freeze(teacher, "gradcam", ds, tmp_path, rank=0, world_size=2, **KW)
    # Rank 1 finishes while rank 0 is still writing, so neither sees all shards complete.
    real = fz._finalize
    monkeypatch.setattr(fz, "_finalize", lambda *a, **k: None)
    r1 = freeze(teacher, "gradcam", ds, tmp_path, rank=1, world_size=2, **KW)
    monkeypatch.setattr(fz, "_finalize", real)
    assert not r1.complete and not (tmp_path / "manifest.json").exists()
    manifest = finalize(tmp_path)
    assert manifest["num_shards"] == 4 and manifest["size"] == 11
    assert _files(tmp_path) == _files(ref)


def test_sample_index_must_be_its_position(tmp_path):
    class Shuffled(TinyImages):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            s["index"] = torch.tensor((int(i) + 1) % len(self))
            return s

    with pytest.raises(ValueError, match="must be its position"):
        freeze(tiny_resnet(), "gradcam", Shuffled(n=4), tmp_path, batch_size=2, progress=False)


def test_bad_arguments(tmp_path):
    ds, teacher = TinyImages(n=2), tiny_resnet()
    with pytest.raises(ValueError, match="map_dtype"):
        freeze(teacher, "gradcam", ds, tmp_path, batch_size=2, map_dtype="int8", progress=False)
    with pytest.raises(ValueError, match="rank"):
        freeze(teacher, "gradcam", ds, tmp_path, batch_size=2, rank=2, world_size=2, progress=False)
    with pytest.raises(ValueError, match="unknown explainer"):
        freeze(teacher, "nope", ds, tmp_path, batch_size=2, progress=False)
    ds.multilabel = True  # a sigmoid teacher's classes are independent: no softmax-style top-k
    with pytest.raises(ValueError, match="topk keeps the k largest logits .* multi-label"):
        freeze(teacher, "gradcam", torch.utils.data.Subset(ds, [0, 1]), tmp_path / "ml", batch_size=2, topk=2, progress=False)
    assert not (tmp_path / "ml").exists()


def test_maps_too_small_for_float16_are_warned_about_or_refused():
    """Tiny maps lose relative precision in float16 (warned, with the error made); a map that
    would be stored as all zeros is refused like an overflow."""
    from e2kd.frozen.freezer import _process_maps

    maps = torch.rand(2, 1, 4, 4) + 0.5
    maps[1] *= 1e-6  # peak ~1e-6: float16 spacing 6e-8 there
    with pytest.warns(UserWarning, match=r"below float16's smallest normal number .* stored with up to \d+\.\d % error"):
        out = _process_maps(maps, None, torch.float16, "float16")
    rel = ((out[1].float() - maps[1]).abs().max() / maps[1].abs().max()).item()
    assert 0 < rel < 0.1
    maps[1] *= 1e-3  # peak ~1e-9: all zeros in float16
    with pytest.raises(ValueError, match="underflow float16: a map whose largest magnitude is .* would be stored as zeros"):
        _process_maps(maps, None, torch.float16, "float16")
    assert _process_maps(maps, None, torch.bfloat16, "bfloat16")[1].abs().max() > 0
    zero = maps.clone()
    zero[1] = 0  # an all-zero map is exact in any dtype
    assert torch.equal(_process_maps(zero, None, torch.float16, "float16")[1], torch.zeros(1, 4, 4, dtype=torch.float16))


def _ddp_worker(rank, world_size, path, init_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        report = freeze(tiny_resnet(), "gradcam", TinyImages(n=11, size=16), path, **KW)
        assert report.complete and report.shards_written == list(range(rank, 4, world_size))
        # the report (rank 0 prints its summary) counts every rank's work, not this rank's
        assert report.ranks == 2 and report.all_images == 11 and report.all_shards_written == [0, 1, 2, 3]
        assert report.summary().startswith("froze 11 images on 2 ranks in ")
        assert "; 4 shards written, 0 already complete; store " in report.summary()
        assert report.summary().endswith(": 11 images, " + f"{report.bytes_per_image:.0f} bytes/image")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_distributed_ranks_share_the_work_and_rank0_writes_the_manifest(reference, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "store"
    mp.spawn(_ddp_worker, args=(2, str(out), str(tmp_path / "init")), nprocs=2)
    assert _files(out) == _files(reference[2])
