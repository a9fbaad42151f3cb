"""Process-group plumbing for `torchrun`: one process when launched plainly, N under torchrun.

The drafter is sharded with FSDP2 (`fully_shard`, per decoder layer and at the root); the
frozen target is replicated on every rank; data is sharded by rank (see BatchPlan). The same
code runs gloo on CPU and nccl on GPU.
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


def wrap(model: torch.nn.Module, ctx: Context, bf16: bool = False) -> torch.nn.Module:
    """Shard the drafter over ranks; bf16 compute with fp32 gradient reduction when asked."""
    if ctx.world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gathered(model, ctx: Context):
    """Full drafter weights on every rank for a while: forwards inside run no collectives.

    The no-grad anchor walk and live decoding make a data-dependent number of drafter calls
    per rank; sharded forwards would then wait on each other forever. Every rank must enter.
    """
    if ctx.world == 1:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def sync_gradients(model, ctx: Context, enabled: bool) -> None:
    """Whether the next backward reduces gradients across ranks: only on the last accumulation micro-batch."""
    if ctx.world > 1:
        model.set_requires_gradient_sync(enabled)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(model, ctx: Context) -> bool:
    """True when every rank's gradients are finite (a NaN step is skipped everywhere)."""
    ok = all(torch.isfinite(_local(p.grad)).all() for p in model.parameters() if p.grad is not None)
    return min_over_ranks(float(ok), ctx) > 0


def mean_over_ranks(x: float, ctx: Context) -> float:
    if ctx.world == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / ctx.world


def min_over_ranks(x: float, ctx: Context) -> float:
    if ctx.world == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t)


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


def full_state_dict(model) -> dict:
    """The unsharded drafter weights (on every rank's CPU), for the reference-format export."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
