"""Shared fixtures: tiny random Qwen3/Llama targets for speed, the embedded SmolLM2 for realism.

Helpers that are not fixtures live in helpers.py; tests import them from there, not from here."""

import pytest
import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from helpers import tiny_drafter, tiny_target
from draftopd.data.rollouts import Rollout, write_rollouts
from draftopd.model.target import load_target, resolve_target

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


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
