"""Acceptance rules and sampling filters on small hand-made tensors."""

import torch

from draftopd.decoding.sampling import greedy_accept, rejection_accept, sampling_probs
from draftopd.decoding.speculative import VerifyCosts


def test_greedy_accept_counts_prefix_and_returns_target_token():
    drafts = torch.tensor([5, 6, 9, 8])
    target = torch.tensor([5, 6, 7, 8, 1])  # mismatch at offset 2
    assert greedy_accept(drafts, target) == (2, 7)
    assert greedy_accept(torch.tensor([5, 6, 7, 8]), target) == (4, 1)  # all accepted: bonus
    assert greedy_accept(torch.tensor([0, 6, 7, 8]), target) == (0, 5)


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(sampling_probs(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]))
    p = sampling_probs(logits, 1.0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(sampling_probs(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))


def test_rejection_sampling_matches_target_distribution():
    """One draft from q then the step's first token must be distributed as p exactly."""
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.1, 0.1, 0.8]])
    g = torch.Generator().manual_seed(0)
    n, counts = 40000, torch.zeros(3)
    for _ in range(n):
        d = torch.multinomial(q[0], 1, generator=g)
        r, nxt = rejection_accept(d, p, q, g)
        counts[int(d[0]) if r == 1 else nxt] += 1
    freq = counts / n
    assert torch.allclose(freq, p[0], atol=0.012), freq
    # the rule that always accepts would give q: make sure the test can tell them apart
    assert not torch.allclose(q[0], p[0], atol=0.012)


# -- every committed token, by Monte Carlo, against planted wrong rules -------------------------

CHI2_MAX = 30.0  # per (position, prefix) cell; chi-square with 2-4 dof passes 30 with p < 1e-5


def _planted(bonus_row_shift: int = 0, residual_from_first: bool = False, any_order: bool = False):
    """An independent rejection-sampling rule, optionally with one planted bug: the bonus drawn from
    p[k-1] instead of p[k], the residual from q[0] instead of q[r], or r counting accepted drafts
    anywhere instead of the accepted prefix."""
    def accept(drafts, p, q, generator=None):
        k = drafts.shape[0]
        p_d, q_d = p[:k].gather(-1, drafts[:, None])[:, 0], q.gather(-1, drafts[:, None])[:, 0]
        ok = torch.rand(k, generator=generator) * q_d < p_d
        r = int(ok.sum()) if any_order else int(ok.int().cumprod(0).sum())
        if r == k:
            return r, int(torch.multinomial(p[k - bonus_row_shift], 1, generator=generator))
        residual = (p[r] - q[0 if residual_from_first else r]).clamp_min(0)
        return r, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return accept


WRONG = {"bonus from p[k-1]": _planted(bonus_row_shift=1), "residual from q[0]": _planted(residual_from_first=True),
         "non-prefix count": _planted(any_order=True)}


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _bonus_chi2(accept, n: int = 8000) -> float:
    """Four drafts drawn from q = p: every one is accepted, and the bonus must follow p[4], the
    target's distribution after the last draft."""
    p = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2],
                      [0.6, 0.1, 0.1, 0.1, 0.1], [0.05, 0.15, 0.2, 0.2, 0.4]])
    g = torch.Generator().manual_seed(0)
    drafts = torch.stack([torch.multinomial(p[i], n, replacement=True, generator=g) for i in range(4)], 1)
    counts = torch.zeros(5)
    for d in drafts:
        r, nxt = accept(d, p, p[:4], g)
        assert r == 4
        counts[nxt] += 1
    return _chi2(counts, p[4])


def test_drafts_from_the_target_are_all_accepted_and_the_bonus_follows_p_after_the_last():
    assert _bonus_chi2(rejection_accept) < CHI2_MAX
    assert _bonus_chi2(WRONG["bonus from p[k-1]"]) > CHI2_MAX


# a toy target whose next-token law depends on the previous token, and a drafter whose law
# depends on the offset (as DFlash's does), so p rows, q rows and prefixes all matter
MARKOV = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.5, 0.2]])  # p(x_j | x_{j-1})
DRAFT = torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.1, 0.6, 0.3]])  # q at offsets 1..3


def _all_drafts(drafts: list[int], previous: int) -> int:
    return len(drafts) + 1


def _worst_conditional_chi2(accept, n: int = 6000, T: int = 4, verify=_all_drafts) -> float:
    """Decode n sequences of T tokens (after token 0) by blocks of 3 drafts and `accept`, each step
    verifying the first `verify(drafts, previous token) - 1` drafts and committing r of them + the
    rule's token; for every position j and every prefix seen >= 100 times, chi-square of the
    committed x_j against the target's p(. | prefix). Returns the worst cell."""
    g = torch.Generator().manual_seed(0)
    pool = torch.stack([torch.multinomial(q, n * T, replacement=True, generator=g) for q in DRAFT], 1).tolist()
    seqs = []
    for i in range(n):
        seq, steps = [], iter(pool[i * T : (i + 1) * T])  # a step commits >= 1 token: T steps suffice
        while len(seq) < T:
            d = next(steps)
            prev = seq[-1] if seq else 0
            d = d[: verify(d, prev) - 1]
            r, nxt = accept(torch.tensor(d, dtype=torch.long), MARKOV[[prev] + d], DRAFT[: len(d)], g)
            seq += d[:r] + [nxt]
        seqs.append(tuple(seq[:T]))
    worst = 0.0
    for j in range(T):
        cells: dict[tuple, torch.Tensor] = {}
        for s in seqs:
            cells.setdefault(s[:j], torch.zeros(3))[s[j]] += 1
        for prefix, counts in cells.items():
            if counts.sum() >= 100:
                worst = max(worst, _chi2(counts, MARKOV[prefix[-1] if prefix else 0]))
    return worst


def test_rejection_sampling_commits_the_targets_distribution_at_every_position():
    """Over several verify steps with q != p, the committed tokens follow the target position by
    position given their prefix: accepted drafts, corrections after r >= 1 accepted drafts and
    bonus tokens alike. The same check rejects each planted wrong rule."""
    assert _worst_conditional_chi2(rejection_accept) < CHI2_MAX
    assert _worst_conditional_chi2(_planted()) < CHI2_MAX  # an independent correct rule passes too
    for name, wrong in WRONG.items():
        assert _worst_conditional_chi2(wrong) > CHI2_MAX, name


def test_verifying_a_prefix_chosen_before_drafting_keeps_the_targets_distribution():
    """`VerifyCosts` cuts a block by the drafter's distributions (their peaks), which DFlash computes
    for the whole block before any draft is drawn: still the target's law at every position. A cut
    by the drawn drafts' own probabilities is biased (the drafts it keeps no longer follow q), and
    so is one that peeks at the target; the same check sees both."""
    costs = VerifyCosts(draft=0.0, verify=[1.0, 1.3, 1.5, 1.7])
    peaks = torch.tensor([[0.9, 0.9, 0.9], [0.2, 0.2, 0.2], [0.6, 0.5, 0.2]])  # per context (previous token)

    def adaptive(d, prev):
        return costs.verify_size(peaks[prev].tolist())

    def by_drawn_probability(d, prev):
        return costs.verify_size([float(DRAFT[i, x]) for i, x in enumerate(d)])

    def peeking(d, prev):
        sure = 0
        for i, x in enumerate(d):
            if MARKOV[[prev] + d][i, x] < DRAFT[i, x]:
                break
            sure += 1
        return sure + 1

    assert sorted(adaptive(None, prev) for prev in range(3)) == [1, 3, 4]  # the cut really varies
    assert _worst_conditional_chi2(rejection_accept, verify=adaptive) < CHI2_MAX
    assert _worst_conditional_chi2(rejection_accept, verify=by_drawn_probability) > CHI2_MAX
    assert _worst_conditional_chi2(rejection_accept, verify=peeking) > CHI2_MAX
