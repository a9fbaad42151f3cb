"""Process-group plumbing for `torchrun`: one process when launched plainly, N when launched by torchrun.

The same code runs gloo on CPU and nccl on GPU. The frozen target is replicated; the
drafter's gradients are averaged across ranks; data is sharded by rank (see BatchPlan).
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Context(dist.get_rank(), dist.get_world_size())


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    if ctx.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def no_sync(model, ctx: Context, last: bool):
    """Skip the gradient all-reduce on all but the last accumulation micro-batch."""
    if ctx.world > 1 and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def all_finite(model, ctx: Context) -> bool:
    """True when every rank's gradients are finite (a NaN step is skipped everywhere)."""
    ok = torch.tensor(1.0)
    for p in model.parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            ok = torch.tensor(0.0)
            break
    if ctx.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def save(fn, ctx: Context) -> None:
    if ctx.is_main:
        fn()
    barrier(ctx)


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()
