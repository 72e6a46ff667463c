"""Nothing untrusted is executed: every file the project reads is safetensors, a weights-only
``torch.load`` or a restricted unpickler; YAML is read safely; config values are never evaluated.

A pickle whose loading would run a shell command (``os.system("touch MARKER")`` through
``__reduce__``) is planted as a teacher weight file, a student initial checkpoint, a training
checkpoint and a B-cos release file; each load is refused with a clear error and the marker file
never appears.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from _train_helpers import base_config
from e2kd.bcos.weights import load_bcos_v2_weights
from e2kd.models import create_model
from e2kd.train import config_from_dict, load_config, run

ROOT = Path(__file__).resolve().parent.parent


class _RunsCode:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, style: str) -> Path:
    """Write a code-running pickle to ``path``: a raw pickle or a ``torch.save`` zip archive."""
    payload = {"state_dict": {"conv1.weight": _RunsCode(marker)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    return path


def _never_ran(marker: Path) -> None:
    assert not marker.exists(), "the planted pickle ran code"


@pytest.mark.parametrize("style", ["pickle", "torch_save"])
@pytest.mark.parametrize("where", ["teacher.checkpoint", "model.checkpoint"])
def test_planted_pickle_as_weights_is_refused_by_the_trainer(tmp_path, style, where):
    marker = tmp_path / "MARKER"
    evil = _plant(tmp_path / "weights.pt", marker, style)
    teacher = tmp_path / "weights.pt" if where == "teacher.checkpoint" else None
    if teacher is None:  # a harmless teacher, so that the student's checkpoint is what gets read
        from e2kd.train.build import build_model, save_model

        save_model(tmp_path / "t" / "model.safetensors", build_model("resnet8_small", {"width": 4}, num_classes=4, in_chans=3))
        teacher = tmp_path / "t"
    extra = {"teacher.checkpoint": str(teacher), "teacher.name": "resnet8_small", "teacher.kwargs": {"width": 4}}
    if where == "model.checkpoint":
        extra["model.checkpoint"] = str(evil)
    cfg = config_from_dict(base_config(tmp_path / "runs", "x", **extra))
    with pytest.raises(ValueError, match=r"could not be read safely \(torch.load\(weights_only=True\) refused it"):
        run(cfg, mode="distill")
    _never_ran(marker)
    assert not (tmp_path / "runs" / "x").exists()  # refused before the run folder was made


@pytest.mark.parametrize("how", ["resume=path", "resume=auto"])
def test_planted_pickle_as_a_training_checkpoint_is_refused(tmp_path, how):
    marker = tmp_path / "MARKER"
    if how == "resume=path":
        evil = _plant(tmp_path / "ckpt.safetensors", marker, "torch_save")
        resume = str(evil)
    else:  # dropped into the run folder under a checkpoint's name
        _plant(tmp_path / "runs" / "x" / "checkpoints" / "step_00000009.safetensors", marker, "pickle")
        resume = "auto"
    cfg = config_from_dict(base_config(tmp_path / "runs", "x", resume=resume))
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        run(cfg, mode="teacher")
    _never_ran(marker)


@pytest.mark.parametrize("name", ["release.pth", "release.safetensors"])
def test_planted_pickle_as_a_bcos_release_file_is_refused(tmp_path, name):
    marker = tmp_path / "MARKER"
    evil = _plant(tmp_path / name, marker, "torch_save")
    model = create_model("bcos_resnet8_small", num_classes=4, width=4)
    with pytest.raises(ValueError, match="weights_only=True|not a readable safetensors file"):
        load_bcos_v2_weights(model, evil)
    _never_ran(marker)


def test_config_values_are_never_evaluated(tmp_path):
    marker = tmp_path / "MARKER"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    with pytest.raises(ValueError, match="not a plain YAML value"):
        config_from_dict({}, [f"name={tag}"])
    (tmp_path / "c.yaml").write_text(f"data:\n  kwargs:\n    root: {tag}\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")
    for text in ("data.root=${oc.env:HOME}", "data.kwargs={a: '${oc.decode:1}'}", "model.kwargs={w: [1, '${x}']}"):
        with pytest.raises(ValueError, match="interpolation"):
            config_from_dict({}, [text])
    (tmp_path / "i.yaml").write_text("optim:\n  lr: ${oc.env:LR}\n")
    with pytest.raises(ValueError, match="interpolation"):
        load_config(tmp_path / "i.yaml")
    _never_ran(marker)


# ---- static audit of every load path in src/ ------------------------------------------------

_RULES = [
    (re.compile(r"torch\.load\("), lambda line: "weights_only=True" in line, "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.(loads?|load)\("), lambda line: False, "pickle.load"),
    (re.compile(r"\bUnpickler\)"), lambda line: "_NumpyOnlyUnpickler" in line, "an unrestricted Unpickler subclass"),
    (re.compile(r"yaml\.(load|unsafe_load|full_load|load_all)\("), lambda line: False, "yaml.load without the safe loader"),
    (re.compile(r"allow_pickle\s*=\s*True"), lambda line: False, "np.load(allow_pickle=True)"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), lambda line: False, "eval/exec"),
    (re.compile(r"\b(dill|joblib|marshal|shelve|jsonpickle)\b"), lambda line: False, "a pickle-based loader"),
    (re.compile(r"torch\.jit\.load|torch\.package"), lambda line: False, "TorchScript / torch.package (pickles)"),
    (re.compile(r"OmegaConf\.(resolve|create)\("), lambda line: False, "OmegaConf resolution of config text"),
]


def test_every_load_path_in_src_is_safe():
    problems = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.lstrip().startswith(('"', "'", "``")):
                continue
            for pattern, allowed, what in _RULES:
                if pattern.search(code) and not allowed(code):
                    problems.append(f"{path.relative_to(ROOT)}:{no}: {what}: {line.strip()}")
    assert not problems, "\n".join(problems)
    unpickler = (ROOT / "src" / "e2kd" / "data" / "unrelated.py").read_text()
    assert "def find_class" in unpickler  # the one Unpickler subclass restricts the globals it builds


def test_restricted_unpickler_refuses_the_planted_pickle(tmp_path):
    import gzip

    from e2kd.data.unrelated import restricted_numpy_unpickle

    marker = tmp_path / "MARKER"
    (tmp_path / "a.gz").write_bytes(gzip.compress(pickle.dumps(_RunsCode(marker))))
    with pytest.raises(ValueError, match="refusing to load posix.system|refusing to load os.system"):
        restricted_numpy_unpickle(tmp_path / "a.gz")
    _never_ran(marker)


def test_torch_at_least_2_10_is_required_and_installed():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = [d for d in deps if re.match(r"torch\b(?!vision)", d)]
    assert torch_req == ["torch>=2.10"], torch_req
    major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert (major, minor) >= (2, 10), torch.__version__


# ---- corrupt (not malicious) files get an error that says so ---------------------------------


def _corrupt_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, good)
    data = good.read_bytes()
    files = {"text": b"# a README, not weights\n", "truncated_zip": data[: len(data) // 2], "empty": b""}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(content)
    return out


@pytest.mark.parametrize("kind, reason", [
    ("text", "its contents are not a pickle stream"),
    ("truncated_zip", "failed finding central directory"),
    ("empty", "the file ends early: empty or truncated"),
])
def test_a_corrupt_weights_file_is_called_unreadable_not_unsafe(tmp_path, kind, reason):
    from e2kd.models.weights import read_state_dict

    path = _corrupt_files(tmp_path)[kind]
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert msg.startswith(f"weights file {str(path)!r} is not a readable checkpoint (corrupt, truncated")
    assert reason in msg
    assert "weights_only" not in msg and "safely" not in msg


@pytest.mark.parametrize("style", ["pickle", "torch_save"])
def test_a_refused_pickle_names_what_it_imports(tmp_path, style):
    from e2kd.models.weights import read_state_dict

    marker = tmp_path / "MARKER"
    evil = _plant(tmp_path / "w.pt", marker, style)
    with pytest.raises(ValueError, match=r"could not be read safely \(torch.load\(weights_only=True\) refused it: "
                                         r"the file imports (posix|nt)\.system, .*convert it to safetensors"):
        read_state_dict(evil)
    _never_ran(marker)


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_a_corrupt_model_file_read_through_its_record_is_a_clear_error(tmp_path, damage):
    from e2kd.train.build import build_model, load_model_file, save_model

    run_dir = tmp_path / "teacher"
    save_model(run_dir / "model.safetensors", build_model("resnet8_small", {"width": 4}, num_classes=4, in_chans=3))
    path = run_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"# README\n" if damage == "text" else data[: len(data) - 100])
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r} is not a readable safetensors file (corrupt or truncated")):
        load_model_file(run_dir)
    # the same file as a distillation teacher (teacher.name unset): refused before the run folder exists
    cfg = config_from_dict(base_config(tmp_path / "runs", "x", **{"teacher.checkpoint": str(run_dir)}))
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        run(cfg, mode="distill")
    assert not (tmp_path / "runs" / "x").exists()


def test_an_unreadable_explicit_resume_checkpoint_says_to_pass_another(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    cfg = config_from_dict(base_config(tmp_path / "runs", "x", resume=str(bad)))
    with pytest.raises(ValueError) as info:
        run(cfg, mode="teacher")
    msg = str(info.value)
    assert msg.startswith(f"resume={str(bad)!r}: the named checkpoint is not a readable safetensors file")
    assert msg.endswith("pass another checkpoint file, or resume=auto to continue from the run folder's newest one")
    assert "delete it" not in msg
