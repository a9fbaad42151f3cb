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


def tau_ratio(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]], draws: int = 2000,
              seed: int = 0) -> tuple[float, float, float]:
    """tau(a) / tau(b) and its 95% paired bootstrap interval over prompts.

    `a[i]`, `b[i]` = (generated tokens, verify steps) of prompt i under two drafters; prompts
    are resampled jointly, so the interval reflects how much the ratio depends on which
    prompts were drawn. Returns (ratio, low, high).
    """
    import torch

    if len(a) != len(b) or not a:
        raise ValueError(f"need the same non-empty prompts for both drafters, got {len(a)} and {len(b)}")
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(a), (draws, len(a)), generator=g)
    ra = ta[idx, 0].sum(1) / ta[idx, 1].sum(1).clamp_min(1)
    rb = tb[idx, 0].sum(1) / tb[idx, 1].sum(1).clamp_min(1)
    lo, hi = torch.quantile(ra / rb, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    ratio = (ta[:, 0].sum() / ta[:, 1].sum().clamp_min(1)) / (tb[:, 0].sum() / tb[:, 1].sum().clamp_min(1))
    return float(ratio), lo, hi
