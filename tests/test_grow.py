"""Growing a drafter deeper: same output at first, trainable new layers, the reference format after."""

import pytest
import torch

from draftopd.decoding.speculative import spec_generate
from draftopd.errors import DraftOPDError
from draftopd.model.checkpoint import load_drafter, save_drafter
from draftopd.model.grow import grow_drafter, grown_layer_sources
from helpers import tiny_drafter, tiny_target


def block_outputs(draft, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, F = draft.config.hidden_size, draft.fc.in_features
    block, ctx = torch.randn(2, 4, H, generator=g), torch.randn(2, 7, F, generator=g)
    return draft(block, ctx, block_positions=torch.arange(7, 11).expand(2, -1),
                 context_positions=torch.arange(7).expand(2, -1))


def test_sources_spread_evenly():
    assert grown_layer_sources(2, 4) == [0, 0, 1, 1]
    assert grown_layer_sources(2, 5) == [0, 0, 0, 1, 1]
    assert grown_layer_sources(1, 3) == [0, 0, 0]


def test_grown_drafter_computes_what_it_grew_from_and_learns_through_its_new_layers(tmp_path):
    target = tiny_target("qwen3")
    draft = tiny_drafter(target, num_layers=2)
    draft.set_draft_vocab(torch.arange(0, 160, 2))
    grown = grow_drafter(draft, 4)
    assert len(grown.layers) == 4 and grown.config.num_hidden_layers == 4
    assert torch.equal(grown.draft_vocab, draft.draft_vocab)
    with torch.no_grad():
        assert torch.equal(block_outputs(grown), block_outputs(draft))
    assert torch.equal(grown.layers[1].self_attn.q_proj.weight, draft.layers[0].self_attn.q_proj.weight)
    assert not grown.layers[1].mlp.down_proj.weight.any()
    # The zeroed projections get gradients, so one step makes the new layers matter.
    block_outputs(grown.train()).square().sum().backward()
    assert grown.layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0
    assert grown.layers[3].mlp.down_proj.weight.grad.abs().sum() > 0
    # It saves and loads as any drafter does, in the reference format.
    loaded = load_drafter(save_drafter(grown, tmp_path / "grown", dtype=torch.float32))
    assert len(loaded.layers) == 4 and len(loaded.config.layer_types) == 4
    with torch.no_grad():
        assert torch.equal(block_outputs(loaded.eval()), block_outputs(draft))
    assert grow_drafter(draft, 2) is draft
    with pytest.raises(DraftOPDError, match="draft.num_layers=1 is fewer than the 2 layers"):
        grow_drafter(draft, 1)


def test_shipped_drafter_grown_decodes_the_same_on_the_real_target(smollm, one_torch_thread):
    """On SmolLM2 with the shipped drafter: grown to 4 layers, it drafts exactly what it did."""
    draft = load_drafter("smollm2-135m-dflash").float()
    grown = grow_drafter(draft, 4).eval()
    ids = torch.tensor([smollm.tokenizer.encode("The capital of France is")])
    a, b = (spec_generate(d, smollm, ids, 24) for d in (draft, grown))
    assert a.output_ids.tolist() == b.output_ids.tolist()
    assert a.acceptance_lengths == b.acceptance_lengths
