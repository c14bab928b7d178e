"""``facesphere detect | align | embed | verify | draw | rectify | calibrate``: the face pipeline on files and folders.

Inputs are image files or folders (searched recursively for images). Results are JSON (stdout, or
``--out``); an input that cannot be read gets an ``error`` entry and the others are still processed; a
folder entry that is not taken as an image (hidden, unsupported file type) gets a ``{"source", "skipped"}``
entry after the results, with the reason.
Weights are given by path: nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer

from facesphere.cli.errors import user_errors
from facesphere.utils.files import atomic_write_text, check_writable

logger = logging.getLogger("facesphere")

DETECTOR_HELP = "detector: retinaface (PyTorch), scrfd or yunet (ONNX Runtime)"
WEIGHTS_HELP = "detector weights file (.pth for retinaface, .onnx for scrfd/yunet)"
MODEL_HELP = ("embedding model: a model folder (card.json + model.safetensors), an exported .onnx, a training run "
              "folder (its newest checkpoint) or a checkpoint file")
LANDMARKS_HELP = "optional 68-point landmark model (PFLD .onnx); short for --landmarker pfld68 --landmarker-weights"

Inputs = typer.Argument(..., help="image files and/or folders")
DetectorOpt = typer.Option("retinaface", "--detector", help=DETECTOR_HELP)
WeightsOpt = typer.Option(..., "--detector-weights", help=WEIGHTS_HELP, exists=True, dir_okay=False)
DetectorOptionsOpt = typer.Option([], "--detector-option", help="KEY=VALUE option of the detector (repeatable), "
                                  "e.g. leaky=0.1 for RetinaFace weights it does not recognise")
ScoreOpt = typer.Option(None, "--score", min=0.0, max=1.0, help="detection score threshold (default: the detector's)")
MinFaceOpt = typer.Option(None, "--min-face", min=0.0, help="ignore faces whose box is smaller than this (pixels)")
MaxFacesOpt = typer.Option(None, "--max-faces", min=1, help="keep at most this many faces per image (largest score)")
OutOpt = typer.Option(None, "--out", dir_okay=False, help="write the JSON here (atomically) instead of stdout")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads for the networks")
Landmarks68Opt = typer.Option(None, "--landmarks68", help=LANDMARKS_HELP)
LandmarkerOpt = typer.Option(None, "--landmarker", help="registered landmarker run on every face (pfld68, ...); "
                             "its outputs appear under their names (landmarks68, pose, ...)")
LandmarkerWeightsOpt = typer.Option(None, "--landmarker-weights", exists=True, help="the landmarker's weights")
AgeModelOpt = typer.Option(None, "--age-model", help="InsightFace gender/age model folder (model-symbol.json + "
                           "model-0000.params): adds age and gender to every face (its age wins over the embedding "
                           "model's age branch); arcface_112x112 crops only; InsightFace's terms: non-commercial "
                           "research")
RectifierOpt = typer.Option(None, "--rectifier", help="a gridface / stn model (model folder, run folder or "
                            "checkpoint) whose rectifier warps each aligned crop before the embedder; every face gets "
                            "`rectification` (ok, or degenerate: the aligned crop was kept)")
IndexOpt = typer.Option("auto", "--index", help="search index kind: auto, flat, hnsw or ivfpq (gallery.INDEX_KINDS)")
StorageOpt = typer.Option("fp32", "--storage", help="index storage: fp32, fp16 or int8")


def analyzer_from_flags(detector: str, weights: Path, model: Path | None = None, landmarks68: Path | None = None,
                        detector_options: list[str] = (), **options):
    """The library's analyser (``facesphere.pipeline.build_analyzer``) from the options every command shares."""
    from facesphere.pipeline import build_analyzer
    from facesphere.utils.overrides import parse_options

    if landmarks68 is not None:
        if options.get("landmarker") or options.get("landmarker_weights"):
            raise ValueError("give --landmarks68 or --landmarker/--landmarker-weights, not both")
        options.update(landmarker="pfld68", landmarker_weights=landmarks68)
    return build_analyzer(detector=detector, detector_weights=weights, model=model,
                          detector_options=parse_options(detector_options), **options)


def emit(payload: Any, out: Path | None) -> None:
    """JSON to ``out`` (atomically) or stdout (logs go to stderr, so stdout stays pure JSON)."""
    text = json.dumps(payload, indent=2)
    if out is None:
        typer.echo(text)
        return
    atomic_write_text(out, text + "\n")
    logger.info("wrote %s", out)


def _summary(results) -> None:
    faces = sum(len(r.faces) for r in results)
    errors = [r for r in results if r.error]
    logger.info("%d images, %d faces, %d unreadable", len(results), faces, len(errors))
    for r in errors:
        logger.warning("%s", r.error)


def _exit_unless_any_read(results) -> None:
    """Exit code 1 when no input could be read (the JSON still lists why); 0 when at least one was."""
    if results and all(r.error for r in results):
        logger.error("none of the %d inputs could be read", len(results))
        raise typer.Exit(code=1)


def _sources(inputs: list[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """The image files of ``inputs`` and a JSON entry per folder entry left out (with the reason)."""
    from facesphere.pipeline import input_sources

    skipped: list = []
    sources = input_sources(inputs, skipped)
    if not sources:
        why = f" ({len(skipped)} entries skipped: {skipped[0].path}: {skipped[0].reason}, ...)" if skipped else ""
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}{why}")
    return sources, [item.to_dict() for item in skipped]


def detect(inputs: list[Path] = Inputs, detector: str = DetectorOpt, detector_weights: Path = WeightsOpt,
           detector_option: list[str] = DetectorOptionsOpt,
           landmarks68: Optional[Path] = Landmarks68Opt, landmarker: Optional[str] = LandmarkerOpt,
           landmarker_weights: Optional[Path] = LandmarkerWeightsOpt, score: Optional[float] = ScoreOpt,
           min_face: Optional[float] = MinFaceOpt, max_faces: Optional[int] = MaxFacesOpt,
           age_model: Optional[Path] = AgeModelOpt, rectifier: Optional[Path] = RectifierOpt,
           threads: Optional[int] = ThreadsOpt, out: Optional[Path] = OutOpt) -> None:
    """Faces in each image: box, score, 5 landmarks (and the landmarker's outputs, e.g. landmarks68; with
    --age-model, age and gender; with --rectifier, rectification), as JSON."""
    with user_errors():
        if out is not None:
            check_writable(out)
        analyzer = analyzer_from_flags(detector, detector_weights, None, landmarks68,
                                       detector_options=detector_option, landmarker=landmarker,
                                       landmarker_weights=landmarker_weights, score_threshold=score,
                                       min_face_size=min_face, max_faces=max_faces, threads=threads,
                                       age_model=age_model, rectifier=rectifier)
        sources, skipped = _sources(inputs)
        results = analyzer.analyze(sources, embed=False)
        _summary(results)
        emit([r.to_dict() for r in results] + skipped, out)
    _exit_unless_any_read(results)


def align(inputs: list[Path] = Inputs, out_dir: Path = typer.Option(..., "--out-dir", help="folder for the crops"),
          detector: str = DetectorOpt, detector_weights: Path = WeightsOpt,
          detector_option: list[str] = DetectorOptionsOpt,
          alignment: str = typer.Option("arcface_112x112", "--alignment", help="template: arcface_112x112 or "
                                        "sphereface_112x96 (ignored with --model: the model's card decides)"),
          model: Optional[Path] = typer.Option(None, "--model", help=f"align for this model's card; {MODEL_HELP}"),
          score: Optional[float] = ScoreOpt, min_face: Optional[float] = MinFaceOpt,
          max_faces: Optional[int] = MaxFacesOpt, threads: Optional[int] = ThreadsOpt,
          out: Optional[Path] = OutOpt) -> None:
    """Aligned face crops as PNG files (<image stem>_face<k>.png) and a JSON index."""
    from facesphere.pipeline.drawing import write_png

    with user_errors():
        if out is not None:
            check_writable(out)
        analyzer = analyzer_from_flags(detector, detector_weights, model,
                                       detector_options=detector_option, score_threshold=score, min_face_size=min_face,
                                       max_faces=max_faces, threads=threads, alignment=None if model else alignment)
        sources, skipped = _sources(inputs)
        results = analyzer.analyze(sources, embed=False)
        payload = []
        for index, result in enumerate(results):
            entry = result.to_dict()
            for k, face in enumerate(result.faces):
                path = out_dir / f"{index:05d}_{Path(result.source).stem}_face{k}.png"
                write_png(path, face.crop)
                entry["faces"][k]["crop"] = str(path)
            payload.append(entry)
        _summary(results)
        logger.info("crops (%s) written to %s", analyzer.alignment, out_dir)
        emit(payload + skipped, out)
    _exit_unless_any_read(results)


def embed(inputs: list[Path] = Inputs, model: Path = typer.Option(..., "--model", help=MODEL_HELP),
          detector: str = DetectorOpt, detector_weights: Path = WeightsOpt,
          detector_option: list[str] = DetectorOptionsOpt,
          flip: bool = typer.Option(True, "--flip/--no-flip", help="flip-sum test-time augmentation"),
          score: Optional[float] = ScoreOpt, min_face: Optional[float] = MinFaceOpt,
          max_faces: Optional[int] = MaxFacesOpt, age_model: Optional[Path] = AgeModelOpt,
          rectifier: Optional[Path] = RectifierOpt, threads: Optional[int] = ThreadsOpt,
          out: Optional[Path] = OutOpt) -> None:
    """Unit-length embeddings of every face, with boxes, landmarks and age (null when neither the model's age
    branch nor --age-model gives one; with --rectifier, rectification), as JSON."""
    with user_errors():
        if out is not None:
            check_writable(out)
        analyzer = analyzer_from_flags(detector, detector_weights, model,
                                       detector_options=detector_option, score_threshold=score, min_face_size=min_face,
                                       max_faces=max_faces, threads=threads, flip=flip, age_model=age_model,
                                       rectifier=rectifier)
        sources, skipped = _sources(inputs)
        results = analyzer.analyze(sources)
        _summary(results)
        card = analyzer.embedder.card
        emit({"model": card.name, "embedding_size": card.embedding_size, "alignment": card.alignment, "flip": flip,
              "age_source": analyzer.age_source, "images": [r.to_dict() for r in results] + skipped}, out)
    _exit_unless_any_read(results)


def verify(image1: Path = typer.Argument(..., help="first photo"), image2: Path = typer.Argument(..., help="second photo"),
           model: Path = typer.Option(..., "--model", help=MODEL_HELP), detector: str = DetectorOpt,
           detector_weights: Path = WeightsOpt,
           detector_option: list[str] = DetectorOptionsOpt,
           threshold: Optional[Path] = typer.Option(None, "--threshold", help="threshold file from `facesphere calibrate`"),
           flip: bool = typer.Option(True, "--flip/--no-flip"), threads: Optional[int] = ThreadsOpt,
           out: Optional[Path] = OutOpt) -> None:
    """Are the largest faces of two photos the same person? Cosine, and the decision at a calibrated threshold."""
    from facesphere.pipeline import pick_face

    with user_errors():
        if out is not None:
            check_writable(out)
        analyzer = analyzer_from_flags(detector, detector_weights, model,
                                       detector_options=detector_option, threads=threads, flip=flip,
                                       threshold=threshold)
        first, second = (pick_face(result) for result in analyzer.analyze([image1, image2]))
        comparison = analyzer.compare(first, second)
        emit({"image1": str(image1), "image2": str(image2), "model": analyzer.embedder.card.name,
              "cosine": round(comparison.cosine, 6), "threshold": comparison.threshold, "same": comparison.same,
              "faces": [first.to_dict(embedding=False), second.to_dict(embedding=False)]}, out)


def draw(inputs: list[Path] = Inputs, out_dir: Path = typer.Option(..., "--out-dir", help="folder for the PNGs"),
         detector: str = DetectorOpt, detector_weights: Path = WeightsOpt,
         detector_option: list[str] = DetectorOptionsOpt,
         landmarks68: Optional[Path] = Landmarks68Opt, landmarker: Optional[str] = LandmarkerOpt,
         landmarker_weights: Optional[Path] = LandmarkerWeightsOpt, score: Optional[float] = ScoreOpt,
         min_face: Optional[float] = MinFaceOpt, max_faces: Optional[int] = MaxFacesOpt,
         threads: Optional[int] = ThreadsOpt) -> None:
    """Each photo as a PNG with boxes, scores and landmarks drawn on it."""
    from facesphere.data.images import ImageError, load_image
    from facesphere.pipeline import ImageResult
    from facesphere.pipeline.drawing import draw_faces, write_png

    with user_errors():
        analyzer = analyzer_from_flags(detector, detector_weights, None, landmarks68,
                                       detector_options=detector_option, landmarker=landmarker,
                                       landmarker_weights=landmarker_weights, score_threshold=score,
                                       min_face_size=min_face, max_faces=max_faces, threads=threads)
        results = []
        for index, source in enumerate(_sources(inputs)[0]):  # one photo at a time: each is decoded once
            try:
                image = load_image(source)
            except ImageError as error:
                results.append(ImageResult(str(source), error=str(error)))
                continue
            result = analyzer.analyze([image], embed=False)[0]
            results.append(result)
            write_png(out_dir / f"{index:05d}_{source.stem}.png", draw_faces(image, result.faces))
        _summary(results)
        logger.info("drawings written to %s", out_dir)
    _exit_unless_any_read(results)


def rectify(inputs: list[Path] = Inputs,
            model: Path = typer.Option(..., "--model", help="a gridface / stn model (its rectifier is drawn), or, with "
                                       f"--rectifier, the embedding model the rectifier serves; {MODEL_HELP}"),
            out_dir: Path = typer.Option(..., "--out", help="folder for the PNGs"),
            rectifier: Optional[Path] = typer.Option(None, "--rectifier", help="a gridface / stn model whose "
                                                     "rectifier is put in front of --model"),
            detector: str = DetectorOpt, detector_weights: Path = WeightsOpt,
            detector_option: list[str] = DetectorOptionsOpt, score: Optional[float] = ScoreOpt,
            min_face: Optional[float] = MinFaceOpt, max_faces: Optional[int] = MaxFacesOpt,
            threads: Optional[int] = ThreadsOpt) -> None:
    """Pictures of the rectification, one PNG per face: the aligned crop with the grid of cells drawn where each
    samples from | the rectified crop; a JSON summary on stdout (rectification and picture per face)."""
    from facesphere.pipeline import AnalyzerSpec
    from facesphere.pipeline.build import rectifier_pictures_setup
    from facesphere.pipeline.drawing import write_rectification_pictures
    from facesphere.utils.overrides import parse_options

    with user_errors():
        check_writable(out_dir, folder=True)
        spec = AnalyzerSpec(detector=detector, detector_weights=detector_weights,
                            detector_options=parse_options(detector_option), model=model, rectifier=rectifier,
                            score_threshold=score, min_face_size=min_face, max_faces=max_faces, threads=threads)
        analyzer, stage = rectifier_pictures_setup(spec)
        sources, skipped = _sources(inputs)
        results, payload = write_rectification_pictures(analyzer, stage, sources, out_dir)
        _summary(results)
        logger.info("pictures of the %s written to %s", stage.describe(), out_dir)
        emit(payload + skipped, None)
    _exit_unless_any_read(results)


def calibrate(pairs: Path = typer.Argument(..., help="CSV of path1,path2,same (1/0) lines, paths relative to it"),
              model: Path = typer.Option(..., "--model", help=MODEL_HELP), out: Path = typer.Option(..., "--out"),
              far: float = typer.Option(1e-3, "--far", help="target false accept rate"),
              aligned: bool = typer.Option(False, "--aligned", help="the photos are aligned crops at the model's "
                                           "input size (e.g. LFW 112x112): embed them directly, no detector"),
              detector: str = DetectorOpt,
              detector_weights: Optional[Path] = typer.Option(None, "--detector-weights", exists=True, dir_okay=False,
                                                              help=f"{WEIGHTS_HELP} (required without --aligned)"),
              detector_option: list[str] = DetectorOptionsOpt,
              flip: bool = typer.Option(True, "--flip/--no-flip"), threads: Optional[int] = ThreadsOpt) -> None:
    """A decision threshold for --far from labelled pairs of photos, through the whole pipeline (or, with
    --aligned, from pairs of aligned crops embedded directly)."""
    import numpy as np

    from facesphere.evaluate.pairsets import read_pairs_csv
    from facesphere.pipeline import calibrate_threshold

    with user_errors():
        if out is not None:
            check_writable(out)
        if aligned:
            from facesphere.cleaning.calibration import calibrate_aligned

            threshold = calibrate_aligned(pairs, model, far, flip=flip, threads=threads)
            threshold.save(out)
            logger.info("threshold %.4f at FAR %.3g -> %s", threshold.value, far, out)
            return
        if detector_weights is None:
            raise ValueError("--detector-weights is required (or pass --aligned for pairs of aligned crops)")
        paths1, paths2, labels, _ = read_pairs_csv(pairs)
        analyzer = analyzer_from_flags(detector, detector_weights, model,
                                       detector_options=detector_option, threads=threads, flip=flip)
        unique = sorted({str(p) for p in [*paths1, *paths2]})
        results = dict(zip(unique, analyzer.analyze(unique)))
        scores, same, skipped = [], [], 0
        for a, b, label in zip(paths1, paths2, labels):
            ra, rb = results[str(a)], results[str(b)]
            if ra.error or rb.error or not ra.faces or not rb.faces:
                skipped += 1
                continue
            scores.append(analyzer.compare(ra.faces[0], rb.faces[0]).cosine)
            same.append(bool(label))
        if skipped:
            logger.warning("%d of %d pairs skipped (unreadable photo or no face)", skipped, len(labels))
        card = analyzer.embedder.card
        threshold = calibrate_threshold(np.array(scores), np.array(same), far, card.name, card.embedding_size,
                                        card.weights_sha256)
        threshold.save(out)
        logger.info("threshold %.4f at FAR %.3g (measured FAR %.4g, TAR %s) from %d pairs -> %s", threshold.value, far,
                    threshold.measured_far, threshold.measured_tar, len(scores), out)
