"""Face-recognition backbones: images (N, 3, H, W) -> un-normalised embeddings (N, D).

Importing this package registers MobileFaceNet(-M/-S), iResNet-18/34/50/100/200,
SphereFace-4/10/20/36/64 and the GridFace / STN rectifying wrappers in :data:`BACKBONES`; build one with :func:`build_backbone`.
"""

from facesphere.backbones import iresnet, mobilefacenet, sphereface  # noqa: F401  (registration)
from facesphere.backbones import rectifier  # noqa: F401  (registration: gridface, stn)
from facesphere.backbones.base import BACKBONES, Backbone, build_backbone
from facesphere.backbones.complexity import Complexity, count_complexity
from facesphere.backbones.fuse import fuse_batchnorm
from facesphere.backbones.iresnet import IResNet
from facesphere.backbones.mobilefacenet import MobileFaceNet
from facesphere.backbones.sphereface import SphereFaceNet

__all__ = [
    "Backbone",
    "BACKBONES",
    "build_backbone",
    "count_complexity",
    "Complexity",
    "fuse_batchnorm",
    "MobileFaceNet",
    "IResNet",
    "SphereFaceNet",
]
