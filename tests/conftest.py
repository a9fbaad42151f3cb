"""Shared fixtures: tiny random Qwen3/Llama targets for speed, the embedded SmolLM2 for realism."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

from draftopd.model.checkpoint import build_config
from draftopd.model.drafter import DFlashDraftModel

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

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


@pytest.fixture(scope="session", params=["qwen3", "llama"])
def tiny_pair(request):
    target = tiny_target(request.param)
    return target, tiny_drafter(target)


@pytest.fixture(scope="session")
def smollm():
    from draftopd.model.target import load_target

    return load_target("smollm2-135m", dtype="fp32")


@pytest.fixture(scope="session")
def smol_drafter(smollm):
    from draftopd.model.checkpoint import init_drafter

    return init_drafter(smollm, num_layers=1, block_size=8, seed=0)
