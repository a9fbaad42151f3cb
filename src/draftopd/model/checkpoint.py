"""Drafter checkpoints in the reference DFlash directory format.

A directory holds `config.json` (Qwen3 fields + `block_size`, `num_target_layers`,
`dflash_config`), `model.safetensors` (unprefixed keys, no embedding/head) and `dflash.py`,
a self-contained copy of our model and decoding code, so SGLang, vLLM, the `dflash` package
and `AutoModel.from_pretrained(dir, trust_remote_code=True)` all load it. We add one
optional field, `draftopd.target`, recording which target the drafter was built for.
"""

import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config

from draftopd import errors
from draftopd.decoding import sampling, speculative
from draftopd.errors import DraftOPDError
from draftopd.model import drafter
from draftopd.model.drafter import DFlashDraftModel, default_target_layer_ids

# Modules bundled, in order, into each checkpoint's dflash.py.
REMOTE_MODULES = (errors, drafter, sampling, speculative)
QWEN3_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                "rms_norm_eps", "vocab_size", "max_position_embeddings", "rope_parameters")


def remote_code_source() -> str:
    """Concatenate the bundled modules, dropping imports between them."""
    parts = ['"""DFlash drafter (written by draftopd; self-contained remote code)."""\n']
    for module in REMOTE_MODULES:
        src = inspect.getsource(module)
        src = re.sub(r"^\s*(from draftopd[\w.]* import .*|import draftopd.*)\n", "", src, flags=re.M)
        src = re.sub(r'^"""(.|\n)*?"""\n', "", src, count=1)  # module docstring
        parts.append(f"# ---- {module.__name__} ----\n{src}")
    return "\n".join(parts)


def choose_mask_token_id(tokenizer, vocab_size: int) -> int:
    """A spare embedding row past the tokenizer if there is one, else an unused special token."""
    if len(tokenizer) < vocab_size:
        return len(tokenizer)
    template = getattr(tokenizer, "chat_template", None) or ""
    reserved = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    candidates = []
    for tid, tok in sorted(tokenizer.added_tokens_decoder.items()):
        if tid in reserved or tid >= vocab_size or str(tok) in template:
            continue
        preference = 0 if any(w in str(tok).lower() for w in ("mask", "empty")) else 1
        candidates.append((preference, tid))
    if not candidates:
        raise DraftOPDError("no safe mask token: the vocabulary has no spare row and every special token is "
                            "EOS/pad/BOS or used by the chat template; pass --mask-token-id")
    return min(candidates)[1]


def build_config(target_config, *, num_layers: int, block_size: int = 16, target_layer_ids=None,
                 mask_token_id: int, target_name: str = "") -> Qwen3Config:
    """A drafter config sized for the target (hidden size, heads, RoPE from the target)."""
    L = target_config.num_hidden_layers
    ids = list(target_layer_ids) if target_layer_ids else default_target_layer_ids(L, num_layers)
    if num_layers < 1 or block_size < 2:
        raise DraftOPDError(f"need num_layers >= 1 and block_size >= 2, got {num_layers}, {block_size}")
    if any(not 0 <= i < L for i in ids):
        raise DraftOPDError(f"target_layer_ids {ids} out of range: the target has layers 0..{L - 1}")
    t = target_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    rope = dict(getattr(t, "rope_parameters", None) or {"rope_type": "default", "rope_theta": t.rope_theta})
    return Qwen3Config(
        architectures=["DFlashDraftModel"],
        auto_map={"AutoModel": "dflash.DFlashDraftModel"},
        hidden_size=t.hidden_size,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=getattr(t, "num_key_value_heads", t.num_attention_heads),
        head_dim=head_dim,
        intermediate_size=t.intermediate_size,
        rms_norm_eps=t.rms_norm_eps,
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=rope,
        num_hidden_layers=num_layers,
        attention_bias=False,
        tie_word_embeddings=False,
        use_cache=False,
        block_size=block_size,
        num_target_layers=L,
        dflash_config={"mask_token_id": int(mask_token_id), "target_layer_ids": ids},
        draftopd={"target": target_name},
    )


def init_drafter(target, *, num_layers: int, block_size: int = 16, target_layer_ids=None,
                 mask_token_id: int | None = None, seed: int = 0) -> DFlashDraftModel:
    """A randomly initialised drafter for a loaded `Target`."""
    vocab = target.model.get_input_embeddings().weight.shape[0]
    mask = choose_mask_token_id(target.tokenizer, vocab) if mask_token_id is None else mask_token_id
    if not 0 <= mask < vocab:
        raise DraftOPDError(f"mask_token_id {mask} outside the target vocabulary 0..{vocab - 1}")
    config = build_config(target.config, num_layers=num_layers, block_size=block_size,
                          target_layer_ids=target_layer_ids, mask_token_id=mask, target_name=target.name)
    torch.manual_seed(seed)
    draft = DFlashDraftModel(config)
    final_norm = getattr(getattr(target.model, "model", None), "norm", None)
    if final_norm is not None and getattr(final_norm, "weight", None) is not None \
            and final_norm.weight.shape == draft.norm.weight.shape:
        # Start in the target's output space at a tenth of its scale: the shared LM head then
        # gives soft first predictions (CE ~15 on SmolLM2) instead of confidently repeating the
        # mask token (CE ~70-90 with unit or copied weights), which costs the first dozens of steps.
        draft.norm.weight.data.copy_(final_norm.weight.data * 0.1)
    return draft.to(target.dtype)


def save_drafter(model: DFlashDraftModel, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write a reference-format directory atomically (a temp dir renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config["dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "dflash.py").write_text(remote_code_source())
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_drafter(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu") -> DFlashDraftModel:
    """Load any reference-format drafter directory (ours, or a published DFlash checkpoint)."""
    path = _resolve_drafter_path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise DraftOPDError(f"drafter {path}: not a drafter directory (needs config.json and model.safetensors)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise DraftOPDError(f"{cfg_file}: invalid JSON ({e})") from None
    dflash = raw.get("dflash_config") or {}
    missing = [k for k in ("block_size", "num_target_layers") if k not in raw]
    missing += [f"dflash_config.{k}" for k in ("mask_token_id",) if k not in dflash]
    if missing:
        raise DraftOPDError(f"{cfg_file}: not a DFlash drafter config, missing {', '.join(missing)}")
    if "target_layer_ids" not in dflash:  # older checkpoints; make the fallback explicit
        dflash["target_layer_ids"] = default_target_layer_ids(raw["num_target_layers"], raw["num_hidden_layers"])
        raw["dflash_config"] = dflash
    config = Qwen3Config(**{k: v for k, v in raw.items() if k not in ("dtype", "torch_dtype", "transformers_version")})
    model = DFlashDraftModel(config)
    state = load_file(weights)
    expected = set(model.state_dict())
    if set(state) != expected:
        extra, lost = sorted(set(state) - expected)[:3], sorted(expected - set(state))[:3]
        raise DraftOPDError(f"{weights}: keys do not match the config (unexpected {extra}, missing {lost})")
    model.load_state_dict(state)
    saved = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    model.to(device=device, dtype=dtype or getattr(torch, saved, torch.float32))
    return model.eval()


def _resolve_drafter_path(path: str | Path) -> Path:
    """A local directory, or an HF repo id (owner/name) fetched into the HF cache."""
    p = Path(path)
    if p.is_dir():
        return p
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.py"]))
        except Exception as e:
            raise DraftOPDError(f"drafter {text!r}: not a local directory and not downloadable "
                                f"({type(e).__name__})") from None
    raise DraftOPDError(f"drafter {p}: no such directory")


def drafter_target_name(model: DFlashDraftModel) -> str:
    return (getattr(model.config, "draftopd", None) or {}).get("target", "")
