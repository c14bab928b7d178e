"""Margin heads: closed-form values, gradients, numerics at θ ∈ {0, π/2, π}, training sanity, registry.

The reference implementations below are written element by element with ``math`` (no torch), so
they check the heads' vectorised code rather than re-running it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from facesphere.heads import HEADS, IGNORE_LABEL, MarginHead, build_head
from facesphere.heads.coco import coco_alpha
from facesphere.heads.sphereface import sphereface_psi

D, C = 16, 10
LABELS = [0, 1, 2, 3, 4, 5, IGNORE_LABEL, 7]
# Target cosines, chosen away from every configuration's kink (listed in KINKS): θ near π
# (-0.999 ≈ 177.4°, -0.93) exercises the fallback branches of large margins.
TARGET_COS = [-0.999, -0.93, -0.6, -0.25, 0.15, 0.45, -0.95, 0.97]
NORMS = [0.7, 1.3, 2.0, 3.1, 0.9, 4.2, 1.7, 2.6]

# (registered name, constructor kwargs, steps at which to evaluate (sphereface annealing))
CONFIGS: list[tuple[str, dict]] = [
    ("softmax", {}),
    ("softmax", {"bias": False}),
    ("normface", {"learn_scale": False, "scale": 16.0}),
    ("normface", {}),
    ("coco", {}),
    ("coco", {"alpha": 21.475}),
    ("cosface", {}),
    ("am_softmax", {"scale": 30.0, "margin": 0.35}),
    ("arcface", {}),
    ("arcface", {"margin": 1.2}),
    ("arcface", {"easy_margin": True}),
    ("arcface", {"margin": 0.0}),
    ("combined", {}),
    ("combined", {"m1": 1.35, "m2": 0.0, "m3": 0.0}),
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}),
    ("combined", {"m1": 1.0, "m2": 0.5, "m3": 0.0}),
    ("combined", {"m1": 1.7, "m2": 0.2, "m3": 0.1}),
    ("combined", {"m1": 1.0, "m2": 0.0, "m3": 0.35}),
    ("sphereface", {}),
    ("sphereface", {"margin": 1}),
    ("sphereface", {"margin": 2}),
    ("sphereface", {"margin": 3, "lambda_min": 0.0}),
    ("sphereface", {"margin": 5, "lambda_base": 0.0, "lambda_min": 0.0}),
]
SPHERE_STEPS = [0, 1, 10, 100, 10**6]


def config_id(config: tuple[str, dict]) -> str:
    name, kwargs = config
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


# ----------------------------------------------------------------------------- references


def ref_cos(x: torch.Tensor, w: torch.Tensor) -> list[list[float]]:
    xs, ws = x.tolist(), w.tolist()
    out = []
    for xi in xs:
        nx = math.sqrt(sum(v * v for v in xi))
        row = []
        for wj in ws:
            nw = math.sqrt(sum(v * v for v in wj))
            row.append(max(-1.0, min(1.0, sum(a * b for a, b in zip(xi, wj)) / (nx * nw))))
        out.append(row)
    return out


def ref_psi(theta: float, m: int) -> float:
    """SphereFace ψ with the explicit interval search over k."""
    for k in range(m):
        if k * math.pi / m <= theta <= (k + 1) * math.pi / m:
            return (-1) ** k * math.cos(m * theta) - 2 * k
    raise AssertionError(theta)


def ref_lambda(step: int, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0) -> float:
    return max(lambda_min, base * (1 + gamma * step) ** (-power))


def ref_target(name: str, kw: dict, c: float, step: int) -> float:
    """Target logit divided by the scale (by ‖x‖ for sphereface) for target cosine c."""
    theta = math.acos(c)
    if name in ("cosface", "am_softmax"):
        return c - kw.get("margin", 0.35)
    if name == "arcface":
        m = kw.get("margin", 0.5)
        if kw.get("easy_margin", False):
            return math.cos(theta + m) if c > 0 else c
        # The 2018 MXNet rule: threshold = cos(π - m), fallback cos θ - sin(π - m)·m.
        return math.cos(theta + m) if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
    if name == "combined":
        m1, m2, m3 = kw.get("m1", 1.0), kw.get("m2", 0.3), kw.get("m3", 0.2)
        if m1 * theta + m2 <= math.pi:
            return math.cos(m1 * theta + m2) - m3
        theta_star = (math.pi - m2) / m1
        return c - math.cos(theta_star) - 1 - m3
    if name == "sphereface":
        m = kw.get("margin", 4)
        lam = ref_lambda(step, kw.get("lambda_base", 1000.0), kw.get("lambda_gamma", 0.12),
                         kw.get("lambda_power", 1.0), kw.get("lambda_min", 5.0))
        return (lam * c + ref_psi(theta, m)) / (1 + lam)
    return c  # normface, coco: no margin


def ref_scale(name: str, kw: dict, head: MarginHead) -> float:
    if name == "normface":
        return float(head.scale.detach()) if kw.get("learn_scale", True) else kw.get("scale", 10.0)
    if name == "coco":
        if "alpha" in kw:
            return kw["alpha"]
        p = kw.get("target_probability", 0.9)
        return (C - 1) / C * math.log((C - 1) * p / (1 - p))
    if name in ("cosface", "am_softmax", "arcface", "combined"):
        return kw.get("scale", 64.0)
    raise AssertionError(name)


def reference_logits(name, kw, head, x, w, labels, step=0) -> torch.Tensor:
    if name == "softmax":
        b = head.bias.detach().tolist() if head.bias is not None else [0.0] * C
        out = [[sum(a * v for a, v in zip(xi, wj)) + bj for wj, bj in zip(w.tolist(), b)] for xi in x.tolist()]
        return torch.tensor(out, dtype=torch.float64)
    cos = ref_cos(x, w)
    out = []
    for i, row in enumerate(cos):
        y = labels[i]
        vals = [ref_target(name, kw, c, step) if j == y else c for j, c in enumerate(row)]
        if name == "sphereface":
            norm = math.sqrt(sum(v * v for v in x[i].tolist()))
            out.append([norm * v for v in vals])
        else:
            s = ref_scale(name, kw, head)
            out.append([s * v for v in vals])
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------- inputs


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (x, W, labels) whose target cosines are exactly TARGET_COS (row 6 vs class 6)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64))
    rows = []
    for i, (y, c) in enumerate(zip(LABELS, TARGET_COS)):
        centre = F.normalize(w[y if y >= 0 else 6], dim=0)
        u = torch.randn(D, generator=g, dtype=torch.float64)
        u = F.normalize(u - (u @ centre) * centre, dim=0)
        rows.append(NORMS[i] * (c * centre + math.sqrt(1 - c * c) * u))
    return torch.stack(rows), w, torch.tensor(LABELS)


def make_head(name: str, kwargs: dict, dtype=torch.float64) -> MarginHead:
    torch.manual_seed(0)
    head = build_head(name, D, C, **kwargs).to(dtype)
    if name == "softmax" and head.bias is not None:
        with torch.no_grad():
            head.bias.copy_(torch.linspace(-0.5, 0.5, C, dtype=dtype))
    if name == "normface" and kwargs.get("learn_scale", True):
        with torch.no_grad():
            head.scale.fill_(7.3)  # a learned value away from the initialisation
    return head


# ----------------------------------------------------------------------------- 1. closed forms


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_logits_match_closed_form(config):
    name, kwargs = config
    x, w, labels = make_inputs()
    head = make_head(name, kwargs)
    with torch.no_grad():
        head.weight.copy_(w)
    steps = SPHERE_STEPS if name == "sphereface" else [0]
    for step in steps:
        head.update(step)
        got = head(x, labels)
        assert got.dtype == torch.float64
        want = reference_logits(name, kwargs, head, x, w, LABELS, step)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        # labels=None means no target anywhere: every row margin-free.
        free = reference_logits(name, kwargs, head, x, w, [IGNORE_LABEL] * len(LABELS), step)
        torch.testing.assert_close(head(x), free, atol=1e-10, rtol=0)


def test_inputs_reach_the_fallback_branches():
    """The closed-form test really exercises θ + m > π (ArcFace) and m1θ + m2 > π (combined)."""
    arc = math.cos(math.pi - 0.5)
    assert sum(c <= arc for c, y in zip(TARGET_COS, LABELS) if y >= 0) >= 2
    assert sum(c <= math.cos(math.pi / 1.35) for c, y in zip(TARGET_COS, LABELS) if y >= 0) >= 2


def test_ignored_rows_get_no_margin():
    x, w, labels = make_inputs()
    for name in ("cosface", "arcface", "combined", "sphereface"):
        head = make_head(name, {})
        with torch.no_grad():
            head.weight.copy_(w)
        with_labels, without = head(x, labels), head(x)
        ignored = labels == IGNORE_LABEL
        torch.testing.assert_close(with_labels[ignored], without[ignored], atol=0, rtol=0)
        assert not torch.allclose(with_labels[~ignored], without[~ignored])


def test_sphereface_lambda_schedule():
    head = build_head("sphereface", D, C)
    expected = {0: 1000.0, 1: 1000 / 1.12, 10: 1000 / 2.2, 100: 1000 / 13.0, 1658: 1000 / 199.96, 1659: 5.0, 10**6: 5.0}
    for step, lam in expected.items():
        head.update(step)
        assert head.lambda_ == pytest.approx(lam, rel=1e-12)
        assert head.lambda_ == pytest.approx(ref_lambda(step), rel=1e-12)
    custom = build_head("sphereface", D, C, lambda_base=1500, lambda_gamma=0.1, lambda_power=2, lambda_min=1)
    custom.update(3)
    assert custom.lambda_ == pytest.approx(1500 / 1.3**2)


def test_sphereface_psi_is_continuous_and_decreasing():
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    for m in range(1, 7):
        psi = sphereface_psi(torch.cos(theta), m)
        assert psi[0].item() == pytest.approx(1.0) and psi[-1].item() == pytest.approx(1.0 - 2 * m)
        steps = psi.diff()
        assert (steps <= 1e-12).all()  # monotone decreasing in θ
        assert steps.abs().max() < 2 * m * math.pi / 20000 * 1.01  # no jumps: |ψ'| ≤ m·2 roughly
        ref = torch.tensor([ref_psi(t, m) for t in theta[::97].tolist()], dtype=torch.float64)
        torch.testing.assert_close(psi[::97], ref, atol=1e-10, rtol=0)


MONOTONE_CONFIGS = [c for c in CONFIGS if c[0] in ("cosface", "arcface", "combined") and "easy_margin" not in c[1]]


@pytest.mark.parametrize("config", MONOTONE_CONFIGS, ids=config_id)
def test_target_cosine_is_monotone(config):
    """Every margin's target logit is non-increasing in θ over [0, π], fallback included."""
    head = build_head(config[0], D, C, **config[1]).double()
    c = torch.linspace(-1, 1, 40001, dtype=torch.float64)
    assert (head.target_cosine(c).diff() >= -1e-12).all()


def test_easy_margin_is_not_monotone():
    """Documented behaviour of the original option: at θ = π/2 the target jumps up from -sin m to 0."""
    head = build_head("arcface", D, C, easy_margin=True).double()
    just_above, just_below = head.target_cosine(torch.tensor([1e-9, -1e-9], dtype=torch.float64)).tolist()
    assert just_above == pytest.approx(-math.sin(0.5), abs=1e-6) and just_below == pytest.approx(0.0, abs=1e-6)


def test_learned_scale_straight_through_clamp():
    x, w, labels = make_inputs()
    head = make_head("normface", {}).double()
    with torch.no_grad():
        head.weight.copy_(w)
        head.scale.fill_(1e-3)  # below min_scale = 0.01
    logits = head(x, labels)
    cos = torch.tensor(ref_cos(x, w), dtype=torch.float64)
    torch.testing.assert_close(logits, 0.01 * cos, atol=1e-12, rtol=0)
    logits.sum().backward()
    assert head.scale.grad is not None and head.scale.grad.abs() > 0  # not killed by the clamp
    fixed = build_head("normface", D, C, learn_scale=False)
    assert not any(p is not None and p.dim() == 0 for p in fixed.parameters())
    assert build_head("normface", D, C).scale.item() == 10.0


def test_coco_alpha_reproduces_released_scale():
    # COCO v2's released face model: α = 21.475 for K = 87,020 (materials_for_face/ir235_release.prototxt).
    k = 87_020
    assert coco_alpha(k, 0.99996) == pytest.approx(21.475, abs=0.03)
    # Inverting the formula: α = 21.475 corresponds to p = 0.999959 ≈ 0.99996.
    r = math.exp(21.475 * k / (k - 1)) / (k - 1)
    p = r / (1 + r)
    assert round(p, 5) == 0.99996
    assert coco_alpha(k, p) == pytest.approx(21.475, abs=1e-9)
    assert build_head("coco", D, C).alpha == pytest.approx((C - 1) / C * math.log((C - 1) * 9))


def test_subset_of_centres_matches_full_logits():
    """Partial FC contract: logits on sampled centres equal those columns of the full logits."""
    x, w, labels = make_inputs()
    keep = torch.tensor([7, 0, 2, 5, 9, 3])
    remap = {int(c): i for i, c in enumerate(keep)}
    sub_labels = torch.tensor([remap.get(int(y), IGNORE_LABEL) for y in labels])
    for name in ("normface", "cosface", "arcface", "combined", "sphereface"):
        head = make_head(name, {})
        full = head.logits(x, w, labels)
        sub = head.logits(x, w[keep], sub_labels)
        in_subset = sub_labels != IGNORE_LABEL
        torch.testing.assert_close(sub[in_subset], full[in_subset][:, keep], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- 2. gradients


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_gradcheck(config):
    """Exact float64 gradients w.r.t. embeddings and centres (and a learned scale).

    TARGET_COS keeps every target cosine ≥ 3e-3 from the configuration's kinks (ArcFace/combined
    thresholds, easy-margin 0) and from ±1, so finite differences never straddle a branch.
    SphereFace's k boundaries are not kinks (ψ is C¹ there).
    """
    name, kwargs = config
    x, w, labels = make_inputs()
    head = make_head(name, kwargs)
    if hasattr(head, "threshold") and getattr(head, "needs_fallback", False):
        assert min(abs(c - head.threshold) for c in TARGET_COS) > 3e-3
    head.update(10)
    x.requires_grad_(True)
    w.requires_grad_(True)
    params = {"weight": w}
    if name == "normface" and head.learn_scale:
        params["scale"] = head.scale.detach().clone().requires_grad_(True)

    def fn(x, *values):
        return functional_call(head, dict(zip(params, values)), (x, labels))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- 3. finiteness


FINITE_CONFIGS = [
    ("softmax", {}, 0),
    ("normface", {}, 0),
    ("normface", {"learn_scale": False}, 0),
    ("coco", {}, 0),
    ("cosface", {}, 0),
    ("arcface", {}, 0),
    ("arcface", {"easy_margin": True}, 0),
    ("arcface", {"margin": 1.5}, 0),
    ("combined", {}, 0),
    ("combined", {"m1": 1.35, "m2": 0.0, "m3": 0.0}, 0),
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}, 0),
    ("sphereface", {}, 0),
    ("sphereface", {}, 10**6),
    ("sphereface", {"margin": 3, "lambda_base": 0.0, "lambda_min": 0.0}, 0),
]


def basis_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres 3·e_j and bf16 embeddings exactly at θ = 0, π/2, π from their target (plus an ignored row)."""
    w = 3.0 * torch.eye(C, D)
    e = torch.eye(D)
    x = torch.stack([2 * e[0], 0.5 * e[5], -e[2], 4 * e[9], -e[3]]).to(torch.bfloat16)
    labels = torch.tensor([0, 1, 2, 3, IGNORE_LABEL])  # θ_y = 0, π/2, π, π/2, (none)
    return x, w, labels


def random_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16-rounded centres and embeddings equal to, orthogonal to and opposite to them."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(C, D, generator=g).to(torch.bfloat16).float()
    w0, w1, w2 = w[0], w[1], w[2]
    ortho = torch.zeros(D)
    ortho[0], ortho[1] = w1[1], -w1[0]  # exactly orthogonal to w1 in exact arithmetic
    x = torch.stack([w0, ortho, -w2, 4 * w0]).to(torch.bfloat16)
    return x, w, torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("config", FINITE_CONFIGS, ids=lambda c: config_id(c[:2]) + f"-step{c[2]}")
def test_finite_at_extreme_angles_under_bf16_autocast(config):
    name, kwargs, step = config
    for x, w, labels in (basis_inputs(), random_inputs()):
        head = build_head(name, D, C, **kwargs)
        with torch.no_grad():
            head.weight.copy_(w)
        head.update(step)
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(x, labels)
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL) + logits.mean()
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        loss.backward()
        assert torch.isfinite(x.grad).all()
        for p in head.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_exact_values_at_extreme_angles():
    """On the exact basis construction, fp32 logits match the closed form at θ = 0, π/2, π."""
    x, w, labels = basis_inputs()
    for name, kwargs, step in FINITE_CONFIGS:
        head = build_head(name, D, C, **kwargs)
        with torch.no_grad():
            head.weight.copy_(w)
        head.update(step)
        got = head(x, labels).double()
        want = reference_logits(name, kwargs, head, x.double(), w.double(), labels.tolist(), step)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- 4. training sanity


@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("name", ["softmax", "normface", "coco", "cosface", "arcface", "combined", "sphereface"])
def test_cross_entropy_decreases(name, num_classes):
    g = torch.Generator().manual_seed(1)
    centres = 3 * torch.randn(num_classes, 4, generator=g)
    y = torch.arange(num_classes).repeat_interleave(20)
    z = centres[y] + 0.3 * torch.randn(len(y), 4, generator=g)
    torch.manual_seed(1)
    features = torch.nn.Linear(4, 8)
    head = build_head(name, 8, num_classes)
    params = list(features.parameters()) + list(head.parameters())
    optimiser = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    losses = []
    for step in range(50):
        head.update(step)
        loss = F.cross_entropy(head(features(z), y), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses


# ----------------------------------------------------------------------------- 5. registry


def test_registry_builds_every_name():
    expected = {"softmax", "normface", "sphereface", "coco", "cosface", "am_softmax", "arcface", "combined"}
    assert expected <= set(HEADS.names(aliases=True))
    for name in HEADS.names(aliases=True):
        head = build_head(name, D, C)
        assert isinstance(head, MarginHead)
        assert head.weight.shape[0] == C and head.weight.shape[1] % D == 0  # a row may hold K sub-centres
        assert head(torch.randn(3, D), torch.tensor([0, IGNORE_LABEL, C - 1])).shape == (3, C)


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match="arcface"):
        build_head("arcfaec", D, C)


@pytest.mark.parametrize("name", ["softmax", "normface", "coco", "cosface", "arcface", "combined", "sphereface"])
def test_bad_shapes_raise_value_error(name):
    head = build_head(name, D, C)
    with pytest.raises(ValueError):
        head(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        head(torch.randn(4, D, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        head(torch.randn(4, D), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        head(torch.randn(4, D), torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError):
        head(torch.randn(4, D), torch.tensor([0, 1, 2, -2]))
    with pytest.raises(ValueError):
        build_head(name, 0, C)
    with pytest.raises(ValueError):
        build_head(name, D, 1)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("normface", {"scale": 0.0}),
        ("normface", {"scale": 1.0, "min_scale": 2.0}),
        ("coco", {"target_probability": 1.0}),
        ("coco", {"target_probability": 0.01}),  # p < 1/K gives α < 0
        ("cosface", {"scale": -1.0}),
        ("arcface", {"margin": 2.0}),
        ("combined", {"m1": 0.0}),
        ("combined", {"m2": -0.1}),
        ("sphereface", {"margin": 2.5}),
        ("sphereface", {"margin": 0}),
    ],
)
def test_bad_hyper_parameters_raise_value_error(name, kwargs):
    with pytest.raises(ValueError):
        build_head(name, D, C, **kwargs)


def test_softmax_bias_refuses_a_subset_of_centres():
    head = build_head("softmax", D, C)
    with pytest.raises(ValueError):
        head.logits(torch.randn(2, D), head.weight[:4], torch.tensor([0, 1]))
    no_bias = build_head("softmax", D, C, bias=False)
    assert no_bias.logits(torch.randn(2, D), no_bias.weight[:4], torch.tensor([0, 1])).shape == (2, 4)
