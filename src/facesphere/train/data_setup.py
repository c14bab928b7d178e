"""Datasets and loaders as a training config describes them."""

from __future__ import annotations


from facesphere.data import (AugmentConfig, GlobalBatchSampler, ImageFolderDataset, ImageListDataset, RecordDataset,
                             SyntheticFaces, build_loader)
from facesphere.train.config import ExperimentConfig
from facesphere.train.distributed import DistContext


def build_augment(cfg: ExperimentConfig) -> AugmentConfig:
    return AugmentConfig(**cfg.data.augment.model_dump())


def build_dataset(cfg: ExperimentConfig):
    d = cfg.data
    augment = build_augment(cfg)
    if d.kind == "synthetic":
        image_size = d.image_size or _backbone_input_size(cfg)
        s = d.synthetic
        return SyntheticFaces(s.num_identities, s.samples_per_identity, image_size=image_size, seed=s.seed,
                              identity_offset=s.identity_offset, augment=augment, difficulty=s.difficulty)
    if d.kind == "record":
        return RecordDataset(d.root, image_size=d.image_size or _backbone_input_size(cfg), augment=augment, seed=cfg.seed)
    if d.kind == "folder":
        return ImageFolderDataset(d.root, image_size=d.image_size or _backbone_input_size(cfg), augment=augment, seed=cfg.seed)
    return ImageListDataset(d.list_file, root=d.root, image_size=d.image_size or _backbone_input_size(cfg), augment=augment,
                            seed=cfg.seed)


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
                          seed=s.seed, identity_offset=e.identity_offset, augment=None, difficulty=s.difficulty)


__all__ = ["build_dataset", "build_train_set", "build_eval_set"]
