"""Assemble a :class:`FaceAnalyzer` from names and paths, the way the CLI and the service do.

Everything that can be stored is named by a path: the detector's weights, the embedding model (a
model folder, an exported ``.onnx``, a training run folder or a checkpoint file, all read by
``facesphere.models.runs.load_embedder``), an optional landmarker's weights, an optional age/gender
estimator (InsightFace's gender/age model, ``facesphere.models.genderage``), an optional rectifier (a stored
GridFace / STN model's, ``facesphere.models.rectifier``) and a calibrated threshold.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from facesphere.models.card import ModelCard
from facesphere.pipeline.analyzer import FaceAnalyzer, input_sources
from facesphere.pipeline.stages import Stage
from facesphere.pipeline.threshold import Threshold

logger = logging.getLogger(__name__)

MODEL_FORMS = ("a model folder (card.json + model.safetensors), an exported .onnx, a training run folder "
               "(its newest checkpoint) or a checkpoint file")
"""What every ``--model`` / ``model`` path may be (``facesphere.models.runs.load_embedder``)."""


class AnalyzerSpec(BaseModel):
    """What a face analyser is made of, by name and path."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    detector: str = Field("retinaface", description="registered detector name (facesphere.detect.DETECTORS)")
    detector_weights: Path
    detector_options: dict[str, Any] = Field(default_factory=dict, description="further options of the detector's "
                                             "constructor, e.g. {'leaky': 0.1} for RetinaFace weights it does not know")
    model: Path | None = Field(None, description=f"embedding model: {MODEL_FORMS}")
    landmarker: str | None = Field(None, description="registered landmarker name (align.landmarkers.LANDMARKERS)")
    landmarker_weights: Path | None = None
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)
    min_face_size: float | None = Field(None, ge=0.0)
    max_faces: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads of every network (PyTorch: process-wide)")
    device: str = "cpu"
    flip: bool = True
    threshold: Path | None = Field(None, description="threshold file from `facesphere calibrate`")
    alignment: str | None = Field(None, description="crop template when there is no model (the card decides)")
    age_model: Path | None = Field(None, description="InsightFace gender/age model folder (model-symbol.json + "
                                   "model-0000.params, read in place): every face gets its age and gender, and this "
                                   "age takes precedence over the embedding model's age branch; needs arcface_112x112 "
                                   "crops. Its weights are InsightFace's, for non-commercial research only")
    rectifier: Path | None = Field(None, description="a gridface / stn model (model folder, run folder or "
                                   "checkpoint) whose rectifier warps every aligned crop before the embedder "
                                   "(facesphere.models.rectifier); its card's input must be the embedding model's, "
                                   "and that model must not have a rectifier of its own")


def _detector_options(constructor, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against what the detector's constructor (and :class:`Detector`'s) accepts."""
    from facesphere.detect.base import Detector

    accepted = {name for fn in (constructor, Detector.__init__)
                for name, p in inspect.signature(fn).parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in ("self", "weights_path")}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown detector option(s) {', '.join(unknown)}; this detector takes: "
                         f"{', '.join(sorted(accepted))}")
    return dict(options)


def _runtime_options(constructor, threads: int | None, device: str) -> dict:
    """``threads`` / ``device`` for a registered constructor that takes them."""
    parameters = inspect.signature(constructor).parameters
    return {key: value for key, value in (("threads", threads), ("device", device))
            if key in parameters and value is not None}


def build_analyzer(spec: AnalyzerSpec | None = None, stages: Sequence[Stage] = (), **fields) -> FaceAnalyzer:
    """A :class:`FaceAnalyzer` from a spec (or the spec's fields as keywords), with extra ``stages``."""
    import facesphere.align.landmarks68  # noqa: F401  (registers the built-in landmarkers)
    from facesphere.align.landmarkers import LANDMARKERS, build_landmarker
    from facesphere.detect import DETECTORS, build_detector
    from facesphere.models.genderage import load_genderage
    from facesphere.models.rectifier import load_rectifier
    from facesphere.models.runs import load_embedder

    spec = spec if spec is not None else AnalyzerSpec(**fields)
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    if spec.age_model is not None:  # the smallest file first: a wrong path is refused before the big loads
        stages = [*stages, load_genderage(spec.age_model, device=spec.device)]
    alignment = spec.alignment
    if spec.rectifier is not None:
        rectifier = load_rectifier(spec.rectifier, device=spec.device)
        stages = [rectifier, *stages]
        if spec.model is None and alignment is None:  # no embedder: the crops are cut for the rectifier
            alignment = rectifier.alignment
    constructor = DETECTORS.get(spec.detector)
    detector = build_detector(spec.detector, spec.detector_weights,
                              **_runtime_options(constructor, spec.threads, spec.device),
                              **_detector_options(constructor, spec.detector_options))
    embedder = load_embedder(spec.model, device=spec.device, threads=spec.threads) if spec.model else None
    landmarker = None
    if spec.landmarker or spec.landmarker_weights:
        if not (spec.landmarker and spec.landmarker_weights):
            raise ValueError("a landmarker needs both its name and its weights file")
        landmarker = build_landmarker(spec.landmarker, spec.landmarker_weights,
                                      **_runtime_options(LANDMARKERS.get(spec.landmarker), spec.threads, None))
    return FaceAnalyzer(detector, embedder, landmarker=landmarker, stages=stages, flip=spec.flip,
                        threshold=Threshold.load(spec.threshold) if spec.threshold else None,
                        score_threshold=spec.score_threshold, min_face_size=spec.min_face_size,
                        max_faces=spec.max_faces, alignment=alignment)


def rectifier_pictures_setup(spec: AnalyzerSpec):
    """(analyser, rectifier) for pictures of a rectification: the rectifier is ``spec.rectifier``'s, checked against
    ``spec.model``'s card as :class:`FaceAnalyzer` checks it, or else ``spec.model``'s own (a gridface / stn model);
    the analyser cuts the crops the rectifier takes and has no rectify stage (the pictures run it)."""
    from facesphere.models.rectifier import load_rectifier
    from facesphere.pipeline.stages import check_rectify_stages

    if spec.model is None:
        raise ValueError("pictures of a rectification need a model (a gridface / stn model, or an embedding model "
                         "and a rectifier)")
    if spec.rectifier is None:
        rectifier = load_rectifier(spec.model, device=spec.device)
        analyzer = build_analyzer(spec.model_copy(update={"model": None, "alignment": rectifier.alignment}))
        return analyzer, rectifier
    rectifier = load_rectifier(spec.rectifier, device=spec.device)
    analyzer = build_analyzer(spec.model_copy(update={"rectifier": None}))
    check_rectify_stages([rectifier], analyzer.embedder.card)
    return analyzer, rectifier


def open_set_threshold(card: ModelCard, threshold: str | os.PathLike | Threshold | None = None,
                       value: float | None = None) -> float | None:
    """The cosine threshold for open-set decisions: a calibrated file checked against ``card``, or a plain value."""
    if threshold is not None and value is not None:
        raise ValueError("give a calibrated threshold or a plain threshold value, not both")
    if threshold is None:
        return value
    calibrated = threshold if isinstance(threshold, Threshold) else Threshold.load(threshold)
    calibrated.check_model(card.name, card.embedding_size, card.weights_sha256)
    return calibrated.value


@dataclass
class PersonPhotos:
    """One person's photos through the pipeline: the largest face's embedding per usable photo."""

    name: str
    embeddings: list = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """``"<photo>: <why>"`` for each photo without a usable face and each file the folder listing skipped."""


class PeopleFolder:
    """A folder of one sub-folder of photos per person (sorted; the sub-folder's name is the identity)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.people = sorted(p for p in self.folder.iterdir() if p.is_dir()) if self.folder.is_dir() else []
        if not self.people:
            raise ValueError(f"{self.folder}: no sub-folders (expected one per person)")

    def __len__(self) -> int:
        return len(self.people)

    def embed(self, analyzer: FaceAnalyzer, batch: int = 16) -> Iterator[PersonPhotos]:
        """Per person, the largest face's embedding of each photo, ``batch`` photos per pass."""
        for person in self.people:
            found = PersonPhotos(person.name)
            left_out: list = []
            photos = input_sources([person], left_out)
            found.skipped.extend(f"{item.path}: skipped ({item.reason})" for item in left_out)
            for start in range(0, len(photos), batch):
                for result in analyzer.analyze(photos[start:start + batch]):
                    if result.error or not result.faces:
                        found.skipped.append(f"{result.source}: {result.error or 'no face found'}")
                        continue
                    found.embeddings.append(result.faces[0].embedding)
                    found.sources.append(result.source)
            yield found


__all__ = ["MODEL_FORMS", "AnalyzerSpec", "PeopleFolder", "PersonPhotos", "build_analyzer", "open_set_threshold",
           "rectifier_pictures_setup"]
