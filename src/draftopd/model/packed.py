"""CPU linears with prepacked weights: a decode step's few rows at the speed the memory allows.

On CPU, `F.linear` on the few rows of a decode step or a verify lays its weight out afresh on
every call, and for 2-3 rows it reads it once per row. With the weights laid out once for
oneDNN (the `mkldnn` ops torch.compile's CPU backend uses when it freezes weights), a step of
the embedded SmolLM2 on a 2-core EPYC (2 threads, `benchmarks/decode_overhead.py`) took
25.6 ms instead of 38.1 for 1 token and 27.7 instead of 62.1 for 4 in fp32 with the kernels
held to AVX2, and 19.8 instead of 23.1 for 1 token in bf16 (AVX512). So the target alone gets
faster and a wider verify costs little more than one token: both what speculative decoding
needs on a CPU.

Only where it is exact and safe: weights on CPU, fp32 or bf16 (bf16 needs AVX512 or
AVX-NE-CONVERT; oneDNN refuses it otherwise), no gradient wanted, and a self-test on this
machine passed. A packed copy is a second copy of each weight, so a model whose linears
would take more than a quarter of the machine's memory stays as it is. Anything else, such
as a pass that needs gradients, runs `F.linear` as before; the result per row does not
depend on how many rows are in the call.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

PACK_HINT = 4  # rows the layout is chosen for: a verify's width (fp32 measured 1.4x slower with 1)
MAX_MEMORY_SHARE = 0.25  # of physical memory, for the packed copies


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def packing_unavailable(dtype: torch.dtype) -> str | None:
    """Why linears of `dtype` cannot be packed on this CPU (None: they can); checked once per process."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{dtype} is not packed"
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(48, 32, generator=g).to(dtype), torch.randn(5, 32, generator=g).to(dtype)
        got, want = _packed_linear(x, _pack(w), None), F.linear(x, w)
    except Exception as e:  # an op missing from this build, or a CPU oneDNN refuses for this dtype
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
        return "the packed result differs from F.linear"
    return None


_PACKED = WeakIdKeyDictionary()  # weight -> {transposed?: ((data_ptr, version, dtype) packed from, packed copy)}


def packed_copy(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """The packed layout of `weight` (of its transpose if `transposed`), made once and again only
    after the weight has changed (in place, or given new data); one cache for modules and losses."""
    key = (weight.data_ptr(), weight._version, weight.dtype)
    copies = _PACKED.setdefault(weight, {})
    if copies.get(transposed, (None,))[0] != key:
        copies[transposed] = key, _pack(weight.t().contiguous() if transposed else weight)
    return copies[transposed][1]


def _packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype and x.numel() > 0
            and packing_unavailable(weight.dtype) is None)


class PackedLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) whose calls that need no gradient use the
    packed copy of its weight (`packed_copy`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not _packable(x, w) or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return F.linear(x, w, self.bias)
        y = _packed_linear(x.reshape(-1, self.in_features).contiguous(), packed_copy(w), self.bias)
        return y.view(*x.shape[:-1], self.out_features)


class _FrozenLinear(torch.autograd.Function):
    """x @ W^T with W frozen: the gradient goes to x only (x @ W^T's is g @ W), both packed."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return _packed_linear(x, packed_copy(weight), None)

    @staticmethod
    def backward(ctx, grad):
        return _packed_linear(grad.contiguous(), packed_copy(ctx.weight, True), None), None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """`F.linear(x, weight)` (`x @ weight` if `transposed`) for a frozen weight and [N, *] rows, as the
    training losses apply the LM head: packed on CPU, each layout made once per weight (fp32: ~2x
    faster at 1024 rows here, forward and backward), `F.linear` / `@` where it cannot be."""
    if x.dim() != 2 or weight.requires_grad or not _packable(x, weight):
        return x @ weight if transposed else F.linear(x, weight)
    if torch.is_grad_enabled() and x.requires_grad and not transposed:
        return _FrozenLinear.apply(x.contiguous(), weight)
    if torch.is_grad_enabled() and x.requires_grad:
        return x @ weight
    return _packed_linear(x.contiguous(), packed_copy(weight, transposed), None)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


_ANNOUNCED: set[str] = set()


def pack_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of a CPU model a `PackedLinear` (in place); how many were.

    Nothing changes (and one line says why, once per process) where packing is not available
    for the model's dtype or its copies would not fit; a model on another device is left alone.
    """
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"]
    if not linears:
        return 0
    dtype = linears[0].weight.dtype
    why = packing_unavailable(dtype)
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    memory = _physical_memory()
    if why is None and memory is not None and size > MAX_MEMORY_SHARE * memory:
        why = f"their weights ({size / 2**30:.1f} GiB) would need a second copy; this machine has {memory / 2**30:.1f} GiB"
    if why is not None:
        line = f"draftopd: {dtype} CPU linears stay unpacked ({why})"
        if line not in _ANNOUNCED:
            _ANNOUNCED.add(line)
            print(line, file=sys.stderr, flush=True)
        return 0
    for m in linears:
        m.__class__ = PackedLinear
    return len(linears)


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears` (in place; the packed copies are dropped); how many were packed."""
    n = 0
    for m in model.modules():
        if type(m) is PackedLinear:
            m.__class__ = nn.Linear
            _PACKED.pop(m.weight, None)
            n += 1
    return n
