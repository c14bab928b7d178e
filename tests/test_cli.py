"""The facesphere command: help everywhere, clear one-line errors, no traceback on user mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from facesphere.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["train"], ["quickstart"], ["config"], ["backbones"], ["heads"], ["data"],
                                     ["data", "synth"], ["data", "pack"], ["data", "inspect"]])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_import_has_no_side_effects():
    code = ("import logging, sys, torch.distributed as d; import facesphere, facesphere.backbones, facesphere.heads, "
            "facesphere.train.trainer, facesphere.data, facesphere.evaluate; "
            "from facesphere.utils.allocator import allocator_settings; "
            "assert not d.is_initialized(); assert allocator_settings()['mallopt'] == {}; "
            "assert not logging.getLogger().handlers; assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_config_value_is_one_clear_error(tmp_path):
    result = runner.invoke(app, ["train", "arcface", "--set", "optim.lr=-1", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_missing_data_folder_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "facesphere", "train", "arcface", "--set", f"data.root={tmp_path / 'nope'}",
                             "--set", f"output_dir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "nope" in result.stderr + result.stdout


def test_backbones_table_and_heads_list():
    result = runner.invoke(app, ["backbones", "mobilefacenet"])
    assert result.exit_code == 0 and "221.0M" in result.output and "1.003M" in result.output
    result = runner.invoke(app, ["heads"])
    assert result.exit_code == 0
    for name in ("softmax", "normface", "sphereface", "coco", "cosface", "arcface", "combined"):
        assert name in result.output


def test_data_synth_writes_an_image_folder(tmp_path):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "faces"), "--identities", "3", "--samples", "2",
                                 "--height", "64", "--width", "64"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "faces").rglob("*.png"))) == 6


def _cli(*args: str) -> subprocess.CompletedProcess:
    from _training import cli, env

    return subprocess.run(cli(*args), capture_output=True, text=True, env=env(), timeout=120)


@pytest.mark.parametrize("args, names", [
    (["nope"], "nope"),  # unknown command
    (["backbones", "--embedding-size", "abc"], "--embedding-size"),  # bad option value
    (["detect", "gone.jpg", "--detector-weights", "missing.pth"], "missing.pth"),  # exists=True on a missing path
    (["data", "inspect"], "path"),  # missing argument
])
def test_usage_errors_are_one_line_naming_the_input(args, names):
    """A usage error is one line on stderr (not a multi-line panel), exit 2, naming what was refused."""
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: "), result.stderr
    assert names in result.stderr


def test_help_still_works_and_a_bare_group_prints_its_help():
    assert _cli("--help").returncode == 0 and "Usage" in _cli("--help").stdout
    bare = _cli("data")
    assert bare.returncode == 2 and "inspect" in bare.stdout and "Traceback" not in bare.stderr


def test_a_long_error_is_not_wrapped(tmp_path):
    """The log renderer used to fold long paths over several lines when stderr is not a terminal."""
    deep = tmp_path / ("a" * 60) / ("b" * 60) / "config.yaml"
    result = _cli("config", str(deep))
    assert result.returncode == 2
    assert str(deep) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _app(error: BaseException):
    import typer

    app = typer.Typer()

    @app.command()
    def boom() -> None:
        raise error

    return app


@pytest.mark.parametrize("error, code, line", [
    (KeyboardInterrupt(), 130, "error: interrupted"),
    (IsADirectoryError(21, "Is a directory", "out.json"), 2, "error: out.json: Is a directory"),
    (PermissionError(13, "Permission denied", "/sys/x"), 2, "error: /sys/x: Permission denied"),
    (ValueError("two\nlines"), 2, "error: two lines"),
])
def test_run_app_turns_expected_errors_into_one_line(error, code, line, capsys):
    from facesphere.cli.errors import run_app

    assert run_app(_app(error), []) == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_run_app_keeps_the_traceback_of_a_bug():
    from facesphere.cli.errors import run_app

    with pytest.raises(ZeroDivisionError):
        run_app(_app(ZeroDivisionError("a bug")), [])
