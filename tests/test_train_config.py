"""Typed configs: every shipped config validates; typos, bad types and code in YAML are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2kd.train.config import Amp, OptimizerName, config_from_dict, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


def test_configs_exist_for_the_paper_and_cpu_experiments():
    names = {str(p.relative_to(p.parents[1])) for p in CONFIGS}
    for expected in (
        "imagenet/r34_r18_gradcam_50shot_e2kd.yaml",
        "imagenet/bcos_d169_r18_200shot_kd.yaml",
        "imagenet/bcos_r34_r18_full_e2kd.yaml",
        "imagenet/bcos_d169_vit_tiny_e2kd.yaml",
        "sun397/imagenet_teacher_sun_images_e2kd.yaml",
        "waterbirds/r50_r18_e2kd.yaml",
        "voc/epg_teacher_r50_r18_e2kd.yaml",
        "voc/iou_teacher_r50_r18_kd.yaml",
        "fmnist/teacher.yaml",
        "fmnist/fewshot_gradcam_e2kd.yaml",
        "fmnist/fewshot_bcos_kd.yaml",
        "fmnist/unrelated_mnist_e2kd.yaml",
        "tuxbirds/e2kd.yaml",
        "tuxscenes/iou_teacher_kd.yaml",
    ):
        assert expected in names, expected


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_file_validates(path):
    cfg = load_config(path)
    assert cfg.name and cfg.optim.lr > 0


def test_paper_recipes():
    bcos = load_config(Path(CONFIGS[0]).parents[1] / "imagenet" / "bcos_d169_r18_50shot_e2kd.yaml")
    assert (bcos.optim.name, bcos.optim.lr, bcos.optim.weight_decay, bcos.optim.agc_clip, bcos.optim.warmup_epochs) == (
        OptimizerName.adam, 1e-3, 0.0, 0.01, 5.0)
    assert (bcos.optim.batch_size, bcos.optim.epochs, bcos.data.shots, bcos.data.val_per_class) == (32, 250, 50, 50)
    std = load_config(Path(CONFIGS[0]).parents[1] / "imagenet" / "r34_r18_gradcam_200shot_kd.yaml")
    assert (std.optim.name, std.optim.lr, std.optim.weight_decay, std.optim.grad_clip) == (OptimizerName.adamw, 0.01, 1e-4, 1.0)
    assert (std.optim.batch_size, std.optim.epochs, std.distill.lam, std.distill.gt_weight) == (64, 125, 0.0, 0.0)


def test_overrides_are_typed():
    cfg = config_from_dict({}, ["distill.lam=5", "seed=2", "amp=bf16", "optim.name=sgd", "data.kwargs={a: 1}"])
    assert cfg.distill.lam == 5.0 and isinstance(cfg.distill.lam, float)
    assert cfg.seed == 2 and cfg.amp == Amp.bf16 and cfg.optim.name == OptimizerName.sgd
    assert cfg.data.kwargs == {"a": 1}


def test_a_mapping_override_replaces_free_form_arguments_but_merges_into_sections():
    values = {"model": {"name": "resnet8_small", "kwargs": {"width": 16, "input_norm": {"mean": [0.1], "std": [0.2]}}},
              "optim": {"batch_size": 7}}
    # switching models: the old model's arguments must not follow
    assert config_from_dict(values, ["model.name=timm/resnet10t", "model.kwargs={}"]).model.kwargs == {}
    assert config_from_dict(values, ["model.kwargs={depth: 2}"]).model.kwargs == {"depth": 2}
    # a dotted key into the mapping still adds or changes one argument
    assert config_from_dict(values, ["model.kwargs.depth=2"]).model.kwargs == {
        "width": 16, "depth": 2, "input_norm": {"mean": [0.1], "std": [0.2]}}
    nested = config_from_dict(values, ["model.kwargs.input_norm={mean: [0.3]}"]).model.kwargs
    assert nested == {"width": 16, "input_norm": {"mean": [0.3]}}
    # a typed section is merged: the keys not named keep their values
    cfg = config_from_dict(values, ["optim={lr: 0.5}"])
    assert (cfg.optim.lr, cfg.optim.batch_size) == (0.5, 7)
    with pytest.raises(ValueError, match="optim.lrr"):
        config_from_dict(values, ["optim={lrr: 0.5}"])


@pytest.mark.parametrize(
    "values, overrides, message",
    [
        ({}, ["distill.lamda=5"], r"unknown config key 'distill.lamda'.*did you mean 'distill.lam'"),
        ({"optimm": {"lr": 1}}, [], r"unknown config key 'optimm'.*did you mean 'optim'"),
        ({"optim": {"learning_rate": 1}}, [], r"unknown config key 'optim.learning_rate'"),
        ({}, ["optim.lr=fast"], r"invalid value for config key 'optim.lr'"),
        ({}, ["amp=fp8"], r"invalid value for config key 'amp'.*fp8"),
        ({}, ["optim.batch_size=0"], r"optim.batch_size must be >= 1"),
        ({}, ["distill.lam=-1"], r"distill.lam must be a finite number >= 0"),
        ({}, ["distill.lam=nan"], r"distill.lam must be a finite number >= 0, got nan"),
        ({}, ["distill.temperature=inf"], r"distill.temperature must be a finite number > 0, got inf"),
        ({}, ["optim.lr=nan"], r"optim.lr must be a finite number > 0"),
        ({}, ["lam"], r"must look like key=value"),
        ({}, ["eval.iou_rule=foo"], r"eval.iou_rule must be one of fraction_of_max, top_fraction, got 'foo'"),
        ({}, ["eval.iou_value=5"], r"eval.iou_value must be in \[0, 1\] for eval.iou_rule=fraction_of_max, got 5.0"),
        ({}, ["eval.iou_rule=top_fraction", "eval.iou_value=0"],
         r"eval.iou_value must be in \(0, 1\] for eval.iou_rule=top_fraction, got 0.0"),
        ({}, ["eval.iou_value=nan"], r"eval.iou_value must be in \[0, 1\] .* got nan"),
        ({}, ["eval_batch_size=-1"], r"eval_batch_size must be >= 1 \(or null .*\), got -1"),
        ({}, ["eval_batch_size=0"], r"eval_batch_size must be >= 1 \(or null .*\), got 0"),
        ({}, ["data.eval_limit=-5"], r"data.eval_limit must be >= 1 \(or null .*\), got -5"),
        ({}, ["data.eval_limit=0"], r"data.eval_limit must be >= 1 \(or null .*\), got 0"),
        ({}, ["data.image_size=0"], r"data.image_size must be >= 1 pixel \(or null .*\), got 0"),
        ({}, ["data.image_size=-3"], r"data.image_size must be >= 1 pixel \(or null .*\), got -3"),
        ({"name": "${oc.env:HOME}"}, [], r"interpolation"),
        ({}, ["output_dir=${oc.env:HOME}"], r"interpolation"),
    ],
)
def test_bad_configs_are_clear_errors(values, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values, overrides)


def test_evaluation_settings_at_their_limits_are_accepted():
    cfg = config_from_dict({}, ["eval.iou_value=0", "eval_batch_size=1", "data.eval_limit=1", "data.image_size=1"])
    assert (cfg.eval.iou_value, cfg.eval_batch_size, cfg.data.eval_limit, cfg.data.image_size) == (0.0, 1, 1, 1)
    cfg = config_from_dict({}, ["eval.iou_rule=top_fraction", "eval.iou_value=1"])
    assert (cfg.eval.iou_rule, cfg.eval.iou_value) == ("top_fraction", 1.0)


def test_yaml_is_read_safely(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = config_from_dict({"name": "x", "distill": {"lam": 0.2}}, ["optim.max_steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value) == (
        f"config file {str(path)!r} is not UTF-8 text (byte 9 cannot be decoded); is it the right file? Save it as UTF-8"
    )
