"""Helpers the tests share (fixtures live in conftest.py): tiny random targets and drafters, stderr cleanup."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from draftopd.model.checkpoint import build_config
from draftopd.model.drafter import DFlashDraftModel

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            eos_token_id=None, pad_token_id=0, bos_token_id=None)


def tiny_target(kind: str = "qwen3", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**TINY)).eval().requires_grad_(False)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)).eval().requires_grad_(False)


def tiny_drafter(target, *, block_size: int = 4, num_layers: int = 2, mask_token_id: int = 159, seed: int = 1):
    torch.manual_seed(seed)
    cfg = build_config(target.config, num_layers=num_layers, block_size=block_size, mask_token_id=mask_token_id)
    return DFlashDraftModel(cfg).eval()


NOTICES = ("draftopd: dtype auto", "draftopd: torch.bfloat16 CPU linears stay unpacked")


def without_dtype_notice(err: str) -> str:
    """stderr less the once-per-process notices of dtype auto falling back to fp32 and of bf16
    linears left unpacked (printed on CPUs without fast bf16 before a command's own output)."""
    return "\n".join(line for line in err.strip().splitlines() if not line.startswith(NOTICES))
