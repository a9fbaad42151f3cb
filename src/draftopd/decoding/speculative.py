"""Lossless block speculative decoding with a DFlash drafter (batch size 1).

One step: draft [anchor, mask x (B-1)] -> target verifies the block in one pass -> accept a
prefix (+1 target token) -> crop the target cache, append the accepted rows' context
features to the drafter's cache. `block_size=1` runs the same loop with no drafting: the
honest baseline for speedups.
"""

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from draftopd.decoding.sampling import greedy_accept, rejection_accept, sample, sampling_probs
from draftopd.errors import DraftOPDError
from draftopd.model.drafter import context_features


@dataclass
class SpecResult:
    output_ids: torch.LongTensor  # [1, prompt + generated]
    num_input_tokens: int
    acceptance_lengths: list[int] = field(default_factory=list)  # tokens committed per verify step
    time_to_first_token: float = 0.0
    time_per_output_token: float = 0.0

    @property
    def num_output_tokens(self) -> int:
        return self.output_ids.shape[1] - self.num_input_tokens

    @property
    def tau(self) -> float:
        """Mean acceptance length; the prefill's first token is not a verify step."""
        return sum(self.acceptance_lengths) / max(len(self.acceptance_lengths), 1)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renames `past_key_values` to `cache`; use whichever this model takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions (negative crop means "remove n" in every 4.x/5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _as_model(target) -> nn.Module:
    """Accept an HF causal LM or anything wrapping one in `.model` (draftopd's Target)."""
    return target if isinstance(target, nn.Module) else target.model


@torch.inference_mode()
def spec_generate(
    draft,
    target,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: list[int] | None = None,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    on_tokens=None,
) -> SpecResult:
    """Decode up to `max_new_tokens` after `input_ids` [1, n]; `on_tokens(list[int])` streams each commit."""
    target = _as_model(target)
    B = draft.block_size if block_size is None else int(block_size)
    if max_new_tokens is None or max_new_tokens <= 0:
        raise DraftOPDError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if B < 1:
        raise DraftOPDError(f"block_size must be >= 1, got {B}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise DraftOPDError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise DraftOPDError(f"input_ids must be one non-empty sequence [1, n], got shape {tuple(input_ids.shape)}")
    if B > 1:
        draft.check_target(target)
        draft.eval()
    device = target.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    greedy = temperature == 0
    stops = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)

    def choose(logits):  # [n, V] -> [n] ids, and the probs they were drawn from (None if greedy)
        if greedy:
            return logits.argmax(-1), None
        probs = sampling_probs(logits, temperature, top_p, top_k)
        return sample(probs, generator), probs

    n_in = input_ids.shape[1]
    max_length = n_in + max_new_tokens
    out = torch.empty(max_length + B, dtype=torch.long, device=device)
    out[:n_in] = input_ids[0]
    positions = torch.arange(max_length + B, device=device)
    target_cache = DynamicCache(config=target.config)
    kw = _cache_kwarg(target)
    draft_cache = draft.new_cache() if B > 1 else None

    t0 = _now(device)
    o = target(input_ids=input_ids, position_ids=positions[None, :n_in], **{kw: target_cache},
               use_cache=True, output_hidden_states=B > 1, logits_to_keep=1)
    out[n_in] = choose(o.logits[0, -1:])[0][0]
    if on_tokens is not None:
        on_tokens([int(out[n_in])])
    pending = context_features(o.hidden_states, draft.target_layer_ids) if B > 1 else None  # [1, n, L*H]
    t1 = _now(device)

    result = SpecResult(output_ids=input_ids, num_input_tokens=n_in, time_to_first_token=t1 - t0)
    start = n_in  # position of the anchor: committed, not yet seen by the target
    stopped = stops.numel() > 0 and bool(torch.isin(out[start], stops))
    while start + 1 < max_length and not stopped:
        size = min(B, max_length - start)  # block tokens to verify
        block = out[start : start + B].clone()
        draft_probs = None
        if B > 1:  # always draft a full block (as training and serving engines do); verify `size`
            block[1:] = draft.mask_token_id
            n_ctx = pending.shape[1]
            hidden = draft(
                embed(block[None]), pending,
                block_positions=positions[None, start : start + B],
                context_positions=positions[None, start - n_ctx : start],
                cache=draft_cache,
            )
            block[1:size], draft_probs = choose(draft.compute_logits(hidden[0, 1:size], head))
            block = block[:size]
        o = target(input_ids=block[None], position_ids=positions[None, start : start + size],
                   **{kw: target_cache}, use_cache=True, output_hidden_states=size > 1)
        logits = o.logits[0]  # [size, V]: the target's next-token logits after each block token
        if greedy:
            r, nxt = greedy_accept(block[1:], logits.argmax(-1))
        else:
            r, nxt = rejection_accept(block[1:], sampling_probs(logits, temperature, top_p, top_k),
                                      draft_probs if size > 1 else logits[:0], generator)
        out[start + 1 : start + r + 1] = block[1 : r + 1]
        out[start + r + 1] = nxt
        produced = min(r + 1, max_length - start - 1)
        if stops.numel():
            hit = torch.isin(out[start + 1 : start + 1 + produced], stops).nonzero()
            if hit.numel():
                produced, stopped = int(hit[0, 0]) + 1, True
        if size > 1:
            pending = context_features(o.hidden_states, draft.target_layer_ids)[:, :produced]
        if on_tokens is not None:
            on_tokens(out[start + 1 : start + 1 + produced].tolist())
        start += produced
        crop_cache(target_cache, start)
        result.acceptance_lengths.append(produced)

    result.output_ids = out[None, : start + 1].clone()
    result.time_per_output_token = (_now(device) - t1) / max(result.num_output_tokens, 1)
    return result
