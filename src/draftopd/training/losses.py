"""Training losses over drafted positions, computed in chunks of rows.

The LM head turns each drafted position into V logits; for 512 anchors x 15 offsets that
is ~7.7K x V floats, so every loss here walks rows in chunks and recomputes each chunk's
logits in backward (activation checkpointing) instead of keeping [rows, V] alive.
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def offset_weights(block_size: int, gamma: float, kind: str = "exp") -> torch.Tensor:
    """Weights for offsets k = 1..B-1: DFlash exp(-(k-1)/gamma), or Draft-OPD gamma^(k-1)."""
    k = torch.arange(1, block_size, dtype=torch.float)
    if kind == "exp":
        return torch.exp(-(k - 1) / gamma)
    if kind == "pow":
        return gamma ** (k - 1)
    if kind == "none":
        return torch.ones_like(k)
    raise ValueError(f"unknown weight kind {kind!r}")


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield slice(s, min(s + chunk, n))


def _ce_chunk(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)


def weighted_ce(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w * CE) / sum(w) over rows with labels >= 0, and the argmax per row.

    hidden [N, H], labels [N], weights [N] -> (loss scalar, predictions [N]).
    """
    keep = labels >= 0
    total = hidden.new_zeros((), dtype=torch.float)
    preds = torch.full_like(labels, -1)
    denom = weights[keep].sum().clamp_min(1e-8)
    for s in _chunks(hidden.shape[0], chunk):
        lab = labels[s].clamp(min=0)
        if hidden.requires_grad:
            ce, pred = checkpoint(_ce_chunk, hidden[s], head_weight, lab, use_reentrant=False)
        else:
            ce, pred = _ce_chunk(hidden[s], head_weight, lab)
        total = total + (ce * weights[s] * keep[s]).sum()
        preds[s] = pred
    return total / denom, preds


def implied_tau(per_offset_acc: list[float]) -> float:
    """Acceptance length implied by per-offset accuracies, treating offsets as independent."""
    tau, run = 1.0, 1.0
    for a in per_offset_acc:
        run *= a
        tau += run
    return tau


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all()) and not math.isnan(float(x))
