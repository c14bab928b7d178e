"""The face pipeline as one object: detect → (landmarks) → align → (rectify) → embed → (attributes) → compare.

``FaceAnalyzer.analyze(images)`` takes a batch of photos (arrays or paths) and returns, per image,
every face with its box, score, 5 landmarks, aligned crop, unit-length embedding and the named
extras its pipeline stages add (``facesphere.pipeline.stages``: 68 landmarks, pose, age, ...).
Detection runs once per batch, embedding once over all the batch's faces. The crop is cut on the template the embedding model's card names, at the card's input size, so a model never
sees faces aligned for another model; a photo that cannot be read becomes an error entry of its own
and the rest of the batch is still analysed.

Every face also gets ``age`` (years, or None when unknown) and ``age_source``: the name of the stage that
estimated it (a dedicated estimator such as ``genderage_insightface`` wins), else ``"norm"`` when the
embedding model's card has an ``age_branch`` (OE-CNN, arXiv 1810.07599: age from the raw embedding's
norm, read in the same forward pass), else None; the JSON says ``null`` rather than guess.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facesphere.align.similarity import align_faces
from facesphere.align.templates import get_template
from facesphere.data.images import ImageError, load_image
from facesphere.detect.base import image_problem
from facesphere.models.card import ModelCard, ModelCardMismatch
from facesphere.pipeline.stages import (
    Stage,
    check_rectify_stages,
    check_stages,
    json_value,
    round_pixels,
    stage_outputs,
)
from facesphere.pipeline.threshold import Threshold, decide

logger = logging.getLogger(__name__)


class Embedder(Protocol):
    card: ModelCard

    def embed_with_norms(self, images: np.ndarray, flip: bool = False) -> tuple[np.ndarray, np.ndarray]: ...


class NoFaceFound(ValueError):
    """A photo without the face asked for (none at all, or fewer than the index asked)."""


@dataclass
class Face:
    """One detected face. Coordinates are (x, y) pixels of the original photo.

    ``extras``: named per-face outputs of the detector and the pipeline stages (names and units in
    ``facesphere.pipeline.stages``), serialised by name next to the fixed fields.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    crop: np.ndarray
    embedding: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def landmarks68(self) -> np.ndarray | None:
        """The 68 iBUG points when a 68-point landmarker ran, else None."""
        return self.extras.get("landmarks68")

    def to_dict(self, crop: bool = False, embedding: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"box": round_pixels(self.box), "score": round(float(self.score), 5),
                               "landmarks": round_pixels(self.landmarks)}
        out.update({name: json_value(name, value) for name, value in self.extras.items()})
        if embedding and self.embedding is not None:
            out["embedding"] = [round(float(v), 7) for v in self.embedding]
        if crop:
            out["crop_shape"] = list(self.crop.shape)
        return out


@dataclass
class ImageResult:
    """The faces of one input (largest first), or the error that stopped it."""

    source: str
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    size: tuple[int, int] | None = None

    def to_dict(self, **face_options) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["size"] = list(self.size) if self.size else None
            out["faces"] = [f.to_dict(**face_options) for f in self.faces]
        return out


@dataclass(frozen=True)
class Comparison:
    cosine: float
    same: bool | None
    threshold: float | None


class FaceAnalyzer:
    """Detector + embedder + pluggable stages, enforcing the embedder's model card.

    Args:
        detector: any ``facesphere.detect`` detector (batch of RGB uint8 photos → boxes, scores, 5 points).
        embedder: a PyTorch or ONNX Runtime embedder with a ``card`` and ``embed(crops, flip)``.
        landmarker: optional landmarker (``facesphere.align.landmarkers``), run as the first stage.
        stages: further pipeline stages (``facesphere.pipeline.stages``), run in phase order, given order
            within a phase.
        flip: flip-sum test-time augmentation of the embeddings.
        threshold: a calibrated :class:`Threshold` for :meth:`compare` decisions.
    """

    def __init__(self, detector, embedder: Embedder | None = None, landmarker: Stage | None = None,
                 flip: bool = True, threshold: Threshold | None = None, score_threshold: float | None = None,
                 min_face_size: float | None = None, max_faces: int | None = None, alignment: str | None = None,
                 stages: Sequence[Stage] = ()) -> None:
        self.detector = detector
        self.embedder = embedder
        self.stages = [*([landmarker] if landmarker is not None else []), *stages]
        self._phases = check_stages(self.stages)
        self._age_stage = next((stage.name for stage in self.stages if "age" in stage.outputs), None)
        self.flip = bool(flip)
        self.score_threshold = score_threshold
        self.min_face_size = min_face_size
        self.max_faces = max_faces
        if embedder is not None:
            card = embedder.card
            template = get_template(card.alignment)
            if alignment is not None and alignment != card.alignment:
                raise ModelCardMismatch(card.name, [f"model expects faces aligned to {card.alignment}, got {alignment}"])
            if tuple(template.size) != tuple(card.input_size):
                raise ModelCardMismatch(card.name, [f"template {template.name} makes {template.size} crops but the model "
                                                    f"expects {tuple(card.input_size)}"])
            check_rectify_stages(self._phases["rectify"], card)
            if threshold is not None:
                threshold.check_model(card.name, card.embedding_size, card.weights_sha256)
            self.alignment = card.alignment
        else:
            self.alignment = alignment or "arcface_112x112"
            get_template(self.alignment)
        for stage in self.stages:  # a stage made for one crop template (e.g. ArcFace 112x112) refuses the others
            wanted = getattr(stage, "alignment", None)
            if wanted is not None and wanted != self.alignment:
                raise ModelCardMismatch(stage.name, [f"expects faces aligned to {wanted}, but this analyser aligns "
                                                     f"them to {self.alignment}"])
        self.threshold = threshold

    # ------------------------------------------------------------------------------------------ analyse
    def analyze(self, images: Sequence[np.ndarray | str | os.PathLike], embed: bool = True) -> list[ImageResult]:
        """Faces of every input; unreadable inputs become results with ``error`` set."""
        results, arrays, keep = [], [], []
        for index, item in enumerate(images):
            source = str(item) if isinstance(item, (str, os.PathLike)) else f"<array {index}>"
            try:
                array = load_image(item) if isinstance(item, (str, os.PathLike)) else _check_array(item, source)
            except ImageError as error:
                results.append(ImageResult(source, error=str(error)))
                continue
            results.append(ImageResult(source, size=(int(array.shape[0]), int(array.shape[1]))))
            arrays.append(array)
            keep.append(len(results) - 1)
        detections = self.detector.detect(arrays, score_threshold=self.score_threshold, min_face_size=self.min_face_size,
                                          max_faces=self.max_faces) if arrays else []
        all_faces: list[Face] = []
        for array, slot, found in zip(arrays, keep, detections):
            faces = self._faces(array, found)
            results[slot].faces = faces
            all_faces.extend(faces)
        if not all_faces:
            return results
        crops = np.stack([f.crop for f in all_faces])
        embed = embed and self.embedder is not None
        rectified, produced = crops, {}
        if embed or any(stage.outputs for stage in self._phases["rectify"]):  # unembedded: only to report
            rectified, produced = self._rectify(crops)
        for i, face in enumerate(all_faces):
            face.extras.update({name: values[i] for name, values in produced.items()})
        embeddings = ages = None
        if embed:
            embeddings, ages = self._embed(rectified)
            for face, vector in zip(all_faces, embeddings):
                face.embedding = vector
        for stage in self._phases["attributes"]:
            produced = stage_outputs(stage, stage.run(crops, embeddings), len(all_faces))
            for i, face in enumerate(all_faces):
                face.extras.update({name: values[i] for name, values in produced.items()})
        for i, face in enumerate(all_faces):
            if self._age_stage is not None:
                face.extras.update(age=float(face.extras["age"]), age_source=self._age_stage)
            elif ages is not None:
                face.extras.update(age=float(ages[i]), age_source="norm")
            else:
                face.extras.update(age=None, age_source=None)
        return results

    @property
    def age_source(self) -> str | None:
        """What gives the faces their ``age``: the stage adding ``age`` (it takes precedence), ``"norm"`` when
        the embedding model's card has an age branch (faces analysed with ``embed=True``), or None."""
        if self._age_stage is not None:
            return self._age_stage
        return "norm" if self.embedder is not None and self.embedder.card.age_branch is not None else None

    def align_largest(self, image: np.ndarray) -> np.ndarray | None:
        """The aligned crop of the largest face in an RGB photo, or None when there is none (protocol aligners)."""
        faces = self.analyze([image], embed=False)[0].faces
        return faces[0].crop if faces else None

    def _faces(self, image: np.ndarray, found) -> list[Face]:
        """One photo's detections, largest first, through the landmarks stages and alignment."""
        if len(found.boxes) == 0:
            return []
        found = found.select(np.argsort(-(found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1])))
        for stage in self._phases["landmarks"]:
            found = found.with_extras(stage_outputs(stage, stage.run(image, found.boxes), len(found)))
        crops = align_faces(image, found.landmarks, self.alignment)
        return [Face(box=found.boxes[i], score=float(found.scores[i]), landmarks=found.landmarks[i], crop=crops[i],
                     extras={name: values[i] for name, values in found.extras.items()}) for i in range(len(found))]

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Unit-length embeddings of aligned RGB uint8 crops (N, H, W, 3) made on this analyser's template.

        The ``rectify`` stages transform the crops first, so this is the embedding ``analyze`` gives."""
        return self._embed(self._rectify(crops)[0])[0]

    def _rectify(self, crops: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Aligned crops through the ``rectify`` stages: (the crops the embedder gets, their per-face outputs)."""
        produced: dict[str, np.ndarray] = {}
        for stage in self._phases["rectify"]:
            answer = stage.run(crops)
            rectified, outputs = answer if isinstance(answer, tuple) else (answer, {})
            rectified = np.asarray(rectified)
            if rectified.shape != crops.shape or rectified.dtype != np.uint8:
                raise ValueError(f"rectify stage {stage.name!r} turned {crops.dtype} {crops.shape} crops into "
                                 f"{rectified.dtype} {rectified.shape}; it must keep uint8 crops of the same shape")
            produced.update(stage_outputs(stage, outputs, len(crops)))
            crops = rectified
        return crops, produced

    def _embed(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(unit embeddings, ages from the card's age branch or None) of crops ready for the embedder (rectified)."""
        if self.embedder is None:
            raise ValueError("this analyser has no embedding model")
        vectors, norms = self.embedder.embed_with_norms(crops, flip=self.flip)
        branch = self.embedder.card.age_branch
        return np.asarray(vectors, dtype=np.float32), None if branch is None else branch.predict(np.asarray(norms))

    # ------------------------------------------------------------------------------------------ compare
    def compare(self, a, b) -> Comparison:
        """Cosine of two faces (or embeddings) and the decision at the calibrated threshold, if any."""
        ea, eb = (_embedding_of(x) for x in (a, b))
        cosine = float(np.dot(ea, eb) / max(np.linalg.norm(ea) * np.linalg.norm(eb), 1e-12))
        if self.threshold is None:
            return Comparison(cosine, None, None)
        return Comparison(cosine, decide(cosine, self.threshold.value), self.threshold.value)


def pick_face(result: ImageResult, index: int = 0) -> Face:
    """Face ``index`` (0 = the largest) of an analysed photo; the photo's error, or :class:`NoFaceFound`."""
    if result.error:
        raise ValueError(result.error)
    if not result.faces:
        raise NoFaceFound(f"{result.source}: no face found")
    if index >= len(result.faces):
        raise NoFaceFound(f"{result.source}: face {index} asked for, {len(result.faces)} found")
    return result.faces[index]


def _embedding_of(item) -> np.ndarray:
    vector = item.embedding if isinstance(item, Face) else item
    if vector is None:
        raise ValueError("the face has no embedding (analyse with an embedding model)")
    return np.asarray(vector, dtype=np.float64).ravel()


def _check_array(image, source: str) -> np.ndarray:
    """``image`` as an HxWx3 uint8 array, or an :class:`ImageError` naming ``source`` (the item's batch index)."""
    try:
        array = np.asarray(image)
    except (ValueError, TypeError) as error:  # ragged nested lists, objects numpy cannot convert
        raise ImageError(source, f"not an array ({error})") from None
    problem = image_problem(array)
    if problem is not None:
        raise ImageError(source, problem)
    return array


def input_sources(paths: Sequence[str | os.PathLike], skipped: list | None = None) -> list[Path]:
    """Files given directly, and the image files inside given folders (sorted, recursive).

    What a folder listing left out (hidden entries, unsupported file types) is appended to ``skipped``
    (:class:`facesphere.data.folders.Skipped`, path and reason) when given, and summed up in one log line per folder.
    """
    from facesphere.data.folders import list_images, log_skipped

    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images, left_out = list_images(path)
            log_skipped(path, left_out)
            out.extend(images)
            if skipped is not None:
                skipped.extend(left_out)
        else:
            out.append(path)
    return out


__all__ = ["Comparison", "Face", "FaceAnalyzer", "ImageResult", "NoFaceFound", "input_sources", "pick_face"]
