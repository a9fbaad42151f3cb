"""Reference-format checkpoints: exact keys and fields, round trip, trust_remote_code, errors."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

from conftest import tiny_drafter, tiny_target
from draftopd.decoding.speculative import spec_generate
from draftopd.errors import DraftOPDError
from draftopd.model.checkpoint import build_config, load_drafter, save_drafter
from draftopd.model.drafter import default_target_layer_ids


def reference_keys(num_layers):
    keys = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    for i in range(num_layers):
        keys |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"layers.{i}.self_attn.{p}_norm.weight" for p in "qk"}
        keys |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {f"layers.{i}.{p}_layernorm.weight" for p in ("input", "post_attention")}
    return keys


def test_saved_directory_has_reference_layout(tmp_path):
    target = tiny_target("qwen3")
    draft = tiny_drafter(target, num_layers=3)
    out = save_drafter(draft, tmp_path / "d")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dflash.py", "model.safetensors"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == reference_keys(3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["auto_map"] == {"AutoModel": "dflash.DFlashDraftModel"}
    assert cfg["model_type"] == "qwen3"
    assert cfg["block_size"] == 4 and cfg["num_target_layers"] == 4 and cfg["num_hidden_layers"] == 3
    assert cfg["dflash_config"] == {"mask_token_id": 159, "target_layer_ids": [1, 1, 1]}
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                  "rms_norm_eps", "vocab_size", "rope_parameters"):
        assert field in cfg


def test_round_trip_and_trust_remote_code_give_identical_outputs(tmp_path):
    target = tiny_target("llama")
    draft = tiny_drafter(target, block_size=4)
    ids = torch.tensor([[5, 9, 33, 2, 7]])
    before = spec_generate(draft, target, ids, 24)
    path = save_drafter(draft, tmp_path / "d")
    again = load_drafter(path)
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), again.state_dict().values()))
    assert spec_generate(again, target, ids, 24).output_ids.tolist() == before.output_ids.tolist()
    remote = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules")
    out = remote.spec_generate(target=target, input_ids=ids, max_new_tokens=24, stop_token_ids=None, temperature=0.0)
    assert out.tolist() == before.output_ids.tolist()


def test_default_layer_ids_match_published_checkpoints():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-4B-DFlash-b16
    assert default_target_layer_ids(30, 1) == [15]


def test_bad_drafter_directories(tmp_path):
    with pytest.raises(DraftOPDError, match="no such directory"):
        load_drafter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DraftOPDError, match="not a drafter directory"):
        load_drafter(tmp_path / "empty")
    d = save_drafter(tiny_drafter(tiny_target("qwen3")), tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["dflash_config"]["mask_token_id"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftOPDError, match="missing dflash_config.mask_token_id"):
        load_drafter(d)
    with pytest.raises(DraftOPDError, match=r"target_layer_ids \[9\] out of range"):
        build_config(tiny_target("qwen3").config, num_layers=1, target_layer_ids=[9], mask_token_id=1)
