"""Photos in, faces out: detection, landmarks, alignment, embeddings and calibrated decisions."""

from facesphere.pipeline.analyzer import (
    Comparison,
    Face,
    FaceAnalyzer,
    ImageResult,
    NoFaceFound,
    input_sources,
    pick_face,
)
from facesphere.pipeline.build import AnalyzerSpec, PeopleFolder, build_analyzer, open_set_threshold
from facesphere.pipeline.stages import PHASES, Stage
from facesphere.pipeline.threshold import Threshold, ThresholdMismatch, calibrate_threshold, decide

__all__ = ["PHASES", "AnalyzerSpec", "Comparison", "Face", "FaceAnalyzer", "ImageResult", "NoFaceFound", "PeopleFolder", "Stage",
           "Threshold", "ThresholdMismatch", "build_analyzer", "calibrate_threshold", "decide",
           "input_sources", "open_set_threshold", "pick_face"]
