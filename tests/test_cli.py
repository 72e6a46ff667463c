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
    cfg = _synthetic_config(tmp_path, **{"model.checkpoint": str(tmp_path / "w.safetensors")})
    assert main(["evaluate", str(cfg), f"output_dir={blocker}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"e2kd evaluate: error: output_dir={str(blocker)!r}: the results folder {str(blocker / 'x')!r} "
                          f"cannot be made: {str(blocker)!r} in its path is a file")


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
