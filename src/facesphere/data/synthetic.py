"""A labelled data set of procedural faces that needs no download, and a contact sheet to eyeball it.

Identities and per-sample conditions come from :mod:`facesphere.data.face_traits`, images from
:mod:`facesphere.data.face_render`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from facesphere.data.face_render import render_face
from facesphere.data.face_traits import age_face, ageing_traits, face_identity, face_variation, sample_age
from facesphere.data.images import to_tensor
from facesphere.data.transforms import SampleAugment, SharedEpoch
from facesphere.data.targets import MASK_SUFFIX

EXTRA_TARGETS = ("pose", "age")
"""Targets a ``SyntheticFaces`` can carry besides the label."""
DEFAULT_AGE_RANGE = (10.0, 70.0)
"""Ages (years) of a set that asks for the age target without giving ``age_range``."""
_TARGET_STREAM = 0x7A


class SyntheticFaces(Dataset):
    """A labelled data set of procedural faces, rendered lazily and deterministically.

    Index ``i`` is sample ``i % samples_per_identity`` of identity ``i // samples_per_identity``; the
    label is that identity's index within this data set, while its appearance comes from the global
    identity ``identity_offset + label``. Held-out identities therefore come from a disjoint
    ``identity_offset`` range with the same ``seed``. ``augment`` (an ``AugmentConfig``, dict or
    ``(image, rng)`` callable) adds epoch-dependent augmentation on top of the fixed per-sample variation.
    ``targets`` adds targets besides the label (``EXTRA_TARGETS``: ``pose``, ``age``), carried by a share
    ``target_share`` of the samples and masked out on the rest (placeholder zeros, NaN for the age).

    Ages: with ``age_range`` (years; default :data:`DEFAULT_AGE_RANGE` when ``age`` is a target) every
    sample is rendered at its own age (:func:`~facesphere.data.face_traits.age_face`, monotone in the
    age), drawn uniformly in a window of ``age_span`` years that each identity places inside the range
    (``None``: the whole range). Without ``age_range`` and the age target, faces are rendered exactly as
    before ages existed. Masked samples are rendered at their age all the same; only the target is hidden.
    """

    def __init__(
        self,
        num_identities: int,
        samples_per_identity: int,
        image_size: tuple[int, int] = (112, 112),
        seed: int = 0,
        identity_offset: int = 0,
        augment: Any = None,
        difficulty: float = 1.0,
        targets: tuple[str, ...] | list[str] = (),
        target_share: float = 1.0,
        age_range: tuple[float, float] | None = None,
        age_span: float | None = None,
    ) -> None:
        if num_identities < 1 or samples_per_identity < 1:
            raise ValueError("num_identities and samples_per_identity must be >= 1")
        if identity_offset < 0 or seed < 0:
            raise ValueError("seed and identity_offset must be >= 0")
        if difficulty < 0:
            raise ValueError(f"difficulty must be >= 0, got {difficulty}")
        unknown = sorted(set(targets) - set(EXTRA_TARGETS))
        if unknown:
            raise ValueError(f"SyntheticFaces has no targets {unknown}; it offers {', '.join(EXTRA_TARGETS)}")
        flip = augment.get("flip", 0) if isinstance(augment, dict) else getattr(augment, "flip", 0)
        if "pose" in targets and flip > 0:
            raise ValueError("the pose target needs augment.flip = 0: a mirrored face has the opposite yaw and roll")
        if not 0 <= target_share <= 1:
            raise ValueError(f"target_share must be in [0, 1], got {target_share}")
        if age_range is None and "age" in targets:
            age_range = DEFAULT_AGE_RANGE
        if age_range is not None:
            low, high = float(age_range[0]), float(age_range[1])
            if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high <= 150):
                raise ValueError(f"age_range must satisfy 0 <= min <= max <= 150 years, got {age_range}")
            age_range = (low, high)
        if age_span is not None and not (math.isfinite(age_span) and age_span >= 0):
            raise ValueError(f"age_span must be a finite number of years >= 0, got {age_span}")
        height, width = int(image_size[0]), int(image_size[1])
        if height < 16 or width < 16:
            raise ValueError(f"image_size must be at least 16x16, got {image_size}")
        self.num_identities = int(num_identities)
        self.samples_per_identity = int(samples_per_identity)
        self.image_size = (height, width)
        self.seed = int(seed)
        self.identity_offset = int(identity_offset)
        self.difficulty = float(difficulty)
        self.augment = augment
        self._augment = SampleAugment(augment)
        self._epoch = SharedEpoch(0)
        self.num_classes = self.num_identities
        self.labels = np.repeat(np.arange(self.num_identities, dtype=np.int64), self.samples_per_identity)
        self.identities = list(range(self.identity_offset, self.identity_offset + self.num_identities))
        self.targets = tuple(targets)
        self.target_names = ("label", *self.targets, *self._augment.target_names)
        self.target_share = float(target_share)
        self.age_range = age_range
        self.age_span = None if age_span is None else float(age_span)

    def __len__(self) -> int:
        return self.num_identities * self.samples_per_identity

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``; visible to persistent DataLoader workers too."""
        self._epoch.set(epoch)

    def render(self, identity: int, sample: int) -> np.ndarray:
        """The un-augmented HxWx3 uint8 RGB image of ``sample`` of local ``identity``."""
        if not 0 <= identity < self.num_identities:
            raise IndexError(f"identity {identity} out of range [0, {self.num_identities})")
        gid = self.identity_offset + identity
        face = face_identity(self.seed, gid)
        if self.age_range is not None:
            face = age_face(face, ageing_traits(self.seed, gid), self._age(identity, sample))
        variation = face_variation(self.seed, gid, sample, self.difficulty)
        return render_face(face, variation, self.image_size)

    def load_uint8(self, index: int) -> np.ndarray:
        """Sample ``index`` as HxWx3 uint8 RGB, augmented for the current epoch (what ``__getitem__`` normalises)."""
        return self.load_pair(index)[0]

    def load_pair(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(input, extras) of sample ``index``: the augmented uint8 RGB image and, with ``augment.misalign``, the
        targets ``aligned`` (the image before the misalignment) and ``misalignment`` (``SampleAugment``); else ``{}``."""
        index = self._check_index(index)
        identity, sample = divmod(index, self.samples_per_identity)
        return self._augment(self.render(identity, sample), self.seed, self.epoch, index)

    def pose(self, index: int) -> np.ndarray:
        """The rendered pose of sample ``index``, each component scaled to [-1, 1] at difficulty 1:
        (roll / 25°, yaw / 0.5 rad, pitch / 0.08 face units), float32."""
        identity, sample = divmod(self._check_index(index), self.samples_per_identity)
        var = face_variation(self.seed, self.identity_offset + identity, sample, self.difficulty)
        return np.array([var.roll / 25.0, var.yaw / 0.5, var.pitch / 0.08], dtype=np.float32)

    def age(self, index: int) -> float:
        """The age (years) sample ``index`` is rendered at, whether or not its age target is masked."""
        identity, sample = divmod(self._check_index(index), self.samples_per_identity)
        if self.age_range is None:
            raise ValueError("this SyntheticFaces renders no ages: give age_range or the age target")
        return self._age(identity, sample)

    def _age(self, identity: int, sample: int) -> float:
        return sample_age(self.seed, self.identity_offset + identity, sample, self.age_range, self.age_span)

    @property
    def ages(self) -> np.ndarray:
        """Every sample's age target, float64 (N,), NaN where masked (the data-set contract); the rendered
        ages of all samples are ``age(i)``. Only for sets with the age target; no image is rendered."""
        if "age" not in self.targets:
            raise AttributeError("this SyntheticFaces has no age target")
        return np.array([self.age(i) if self.has_targets(i) else math.nan for i in range(len(self))])

    def has_targets(self, index: int) -> bool:
        """Whether sample ``index`` carries the extra targets: a pure function of (seed, index)."""
        if self.target_share >= 1:
            return True
        return bool(np.random.default_rng([_TARGET_STREAM, self.seed, int(index)]).random() < self.target_share)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(image, targets): ``{"label": int}``, plus each extra target and its ``<name>_mask``, plus ``aligned``
        (a tensor like the image) with ``augment.misalign``."""
        index = self._check_index(index)
        targets: dict[str, Any] = {"label": int(self.labels[index])}
        if self.targets:
            known = self.has_targets(index)
            for name in self.targets:
                value = getattr(self, name)(index)
                targets[name] = value if known else _placeholder(value)
                targets[name + MASK_SUFFIX] = known
        image, extras = self.load_pair(index)
        targets.update(self._augment.tensors(extras))
        return to_tensor(image), targets

    def _check_index(self, index: int) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        return index

    def __repr__(self) -> str:
        return (
            f"SyntheticFaces(num_identities={self.num_identities}, samples_per_identity={self.samples_per_identity}, "
            f"image_size={self.image_size}, seed={self.seed}, identity_offset={self.identity_offset}, "
            f"difficulty={self.difficulty}, targets={self.targets}, target_share={self.target_share}, "
            f"age_range={self.age_range}, age_span={self.age_span})"
        )


def _placeholder(value: Any) -> Any:
    """The value a masked target carries: NaN for a scalar (the age), zeros of the right shape otherwise."""
    return math.nan if isinstance(value, float) else np.zeros_like(value)


def contact_sheet(dataset: SyntheticFaces, identities: int = 6, samples: int = 6, gap: int = 2) -> np.ndarray:
    """A grid image, one row per identity and one column per sample, for eyeballing the generator."""
    height, width = dataset.image_size
    rows = min(identities, dataset.num_identities)
    cols = min(samples, dataset.samples_per_identity)
    sheet = np.full((rows * (height + gap) + gap, cols * (width + gap) + gap, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = gap + r * (height + gap), gap + c * (width + gap)
            sheet[y : y + height, x : x + width] = dataset.load_uint8(r * dataset.samples_per_identity + c)
    return sheet
