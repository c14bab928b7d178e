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
