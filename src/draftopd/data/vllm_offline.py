"""Rollouts from vLLM's offline engine, in this process (`pip install 'draftopd[vllm]'`, a CUDA GPU).

For a GPU machine with no server to run: vLLM schedules the prompts itself and hands back the
token ids it sampled, so records are exact. Prompts go in chunks; each chunk's records are
appended and fsync'd before the next starts, so an interrupted run resumes like the others.
"""

from __future__ import annotations

from pathlib import Path

from draftopd.data.engine import engine_record, target_without_weights
from draftopd.data.prompts import Prompt
from draftopd.data.rollouts import RolloutSettings, RolloutWriter, prompt_seeds, prompt_token_ids, rollout_meta
from draftopd.errors import DraftOPDError
from draftopd.model.target import resolve_target

VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise DraftOPDError(f"the vllm backend needs vLLM ({e}): pip install 'draftopd[vllm]' "
                            "on Linux with a CUDA GPU, or use --engine-url with a running server") from None
    return vllm


def sampling_params(vllm, settings: RolloutSettings, stop: list[int], seed: int):
    """One prompt's vLLM SamplingParams; every knob that shapes the output is set, as for HF and HTTP."""
    sampled = settings.temperature > 0
    return vllm.SamplingParams(
        n=1, max_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p if sampled else 1.0, min_p=0.0, repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0, stop_token_ids=stop, ignore_eos=False,
        skip_special_tokens=False, seed=seed if sampled else None)


def vllm_rollouts(target: str, prompts: list[Prompt], out_dir, settings: RolloutSettings, *, dtype: str = "bf16",
                  tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, chunk: int = 512,
                  prompt_spec: str = "", progress: bool = True) -> Path:
    """Write vLLM's response to each prompt into `out_dir`, resuming a run left there.

    `target` is an HF id, a local folder or an embedded alias; vLLM loads it by path. With
    temperature > 0, prompt i (in `prompts` order) is sampled with seed `settings.seed + i`.
    """
    if dtype not in VLLM_DTYPES:
        raise DraftOPDError(f"vllm dtype {dtype!r}: expected one of {', '.join(VLLM_DTYPES)}")
    if chunk < 1 or tensor_parallel_size < 1 or not 0 < gpu_memory_utilization <= 1:
        raise DraftOPDError(f"need chunk >= 1, tensor_parallel_size >= 1, 0 < gpu_memory_utilization <= 1; "
                            f"got {chunk}, {tensor_parallel_size}, {gpu_memory_utilization}")
    vllm = _import_vllm()
    tokenizer, identity, stop = target_without_weights(target)
    prompt_ids = prompt_token_ids(tokenizer, prompts, settings)
    seeds = prompt_seeds(prompts, settings)
    meta = rollout_meta(identity, f"vllm-{dtype}", settings, prompt_spec,
                        engine={"backend": "vllm-offline", "version": getattr(vllm, "__version__", "")})
    engine = f"vLLM {meta['engine']['version']}".strip()
    with RolloutWriter(out_dir, meta, prompt_ids, progress=progress) as writer:
        todo = [p for p in prompts if p.id in prompt_ids and p.id not in writer.done]
        if not todo:
            return writer.out
        # generation_config="vllm": the model's own defaults (e.g. a repetition penalty) stay out.
        llm = vllm.LLM(model=resolve_target(target), dtype=VLLM_DTYPES[dtype], seed=settings.seed,
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       generation_config="vllm")
        for s in range(0, len(todo), chunk):
            part = todo[s:s + chunk]
            answers = llm.generate([{"prompt_token_ids": prompt_ids[p.id]} for p in part],
                                   sampling_params=[sampling_params(vllm, settings, stop, seeds[p.id]) for p in part],
                                   use_tqdm=False)
            writer.append([engine_record(p, prompt_ids[p.id], a.outputs[0].token_ids, a.outputs[0].finish_reason,
                                         a.outputs[0].stop_reason, stop, identity.get("vocab_size"), engine=engine)
                           for p, a in zip(part, answers, strict=True)])
    return writer.out
