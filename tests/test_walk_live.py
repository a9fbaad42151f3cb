"""The on-policy walk over a live greedy decode's own output reproduces that decode's acceptance
lengths exactly, on tiny random models, including a length cut and a stop token mid-block."""

import torch

from helpers import tiny_drafter, tiny_target
from draftopd.decoding.speculative import spec_generate
from draftopd.training.onpolicy import offline_walks, text_features
from draftopd.training.batches import Sequence


def _pair():
    """Tiny target and drafter whose greedy tokens are mostly 5 or 6: the LM head scores 5 and 6 by
    +-3 u.h for a fixed direction u, so a draft matches the target when the drafter's final state
    falls on the same side of u as the target's. Acceptance then depends on the drafter's real
    computation, not on a forced choice (this u: steps of 1, 3 and 4 = B tokens)."""
    target = tiny_target("qwen3")
    u = torch.randn(target.config.hidden_size, generator=torch.Generator().manual_seed(9))
    head = target.get_output_embeddings().weight.data
    head[5], head[6] = 3 * u / u.norm(), -3 * u / u.norm()
    return target, tiny_drafter(target)


def _assert_walk_equals_live(draft, target, prompt, res):
    P = prompt.shape[1]
    seq = Sequence(0, res.output_ids[0], P)
    walk = offline_walks(draft, target, [seq])[0]
    assert walk.lengths == res.acceptance_lengths
    assert walk.accepted == res.accepted_drafts  # what live-mode OPD trains on, cut steps included
    cached = offline_walks(draft, target, [seq], features=text_features(target, [seq], draft.target_layer_ids))[0]
    assert (cached.anchors, cached.lengths) == (walk.anchors, walk.lengths)
    assert walk.anchors == [P + sum(res.acceptance_lengths[:i]) for i in range(len(res.acceptance_lengths))]


def test_walk_equals_live_decoding_with_cuts_and_stops_mid_block():
    target, draft = _pair()
    B = draft.block_size
    g = torch.Generator().manual_seed(0)
    cut_mid_block = stop_mid_block = 0
    seen = set()
    for _ in range(4):
        prompt = torch.randint(20, 150, (1, 6), generator=g)
        free = spec_generate(draft, target, prompt, 24)
        _assert_walk_equals_live(draft, target, prompt, free)
        lens = free.acceptance_lengths
        seen |= set(lens)
        # a length cut inside a step that committed >= 2 tokens: it keeps all but its last
        for s in [i for i, n in enumerate(lens) if n >= 2][:2]:
            cut = spec_generate(draft, target, prompt, 1 + sum(lens[:s]) + lens[s] - 1)
            _assert_walk_equals_live(draft, target, prompt, cut)
            assert cut.acceptance_lengths == lens[:s] + [lens[s] - 1]
            cut_mid_block += 1
        # a stop token that is an accepted draft with more committed tokens after it in its step
        for stop in (5, 6):
            stopped = spec_generate(draft, target, prompt, 24, stop_token_ids=[stop])
            _assert_walk_equals_live(draft, target, prompt, stopped)
            n = len(stopped.acceptance_lengths)
            if n and stopped.acceptance_lengths[-1] < lens[n - 1]:  # its step was cut at the stop
                assert stopped.output_ids[0, -1] == stop
                stop_mid_block += 1
    # rejections, partial and full acceptance (a bonus token) all occurred, and both kinds of cut
    assert {1, B} <= seen and seen & set(range(2, B)) and cut_mid_block >= 2 and stop_mid_block >= 1, \
        (seen, cut_mid_block, stop_mid_block)


def test_walk_equals_live_decoding_with_a_draft_vocabulary():
    """A drafter that may not propose token 6 (one of the two the target mostly says; the rest in
    reverse order, so rows are not token ids): decoding stays lossless, its acceptance changes, and
    the walk drafts from the same vocabulary."""
    target, draft = _pair()
    g = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(3):
        prompt = torch.randint(20, 150, (1, 6), generator=g)
        draft.set_draft_vocab(None)
        full = spec_generate(draft, target, prompt, 24)
        draft.set_draft_vocab([t for t in reversed(range(target.config.vocab_size)) if t != 6])
        restricted = spec_generate(draft, target, prompt, 24)
        assert restricted.output_ids.tolist() == full.output_ids.tolist()
        _assert_walk_equals_live(draft, target, prompt, restricted)
        changed += restricted.acceptance_lengths != full.acceptance_lengths
    assert changed >= 1
