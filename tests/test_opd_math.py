"""Draft-OPD pieces: verify mask, batched verify, exact KL, sampled estimators, the step's streams."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from helpers import tiny_drafter, tiny_target
from draftopd.errors import DraftOPDError
from draftopd.training.losses import bernoulli_forward_kl, k3_estimate, kl_rows
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


def test_sliding_window_targets_are_refused():
    """OPD's verify mask is full causal attention over the text's cache: a sliding-window target
    would be taught by states its own attention never forms."""
    from transformers import MistralConfig, MistralForCausalLM

    target = MistralForCausalLM(MistralConfig(sliding_window=16, num_hidden_layers=2, hidden_size=64,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              intermediate_size=128, vocab_size=160, pad_token_id=0)).eval()
    with pytest.raises(DraftOPDError, match=r"sliding window \(sliding_window=16\); OPD's verify pass needs full"):
        _opd_step(tiny_drafter(target), target)
    target.config.sliding_window = None
    _opd_step(tiny_drafter(target), target)  # full attention: accepted


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


def _bernoulli_reference(lp_y, lq_y, floor):
    top = torch.log1p(torch.tensor(-torch.finfo(torch.float32).eps))
    lp_y, lq_y = lp_y.clamp(floor, top), lq_y.clamp(floor, top)
    p, q = lp_y.exp(), lq_y.exp()
    return p * (lp_y - lq_y) + (1 - p) * ((1 - p).log() - (1 - q).log())


def test_sampled_terms_match_a_dense_reference():
    """The public code's loss on dense [N, V] tensors, value and gradient: Bernoulli forward KL
    p_y log(p_y/q_y) + (1-p_y) log((1-p_y)/(1-q_y)) on committed tokens (log-probs floored),
    k3 = ratio - log ratio - 1 (ratio = p/q) on rejected drafts weighted w, every term clamped to
    +-loss_clamp, (l_f sum f + l_r sum w g) / (l_f N_f + l_r sum w)."""
    from draftopd.training.losses import sampled_terms

    torch.manual_seed(0)
    N, H, V = 9, 6, 11
    s = torch.randn(N, H, requires_grad=True)
    t, W = torch.randn(N, H), torch.randn(V, H) * 3  # large logits: some log-probs fall under the floor
    tok_f, tok_r = torch.randint(0, V, (N,)), torch.randint(0, V, (N,))
    use_f = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    use_r = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)  # rows 1 and 5 hold both terms
    w_r = 0.8 ** torch.randint(0, 4, (N,)).float()
    loss, scalars = sampled_terms(s, t, W, targets_fwd=tok_f, use_fwd=use_f, targets_rev=tok_r, use_rev=use_r,
                                  w_rev=w_r, lambda_fwd=1.5, lambda_rev=0.5, temperature=0.8, floor=-4.0,
                                  loss_clamp=3.0, chunk=4)
    lq = F.log_softmax(s @ W.T, -1)
    lp = F.log_softmax(t @ W.T / 0.8, -1)
    rows = torch.arange(N)
    fwd = _bernoulli_reference(lp[rows, tok_f], lq[rows, tok_f], -4.0).clamp(-3.0, 3.0)
    log_ratio = lp[rows, tok_r] - lq[rows, tok_r]
    rev = (log_ratio.exp() - log_ratio - 1).clamp(-3.0, 3.0)
    assert (lq[rows, tok_f][use_f] < -4).any() and (rev[use_r].detach() >= 3.0).any()  # both clamps bite here
    ref = (1.5 * fwd[use_f].sum() + 0.5 * (w_r * rev)[use_r].sum()) / (1.5 * use_f.sum() + 0.5 * w_r[use_r].sum())
    assert torch.allclose(loss, ref, atol=1e-5)
    (g1,) = torch.autograd.grad(loss, s)
    (g2,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g1, g2, atol=1e-5) and g1.abs().sum() > 0
    assert abs(scalars["loss_acc"] - fwd[use_f].mean().item()) < 1e-5
    assert abs(scalars["loss_rej"] - ((w_r * rev)[use_r].sum() / w_r[use_r].sum()).item()) < 1e-5


def test_rowwise_refuses_a_trainable_head():
    from draftopd.training.losses import kl_rows

    with pytest.raises(ValueError, match="frozen"):
        kl_rows(torch.randn(2, 3, requires_grad=True), torch.randn(2, 3), torch.randn(5, 3, requires_grad=True),
                torch.ones(2, dtype=torch.bool))


def test_sampled_estimators():
    """k3 is an unbiased estimate of KL(q||p) from d ~ q. The forward term is the KL between the
    Bernoulli laws of "the token is y" under p and q: >= 0, zero iff q(y) = p(y), below the full
    KL(p||q), and its gradient moves q(y) toward p(y) from either side (log p(y) - log q(y),
    the k1 term it replaces, always raises q(y): its gradient has no p in it)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    g = torch.Generator().manual_seed(0)
    d = torch.multinomial(q, 200_000, replacement=True, generator=g)
    fkl = (p * (p / q).log()).sum()
    rkl = (q * (q / p).log()).sum()
    assert torch.isclose(k3_estimate(p.log()[d], q.log()[d]).mean(), rkl, atol=0.01)
    assert (k3_estimate(p.log()[d], q.log()[d]) >= 0).all()  # k3 never goes negative
    assert not torch.isclose(fkl, rkl, atol=0.05)  # the two directions differ: swapping would fail

    bern = bernoulli_forward_kl(p.log(), q.log())
    assert (bern >= 0).all() and (bern <= fkl).all() and bern.sum() > 0
    assert torch.allclose(bernoulli_forward_kl(p.log(), p.log()), torch.zeros(4), atol=1e-6)
    for y in (0, 3):  # p(y) above q(y), then below: the step on q(y) follows the sign of p(y) - q(y)
        z = q.log().clone().requires_grad_()
        (grad,) = torch.autograd.grad(bernoulli_forward_kl(p.log()[y], F.log_softmax(z, -1)[y]), z)
        assert torch.sign(-grad[y]) == torch.sign(p[y] - q[y])


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


PAST_END = ([0, 2, 3, 1, 0, 2, 0], [1, 0, 3, 1])  # the last blocks draft past their texts' ends


def _opd_case(designs=([0, 2, 3, 1, 0, 2], [1, 0, 3, 2])):
    """Tiny target and drafter, two texts with designed acceptance lengths, and the batch."""
    from draftopd.training.batches import Sequence, collate

    target = tiny_target("llama")
    target.model.norm.weight.data *= 20  # peaked teacher distributions: a wrong teacher row shows in the loss
    draft = tiny_drafter(target)
    g = torch.Generator().manual_seed(3)
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


def _reference_terms(draft, target, seqs, walks) -> list[tuple]:
    """The plain definition, one (anchor, offset) at a time: at each walk anchor a (r accepted) and
    offset k whose position a+k lies inside the text, the drafter's log q_k and the target's log p
    after text[:a+1] + d_1..d_{k-1} (d = the drafter's argmax drafts): (k, r, log q_k, log p, y, d_k)
    with y the text token at a+k."""
    from draftopd.training.blocks import replay
    from draftopd.training.target_pass import target_states

    W, B = target.get_output_embeddings().weight, draft.block_size
    terms = []
    with torch.no_grad():
        for s, walk in zip(seqs, walks):
            feats = target_states(target, s.ids[None], torch.tensor([len(s.ids)]), draft.target_layer_ids).features
            for a, r in walk:
                lq = F.log_softmax(replay(draft, target.get_input_embeddings(), feats, s.ids[None],
                                          torch.tensor([[a]]))[0, 0, 1:] @ W.T, -1)  # [B-1, V]
                d = lq.argmax(-1)
                for k in range(1, min(B, len(s.ids) - a)):  # past the text's end nothing is scored
                    ctx = torch.cat([s.ids[: a + 1], d[: k - 1]])
                    lp = F.log_softmax(target(ctx[None]).logits[0, -1], -1)
                    terms.append((k, r, lq[k - 1], lp, int(s.ids[a + k]), int(d[k - 1])))
    return terms


def _exact_reference(terms, correction_forward: bool = False) -> tuple[torch.Tensor, int]:
    """Forward KL(p||q) where k <= r (and k = r+1 with correction_forward), mean; reverse KL(q||p) where
    k > r, weighted 0.8^(k-1), normalised by the weights; the two streams averaged (lambdas 1)."""
    acc, rej, w_rej = [], [], []
    for k, r, lq, lp, _, _ in terms:
        if k <= r or (correction_forward and k == r + 1):
            acc.append((lp.exp() * (lp - lq)).sum())
        if k > r:
            rej.append((lq.exp() * (lq - lp)).sum())
            w_rej.append(0.8 ** (k - 1))
    w = torch.tensor(w_rej)
    return (torch.stack(acc).mean() + (torch.stack(rej) * w).sum() / w.sum()) / 2, len(rej)


def test_opd_step_equals_a_loop_over_anchors_and_offsets():
    """The vectorised step (walk, drafts, packed verify, chunked KL, weights) against the plain
    definition: at each walk anchor and offset k, KL between the drafter's q_k and the target's
    next-token distribution after text[:a+1] + d_1..d_{k-1}; forward where k <= r, reverse
    weighted gamma^(k-1) beyond, each stream normalised, lambdas 1."""
    target, draft, seqs, walks, batch = _opd_case()
    loss, stats = _opd_step(draft, target)(batch, torch.Generator().manual_seed(0))
    ref, n_rej = _exact_reference(_reference_terms(draft, target, seqs, walks))
    assert stats.scalars["accepted_tokens"] == sum(r for walk in walks for _, r in walk)
    assert stats.scalars["rejected_tokens"] == n_rej
    assert torch.allclose(loss.detach(), ref, rtol=1e-4), (float(loss), float(ref))


def test_correction_forward_adds_the_committed_correction_token_to_the_forward_stream():
    """The public code also gives the first rejected offset (where the target's own token is
    committed) a forward term; the paper gives it only the reverse one (the exact loss's default)."""
    target, draft, seqs, walks, batch = _opd_case()
    terms = _reference_terms(draft, target, seqs, walks)
    on, _ = _opd_step(draft, target, correction_forward=True)(batch, torch.Generator().manual_seed(0))
    off, _ = _opd_step(draft, target)(batch, torch.Generator().manual_seed(0))
    ref_on, ref_off = _exact_reference(terms, correction_forward=True)[0], _exact_reference(terms)[0]
    assert torch.allclose(on.detach(), ref_on, rtol=1e-4), (float(on), float(ref_on))
    assert torch.allclose(off.detach(), ref_off, rtol=1e-4)
    assert abs(ref_on - ref_off) > 1e-3 * ref_off  # the switch matters here, 10x beyond the tolerance


def _sampled_reference(terms, correction_forward: bool = True) -> torch.Tensor:
    """The public code's loss by its definition: Bernoulli forward KL on every committed token y
    (k <= r, and the correction k = r+1), k3 on every rejected draft d_k (k > r) weighted 0.8^(k-1),
    each clamped to +-10, (sum f + sum w g) / (N_f + sum w)."""
    fwd, rev, w = [], [], []
    for k, r, lq, lp, y, d in terms:
        if k <= r or (correction_forward and k == r + 1):
            fwd.append(_bernoulli_reference(lp[y], lq[y], -10.0).clamp(-10, 10))
        if k > r:
            log_ratio = lp[d] - lq[d]
            rev.append((log_ratio.exp() - log_ratio - 1).clamp(-10, 10))
            w.append(0.8 ** (k - 1))
    w = torch.tensor(w)
    return (torch.stack(fwd).sum() + (torch.stack(rev) * w).sum()) / (len(fwd) + w.sum())


def test_sampled_step_equals_the_public_code_loss_by_a_loop():
    target, draft, seqs, walks, batch = _opd_case(PAST_END)
    terms = _reference_terms(draft, target, seqs, walks)
    loss, stats = _opd_step(draft, target, loss="sampled")(batch, torch.Generator().manual_seed(0))
    ref = _sampled_reference(terms)
    assert torch.allclose(loss.detach(), ref, rtol=1e-4), (float(loss), float(ref))
    assert stats.scalars["rejected_tokens"] == sum(1 for k, r, *_ in terms if k > r)
    off, _ = _opd_step(draft, target, loss="sampled", correction_forward=False)(batch, torch.Generator())
    assert torch.allclose(off.detach(), _sampled_reference(terms, correction_forward=False), rtol=1e-4)
    assert abs(ref - off.detach()) > 1e-3 * ref


def test_rejected_offsets_past_the_end_of_the_text_are_not_scored():
    """After the last committed token (EOS or a length cut) there is nothing to verify: those
    drafts are dropped (as the public code does), whatever the padding holds."""
    target, draft, seqs, walks, batch = _opd_case(PAST_END)
    B = draft.block_size
    inside = sum(1 for s, walk in zip(seqs, walks) for a, r in walk for k in range(r + 1, B) if a + k < len(s.ids))
    assert inside < sum(B - 1 - r for walk in walks for _, r in walk)  # this case drafts past both ends
    terms = _reference_terms(draft, target, seqs, walks)
    exact, _ = _opd_step(draft, target)(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(exact.detach(), _exact_reference(terms)[0], rtol=1e-4)
    short = int(batch.lengths.argmin())
    for loss in ("exact", "sampled"):
        value, stats = _opd_step(draft, target, loss=loss)(batch, torch.Generator().manual_seed(0))
        assert stats.scalars["rejected_tokens"] == inside
        batch.input_ids[short, batch.lengths[short]:] = 151  # other padding: the same loss
        again, _ = _opd_step(draft, target, loss=loss)(batch, torch.Generator().manual_seed(0))
        batch.input_ids[short, batch.lengths[short]:] = 0
        assert torch.equal(value, again), loss


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


def test_shuffled_segments_lay_the_segments_at_random_without_overlap():
    from draftopd.training.anchors import shuffled_segments

    segments, first, last = [3, 1, 2, 2, 1], 10, 22  # 9 tokens over positions 11..22: 3 spare
    layouts = set()
    for seed in range(20):
        anchors, lens = shuffled_segments(segments, first, last, torch.Generator().manual_seed(seed))
        assert sorted(lens) == sorted(segments)
        covered = [p for a, n in zip(anchors, lens) for p in range(a + 1, a + n + 1)]
        assert len(covered) == len(set(covered)) == 9 and min(covered) > first and max(covered) <= last
        layouts.add(tuple(anchors))
    assert len(layouts) > 10
    anchors, lens = shuffled_segments([2, 3], 4, 9, torch.Generator().manual_seed(0))  # no spare: a tiling
    assert anchors == [4, 4 + lens[0]]


def test_random_anchor_ablation_moves_only_the_forward_stream():
    """random_anchors (the public code's): the forward segments go to random anchors, the rejected
    stream keeps the on-policy anchors, so it scores exactly what the on-policy step scores.
    random_anchors_all draws every block at random, the rejected stream included."""
    target, draft, seqs, walks, batch = _opd_case(PAST_END)
    B = draft.block_size
    for loss, c in (("exact", 0), ("sampled", 1)):
        step = _opd_step(draft, target, loss=loss, ablation="random_anchors")
        for s, walk in zip(seqs, walks):  # the plan: forward segments reshuffled, rejected blocks = the walk
            P, L = s.prompt_len, len(s.ids)
            a, r, st = step._plan([x for x, _ in walk], [x for _, x in walk], P, L, torch.Generator())
            fwd = [(x, n) for x, n, k in zip(a, r, st) if k == 1]
            assert [(x, n) for x, n, k in zip(a, r, st) if k == 2] == walk
            segments = [min(x + c, B - 1, L - 1 - y) for y, x in walk]
            assert sorted(n for _, n in fwd) == sorted(n for n in segments if n > 0)
            covered = [p for x, n in fwd for p in range(x + 1, x + n + 1)]
            assert len(covered) == len(set(covered)) and P < min(covered) and max(covered) < L
        on, s_on = _opd_step(draft, target, loss=loss)(batch, torch.Generator().manual_seed(0))
        rnd, s_rnd = step(batch, torch.Generator().manual_seed(0))
        assert s_rnd.scalars["loss_rej"] == pytest.approx(s_on.scalars["loss_rej"], rel=1e-5)
        assert s_rnd.scalars["rejected_tokens"] == s_on.scalars["rejected_tokens"]
        assert s_rnd.scalars["tau_walk"] == s_on.scalars["tau_walk"]
        assert abs(s_rnd.scalars["loss_acc"] / s_on.scalars["loss_acc"] - 1) > 1e-3
    _, s_all = _opd_step(draft, target, ablation="random_anchors_all")(batch, torch.Generator().manual_seed(0))
    assert abs(s_all.scalars["loss_rej"] / s_on.scalars["loss_rej"] - 1) > 1e-3


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


def test_direction_ablations_need_the_exact_loss_without_correction_forward():
    from draftopd.training.config import load_config

    base = {"method": "opd", "draft": {"init": "x"}, "data": {"rollouts": "x"}}
    for bad in (["opd.ablation=all_forward", "opd.loss=sampled"],
                ["opd.ablation=all_reverse", "opd.correction_forward=true"]):
        with pytest.raises(DraftOPDError, match="ablation"):
            load_config(None, bad, base=base)
    assert load_config(None, ["opd.correction_forward=true"], base=base).opd.correction_forward is True
