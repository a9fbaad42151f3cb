"""Drafter checkpoints in the reference DFlash directory format.

A directory holds `config.json` (Qwen3 fields + `block_size`, `num_target_layers`,
`dflash_config`), `model.safetensors` (unprefixed keys, no embedding/head) and `dflash.py`,
a verbatim copy of `draftopd.dflash`, so SGLang, vLLM, the `dflash` package and
`AutoModel.from_pretrained(dir, trust_remote_code=True)` all load it. It may also hold
`token_map.pt`, a draft vocabulary (`draftopd.model.draft_vocab`), which remote code attaches
too; engines that do not read it draft from the whole vocabulary, with the same output.

Readers differ in what they read, so config.json says some things twice: top-level
`rope_theta` and `rope_scaling` for transformers 4.x and older SGLang (which assume 1e4 and
1e6 when they are absent) beside `rope_parameters` for newer code; and
`dflash_config.mask_token`, the mask's token string, for older SGLang (which otherwise
appends `<|MASK|>`), whenever the mask id is a real token. We add one optional field,
`draftopd.target`, recording which target the drafter was built for.
"""

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config

from draftopd import dflash, hub
from draftopd.dflash import TOKEN_MAP, DFlashDraftModel, default_target_layer_ids, read_token_map, write_token_map
from draftopd.errors import DraftOPDError
from draftopd.io import atomic_dir, check_output_dir

if TYPE_CHECKING:
    from draftopd.model.target import Target

# Drafters shipped inside the package: alias -> folder under draftopd/drafters/.
DRAFTER_ALIASES = {"smollm2-135m-dflash": "smollm2-135m-dflash"}
# config.json fields a drafter cannot be built without.
REQUIRED_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                   "rms_norm_eps", "vocab_size", "num_hidden_layers", "num_target_layers")
HUB_FILES = ["*.json", "*.safetensors", "*.py", TOKEN_MAP]


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


def mask_token_string(tokenizer, mask_token_id: int) -> str | None:
    """The mask's token string if it names exactly that id (None for a spare row past the tokenizer,
    or when there is no tokenizer, as for random-weight targets)."""
    if tokenizer is None or not 0 <= mask_token_id < len(tokenizer):
        return None
    token = tokenizer.convert_ids_to_tokens(int(mask_token_id))
    return token if token is not None and tokenizer.convert_tokens_to_ids(token) == mask_token_id else None


def build_config(target_config, *, num_layers: int, block_size: int = 16, target_layer_ids=None,
                 mask_token_id: int, mask_token: str | None = None, target_name: str = "") -> Qwen3Config:
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
    dflash_config = {"mask_token_id": int(mask_token_id), "target_layer_ids": ids}
    if mask_token is not None:
        dflash_config["mask_token"] = mask_token
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
        dflash_config=dflash_config,
        draftopd={"target": target_name},
    )


def init_drafter(target: "Target", *, num_layers: int, block_size: int = 16, target_layer_ids=None,
                 mask_token_id: int | None = None, seed: int = 0) -> DFlashDraftModel:
    """A randomly initialised drafter for a loaded `Target`."""
    vocab = target.model.get_input_embeddings().weight.shape[0]
    mask = choose_mask_token_id(target.tokenizer, vocab) if mask_token_id is None else mask_token_id
    if not 0 <= mask < vocab:
        raise DraftOPDError(f"mask_token_id {mask} outside the target vocabulary 0..{vocab - 1}")
    config = build_config(target.config, num_layers=num_layers, block_size=block_size,
                          target_layer_ids=target_layer_ids, mask_token_id=mask,
                          mask_token=mask_token_string(target.tokenizer, mask), target_name=target.name)
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


def legacy_rope_fields(rope_parameters: dict) -> dict:
    """`rope_theta` and `rope_scaling` as transformers 4.x and older SGLang read them."""
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    default = scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}
    return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": None if default else scaling}


def checkpoint_config(model: DFlashDraftModel, dtype: torch.dtype) -> dict:
    """config.json as written: the model's config, the saved dtype, and RoPE said both ways."""
    config = model.config.to_dict()
    for key in ("torch_dtype", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": model.rotary.theta}
    config.update(rope_parameters=rope, **legacy_rope_fields(rope))
    return config


def is_drafter_dir(path: str | Path) -> bool:
    """A DFlash drafter directory (config.json with `dflash_config`), not some other model's folder."""
    try:
        return "dflash_config" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_drafter_out(out: str | Path, overwrite: bool = False) -> bool:
    """May a drafter be written at `out`? (see `draftopd.io.check_output_dir`)."""
    return check_output_dir(out, kind="drafter", is_kind=is_drafter_dir, overwrite=overwrite)


def save_drafter(model: DFlashDraftModel, out: str | Path, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Write a reference-format directory atomically; `dtype` casts the weights (default: keep).

    Refuses a file, someone else's non-empty directory, and (unless `overwrite`) a drafter.
    """
    out = Path(out)
    check_drafter_out(out, overwrite)
    dtype = dtype or next(model.parameters()).dtype
    with atomic_dir(out) as tmp:
        state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(checkpoint_config(model, dtype), indent=2, sort_keys=True) + "\n")
        shutil.copyfile(dflash.__file__, tmp / "dflash.py")  # the remote code: our own module, byte for byte
        if model.draft_vocab is not None:
            write_token_map(model.draft_vocab, tmp / TOKEN_MAP)
    return out


def _read_config(cfg_file: Path) -> tuple[dict, str]:
    """config.json -> (Qwen3Config fields with everything a drafter needs explicit, saved dtype name)."""
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DraftOPDError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DraftOPDError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    dflash_config = raw.get("dflash_config")
    if not isinstance(dflash_config, dict):
        raise DraftOPDError(f"{cfg_file}: not a DFlash drafter config, missing dflash_config")
    dflash_config = dict(dflash_config)
    if "block_size" not in raw and "block_size" in dflash_config:  # the reference reads either place
        raw["block_size"] = dflash_config["block_size"]
    missing = [k for k in (*REQUIRED_FIELDS, "block_size") if k not in raw]
    missing += [] if "mask_token_id" in dflash_config else ["dflash_config.mask_token_id"]
    missing += [] if "rope_parameters" in raw or "rope_theta" in raw else ["rope_parameters (or rope_theta)"]
    if missing:
        raise DraftOPDError(f"{cfg_file}: not a complete DFlash drafter config, missing {', '.join(missing)}")
    if "target_layer_ids" not in dflash_config:  # older checkpoints; make the fallback explicit
        dflash_config["target_layer_ids"] = default_target_layer_ids(raw["num_target_layers"], raw["num_hidden_layers"])
    raw["dflash_config"] = dflash_config
    saved = raw.pop("dtype", None) or raw.pop("torch_dtype", None) or "float32"
    for key in ("torch_dtype", "transformers_version", "rope_scaling"):
        raw.pop(key, None)
    if "rope_parameters" in raw:  # the newer reading wins; rope_theta repeats it for older readers
        raw.pop("rope_theta", None)
    return raw, str(saved)


def _build(cfg_file: Path, fields: dict) -> DFlashDraftModel:
    try:
        return DFlashDraftModel(Qwen3Config(**fields))
    except (TypeError, ValueError, KeyError, RuntimeError, ZeroDivisionError) as e:
        raise DraftOPDError(f"{cfg_file}: invalid drafter config ({type(e).__name__}: {e})") from None


def _read_weights(weights: Path, model: DFlashDraftModel) -> dict:
    """model.safetensors, checked key by key and shape by shape against the config."""
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise DraftOPDError(f"{weights}: unreadable safetensors file ({e}); truncated or not safetensors?") from None
    expected = model.state_dict()
    if set(state) != set(expected):
        extra, lost = sorted(set(state) - set(expected))[:3], sorted(set(expected) - set(state))[:3]
        raise DraftOPDError(f"{weights}: keys do not match config.json (unexpected {extra}, missing {lost})")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise DraftOPDError(f"{weights}: {key} has shape {list(tensor.shape)} but config.json implies "
                                f"{list(expected[key].shape)}")
    return state


def load_drafter(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu") -> DFlashDraftModel:
    """Load any reference-format drafter: a directory (ours or a published one), an alias, or a Hub id.

    Anything wrong with it is a one-line DraftOPDError naming the file and the problem.
    """
    path = _resolve_drafter_path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise DraftOPDError(f"drafter {path}: not a drafter directory (needs config.json and model.safetensors)")
    fields, saved = _read_config(cfg_file)
    model = _build(cfg_file, fields)
    model.load_state_dict(_read_weights(weights, model))
    if (path / TOKEN_MAP).exists():
        model.set_draft_vocab(read_token_map(path / TOKEN_MAP, model.config.vocab_size))
    saved = getattr(torch, saved, None)
    model.to(device=device, dtype=dtype or (saved if isinstance(saved, torch.dtype) else torch.float32))
    return model.eval()


def shipped_drafter_dir(alias: str) -> Path:
    return Path(dflash.__file__).resolve().parent / "drafters" / DRAFTER_ALIASES[alias]


def _resolve_drafter_path(path: str | Path) -> Path:
    """An alias of a shipped drafter, a local directory, or an HF repo id (owner/name) fetched into the HF cache."""
    text = str(path)
    if text in DRAFTER_ALIASES:
        shipped = shipped_drafter_dir(text)
        if not (shipped / "config.json").exists():
            raise DraftOPDError(f"drafter {text!r}: the shipped drafter is missing from this installation ({shipped})")
        return shipped
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise DraftOPDError(f"drafter {p}: not a directory")
    if hub.is_repo_id(text):
        return hub.download(text, kind="drafter", allow_patterns=HUB_FILES)
    raise DraftOPDError(f"drafter {p}: no such directory")


def drafter_target_name(model: DFlashDraftModel) -> str:
    return (getattr(model.config, "draftopd", None) or {}).get("target", "")
