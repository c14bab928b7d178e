"""End-to-end training behaviour: learning, exact resume after SIGKILL, 2-process parity under torchrun."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _training import TORCHRUN, cli, env, kill_after_first_checkpoint, run, sets

from facesphere.cli.train import _report
from facesphere.train.config import builtin_config_names, load_config
from facesphere.train.trainer import MetricsLog, Trainer, read_metrics

TINY = [
    "model.backbone=mobilefacenet", "model.backbone_args={embedding_size: 64}", "model.head=arcface",
    "model.head_args={scale: 16.0, margin: 0.2}",
    "data.kind=synthetic", "data.synthetic.num_identities=16", "data.synthetic.samples_per_identity=8",
    "data.batch_size=16", "data.num_workers=0", "data.augment={flip: 0.5, brightness: 0.2}",
    "optim.lr=0.05", "optim.weight_decay=0.0005", "schedule.kind=cosine", "schedule.warmup_steps=2",
    "train.log_every=1", "train.tensorboard=false", "train.progress=false",
    "eval.enabled=false",
]


def test_training_lowers_the_loss_and_writes_artifacts(tmp_path):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=t", "train.steps=24", "train.checkpoint_every=12",
                                    "train.tensorboard=true", "eval.enabled=true", "eval.num_identities=6",
                                    "eval.samples_per_identity=4", "eval.pairs=40"])
    result = Trainer(cfg).fit()
    losses = [row["loss"] for row in read_metrics(tmp_path / "t" / "metrics.csv")]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert result.checkpoint is not None and result.checkpoint.name == "step_00000024.pt"
    assert (tmp_path / "t" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= result.evaluation["accuracy_mean"] <= 1.0
    assert list((tmp_path / "t" / "tensorboard").iterdir()) and result.tensorboard_dir == tmp_path / "t" / "tensorboard"


def _descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (walking /proc/*/stat parent links): pid -> command name."""
    children: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if rest[0] != "Z":
            children.setdefault(int(rest[1]), []).append((int(stat.parent.name), name))
    found, todo = {}, [pid]
    while todo:
        for child, name in children.get(todo.pop(), []):
            found[child] = name
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="walks /proc")
def test_sigkill_of_a_training_ends_its_data_workers_forkserver_and_resource_tracker(tmp_path):
    """The workers start from a forkserver, so torch's own check (is my parent alive?) watches the server, not the
    trainer; each worker must notice the trainer's death itself, and the server and tracker then see EOF."""
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    command = cli("train", str(config), *sets(TINY + [f"output_dir={tmp_path}", "name=w", "train.steps=100000",
                                                      "train.checkpoint_every=100000", "data.num_workers=1"]))
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        metrics = tmp_path / "w" / "metrics.csv"
        deadline = time.time() + 120
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            assert proc.poll() is None, "the training ended by itself"
            time.sleep(0.05)
        children = _descendants(proc.pid)
        assert len(children) >= 3, f"expected a forkserver, a worker and a resource tracker, found {children}"
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        left = {pid: name for pid, name in children.items() if _alive(pid)}
        assert not left, f"still running 10 s after the trainer was killed: {left}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: nothing is left behind if the test fails
        except ProcessLookupError:
            pass
        proc.wait()


def test_a_resume_keeps_only_complete_metrics_rows_up_to_its_step(tmp_path):
    """A kill while row 14 was appended left it cut to "1": the resume at step 3 drops it (it used to keep it as a
    second, empty row of step 1) and rewrites the file atomically."""
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n1,0.5\n2,0.25\n3,0.125\n1")
    MetricsLog(path, ["step", "loss"], 3)
    assert path.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.25", "3,0.125"]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_the_tensorboard_folder_is_reported_only_when_tensorboard_logs(tmp_path, caplog):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=quiet", "train.steps=1", "model.backbone=sphereface4",
                                    "model.backbone_args={embedding_size: 16, input_size: [32, 32]}"])
    off = Trainer(cfg).fit()
    assert off.tensorboard_dir is None and not (tmp_path / "quiet" / "tensorboard").exists()
    with caplog.at_level(logging.INFO, logger="facesphere"):
        _report(off)
        assert "metrics: " in caplog.text and "TensorBoard" not in caplog.text
        _report(replace(off, tensorboard_dir=tmp_path))
        assert f"TensorBoard logs in {tmp_path}" in caplog.text


SMALL_OE = ["model.backbone=sphereface4", "model.backbone_args={embedding_size: 16, input_size: [32, 32]}",
            "model.head_args.scale=16.0", "data.batch_size=8", "train.log_every=1", "train.tensorboard=false",
            "train.progress=false", "eval.enabled=false"]
"""The OE-CNN recipes at test size: their heads, objectives, optimiser and schedule on a small backbone."""


def aged_list_and_model(folder: Path) -> list[str]:
    """What ``oe_cnn_fgnet`` reads, at test size: a list file with ages (every third one unknown) over synthetic
    32x32 images, and a sphereface4 model folder to fine-tune; returns the overrides naming them."""
    from facesphere.data import SyntheticFaces
    from facesphere.data.export import write_image_folder
    from facesphere.models.export import export_model

    write_image_folder(SyntheticFaces(6, 4, image_size=(32, 32), seed=3), folder / "images")
    lines = ["# columns: path label age"] + [
        f"{path.relative_to(folder / 'images')} {label} {'-' if i % 3 == 0 else 20 + 4 * label + i % 2}"
        for label, identity in enumerate(sorted((folder / "images").iterdir()))
        for i, path in enumerate(sorted(identity.iterdir()))]
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    pre = load_config(None, TINY + SMALL_OE[:2] + [f"output_dir={folder}", "name=pre", "train.steps=1"])
    Trainer(pre).fit()
    export_model(folder / "pre", folder / "pretrained")
    return [f"model.init={folder / 'pretrained'}", f"data.list_file={folder / 'train.txt'}", f"data.root={folder / 'images'}"]


SMALL_GRIDFACE = {"recognizer": "sphereface4", "recognizer_args": {"embedding_size": 16, "input_size": [32, 32]},
                  "grid": 2}
"""The GridFace recipes' backbone at test size: a 2x2 rectifier in front of a 32x32 sphereface4."""


def gridface_y1_stand_ins(folder: Path) -> list[str]:
    """What ``gridface_y1`` reads, at test size: a 32x32 sphereface4 model folder standing in for y1 (``model.init``
    and the teacher) and an untrained 32x32 face_dae for the prior; returns the overrides naming them (the config's
    own objectives and weights, with these paths)."""
    from facesphere.backbones import build_backbone
    from facesphere.models.card import training_card
    from facesphere.models.store import save_model

    paths = {}
    for key, backbone, args in (("teacher", "sphereface4", SMALL_GRIDFACE["recognizer_args"]),
                                ("dae", "face_dae", {"input_size": [32, 32], "embedding_size": 8})):
        torch.manual_seed(3)
        module = build_backbone(backbone, **args).eval()
        paths[key] = str(save_model(folder / key, module, training_card(module, key, backbone, args)))
    objectives = [o.model_dump(exclude_none=True) for o in load_config("gridface_y1").objectives]
    for o in objectives:
        o["args"].update({k: paths[k] for k in o["args"] if k in paths})
    return [f"model.backbone_args={json.dumps({**SMALL_GRIDFACE, 'freeze_recognizer': True})}",
            f"model.init={paths['teacher']}", f"objectives={json.dumps(objectives)}"]


def small_model(name: str, folder: Path) -> list[str]:
    """The shipped config's model at test size (32x32 inputs), with test-size stand-ins of the models it reads."""
    if name == "face_dae":
        return ["model.backbone_args={input_size: [32, 32], embedding_size: 8}"]
    if name == "gridface":
        return [f"model.backbone_args={json.dumps(SMALL_GRIDFACE)}"]
    if name == "gridface_y1":
        return gridface_y1_stand_ins(folder)
    return SMALL_OE[:2]


@pytest.mark.parametrize("name", builtin_config_names())
def test_every_builtin_config_trains_and_resumes_exactly(tmp_path, name):
    """Each shipped config, shrunk to a small backbone on synthetic faces (its own data for the fine-tune), with its
    head, objectives, optimiser and schedule: 4 steps lower nothing to NaN, and a resume from the step-2
    checkpoint into another run repeats steps 3-4 bit for bit (SIGKILL and torchrun: the tests below)."""
    settings = [o for o in SMALL_OE[2:] if not o.startswith("model.head_args")] + small_model(name, tmp_path / "models") + [
        "train.steps=4", "train.checkpoint_every=2", "data.num_workers=0", f"output_dir={tmp_path}"]
    if name == "oe_cnn_fgnet":
        settings += aged_list_and_model(tmp_path / "data")
    else:
        settings += ["data.kind=synthetic", "data.synthetic.num_identities=6", "data.synthetic.samples_per_identity=4"]
    straight = Trainer(load_config(name, settings + ["name=straight"]))
    straight.fit()
    resumed = Trainer(load_config(name, settings + ["name=resumed"]))
    assert resumed.resume(tmp_path / "straight" / "checkpoints" / "step_00000002.pt")
    resumed.fit()
    a = read_metrics(tmp_path / "straight" / "metrics.csv")
    b = read_metrics(tmp_path / "resumed" / "metrics.csv")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in a)  # no NaN
    assert [r["loss"] for r in b if r["step"] > 2] == [r["loss"] for r in a[2:]]
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000004.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "resumed" / "checkpoints" / "step_00000004.pt", weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny", "oe_cnn_fgnet"])
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, recipe):
    """A run killed by SIGKILL and resumed repeats the uninterrupted one bit for bit, for the test-size config
    and for the shipped recipes shrunk (a fine-tune reads ``model.init`` at step 0 only)."""
    if recipe == "tiny":
        config = tmp_path / "tiny.yaml"
        config.write_text("{}\n")
        settings = TINY
    else:
        config = recipe
        settings = SMALL_OE + aged_list_and_model(tmp_path / "data")
    overrides = sets(settings + [f"output_dir={tmp_path}", "train.steps=12", "train.checkpoint_every=4", "data.num_workers=1"])
    common = ["train", str(config), *overrides]
    run(cli(*common, "--set", "name=straight"))
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(cli(*common, "--set", "name=killed"), killed, 12)
    run(cli(*common, "--set", "name=killed", "--resume", "latest"))
    a = read_metrics(tmp_path / "straight" / "metrics.csv")
    b = read_metrics(killed / "metrics.csv")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000012.pt", weights_only=True)["model"]
    sb = torch.load(killed / "checkpoints" / "step_00000012.pt", weights_only=True)["model"]
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


@pytest.mark.slow
def test_two_torchrun_processes_follow_one_process(tmp_path):
    """Same global batch, 1 process vs 2 gloo processes: the loss curves agree to float32 rounding.

    SphereFace-4 has no batch norm, so the comparison isolates data sharding, DDP gradient averaging
    and loss reduction; cross-process batch norm is checked exactly (float64) in
    test_distributed_batchnorm.py. (With BN, float32 rounding in an ill-conditioned BN backward at
    initialisation is amplified by SGD within a few steps, for two threads as for two processes.)
    """
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    settings = TINY + [f"output_dir={tmp_path}", "train.steps=8", "train.checkpoint_every=100", "model.backbone=sphereface4",
                       "model.backbone_args={embedding_size: 64}", "optim.lr=0.005"]
    overrides = sets(settings)
    run(cli("train", str(config), *overrides, "--set", "name=one"))
    run(TORCHRUN + ["train", str(config), *overrides, "--set", "name=two"])
    one = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.csv")]
    two = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.csv")]
    assert len(one) == len(two) == 8
    assert len(set(one)) == 8, "the loss must move for the comparison to mean anything"
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)


def _pfc_overrides(tmp_path: Path, rate: float) -> list[str]:
    settings = TINY + [f"output_dir={tmp_path}", "train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=3",
                       "model.backbone=sphereface4", "model.backbone_args={embedding_size: 64}", "optim.lr=0.005",
                       "model.partial_fc.enabled=true", f"model.partial_fc.sample_rate={rate}"]
    return sets(settings)


def _resume_from_step4(source: Path, target: Path) -> None:
    """A new run folder holding only the step-4 checkpoint (main file and its shards) of ``source``."""
    (target / "checkpoints").mkdir(parents=True)
    for path in (source / "checkpoints").glob("step_00000004*"):
        (target / "checkpoints" / path.name).write_bytes(path.read_bytes())


@pytest.mark.slow
def test_partial_fc_two_processes_follow_one_and_resume_on_either(tmp_path):
    """Partial FC at r = 1: 2 gloo processes (centres sharded) follow 1 process; the 2-process step-4 checkpoint
    resumes on 1 process (shards re-cut) and on 2 processes, continuing the same curve."""
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    overrides = _pfc_overrides(tmp_path, 1.0)
    run(cli("train", str(config), *overrides, "--set", "name=one"))
    run(TORCHRUN + ["train", str(config), *overrides, "--set", "name=two"])
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("step_00000004*")) == [
        "step_00000004.pt", "step_00000004.shard-00000-of-00002.pt", "step_00000004.shard-00001-of-00002.pt"]
    _resume_from_step4(tmp_path / "two", tmp_path / "two_to_one")
    run(cli("train", str(config), *overrides, "--set", "name=two_to_one", "--resume", "latest"))
    _resume_from_step4(tmp_path / "two", tmp_path / "two_to_two")
    run(TORCHRUN + ["train", str(config), *overrides, "--set", "name=two_to_two", "--resume", "latest"])

    curve = {name: [r["loss"] for r in read_metrics(tmp_path / name / "metrics.csv")]
             for name in ("one", "two", "two_to_one", "two_to_two")}
    assert len(set(curve["one"])) == 8, "the loss must move for the comparison to mean anything"
    torch.testing.assert_close(torch.tensor(curve["two"]), torch.tensor(curve["one"]), rtol=1e-5, atol=1e-5)
    assert curve["two_to_two"] == curve["two"][4:], "same process count: the resumed steps 5-8 are bit-identical"
    torch.testing.assert_close(torch.tensor(curve["two_to_one"]), torch.tensor(curve["two"][4:]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_partial_fc_sampled_resume_is_exact(tmp_path):
    """r = 0.5: sampling is seeded by the step, so a resumed 2-process run repeats the uninterrupted one exactly,
    here for the OE-CNN recipe: its margin head sharded by Partial FC, its age term fitted on both ranks' first
    batches (ArcFace under Partial FC resumes on either process count in the test above)."""
    config = "oe_cnn"
    overrides = sets(SMALL_OE + [
        "data.synthetic.num_identities=8", "data.synthetic.samples_per_identity=4", "optim.lr=0.005",
        f"output_dir={tmp_path}", "train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=3",
        "data.num_workers=0", "model.partial_fc.enabled=true", "model.partial_fc.sample_rate=0.5"])
    run(TORCHRUN + ["train", str(config), *overrides, "--set", "name=straight"])
    _resume_from_step4(tmp_path / "straight", tmp_path / "resumed")
    run(TORCHRUN + ["train", str(config), *overrides, "--set", "name=resumed", "--resume", "latest"])
    straight = read_metrics(tmp_path / "straight" / "metrics.csv")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.csv")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight][4:]
    for rank in range(2):
        name = f"step_00000008.shard-{rank:05d}-of-00002.pt"
        a = torch.load(tmp_path / "straight" / "checkpoints" / name, weights_only=True)
        b = torch.load(tmp_path / "resumed" / "checkpoints" / name, weights_only=True)
        a, b = a["objectives"]["recognition"], b["objectives"]["recognition"]
        torch.testing.assert_close(a["head"]["weight"], b["head"]["weight"], rtol=0, atol=0)
    a, b = (torch.load(tmp_path / run / "checkpoints" / "step_00000008.pt", weights_only=True)["model"]
            for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "loss/age" in straight[-1] and bool(a["objectives.age.fitted"])


def test_a_checkpoint_of_the_single_head_trainer_resumes(tmp_path):
    """Checkpoints written before objectives existed kept the head under ``head.*``; they still resume."""
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=new", "train.steps=2", "model.backbone=sphereface4",
                                    "model.backbone_args={embedding_size: 32, input_size: [32, 32]}"])
    trainer = Trainer(cfg)
    trainer.fit()
    state = torch.load(tmp_path / "new" / "checkpoints" / "step_00000002.pt", weights_only=True)
    state["model"] = {k.replace("objectives.recognition.", ""): v for k, v in state["model"].items()}
    assert "head.weight" in state["model"]
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "old" / "checkpoints" / "step_00000002.pt")
    old_rows = (tmp_path / "new" / "metrics.csv").read_text().splitlines()
    (tmp_path / "old" / "metrics.csv").write_text("\n".join(  # the old layout: no loss/<term> columns
        ",".join(c for i, c in enumerate(line.split(",")) if i != 3) for line in old_rows) + "\n")
    resumed = Trainer(cfg.model_copy(update={"name": "old", "train": cfg.train.model_copy(update={"steps": 3})}))
    assert resumed.resume()
    assert resumed.step == 2
    torch.testing.assert_close(resumed.model.objectives["recognition"].head.weight,
                               trainer.model.objectives["recognition"].head.weight, rtol=0, atol=0)
    resumed.fit()
    rows = read_metrics(tmp_path / "old" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3] and "loss/recognition" not in rows[0] and "loss/recognition" in rows[2]
