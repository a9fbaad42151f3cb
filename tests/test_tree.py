"""Tree verify: the tree is the best of its size, its mask lets each node see only its path,
acceptance follows the target's argmax, the cache keeps the accepted path, and decoding stays
the target's greedy output token for token."""

import itertools

import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_drafter, tiny_target
from draftopd.decoding.speculative import (VerifyCosts, cache_kwarg, crop_cache, draft_tree, keep_cache_rows,
                                           spec_generate, tree_accept, tree_mask)
from draftopd.decoding.verify import verify_options
from draftopd.errors import DraftOPDError
from draftopd.evaluation import verify_policies


def test_tree_nodes_come_best_first_and_every_prefix_is_the_best_tree_of_its_size():
    torch.manual_seed(0)
    K, k = 3, 4
    probs = torch.rand(K, k).softmax(-1).sort(-1, descending=True).values
    ids = torch.arange(K * k).view(K, k) + 10
    tree = draft_tree(7, probs, ids, nodes=200)  # more than there are: every path
    assert tree.tokens[0] == 7 and tree.parents[0] == -1 and len(tree) == 1 + k + k**2 + k**3
    # each node's path value, from the tokens it drafts
    values = [1.0]
    for i in range(1, len(tree)):
        d = tree.depths[i]
        rank = tree.tokens[i] - 10 - (d - 1) * k
        assert tree.depths[tree.parents[i]] == d - 1 and tree.parents[i] < i
        values.append(values[tree.parents[i]] * float(probs[d - 1, rank]))
    every_path = sorted((float(torch.tensor([probs[j, r] for j, r in enumerate(p)]).prod())
                         for d in range(1, K + 1) for p in itertools.product(range(k), repeat=d)), reverse=True)
    assert values[1:] == pytest.approx(every_path)  # best first: any prefix is the best tree of its size
    assert tree.expected == pytest.approx(list(itertools.accumulate(values)))
    assert draft_tree(7, probs, ids, nodes=5).tokens == tree.tokens[:5] == tree.prefix(5).tokens


def test_confident_drafts_make_a_chain():
    probs = torch.tensor([[0.9, 0.05], [0.9, 0.05], [0.9, 0.05]])
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    tree = draft_tree(0, probs, ids, nodes=4)
    assert tree.tokens == [0, 1, 3, 5] and tree.parents == [-1, 0, 1, 2] and tree.depths == [0, 1, 2, 3]


def test_mask_lets_each_node_see_the_context_and_its_path_only():
    parents = [-1, 0, 0, 1, 2]  # anchor; two children; a grandchild under each
    mask = tree_mask(parents, context=3, dtype=torch.float32, device="cpu")[0, 0]
    seen = (mask == 0).int().tolist()
    assert seen == [[1, 1, 1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 1, 0, 0],
                    [1, 1, 1, 1, 1, 0, 1, 0],
                    [1, 1, 1, 1, 0, 1, 0, 1]]
    assert mask.min() == torch.finfo(torch.float32).min  # additive: eager attention would ignore a boolean


def test_accept_follows_the_targets_choice_down_the_tree():
    tokens = [9, 5, 6, 7, 8]
    parents = [-1, 0, 0, 1, 2]
    # the target picks 6 after the anchor (second child), then 8 under it, then 3
    assert tree_accept(tokens, parents, [6, 0, 8, 0, 3]) == ([0, 2, 4], 3)
    # 7 follows node 1 only: under node 2 the target's 7 is no child, so the step ends there
    assert tree_accept(tokens, parents, [6, 7, 7, 0, 0]) == ([0, 2], 7)
    assert tree_accept(tokens, parents, [4, 0, 0, 0, 0]) == ([0], 4)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_each_node_is_scored_as_its_path_alone_and_the_cache_keeps_the_accepted_path(kind):
    target = tiny_target(kind)
    ids = torch.randint(1, 150, (1, 9), generator=torch.Generator().manual_seed(0))
    tokens, parents, depths = [ids[0, -1].item(), 11, 12, 13, 14, 15], [-1, 0, 0, 1, 2, 4], [0, 1, 1, 2, 2, 3]
    ctx = ids[:, :-1]
    kw, cache = cache_kwarg(target), DynamicCache(config=target.config)
    target(input_ids=ctx, **{kw: cache}, use_cache=True)
    n = ctx.shape[1]
    out = target(input_ids=torch.tensor([tokens]), position_ids=n + torch.tensor([depths]),
                 attention_mask=tree_mask(parents, n, torch.float32, "cpu"), **{kw: cache}, use_cache=True)
    path = [0, 2, 4, 5]
    alone = target(input_ids=torch.cat([ctx, torch.tensor([[tokens[i] for i in path]])], 1))
    torch.testing.assert_close(out.logits[0, path], alone.logits[0, n:], atol=1e-5, rtol=1e-5)
    keep_cache_rows(cache, n, path)
    crop_cache(cache, n + len(path))
    fresh = DynamicCache(config=target.config)
    target(input_ids=torch.cat([ctx, torch.tensor([[tokens[i] for i in path]])], 1), **{kw: fresh}, use_cache=True)
    for a, b in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def greedy(target, ids, n, eos=None):
    return target.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos,
                           **({} if eos is not None else {"min_new_tokens": n}))


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("tree_tokens", [1, 5, 16])
def test_tree_decoding_equals_target_greedy(kind, tree_tokens):
    target = tiny_target(kind)
    draft = tiny_drafter(target, block_size=4)
    branched = 0
    for seed in range(4):
        ids = torch.randint(1, 150, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        res = spec_generate(draft, target, ids, 40, tree_tokens=tree_tokens)
        assert res.output_ids.tolist() == greedy(target, ids, 40).tolist()
        assert all(1 <= a <= 4 for a in res.acceptance_lengths)
        assert all(s <= tree_tokens for s in res.verify_sizes)
        branched += res.branch_steps
    if tree_tokens == 16:  # a 160-token vocabulary: the random drafter's later choices do hit
        assert branched > 0


def test_tree_with_costs_stays_lossless_and_cuts_the_tree(tiny_pair):
    target, draft = tiny_pair
    steep = VerifyCosts(draft=0.0, verify=[1.0, 1.2, 1.5, 1.9, 2.4, 3.0, 3.7, 4.5])
    for seed in range(3):
        ids = torch.randint(1, 150, (1, 7), generator=torch.Generator().manual_seed(seed))
        full = greedy(target, ids, 30)[0, 7:].tolist()
        fresh = [t for i, t in enumerate(full) if i >= 3 and full.index(t) == i]  # first generated mid-way
        stop = fresh[0] if fresh else None  # (a tiny random target may only repeat itself)
        res = spec_generate(draft, target, ids, 30, tree_tokens=8, verify_costs=steep,
                            stop_token_ids=None if stop is None else [stop])
        assert res.output_ids.tolist() == greedy(target, ids, 30, eos=stop).tolist()
        assert max(res.verify_sizes) < 8  # a random drafter's wide trees never pay at these costs


def test_best_size_weighs_expected_tokens_against_costs():
    costs = VerifyCosts(draft=0.5, verify=[1.0, 1.0, 1.0, 1.5, 1.5])
    assert costs.best_size([1.0, 1.6, 1.9, 2.0, 2.1]) == 3  # nearly free up to 3 tokens, then dearer
    assert VerifyCosts(draft=0.5, verify=[1.0, 1.2]).best_size([1.0, 1.01]) == 1  # not worth 13% more
    assert costs.best_size([1.0, 1.6, 1.9, 2.0, 2.1, 9.0]) == 3  # sizes without a measured cost are not chosen
    chain = [0.9, 0.5, 0.1]
    assert costs.verify_size(chain) == costs.best_size([1.0, 1.9, 1.9 + 0.45, 1.9 + 0.45 + 0.045])


def test_tree_refuses_sampling_and_attention_that_ignores_its_mask(tiny_pair):
    target, draft = tiny_pair
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(DraftOPDError, match="greedy-only"):
        spec_generate(draft, target, ids, 4, tree_tokens=8, temperature=0.7)
    with pytest.raises(DraftOPDError, match="tree_tokens must be >= 1"):
        spec_generate(draft, target, ids, 4, tree_tokens=0)
    with pytest.raises(DraftOPDError, match="greedy-only"):
        verify_options("tree", target, draft, temperature=0.7)
    impl = target.config._attn_implementation
    target.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(DraftOPDError, match="attn_implementation='flash_attention_2' ignores"):
            spec_generate(draft, target, ids, 4, tree_tokens=8)
    finally:
        target.config._attn_implementation = impl


def test_verify_policies_parse():
    assert verify_policies("tree") == ["tree"]
    assert verify_policies("full,tree") == ["full", "tree"]
    assert verify_policies("both") == ["full", "adaptive"]
    for bad in ("fast", "full,full", "full,", ""):
        with pytest.raises(DraftOPDError, match="expected one of full, adaptive, tree"):
            verify_policies(bad)


def test_sliding_window_targets_are_refused_in_one_line_and_decode_alone():
    """A sliding-window cache keeps only the last positions: a rejected draft cannot be rolled back
    (transformers raised from deep inside `crop`), and a tree mask would see past the window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    target = MistralForCausalLM(MistralConfig(sliding_window=16, num_hidden_layers=4, hidden_size=64,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              intermediate_size=128, vocab_size=160, pad_token_id=0)).eval()
    draft = tiny_drafter(target)
    ids = torch.randint(1, 150, (1, 8), generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"tree_tokens": 8}):
        with pytest.raises(DraftOPDError, match=r"mistral attends through a sliding window \(sliding_window=16\)"):
            spec_generate(draft, target, ids, 40, **kw)
    alone = spec_generate(draft, target, ids, 40, block_size=1)
    assert alone.output_ids.tolist() == greedy(target, ids, 40).tolist()
