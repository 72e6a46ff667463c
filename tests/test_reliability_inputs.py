"""Bad-input catalogue, the cases not already covered elsewhere: each is a clear error (the
message names the problem) raised before any training step.

The rest of the catalogue lives beside the code it checks (see docs/results/reliability.md):
tests/test_train_inputs.py (class counts, explainer layer, channel counts, k-shot, another
architecture's weights), tests/test_train_config.py and tests/test_cli.py (unknown and ill-typed
keys), tests/test_frozen_store.py and tests/test_frozen_dataset.py (a store of another teacher,
explainer or dataset), tests/test_data_formats.py (unreadable images), tests/test_data_sampling.py
(k-shot larger than a class), tests/test_bcos_layers.py (B-cos channel count), tests/test_distiller.py.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from _train_helpers import base_config
from e2kd.cli import main
from e2kd.train import config_from_dict, run
from e2kd.train.build import build_model, save_model


def _fails_before_training(tmp_path, values, mode, exc, match):
    with pytest.raises(exc, match=match):
        run(config_from_dict(values), mode=mode)
    assert not (tmp_path / "x" / "checkpoints").exists()
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def bcos_teacher(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bt") / "teacher"
    save_model(d / "model.safetensors", build_model("bcos_resnet8_small", {"width": 4}, num_classes=4, in_chans=3))
    return d


def test_empty_dataset(tmp_path):
    values = base_config(tmp_path, "x", **{"data.kwargs": {"num_samples": 0}})
    _fails_before_training(tmp_path, values, "teacher", ValueError, r"split 'train' is empty")


def test_bcos_teacher_given_images_with_another_channel_count(tmp_path, bcos_teacher):
    values = base_config(tmp_path, "x", **{
        "teacher.checkpoint": str(bcos_teacher), "distill.explainer": "bcos", "model.name": "bcos_resnet8_small",
        "model.kwargs": {"width": 4}, "data.kwargs": {"num_samples": 64, "in_chans": 1},
        "data.eval_kwargs": {"num_samples": 32, "in_chans": 1}})
    _fails_before_training(tmp_path, values, "distill", ValueError, "takes 3 input channels but the data has 1")


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 4, "in_chans": 6}, r"in_chans may not be set .* 3 channels"),
    ({"width": 4, "num_classes": 3}, r"num_classes may not be set .* 4 classes"),
    ({"widht": 4}, r"model 'resnet8_small' does not accept the kwargs \{'widht': 4\}.*unexpected keyword argument 'widht'"),
])
def test_model_kwargs_that_clash_or_do_not_exist(tmp_path, kwargs, match):
    values = base_config(tmp_path, "x", **{"model.kwargs": kwargs})
    _fails_before_training(tmp_path, values, "teacher", ValueError, match)


@pytest.mark.parametrize("mode", ["teacher", "distill"])
def test_multilabel_setting_that_contradicts_the_data(tmp_path, mode):
    single = base_config(tmp_path, "x", **{"distill.multilabel": True, "teacher.checkpoint": str(tmp_path / "t")})
    _fails_before_training(
        tmp_path, single, mode, ValueError,
        r"distill.multilabel=true but the training data 'synthetic' has one class index per image \(single-label\); "
        r"set distill.multilabel=null \(it follows the data\) or distill.multilabel=false")
    multi = base_config(tmp_path, "x", **{
        "distill.multilabel": False, "teacher.checkpoint": str(tmp_path / "t"),
        "data.kwargs": {"num_samples": 64, "multilabel": True}, "data.eval_kwargs": {"num_samples": 32, "multilabel": True}})
    _fails_before_training(tmp_path, multi, mode, ValueError,
                           r"distill.multilabel=false but the training data 'synthetic' has multi-hot labels")
    assert not (tmp_path / "x").exists()


def test_multilabel_setting_that_contradicts_the_evaluation_data(tmp_path):
    values = base_config(tmp_path, "x", **{"distill.multilabel": True, "data.kwargs": {"num_samples": 64, "multilabel": True},
                                           "data.eval_kwargs": {"num_samples": 32, "multilabel": False}})
    _fails_before_training(tmp_path, values, "teacher", ValueError,
                           r"distill.multilabel=true but the evaluation data 'synthetic' has one class index per image")


def test_resume_from_a_checkpoint_of_another_architecture(tmp_path):
    other = run(config_from_dict(base_config(tmp_path, "other", **{"model.name": "tiny_test_net", "optim.max_steps": 1})),
                mode="teacher")
    ckpt = next((other / "checkpoints").glob("step_*.safetensors"))
    values = base_config(tmp_path, "x", resume=str(ckpt))
    _fails_before_training(tmp_path, values, "teacher", ValueError, r"checkpoint does not fit the model.*another architecture")


def test_resume_auto_with_another_model_is_refused(tmp_path):
    first = base_config(tmp_path, "x", **{"optim.max_steps": 1})
    run(config_from_dict(first), mode="teacher")
    second = base_config(tmp_path, "x", **{"optim.max_steps": 1, "model.name": "tiny_test_net"})
    with pytest.raises(ValueError, match=r"resuming .* with a different config \(changed: model\)"):
        run(config_from_dict(second), mode="teacher")


def test_resume_of_a_run_saved_before_a_config_field_existed(tmp_path):
    """A field added to the schema since a run started (saved config.yaml lacks it) takes its
    default: the run resumes. A changed value is still refused."""
    values = base_config(tmp_path, "x", **{"optim.max_steps": 2, "checkpoint_every": 1})
    run_dir = run(config_from_dict(values), mode="teacher")
    (run_dir / "results.json").unlink()  # as if stopped after its last checkpoint
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["guidance"]["contrast"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert run(config_from_dict(values), mode="teacher") == run_dir
    assert (run_dir / "results.json").is_file()
    (run_dir / "results.json").unlink()
    changed = base_config(tmp_path, "x", **{"optim.max_steps": 2, "checkpoint_every": 1, "guidance.weight": 3.0})
    with pytest.raises(ValueError, match=r"different config \(changed: guidance\)"):
        run(config_from_dict(changed), mode="teacher")


def test_cli_reports_bad_input_as_one_error_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, "x")))
    cases = [
        ["name=!!python/object/apply:os.getcwd []"],  # refused by the safe loader
        ["model.kwargs={widht: 4}"],  # a TypeError inside the model constructor
        ["optim.lr=fast"],
    ]
    for overrides in cases:
        assert main(["train-teacher", str(cfg), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("e2kd train-teacher: error: ") and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_a_device_name_torch_does_not_know_is_a_clear_error(device):
    from e2kd.train.distributed import init_distributed

    with pytest.raises(ValueError) as info:
        init_distributed(device)
    assert str(info.value) == (
        f"device={device!r} is not a device name; use device=auto (a GPU if there is one), cpu, cuda or cuda:N "
        "(N: the GPU's index)"
    )
