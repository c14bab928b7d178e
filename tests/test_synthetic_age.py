"""Synthetic aged identities: monotone ageing measured on rendered pixels, deterministic ages, masked age targets,
and the generator unchanged when no age is asked for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from pydantic import ValidationError

from facesphere.data import SyntheticFaces
from facesphere.data.face_render import render_face
from facesphere.data.face_traits import age_face, ageing_traits, face_identity, face_variation
from facesphere.train.config import SyntheticSettings, load_config
from facesphere.train.data_setup import build_dataset, build_eval_set

SIZE = 112
ADULT_AGES = np.arange(20.0, 91.0, 10.0)


def _pixel(x: float, y: float) -> tuple[int, int]:
    """Face units -> pixel (column, row) of an un-posed face (difficulty 0: no roll, scale, shift or yaw)."""
    unit = 0.29 * min(SIZE, 0.95 * SIZE)
    return int(round(SIZE / 2 + unit * x)), int(round(0.47 * SIZE + unit * y))


def _luminance(seed: int, identity: int, age: float) -> np.ndarray:
    face = age_face(face_identity(seed, identity), ageing_traits(seed, identity), age)
    image = render_face(face, face_variation(seed, identity, 0, difficulty=0.0), (SIZE, SIZE))
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_hair_greys_with_age_on_the_rendered_crown():
    """For a fixed identity and pose, the crown's brightness (dark hair greying to white) never falls as the age
    rises, and has risen by 80 years."""
    checked = 0
    for identity in range(120):
        face = face_identity(0, identity)
        if face.hair_style == 0 or np.mean(face.hair) > 150:  # shaved, or hair already light
            continue
        col, row = _pixel(0.0, -0.97 * face.top)
        crown = [_luminance(0, identity, age)[row - 1 : row + 2, col - 2 : col + 3].mean() for age in ADULT_AGES]
        assert np.all(np.diff(crown) >= 0), (identity, crown)
        assert crown[-1] > crown[0] + 20, (identity, crown)
        checked += 1
    assert checked > 50


def test_forehead_lines_deepen_with_age():
    """On shaved heads (a bare forehead), the forehead's luminance spread (the age lines' contrast) never falls
    as the age rises, is flat (no lines) at 20 and has grown by 90."""
    checked = 0
    for identity in range(500):
        face = face_identity(0, identity)
        if face.hair_style != 0:
            continue
        brow_top = face.eye_y - face.eye_h - face.brow_gap - face.brow_thick - max(face.brow_arch, 0.0) - abs(face.brow_slant)
        (x0, y0), (x1, y1) = _pixel(-0.3, brow_top - 0.3), _pixel(0.3, brow_top - 0.04)
        spread = [_luminance(0, identity, age)[y0:y1, x0:x1].std() for age in ADULT_AGES]
        assert np.all(np.diff(spread) >= 0), (identity, spread)
        assert spread[-1] > spread[0] + 1, (identity, spread)
        checked += 1
    assert checked > 20


@given(st.integers(0, 10_000), st.floats(0.0, 100.0), st.floats(0.0, 100.0))
def test_every_aged_parameter_moves_one_way(identity, a, b):
    """age_face is monotone: between two ages, each parameter it changes moves in its documented direction."""
    young, old = sorted((a, b))
    face, traits = face_identity(1, identity), ageing_traits(1, identity)
    y, o = age_face(face, traits, young), age_face(face, traits, old)
    rises = ["chin_y", "mouth_y", "nose_y", "nose_w", "ear_size", "wrinkles"]
    falls = ["top", "eye_y", "eye_w", "eye_h", "iris_r", "lip_thick", "hairline"]
    for name in rises:
        assert getattr(o, name) >= getattr(y, name) - 1e-12, name
    for name in falls:
        assert getattr(o, name) <= getattr(y, name) + 1e-12, name
    white = np.array([232.0, 231.0, 228.0])  # hair and brows only move towards white
    for name in ("hair", "brow"):
        assert np.all(np.abs(np.array(getattr(o, name)) - white) <= np.abs(np.array(getattr(y, name)) - white) + 1e-9)
    lower = o.outline[:, 1] > 0
    assert np.all(o.outline[lower, 1] >= y.outline[lower, 1] - 1e-12)  # the jaw only drops


def test_ages_are_deterministic_in_range_and_windowed():
    ds = SyntheticFaces(40, 12, (32, 32), seed=5, targets=["age"], age_range=(20.0, 60.0), age_span=10.0)
    again = SyntheticFaces(40, 12, (32, 32), seed=5, targets=["age"], age_range=(20.0, 60.0), age_span=10.0)
    ages = np.array([ds.age(i) for i in range(len(ds))])
    assert np.array_equal(ages, [again.age(i) for i in range(len(ds))])
    assert np.array_equal(ds.load_uint8(17), again.load_uint8(17))
    assert ages.min() >= 20 and ages.max() <= 60
    per_identity = ages.reshape(40, 12)
    assert np.all(per_identity.max(1) - per_identity.min(1) <= 10.0)
    assert np.ptp(per_identity.mean(1)) > 20  # identities sit at different places in the range
    other = SyntheticFaces(40, 12, (32, 32), seed=6, targets=["age"], age_range=(20.0, 60.0), age_span=10.0)
    assert not np.array_equal(ages, [other.age(i) for i in range(len(ds))])
    whole = np.array([SyntheticFaces(40, 12, (32, 32), seed=5, targets=["age"], age_range=(20.0, 60.0)).age(i)
                      for i in range(480)])
    assert whole.min() < 22 and whole.max() > 58  # no span: uniform over the whole range
    assert np.ptp(whole.reshape(40, 12), axis=1).mean() > 20


def test_the_rendered_face_is_the_one_at_its_age():
    ds = SyntheticFaces(3, 4, (48, 48), seed=2, identity_offset=9, targets=["age"])
    assert ds.age_range == (10.0, 70.0)
    for index in (0, 5, 11):
        identity, sample = divmod(index, 4)
        gid = 9 + identity
        face = age_face(face_identity(2, gid), ageing_traits(2, gid), ds.age(index))
        assert np.array_equal(ds.load_uint8(index), render_face(face, face_variation(2, gid, sample), (48, 48)))


def test_masked_ages_are_nan_and_collate():
    ds = SyntheticFaces(6, 5, (32, 32), seed=1, targets=["pose", "age"], target_share=0.5)
    assert ds.target_names == ("label", "pose", "age")
    known = np.array([ds.has_targets(i) for i in range(len(ds))])
    assert 0 < known.sum() < len(ds)
    for i in range(len(ds)):
        _, targets = ds[i]
        assert targets["age_mask"] == known[i]
        if known[i]:
            assert targets["age"] == ds.age(i)
        else:
            assert math.isnan(targets["age"]) and not math.isnan(ds.age(i))  # rendered at its age, target hidden
    assert np.array_equal(np.isnan(ds.ages), ~known)
    assert np.array_equal(ds.ages[known], [ds.age(i) for i in np.flatnonzero(known)])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))[1]
    assert batch["age_mask"].dtype == torch.bool and torch.equal(batch["age_mask"], torch.from_numpy(known))
    assert torch.equal(torch.isnan(batch["age"]), torch.from_numpy(~known))


def test_without_ages_the_generator_is_unchanged():
    ds = SyntheticFaces(4, 3, (40, 40), seed=3, difficulty=0.8)
    assert ds.target_names == ("label",) and ds.age_range is None
    assert not hasattr(ds, "ages")
    with pytest.raises(ValueError, match="no ages"):
        ds.age(0)
    for index in range(len(ds)):
        identity, sample = divmod(index, 3)
        expected = render_face(face_identity(3, identity), face_variation(3, identity, sample, 0.8), (40, 40))
        assert np.array_equal(ds.load_uint8(index), expected)
    # Aged rendering without the target: ages change the faces, the targets stay the label alone.
    aged = SyntheticFaces(4, 3, (40, 40), seed=3, difficulty=0.8, age_range=(70.0, 70.0))
    assert aged.target_names == ("label",) and aged[0][1] == {"label": 0}
    assert not np.array_equal(aged.load_uint8(0), ds.load_uint8(0))


@pytest.mark.parametrize("kwargs", [
    {"age_range": (50.0, 20.0)}, {"age_range": (-1.0, 20.0)}, {"age_range": (10.0, 200.0)},
    {"age_range": (float("nan"), 20.0)}, {"targets": ["age"], "age_span": -1.0}, {"targets": ["age"], "age_span": float("inf")},
])
def test_bad_age_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="age_"):
        SyntheticFaces(2, 2, (32, 32), **kwargs)


@pytest.mark.parametrize("age", [-0.5, float("nan"), float("inf")])
def test_age_face_refuses_impossible_ages(age):
    with pytest.raises(ValueError, match="age"):
        age_face(face_identity(0, 0), ageing_traits(0, 0), age)


def test_config_ages_reach_the_training_and_held_out_sets():
    with pytest.raises(ValidationError, match="age_min"):
        SyntheticSettings(targets=["age"], age_min=60, age_max=20)
    with pytest.raises(ValidationError):
        SyntheticSettings(targets=["age"], age_min=-1)
    overrides = ["data.synthetic={num_identities: 4, samples_per_identity: 3, targets: [age], age_min: 20, "
                 "age_max: 60, age_span: 15}", "eval.num_identities=3", "eval.samples_per_identity=2"]
    cfg = load_config("quickstart", overrides)
    train = build_dataset(cfg)
    assert train.target_names == ("label", "age") and train.age_range == (20.0, 60.0) and train.age_span == 15.0
    held_out = build_eval_set(cfg)
    assert held_out.age_range == (20.0, 60.0) and held_out.target_names == ("label",)  # aged faces, no age target
    plain = load_config("quickstart", ["data.synthetic={num_identities: 4, samples_per_identity: 3}"])
    assert build_dataset(plain).age_range is None and build_eval_set(plain).age_range is None
