"""Controlled misalignment (data/misalign.py), the ``aligned`` training target, and box-only crops."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from facesphere.align.boxcrop import box_crop
from facesphere.backbones.rectifier import warp_cells
from facesphere.data import (AugmentConfig, ImageFolderDataset, ImageListDataset, RecordDataset, SyntheticFaces,
                             pack_folder, write_image_folder)
from facesphere.data.misalign import (MISALIGN_STRENGTHS, NO_MISALIGNMENT, MisalignJitter, MisalignStrength,
                                      get_strength, jitter_homography, misalign)
from facesphere.data.images import to_tensor
from facesphere.data.transforms import misalign_rng
from facesphere.train.config import AugmentSettings


def _image(seed: int = 0, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _apply(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    mapped = np.c_[points, np.ones(len(points))] @ homography.T
    return mapped[:, :2] / mapped[:, 2:]


def test_zero_strength_is_the_identity():
    image = _image()
    assert np.allclose(jitter_homography(NO_MISALIGNMENT, np.random.default_rng(1), image.shape[:2]), np.eye(3))
    assert np.array_equal(misalign(image, NO_MISALIGNMENT, np.random.default_rng(1)), image)
    assert np.array_equal(MisalignJitter("strong", share=0.0)(image, np.random.default_rng(2)), image)
    assert MISALIGN_STRENGTHS["strong"].scaled(0.0) == NO_MISALIGNMENT


@given(rotation=st.floats(0, 30), lo=st.floats(0.7, 1), hi=st.floats(1, 1.4), translate=st.floats(0, 0.2),
       perspective=st.floats(0, 0.1), height=st.integers(8, 160), width=st.integers(8, 160),
       seed=st.integers(0, 2**32 - 1))
def test_corner_displacements_stay_inside_the_bounds(rotation, lo, hi, translate, perspective, height, width, seed):
    """A corner q moves to c + t + sR(q + d - c): |shift| <= |s e^{i theta} - 1| |q - c| + |t| + s |d|."""
    strength = MisalignStrength(rotation, (lo, hi), translate, perspective)
    homography = jitter_homography(strength, np.random.default_rng(seed), (height, width))
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float64)
    shift = np.linalg.norm(_apply(homography, corners) - corners, axis=1)
    diagonal = math.hypot(width, height)
    worst_turn = max(abs(s * complex(math.cos(a), math.sin(a)) - 1)
                     for s in (lo, hi) for a in (-math.radians(rotation), math.radians(rotation)))
    bound = worst_turn * math.hypot(width - 1, height - 1) / 2 + (translate + hi * perspective) * diagonal
    assert np.all(shift <= bound + 1e-6)


def test_output_pixel_samples_the_input_at_the_homography():
    """On a linear ramp (bilinear sampling is exact there) output pixel p holds the input's value at H p."""
    height, width = 96, 112
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = np.stack([xs * 2, ys * 2, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    homography = jitter_homography(MISALIGN_STRENGTHS["strong"], np.random.default_rng(7), (height, width))
    warped = misalign(ramp, MISALIGN_STRENGTHS["strong"], np.random.default_rng(7))
    points = np.c_[xs.ravel(), ys.ravel()].astype(np.float64)
    source = _apply(homography, points)
    inside = (source[:, 0] > 1) & (source[:, 0] < width - 2) & (source[:, 1] > 1) & (source[:, 1] < height - 2)
    assert inside.mean() > 0.5
    got = warped.reshape(-1, 3)[inside, :2].astype(np.float64) / 2
    assert np.abs(got - source[inside]).max() < 0.6  # uint8 rounding of 2x + cv2's 1/32-pixel grid


def test_same_seed_same_image_and_strengths_grow():
    image = _image(3, (64, 64))
    a = misalign(image, MISALIGN_STRENGTHS["medium"], np.random.default_rng([5, 11]))
    assert np.array_equal(a, misalign(image, MISALIGN_STRENGTHS["medium"], np.random.default_rng([5, 11])))
    assert not np.array_equal(a, misalign(image, MISALIGN_STRENGTHS["medium"], np.random.default_rng([5, 12])))
    corners = np.array([[0, 0], [63, 0], [63, 63], [0, 63]], dtype=np.float64)
    mean_shift = [np.mean([np.linalg.norm(_apply(jitter_homography(get_strength(level), np.random.default_rng(i),
                                                                   (64, 64)), corners) - corners, axis=1).mean()
                           for i in range(50)]) for level in ("mild", "medium", "strong")]
    assert mean_shift == sorted(mean_shift) and mean_shift[0] > 0.5


def test_unknown_levels_and_bounds_are_refused():
    with pytest.raises(ValueError, match="unknown misalignment strength 'huge'"):
        get_strength("huge")
    with pytest.raises(ValueError, match="misalign"):
        AugmentSettings(misalign="huge")
    with pytest.raises(ValueError, match="scale"):
        MisalignStrength(3.0, (1.1, 1.2), 0.0, 0.0)
    with pytest.raises(ValueError):
        AugmentConfig(misalign="medium", misalign_share=1.5)


# --------------------------------------------------------------------------------- the aligned target

PLAIN = {"flip": 0.5, "brightness": 0.3, "contrast": 0.3, "scale": (0.95, 1.05)}


def _sets(kind: str, tmp_path, augment: dict):
    if kind == "synthetic":
        return SyntheticFaces(3, 2, seed=4, image_size=(32, 32), augment=augment, targets=["age"])
    folder = tmp_path / "folder"
    if not folder.exists():
        write_image_folder(SyntheticFaces(3, 2, seed=4, image_size=(32, 32)), folder)
    if kind == "folder":
        return ImageFolderDataset(folder, augment=augment)
    if kind == "list":
        lines = [f"{p.relative_to(folder)} {int(p.parent.name)}" for p in sorted(folder.rglob("*.png"))]
        (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
        return ImageListDataset(tmp_path / "train.txt", root=folder, augment=augment)
    if not (tmp_path / "rec").exists():
        pack_folder(folder, tmp_path / "rec", progress=False)
    return RecordDataset(tmp_path / "rec", augment=augment)


@pytest.mark.parametrize("kind", ["synthetic", "folder", "list", "record"])
def test_aligned_target_is_the_unjittered_sample_with_the_same_draws(kind, tmp_path):
    plain = _sets(kind, tmp_path, PLAIN)
    jittered = _sets(kind, tmp_path, {**PLAIN, "misalign": "strong"})
    assert "aligned" not in plain.target_names
    assert jittered.target_names == (*plain.target_names, "aligned", "misalignment")
    for ds in (plain, jittered):
        ds.set_epoch(3)
    changed = 0
    for index in range(len(plain)):
        image, targets = plain[index]
        moved, jtargets = jittered[index]
        assert "aligned" not in targets and set(jtargets) - set(targets) == {"aligned", "misalignment"}
        # misalignment off: the very same sample as before it existed; on: its aligned target is that sample
        assert torch.equal(jtargets["aligned"], image) and jtargets["label"] == targets["label"]
        # and the misalignment target is the inverse of the jitter drawn from the sample's own stream
        _, drawn = MisalignJitter("strong").with_homography(jittered.load_pair(index)[1]["aligned"],
                                                            misalign_rng(jittered.seed, 3, index))
        np.testing.assert_allclose(jtargets["misalignment"].numpy(), np.linalg.inv(drawn), rtol=1e-5, atol=1e-5)
        changed += not torch.equal(moved, image)
    assert changed == len(plain)
    batch = torch.utils.data.default_collate([jittered[0], jittered[1]])
    assert batch[1]["aligned"].shape == batch[0].shape


def test_the_inverse_of_the_drawn_homography_rectifies_the_jittered_image():
    """Warping the jittered image by inv(J) (the ``misalignment`` target) gives the aligned image back inside."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 2.0)
    jittered, drawn = MisalignJitter("strong").with_homography(image, np.random.default_rng(5))
    target = torch.tensor(np.linalg.inv(drawn), dtype=torch.float32).expand(1, 1, 3, 3)
    undone = warp_cells(to_tensor(jittered)[None], target, 1)[0]
    inside = (slice(None), slice(30, 82), slice(30, 82))
    before, after = (to_tensor(jittered) - to_tensor(image)).abs()[inside].mean(), (undone - to_tensor(image)).abs()[inside].mean()
    assert before > 0.05 and after < 0.2 * before


def test_misalign_share_and_epochs():
    """About ``misalign_share`` of the samples are jittered, and the jitter is redrawn every epoch."""
    ds = SyntheticFaces(2, 10, image_size=(32, 32), augment={"misalign": "medium", "misalign_share": 0.5})
    pairs = [ds.load_pair(i) for i in range(len(ds))]
    untouched = [np.array_equal(moved, extras["aligned"]) for moved, extras in pairs]
    assert all(np.array_equal(extras["misalignment"], np.eye(3)) == same for (_, extras), same in zip(pairs, untouched))
    assert 0 < sum(untouched) < len(ds)
    ds.set_epoch(1)
    assert any(not np.array_equal(ds.load_uint8(i), moved) for i, (moved, _) in enumerate(pairs))
    assert all(np.array_equal(ds.load_pair(i)[1]["aligned"], extras["aligned"]) for i, (_, extras) in enumerate(pairs))


# ------------------------------------------------------------------------------------------ box crops


def test_box_crop_is_the_square_around_the_box_centre():
    """A 40x40 white square on black: its box cut at scale 1 is all white, at scale 2 white in the middle half."""
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    image[30:70, 50:90] = 255
    box = (49.5, 29.5, 89.5, 69.5, 0.99)  # pixel edges of the square; a trailing detector score is ignored
    inner = box_crop(image, box, size=(20, 20))
    assert inner.shape == (20, 20, 3) and inner.dtype == np.uint8 and inner.min() == 255
    wide = box_crop(image, box, size=(40, 40), scale=2.0)
    assert wide[11:29, 11:29].min() == 255 and wide[:9].max() == 0 and wide[:, 31:].max() == 0
    # a tall box: the side follows the longer side, centred, black beyond the image
    edge = box_crop(image, (-20, 10, 20, 90), size=(16, 16))
    assert edge[:, :4].max() == 0
    with pytest.raises(ValueError, match="square"):
        box_crop(image, box, size=(112, 96))
    with pytest.raises(ValueError, match="scale"):
        box_crop(image, box, scale=0.0)
