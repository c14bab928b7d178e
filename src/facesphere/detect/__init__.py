"""Face detectors with 5 landmarks (RetinaFace in PyTorch, SCRFD and YuNet in ONNX Runtime), chosen by name.

Importing this package registers every detector in ``DETECTORS``; ``onnxruntime`` itself is only
imported when an ONNX detector is built.
"""

from facesphere.detect import onnx_detectors, retinaface  # noqa: F401
from facesphere.detect.base import (
    DETECTORS,
    Detections,
    Detector,
    DetectorInputError,
    DetectorWeightsError,
    build_detector,
)
from facesphere.detect.boxes import box_iou, nms
from facesphere.detect.onnx_detectors import SCRFDDetector, YuNetDetector
from facesphere.detect.retinaface import (
    RetinaFaceDetector,
    RetinaFaceMobileNet,
    load_retinaface,
)

__all__ = [
    "DETECTORS",
    "Detections",
    "Detector",
    "DetectorInputError",
    "DetectorWeightsError",
    "RetinaFaceDetector",
    "RetinaFaceMobileNet",
    "SCRFDDetector",
    "YuNetDetector",
    "box_iou",
    "build_detector",
    "load_retinaface",
    "nms",
]
