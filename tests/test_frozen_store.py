"""The frozen store: what freeze() writes is what FrozenStore returns, and a store that does not
belong to the run, or whose bytes changed, is refused instead of read."""

import json
import math
import os
import pickle

import pytest
import torch
from torch import nn

import e2kd
from e2kd.frozen import (
    FrozenStore,
    StoreCorruptedError,
    StoreMismatchError,
    compress_logits,
    dataset_fingerprint,
    explainer_identity,
    freeze,
    reconstruct_logits,
    teacher_fingerprint,
)
from e2kd.explain import GradCAM
from frozen_testlib import PixelNet, TinyImages, tiny_resnet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ds = TinyImages(n=10, size=16)
    teacher = tiny_resnet()
    path = tmp_path_factory.mktemp("store")
    report = freeze(teacher, e2kd.GradCAM(), ds, path, batch_size=4, shard_size=4, progress=False)
    return ds, teacher, path, report


def test_store_returns_the_teachers_logits_and_maps(built):
    ds, teacher, path, report = built
    store = FrozenStore(path, expect=dict(teacher_id=teacher_fingerprint(teacher), explainer="gradcam", dataset_id=dataset_fingerprint(ds)))
    assert len(store) == 10 and store.num_classes == 4 and store.map_shape == (1, 16, 16)
    x = torch.stack([ds[i]["image"] for i in range(10)])
    ref = e2kd.GradCAM()(teacher, x)
    for i in range(10):
        item = store[i]
        assert item["maps"].dtype == torch.float16
        torch.testing.assert_close(item["logits"], ref.logits[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(item["maps"].float(), ref.maps[i], atol=2e-3 * float(ref.maps.abs().max()) + 1e-6, rtol=1e-3)
        assert int(item["target"]) == int(ref.logits[i].argmax())
    assert report.complete and report.images == 10 and report.shards_written == [0, 1, 2]
    sizes = sum(os.path.getsize(path / f"shard-{s:05d}.safetensors") for s in range(3))
    assert report.bytes_per_image == pytest.approx(sizes / 10)


def test_manifest_records_identities_and_checksums(built):
    ds, teacher, path, _ = built
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == e2kd.frozen.FORMAT_VERSION
    assert m["teacher_id"] == teacher_fingerprint(teacher)
    assert m["explainer"] == {"name": "gradcam", "settings": {"layer": None, "relu": True, "upsample": True}}
    # a chosen own_output is part of the identity; the default is not (stores made before it existed still match)
    assert explainer_identity(GradCAM(own_output=True))["settings"]["own_output"] is True
    assert "own_output" not in explainer_identity(GradCAM())["settings"]
    assert m["dataset"]["name"] == "tiny" and m["dataset"]["split"] == "train" and m["dataset"]["size"] == 10
    assert [s["count"] for s in m["shards"]] == [4, 4, 2]
    import hashlib

    for s in m["shards"]:
        data = (path / s["file"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert not (path / ".parts").exists()


def test_teacher_fingerprint_of_file_and_state_dict(tmp_path):
    from safetensors.torch import save_file

    a, b = tiny_resnet(seed=0), tiny_resnet(seed=1)
    assert teacher_fingerprint(a) == teacher_fingerprint(a.state_dict()) != teacher_fingerprint(b)
    save_file(a.state_dict(), tmp_path / "a.safetensors")
    import hashlib

    expected = hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    assert teacher_fingerprint(tmp_path / "a.safetensors") == "file-sha256:" + expected


def test_teacher_fingerprint_sees_the_input_standardisation():
    from e2kd.models import create_model

    torch.manual_seed(0)
    imagenet = create_model("resnet18", num_classes=3)
    same = create_model("resnet18", num_classes=3)
    same.load_state_dict(imagenet.state_dict())
    raw = create_model("resnet18", num_classes=3, input_norm="none")
    raw.load_state_dict(imagenet.state_dict())
    # identical state dicts (the statistics are not in them), but not the same teacher
    assert teacher_fingerprint(imagenet.state_dict()) == teacher_fingerprint(raw)
    assert teacher_fingerprint(imagenet) == teacher_fingerprint(same) != teacher_fingerprint(raw)


def test_store_of_another_teacher_is_refused_naming_both_ids(built):
    _, teacher, path, _ = built
    other = teacher_fingerprint(tiny_resnet(seed=5))
    with pytest.raises(StoreMismatchError) as err:
        FrozenStore(path, expect=dict(teacher_id=other))
    msg = str(err.value)
    assert "different teacher_id" in msg and teacher_fingerprint(teacher) in msg and other in msg
    assert err.value.field == "teacher_id"


@pytest.mark.parametrize(
    "want, shown",
    [("inputxgradient", ["'gradcam'", "'inputxgradient'"]), (e2kd.GradCAM(layer="layer3"), ['"layer": null', '"layer": "layer3"'])],
)
def test_store_of_another_explainer_is_refused(built, want, shown):
    with pytest.raises(StoreMismatchError) as err:
        FrozenStore(built[2], expect=dict(explainer=want))
    assert "different explainer" in str(err.value) and all(s in str(err.value) for s in shown)
    FrozenStore(built[2], expect=dict(explainer=e2kd.GradCAM()))  # same name and settings: accepted


def test_store_of_another_dataset_is_refused(built):
    ds, _, path, _ = built
    other = dataset_fingerprint(TinyImages(n=10, size=16, seed=1))
    with pytest.raises(StoreMismatchError) as err:
        FrozenStore(path, expect=dict(dataset_id=other))
    msg = str(err.value)
    assert "different dataset_id" in msg and other["id"] in msg and dataset_fingerprint(ds)["id"] in msg


def test_file_and_state_ids_are_told_apart(built, tmp_path):
    _, teacher, path, _ = built
    (tmp_path / "w.bin").write_bytes(b"weights")
    with pytest.raises(StoreMismatchError, match="different kinds"):
        FrozenStore(path, expect=dict(teacher_id=teacher_fingerprint(tmp_path / "w.bin")))


def _copy_store(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_truncated_shard_is_detected_on_open(built, tmp_path):
    path = _copy_store(built[2], tmp_path / "s")
    shard = path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreCorruptedError, match="shard-00001.safetensors has .* bytes but the manifest records"):
        FrozenStore(path)


def test_missing_shard_is_detected_on_open(built, tmp_path):
    path = _copy_store(built[2], tmp_path / "s")
    (path / "shard-00002.safetensors").unlink()
    with pytest.raises(StoreCorruptedError, match="shard-00002.safetensors is missing"):
        FrozenStore(path)


def test_flipped_byte_is_detected_before_any_value_is_read(built, tmp_path):
    path = _copy_store(built[2], tmp_path / "s")
    shard = path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: sizes and header stay valid
    shard.write_bytes(bytes(data))
    store = FrozenStore(path)  # lazy: sizes only
    assert store[0]["logits"].shape == (4,)  # shard 0 is intact
    with pytest.raises(StoreCorruptedError, match="shard-00001.safetensors is corrupted"):
        store[5]
    with pytest.raises(StoreCorruptedError, match="shard-00001"):
        store[4]  # still refused on every later access
    with pytest.raises(StoreCorruptedError):
        FrozenStore(path, verify="eager")


def test_missing_manifest_and_other_format_version(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="e2kd freeze"):
        FrozenStore(tmp_path)
    path = _copy_store(built[2], tmp_path / "s")
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreMismatchError, match="format version 99"):
        FrozenStore(path)


def test_store_pickles_without_open_handles(built):
    store = FrozenStore(built[2])
    a = store[9]
    clone = pickle.loads(pickle.dumps(store))
    torch.testing.assert_close(clone[9]["maps"], a["maps"])


def test_index_out_of_range(built):
    with pytest.raises(IndexError, match="out of range"):
        FrozenStore(built[2])[10]


def test_topk_reconstruction_by_hand():
    z = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    parts = compress_logits(z, 2)
    assert parts["topk_indices"].tolist() == [[0, 2]]
    assert parts["rest_logsumexp"].item() == pytest.approx(math.log(math.exp(0.0) + math.exp(-1.0)))
    zh = reconstruct_logits(parts["topk_values"], parts["topk_indices"], parts["rest_logsumexp"], 4)
    fill = math.log((1 + math.exp(-1)) / 2)
    torch.testing.assert_close(zh, torch.tensor([[2.0, fill, 1.0, fill]]))
    p, ph = z.softmax(1), zh.softmax(1)
    torch.testing.assert_close(ph[0, [0, 2]], p[0, [0, 2]])  # top-k probabilities exact at T = 1
    assert ph[0, 1].item() == pytest.approx((p[0, 1] + p[0, 3]).item() / 2)  # the rest spread evenly
    with pytest.raises(ValueError, match="topk=None"):
        compress_logits(z, 4)


def test_topk_store_with_k_eq_c_minus_1_is_exact(tmp_path):
    ds = TinyImages(n=5, size=16)
    teacher = tiny_resnet()
    freeze(teacher, "gradcam", ds, tmp_path, batch_size=5, topk=3, progress=False)
    store = FrozenStore(tmp_path)
    logits = teacher(torch.stack([ds[i]["image"] for i in range(5)]))
    torch.testing.assert_close(store.batch(range(5))["logits"], logits, atol=1e-5, rtol=1e-5)


def test_map_size_and_bfloat16(tmp_path):
    ds = TinyImages(n=4, size=16)
    teacher = PixelNet()
    freeze(teacher, "inputxgradient", ds, tmp_path, batch_size=4, map_size=8, map_dtype="bfloat16", progress=False)
    store = FrozenStore(tmp_path)
    assert store.map_shape == (1, 8, 8) and store[0]["maps"].dtype == torch.bfloat16
    full = e2kd.InputXGradient()(teacher, ds[0]["image"][None]).maps
    # A 2× antialiased bilinear shrink keeps the mean of the map.
    assert store[0]["maps"].float().mean().item() == pytest.approx(full.mean().item(), rel=2e-2, abs=1e-3)


def test_fp16_overflow_is_refused(tmp_path):
    ds = TinyImages(n=2, size=8)
    teacher = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.LazyLinear(2))
    teacher(torch.zeros(1, 3, 8, 8))
    with torch.no_grad():
        teacher[0].weight.fill_(1e4)
        teacher[2].weight.fill_(1e4)
    with pytest.raises(ValueError, match="overflow float16.*bfloat16"):
        freeze(teacher, "inputxgradient", ds, tmp_path, batch_size=2, progress=False)


def test_dataset_fingerprint_sees_subsets_and_contents():
    base = TinyImages(n=6, size=8)
    a = dataset_fingerprint(torch.utils.data.Subset(base, [0, 1, 2]))
    b = dataset_fingerprint(torch.utils.data.Subset(base, [0, 1, 3]))
    assert a["size"] == b["size"] == 3 and a["id"] != b["id"]
    assert dataset_fingerprint(base) == dataset_fingerprint(TinyImages(n=6, size=8))
    changed = TinyImages(n=6, size=8)
    changed.images[5, 0, 0, 0] += 0.5  # the last image is always probed
    assert dataset_fingerprint(changed)["id"] != dataset_fingerprint(base)["id"]
