"""The shipped drafter `smollm2-135m-dflash`: the plain reference format, loadable by its alias
anywhere a drafter path goes, and lossless on the embedded target."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

import draftopd
from draftopd.data.prompts import apply_chat_template, load_prompts
from draftopd.decoding.speculative import spec_generate
from draftopd.model.checkpoint import init_drafter, load_drafter, save_drafter
from draftopd.model.target import stop_token_ids

ALIAS = "smollm2-135m-dflash"
SHIPPED = Path(draftopd.__file__).parent / "drafters" / ALIAS
REEXPORT = f"draftopd export --draft {ALIAS} --out {SHIPPED} --overwrite"  # keeps block size and token map


def tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}


def test_alias_loads_the_packaged_directory():
    by_alias, by_path = load_drafter(ALIAS), load_drafter(SHIPPED)
    assert (by_alias.block_size, len(by_alias.layers)) == (by_path.block_size, len(by_path.layers))
    assert all(torch.equal(a, b) for a, b in zip(by_alias.state_dict().values(), by_path.state_dict().values()))
    assert all(p.dtype == torch.bfloat16 for p in by_alias.parameters())


def test_files_are_what_save_drafter_writes(smollm, tmp_path):
    """Same files, tensor names, shapes and dtypes, and config fields as any drafter saved today,
    plus its draft vocabulary (token_map.pt, 4096 tokens)."""
    shipped = load_drafter(SHIPPED)
    fresh = init_drafter(smollm, num_layers=len(shipped.layers), block_size=shipped.block_size,
                         target_layer_ids=shipped.target_layer_ids)
    fresh.set_draft_vocab(shipped.draft_vocab)
    fresh = save_drafter(fresh, tmp_path / "fresh", dtype=torch.bfloat16)
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert "token_map.pt" in {p.name for p in SHIPPED.iterdir()} and len(shipped.draft_vocab) == 4096
    assert tensors(SHIPPED) == tensors(fresh)
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (SHIPPED, fresh))
    assert set(ours) == set(theirs) and ours["dflash_config"] == theirs["dflash_config"]
    assert ours["architectures"] == ["DFlashDraftModel"] and ours["dtype"] == "bfloat16"
    assert (SHIPPED / "dflash.py").read_text() == (fresh / "dflash.py").read_text(), \
        f"the shipped remote code is stale; re-export it: {REEXPORT}"
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 20 * 2**20


def test_lossless_and_accepted_on_heldout_prompts(smollm, one_torch_thread):
    """Greedy fp32 decoding with the shipped drafter equals the target alone, token for token,
    on held-out prompts of each benchmark, and its drafts do get accepted."""
    draft = load_drafter(ALIAS).float()
    tok = smollm.tokenizer
    stops = stop_token_ids(tok, smollm.model.generation_config)
    lengths, tree_lengths, branched = [], [], 0
    for prompt in load_prompts("gsm8k[1200:1201],humaneval[100:101],mt-bench[60:61]"):
        ids = torch.tensor([apply_chat_template(tok, prompt.messages)])
        res = spec_generate(draft, smollm, ids, 48, stop_token_ids=stops)
        tree = spec_generate(draft, smollm, ids, 48, stop_token_ids=stops, tree_tokens=8)
        ref = smollm.model.generate(ids, do_sample=False, max_new_tokens=48, eos_token_id=stops,
                                    pad_token_id=tok.pad_token_id)
        assert res.output_ids.tolist() == ref.tolist(), prompt.id
        assert tree.output_ids.tolist() == ref.tolist(), f"{prompt.id} (tree verify)"
        lengths += res.acceptance_lengths
        tree_lengths += tree.acceptance_lengths
        branched += tree.branch_steps
    assert sum(lengths) / len(lengths) > 1.2 and max(lengths) >= 4
    # the drafter's second and later choices do get accepted, and commit more per step than the chain
    assert branched >= 3 and sum(tree_lengths) / len(tree_lengths) > sum(lengths) / len(lengths)


def test_cli_uses_the_shipped_drafter_by_default(capsys):
    from draftopd.cli.main import main

    assert main(["generate", "--max-new-tokens", "8", "--json", "What is 2 + 3?"]) == 0
    assert len(json.loads(capsys.readouterr().out)["generated_ids"]) >= 1
