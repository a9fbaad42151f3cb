"""Masks, labels, anchors, weights and the batched replay, on small tensors."""

import torch

from helpers import tiny_drafter, tiny_target
from draftopd.training.anchors import accepted_prefix, onpolicy_walk, random_anchors
from draftopd.training.blocks import block_inputs, block_labels, block_sparse_mask, replay
from draftopd.training.losses import implied_tau, offset_weights, weighted_ce
from draftopd.training.target_pass import target_states


def test_block_sparse_mask_rule():
    anchors = torch.tensor([[2, 4]])
    m = block_sparse_mask(anchors, seq_len=6, block_size=3)[0, 0]  # [6, 6 + 6]
    assert m.shape == (6, 12)
    # block 0 (rows 0..2) sees context 0,1 and its own block (cols 6..8)
    assert m[0].tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    # block 1 (rows 3..5) sees context 0..3 and cols 9..11
    assert m[5].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]


def test_block_inputs_and_same_position_labels():
    ids = torch.tensor([[10, 11, 12, 13, 14, 0]])
    anchors = torch.tensor([[1, 3]])
    assert block_inputs(ids, anchors, 3, 99).tolist() == [[[11, 99, 99], [13, 99, 99]]]
    labels = block_labels(ids, anchors, 3, lengths=torch.tensor([5]))
    assert labels.tolist() == [[[-100, 12, 13], [-100, 14, -100]]]  # position 5 is padding


def test_offset_weights():
    w = offset_weights(16, 7.0)
    assert w.shape == (15,) and w[0] == 1 and torch.isclose(w[7], torch.exp(torch.tensor(-1.0)))
    assert torch.allclose(offset_weights(4, 0.8, "pow"), torch.tensor([1, 0.8, 0.64]))


def test_random_anchors_range_and_padding():
    g = torch.Generator().manual_seed(0)
    anchors, valid = random_anchors(torch.tensor([3, 5]), torch.tensor([10, 8]), num=5, generator=g)
    assert anchors.shape == (2, 5)
    a0 = anchors[0][valid[0]]
    assert valid[0].sum() == 5 and a0.min() >= 3 and a0.max() <= 8 and (a0.diff() > 0).all()
    assert valid[1].sum() == 2 and set(anchors[1][valid[1]].tolist()) == {5, 6}


def test_accepted_prefix_and_walk():
    drafts = torch.tensor([[1, 2, 3], [1, 9, 3], [7, 7, 7]])
    labels = torch.tensor([[1, 2, 3], [1, 2, 3], [1, -100, -100]])
    assert accepted_prefix(drafts, labels).tolist() == [3, 1, 0]
    # r at anchors 5..9; text ends at 10: a=5 r=2 -> 8 (r=0) -> 9 (r=3, capped to 1)
    anchors, lengths = onpolicy_walk([2, 0, 0, 0, 3], first=5, last=10)
    assert anchors == [5, 8, 9] and lengths == [3, 1, 1]


def test_implied_tau():
    assert implied_tau([1.0, 1.0, 1.0]) == 4.0
    assert abs(implied_tau([0.5, 0.5]) - 1.75) < 1e-9


def test_weighted_ce_matches_dense_and_chunks():
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    W = torch.randn(20, 8)
    labels = torch.tensor([1, 2, -100, 4, 5, 6, 7, 8, 9, -100])
    w = torch.rand(10)
    loss, preds = weighted_ce(h, W, labels, w, chunk=3)
    keep = labels >= 0
    dense = torch.nn.functional.cross_entropy(h @ W.T, labels.clamp(min=0), reduction="none")
    ref = (dense * w * keep).sum() / w[keep].sum()
    assert torch.allclose(loss, ref, atol=1e-6)
    (g1,) = torch.autograd.grad(loss, h)
    (g2,) = torch.autograd.grad(ref, h)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert preds.tolist() == (h @ W.T).argmax(-1).tolist()


def test_replay_equals_each_block_alone_through_inference_path():
    """The batched block-sparse forward gives the logits the cached decoding path gives."""
    target = tiny_target("qwen3")
    draft = tiny_drafter(target, block_size=4)
    ids = torch.randint(1, 150, (1, 20), generator=torch.Generator().manual_seed(0))
    feats = target_states(target, ids, torch.tensor([20]), draft.target_layer_ids).features
    anchors = torch.tensor([[6, 9, 10, 15]])
    embed = target.get_input_embeddings()
    with torch.no_grad():
        batched = replay(draft, embed, feats, ids, anchors)[0]  # [m, B, H]
        for j, a in enumerate(anchors[0].tolist()):
            # context arrives in two chunks, as it does across decoding steps
            cache = draft.new_cache()
            draft(embed(ids[:, :1]), feats[:, : a - 2], block_positions=torch.tensor([[a - 2]]),
                  context_positions=torch.arange(a - 2)[None], cache=cache)
            blk = block_inputs(ids, torch.tensor([[a]]), 4, draft.mask_token_id)[0]
            alone = draft(embed(blk), feats[:, a - 2 : a], block_positions=torch.arange(a, a + 4)[None],
                          context_positions=torch.arange(a - 2, a)[None], cache=cache)[0]
            assert cache.length == a
            assert torch.allclose(batched[j], alone, atol=1e-5), j
