"""Acceptance rules and sampling filters on small hand-made tensors."""

import torch

from draftopd.decoding.sampling import greedy_accept, rejection_accept, sampling_probs


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
