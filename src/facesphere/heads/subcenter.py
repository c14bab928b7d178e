"""Sub-center ArcFace (Deng, Guo, Liu, Gong, Zafeiriou, ECCV 2020; also in arXiv 1801.07698 v4).

K sub-centres per class; a class's cosine is the best of its K: cos θ_j = max_k cos(x, W_{j,k}); the
ArcFace margin then applies to the target class's cos θ_y. Clean faces gather around one dominant
sub-centre, hard or mislabelled ones around the others. Once the model is discriminative the paper
keeps each class's dominant sub-centre, drops the samples farther than 75° from it as noise, and
trains on with K = 1.

In facesphere's loop (which knows no paper) this is the ``drop_step`` hyper-parameter: until then
:meth:`SubCenterArcFaceHead.screen` counts, per class, how often each sub-centre is the closest one
to a sample of that class (``counts``, a (C, K) buffer); at ``drop_step`` :meth:`update` keeps each
class's most-won sub-centre (``dominant``), and from then on the head runs with that one centre per
class and ``screen`` leaves out every sample farther than ``drop_angle`` from its class's centre
(counted per class in ``dropped``). Counts, choice and drops are checkpointed with the head.

With Partial FC every rank counts and screens the global batch for its own classes, and a row left out
is left out on every rank. A replicated head under DDP has its buffers broadcast from rank 0 each
step, so there counts and drops follow rank 0's share of the batch.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesphere.heads.arcface import ArcFaceHead
from facesphere.heads.base import EPS, HEADS, IGNORE_LABEL, cosine

logger = logging.getLogger(__name__)


@HEADS.register("subcenter_arcface", "subcenter")
class SubCenterArcFaceHead(ArcFaceHead):
    """ArcFace on the best of K sub-centres per class; after ``drop_step``, one centre per class and noise left out.

    ``weight`` is (C, K·D): row j holds class j's K sub-centres side by side, so anything that
    takes rows by class (Partial FC's sampling, sharding and resharding) keeps a class's sub-centres
    together. :meth:`logits` reads a (C', K·D) matrix as K sub-centres per class and a (C', D)
    matrix as one centre per class (what :meth:`centres` gives after the drop); with K = 1 the two
    coincide and the logits are exactly ArcFace's.

    Args:
        scale, margin, easy_margin: as :class:`~facesphere.heads.arcface.ArcFaceHead` (s = 64, m = 0.5).
        sub_centres: K ≥ 1, default 3 (the paper's choice).
        drop_step: the step at which each class keeps its dominant sub-centre and noisy samples start
            to be left out; None (default) trains with K sub-centres throughout.
        drop_angle: degrees; after the drop a sample farther than this from its class's centre is
            left out of the loss (75°, as in the paper).
        count_steps: count sub-centre wins only over the last ``count_steps`` steps before
            ``drop_step`` (None: every step since the start). The paper picks the dominant
            sub-centre with the trained model, so about one epoch is the closest window.
    """

    class_state = ("weight", "counts", "dominant", "dropped")

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        sub_centres: int = 3,
        drop_step: int | None = None,
        drop_angle: float = 75.0,
        count_steps: int | None = None,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale, margin, easy_margin)
        _check_count("sub_centres", sub_centres, 1)
        if drop_step is not None:
            _check_count("drop_step", drop_step, 0)
        if count_steps is not None:
            _check_count("count_steps", count_steps, 1)
        if not 0 < drop_angle <= 180:
            raise ValueError(f"drop_angle must lie in (0, 180] degrees, got {drop_angle}")
        self.sub_centres = sub_centres
        self.drop_step, self.count_steps = drop_step, count_steps
        self.drop_angle = float(drop_angle)
        self.weight = nn.Parameter(torch.empty(num_classes, sub_centres * embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.register_buffer("counts", torch.zeros(num_classes, sub_centres, dtype=torch.long))
        self.register_buffer("dominant", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("dropped", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("collapsed", torch.zeros((), dtype=torch.bool))
        self._collapsed = False  # host copy of ``collapsed``: reading the buffer every step would synchronise
        self._step = 0
        self.register_load_state_dict_post_hook(_sync_collapsed)

    @property
    def is_collapsed(self) -> bool:
        """True once each class runs on its dominant sub-centre alone (after ``drop_step``)."""
        return self._collapsed

    def centres(self) -> Tensor:
        """(C, K·D) before the drop; after it (C, D), each class's dominant sub-centre (its slot gets the gradient)."""
        if not self._collapsed:
            return self.weight
        slots = self.weight.view(self.num_classes, self.sub_centres, self.embedding_size)
        index = self.dominant.view(-1, 1, 1).expand(-1, 1, self.embedding_size)
        return slots.gather(1, index).squeeze(1)

    def class_cosine(self, embeddings: Tensor, weight: Tensor) -> Tensor:
        """cos θ_j = max_k cos(x, W_{j,k}) over the sub-centres in each row of ``weight`` (Sub-center ArcFace)."""
        width, dim = weight.shape[1], self.embedding_size
        if width % dim:
            raise ValueError(f"centre rows must hold whole sub-centres of size {dim}, got width {width}")
        per_centre = cosine(embeddings, weight.reshape(-1, dim))
        return per_centre.view(embeddings.shape[0], weight.shape[0], width // dim).amax(dim=2)

    def update(self, step: int) -> None:
        """Remember the step (for the counting window) and, from ``drop_step`` on, keep the dominant sub-centres."""
        self._step = int(step)
        if self.drop_step is not None and step >= self.drop_step and not self._collapsed:
            self.collapse()

    @torch.no_grad()
    def collapse(self) -> None:
        """Keep each class's dominant sub-centre: the one most of its samples were closest to (ties: lowest index)."""
        self.dominant.copy_(self.counts.argmax(dim=1))
        self.collapsed.fill_(True)
        self._collapsed = True
        moved = int((self.dominant != 0).sum())
        unseen = int((self.counts.sum(dim=1) == 0).sum())
        logger.info("sub-center ArcFace: each of %d classes keeps its dominant sub-centre (%d not sub-centre 0, "
                    "%d never seen: sub-centre 0); samples beyond %.1f° are left out from now on",
                    self.num_classes, moved, unseen, self.drop_angle)

    @torch.no_grad()
    def screen(self, embeddings: Tensor, labels: Tensor) -> Tensor | None:
        """Before the drop: count, in training mode, which sub-centre of its own class each sample is closest to;
        returns None. After: the mask of samples whose angle to their class's centre exceeds ``drop_angle``
        (added to ``dropped``)."""
        valid = labels != IGNORE_LABEL
        rows = labels.clamp(min=0)
        dtype = torch.float64 if torch.float64 in (embeddings.dtype, self.weight.dtype) else torch.float32
        x = F.normalize(embeddings.detach().to(dtype), dim=1, eps=EPS)
        if not self._collapsed:
            if self.training and self._counting():
                own = self.weight.detach()[rows].to(dtype).view(-1, self.sub_centres, self.embedding_size)
                best = torch.einsum("nkd,nd->nk", F.normalize(own, dim=2, eps=EPS), x).argmax(dim=1)
                self.counts.index_put_((rows, best), valid.long(), accumulate=True)  # ignored rows add 0
            return None
        centre = F.normalize(self.centres().detach()[rows].to(dtype), dim=1, eps=EPS)
        drop = valid & ((centre * x).sum(dim=1) < math.cos(math.radians(self.drop_angle)))
        self.dropped.index_put_((rows,), drop.long(), accumulate=True)
        return drop

    def _counting(self) -> bool:
        if self.drop_step is None or self.count_steps is None:
            return True
        return self._step >= self.drop_step - self.count_steps

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, sub_centres={self.sub_centres}, drop_step={self.drop_step}, "
                f"drop_angle={self.drop_angle}, count_steps={self.count_steps}")


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")


def _sync_collapsed(module: SubCenterArcFaceHead, incompatible_keys) -> None:
    """After load_state_dict: the host copy follows the loaded ``collapsed`` buffer (one read at load time)."""
    module._collapsed = bool(module.collapsed)


__all__ = ["SubCenterArcFaceHead"]
