"""Decision thresholds calibrated from labelled pairs for a target false accept rate, bound to one model.

A cosine threshold only means something for the model (and preprocessing) that produced the
scores, so a :class:`Threshold` carries the model's name and embedding size and refuses to judge
scores of another model.
"""

from __future__ import annotations

import os

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from facesphere.utils.files import atomic_write_text, read_text_checked
from facesphere.utils.roc import decide, tar_at_far, threshold_at_far


class ThresholdMismatch(ValueError):
    """A threshold applied to scores of a different model than the one it was calibrated on."""


class Threshold(BaseModel):
    """Accept a pair when its cosine >= ``value``; measured FAR/TAR on the calibration pairs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float
    target_far: float = Field(gt=0, lt=1)
    model: str
    embedding_size: int
    calibration_pairs: dict[str, int] = Field(description="genuine and impostor pair counts")
    measured_far: float
    measured_tar: float | None = None
    weights_sha256: str | None = Field(None, description="the model card's weights hash, when it had one")

    def check_model(self, model: str, embedding_size: int, weights_sha256: str | None = None) -> None:
        """Refuse scores of another model: name and size differ, or both sides know the weights and they differ."""
        other_weights = None not in (weights_sha256, self.weights_sha256) and weights_sha256 != self.weights_sha256
        if (model, embedding_size) != (self.model, self.embedding_size) or other_weights:
            raise ThresholdMismatch(f"threshold calibrated for {self.model!r} ({self.embedding_size}-d) cannot judge "
                                    f"scores of {model!r} ({embedding_size}-d"
                                    f"{', other weights' if other_weights else ''}); calibrate it for this model")

    def decide(self, scores):
        """Same person iff cosine >= ``value`` (:func:`facesphere.utils.roc.decide`)."""
        return decide(scores, self.value)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Threshold:
        try:
            text = read_text_checked(path)
        except OSError as error:
            raise ValueError(f"{path}: cannot read the threshold file ({error.strerror or error})") from None
        try:
            return cls.model_validate_json(text)
        except ValueError as error:
            raise ValueError(f"{path}: not a facesphere threshold file ({error})") from None


def calibrate_threshold(scores, same, target_far: float, model: str, embedding_size: int,
                        weights_sha256: str | None = None) -> Threshold:
    """The lowest threshold whose FAR on these pairs is <= ``target_far`` (needs >= 1/target_far impostors)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    value = threshold_at_far(scores, same, target_far)
    impostors = int((~same).sum())
    if value is None:
        raise ValueError(f"FAR {target_far:g} cannot be measured with {impostors} impostor pairs "
                         f"(need at least {int(np.ceil(1 / target_far))})")
    far = float((scores[~same] >= value).mean())
    tar = tar_at_far(scores, same, [target_far]).get(float(target_far))
    return Threshold(value=float(value), target_far=target_far, model=model, embedding_size=embedding_size,
                     weights_sha256=weights_sha256,
                     calibration_pairs={"genuine": int(same.sum()), "impostor": impostors}, measured_far=far,
                     measured_tar=None if tar is None else float(tar))


__all__ = ["Threshold", "ThresholdMismatch", "calibrate_threshold", "decide"]
