"""Pluggable stages of the face pipeline, and the names of the per-face outputs they add.

``FaceAnalyzer`` runs: detect -> ``landmarks`` stages -> align -> ``rectify`` stages -> embed ->
``attributes`` stages. A stage is any object with

* ``name``: a short identifier (logs, errors);
* ``phase``: one of :data:`PHASES`;
* ``outputs``: the names of the per-face extras it adds;
* ``run(...)``, whose arguments depend on the phase:

  - ``landmarks``: ``run(image, boxes) -> {name: (N, ...) array}`` for one HxWx3 uint8 RGB photo and
    its (N, 4) face boxes (largest face first); the landmarker contract of ``facesphere.align.landmarkers``;
  - ``rectify``: ``run(crops) -> crops`` or ``-> (crops, {name: (M, ...) values})`` (a stage with
    outputs), aligned (M, H, W, 3) uint8 RGB crops in, crops of the same shape out, just before the
    embedder sees them (e.g. GridFace's local homographies, arXiv 1808.06210 Sec. 3.2,
    ``facesphere.models.rectifier``). When faces are not embedded (``detect``) the rectify stages run only
    if one of them has outputs to report. ``FaceAnalyzer.embed_crops`` applies them too, so ``Face.crop``
    stays the aligned crop and ``embed_crops(face.crop)`` gives ``face.embedding``. A rectifier that
    declares ``input_spec`` (the crops it takes: size, colour order, mean/std, alignment) must take exactly
    what the embedder's card expects, and none may stand in front of an embedder whose card has a ``rectifier`` (it rectifies
    inside): the analyser refuses both at construction (:func:`check_rectify_stages`). A face the
    rectifier cannot rectify (degenerate homographies) keeps its aligned crop and is reported, never
    passed on as a garbage crop;
  - ``attributes``: ``run(crops, embeddings) -> {name: (M, ...) array}`` over every face of the batch,
    from the aligned crops and the unit embeddings (``None`` when the batch is not embedded).

  A model that cuts its own crop from the photo (an age estimator on box crops, a 3DMM regressor)
  belongs in ``landmarks``: that phase sees the photo, ``attributes`` only the recognition crops.

Per-face output names (first axis = faces in ``Detections.extras``; one face's value in ``Face.extras``;
serialised by name next to ``box``/``score``/``landmarks`` in ``Face.to_dict``, the CLI's JSON and the
REST answers): lower-case ``snake_case``, the quantity rather than the model, e.g.

* ``landmarks68``: (68, 2) iBUG/300W points, photo pixels (x, y);
* ``landmarks_dense``: (K, 2) or (K, 3) dense points, photo pixels (x, y[, depth]);
* ``pose``: (3,) yaw, pitch, roll in degrees;
* ``params_3dmm``: (P,) 3D morphable model coefficients, as the regressor's card documents them;
* ``rectification``: ``{"status": "ok" | "degenerate", "cells": k}``, what the rectifier did to the face:
  ``degenerate`` when k > 0 of its cells' homographies fold, flip, leave the camera's half-space or are not
  finite, in which case the embedder got the aligned crop instead (``facesphere.models.rectifier``);
* ``age``: () years; ``gender``: ``"male"`` or ``"female"`` (the gender/age estimator,
  ``facesphere.models.genderage``). The analyser itself adds ``age`` (None when unknown) and
  ``age_source`` to every face: the name of the stage that produced ``age``, else ``"norm"`` when the
  embedding model has an age branch, else None.

A stage made for one crop template declares it as ``alignment`` (a template name); the analyser refuses
it at construction when it aligns faces to another.

Values whose name starts with ``landmarks`` are rounded to 2 decimals (pixels), others to 4.
The names in :data:`RESERVED` are the face's own fields and cannot be used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from facesphere.detect.base import check_per_face
from facesphere.models.card import ModelCard, ModelCardMismatch

PHASES = ("landmarks", "rectify", "attributes")
"""Stage phases in the order they run (after detection, after alignment, after embedding)."""

RESERVED = frozenset({"box", "score", "landmarks", "embedding", "crop", "crop_shape", "matches", "source",
                      "age_source"})


@runtime_checkable
class Stage(Protocol):
    name: str
    phase: str
    outputs: tuple[str, ...]

    def run(self, *args: Any) -> Any: ...


def check_stages(stages: Sequence[Stage]) -> dict[str, list[Stage]]:
    """The stages grouped by phase (given order kept); refuses unknown phases and reused or reserved names."""
    by_phase: dict[str, list[Stage]] = {phase: [] for phase in PHASES}
    owner: dict[str, str] = {}
    for stage in stages:
        name = getattr(stage, "name", type(stage).__name__)
        if not isinstance(stage, Stage):
            raise TypeError(f"pipeline stage {name!r} lacks name, phase, outputs or run()")
        if stage.phase not in by_phase:
            raise ValueError(f"pipeline stage {name!r}: unknown phase {stage.phase!r}; use {', '.join(PHASES)}")
        for output in stage.outputs:
            if output in RESERVED:
                raise ValueError(f"pipeline stage {name!r}: output name {output!r} is reserved")
            if output in owner:
                raise ValueError(f"pipeline stages {owner[output]!r} and {name!r} both add {output!r}")
            owner[output] = name
        by_phase[stage.phase].append(stage)
    return by_phase


def stage_outputs(stage: Stage, produced: dict[str, Any], faces: int) -> dict[str, np.ndarray]:
    """``produced`` checked against what ``stage`` declared: exactly its outputs, one entry per face each."""
    if set(produced) != set(stage.outputs):
        raise ValueError(f"pipeline stage {stage.name!r} returned {sorted(produced)}, declared {sorted(stage.outputs)}")
    return {name: check_per_face(name, values, faces) for name, values in produced.items()}


def check_rectify_stages(stages: Sequence[Stage], card: ModelCard) -> None:
    """Refuse rectify ``stages`` in front of an embedder with ``card``: one whose ``input_spec`` differs from the
    card's (:class:`ModelCardMismatch` naming both), or any when the card has its own ``rectifier``."""
    for stage in stages:
        rectifier = getattr(stage, "card", None)
        what = f"rectifier {rectifier.name!r}" if isinstance(rectifier, ModelCard) else f"rectify stage {stage.name!r}"
        if card.rectifier is not None:
            raise ModelCardMismatch(f"{what} in front of {card.name!r}", [
                f"{card.name!r} rectifies inside ({card.rectifier.describe()}); it takes aligned crops, not a "
                f"second rectifier's output"])
        spec = getattr(stage, "input_spec", None)
        if spec is not None and card.mismatches(spec):
            raise ModelCardMismatch(f"{what} ({spec.describe()}) in front of {card.name!r} "
                                    f"({card.input_spec.describe()})", card.mismatches(spec))


def round_pixels(array) -> Any:
    """Pixel coordinates as JSON numbers, to 2 decimals (a hundredth of a pixel)."""
    return np.round(np.asarray(array, dtype=np.float64), 2).tolist()


def json_value(name: str, value: Any) -> Any:
    """One face's extra as JSON: arrays and numpy scalars as (nested) lists and numbers, rounded by name."""
    array = np.asarray(value)
    if array.dtype.kind in "biu":
        return array.tolist()
    if array.dtype.kind == "f":
        return round_pixels(array) if name.startswith("landmarks") else np.round(array.astype(np.float64), 4).tolist()
    return value


__all__ = ["PHASES", "RESERVED", "Stage", "check_rectify_stages", "check_stages", "json_value", "round_pixels",
           "stage_outputs"]
