"""Token distributions and the acceptance rules of one verify step (pure functions).

Greedy: accept the longest prefix where draft == target argmax, then the target's token.
Sampling: standard speculative rejection sampling; the committed tokens are distributed
exactly as the target's (tempered, top-k/top-p filtered) distribution.
"""

import torch


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """[..., V] logits -> [..., V] fp32 probabilities after temperature, top-k, then top-p."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of [..., V] probabilities -> [...] ids."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def greedy_accept(drafts: torch.Tensor, target_argmax: torch.Tensor) -> tuple[int, int]:
    """drafts [k], target_argmax [k+1] (the target's choice after each block token).

    Returns (r, next_token): r accepted drafts, then the target's own token at offset r.
    """
    r = int((drafts == target_argmax[:-1]).int().cumprod(0).sum())
    return r, int(target_argmax[r])


def rejection_accept(
    drafts: torch.Tensor,  # [k] tokens sampled from q
    p: torch.Tensor,  # [k+1, V] target probabilities after each block token
    q: torch.Tensor,  # [k, V] draft probabilities the drafts were sampled from
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Accept draft i with prob min(1, p/q); on rejection draw from norm(max(0, p - q)); bonus from p."""
    k = drafts.shape[0]
    idx = drafts[:, None]
    p_d = p[:k].gather(-1, idx)[:, 0]
    q_d = q.gather(-1, idx)[:, 0]
    u = torch.rand(k, generator=generator, device=p.device)
    r = int((u * q_d < p_d).int().cumprod(0).sum())  # u < p/q without dividing by q = 0
    if r == k:
        return r, int(sample(p[k], generator))
    residual = (p[r] - q[r]).clamp_min(0)
    total = residual.sum()
    residual = residual / total if total > 0 else p[r]
    return r, int(sample(residual, generator))
