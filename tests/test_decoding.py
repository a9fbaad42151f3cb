"""spec_generate is lossless: greedy equals target.generate token for token; sampling matches p."""

import pytest
import torch

from helpers import tiny_drafter, tiny_target
from draftopd.decoding.sampling import sampling_probs
from draftopd.decoding.speculative import VerifyCosts, spec_generate
from draftopd.errors import DraftOPDError
from draftopd.model.drafter import DFlashDraftModel


def greedy_reference(target, ids, n, eos=None):
    out = target.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=eos, **({} if eos is not None else {"min_new_tokens": n}))
    return out


@pytest.mark.parametrize("block_size", [2, 4, 16])
@pytest.mark.parametrize("max_new", [1, 7, 33])
def test_greedy_equals_target_generate(tiny_pair, block_size, max_new):
    target, draft = tiny_pair
    for seed in range(3):
        ids = torch.randint(1, 150, (1, 5 + seed * 4), generator=torch.Generator().manual_seed(seed))
        res = spec_generate(draft, target, ids, max_new, block_size=block_size)
        ref = greedy_reference(target, ids, max_new)
        assert res.output_ids.tolist() == ref.tolist()
        assert res.num_output_tokens == max_new
        assert sum(res.acceptance_lengths) == max_new - 1  # first token comes from the prefill
        assert all(1 <= a <= block_size for a in res.acceptance_lengths)


class OracleDrafter(DFlashDraftModel):
    """Proposes the target's own greedy continuation: every draft must be accepted."""

    def forward(self, *args, block_positions, **kw):
        self._positions = block_positions[0]
        return super().forward(*args, block_positions=block_positions, **kw)

    def compute_logits(self, hidden, head):
        logits = torch.full((hidden.shape[0], self.config.vocab_size), -1e4)
        logits[torch.arange(hidden.shape[0]), self.greedy[self._positions[1 : hidden.shape[0] + 1]]] = 0.0
        return logits


def test_oracle_drafter_reaches_block_size_and_random_is_near_one():
    target = tiny_target("qwen3")
    draft = tiny_drafter(target, block_size=4)
    ids = torch.randint(1, 150, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = greedy_reference(target, ids, 41)
    oracle = OracleDrafter(draft.config)
    oracle.load_state_dict(draft.state_dict())
    oracle.greedy = torch.cat([ref[0], torch.zeros(8, dtype=torch.long)])
    res = spec_generate(oracle.eval(), target, ids, 41)
    assert res.output_ids.tolist() == ref.tolist()
    assert res.acceptance_lengths == [4] * 10
    rand = spec_generate(draft, target, ids, 41)
    assert rand.tau < 1.2


def test_stop_token_mid_block_and_length_cut(tiny_pair):
    target, draft = tiny_pair
    ids = torch.randint(1, 150, (1, 6), generator=torch.Generator().manual_seed(5))
    full = greedy_reference(target, ids, 30)[0, 6:].tolist()
    stop = full[9]  # lands inside a block (blocks commit 1..4 tokens)
    first = full.index(stop)
    res = spec_generate(draft, target, ids, 30, stop_token_ids=[stop], block_size=4)
    assert res.output_ids[0, 6:].tolist() == full[: first + 1]
    ref = greedy_reference(target, ids, 30, eos=stop)
    assert res.output_ids.tolist() == ref.tolist()


def test_generated_mask_token_is_kept():
    target = tiny_target("llama")
    ids = torch.randint(1, 150, (1, 6), generator=torch.Generator().manual_seed(7))
    ref = greedy_reference(target, ids, 20)
    mask_id = int(ref[0, 10])  # a token the target does generate
    draft = tiny_drafter(target, block_size=4, mask_token_id=mask_id)
    res = spec_generate(draft, target, ids, 20)
    assert res.output_ids.tolist() == ref.tolist()
    assert (res.output_ids[0, 6:] == mask_id).any()


@pytest.mark.parametrize("draft_vocab", ["all", "partial"])
def test_sampling_first_tokens_follow_target_distribution(draft_vocab):
    """Empirical joint distribution of the first two sampled tokens vs the exact target one.

    Only a correct acceptance rule gives p: accepting every draft would give the drafter's q.
    With a draft vocabulary (in reverse order, lacking one token the target may say second) q
    has no mass there: mapping rows to tokens or q back to the whole vocabulary wrongly would
    show, and the missing token must come from the residual.
    """
    torch.manual_seed(0)
    target = tiny_target("qwen3", seed=2)
    u = torch.randn(target.config.hidden_size, generator=torch.Generator().manual_seed(9))
    head = target.get_output_embeddings().weight.data
    head[5], head[6] = 2 * u / u.norm(), -2 * u / u.norm()  # target and drafter both favour 5 or 6: q overlaps p
    draft = tiny_drafter(target, block_size=4, seed=4)
    ids = torch.tensor([[3, 17, 42]])
    T, top_k = 1.0, 3
    with torch.no_grad():
        p1 = sampling_probs(target(ids).logits[0, -1], T, top_k=top_k)
        firsts = p1.nonzero()[:, 0].tolist()
        exact = {}
        for a in firsts:
            p2 = sampling_probs(target(torch.cat([ids, torch.tensor([[a]])], 1)).logits[0, -1], T, top_k=top_k)
            for b in p2.nonzero()[:, 0].tolist():
                exact[(a, b)] = float(p1[a] * p2[b])
    if draft_vocab == "partial":
        missing = max(exact, key=exact.get)[1]
        draft.set_draft_vocab([t for t in reversed(range(target.config.vocab_size)) if t != missing])
    g = torch.Generator().manual_seed(0)
    n, counts = 1500, {}
    for _ in range(n):  # token 2 comes from the verify step: accepted draft or residual sample
        res = spec_generate(draft, target, ids, 2, temperature=T, top_k=top_k, generator=g)
        key = tuple(res.output_ids[0, 3:5].tolist())
        counts[key] = counts.get(key, 0) + 1
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0)) for k in set(exact) | set(counts))
    assert set(counts) <= set(exact)
    assert tv < 0.06, tv  # sampling noise at n=1500 over <= 9 cells is ~0.03


def test_verify_size_weighs_expected_tokens_against_this_machines_costs():
    flat = VerifyCosts(draft=0.002, verify=[0.030, 0.030, 0.031, 0.031])  # a bf16 CPU or a GPU: width is ~free
    steep = VerifyCosts(draft=0.006, verify=[0.041, 0.068, 0.083, 0.064])  # AVX2 fp32 (measured, B = 4)
    assert flat.verify_size([0.3, 0.3, 0.3]) == 4  # even doubtful drafts are worth verifying
    assert flat.verify_size([0.0, 0.0, 0.0]) == 1
    assert steep.verify_size([0.05, 0.05, 0.05]) == 1
    assert steep.verify_size([0.95, 0.9, 0.9]) == 4
    assert steep.verify_size([0.95, 0.1, 0.1]) == 4  # 2.05 tokens expected for 1.5x the time of one
    assert steep.verify_size([0.3, 0.1, 0.1]) == 1  # 1.33 tokens expected: not worth 1.5x
    sizes = [steep.verify_size([c] * 3) for c in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 4
    assert steep.verify_size([0.9]) in (1, 2)  # never more than the drafts there are, plus the anchor


class SwingingDrafter(DFlashDraftModel):
    """Alternately very sure and very unsure of its drafts, so an adaptive verify varies its width."""

    calls = 0

    def compute_logits(self, hidden, head):
        SwingingDrafter.calls += 1
        return super().compute_logits(hidden, head) * (100.0 if SwingingDrafter.calls % 2 else 0.01)


def test_costs_are_timed_with_the_threads_decoding_uses():
    """torch's Timer runs on one thread unless told: costs measured so misjudged a 2-thread step by 30%."""
    from draftopd.decoding.costs import median_seconds

    seen, before = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        median_seconds(lambda: seen.append(torch.get_num_threads()), 0.01)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}


@pytest.mark.parametrize("tiny_pair", ["llama"], indirect=True)
def test_adaptive_verify_stays_lossless(tiny_pair):
    target, draft = tiny_pair
    swinging = SwingingDrafter(draft.config)
    swinging.load_state_dict(draft.state_dict())
    costs = VerifyCosts(draft=0.0, verify=[1.0, 1.3, 1.5, 1.7])
    for seed in range(3):
        ids = torch.randint(1, 150, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        res = spec_generate(swinging.eval(), target, ids, 33, verify_costs=costs)
        assert res.output_ids.tolist() == greedy_reference(target, ids, 33).tolist()
        assert {1, 4} <= set(res.verify_sizes)
        assert all(a <= s for a, s in zip(res.acceptance_lengths, res.verify_sizes))
        assert res.rest_steps > 0  # after each unsure draft the drafter sits out a step
    full = spec_generate(swinging.eval(), target, ids, 33)
    assert full.verify_sizes[0] == 4 and full.verify_sizes == sorted(full.verify_sizes, reverse=True)  # narrower only at the length cut
    assert full.output_ids.tolist() == res.output_ids.tolist() and full.rest_steps == 0


def test_rest_doubles_while_drafts_do_not_pay_and_ends_when_one_does():
    rests, rest = [], 0
    for size in (1, 1, 1, 1, 1, 3, 1):
        rest = VerifyCosts.rest_after(size, rest)
        rests.append(rest)
    assert rests == [1, 2, 4, 8, 8, 0, 1]


class DoubtfulDrafter(DFlashDraftModel):
    """Never sure of its drafts (so it rests ever longer), and records what context each pass gets."""

    def forward(self, block_embeds, context, *, block_positions, context_positions, cache, **kw):
        self.seen.append((cache.length, context_positions[0].tolist(), int(block_positions[0, 0])))
        return super().forward(block_embeds, context, block_positions=block_positions,
                               context_positions=context_positions, cache=cache, **kw)

    def compute_logits(self, hidden, head):
        return super().compute_logits(hidden, head) * 0.01


@pytest.mark.parametrize("tiny_pair", ["llama"], indirect=True)
def test_a_resting_drafter_gets_every_committed_rows_features_when_it_drafts_again(tiny_pair):
    target, draft = tiny_pair
    doubtful = DoubtfulDrafter(draft.config)
    doubtful.load_state_dict(draft.state_dict())
    doubtful.seen = []
    ids = torch.randint(1, 150, (1, 6), generator=torch.Generator().manual_seed(0))
    res = spec_generate(doubtful.eval(), target, ids, 40, verify_costs=VerifyCosts(0.0, [1.0, 1.3, 1.5, 1.7]))
    assert res.output_ids.tolist() == greedy_reference(target, ids, 40).tolist()
    drafted = len(res.verify_sizes) - res.rest_steps
    assert len(doubtful.seen) == drafted and res.rest_steps > 2 * drafted  # rests of 1, 2, 4, 8, ...
    for cached, rows, anchor in doubtful.seen:  # each pass gets exactly the rows since its last one
        assert rows == list(range(cached, anchor))


def test_bad_input_errors(tiny_pair):
    target, draft = tiny_pair
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(DraftOPDError, match="max_new_tokens must be positive"):
        spec_generate(draft, target, ids, 0)
    other = tiny_target("qwen3")
    bad_vocab = tiny_drafter(other)
    bad_vocab.config.vocab_size = 999
    with pytest.raises(DraftOPDError, match="vocab_size 999"):
        spec_generate(bad_vocab, target, ids, 4)
    bad_layers = tiny_drafter(other)
    bad_layers.target_layer_ids = [1, 7]
    with pytest.raises(DraftOPDError, match=r"target_layer_ids \[1, 7\] out of range"):
        spec_generate(bad_layers, target, ids, 4)
    bad_hidden = tiny_drafter(other)
    bad_hidden.config.hidden_size = 32
    with pytest.raises(DraftOPDError, match="hidden_size 32"):
        spec_generate(bad_hidden, target, ids, 4)


def test_greedy_accept_rows_asks_only_up_to_the_first_rejection():
    from draftopd.decoding.sampling import greedy_accept, greedy_accept_rows

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(0, 12, (1,), generator=g))
        target = torch.randint(0, 3, (k + 1,), generator=g)
        drafts = torch.where(torch.rand(k, generator=g) < 0.8, target[:k], torch.randint(0, 3, (k,), generator=g))
        asked = []

        def rows(s, e):
            asked.append((s, e))
            return target[s:e]

        r, nxt = greedy_accept_rows(drafts, rows, 4)
        assert (r, nxt) == greedy_accept(drafts, target)
        assert asked[-1][0] <= r < asked[-1][1] and all(e - s <= 4 for s, e in asked)


def test_verify_scoring_rows_in_chunks_equals_scoring_all(monkeypatch):
    """The oracle accepts whole 16-token blocks: every chunk of verify rows gets scored."""
    import draftopd.dflash as dflash

    target = tiny_target("llama")
    draft = tiny_drafter(target, block_size=16)
    ids = torch.randint(1, 150, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = greedy_reference(target, ids, 50)
    oracle = OracleDrafter(draft.config)
    oracle.load_state_dict(draft.state_dict())
    oracle.greedy = torch.cat([ref[0], torch.zeros(32, dtype=torch.long)])
    chunked = spec_generate(oracle.eval(), target, ids, 50)
    monkeypatch.setattr(dflash, "VERIFY_ROWS", 10**6)  # one chunk: every row scored
    whole = spec_generate(oracle, target, ids, 50)
    assert chunked.output_ids.tolist() == whole.output_ids.tolist() == ref.tolist()
    assert chunked.acceptance_lengths == whole.acceptance_lengths == [16, 16, 16, 1]


class NegatedLogits(torch.nn.Module):
    """A target whose logits are not its LM head's (as with soft-capping or scaling): verify
    must then take the model's own logits for every row, never the head on hidden states."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, cache=None, **kw):
        out = self.inner(cache=cache, **kw)
        out.logits = -out.logits
        return out


def test_target_with_transformed_logits_stays_lossless():
    inner = tiny_target("qwen3")
    target = NegatedLogits(inner)
    ids = torch.randint(1, 150, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = ids
    for _ in range(40):  # plain greedy decoding of the negated model
        expected = torch.cat([expected, target(input_ids=expected).logits[:, -1:].argmax(-1)], dim=1)
    oracle = OracleDrafter(tiny_drafter(inner, block_size=16).config)
    oracle.greedy = torch.cat([expected[0], torch.zeros(32, dtype=torch.long)])
    res = spec_generate(oracle.eval(), target, ids, 40)  # whole blocks accepted: rows past the first chunk
    assert res.output_ids.tolist() == expected.tolist()
    assert res.acceptance_lengths == [16, 16, 7]
