"""Draft-OPD pieces: verify mask, batched verify, exact KL, sampled estimators."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import tiny_drafter, tiny_target
from draftopd.errors import DraftOPDError
from draftopd.training.losses import forward_kl_estimate, k3_estimate, kl_rows
from draftopd.training.opd import verify_mask, verify_states
from draftopd.training.target_pass import base_model


def test_verify_mask_sees_text_to_the_limit_and_its_own_block_causally():
    # two blocks packed in one row, then one padding token
    limit, block = torch.tensor([[2, 2, 3]]), torch.tensor([[0, 0, 1]])
    m = verify_mask(limit, block, torch.tensor([[True, True, True]]), seq_len=4)[0, 0]  # [3, 4 + 3]
    assert m[0].tolist() == [1, 1, 0, 0, 1, 0, 0]
    assert m[1].tolist() == [1, 1, 0, 0, 1, 1, 0]
    assert m[2].tolist() == [1, 1, 1, 0, 0, 0, 1]
    pad = verify_mask(limit, block, torch.tensor([[True, True, False]]), seq_len=4)[0, 0]
    assert pad[2].tolist() == [0, 0, 0, 0, 0, 0, 1] and pad[1].tolist() == m[1].tolist()


def _assert_batched_verify_equals_each_block_alone(target):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 150, (2, 14), generator=g)
    lengths = torch.tensor([14, 11])
    ids[1, 11:] = 0
    anchors = torch.tensor([[4, 7, 9], [5, 8, 8]])
    accepted = torch.tensor([[0, 2, 3], [1, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    blocks = torch.randint(1, 150, (2, 3, 4), generator=g)
    for i in range(2):
        for j in range(3):
            a, r = int(anchors[i, j]), int(accepted[i, j])
            blocks[i, j, : r + 1] = ids[i, a : a + r + 1]  # the accepted prefix is the text
    cache = DynamicCache(config=target.config)
    attn = (torch.arange(14)[None] < lengths[:, None]).long()
    with torch.no_grad():
        base_model(target)(input_ids=ids, attention_mask=attn, cache=cache, use_cache=True)
        feed = (torch.arange(4) > accepted[..., None]) & valid[..., None]
        ver = verify_states(target, cache, blocks, anchors, accepted, feed, 14)
        for i in range(2):
            for j in range(3):
                a, r = int(anchors[i, j]), int(accepted[i, j])
                alone = base_model(target)(input_ids=torch.cat([ids[i, :a], blocks[i, j]])[None]).last_hidden_state
                fed = r + 1 if valid[i, j] else 4
                assert torch.allclose(ver[i, j, fed:], alone[0, a + fed:], atol=1e-5), (i, j)
                assert (ver[i, j, :fed] == 0).all()


def test_batched_verify_equals_each_block_alone():
    """Only drafts after the accepted prefix are fed; their states equal a plain forward of
    text[:a] + block, for blocks of any acceptance (none fed when all accepted)."""
    for kind in ("qwen3", "llama"):
        _assert_batched_verify_equals_each_block_alone(tiny_target(kind))


def test_verify_is_right_under_eager_attention():
    """Eager attention adds the mask to the scores: a boolean one (0/1) would mask nothing. Measured
    before the additive mask: 1.6 max abs error on these states."""
    target = tiny_target("qwen3")
    target.set_attn_implementation("eager")
    assert base_model(target).config._attn_implementation == "eager"
    _assert_batched_verify_equals_each_block_alone(target)


def test_attention_that_ignores_custom_masks_is_refused():
    target = tiny_target("qwen3")
    target.config._attn_implementation = "flash_attention_2"  # takes padding masks only
    with pytest.raises(DraftOPDError, match="flash_attention_2"):
        verify_states(target, DynamicCache(config=target.config), torch.ones(1, 1, 4, dtype=torch.long),
                      torch.tensor([[2]]), torch.tensor([[0]]), torch.ones(1, 1, 4, dtype=torch.bool), 6)
    with pytest.raises(DraftOPDError, match="attn_implementation"):
        _opd_step(tiny_drafter(target), target)


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
    w = torch.rand(N)  # the closed-form gradient is scaled per row by backward
    (g1,) = torch.autograd.grad((got * w).sum(), s)
    (g2,) = torch.autograd.grad((ref * w).sum(), s)
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


def _text_with_acceptance(draft, target, prompt: torch.Tensor, accept: list[int]) -> tuple[torch.Tensor, list[int]]:
    """A text on which greedy verification of `draft` accepts exactly `accept` drafts at its
    successive anchors: after each block's accepted prefix comes a token the draft did not propose.
    The first anchor is the first response token (position len(prompt))."""
    from draftopd.training.blocks import replay
    from draftopd.training.target_pass import target_states

    text, anchors = torch.cat([prompt, torch.tensor([9])]), []
    for r in accept:
        a = len(text) - 1
        feats = target_states(target, text[None], torch.tensor([len(text)]), draft.target_layer_ids).features
        with torch.no_grad():
            h = replay(draft, target.get_input_embeddings(), feats, text[None], torch.tensor([[a]]))[0, 0, 1:]
        d = (h @ target.get_output_embeddings().weight.T).argmax(-1)  # [B-1]
        nxt = [] if r == len(d) else [int(d[r]) % 150 + 1]  # a correction, or the bonus token
        text = torch.cat([text, d[:r], torch.tensor(nxt or [7], dtype=torch.long)])
        anchors.append(a)
    return text, anchors


def _opd_case():
    """Tiny target and drafter, two texts with designed acceptance lengths, and the batch."""
    from draftopd.training.data import Sequence, collate

    target = tiny_target("llama")
    target.model.norm.weight.data *= 20  # peaked teacher distributions: a wrong teacher row shows in the loss
    draft = tiny_drafter(target)
    g = torch.Generator().manual_seed(3)
    designs = [[0, 2, 3, 1, 0, 2], [1, 0, 3, 2]]
    seqs, walks = [], []
    for i, accept in enumerate(designs):
        text, anchors = _text_with_acceptance(draft, target, torch.randint(1, 150, (5 + 2 * i,), generator=g), accept)
        seqs.append(Sequence(i, text, 5 + 2 * i))
        walks.append(list(zip(anchors, accept)))
    return target, draft, seqs, walks, collate(seqs)


def _opd_step(draft, target, rollout_meta=None, **opd):
    from draftopd.training.config import load_config
    from draftopd.training.opd import OPDStep

    cfg = load_config(None, base={"method": "opd", "draft": {"init": "x", "block_size": 4}, "data": {"rollouts": "x"},
                                  "opd": {"max_anchors": 64, "gamma": 0.8, **opd}})
    return OPDStep(cfg, draft, target, rollout_meta=rollout_meta)


def test_opd_step_equals_a_loop_over_anchors_and_offsets():
    """The vectorised step (walk, drafts, packed verify, chunked KL, weights) against the plain
    definition: at each walk anchor and offset k, KL between the drafter's q_k and the target's
    next-token distribution after text[:a+1] + d_1..d_{k-1}; forward where k <= r, reverse
    weighted gamma^(k-1) beyond, each stream normalised, lambdas 1."""
    from draftopd.training.blocks import replay
    from draftopd.training.target_pass import target_states

    target, draft, seqs, walks, batch = _opd_case()
    loss, stats = _opd_step(draft, target)(batch, torch.Generator().manual_seed(0))

    W, B = target.get_output_embeddings().weight, draft.block_size
    acc, rej, w_rej = [], [], []
    with torch.no_grad():
        for s, walk in zip(seqs, walks):
            feats = target_states(target, s.ids[None], torch.tensor([len(s.ids)]), draft.target_layer_ids).features
            for a, r in walk:
                lq = F.log_softmax(replay(draft, target.get_input_embeddings(), feats, s.ids[None],
                                          torch.tensor([[a]]))[0, 0, 1:] @ W.T, -1)  # [B-1, V]
                d = lq.argmax(-1)
                for k in range(1, B):
                    ctx = torch.cat([s.ids[: a + 1], d[: k - 1]])
                    lp = F.log_softmax(target(ctx[None]).logits[0, -1], -1)
                    if k <= r:
                        acc.append((lp.exp() * (lp - lq[k - 1])).sum())
                    else:
                        rej.append((lq[k - 1].exp() * (lq[k - 1] - lp)).sum())
                        w_rej.append(0.8 ** (k - 1))
    w = torch.tensor(w_rej)
    ref = (torch.stack(acc).mean() + (torch.stack(rej) * w).sum() / w.sum()) / 2
    assert stats["scalars"]["accepted_tokens"] == sum(r for walk in walks for _, r in walk)
    assert stats["scalars"]["rejected_tokens"] == len(rej)
    assert torch.allclose(loss.detach(), ref, rtol=1e-4), (float(loss), float(ref))


def test_sampled_offset_depth_is_geometric_and_unbiased():
    from draftopd.training.opd import sample_depth

    r = torch.tensor([0, 2, 5]).repeat(20000)
    depth = sample_depth(r, 0.8, torch.Generator().manual_seed(0)).view(20000, 3)
    for j, rj in enumerate([0, 2, 5]):
        for k in range(rj + 1, rj + 5):
            assert abs((depth[:, j] >= k).float().mean() - 0.8 ** (k - 1 - rj)) < 0.015
    assert (depth >= r.view(20000, 3) + 1).all()  # the first rejection is always scored


def test_opd_offset_sampling_keeps_the_expected_loss():
    """Averaged over draws, the sampled rejected offsets give the full loss; each draw scores fewer rows."""
    target, draft, _, _, batch = _opd_case()
    full, _ = _opd_step(draft, target)(batch, torch.Generator().manual_seed(0))
    step = _opd_step(draft, target, offset_sampling=True)
    draws = torch.stack([step(batch, torch.Generator().manual_seed(s))[0].detach() for s in range(300)])
    assert abs(draws.mean() / full.detach() - 1) < 0.03, (float(draws.mean()), float(full))
    assert draws.std() > 0


def test_offset_sampling_needs_the_decayed_exact_loss():
    from draftopd.errors import DraftOPDError
    from draftopd.training.config import load_config

    base = {"method": "opd", "draft": {"init": "x"}, "data": {"rollouts": "x"}}
    with pytest.raises(DraftOPDError, match="offset_sampling"):
        load_config(None, ["opd.offset_sampling=true", "opd.loss=sampled"], base=base)


def test_cached_mode_warns_about_rollouts_sampled_at_temperature():
    target = tiny_target("llama")
    draft = tiny_drafter(target)
    with pytest.warns(UserWarning, match="temperature 0.7"):
        _opd_step(draft, target, rollout_meta={"settings": {"temperature": 0.7}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for meta in ({"settings": {"temperature": 0.0}}, {"target": "x"}, None):
            _opd_step(draft, target, rollout_meta=meta)
        _opd_step(draft, target, rollout_meta={"settings": {"temperature": 0.7}}, rollout_mode="live")
