"""Plain softmax classifier, the baseline every margin head is compared against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesphere.heads.base import HEADS, MarginHead


@HEADS.register("softmax")
class SoftmaxHead(MarginHead):
    """logit_j = W_jᵀx + b_j (ArcFace 1801.07698 v3 Eq. (1)); labels are ignored.

    Args:
        bias: learn a per-class bias (default True, as in the classic softmax loss). A bias cannot
            follow a sampled subset of centres, so use ``bias=False`` with Partial FC.
    """

    def __init__(self, embedding_size: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(embedding_size, num_classes)
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_classes))
        else:
            self.register_parameter("bias", None)

    def logits(self, embeddings: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        bias = None
        if self.bias is not None:
            if weight.shape[0] != self.bias.shape[0]:
                raise ValueError("the softmax bias covers all classes; it cannot be used with a subset of centres")
            bias = self.bias.to(embeddings.dtype)
        return F.linear(embeddings, weight, bias)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, bias={self.bias is not None}"
