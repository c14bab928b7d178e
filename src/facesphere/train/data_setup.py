"""Datasets and loaders as a training config describes them; data kinds are chosen by name (``DATA_KINDS``)."""

from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset

from facesphere.data import (AugmentConfig, GlobalBatchSampler, ImageFolderDataset, ImageListDataset, RecordDataset,
                             SyntheticFaces, build_loader)
from facesphere.registry import Registry
from facesphere.train.config import ExperimentConfig
from facesphere.train.distributed import DistContext

DATA_KINDS: Registry[Callable[[ExperimentConfig, AugmentConfig, tuple[int, int]], Dataset]] = Registry("data kind")
"""``data.kind`` -> ``builder(cfg, augment, image_size) -> Dataset``."""


@DATA_KINDS.register("synthetic")
def _synthetic(cfg: ExperimentConfig, augment: AugmentConfig, image_size: tuple[int, int]) -> SyntheticFaces:
    s = cfg.data.synthetic
    return SyntheticFaces(s.num_identities, s.samples_per_identity, image_size=image_size, seed=s.seed,
                          identity_offset=s.identity_offset, augment=augment, difficulty=s.difficulty,
                          targets=s.targets, target_share=s.target_share, **s.age_options())


@DATA_KINDS.register("record")
def _record(cfg: ExperimentConfig, augment: AugmentConfig, image_size: tuple[int, int]) -> RecordDataset:
    return RecordDataset(cfg.data.root, image_size=image_size, augment=augment, seed=cfg.seed)


@DATA_KINDS.register("folder")
def _folder(cfg: ExperimentConfig, augment: AugmentConfig, image_size: tuple[int, int]) -> ImageFolderDataset:
    return ImageFolderDataset(cfg.data.root, image_size=image_size, augment=augment, seed=cfg.seed, ages=cfg.data.ages)


@DATA_KINDS.register("list")
def _list(cfg: ExperimentConfig, augment: AugmentConfig, image_size: tuple[int, int]) -> ImageListDataset:
    return ImageListDataset(cfg.data.list_file, root=cfg.data.root, image_size=image_size, augment=augment,
                            seed=cfg.seed)


def build_augment(cfg: ExperimentConfig) -> AugmentConfig:
    return AugmentConfig(**cfg.data.augment.model_dump())


def build_dataset(cfg: ExperimentConfig) -> Dataset:
    return DATA_KINDS.get(cfg.data.kind)(cfg, build_augment(cfg), cfg.data.image_size or _backbone_input_size(cfg))


def _backbone_input_size(cfg: ExperimentConfig) -> tuple[int, int]:
    from facesphere.backbones import build_backbone

    return tuple(build_backbone(cfg.model.backbone, **cfg.model.backbone_args).input_size)


def build_train_set(cfg: ExperimentConfig, ctx: DistContext):
    dataset = build_dataset(cfg)
    sampler = GlobalBatchSampler(len(dataset), cfg.data.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                 seed=cfg.seed, drop_last=True)
    loader = build_loader(dataset, sampler, num_workers=cfg.data.num_workers, pin_memory=ctx.device.type == "cuda")
    return dataset, loader, sampler


def build_eval_set(cfg: ExperimentConfig) -> SyntheticFaces:
    """Held-out synthetic identities: same generator seed, identity ids disjoint from training."""
    e, s = cfg.eval, cfg.data.synthetic
    return SyntheticFaces(e.num_identities, e.samples_per_identity, image_size=cfg.data.image_size or _backbone_input_size(cfg),
                          seed=s.seed, identity_offset=e.identity_offset, augment=None, difficulty=s.difficulty,
                          **s.age_options())


__all__ = ["DATA_KINDS", "build_dataset", "build_train_set", "build_eval_set"]
