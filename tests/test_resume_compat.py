"""Resume continues one experiment: a changed model, objective, optimiser, schedule or too few steps is refused
before anything is written (every changed field named); logging and more steps are accepted and logged."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from _training import cli, env, sets

from facesphere.models.runs import latest_checkpoint, load_checkpoint
from facesphere.train.compat import ResumeError, check_resume, is_safe
from facesphere.train.config import load_config
from facesphere.train.trainer import Trainer, read_metrics

TINY = [
    "model.backbone=sphereface4", "model.backbone_args={embedding_size: 16, input_size: [32, 32]}",
    "model.head=arcface", "model.head_args={scale: 16.0, margin: 0.2}",
    "data.kind=synthetic", "data.synthetic.num_identities=8", "data.synthetic.samples_per_identity=4",
    "data.batch_size=8", "data.num_workers=0", "optim.lr=0.05", "schedule.kind=cosine",
    "train.steps=2", "train.log_every=1", "train.tensorboard=false", "train.progress=false", "eval.enabled=false",
]


def _config(out: Path, extra: list[str] = ()):
    return load_config(None, TINY + [f"output_dir={out}", "name=run", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoint at step 2); each test copies it."""
    out = tmp_path_factory.mktemp("base")
    Trainer(_config(out)).fit()
    return out


@pytest.fixture
def out(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "out")
    return tmp_path / "out"


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


REFUSED = [
    (["model.head=cosface"], ["model.head arcface → cosface"]),
    (["model.backbone_args={embedding_size: 32, input_size: [32, 32]}"], ["model.backbone_args.embedding_size 16 → 32"]),
    (["model.head_args={scale: 16.0, margin: 0.5}"], ["model.head_args.margin 0.2 → 0.5"]),
    (["optim.name=adamw"], ["optim.name sgd → adamw"]),
    (["optim.lr=0.01"], ["optim.lr 0.05 → 0.01"]),
    (["schedule.kind=step"], ["schedule.kind cosine → step"]),
    (["seed=1"], ["seed 0 → 1"]),
    (["model.head=cosface", "optim.name=adamw", "train.steps=4"],  # every refused field named, the safe one not
     ["model.head arcface → cosface", "optim.name sgd → adamw"]),
    (["train.steps=2"], ["already reached step 2"]),
    (["train.steps=1"], ["already reached step 2"]),
]


@pytest.mark.parametrize("changes,named", REFUSED, ids=[",".join(c) for c, _ in REFUSED])
def test_an_incompatible_resume_is_refused_and_changes_nothing(out, changes, named):
    (out / "run" / "checkpoints" / ".step_00000003.pt.cut.tmp").write_bytes(b"a killed write")  # kept too
    before = _hashes(out)
    trainer = Trainer(_config(out, changes))
    with pytest.raises(ResumeError) as refused:
        trainer.resume()
    message = str(refused.value)
    assert "\n" not in message and "step_00000002.pt" in message
    for text in named:
        assert text in message
    if any(c.startswith("train.steps=4") for c in changes):
        assert "train.steps" not in message
    assert _hashes(out) == before


def test_the_cli_refuses_in_one_line_with_exit_2_and_leaves_the_run_untouched(out, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    before = _hashes(out)
    done = subprocess.run(cli("train", str(config), *sets(TINY + [f"output_dir={out}", "name=run",
                                                                   "model.head=sphereface", "model.head_args={}"]),
                              "--resume", "latest"), env={**env(), "COLUMNS": "1000"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "cannot resume" in line]
    assert len(errors) == 1 and "model.head arcface → sphereface" in errors[0], done.stderr[-2000:]
    assert "model.head_args.margin 0.2 → (unset)" in errors[0] and "Traceback" not in done.stderr
    assert _hashes(out) == before


def test_more_steps_and_logging_resume_and_are_recorded(out, caplog):
    stored = (out / "run" / "config.yaml").read_text()
    stale = out / "run" / "checkpoints" / ".step_00000003.pt.cut.tmp"
    stale.write_bytes(b"a killed write")
    trainer = Trainer(_config(out, ["train.steps=4", "train.log_every=2"]))
    with caplog.at_level(logging.INFO, logger="facesphere.train.compat"):
        assert trainer.resume() and trainer.step == 2
    assert not stale.exists(), "an accepted resume removes the partial writes of the killed run"
    assert "resuming with changed settings: output_dir " in caplog.text  # the run was copied: safe
    assert "; train.log_every 1 → 2; train.steps 2 → 4" in caplog.text
    result = trainer.fit()
    assert result.steps == 4 and latest_checkpoint(out / "run" / "checkpoints").name == "step_00000004.pt"
    assert [r["step"] for r in read_metrics(out / "run" / "metrics.csv")] == [1, 2, 4]
    now = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert now["train"]["steps"] == 4 and now["train"]["log_every"] == 2
    state = load_checkpoint(out / "run" / "checkpoints" / "step_00000004.pt")
    [earlier] = state["config_history"]
    assert earlier["until_step"] == 2 and earlier["config"] == yaml.safe_load(stored)

    again = Trainer(_config(out, ["train.steps=6", "train.log_every=2"]))  # the history is carried forward
    assert again.resume() and again.fit().steps == 6
    history = load_checkpoint(out / "run" / "checkpoints" / "step_00000006.pt")["config_history"]
    assert [h["until_step"] for h in history] == [2, 4] and history[1]["config"]["train"]["steps"] == 4


def test_an_unchanged_resume_records_no_history(tmp_path):
    cfg = _config(tmp_path, ["train.steps=4", "train.checkpoint_every=2"])
    Trainer(cfg).fit()
    (tmp_path / "run" / "checkpoints" / "step_00000004.pt").unlink()  # as if killed after step 2
    trainer = Trainer(cfg)
    assert trainer.resume() and trainer.step == 2 and trainer.config_history == []
    trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.pt")["config_history"] == []


def test_the_safe_list_is_explicit_and_unknown_fields_are_incompatible():
    cfg = load_config(None, TINY)
    stored = cfg.model_dump(mode="json")
    for field in ("name", "output_dir", "train.steps", "train.log_every", "data.num_workers", "eval.pairs"):
        assert is_safe(field)
    for field in ("model.head", "data.batch_size", "data.num_workers_extra", "train.amp", "plugins", "trainer"):
        assert not is_safe(field)
    stored["model"]["future_field"] = 1  # a field this version does not know: shown, and refused
    with pytest.raises(ResumeError, match=r"model.future_field 1 → \(unset\)"):
        check_resume(stored, cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 5})}), 2, "x")
