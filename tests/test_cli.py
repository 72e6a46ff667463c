"""The e2kd command line: help, python -m e2kd, clear errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2kd.cli import build_parser, main

SRC = str(Path(__file__).resolve().parent.parent / "src")


def test_help_lists_each_command_on_one_line():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "e2kd", "--help"], capture_output=True, text=True, env=env, check=True).stdout
    lines = out.splitlines()
    for name in ("train-teacher", "distill", "evaluate"):
        hits = [line for line in lines if line.strip().startswith(name + " ")]
        assert len(hits) == 1, (name, out)
        assert len(hits[0].split(None, 1)[1]) > 10  # the one-line description is on the same line


def test_every_command_takes_a_config_and_overrides():
    args = build_parser().parse_args(["distill", "c.yaml", "distill.lam=5", "seed=2"])
    assert args.config == "c.yaml" and args.overrides == ["distill.lam=5", "seed=2"]


def test_misspelt_key_is_an_error_with_a_suggestion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ndistill:\n  lam: 1\n")
    assert main(["distill", str(cfg), "distill.temprature=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'distill.temprature'" in err and "did you mean 'distill.temperature'" in err


def test_missing_files_are_errors(tmp_path, capsys):
    assert main(["train-teacher", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "without config.yaml" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train-teacher" in capsys.readouterr().out


def test_list_prints_the_names_each_registry_accepts(capsys):
    from e2kd.data import list_datasets
    from e2kd.models import create_model, list_models

    assert main(["list", "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[: len(list_models())] == list_models() and "resnet18" in lines and lines[-1].startswith("timm/<architecture>")
    assert main(["list", "models", "timm/test_res"]) == 0
    timm_names = capsys.readouterr().out.split()
    assert "timm/test_resnet" in timm_names and all(n.startswith("timm/test_res") for n in timm_names)
    create_model(timm_names[0], num_classes=2)  # a listed name builds
    assert main(["list", "explainers"]) == 0
    assert capsys.readouterr().out.split() == ["bcos", "gradcam", "gradient", "inputxgradient"]
    assert main(["list", "datasets", "tux"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [n for n in list_datasets() if "tux" in n] and "tuxobjects" in out
    assert main(["list", "models", "zzz"]) == 2
    assert "no models match 'zzz'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished train-teacher runs (one step each) of the synthetic data, and the first's config file."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train_helpers import base_config
    from e2kd.train import config_from_dict, run

    out = tmp_path_factory.mktemp("runs")
    first = run(config_from_dict(base_config(out, "first", **{"optim.max_steps": 1})), mode="teacher")
    second = run(config_from_dict(base_config(out, "second", **{"optim.max_steps": 1, "optim.lr": 0.05})), mode="teacher")
    return out, first, second


def _json(path):
    import json

    return json.loads(Path(path).read_text())


def test_evaluate_a_config_writes_beside_the_evaluated_weights_never_into_another_run(two_runs, tmp_path, capsys):
    import shutil

    out, first, second = two_runs
    cfg = str(first / "config.yaml")  # names the run 'first', but evaluates the weights of 'second'
    first_files = sorted(p.name for p in first.iterdir())
    assert main(["evaluate", cfg, f"model.checkpoint={second}"]) == 0
    assert "wrote " + str(second / "eval_synthetic_test.json") in capsys.readouterr().err
    by_folder = _json(second / "eval_synthetic_test.json")
    assert by_folder["accuracy"] == _json(second / "results.json")["accuracy"]
    assert sorted(p.name for p in first.iterdir()) == first_files  # the config's own run is untouched

    (second / "eval_synthetic_test.json").unlink()
    assert main(["evaluate", cfg, f"model.checkpoint={second / 'model.safetensors'}"]) == 0
    assert _json(second / "eval_synthetic_test.json") == by_folder

    loose = tmp_path / "weights" / "w.safetensors"  # a plain weights file: results beside it, named after it
    loose.parent.mkdir()
    shutil.copy(second / "model.safetensors", loose)
    assert main(["evaluate", cfg, f"model.checkpoint={loose}", "name=stray", f"output_dir={tmp_path}"]) == 0
    assert sorted(p.name for p in loose.parent.iterdir()) == ["w.eval_synthetic_test.json", "w.safetensors"]
    assert _json(loose.parent / "w.eval_synthetic_test.json") == by_folder
    assert not (tmp_path / "stray").exists()  # no run folder is created for the config's name

    chosen = tmp_path / "chosen.json"
    assert main(["evaluate", str(second), "-o", str(chosen)]) == 0
    assert _json(chosen) == by_folder
    assert main(["evaluate", str(second), "--output", str(tmp_path)]) == 2
    assert f"--output {str(tmp_path)!r} is a folder" in capsys.readouterr().err

    assert main(["evaluate", cfg]) == 2
    assert "evaluate with a config needs model.checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(second), "distill.multilabel=true"]) == 2
    assert "distill.multilabel=true but the evaluation data 'synthetic' has one class index per image" in capsys.readouterr().err


def test_evaluate_a_run_from_another_directory_finds_its_relative_paths(tmp_path, monkeypatch, capsys):
    import json
    import shutil

    from _train_helpers import base_config
    from e2kd.train import config_from_dict, run

    start = tmp_path / "project"
    start.mkdir()
    monkeypatch.chdir(start)  # trained with paths relative to `project`
    run(config_from_dict(base_config("runs", "teacher", **{"optim.max_steps": 1})), mode="teacher")
    student = start / run(config_from_dict(base_config("runs", "student", **{
        "optim.max_steps": 1, "teacher.checkpoint": "runs/teacher"})), mode="distill")
    trained = _json(student / "results.json")
    assert _json(student / "env.json")["cwd"] == str(start)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(student)]) == 0  # teacher.checkpoint found from the recorded cwd
    again = _json(student / "eval_synthetic_test.json")
    assert again["agreement"] == trained["agreement"] and again["accuracy"] == trained["accuracy"]

    env = _json(student / "env.json")  # a run folder from before env.json recorded cwd
    del env["cwd"]
    (student / "env.json").write_text(json.dumps(env))
    (student / "eval_synthetic_test.json").unlink()
    assert main(["evaluate", str(student)]) == 0  # start directory inferred from output_dir/name
    assert _json(student / "eval_synthetic_test.json")["agreement"] == trained["agreement"]

    moved = shutil.copytree(student, tmp_path / "moved")  # neither recorded nor inferable
    (moved / "eval_synthetic_test.json").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(moved)]) == 2
    err = capsys.readouterr().err
    assert (f"teacher.checkpoint='runs/teacher' (from {str(moved / 'config.yaml')!r}) does not exist from the current "
            f"directory {str(elsewhere)!r}: relative paths in a config are resolved from the current directory; run e2kd "
            "evaluate from the directory the run was started in, or give the path absolute") in err, err
    assert not (moved / "eval_synthetic_test.json").exists()
    assert main(["evaluate", str(moved), f"teacher.checkpoint={start / 'runs' / 'teacher'}"]) == 0
    assert _json(moved / "eval_synthetic_test.json")["agreement"] == trained["agreement"]


# ---- output paths that cannot be written fail before any work, in one line --------------------


def _synthetic_config(tmp_path, **extra) -> Path:
    import yaml

    from _train_helpers import base_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path / "runs", "x", **extra)))
    return cfg


@pytest.fixture
def no_data(monkeypatch):
    """Building a dataset fails the test: the errors below must come first."""
    import e2kd.train.batches
    import e2kd.train.evaluate_run
    import e2kd.train.frozen
    import e2kd.train.loop

    def refuse(*args, **kwargs):
        raise AssertionError("data were built before the output path was checked")

    for module in (e2kd.train.loop, e2kd.train.frozen, e2kd.train.evaluate_run, e2kd.train.batches):
        monkeypatch.setattr(module, "build_datasets", refuse)


def test_a_file_as_output_dir_is_refused_before_training(tmp_path, capsys, no_data):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    cfg = _synthetic_config(tmp_path)
    assert main(["train-teacher", str(cfg), f"output_dir={blocker}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"e2kd train-teacher: error: output_dir={str(blocker)!r}: the run folder {str(blocker / 'x')!r} cannot be made: "
        f"{str(blocker)!r} in its path is a file, not a folder; set output_dir to a folder you can write to "
        "(or name= to another run name)\n"
    )
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_unwritable_output_dir_names_output_dir(tmp_path, capsys, no_data):
    cfg = _synthetic_config(tmp_path)
    assert main(["distill", str(cfg), "output_dir=/proc/e2kd-no-such"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("e2kd distill: error: output_dir='/proc/e2kd-no-such': the run folder '/proc/e2kd-no-such/x' "
                          "is not writable: cannot create files in '/proc'")
    assert "Traceback" not in err and err.count("\n") == 1


def test_freeze_out_that_is_a_file_is_refused_before_freezing(tmp_path, capsys, no_data):
    blocker = tmp_path / "README.md"
    blocker.write_text("x")
    cfg = _synthetic_config(tmp_path)
    assert main(["freeze", str(cfg), "--out", str(blocker)]) == 2
    assert capsys.readouterr().err == (
        f"e2kd freeze: error: the store folder (--out) {str(blocker)!r} is a file, not a folder; "
        "pass --out with a folder you can write to\n"
    )


def test_report_into_a_file_path_is_refused(tmp_path, capsys):
    blocker = tmp_path / "README.md"
    blocker.write_text("x")
    out = blocker / "x.html"
    assert main(["report", str(tmp_path / "runs" / "none"), "-o", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"e2kd report: error: -o {str(out)!r}: the report's folder {str(blocker)!r} is a file, not a folder; "
        "give an HTML file in a folder you can write to (-o PATH)\n"
    )


def test_evaluate_checks_its_target_and_output_folder_first(tmp_path, capsys, no_data):
    assert main(["evaluate", str(tmp_path / "runs" / "nonexist")]) == 2
    assert capsys.readouterr().err == (
        f"e2kd evaluate: error: {str(tmp_path / 'runs' / 'nonexist')!r} is neither a run folder nor a config file "
        "(it does not exist); give a finished run folder (runs/NAME) or a config file with model.checkpoint set\n"
    )
    blocker = tmp_path / "out.txt"
    blocker.write_text("x")
    # results go beside the evaluated weights: a weights path inside a file is refused before any data
    cfg = _synthetic_config(tmp_path, **{"model.checkpoint": str(blocker / "w.safetensors")})
    assert main(["evaluate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"e2kd evaluate: error: the folder of model.checkpoint {str(blocker)!r} is a file, not a folder; "
                          "evaluate writes eval_*.json there"), err
    cfg = _synthetic_config(tmp_path, **{"model.checkpoint": str(tmp_path / "w.safetensors")})
    assert main(["evaluate", str(cfg), "-o", str(blocker / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"e2kd evaluate: error: the folder of --output {str(blocker / 'r.json')!r}: {str(blocker)!r} is a "
                          "file, not a folder"), err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied", "/srv/out/results.json"),
    NotADirectoryError(20, "Not a directory", "/srv/out/results.json"),
    FileExistsError(17, "File exists", "/srv/out/results.json"),
])
def test_an_os_error_from_a_command_is_one_line_naming_the_path(monkeypatch, capsys, error):
    from e2kd import cli

    def fails(args):
        raise error

    fn, arguments = cli._COMMANDS["report"]
    monkeypatch.setitem(cli._COMMANDS, "report", (fails, arguments))
    assert main(["report", "runs/a"]) == 2
    assert capsys.readouterr().err == (
        f"e2kd report: error: cannot use '/srv/out/results.json': {error.strerror}; check that the path is right "
        "and that its folder exists and can be written (or read)\n"
    )
