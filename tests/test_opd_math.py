"""Draft-OPD pieces: tree mask, batched verify, exact KL, sampled estimators."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import tiny_target
from draftopd.training.losses import forward_kl_estimate, k3_estimate, kl_rows
from draftopd.training.opd import tree_mask, verify_states
from draftopd.training.target_pass import base_model


def test_tree_mask_is_causal_inside_blocks():
    m = tree_mask(torch.tensor([[2, 3]]), seq_len=4, width=3)[0, 0]  # [6, 4 + 6]
    assert m[0].tolist() == [1, 1, 0, 0, 1, 0, 0, 0, 0, 0]
    assert m[2].tolist() == [1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    assert m[4].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 1, 0]


def test_batched_verify_equals_each_block_alone():
    for kind in ("qwen3", "llama"):
        target = tiny_target(kind)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, 150, (2, 14), generator=g)
        lengths = torch.tensor([14, 11])
        ids[1, 11:] = 0
        anchors = torch.tensor([[4, 7, 12], [5, 9, 9]])
        blocks = torch.randint(1, 150, (2, 3, 4), generator=g)
        blocks[..., 0] = ids.gather(1, anchors)
        cache = DynamicCache(config=target.config)
        attn = (torch.arange(14)[None] < lengths[:, None]).long()
        with torch.no_grad():
            base_model(target)(input_ids=ids, attention_mask=attn, cache=cache, use_cache=True)
            ver = verify_states(target, cache, blocks, anchors, 14)
            for i in range(2):
                for j in range(3):
                    a = int(anchors[i, j])
                    alone = base_model(target)(input_ids=torch.cat([ids[i, :a], blocks[i, j]])[None]).last_hidden_state
                    assert torch.allclose(ver[i, j], alone[0, a:], atol=1e-5), (kind, i, j)


def test_exact_kl_matches_dense_reference_in_both_directions():
    torch.manual_seed(0)
    N, H, V = 9, 6, 11
    s = torch.randn(N, H, requires_grad=True)
    t = torch.randn(N, H)
    W = torch.randn(V, H)
    fwd = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    got = kl_rows(s, t, W, fwd, temperature=0.7, chunk=4)
    p = F.softmax(t @ W.T / 0.7, -1)
    q = F.softmax(s @ W.T, -1)
    ref = torch.where(fwd, (p * (p.log() - q.log())).sum(-1), (q * (q.log() - p.log())).sum(-1))
    assert torch.allclose(got, ref, atol=1e-5)
    (g1,) = torch.autograd.grad(got.sum(), s)
    (g2,) = torch.autograd.grad(ref.sum(), s)
    assert torch.allclose(g1, g2, atol=1e-5)
    assert (got >= -1e-6).all()


def test_sampled_terms_match_a_dense_reference():
    """The pooled mean of Bernoulli-forward and k3-reverse terms (clamped log-probs), and its gradient."""
    from draftopd.training.losses import sampled_terms

    torch.manual_seed(0)
    N, H, V = 9, 6, 11
    s = torch.randn(N, H, requires_grad=True)
    t, W = torch.randn(N, H), torch.randn(V, H) * 3  # large logits: some log-probs fall under the clamp
    tok_f, tok_r = torch.randint(0, V, (N,)), torch.randint(0, V, (N,))
    use_f = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    use_r = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)  # rows 1 and 5 hold both terms
    loss, scalars = sampled_terms(s, t, W, targets_fwd=tok_f, use_fwd=use_f, targets_rev=tok_r, use_rev=use_r,
                                  temperature=0.8, clamp=-4.0, chunk=4)
    lq = F.log_softmax(s @ W.T, -1).clamp(min=-4.0)
    lp = F.log_softmax(t @ W.T / 0.8, -1).clamp(min=-4.0)
    rows = torch.arange(N)
    fwd = lp[rows, tok_f] - lq[rows, tok_f]
    ratio = lp[rows, tok_r] - lq[rows, tok_r]
    rev = ratio.exp() - ratio - 1
    ref = torch.cat([fwd[use_f], rev[use_r]]).mean()
    assert torch.allclose(loss, ref, atol=1e-5)
    (g1,) = torch.autograd.grad(loss, s)
    (g2,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g1, g2, atol=1e-5) and g1.abs().sum() > 0
    assert abs(scalars["loss_acc"] - fwd[use_f].mean().item()) < 1e-5
    assert abs(scalars["loss_rej"] - rev[use_r].mean().item()) < 1e-5


def test_rowwise_refuses_a_trainable_head():
    from draftopd.training.losses import kl_rows

    with pytest.raises(ValueError, match="frozen"):
        kl_rows(torch.randn(2, 3, requires_grad=True), torch.randn(2, 3), torch.randn(5, 3, requires_grad=True),
                torch.ones(2, dtype=torch.bool))


def test_sampled_estimators_are_unbiased():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    d = torch.multinomial(q, 200_000, replacement=True, generator=g)
    fkl = (p * (p / q).log()).sum()
    rkl = (q * (q / p).log()).sum()
    assert torch.isclose(forward_kl_estimate(p.log()[y], q.log()[y]).mean(), fkl, atol=0.01)
    assert torch.isclose(k3_estimate(p.log()[d], q.log()[d]).mean(), rkl, atol=0.01)
    assert (k3_estimate(p.log()[d], q.log()[d]) >= 0).all()  # k3 never goes negative
    assert not torch.isclose(fkl, rkl, atol=0.05)  # the two directions differ: swapping would fail


def test_paper_loss_weights_and_normalisation():
    from draftopd.training.losses import offset_weights
    from draftopd.training.opd import combine_kl

    # one anchor, B=5, r=1: offset 1 accepted; offsets 2..4 rejected with weights 0.8^(k-1)
    kl = torch.tensor([2.0, 1.0, 3.0, 5.0])
    acc = torch.tensor([True, False, False, False])
    rej = ~acc
    w = offset_weights(5, 0.8, "pow")
    loss, s = combine_kl(kl, acc, rej, w, 1.0, 1.0)
    l_rej = (0.8 * 1.0 + 0.64 * 3.0 + 0.512 * 5.0) / (0.8 + 0.64 + 0.512)
    assert s["loss_acc"] == 2.0 and abs(s["loss_rej"] - l_rej) < 1e-6
    assert torch.isclose(loss, torch.tensor((2.0 + l_rej) / 2))
    loss, _ = combine_kl(kl, acc, rej, w, 3.0, 1.0)
    assert torch.isclose(loss, torch.tensor((3 * 2.0 + l_rej) / 4))
    loss, s = combine_kl(kl, torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), w, 1.0, 1.0)
    assert "loss_acc" not in s and torch.isclose(loss, (kl * w).sum() / w.sum())  # empty stream drops out
