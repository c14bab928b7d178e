"""Photos in, faces out: detection, landmarks, alignment, embeddings and calibrated decisions."""

from facesphere.pipeline.analyzer import Comparison, Face, FaceAnalyzer, ImageResult, input_sources
from facesphere.pipeline.threshold import Threshold, ThresholdMismatch, calibrate_threshold

__all__ = ["Comparison", "Face", "FaceAnalyzer", "ImageResult", "Threshold", "ThresholdMismatch", "calibrate_threshold",
           "input_sources"]
