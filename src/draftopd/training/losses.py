"""Training losses over drafted positions, computed in chunks of rows.

The LM head turns each drafted position into V logits; for 512 anchors x 15 offsets that
is ~7.7K x V floats, so every loss here walks rows in chunks and recomputes each chunk's
logits in backward (activation checkpointing) instead of keeping [rows, V] alive.
"""


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
    logits = F.linear(hidden.to(weight.dtype), weight).float()
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


def _kl_chunk(student_h, teacher_h, head_weight, forward, temperature):
    lq = F.log_softmax(F.linear(student_h, head_weight).float(), -1)
    with torch.no_grad():
        lp = F.log_softmax(F.linear(teacher_h.to(head_weight.dtype), head_weight).float() / temperature, -1)
    fwd = (lp.exp() * (lp - lq)).sum(-1)  # KL(p || q)
    rev = (lq.exp() * (lq - lp)).sum(-1)  # KL(q || p)
    return torch.where(forward, fwd, rev)


def kl_rows(student_h: torch.Tensor, teacher_h: torch.Tensor, head_weight: torch.Tensor, forward: torch.Tensor,
            temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Exact full-vocabulary KL per row: forward KL(p||q) where `forward`, else reverse KL(q||p).

    student_h, teacher_h [N, H] (final hidden states; the shared LM head makes the logits),
    forward [N] bool -> [N]. Only [chunk, V] logits exist at a time, in forward and backward.
    """
    out = []
    for s in _chunks(student_h.shape[0], chunk):
        args = (student_h[s].to(head_weight.dtype), teacher_h[s], head_weight, forward[s], temperature)
        out.append(checkpoint(_kl_chunk, *args, use_reentrant=False) if student_h.requires_grad else _kl_chunk(*args))
    return torch.cat(out) if out else student_h.new_zeros(0)


def forward_kl_estimate(logp_y: torch.Tensor, logq_y: torch.Tensor) -> torch.Tensor:
    """Per-sample estimate of KL(p||q) from tokens y ~ p: log p(y) - log q(y)."""
    return logp_y - logq_y


def k3_estimate(logp_d: torch.Tensor, logq_d: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimate of KL(q||p) from tokens d ~ q: ratio - log ratio - 1, ratio = p/q (>= 0)."""
    log_ratio = logp_d - logq_d
    return log_ratio.exp() - log_ratio - 1


def _logprob_chunk(student_h, teacher_h, head_weight, tok_f, tok_r, temperature):
    lq = F.log_softmax(F.linear(student_h, head_weight).float(), -1)
    with torch.no_grad():
        lp = F.log_softmax(F.linear(teacher_h.to(head_weight.dtype), head_weight).float() / temperature, -1)
    pick = lambda t, i: t.gather(-1, i[:, None])[:, 0]  # noqa: E731
    return pick(lq, tok_f), pick(lp, tok_f), pick(lq, tok_r), pick(lp, tok_r)


def sampled_terms(student_h, teacher_h, head_weight, *, targets_fwd, use_fwd, targets_rev, use_rev,
                  temperature: float = 1.0, clamp: float = -10.0, chunk: int = 1024) -> tuple[torch.Tensor, dict]:
    """The public Draft-OPD estimators, pooled into one mean.

    Forward (Bernoulli) terms on committed tokens incl. the correction token (`use_fwd`),
    k3 reverse terms on rejected draft tokens (`use_rev`); log-probs clamped at `clamp`.
    """
    parts = []
    for s in _chunks(student_h.shape[0], chunk):
        args = (student_h[s].to(head_weight.dtype), teacher_h[s], head_weight, targets_fwd[s], targets_rev[s],
                temperature)
        parts.append(checkpoint(_logprob_chunk, *args, use_reentrant=False) if student_h.requires_grad
                     else _logprob_chunk(*args))
    lq_f, lp_f, lq_r, lp_r = (torch.cat(p) for p in zip(*parts))
    fwd = forward_kl_estimate(lp_f.clamp(min=clamp), lq_f.clamp(min=clamp))[use_fwd]
    rev = k3_estimate(lp_r.clamp(min=clamp), lq_r.clamp(min=clamp))[use_rev]
    terms = torch.cat([fwd, rev])
    loss = terms.mean() if terms.numel() else student_h.sum() * 0
    scalars = {}
    if fwd.numel():
        scalars["loss_acc"] = float(fwd.detach().mean())
    if rev.numel():
        scalars["loss_rej"] = float(rev.detach().mean())
    return loss, scalars
