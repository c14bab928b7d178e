"""GridFace training: the rectification objectives against closed forms, stored frozen models (teacher, DAE prior)
kept out of checkpoints, ``model.init`` into a wrapper's recogniser (and its refusals), a frozen recogniser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facesphere.backbones import build_backbone
from facesphere.models.card import training_card
from facesphere.models.runs import load_backbone
from facesphere.models.store import save_model
from facesphere.objectives import FrozenModel, ObjectiveContext, ObjectiveLoadError, build_objective
from facesphere.train.config import load_config
from facesphere.train.trainer import InitError, Trainer, init_backbone

SIZE = [32, 32]
RECOGNISER = {"embedding_size": 16, "input_size": SIZE}
"""A sphereface4 at 32x32 stands in for y1 (a 112x112 MobileFaceNet) in these tests."""


def stored(folder: Path, name: str, **args) -> Path:
    """A model folder of a freshly initialised ``name`` backbone (eval mode), as ``facesphere import`` writes one."""
    torch.manual_seed(7)
    backbone = build_backbone(name, **args).eval()
    return save_model(folder, backbone, training_card(backbone, folder.name, name, args))


def context(key: str, embedding_size: int = 16) -> ObjectiveContext:
    return ObjectiveContext(key, embedding_size, 4, load_model=lambda path: load_backbone(path)[:2])


def test_canonical_prior_gradient_is_the_dae_residual_over_sigma_squared(tmp_path):
    """d/dx 0.5·mean((x − sg(r(x)))²)/σ² = (x − r(x)) / (σ²·numel) exactly, r the stored DAE (frozen, eval mode);
    σ defaults to the DAE's own training noise."""
    dae_path = stored(tmp_path / "dae", "face_dae", input_size=SIZE, noise=0.25, embedding_size=8)
    prior = build_objective("canonical_prior", context("prior"), dae=str(dae_path))
    assert prior.sigma == 0.25 and list(prior.state_dict()) == [] and list(prior.parameters()) == []
    x = torch.randn(3, 3, *SIZE, dtype=torch.float64, requires_grad=True)
    loss = prior({"rectified": x}, {})["prior"]
    loss.backward()
    dae, _, _ = load_backbone(dae_path)
    with torch.no_grad():
        r = dae.reconstruct(x.detach().float()).double()
    torch.testing.assert_close(loss.detach(), 0.5 * (x.detach() - r).square().mean() / 0.25 ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, (x.detach() - r) / (0.25 ** 2 * x.numel()), rtol=1e-12, atol=0)
    explicit = build_objective("canonical_prior", context("prior"), dae=str(dae_path), sigma=0.5)
    assert explicit.sigma == 0.5
    with pytest.raises(ValueError, match=r"takes 32x32 images, the 'rectified' output is 16x16"):
        prior({"rectified": torch.zeros(1, 3, 16, 16)}, {})


def test_aligned_embedding_gradient_matches_the_cosine_closed_form_and_ignores_masked_samples(tmp_path):
    """L = 1/M Σ_present (1 − cos(e_i, t_i)), t = teacher(aligned): dL/de_i = −(t_i/(|e_i||t_i|) − cos_i·e_i/|e_i|²)/M;
    a masked-out sample (its aligned image a NaN placeholder) adds neither loss nor gradient."""
    teacher_path = stored(tmp_path / "teacher", "sphereface4", **RECOGNISER)
    objective = build_objective("aligned_embedding", context("aligned_embedding"), teacher=str(teacher_path))
    assert objective.requires == ("aligned",) and list(objective.state_dict()) == []
    aligned = torch.randn(4, 3, *SIZE)
    mask = torch.tensor([True, False, True, True])
    aligned[1] = float("nan")
    e = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    loss = objective({"embedding": e}, {"aligned": aligned, "aligned_mask": mask})["aligned_embedding"]
    loss.backward()
    teacher, _, _ = load_backbone(teacher_path)
    with torch.no_grad():
        t = teacher(aligned).double()
    ed = e.detach()
    cos = (ed * t).sum(1) / (ed.norm(dim=1) * t.norm(dim=1))
    grad = -(t / (ed.norm(dim=1) * t.norm(dim=1))[:, None] - (cos / ed.norm(dim=1) ** 2)[:, None] * ed) / 3
    torch.testing.assert_close(loss.detach(), (1 - cos[mask]).sum() / 3, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(e.grad[mask], grad[mask], rtol=1e-5, atol=1e-7)
    assert torch.equal(e.grad[1], torch.zeros(16, dtype=torch.float64))
    # a teacher of another embedding size is refused when the objective is built, naming it
    with pytest.raises(ObjectiveLoadError, match=r"'aligned_embedding': teacher .* gives 16-d embeddings, the model 8-d"):
        build_objective("aligned_embedding", context("aligned_embedding", 8), teacher=str(teacher_path))


def test_denoising_is_the_mse_of_the_reconstruction_and_the_dae_denoises_only_in_training():
    dae = build_backbone("face_dae", input_size=SIZE, noise=0.2, embedding_size=8)
    x = torch.randn(2, 3, *SIZE)
    torch.manual_seed(0)
    out = dae(x)
    assert out["clean"] is x and out["embedding"].shape == (2, 8) and out["reconstruction"].shape == x.shape
    torch.manual_seed(0)
    noisy = x + 0.2 * torch.randn_like(x)
    dae.eval()
    torch.testing.assert_close(out["reconstruction"], dae.train().decoder(dae.encoder(noisy)))  # r(x + noise)
    loss = build_objective("denoising", context("denoising"))(out, {})["denoising"]
    torch.testing.assert_close(loss, ((out["reconstruction"] - x) ** 2).mean())
    dae.eval()
    torch.testing.assert_close(dae(x)["reconstruction"], dae.reconstruct(x))  # eval: no noise
    with pytest.raises(ValueError, match="divisible by 16"):
        build_backbone("face_dae", input_size=[40, 40])


def test_a_stored_model_that_cannot_be_loaded_stops_the_trainer_at_start_up_naming_objective_and_path(tmp_path):
    missing = tmp_path / "no_such_dae"
    not_a_dae = stored(tmp_path / "recogniser", "sphereface4", **RECOGNISER)
    for path, reason in ((missing, "no such model folder or checkpoint"), (not_a_dae, "not a denoising autoencoder")):
        cfg = load_config(None, ["model.backbone=face_dae", "model.backbone_args={input_size: [32, 32]}",
                                 "objectives=[{name: denoising}, {name: canonical_prior, label: prior, args: {dae: "
                                 f"'{path}'}}}}]", "data.synthetic.num_identities=2",
                                 "data.synthetic.samples_per_identity=2", "data.batch_size=2", "data.num_workers=0",
                                 f"output_dir={tmp_path}", "name=refused", "eval.enabled=false"])
        with pytest.raises(ObjectiveLoadError) as refused:
            Trainer(cfg)
        message = str(refused.value)
        assert "\n" not in message and "'prior'" in message and str(path) in message and reason in message
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ObjectiveLoadError, match="no model loader was given"):
        build_objective("canonical_prior", ObjectiveContext("prior", 16, 4), dae=str(missing))


def gridface_config(tmp_path: Path, init: Path, *extra: str):
    from test_trainer import SMALL_GRIDFACE

    return load_config(None, [f"model.backbone_args={json.dumps({**SMALL_GRIDFACE, 'freeze_recognizer': True})}",
                              "model.backbone=gridface", f"model.init={init}", f"output_dir={tmp_path}", "name=g",
                              "eval.enabled=false", *extra])


def test_model_init_may_name_the_wrapped_recogniser_and_is_checked_against_its_config(tmp_path):
    """A stored sphereface4 goes into a gridface's recogniser (the rectifier keeps its identity start); a stored model of
    other recogniser arguments, another backbone or another input size is refused in one line naming the path."""
    good = stored(tmp_path / "y1", "sphereface4", **RECOGNISER)
    cfg = gridface_config(tmp_path, good)
    backbone = build_backbone("gridface", **cfg.model.backbone_args)
    rectifier_before = {k: v.clone() for k, v in backbone.rectifier.state_dict().items()}
    init_backbone(backbone, cfg)
    reference = load_backbone(good)[0].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in backbone.recognizer.state_dict().items())
    assert all(torch.equal(v, rectifier_before[k]) for k, v in backbone.rectifier.state_dict().items())
    refusals = {
        "backbone_args.recognizer_args.embedding_size is 8 there, 16 in the config":
            stored(tmp_path / "narrow", "sphereface4", embedding_size=8, input_size=SIZE),
        "it is a 'face_dae' backbone, the config trains 'gridface' (recogniser 'sphereface4')":
            stored(tmp_path / "dae", "face_dae", input_size=SIZE),
        "model expects 48x48 (HxW) images, got 32x32": stored(tmp_path / "large", "sphereface4", embedding_size=16, input_size=[48, 48]),
    }
    for reason, path in refusals.items():
        with pytest.raises(InitError) as refused:
            init_backbone(build_backbone("gridface", **cfg.model.backbone_args), gridface_config(tmp_path, path))
        message = str(refused.value)
        assert "\n" not in message and str(path) in message and reason in message, message
    # a stored gridface still initialises a gridface as a whole, its arguments checked as before
    wrapper_args = {"recognizer": "sphereface4", "recognizer_args": {"embedding_size": 16}, "grid": 2}
    whole = stored(tmp_path / "gridface", "gridface", **wrapper_args)
    for grid, problem in ((2, None), (4, "backbone_args.grid is 2 there, 4 in the config")):
        cfg = load_config(None, [f"model.backbone_args={json.dumps({**wrapper_args, 'grid': grid})}",
                                 "model.backbone=gridface", f"model.init={whole}"])
        backbone = build_backbone("gridface", **cfg.model.backbone_args)
        if problem is None:
            init_backbone(backbone, cfg)
            reference = load_backbone(whole)[0].state_dict()
            assert all(torch.equal(v, reference[k]) for k, v in backbone.state_dict().items())
        else:
            with pytest.raises(InitError, match=problem):
                init_backbone(backbone, cfg)


def test_rectifier_only_training_leaves_the_frozen_recogniser_and_keeps_stored_models_out_of_checkpoints(tmp_path):
    """gridface_y1 at test size, 2 steps: the recogniser's weights and BN statistics stay the imported ones, the
    localiser moves off its identity start, the optimiser holds only the rectifier, and the checkpoint holds the
    backbone alone (the teacher and the DAE prior are not in it)."""
    from test_trainer import gridface_y1_stand_ins

    settings = gridface_y1_stand_ins(tmp_path / "models") + [
        "data.kind=synthetic", "data.synthetic.num_identities=4", "data.synthetic.samples_per_identity=4",
        "data.batch_size=8", "data.num_workers=0", "train.steps=2", "train.progress=false", "train.tensorboard=false",
        f"output_dir={tmp_path}", "name=y1"]
    trainer = Trainer(load_config("gridface_y1", settings))
    backbone = trainer.model.backbone
    assert backbone.needed_outputs == {"embedding", "rectified", "homographies"}  # every objective says what it reads
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in backbone.rectifier.parameters()}
    result = trainer.fit()
    state = torch.load(result.checkpoint, weights_only=True)["model"]
    assert set(state) == {f"backbone.{k}" for k in backbone.state_dict()}
    imported = load_backbone(tmp_path / "models" / "teacher")[0].state_dict()
    assert imported.keys() == {k[len("backbone.recognizer."):] for k in state if k.startswith("backbone.recognizer.")}
    for key, value in imported.items():
        assert torch.equal(state[f"backbone.recognizer.{key}"], value), key
    head = [k for k in state if k.startswith("backbone.rectifier.") and k.endswith(".weight")][-1]
    assert state[head].abs().max() > 0, f"{head} still at its zero start"
    assert all(not p.requires_grad for o in trainer.model.objectives.values()
               for frozen in vars(o).values() if isinstance(frozen, FrozenModel) for p in frozen.module.parameters())


def test_geometry_error_closed_form_and_the_rectify_geometry_objective():
    """One cell of a 2x2 grid off by tx pixels in x: its 4 corners each miss by tx, so the error is
    (tx/W)^2 averaged over 4 cells x 4 corners x 2 coordinates = (tx/W)^2 / 8; a sample without the target is left out."""
    from facesphere.backbones.rectifier import geometry_error

    target = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    target[1, :2, 2] = torch.tensor([3.0, -2.0])  # sample 1's known rectification: a translation
    homographies = target[:, None].repeat(1, 4, 1, 1).clone()
    assert torch.allclose(geometry_error(homographies, target, 2, (32, 32)), torch.zeros(2, dtype=torch.float64))
    homographies[0, 1, 0, 2] = 5.0
    assert torch.allclose(geometry_error(homographies, target, 2, (32, 32))[0],
                          torch.tensor((5.0 / 32) ** 2 / 8, dtype=torch.float64))
    objective = build_objective("rectify_geometry", context("rectify_geometry"))
    assert objective.requires == ("misalignment",)
    h = homographies.float().requires_grad_()
    outputs = {"homographies": h, "rectified": torch.zeros(2, 3, 32, 32)}
    targets = {"misalignment": torch.where(torch.tensor([True, False])[:, None, None], target.float(), float("nan")),
               "misalignment_mask": torch.tensor([True, False])}
    loss = objective(outputs, targets)["rectify_geometry"]
    loss.backward()
    assert loss.item() == pytest.approx((5.0 / 32) ** 2 / 8, rel=1e-5)  # the mean over the one sample that has it
    assert h.grad[1].abs().sum() == 0 and h.grad[0, 1, 0, 2] > 0


def test_aligned_image_is_the_mean_squared_difference_over_present_samples():
    objective = build_objective("aligned_image", context("aligned_image"))
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    aligned = torch.randn(3, 3, 8, 8)
    aligned[2] = float("nan")  # a masked-out placeholder
    loss = objective({"rectified": x}, {"aligned": aligned, "aligned_mask": torch.tensor([True, True, False])})
    assert loss["aligned_image"].item() == pytest.approx(F.mse_loss(x[:2], aligned[:2]).item(), rel=1e-6)
    loss["aligned_image"].backward()
    assert torch.isfinite(x.grad).all() and x.grad[2].abs().sum() == 0


def test_the_recogniser_is_skipped_when_no_objective_reads_the_embedding(tmp_path):
    """Geometry-only training (rectify_geometry + grid_continuity) never runs the recogniser; evaluation always does,
    and an objective that does not say what it reads (recognition) keeps every output."""

    settings = ["model.backbone=gridface", "model.backbone_args={recognizer: mobilefacenet, grid: 2, "
                "recognizer_args: {embedding_size: 16, input_size: [32, 32]}}",
                "objectives=[{name: rectify_geometry}, {name: grid_continuity}]", "data.augment.misalign=strong",
                "data.kind=synthetic", "data.image_size=[32, 32]", "data.synthetic.num_identities=4",
                "data.synthetic.samples_per_identity=4", "data.batch_size=8", "data.num_workers=0", "train.steps=2",
                "train.progress=false", "train.tensorboard=false", "eval.enabled=false", f"output_dir={tmp_path}",
                "name=geometry"]
    trainer = Trainer(load_config(None, settings))
    backbone = trainer.model.backbone
    assert backbone.needed_outputs == {"homographies", "rectified"}
    calls = []
    backbone.recognizer.register_forward_hook(lambda *args: calls.append(1))
    trainer.fit()
    assert calls == []
    backbone.eval()
    assert "embedding" in backbone(torch.zeros(1, 3, 32, 32)) and calls == [1]
    recognition = Trainer(load_config(None, [s.replace("objectives=[{name: rectify_geometry}, {name: grid_continuity}]",
                                                       "objectives=[{name: recognition}, {name: rectify_geometry}]")
                                             .replace("name=geometry", "name=both") for s in settings]))
    assert recognition.model.backbone.needed_outputs is None
