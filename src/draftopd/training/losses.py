"""Training losses over drafted positions, computed in chunks of rows.

The LM head turns each drafted position into V logits; for 512 anchors x 15 offsets that
is ~7.7K x V floats, so no [rows, V] tensor ever lives for the whole batch. Every loss here
is a sum of per-row terms, and a row's term depends on that row's hidden state alone, so
each chunk's gradient w.r.t. its rows is taken in the same pass that makes its logits
(`rowwise`): backward only scales those [rows, H] gradients. Activation checkpointing would
make every chunk's logits twice. The exact KL, OPD's hot path, has its gradient in closed form.
"""


from functools import partial

import torch
import torch.nn.functional as F


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


def rowwise(fn, hidden: torch.Tensor, head_weight: torch.Tensor, *args: torch.Tensor, chunk: int = 1024
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
    logits = F.linear(hidden.to(head_weight.dtype), head_weight).float()
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)


def weighted_ce(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
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
    lq = F.log_softmax(F.linear(student_h.to(head_weight.dtype), head_weight).float(), -1)
    lp = F.log_softmax(F.linear(teacher_h.to(head_weight.dtype), head_weight).float() / temperature, -1)
    d = lq - lp
    q, p = lq.exp_(), lp.exp_()
    fwd = -torch.linalg.vecdot(p, d)
    rev = torch.linalg.vecdot(q, d)
    value = torch.where(forward, fwd, rev)
    if not grad:
        return value, forward, None
    dz = d.sub_(rev[:, None]).mul_(q)  # reverse rows
    dz[forward] = q[forward] - p[forward]
    return value, forward, (dz.to(head_weight.dtype) @ head_weight).to(student_h.dtype)


def kl_rows(student_h: torch.Tensor, teacher_h: torch.Tensor, head_weight: torch.Tensor, forward: torch.Tensor,
            temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Exact full-vocabulary KL per row: forward KL(p||q) where `forward`, else reverse KL(q||p).

    student_h, teacher_h [N, H] (final hidden states; the shared LM head makes the logits),
    forward [N] bool -> [N]. Only [chunk, V] logits exist at a time.
    """
    return rowwise(partial(_kl_rows, temperature=temperature), student_h, head_weight, teacher_h, forward,
                   chunk=chunk)[0]


def forward_kl_estimate(logp_y: torch.Tensor, logq_y: torch.Tensor) -> torch.Tensor:
    """Per-sample estimate of KL(p||q) from tokens y ~ p: log p(y) - log q(y)."""
    return logp_y - logq_y


def k3_estimate(logp_d: torch.Tensor, logq_d: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimate of KL(q||p) from tokens d ~ q: ratio - log ratio - 1, ratio = p/q (>= 0)."""
    log_ratio = logp_d - logq_d
    return log_ratio.exp() - log_ratio - 1


def _sampled_rows(student_h, head_weight, teacher_h, tok_f, use_f, tok_r, use_r, *, temperature, clamp):
    lq = F.log_softmax(F.linear(student_h.to(head_weight.dtype), head_weight).float(), -1)
    with torch.no_grad():
        lp = F.log_softmax(F.linear(teacher_h.to(head_weight.dtype), head_weight).float() / temperature, -1)
    pick = lambda t, i: t.gather(-1, i[:, None])[:, 0].clamp(min=clamp)  # noqa: E731
    fwd = forward_kl_estimate(pick(lp, tok_f), pick(lq, tok_f))
    rev = k3_estimate(pick(lp, tok_r), pick(lq, tok_r))
    terms = torch.where(use_f, fwd, 0.0) + torch.where(use_r, rev, 0.0)
    return terms, torch.stack([fwd, rev], -1).detach()


def sampled_terms(student_h, teacher_h, head_weight, *, targets_fwd, use_fwd, targets_rev, use_rev,
                  temperature: float = 1.0, clamp: float = -10.0, chunk: int = 1024) -> tuple[torch.Tensor, dict]:
    """The public Draft-OPD estimators, pooled into one mean.

    Forward (Bernoulli) terms on committed tokens incl. the correction token (`use_fwd`),
    k3 reverse terms on rejected draft tokens (`use_rev`); log-probs clamped at `clamp`.
    A row may hold one of each; the mean is over terms.
    """
    terms, parts = rowwise(autograd_rows(partial(_sampled_rows, temperature=temperature, clamp=clamp)), student_h,
                           head_weight, teacher_h, targets_fwd, use_fwd, targets_rev, use_rev, chunk=chunk)
    count = int(use_fwd.sum()) + int(use_rev.sum())
    loss = terms.sum() / count if count else student_h.sum() * 0
    scalars = {}
    if use_fwd.any():
        scalars["loss_acc"] = float(parts[use_fwd, 0].mean())
    if use_rev.any():
        scalars["loss_rej"] = float(parts[use_rev, 1].mean())
    return loss, scalars
