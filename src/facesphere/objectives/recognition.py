"""Identity recognition: a margin head and softmax cross-entropy on the embedding, optionally as Partial FC.

With ``partial_fc=True`` the class centres are sharded across ranks (arXiv 2203.15565): the objective
is ``sharded``, so the trainer gives it a rank-local optimiser, keeps it outside DDP and checkpoints
its share in shard files; :meth:`Recognition.load_shards` re-cuts shards saved by any number of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from facesphere.heads import IGNORE_LABEL, build_head
from facesphere.heads.partial_fc import Shard, build_partial_fc
from facesphere.objectives.base import OBJECTIVES, Objective, ObjectiveContext, target_mask
from facesphere.objectives.resharding import reshard_classifier


@OBJECTIVES.register("recognition")
class Recognition(Objective):
    """``F.cross_entropy(head(embedding, label), label)``, or Partial FC's sharded cross-entropy.

    Samples the head's ``screen`` names as label noise (sub-center ArcFace after its drop) are left out of
    the loss entirely, on either path.

    Args:
        head, head_args: the registered margin head and its arguments (config: ``model.head``, ``model.head_args``).
        partial_fc, sample_rate: shard the centres across ranks and sample negatives at this rate.
        target: the target holding class ids; samples masked out of it are ignored (not with Partial FC).
        input: the model output holding the embeddings.
    """

    def __init__(self, context: ObjectiveContext, head: str = "arcface", head_args: dict[str, Any] | None = None,
                 partial_fc: bool = False, sample_rate: float = 1.0, target: str = "label",
                 input: str = "embedding") -> None:
        super().__init__(context)
        head_args = dict(head_args or {})
        self.target, self.input = target, input
        self.requires = (target,)
        self.sharded = bool(partial_fc)
        if self.sharded:
            shard = Shard.of(context.num_classes, context.rank, context.world_size)
            self.head = build_partial_fc(head, context.embedding_size, context.num_classes, sample_rate,
                                         seed=context.seed, shard=shard, **head_args)
        else:
            self.head = build_head(head, context.embedding_size, context.num_classes, **head_args)

    def update(self, step: int) -> None:
        self.head.update(step)

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        embeddings, labels = outputs[self.input], targets[self.target].long()
        mask = target_mask(targets, self.target)
        if mask is not None:
            if self.sharded:
                raise ValueError(f"Partial FC needs target {self.target!r} on every sample; the batch masks some out")
            labels = torch.where(mask, labels, torch.full_like(labels, IGNORE_LABEL))
        if self.sharded:
            return {self.key: self.head(embeddings, labels)}
        drop = self.head.screen(embeddings.detach(), labels)
        if drop is None:
            return {self.key: F.cross_entropy(self.head(embeddings, labels), labels, ignore_index=IGNORE_LABEL)}
        # Samples the head calls label noise are ignored like unlabelled ones; a batch with none left gives 0, not nan.
        labels = torch.where(drop, torch.full_like(labels, IGNORE_LABEL), labels)
        total = F.cross_entropy(self.head(embeddings, labels), labels, ignore_index=IGNORE_LABEL, reduction="sum")
        return {self.key: total / (labels != IGNORE_LABEL).sum().clamp(min=1)}

    def shard_state(self) -> dict[str, Any]:
        shard = self.head.shard
        return {"class_start": shard.start, "class_end": shard.end, "num_classes": self.head.num_classes,
                "head": self.head.head.state_dict()}

    def load_shards(self, shards: list[dict[str, Any]], optimizer: torch.optim.Optimizer) -> None:
        pfc = self.head
        head_state, optimizer_state = reshard_classifier(shards, pfc.shard.start, pfc.shard.end, pfc.head, optimizer)
        pfc.head.load_state_dict(head_state)
        optimizer.load_state_dict(optimizer_state)
