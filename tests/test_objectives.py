"""Objectives: named loss terms, masks, weights, configs; a non-classifier trained, resumed and distributed."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from _training import TORCHRUN, cli, kill_after_first_checkpoint, run, sets
from torch.utils.data import default_collate

from facesphere.data import AugmentConfig, SyntheticFaces
from facesphere.heads import build_head
from facesphere.models.runs import load_checkpoint
from facesphere.objectives import ObjectiveContext, Recognition, Regression
from facesphere.train.config import ConfigError, load_config
from facesphere.train.trainer import Trainer, read_metrics

CONTEXT = ObjectiveContext("r", embedding_size=4, num_classes=5)


def test_masked_samples_contribute_nothing_to_loss_or_gradient():
    """The loss equals the plain mean over the present samples; masked rows (even NaN targets) get zero gradient."""
    torch.manual_seed(0)
    objective = Regression(CONTEXT, target="pose", loss="l2")
    prediction = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 3, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    target[~mask] = float("nan")
    loss = objective({"embedding": prediction}, {"pose": target, "pose_mask": mask})["r"]
    expected = ((prediction[mask] - target[mask]) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-15)
    loss.backward()
    assert torch.equal(prediction.grad[~mask], torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(prediction.grad[mask], 2 * (prediction[mask] - target[mask]).detach() / 12)
    nothing = objective({"embedding": prediction}, {"pose": target, "pose_mask": torch.zeros(6, dtype=torch.bool)})["r"]
    assert float(nothing.detach()) == 0.0


def test_a_scalar_target_is_regressed_by_a_one_wide_readout():
    """An age per sample (N,) against a readout of width 1 (N, 1): the loss is the masked mean |ŷ − age|."""
    torch.manual_seed(0)
    objective = Regression(CONTEXT, target="age", out_features=1, loss="l1")
    embeddings = torch.randn(5, 4)
    ages = torch.tensor([20.0, float("nan"), 35.0, 50.0, 8.0])
    mask = ~ages.isnan()
    loss = objective({"embedding": embeddings}, {"age": ages, "age_mask": mask})["r"]
    prediction = objective.readout(embeddings)[:, 0]
    torch.testing.assert_close(loss, (prediction[mask] - ages[mask]).abs().mean())
    with pytest.raises(ValueError, match="does not match target"):
        Regression(CONTEXT, target="age", out_features=2)({"embedding": embeddings}, {"age": ages, "age_mask": mask})


def test_recognition_ignores_masked_labels_and_matches_cross_entropy():
    torch.manual_seed(0)
    objective = Recognition(CONTEXT, head="cosface", head_args={"scale": 8.0, "margin": 0.2})
    embeddings, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    mask = torch.tensor([True, True, False, True, False, True])
    loss = objective({"embedding": embeddings}, {"label": labels, "label_mask": mask})["r"]
    head = build_head("cosface", 4, 5, scale=8.0, margin=0.2)
    head.load_state_dict(objective.head.state_dict())
    torch.testing.assert_close(loss, F.cross_entropy(head(embeddings[mask], labels[mask]), labels[mask]))


def test_synthetic_pose_target_is_masked_deterministically_and_collates():
    ds = SyntheticFaces(3, 4, image_size=(32, 32), targets=["pose"], target_share=0.5)
    items = [ds[i] for i in range(len(ds))]
    batch = default_collate(items)[1]
    assert batch["label"].dtype == torch.int64 and batch["pose"].shape == (12, 3) and batch["pose_mask"].dtype == torch.bool
    present = batch["pose_mask"]
    assert 0 < int(present.sum()) < 12
    assert torch.equal(batch["pose"][~present], torch.zeros(int((~present).sum()), 3))
    for i in torch.nonzero(present).flatten().tolist():  # the pose is the one the renderer used
        assert torch.equal(batch["pose"][i], torch.from_numpy(ds.pose(i)))
    again = SyntheticFaces(3, 4, image_size=(32, 32), targets=["pose"], target_share=0.5)
    assert [again.has_targets(i) for i in range(12)] == present.tolist()
    with pytest.raises(ValueError, match="flip"):
        SyntheticFaces(3, 4, targets=["pose"], augment=AugmentConfig(flip=0.5))
    with pytest.raises(ValueError, match="no targets"):
        SyntheticFaces(3, 4, targets=["landmarks"])


def test_configs_name_objectives_by_registry_or_import_path_and_refuse_the_rest():
    legacy = load_config("arcface").resolved_objectives()
    assert [(o.name, o.weight, o.args["head"], o.args["partial_fc"]) for o in legacy] == [("recognition", 1.0, "arcface", False)]
    assert legacy[0].args["head_args"] == {"scale": 64.0, "margin": 0.5, "easy_margin": False}
    cfg = load_config(None, ["objectives=[{name: recognition, weight: 2.0}, "
                             "{name: 'facesphere.objectives.regression:Regression', args: {target: pose}}]"])
    assert [o.key for o in cfg.resolved_objectives()] == ["recognition", "regression"]
    with pytest.raises(ConfigError, match=r"objectives\.0.*unknown objective 'recognise'"):
        load_config(None, ["objectives=[{name: recognise}]"])
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_config(None, ["objectives=[{name: 'no_such_module:Thing'}]"])
    with pytest.raises(ConfigError, match=r"does not take \['targe'\]"):
        load_config(None, ["objectives=[{name: regression, args: {targe: pose}}]"])
    own_head = load_config("arcface", ["objectives=[{name: recognition, args: {head: cosface}}]"]).resolved_objectives()
    assert own_head[0].args["head"] == "cosface" and "head_args" not in own_head[0].args
    with pytest.raises(ConfigError, match=r"head 'cosface' does not take \['easy_margin'\]"):
        load_config(None, ["objectives=[{name: recognition, args: {head: cosface, head_args: {easy_margin: true}}}]"])
    with pytest.raises(ConfigError, match="distinct labels"):
        load_config(None, ["objectives=[{name: recognition}, {name: recognition}]"])
    with pytest.raises(ConfigError, match=r"data\.kind.*unknown data kind 'folders'"):
        load_config(None, ["data.kind=folders"])


POSE = ["data.kind=synthetic", "data.synthetic={num_identities: 8, samples_per_identity: 8, targets: [pose], "
        "target_share: 0.6}", "data.batch_size=16", "data.num_workers=0", "data.augment={flip: 0.0, brightness: 0.2}",
        "model.backbone=sphereface4", "model.backbone_args={embedding_size: 32, input_size: [32, 32]}",
        "optim.lr=0.005", "schedule.kind=cosine", "train.log_every=1", "train.tensorboard=false",
        "train.progress=false", "eval.enabled=false"]
REGRESSION = "objectives=[{name: regression, args: {target: pose, out_features: 3, loss: smooth_l1}}]"


def test_weights_scale_terms_and_every_term_reaches_metrics(tmp_path):
    both = "objectives=[{name: recognition, weight: 1.0}, {name: regression, weight: 0.25, label: pose, " \
           "args: {target: pose, out_features: 3}}]"
    cfg = load_config(None, POSE + [both, f"output_dir={tmp_path}", "name=w", "train.steps=3"])
    Trainer(cfg).fit()
    with open(tmp_path / "w" / "metrics.csv", newline="") as handle:
        assert csv.DictReader(handle).fieldnames[:5] == ["step", "epoch", "loss", "loss/recognition", "loss/pose"]
    rows = read_metrics(tmp_path / "w" / "metrics.csv")
    assert len(rows) == 3
    for row in rows:
        assert row["loss/pose"] > 0 and row["loss/recognition"] > 0
        assert row["loss"] == pytest.approx(row["loss/recognition"] + 0.25 * row["loss/pose"], rel=1e-6)  # float32 sum


def test_an_objective_needing_a_missing_target_is_refused(tmp_path):
    cfg = load_config(None, POSE + [REGRESSION.replace("target: pose", "target: age"), f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"needs targets \['age'\]"):
        Trainer(cfg)


# --- a dense regression (a map per image, as PRNet's position maps) through the same loop -------------------------
# tests/dense_plugin.py registers a backbone with a dense output and a data kind with a per-pixel target; configs
# load it with ``plugins: [dense_plugin]`` in every process, as a researcher's own module: facesphere is not edited.

DENSE = ["plugins=[dense_plugin]", "data.kind=test_coarse_maps", "data.batch_size=16", "data.num_workers=0",
         "data.augment={flip: 0.0}", "model.backbone=test_dense", "model.backbone_args={}",
         "optim={name: adamw, lr: 0.01, weight_decay: 0.0}", "schedule.kind=constant",
         "objectives=[{name: regression, label: coarse, args: {target: coarse, input: coarse, loss: l2}}]",
         "train.log_every=1", "train.tensorboard=false", "train.progress=false", "eval.enabled=false"]


@pytest.fixture
def dense_plugin(monkeypatch):
    """The plug-in's registrations last for this test only (the registries are process-wide)."""
    import sys

    from facesphere.backbones import BACKBONES
    from facesphere.train.data_setup import DATA_KINDS

    for registry in (BACKBONES, DATA_KINDS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_canonical", list(registry._canonical))
    monkeypatch.delitem(sys.modules, "dense_plugin", raising=False)
    yield
    sys.modules.pop("dense_plugin", None)


def test_plugins_are_imported_before_validation_and_a_missing_one_is_one_line(dense_plugin):
    assert load_config(None, DENSE).model.backbone == "test_dense"
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin': ModuleNotFoundError"):
        load_config(None, ["plugins=[no_such_plugin]"])


def test_a_dense_map_regression_trains_checkpoints_and_resumes_through_the_same_loop(tmp_path, monkeypatch,
                                                                                     dense_plugin):
    """A per-pixel target with half the samples masked (NaN placeholders): the loss falls, and a run that dies
    after its first checkpoint resumes to exactly the uninterrupted losses and weights."""
    overrides = DENSE + ["train.steps=12", "train.checkpoint_every=6"]
    whole = Trainer(load_config(None, overrides + ["name=whole", f"output_dir={tmp_path}"])).fit()
    rows = read_metrics(tmp_path / "whole" / "metrics.csv")
    assert [r["loss"] for r in rows] == [r["loss/coarse"] for r in rows]  # the only term
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]

    crashed = load_config(None, overrides + ["name=crashed", f"output_dir={tmp_path}"])
    original_save = Trainer.save

    def save_then_die(self):
        original_save(self)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(crashed).fit()
    monkeypatch.setattr(Trainer, "save", original_save)
    resumed = Trainer(crashed)
    assert resumed.resume() and resumed.step == 6
    resumed.fit()
    again = read_metrics(tmp_path / "crashed" / "metrics.csv")
    assert [r["step"] for r in again] == [r["step"] for r in rows]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]
    final = [load_checkpoint(run / "checkpoints" / "step_00000012.pt")["model"] for run in
             (tmp_path / "whole", tmp_path / "crashed")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert whole.steps == 12


@pytest.mark.slow
def test_a_dense_map_regression_survives_sigkill_and_runs_under_torchrun(tmp_path):
    """The same dense regression through the CLI: SIGKILL after a checkpoint + resume repeats the uninterrupted
    losses bit for bit; 2 gloo processes (8 images each) follow 1 process (16) to float32 rounding. Only the map
    is trained, so the embedding's layer gets no gradient: DDP is told (``train.find_unused_parameters``)."""
    config = tmp_path / "dense.yaml"
    config.write_text("{}\n")
    common = ["train", str(config), *sets(DENSE + [f"output_dir={tmp_path}", "train.steps=10",
                                                   "train.checkpoint_every=3", "train.find_unused_parameters=true"])]
    run(cli(*common, "--set", "name=straight"))
    kill_after_first_checkpoint(cli(*common, "--set", "name=killed", "--set", "data.num_workers=1"),
                                tmp_path / "killed", 10)
    run(cli(*common, "--set", "name=killed", "--set", "data.num_workers=1", "--resume", "latest"))
    run(TORCHRUN + [*common, "--set", "name=two"])

    losses = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.csv")]
    assert len(losses) == 10 and len(set(losses)) == 10
    assert [r["loss"] for r in read_metrics(tmp_path / "killed" / "metrics.csv")] == losses
    two = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.csv")]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(losses), rtol=1e-5, atol=1e-6)
