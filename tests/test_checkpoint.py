"""Reference-format checkpoints: exact keys and fields, round trip, trust_remote_code, errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

from helpers import TINY, tiny_drafter, tiny_target, without_dtype_notice
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
    assert remote.draft_vocab is None


def test_trust_remote_code_attaches_the_token_map(tmp_path):
    target = tiny_target("llama")
    draft = tiny_drafter(target, block_size=4)
    draft.set_draft_vocab(torch.arange(40, 0, -1))  # reordered: row i is not token i
    ids = torch.tensor([[5, 9, 33, 2, 7]])
    before = spec_generate(draft, target, ids, 24)
    path = save_drafter(draft, tmp_path / "d")
    remote = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    assert torch.equal(remote.draft_vocab, draft.draft_vocab)
    out = remote.spec_generate(target=target, input_ids=ids, max_new_tokens=24, stop_token_ids=None, temperature=0.0)
    assert out.tolist() == before.output_ids.tolist()


def test_default_layer_ids_match_published_checkpoints():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-4B-DFlash-b16
    assert default_target_layer_ids(30, 1) == [15]
    assert default_target_layer_ids(3, 2) == [1, 0] and default_target_layer_ids(4, 3) == [1, 1, 1]  # the reference's
    assert default_target_layer_ids(2, 2) == [0, 1]  # where the reference's rule leaves the target ([1, -1])


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


# ---------------------------------------------------------------------------------------------
# What every reader finds in config.json


def test_checkpoint_dflash_py_is_the_package_module_verbatim(tmp_path):
    import draftopd.dflash

    out = save_drafter(tiny_drafter(tiny_target("qwen3")), tmp_path / "d")
    assert (out / "dflash.py").read_bytes() == Path(draftopd.dflash.__file__).read_bytes()


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 100000.0},  # SmolLM2
                                  {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}])
def test_readers_that_ignore_rope_parameters_get_the_targets_rope(tmp_path, rope):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config

    target = LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=dict(rope))).eval()
    cfg = json.loads((save_drafter(tiny_drafter(target), tmp_path / "d") / "config.json").read_text())
    assert cfg["rope_parameters"] == rope
    # transformers 4.x and older SGLang read only these (and assume theta 1e4 / 1e6 without them)
    legacy = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype")}
    assert legacy["rope_theta"] == rope["rope_theta"]
    assert legacy["rope_scaling"] == (None if rope["rope_type"] == "default"
                                      else {k: v for k, v in rope.items() if k != "rope_theta"})
    assert Qwen3Config(**legacy).rope_parameters == rope  # rebuilt from the legacy fields alone


def test_mask_token_names_the_mask_id(tiny_dir, tmp_path):
    from draftopd.model.checkpoint import init_drafter
    from draftopd.model.target import load_target

    target = load_target(str(tiny_dir), dtype="fp32")  # SmolLM2's tokenizer: no spare row, <empty_output>
    out = save_drafter(init_drafter(target, num_layers=1, block_size=4), tmp_path / "d")
    dflash_config = json.loads((out / "config.json").read_text())["dflash_config"]
    assert dflash_config["mask_token"] == "<empty_output>"
    assert target.tokenizer.convert_tokens_to_ids(dflash_config["mask_token"]) == dflash_config["mask_token_id"]
    assert load_drafter(out).mask_token_id == dflash_config["mask_token_id"]
    spare = tiny_drafter(tiny_target("qwen3"))  # a row past the tokenizer has no string: none written
    assert "mask_token" not in json.loads((save_drafter(spare, tmp_path / "s") / "config.json").read_text())["dflash_config"]


# ---------------------------------------------------------------------------------------------
# Bad drafter directories and hub ids: one line each, exit 2


def _export_error(capsys, draft: str, tmp_path) -> str:
    from draftopd.cli.main import main

    assert main(["export", "--draft", draft, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = without_dtype_notice(captured.err)
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err, captured.err
    assert err.startswith("draftopd export: error: ")
    return err


def _saved(tmp_path):
    return save_drafter(tiny_drafter(tiny_target("qwen3")), tmp_path / "d")


def test_truncated_weights(tmp_path, capsys):
    d = _saved(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _export_error(capsys, str(d), tmp_path)
    assert "model.safetensors: unreadable safetensors file" in err


def test_config_sizes_disagreeing_with_weights(tmp_path, capsys):
    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    err = _export_error(capsys, str(d), tmp_path)
    assert "model.safetensors: layers.0.mlp.down_proj.weight has shape [64, 128] but config.json implies [64, 96]" in err


@pytest.mark.parametrize("field", ["hidden_size", "block_size", "num_target_layers"])
def test_missing_config_field(tmp_path, capsys, field):
    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg[field]
    (d / "config.json").write_text(json.dumps(cfg))
    err = _export_error(capsys, str(d), tmp_path)
    assert f"config.json: not a complete DFlash drafter config, missing {field}" in err


def test_bad_config_value(tmp_path, capsys):
    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["dflash_config"]["target_layer_ids"] = "1,2"
    (d / "config.json").write_text(json.dumps(cfg))
    assert "config.json: invalid drafter config" in _export_error(capsys, str(d), tmp_path)


@pytest.mark.parametrize("offline", [True, False])
def test_unknown_hub_id_fails_fast(tmp_path, capsys, monkeypatch, offline):
    import time

    from draftopd.cli.main import main

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # whatever the network: no retry loop
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t0 = time.perf_counter()
    err = _export_error(capsys, "nobody-draftopd-test/no-such-drafter", tmp_path)
    assert time.perf_counter() - t0 < 5
    assert "drafter 'nobody-draftopd-test/no-such-drafter': not a local directory" in err
    t0 = time.perf_counter()
    assert main(["init-draft", "--target", "nobody-draftopd-test/no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert time.perf_counter() - t0 < 5
    err = without_dtype_notice(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and "target 'nobody-draftopd-test/no-such-model': not a local directory" in err
    if offline:
        assert "HF_HUB_OFFLINE is set" in err


def test_shipped_drafter_alias(tmp_path, monkeypatch):
    from draftopd.model import checkpoint

    assert "smollm2-135m-dflash" in checkpoint.DRAFTER_ALIASES
    assert checkpoint.shipped_drafter_dir("smollm2-135m-dflash").parts[-3:] == ("draftopd", "drafters",
                                                                                "smollm2-135m-dflash")
    monkeypatch.setattr(checkpoint, "shipped_drafter_dir", lambda alias: tmp_path / "drafters" / alias)
    with pytest.raises(DraftOPDError, match="the shipped drafter is missing"):
        load_drafter("smollm2-135m-dflash")
    draft = tiny_drafter(tiny_target("qwen3"))
    save_drafter(draft, tmp_path / "drafters" / "smollm2-135m-dflash")
    again = load_drafter("smollm2-135m-dflash")
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), again.state_dict().values()))


def test_top_level_api_imports_lazily():
    import subprocess
    import sys

    code = ("import sys, draftopd; assert 'torch' not in sys.modules; "
            "draftopd.spec_generate; draftopd.load_target; draftopd.load_drafter; draftopd.init_drafter; "
            "draftopd.save_drafter; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_hub_id_offline_uses_the_local_cache(tmp_path, monkeypatch):
    """A drafter in the HF cache loads without the network (HF_HUB_OFFLINE or an unreachable Hub)."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--cached-drafter"
    snapshot = repo / "snapshots" / "0123abc"
    draft = tiny_drafter(tiny_target("qwen3"))
    shutil.copytree(save_drafter(draft, tmp_path / "d"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_drafter("someone/cached-drafter")
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), again.state_dict().values()))
