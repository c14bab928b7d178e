"""Face alignment: 5-point similarity warps onto the recognition templates, and 68-point landmarks (PFLD).

``templates``: the named crop templates (``arcface_112x112``, ``sphereface_112x96``, scaled ArcFace squares).
``similarity``: the Umeyama similarity warp onto a template.
``landmarks68``: the PFLD 68-point model (ONNX Runtime) and the 5 alignment points derived from 68.
``boxcrop``: square crops from a detector box alone (no landmarks), the input of the misalignment benchmark.
"""

from facesphere.align.boxcrop import BOX_CROP_SCALE, box_crop

from facesphere.align.landmarks68 import (
    FGNET_TO_IBUG,
    PFLD68,
    LandmarkInputError,
    crop_faces,
    crop_squares,
    five_from_68,
)
from facesphere.align.similarity import align_faces, align_similarity, umeyama
from facesphere.align.templates import TEMPLATES, Template, get_template, template_for_size

__all__ = ["BOX_CROP_SCALE", "FGNET_TO_IBUG", "PFLD68", "TEMPLATES", "LandmarkInputError", "Template", "align_faces", "align_similarity",
           "box_crop", "crop_faces", "crop_squares", "five_from_68", "get_template", "template_for_size",
           "umeyama"]
