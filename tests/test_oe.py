"""OE-CNN (arXiv 1810.07599): the ``oe`` head, the ``age_from_norm`` objective, fine-tuning with ``model.init``,
and the age branch carried from a run to a model folder's card."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_heads import ref_cos, ref_lambda, ref_psi

from facesphere.heads import HEADS, build_head
from facesphere.models.card import AgeBranch
from facesphere.models.export import export_model
from facesphere.models.store import load_model
from facesphere.objectives import OBJECTIVES, ObjectiveContext, build_objective
from facesphere.objectives.age import AgeFromNorm
from facesphere.train.config import load_config
from facesphere.train.trainer import InitError, Trainer, build_optimizer, read_metrics

# ----------------------------------------------------------------------------------------------- the head


def _inputs(n=6, d=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 30.0, n, dtype=torch.float64)[:, None]
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    return x, w, torch.tensor([0, 1, 2, 3, 4, -1][:n])


@pytest.mark.parametrize("kwargs, step", [({}, 0), ({}, 40), ({"scale": 10.0, "margin": 2}, 3),
                                          ({"lambda_base": 0.0, "lambda_min": 0.0}, 0)])
def test_oe_logits_are_s_times_sphereface_margin_on_the_direction(kwargs, step):
    """logit_j = s·cos θ_j, target s·(λ cos θ + ψ(θ))/(1 + λ), written element by element with math."""
    x, w, labels = _inputs()
    head = build_head("oe", 8, 5, **kwargs).double()
    head.update(step)
    s, m = kwargs.get("scale", 32.0), kwargs.get("margin", 4)
    lam = ref_lambda(step, kwargs.get("lambda_base", 1000.0), lambda_min=kwargs.get("lambda_min", 5.0))
    cos = ref_cos(x, w)
    expected = [[s * ((lam * c + ref_psi(math.acos(c), m)) / (1 + lam) if j == y else c) for j, c in enumerate(row)]
                for row, y in zip(cos, labels.tolist())]
    torch.testing.assert_close(head.exact_logits(x, w, labels), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-10, atol=1e-10)
    # only the direction matters: rescaling each feature leaves the logits unchanged
    torch.testing.assert_close(head.exact_logits(x * torch.rand(6, 1, dtype=torch.float64) * 9, w, labels),
                               head.exact_logits(x, w, labels), rtol=1e-10, atol=1e-10)


def test_oe_gradients_are_exact_and_orthogonal_to_the_feature():
    x, w, labels = _inputs()
    head = build_head("oe_cnn", 8, 5).double()
    head.update(7)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: head.exact_logits(a, b, labels), (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)
    F.cross_entropy(head.exact_logits(x, w, labels), labels.clamp(min=0)).backward()
    # the identity loss does not pull on the norm: its gradient is tangent to the sphere
    torch.testing.assert_close((x.grad * x).sum(1), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_oe_is_registered_under_both_names_and_refuses_a_bad_scale():
    assert HEADS.get("oe") is HEADS.get("oe_cnn")
    with pytest.raises(ValueError, match="scale"):
        build_head("oe", 8, 5, scale=0.0)


# ----------------------------------------------------------------------------------------------- the age objective


def _age(key="age") -> AgeFromNorm:
    return build_objective("age_from_norm", ObjectiveContext(key, embedding_size=8, num_classes=3))


def test_age_loss_is_half_the_mean_squared_error_over_the_samples_with_ages():
    objective = _age().double()
    x = torch.randn(6, 8, dtype=torch.float64)
    ages = torch.tensor([10.0, float("nan"), 30.0, 41.0, float("nan"), 7.0], dtype=torch.float64)
    mask = ~ages.isnan()
    objective({"embedding": x}, {"age": ages, "age_mask": mask})  # fits μ, σ, a, c on this batch
    with torch.no_grad():
        objective.slope_per_std.fill_(3.0)
        objective.age_at_mean.fill_(20.0)
    branch = AgeBranch(**objective.age_branch())
    x.requires_grad_(True)
    loss = objective({"embedding": x}, {"age": ages, "age_mask": mask})["age"]
    norms = [math.sqrt(sum(v * v for v in row)) for row in x.tolist()]
    expected = sum((branch.slope * n + branch.intercept - z) ** 2 for n, z, keep in
                   zip(norms, ages.tolist(), mask.tolist()) if keep) / (2 * int(mask.sum()))
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).all()


def test_the_first_batch_fit_is_the_least_squares_line_and_runs_once():
    objective = _age()
    norms = torch.tensor([11.0, 14.0, 19.5, 23.0, 28.0], dtype=torch.float64)
    x = norms[:, None] * F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    ages = 2.5 * norms - 12.0  # exactly linear: the fit is exact and the loss zero
    loss = objective({"embedding": x}, {"age": ages})["age"]
    branch = objective.age_branch()
    assert (branch["slope"], branch["intercept"]) == (pytest.approx(2.5, rel=1e-6), pytest.approx(-12.0, abs=1e-4))
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    objective({"embedding": 2 * x}, {"age": 0 * ages})  # a later batch does not refit: f stays the line
    later = objective.age_branch()
    assert (later["slope"], later["intercept"]) == (pytest.approx(2.5, rel=1e-6), pytest.approx(-12.0, abs=1e-4))


def test_following_the_norms_changes_coordinates_not_the_function():
    objective = _age().double()
    x = torch.randn(16, 8, dtype=torch.float64) * 3
    objective({"embedding": x}, {"age": torch.linspace(5, 60, 16, dtype=torch.float64)})
    probe = torch.tensor([0.5, 4.0, 9.0, 30.0], dtype=torch.float64)
    before, mean = objective.predict(probe).detach(), objective.norm_mean.item()
    objective({"embedding": 7 * x + 2}, {"age": torch.zeros(16, dtype=torch.float64)})
    assert objective.norm_mean.item() != mean
    torch.testing.assert_close(objective.predict(probe).detach(), before, rtol=1e-6, atol=1e-6)
    objective.eval()
    frozen = objective.norm_mean.item()
    objective({"embedding": 50 * x}, {"age": torch.zeros(16, dtype=torch.float64)})
    assert objective.norm_mean.item() == frozen  # evaluation does not move the statistics


def test_sgd_tracks_a_changed_norm_age_line_where_raw_k_and_b_diverge():
    """After the fit the norms drift (a backbone in training): the project's SGD (lr 0.1, momentum 0.9) converges
    to the new exact line k·n + b. The same SGD on raw (k, b) diverges: its curvature E[n²] ≈ 400 exceeds 2/lr."""
    g = torch.Generator().manual_seed(0)
    objective = _age().double()
    first = 10 + 20 * torch.rand(64, generator=g, dtype=torch.float64)
    direction = F.normalize(torch.randn(64, 8, generator=g, dtype=torch.float64), dim=1)
    objective({"embedding": first[:, None] * direction}, {"age": 3.0 * first - 30.0})
    optimizer = build_optimizer(objective, load_config(None, ["optim.lr=0.1", "optim.momentum=0.9"]))
    norms = 12 + 16 * torch.rand(64, generator=g, dtype=torch.float64)  # moved and rescaled
    ages = 1.7 * norms + 5.0
    batch = {"embedding": norms[:, None] * direction}
    for _ in range(200):
        optimizer.zero_grad()
        objective(batch, {"age": ages})["age"].backward()
        optimizer.step()
    branch = objective.age_branch()
    assert (branch["slope"], branch["intercept"]) == (pytest.approx(1.7, rel=1e-4), pytest.approx(5.0, abs=1e-3))

    k, b = torch.zeros((), dtype=torch.float64, requires_grad=True), torch.zeros((), dtype=torch.float64, requires_grad=True)
    raw = torch.optim.SGD([k, b], lr=0.1, momentum=0.9)
    for _ in range(20):
        raw.zero_grad()
        (0.5 * (k * norms + b - ages).square().mean()).backward()
        raw.step()
    assert not abs(k.item()) < 1e6


@pytest.mark.parametrize("momentum, converges", [(0.1, True), (0.0, False)])
def test_sgd_converges_while_the_norms_grow_tenfold(momentum, converges):
    """A small backbone trained from scratch grows its norms ~1 → ~11: the fit on the first batch then leaves a
    with curvature ~2500, and SGD (lr 0.1, momentum 0.9, weight 1) blows up unless μ, σ follow the norms."""
    g = torch.Generator().manual_seed(1)
    objective = build_objective("age_from_norm", ObjectiveContext("age", 8, 3), norm_momentum=momentum).double()
    optimizer = build_optimizer(objective, load_config(None, ["optim.lr=0.1", "optim.momentum=0.9"]))
    base = 1 + 0.2 * torch.randn(64, generator=g, dtype=torch.float64)
    direction = F.normalize(torch.randn(64, 8, generator=g, dtype=torch.float64), dim=1)
    for step in range(400):
        scale = 1 + 10 * min(step, 150) / 150
        ages = 30 * (base - 1) + 35  # the truth at the final scale: k = 30/11, b = 35 - 30
        optimizer.zero_grad()
        loss = objective({"embedding": (scale * base)[:, None] * direction}, {"age": ages})["age"]
        if not torch.isfinite(loss) or loss.item() > 1e6:
            break
        loss.backward()
        optimizer.step()
    branch = objective.age_branch()
    exact = math.isfinite(branch["slope"]) and branch["slope"] == pytest.approx(30 / 11, rel=1e-3) \
        and branch["intercept"] == pytest.approx(5.0, abs=1e-2)
    assert exact == converges, branch


def test_under_bf16_autocast_the_age_loss_is_computed_in_float32():
    objective = _age()
    x = (torch.randn(5, 8) * 10).to(torch.bfloat16)
    ages = torch.tensor([12.0, 30.0, 44.0, 51.0, 70.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective({"embedding": x}, {"age": ages})["age"]
    reference = _age()({"embedding": x.float()}, {"age": ages})["age"]
    assert loss.dtype == torch.float32 and loss.item() == reference.item()


def test_masked_only_batches_give_zero_loss_and_no_fit():
    objective = _age()
    x = torch.randn(4, 8, requires_grad=True)
    loss = objective({"embedding": x}, {"age": torch.full((4,), float("nan")), "age_mask": torch.zeros(4, dtype=torch.bool)})
    assert loss["age"].item() == 0.0 and not bool(objective.fitted)
    loss["age"].backward()
    assert (x.grad == 0).all() and objective.card_fields() == {}
    with pytest.raises(ValueError, match="no sample with an age"):
        objective.age_branch()


# ----------------------------------------------------------------------------------------------- through the trainer

TINY = ["model.backbone=sphereface4", "model.backbone_args={embedding_size: 16, input_size: [32, 32]}",
        "model.head=oe", "model.head_args={scale: 16.0}", "data.kind=synthetic", "data.synthetic.targets=[age]",
        "data.synthetic.target_share=0.7",
        "data.synthetic.num_identities=8", "data.synthetic.samples_per_identity=4", "data.batch_size=8",
        "data.num_workers=0", "optim.lr=0.01", "train.log_every=1", "train.tensorboard=false", "train.progress=false",
        "eval.enabled=false", "objectives=[{name: recognition}, {name: age_from_norm, label: age, weight: 0.01}]"]


def test_an_oe_run_logs_both_terms_and_exports_its_age_branch(tmp_path):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=oe", "train.steps=3"])
    trainer = Trainer(cfg)
    trainer.fit()
    rows = read_metrics(tmp_path / "oe" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["loss"] == pytest.approx(row["loss/recognition"] + 0.01 * row["loss/age"], rel=1e-5)
    exported = export_model(tmp_path / "oe", tmp_path / "model")
    _, card = load_model(tmp_path / "model")
    assert card.age_branch is not None and card.age_branch == exported.card.age_branch
    objective = trainer.model.objectives["age"]
    norms = objective.norm_mean + objective.norm_std * torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(card.age_branch.predict(norms), objective.predict(norms).detach(), rtol=1e-9, atol=1e-9)
    plain = load_config(None, TINY + [f"output_dir={tmp_path}", "name=plain", "train.steps=1", "objectives=[]"])
    Trainer(plain).fit()
    assert export_model(tmp_path / "plain", tmp_path / "plain_model").card.age_branch is None


def test_an_age_objective_on_data_without_ages_is_refused_at_startup(tmp_path):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=x", "data.synthetic.targets=[]"])
    with pytest.raises(ValueError, match=r"objective 'age' needs targets \['age'\]"):
        Trainer(cfg)


def test_ages_no_objective_reads_are_ignored_and_logged_once(tmp_path, caplog):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path}", "name=x", "objectives=[]"])
    with caplog.at_level("INFO", logger="facesphere"):
        Trainer(cfg)
    assert [r.message for r in caplog.records if "no objective reads" in r.message] == [
        "the data gives targets ['age'] that no objective reads: they are ignored"]


def test_fine_tuning_starts_from_the_init_weights_and_resumes_bit_exactly(tmp_path):
    base = load_config(None, TINY + [f"output_dir={tmp_path}", "name=pre", "train.steps=2", "objectives=[]"])
    Trainer(base).fit()
    export_model(tmp_path / "pre", tmp_path / "pre_model")
    settings = TINY + [f"output_dir={tmp_path}", f"model.init={tmp_path / 'pre_model'}", "train.steps=6",
                       "train.checkpoint_every=3"]
    tuned = Trainer(load_config(None, settings + ["name=straight"]))
    tuned.fit()
    first = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert first["card"]["age_branch"]["kind"] == "norm_linear"

    # a resume at step 3 reads the checkpoint, not model.init (gone now), and continues step for step
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "resumed" / "checkpoints" / "step_00000003.pt").write_bytes(
        (tmp_path / "straight" / "checkpoints" / "step_00000003.pt").read_bytes())
    for path in (tmp_path / "pre_model").iterdir():
        path.unlink()
    resumed = Trainer(load_config(None, settings + ["name=resumed"]))
    assert resumed.resume()
    resumed.fit()
    a = read_metrics(tmp_path / "straight" / "metrics.csv")
    b = read_metrics(tmp_path / "resumed" / "metrics.csv")
    assert [r["loss"] for r in b] == [r["loss"] for r in a][3:]
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "resumed" / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


def test_fine_tuning_starts_from_the_stored_weights(tmp_path):
    Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", "name=pre", "train.steps=1", "objectives=[]"])).fit()
    stored = export_model(tmp_path / "pre", tmp_path / "pre_model").path
    trainer = Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", f"model.init={stored}", "name=t",
                                                "train.steps=1", "optim.lr=1e-12"]))
    backbone, _ = load_model(stored)
    trainer.fit()
    for key, value in backbone.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(trainer.model.backbone.state_dict()[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (["model.backbone_args={embedding_size: 32, input_size: [32, 32]}"],
     "backbone_args.embedding_size is 16 there, 32 in the config"),
    (["model.backbone=mobilefacenet", "model.backbone_args={embedding_size: 16, input_size: [32, 32]}"],
     "it is a 'sphereface4' backbone, the config trains 'mobilefacenet'"),
    (["model.backbone_args={embedding_size: 16, input_size: [48, 48]}"], "model expects"),
])
def test_init_weights_that_do_not_fit_are_one_line_errors(tmp_path, change, message):
    Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", "name=pre", "train.steps=1", "objectives=[]"])).fit()
    trainer = Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", f"model.init={tmp_path / 'pre'}", "name=t",
                                                "train.steps=1"] + change))
    with pytest.raises(InitError, match=message) as error:
        trainer.fit()
    assert "\n" not in str(error.value) and not (tmp_path / "t").exists()


def test_a_missing_init_path_is_one_line(tmp_path):
    trainer = Trainer(load_config(None, TINY + [f"output_dir={tmp_path}", f"model.init={tmp_path / 'nothing'}",
                                                "name=t", "train.steps=1"]))
    with pytest.raises(InitError, match="model.init .*nothing"):
        trainer.fit()


def test_the_age_objective_is_registered():
    assert OBJECTIVES.get("age_from_norm") is AgeFromNorm
