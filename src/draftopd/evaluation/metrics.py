"""Acceptance and speed metrics, as pure functions over decoding records.

An acceptance length is the number of tokens one verify step commits (accepted drafts + 1
target token), so it lies in 1..B. The prefill's first token is not a verify step.
"""

from collections.abc import Sequence


def acceptance_histogram(lengths: Sequence[int], block_size: int) -> list[int]:
    """counts[i] = number of steps that committed i+1 tokens, for lengths 1..block_size."""
    counts = [0] * block_size
    for n in lengths:
        if not 1 <= n <= block_size:
            raise ValueError(f"acceptance length {n} outside 1..{block_size}")
        counts[n - 1] += 1
    return counts


def offset_acceptance(lengths: Sequence[int], block_size: int) -> list[float]:
    """rate[k-1] for offsets k = 1..B-1: the fraction of steps whose draft at offset k was
    accepted, i.e. whose acceptance length exceeds k. Shows where in a block drafts fail."""
    counts = acceptance_histogram(lengths, block_size)
    steps = max(len(lengths), 1)
    return [sum(counts[k:]) / steps for k in range(1, block_size)]


def mean_tau(per_sample: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(mean of per-sample taus, token-weighted tau = total tokens / total steps).

    Samples with no verify step (answered by the prefill alone) have no tau and are left out
    of the per-sample mean; they add nothing to the token-weighted one either.
    """
    taus = [sum(s) / len(s) for s in per_sample if s]
    steps = sum(len(s) for s in per_sample)
    tokens = sum(sum(s) for s in per_sample)
    return sum(taus) / max(len(taus), 1), tokens / max(steps, 1)


def time_per_token(tpots: Sequence[float], tokens: Sequence[int]) -> float:
    """Token-weighted time per output token over samples: total time / total tokens."""
    total = sum(tokens)
    return sum(t * n for t, n in zip(tpots, tokens)) / total if total else 0.0


def speedup(baseline_tpot: float, tpot: float) -> float | None:
    """How many times faster than the baseline (per output token); None when undefined."""
    return baseline_tpot / tpot if tpot > 0 and baseline_tpot > 0 else None


def summarize_runs(records: Sequence[dict], block_size: int | None = None) -> dict:
    """Statistics of one group of runs (one method or drafter on one benchmark).

    Each record has `acceptance_lengths`, `num_output_tokens` and `time_per_output_token`;
    with `block_size` the acceptance histogram and per-offset rates are added.
    """
    lengths = [r["acceptance_lengths"] for r in records]
    tokens = [r["num_output_tokens"] for r in records]
    tpot = time_per_token([r["time_per_output_token"] for r in records], tokens)
    tau_sample, tau_token = mean_tau(lengths)
    out = {"samples": len(records), "output_tokens": sum(tokens), "steps": sum(map(len, lengths)),
           "tau": tau_token, "tau_per_sample_mean": tau_sample, "time_per_output_token": tpot,
           "tokens_per_s": 1 / tpot if tpot else 0.0}
    if block_size is not None:
        flat = [n for s in lengths for n in s]
        out["acceptance_histogram"] = acceptance_histogram(flat, block_size)
        out["offset_acceptance"] = offset_acceptance(flat, block_size)
    return out


def tau_ratio(a: Sequence, b: Sequence, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """tau(a) / tau(b) and its 95% paired bootstrap interval.

    `a[i]`, `b[i]` = (generated tokens, verify steps) of prompt i under two drafters; prompts
    are resampled jointly, so the interval reflects how much the ratio depends on which
    prompts were drawn. With one more leading axis, `a[s][i]` from training run (seed) s,
    paired with `b[s]`: runs are resampled too, so the interval also covers seed-to-seed
    spread. Returns (ratio, low, high).
    """
    import torch

    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if ta.shape != tb.shape or ta.numel() == 0 or ta.shape[-1] != 2 or ta.dim() not in (2, 3):
        raise ValueError(f"need the same non-empty prompts (and runs) for both drafters as (tokens, steps) pairs, "
                         f"got shapes {tuple(ta.shape)} and {tuple(tb.shape)}")
    ta, tb = (ta, tb) if ta.dim() == 3 else (ta[None], tb[None])  # [runs, prompts, 2]
    runs, prompts = ta.shape[:2]
    g = torch.Generator().manual_seed(seed)
    r_idx = torch.randint(0, runs, (draws, runs, 1), generator=g) if runs > 1 else torch.zeros(draws, 1, 1,
                                                                                                dtype=torch.long)
    p_idx = torch.randint(0, prompts, (draws, 1, prompts), generator=g)

    def tau(t: torch.Tensor) -> torch.Tensor:  # [draws] from a resampled [draws, runs, prompts, 2]
        return t[..., 0].sum((1, 2)) / t[..., 1].sum((1, 2)).clamp_min(1)

    lo, hi = torch.quantile(tau(ta[r_idx, p_idx]) / tau(tb[r_idx, p_idx]),
                            torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    ratio = (ta[..., 0].sum() / ta[..., 1].sum().clamp_min(1)) / (tb[..., 0].sum() / tb[..., 1].sum().clamp_min(1))
    return float(ratio), lo, hi
