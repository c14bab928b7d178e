"""Process-group set-up for torchrun, and batch norm synchronised across processes on any device.

A single process never creates a process group. Under torchrun (``WORLD_SIZE`` > 1) the group is
created explicitly by :func:`init_distributed` (never at import): NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from facesphere.utils.device import resolve_device

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistContext:
    """Read torchrun's environment; create the process group only when there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        logger.info("process group: backend=%s rank=%d/%d device=%s", backend, rank, world_size, device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: Tensor, ctx: DistContext) -> Tensor:
    """Mean of a tensor over processes (a copy; no autograd)."""
    if not ctx.distributed:
        return value.detach().clone()
    result = value.detach().clone()
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result / ctx.world_size


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a global sum is the global sum of gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        result = tensor.clone()
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        return result

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class DistributedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are computed over the global batch of all processes.

    ``torch.nn.SyncBatchNorm`` only runs on accelerators; this one all-reduces per-channel sums with
    a differentiable all-reduce, so it also works with gloo on CPU and
    makes an N-process run follow the single-process run with the same global batch.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))
        x = input if input.dtype == torch.float64 else input.float()
        channels = x.shape[1]
        shape = [1, channels] + [1] * (input.dim() - 2)
        # Two passes (global mean, then global sum of squared deviations): E[x^2] - mean^2 in float32
        # loses enough digits to move an N-process run visibly off the single-process one.
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        first = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        total = first[-1]
        mean = first[:channels] / total
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm by a cross-process one (torch's SyncBatchNorm on CUDA, ours elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistributedBatchNorm):
        new = DistributedBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module


__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "all_reduce_mean", "DistributedBatchNorm",
           "convert_batchnorm", "resolve_device"]
