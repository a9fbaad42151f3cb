"""The in-process vLLM backend (`draftopd rollout --backend vllm`).

vLLM cannot run on these CPU machines (the PyPI wheel is CUDA-only; the CPU build pins an older
transformers), so the backend is driven here through a stand-in `vllm` module with vLLM's
offline API (LLM.generate over token-id prompts -> RequestOutput-shaped answers) whose
tokens come from the embedded SmolLM2's greedy generate. What is checked is ours: the
sampling parameters sent, records equal to local generation, resume after an interruption
with nothing lost or duplicated, the errors. `benchmarks/vllm_rollouts.py` runs real vLLM on a GPU.
"""

import sys
import types
from dataclasses import replace
from types import SimpleNamespace

import pytest

from draftopd.cli.main import main
from draftopd.data.prompts import load_prompts
from draftopd.data.rollouts import RolloutSettings, generate_batch, generate_rollouts, generation_config, load_rollouts
from draftopd.data.vllm_offline import vllm_rollouts
from draftopd.errors import DraftOPDError

SPEC = "gsm8k[:5]"
NAME = "smollm2-135m"
SETTINGS = RolloutSettings(max_new_tokens=10, batch_size=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(SPEC)


@pytest.fixture(scope="module")
def reference(smollm, prompts, tmp_path_factory):
    """Local greedy generation, one prompt per batch (as the stand-in generates): {id: Rollout}."""
    out = tmp_path_factory.mktemp("vllm") / "local"
    generate_rollouts(smollm, prompts, out, replace(SETTINGS, batch_size=1), prompt_spec=SPEC, progress=False)
    return {r.id: r for r in load_rollouts(out)[1]}


@pytest.fixture
def standin(smollm, monkeypatch):
    """A `vllm` module whose LLM answers with the embedded target; records what it was asked."""
    calls = SimpleNamespace(llm_kwargs=None, prompts=[], params=[], fail_on_call=None, n_calls=0)

    class LLM:
        def __init__(self, **kwargs):
            calls.llm_kwargs = kwargs

        def generate(self, prompts, sampling_params, use_tqdm):
            calls.n_calls += 1
            if calls.n_calls == calls.fail_on_call:
                raise KeyboardInterrupt
            answers = []
            for prompt, params in zip(prompts, sampling_params):
                calls.prompts.append(prompt["prompt_token_ids"])
                calls.params.append(params)
                stop = set(params.stop_token_ids)
                config = generation_config(replace(SETTINGS, max_new_tokens=params.max_tokens), sorted(stop), 0)
                ids = generate_batch(smollm.model, [prompt["prompt_token_ids"]], config, 0, stop)[0]
                done = ids[-1] in stop
                answers.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[SimpleNamespace(
                    token_ids=tuple(ids), finish_reason="stop" if done else "length", stop_reason=None)]))
            return answers

    module = types.ModuleType("vllm")
    module.__version__ = "stand-in"
    module.LLM = LLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


def test_vllm_equals_local_greedy_and_resumes(smollm, prompts, reference, standin, tmp_path):
    out = tmp_path / "r"
    standin.fail_on_call = 2  # Ctrl-C while the second chunk of two prompts is generating
    with pytest.raises(KeyboardInterrupt):
        vllm_rollouts(NAME, prompts, out, SETTINGS, chunk=2, prompt_spec=SPEC, progress=False)
    meta, saved = load_rollouts(out)
    assert [r.id for r in saved] == ["gsm8k:0", "gsm8k:1"]  # the first chunk landed whole
    assert meta["token_ids"] == "exact" and meta["dtype"] == "vllm-bf16"
    assert meta["engine"] == {"backend": "vllm-offline", "version": "stand-in"}

    standin.fail_on_call, standin.prompts = None, []
    vllm_rollouts(NAME, prompts, out, SETTINGS, chunk=2, prompt_spec=SPEC, progress=False)
    assert len(standin.prompts) == 3  # only the unfinished prompts were asked again
    meta, rollouts = load_rollouts(out, expect_target=smollm.identity)
    assert [r.id for r in rollouts] == [p.id for p in prompts]  # nothing lost, nothing duplicated
    assert {r.id: r for r in rollouts} == reference  # same tokens as local greedy generate

    kwargs = standin.llm_kwargs
    assert kwargs["dtype"] == "bfloat16" and kwargs["generation_config"] == "vllm"
    params = standin.params[0]
    stop = smollm.stop_token_ids
    assert params.temperature == 0 and params.seed is None and params.stop_token_ids == stop
    assert params.max_tokens == 10 and params.repetition_penalty == 1.0 and not params.skip_special_tokens


def test_vllm_sampling_seeds_per_prompt(prompts, standin, tmp_path):
    sampled = replace(SETTINGS, temperature=0.7, top_p=0.9, seed=11)
    vllm_rollouts(NAME, prompts[:3], tmp_path / "s", sampled, chunk=8, prompt_spec="gsm8k[:3]", progress=False)
    assert [p.seed for p in standin.params] == [11, 12, 13]
    assert {(p.temperature, p.top_p) for p in standin.params} == {(0.7, 0.9)}


def test_vllm_missing_or_misused_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    argv = ["rollout", "--target", NAME, "--prompts", "gsm8k[:2]", "--out", str(tmp_path / "v"), "--backend", "vllm"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'draftopd[vllm]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "v").exists()  # nothing written before the engine is there
    assert main(argv + ["--engine-url", "http://127.0.0.1:1"]) == 2
    assert "--engine-url and --backend vllm: choose one" in capsys.readouterr().err
    with pytest.raises(DraftOPDError, match="vllm dtype 'int8'"):
        vllm_rollouts(NAME, [], tmp_path / "x", SETTINGS, dtype="int8")
