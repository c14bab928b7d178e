"""DistributedBatchNorm on 2 gloo processes equals BatchNorm on the whole batch (values, grads, running stats)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facesphere.train.distributed import DistributedBatchNorm, convert_batchnorm


def _batch_and_reference() -> tuple[torch.Tensor, torch.nn.BatchNorm2d]:
    """The same global batch and affine BatchNorm in every process."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return x, bn


def _worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, reference = _batch_and_reference()
    module = convert_batchnorm(torch.nn.Sequential(reference), torch.device("cpu"))[0].double()
    assert isinstance(module, DistributedBatchNorm)
    local = x[rank::world].clone().requires_grad_(True)
    out = module(local)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    torch.save({"out": out.detach(), "grad_x": local.grad, "grad_w": module.weight.grad, "running_mean": module.running_mean,
                "running_var": module.running_var}, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_batchnorm_matches_full_batch(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    x, bn = _batch_and_reference()
    order = torch.cat([torch.arange(8)[r::world] for r in range(world)])
    xs = x[order].clone().requires_grad_(True)
    out = bn(xs)
    halves = out.split(4)
    weights = [torch.arange(h.numel(), dtype=h.dtype).view_as(h) for h in halves]
    sum(((h * w).sum() for h, w in zip(halves, weights))).backward()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.detach())
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), xs.grad)
    torch.testing.assert_close(results[0]["grad_w"] + results[1]["grad_w"], bn.weight.grad)
    torch.testing.assert_close(results[0]["running_mean"], bn.running_mean)
    torch.testing.assert_close(results[0]["running_var"], bn.running_var)
