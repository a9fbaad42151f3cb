"""Shared fixtures: tiny random Qwen3/Llama targets for speed, the embedded SmolLM2 for realism."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

from draftopd.data.rollouts import Rollout, write_rollouts
from draftopd.model.checkpoint import build_config
from draftopd.model.drafter import DFlashDraftModel
from draftopd.model.target import load_target, resolve_target

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Batch-1 decoding of a 135M model gains little from intra-op threads, and on a shared
    2-core machine two OpenMP threads per process make every forward several times slower
    (measured: 8 min for the embedded-model module vs about 1 min). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved with the SmolLM2 tokenizer (ids used stay < 160)."""
    d = tmp_path_factory.mktemp("tiny-target")
    tiny_target("llama").save_pretrained(d)
    AutoTokenizer.from_pretrained(resolve_target("smollm2-135m")).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_rollouts(tiny_dir, tmp_path_factory):
    """Greedy continuations by the tiny target itself, so the text is on the target's policy."""
    target = load_target(str(tiny_dir), dtype="fp32")
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(12):
        prompt = torch.randint(20, 150, (1, 6), generator=g)
        out = target.model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
        rollouts.append(Rollout(f"t:{i}", prompt[0].tolist(), out[0, 6:].tolist(), "length"))
    d = tmp_path_factory.mktemp("tiny-rollouts")
    write_rollouts(d, {"target": target.identity}, rollouts)
    return d


def without_dtype_notice(err: str) -> str:
    """stderr less the once-per-process notice of dtype auto falling back to fp32 (printed on
    CPUs without fast bf16 before a command's own output)."""
    return "\n".join(line for line in err.strip().splitlines() if not line.startswith("draftopd: dtype auto"))
