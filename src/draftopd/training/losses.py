"""Training losses over drafted positions, computed in chunks of rows.

The LM head turns each drafted position into V logits; for 512 anchors x 15 offsets that
is ~7.7K x V floats, so no [rows, V] tensor ever lives for the whole batch. Every loss here
is a sum of per-row terms, and a row's term depends on that row's hidden state alone, so
each chunk's gradient w.r.t. its rows is taken in the same pass that makes its logits
(`rowwise`): backward only scales those [rows, H] gradients. Activation checkpointing would
make every chunk's logits twice. The exact KL, OPD's hot path, has its gradient in closed form.
"""

import math
from functools import partial

import torch
import torch.nn.functional as F

from draftopd.model.packed import frozen_linear

LOGIT_ROWS = 1024  # rows of [rows, V] logits made at once: 200 MB in fp32 at V = 49K, 600 MB at 152K


class _Rowwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, fn, chunk, head_weight, *args):
        ctx.n_args = len(args)
        values, extras, grads = [], [], []
        for s in _chunks(hidden.shape[0], chunk):
            value, extra, g = fn(hidden[s].detach(), head_weight, *(a[s] for a in args), grad=True)
            values.append(value.detach())
            extras.append(extra)
            grads.append(g)
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(hidden.shape))
        extra = torch.cat(extras) if extras else hidden.new_zeros(0)
        ctx.mark_non_differentiable(extra)
        return (torch.cat(values) if values else hidden.new_zeros(0, dtype=torch.float)), extra

    @staticmethod
    def backward(ctx, grad_values, grad_extra):
        (g,) = ctx.saved_tensors
        return (grad_values[:, None] * g).to(g.dtype), None, None, None, *([None] * (ctx.n_args))


def rowwise(fn, hidden: torch.Tensor, head_weight: torch.Tensor, *args: torch.Tensor, chunk: int = LOGIT_ROWS
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N], extras [N, ...]) of a per-row loss, one chunk of rows at a time.

    fn(h_chunk, head_weight, *arg_chunks, grad) -> (value [c], extra [c, ...], d value.sum()/dh
    [c, H] or None when not `grad`). `value` depends on its own row of `hidden` only (as
    every per-row loss does); `extra` carries no gradient (predictions, per-stream terms for
    logging). The head is frozen: its gradient is not taken.
    """
    if head_weight.requires_grad:
        raise ValueError("rowwise losses take no gradient for the LM head; it must be frozen")
    if not hidden.requires_grad:
        with torch.no_grad():
            parts = [fn(hidden[s], head_weight, *(a[s] for a in args), grad=False)
                     for s in _chunks(hidden.shape[0], chunk)]
        if not parts:
            return hidden.new_zeros(0, dtype=torch.float), hidden.new_zeros(0)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _Rowwise.apply(hidden, fn, chunk, head_weight, *args)


def autograd_rows(fn):
    """The `rowwise` contract for fn(h, head_weight, *args) -> (value, extra), gradient by autograd."""
    def rows(h, head_weight, *args, grad):
        if not grad:
            return (*fn(h, head_weight, *args), None)
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            value, extra = fn(h, head_weight, *args)
            (g,) = torch.autograd.grad(value.sum(), h)
        return value.detach(), extra, g
    return rows


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


def _ce_rows(hidden, head_weight, labels):
    logits = frozen_linear(hidden.to(head_weight.dtype), head_weight).float()
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)


def weighted_ce(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                chunk: int = LOGIT_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w * CE) / sum(w) over rows with labels >= 0, and the argmax per row.

    hidden [N, H], labels [N], weights [N] -> (loss scalar, predictions [N]).
    """
    keep = labels >= 0
    ce, preds = rowwise(autograd_rows(_ce_rows), hidden, head_weight, labels.clamp(min=0), chunk=chunk)
    return (ce * weights * keep).sum() / weights[keep].sum().clamp_min(1e-8), preds


def implied_tau(per_offset_acc: list[float]) -> float:
    """Acceptance length implied by per-offset accuracies, treating offsets as independent."""
    tau, run = 1.0, 1.0
    for a in per_offset_acc:
        run *= a
        tau += run
    return tau


def _kl_rows(student_h, head_weight, teacher_h, forward, *, temperature, grad):
    """Exact KL per row with its analytic gradient w.r.t. the student logits z (d = log q - log p):
    forward KL(p||q) = -sum p d, dz = q - p;  reverse KL(q||p) = sum q d, dz = q (d - KL).
    About half the elementwise passes over [c, V] that autograd takes."""
    lq = F.log_softmax(frozen_linear(student_h.to(head_weight.dtype), head_weight).float(), -1)
    lp = F.log_softmax(frozen_linear(teacher_h.to(head_weight.dtype), head_weight).float() / temperature, -1)
    d = lq - lp
    q, p = lq.exp_(), lp.exp_()
    fwd = -torch.linalg.vecdot(p, d)
    rev = torch.linalg.vecdot(q, d)
    value = torch.where(forward, fwd, rev)
    if not grad:
        return value, forward, None
    dz = d.sub_(rev[:, None]).mul_(q)  # reverse rows
    dz[forward] = q[forward] - p[forward]
    return value, forward, frozen_linear(dz.to(head_weight.dtype), head_weight, transposed=True).to(student_h.dtype)


def kl_rows(student_h: torch.Tensor, teacher_h: torch.Tensor, head_weight: torch.Tensor, forward: torch.Tensor,
            temperature: float = 1.0, chunk: int = LOGIT_ROWS) -> torch.Tensor:
    """Exact full-vocabulary KL per row: forward KL(p||q) where `forward`, else reverse KL(q||p).

    student_h, teacher_h [N, H] (final hidden states; the shared LM head makes the logits),
    forward [N] bool -> [N]. Only [chunk, V] logits exist at a time.
    """
    return rowwise(partial(_kl_rows, temperature=temperature), student_h, head_weight, teacher_h, forward,
                   chunk=chunk)[0]


def bernoulli_forward_kl(logp_y: torch.Tensor, logq_y: torch.Tensor, floor: float = -10.0) -> torch.Tensor:
    """KL(Bern(p_y) || Bern(q_y)) = p_y log(p_y/q_y) + (1-p_y) log((1-p_y)/(1-q_y)) for a committed token y.

    The public code's forward term: a committed token is the target's greedy choice, not a
    draw from p, so log p(y) - log q(y) would only be cross-entropy on y (its gradient has
    no p in it); the Bernoulli pair keeps the teacher's p_y in the gradient and is >= 0,
    0 iff q_y = p_y. Log-probs are clamped to [floor, log(1 - eps)] as there: a token the
    drafter gives less than e^floor gets no gradient from this term.
    """
    top = math.log1p(-torch.finfo(torch.float32).eps)
    lp, lq = logp_y.float().clamp(floor, top), logq_y.float().clamp(floor, top)
    p, q = lp.exp(), lq.exp()
    return p * (lp - lq) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q))


def k3_estimate(logp_d: torch.Tensor, logq_d: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimate of KL(q||p) from tokens d ~ q: ratio - log ratio - 1, ratio = p/q (>= 0).

    The log ratio is clamped to +-20 (as verl's kl_penalty does) so exp cannot overflow.
    """
    log_ratio = (logp_d - logq_d).clamp(-20.0, 20.0)
    return log_ratio.exp() - log_ratio - 1


def _sampled_rows(student_h, head_weight, teacher_h, tok_f, w_f, tok_r, w_r, *, temperature, floor, loss_clamp):
    lq = F.log_softmax(frozen_linear(student_h.to(head_weight.dtype), head_weight).float(), -1)
    with torch.no_grad():
        lp = F.log_softmax(frozen_linear(teacher_h.to(head_weight.dtype), head_weight).float() / temperature, -1)
    pick = lambda t, i: t.gather(-1, i[:, None])[:, 0]  # noqa: E731
    fwd = bernoulli_forward_kl(pick(lp, tok_f), pick(lq, tok_f), floor).clamp(-loss_clamp, loss_clamp)
    rev = k3_estimate(pick(lp, tok_r), pick(lq, tok_r)).clamp(-loss_clamp, loss_clamp)
    return w_f * fwd + w_r * rev, torch.stack([fwd, rev], -1).detach()


def sampled_terms(student_h, teacher_h, head_weight, *, targets_fwd, use_fwd, targets_rev, use_rev, w_rev,
                  lambda_fwd: float = 1.0, lambda_rev: float = 1.0, temperature: float = 1.0, floor: float = -10.0,
                  loss_clamp: float = 10.0, chunk: int = LOGIT_ROWS) -> tuple[torch.Tensor, dict]:
    """The public Draft-OPD code's loss: sampled-token estimators, one pooled weighted mean.

    Forward stream (`use_fwd`): every committed token y (accepted drafts and the correction
    token), f = bernoulli_forward_kl(log p(y), log q(y)). Rejected stream (`use_rev`): each
    rejected draft d, g = k3 estimate ratio - log ratio - 1 with ratio = p(d)/q(d), weighted
    w = gamma^(k-1) by its offset (`w_rev`). Each term clamped to +-loss_clamp, then
        L = (l_f * sum f + l_r * sum w g) / (l_f * N_fwd + l_r * sum w)
    (l_f, l_r: the code's response/rejected stream weights, our lambda_acc/lambda_rej).
    A row may hold one term of each stream. Rows [N, H] -> (loss, logged stream means).
    """
    w_f = use_fwd.float() * lambda_fwd
    w_r = use_rev.float() * w_rev.float() * lambda_rev
    terms, parts = rowwise(autograd_rows(partial(_sampled_rows, temperature=temperature, floor=floor,
                                                 loss_clamp=loss_clamp)),
                           student_h, head_weight, teacher_h, targets_fwd, w_f, targets_rev, w_r, chunk=chunk)
    denom = float(w_f.sum() + w_r.sum())
    loss = terms.sum() / denom if denom > 0 else student_h.sum() * 0
    scalars = {}
    if use_fwd.any():
        scalars["loss_acc"] = float(parts[use_fwd, 0].mean())
    if use_rev.any():
        w = w_rev[use_rev].float()
        scalars["loss_rej"] = float((parts[use_rev, 1] * w).sum() / w.sum())
    return loss, scalars
