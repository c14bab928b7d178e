"""A researcher's plug-in, as a config's ``plugins: [dense_plugin]`` imports it: a backbone with a dense output and a
data kind with a per-pixel target, registered without editing facesphere (as PRNet's position maps will be)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from facesphere.backbones import BACKBONES
from facesphere.data import SyntheticFaces
from facesphere.train.data_setup import DATA_KINDS


class DenseNet(torch.nn.Module):
    """(N, 3, 32, 32) -> {"embedding": (N, 8), "coarse": (N, 1, 8, 8)}: a conv encoder with a dense head (no batch
    norm, so one process and two follow each other to float rounding)."""

    input_size, embedding_size = (32, 32), 8

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(4))
        self.dense = torch.nn.Conv2d(8, 1, 3, padding=1)
        self.embed = torch.nn.Linear(8 * 8 * 8, 8)

    def forward(self, images):
        features = self.features(images)
        return {"embedding": self.embed(features.flatten(1)), "coarse": self.dense(features)}


class CoarseMaps(torch.utils.data.Dataset):
    """Synthetic faces whose target ``coarse`` is the 8x8 mean luminance of the image; odd samples lack it (their
    placeholder is NaN, so a masked sample that leaked into the loss would show)."""

    target_names = ("label", "coarse")

    def __init__(self, faces: SyntheticFaces) -> None:
        self.faces, self.num_classes, self.labels, self.image_size = faces, faces.num_classes, faces.labels, (32, 32)

    def __len__(self) -> int:
        return len(self.faces)

    def set_epoch(self, epoch: int) -> None:
        self.faces.set_epoch(epoch)

    def __getitem__(self, index):
        image, targets = self.faces[index]
        coarse = F.avg_pool2d(image.mean(0, keepdim=True), 4)
        present = index % 2 == 0
        return image, {**targets, "coarse": coarse if present else torch.full_like(coarse, float("nan")),
                       "coarse_mask": present}


BACKBONES.register("test_dense")(DenseNet)
DATA_KINDS.register("test_coarse_maps")(
    lambda cfg, augment, size: CoarseMaps(SyntheticFaces(8, 8, image_size=size, augment=augment)))
