"""What a decode step costs on this machine, measured: the drafter's pass and a target verify of
s = 1..B tokens (or up to a tree's size), on a warm cache, as `spec_generate` runs them.

Where verifying more tokens costs more (an fp32 CPU: 4 tokens ~1.1x one packed, 1.6x plain),
`spec_generate(..., verify_costs=measure_verify_costs(...))` verifies only the drafts (or tree
nodes) that pay for themselves (`VerifyCosts`); where it is nearly free (GPUs) it verifies all.
`benchmarks/decode_overhead.py` prints the same steps as break-even tau.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from draftopd.decoding.speculative import VerifyCosts, bare_model, cache_kwarg, crop_cache
from draftopd.model.drafter import ContextCache, DFlashDraftModel, DraftHead, context_features

CONTEXT = 200  # tokens already in the KV caches
NEW_ROWS = 2  # context rows a drafter step appends (tau of the step before)


class StepTimers:
    """Callables that run one decode step's parts on a prefilled random context, each leaving the
    caches as it found them: `target_step(n)` verifies n tokens, `draft_step(B, head)` drafts a block."""

    @torch.inference_mode()
    def __init__(self, target: torch.nn.Module, draft: DFlashDraftModel, max_tokens: int, context: int = CONTEXT):
        self.target, self.draft, self.context = target, draft, context
        dev = target.get_input_embeddings().weight.device
        self.ids = torch.randint(100, min(10_000, target.config.vocab_size), (1, context + max_tokens), device=dev)
        self.target_cache = DynamicCache(config=target.config)
        self.kv = {cache_kwarg(target): self.target_cache}
        out = target(input_ids=self.ids[:, :context], **self.kv, use_cache=True, output_hidden_states=True)
        self.features = context_features(out.hidden_states, draft.target_layer_ids)  # [1, context, F]
        self.positions = torch.arange(context + max_tokens + NEW_ROWS, device=dev)[None]
        self.draft_cache = ContextCache(len(draft.layers))
        draft(target.get_input_embeddings()(self.ids[:, :1]), self.features[:, : context - NEW_ROWS],
              block_positions=self.positions[:, :1], context_positions=self.positions[:, : context - NEW_ROWS],
              cache=self.draft_cache)
        self.kept = list(zip(self.draft_cache.k, self.draft_cache.v))

    def target_step(self, n: int) -> Callable[[], None]:
        c = self.context

        @torch.inference_mode()
        def run():
            self.target(input_ids=self.ids[:, c : c + n], position_ids=self.positions[:, c : c + n], **self.kv,
                        use_cache=True, output_hidden_states=True)
            crop_cache(self.target_cache, c)
        return run

    def draft_step(self, B: int, head: DraftHead) -> Callable[[], None]:
        c, embed = self.context, self.target.get_input_embeddings()
        block = torch.full((1, B), self.draft.mask_token_id, device=self.ids.device)

        @torch.inference_mode()
        def run():
            hidden = self.draft(embed(block), self.features[:, c - NEW_ROWS :],
                                block_positions=self.positions[:, c : c + B],
                                context_positions=self.positions[:, c - NEW_ROWS : c], cache=self.draft_cache)
            head(hidden[0, 1:].to(head.weight.dtype)).float().softmax(-1).max(-1)  # drafts and their confidence
            self.draft_cache.k, self.draft_cache.v = [k for k, _ in self.kept], [v for _, v in self.kept]
        return run


def median_seconds(fn: Callable[[], None], min_run_time: float) -> float:
    """Median time of `fn`, measured for at least `min_run_time` seconds (CUDA synchronised), with
    the threads decoding uses (`Timer` would run it on one: 22 ms instead of 17 for a bf16 step here)."""
    return interleaved_medians([fn], min_run_time)[0]


def interleaved_medians(fns: list[Callable[[], None]], min_run_time: float, min_rounds: int = 3) -> list[float]:
    """Median seconds of each of `fns`, timed in turn, round after round, for about
    len(fns) x `min_run_time`: drift (clock speed, caches, other load) then touches every one
    alike. Timed one after another, a 4-token verify came out dearer than an 8-token one here
    (AVX512, bf16) and tree verify chose trees wider than pay."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    times: list[list[float]] = [[] for _ in fns]
    end = time.perf_counter() + min_run_time * len(fns)
    while time.perf_counter() < end or len(times[0]) < min_rounds:
        for fn, seen in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            seen.append(time.perf_counter() - t0)
    return [statistics.median(seen) for seen in times]


def measure_verify_costs(target, draft: DFlashDraftModel, block_size: int | None = None,
                         min_run_time: float = 0.2, tokens: int | None = None) -> VerifyCosts:
    """This machine's `VerifyCosts` for `draft` on `target` (draftopd's Target or a bare HF model)
    at `block_size` (default: the drafter's), for verify passes of 1..max(B, `tokens`) tokens (a
    tree verifies more than B): about (that + 1) x `min_run_time` seconds. A tree's mask costs
    no more than the causal one (measured: within 2%), so chains time both."""
    target = bare_model(target)
    draft.check_target(target)  # a drafter for another target: one line, before any forward
    B = block_size or draft.block_size
    widest = max(B, tokens or 0)
    timers = StepTimers(target, draft, widest)
    head = draft.draft_head(target.get_output_embeddings())
    timers.draft_step(B, head)()  # first calls pay for lazy initialisation
    timers.target_step(widest)()
    draft_s, *verify = interleaved_medians([timers.draft_step(B, head)] + [timers.target_step(n) for n in
                                                                           range(1, widest + 1)], min_run_time)
    return VerifyCosts(draft=draft_s, verify=verify)
