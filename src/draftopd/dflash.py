"""DFlash block drafter and lossless speculative decoding, in one self-contained module.

Every drafter checkpoint carries this file verbatim as `dflash.py` (config `auto_map`:
`{"AutoModel": "dflash.DFlashDraftModel"}`), so `AutoModel.from_pretrained(dir,
trust_remote_code=True).spec_generate(...)` works without draftopd, and draftopd imports the
very same file as `draftopd.dflash`: one copy of the code, whatever loads it. Hence it
imports only torch and transformers (plus draftopd's error type when draftopd is there, so
its command line prints a user error as one line).

Contents: which target layers condition the drafter and how their states are gathered; the
acceptance rules of one verify step (greedy, and speculative rejection sampling); greedy tree
verification (the drafter's likeliest paths, its top choices per offset, in one pass); the draft
head (the LM-head rows of an optional draft vocabulary, `token_map.pt`); the drafter (Qwen3-style layers whose
keys/values also see the target's context; it borrows the target's embedding and LM head);
`spec_generate`, the decode loop.

Shapes: b batch, q block/query tokens, n context tokens, H hidden, h heads, g kv heads,
d head dim, V vocabulary, B block size.
"""

import functools
import heapq
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

try:  # inside draftopd: its user-error type, which the command line prints as one line
    from draftopd.errors import DraftOPDError
except ImportError:  # standalone remote code

    class DraftOPDError(ValueError):
        """Bad input or state the caller can fix."""


# Greedy verification scores the target's rows (LM head) this many at a time and stops at the
# first rejection. On the CPUs measured, 4 rows cost about 60% of 16 in fp32, and GEMMs give
# aligned chunks of 4 rows the same bits as the whole block (bf16: chunks of any size), so the
# outputs stay those of scoring every row; 1 row takes a GEMV path with other bits.
VERIFY_ROWS = 4
# With adaptive verify, at most this many target-only steps between drafts (`VerifyCosts.rest_after`).
MAX_REST = 8


# ---------------------------------------------------------------------------------------------
# Target features


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """One draft layer reads the middle target layer; more read layers spread over 1..L-3 (the
    reference's rule). Where that rule leaves the target's layers (targets of under 3 layers),
    they spread over the layers there are."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    ids = [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]
    if all(0 <= i < num_target_layers for i in ids):
        return ids
    return [round(i * (num_target_layers - 1) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def context_features(hidden_states, layer_ids: list[int]) -> torch.Tensor:
    """Concatenate decoder-layer outputs ([b, n, H] each -> [b, n, len(layer_ids)*H]).

    transformers puts the embedding output at `hidden_states[0]`, so layer L is `[L + 1]`.
    """
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


# ---------------------------------------------------------------------------------------------
# Acceptance rules of one verify step (pure functions)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """[..., V] logits -> [..., V] fp32 probabilities after temperature, top-k, then top-p."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...] argmax, taken in fp32: the same ids (first maximum either way), but a bf16
    argmax runs ~5x slower on a CPU (0.65 vs 0.13 ms over 8 x 49152 logits here, AVX512)."""
    return logits.float().argmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of [..., V] probabilities -> [...] ids."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def greedy_accept_rows(drafts: torch.Tensor, argmax_rows: Callable[[int, int], torch.Tensor],
                       rows: int) -> tuple[int, int]:
    """Greedy acceptance asking for the target's choices `rows` at a time.

    drafts [k]; argmax_rows(s, e) -> [e - s], the target's argmax after block tokens s..e-1.
    Rows after the first rejection are never asked for: they cannot change the outcome.
    Returns (r, next_token): r accepted drafts, then the target's own token at offset r.
    """
    k, s = drafts.shape[0], 0
    while True:
        e = min(s + rows, k + 1)
        choice = argmax_rows(s, e)
        judged = min(e, k) - s  # drafts these rows judge; the row after the last draft judges none
        m = int((drafts[s : s + judged] == choice[:judged]).int().cumprod(0).sum())
        if m < judged or e == k + 1:
            return s + m, int(choice[m])
        s = e


def greedy_accept(drafts: torch.Tensor, target_argmax: torch.Tensor) -> tuple[int, int]:
    """drafts [k], target_argmax [k+1] (the target's choice after each block token) -> (r, next_token)."""
    return greedy_accept_rows(drafts, lambda s, e: target_argmax[s:e], target_argmax.shape[0])


def rejection_accept(
    drafts: torch.Tensor,  # [k] tokens sampled from q
    p: torch.Tensor,  # [k+1, V] target probabilities after each block token
    q: torch.Tensor,  # [k, V] draft probabilities the drafts were sampled from
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Accept draft i with prob min(1, p/q); on rejection draw from norm(max(0, p - q)); bonus from p."""
    k = drafts.shape[0]
    idx = drafts[:, None]
    p_d = p[:k].gather(-1, idx)[:, 0]
    q_d = q.gather(-1, idx)[:, 0]
    u = torch.rand(k, generator=generator, device=p.device)
    r = int((u * q_d < p_d).int().cumprod(0).sum())  # u < p/q without dividing by q = 0
    if r == k:
        return r, int(sample(p[k], generator))
    residual = (p[r] - q[r]).clamp_min(0)
    total = residual.sum()
    residual = residual / total if total > 0 else p[r]
    return r, int(sample(residual, generator))


# ---------------------------------------------------------------------------------------------
# Tree verification (greedy): one target pass over the drafter's likeliest continuations
#
# A DFlash drafter scores every offset of the block in one pass, so its second and third
# choices cost nothing to get. Where the first choice at an offset is wrong, a sibling often
# holds the target's token; verifying a small tree of the likeliest paths instead of the one
# chain commits more per step for a few more verified tokens (EAGLE-2's dynamic tree, built
# from a block drafter's per-offset distributions). Greedy only: a path is accepted token by
# token where it equals the target's argmax, so the output is the target's whatever the tree.

TREE_TOP = 8  # candidates per offset a tree may branch into

# attention implementations tested to apply a custom 4D mask together with a KV cache
# (flash_attention_* and paged kernels take only padding masks: they would verify wrong rows)
MASKED_ATTENTION = ("sdpa", "eager")


@dataclass
class DraftTree:
    """Node 0 is the anchor; node i > 0 drafts `tokens[i]` at offset `depths[i]`, after node
    `parents[i]` (parents come first). `expected[n - 1]`: tokens a step commits on average if
    its first n nodes are verified, by the drafter's probabilities (1 + the nodes' path values)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    expected: list[float]

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix(self, n: int) -> "DraftTree":
        """The first n nodes: a tree too, since parents come first."""
        return DraftTree(self.tokens[:n], self.parents[:n], self.depths[:n], self.expected[:n])


def draft_tree(anchor: int, top_probs: torch.Tensor, top_ids: torch.Tensor, nodes: int) -> DraftTree:
    """The `nodes`-node tree (anchor included) of the likeliest drafted paths.

    top_probs, top_ids [K, k]: the drafter's k best tokens at each of K offsets, best first.
    A path's value is the product of its tokens' probabilities; nodes come out in decreasing
    value (best-first: a popped node offers its next sibling and its first child), so every
    prefix of the result is the best tree of its size and a chain is the all-first-choice case.
    """
    probs, ids = top_probs.tolist(), top_ids.tolist()
    K, k = len(probs), len(probs[0]) if probs else 0
    tree = DraftTree([int(anchor)], [-1], [0], [1.0])
    frontier = [(-probs[0][0], 0, 0, 1.0)] if K and k else []  # (-value, node's parent, rank, parent's value)
    while frontier and len(tree) < nodes:
        neg, parent, rank, base = heapq.heappop(frontier)
        depth, value, node = tree.depths[parent] + 1, -neg, len(tree)
        tree.tokens.append(ids[depth - 1][rank])
        tree.parents.append(parent)
        tree.depths.append(depth)
        tree.expected.append(tree.expected[-1] + value)
        if rank + 1 < k:
            heapq.heappush(frontier, (-base * probs[depth - 1][rank + 1], parent, rank + 1, base))
        if depth < K:
            heapq.heappush(frontier, (-value * probs[depth][0], node, 0, value))
    return tree


def tree_mask(parents: list[int], context: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask [1, 1, n, context + n]: every node sees the context, its ancestors and itself.
    (Additive, 0 / dtype min: eager attention adds a boolean mask as 0/1, which masks nothing.)"""
    n = len(parents)
    path = torch.eye(n, dtype=torch.bool)  # path[i, j]: node j is node i or one of its ancestors
    for i, parent in enumerate(parents):
        if parent >= 0:
            path[i] |= path[parent]
    seen = torch.cat([torch.ones(n, context, dtype=torch.bool), path], dim=1)
    mask = torch.zeros(n, context + n, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask.to(device)[None, None]


def tree_accept(tokens: list[int], parents: list[int], target_argmax: list[int]) -> tuple[list[int], int]:
    """Greedy acceptance over a tree: from the anchor, follow the child that holds the target's
    token while there is one. target_argmax[i]: the target's choice after node i's path.
    Returns (the accepted path's nodes, anchor first; the target's token after its last node)."""
    path = [0]
    while True:
        choice = target_argmax[path[-1]]
        child = next((i for i in range(path[-1] + 1, len(tokens))
                      if parents[i] == path[-1] and tokens[i] == choice), None)
        if child is None:
            return path, choice
        path.append(child)


def keep_cache_rows(cache: DynamicCache, start: int, rows: list[int]) -> None:
    """Move the cached keys/values of block rows `rows` (offsets from `start`) to start, start+1, ...:
    the accepted path of a tree, as if it alone had been verified. The caller crops after."""
    if rows == list(range(len(rows))):
        return
    src = torch.tensor(rows, device=cache.layers[0].keys.device) + start
    for layer in cache.layers:
        for t in (layer.keys, layer.values):  # [b, g, n, d]
            t[:, :, start : start + len(rows)] = t[:, :, src]


def check_full_attention(model: nn.Module, what: str) -> None:
    """Refuse a sliding-window target (one line): its KV cache keeps only the last positions, so
    a rejected draft cannot be rolled back, and a custom mask would see past the window."""
    if any(getattr(DynamicCache(config=model.config), "is_sliding", [])):
        raise DraftOPDError(f"{model.config.model_type} attends through a sliding window (sliding_window="
                            f"{getattr(model.config, 'sliding_window', None)}); {what} needs full attention: "
                            "a rejected draft must leave the KV cache, and custom masks ignore the window")


def check_masked_attention(model: nn.Module, what: str) -> None:
    """Refuse a target whose attention would ignore a custom 4D mask (one line)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in MASKED_ATTENTION:
        raise DraftOPDError(f"{what} needs a custom 4D attention mask, which attn_implementation={impl!r} "
                            f"ignores; load the target with one of {', '.join(MASKED_ATTENTION)}")


# ---------------------------------------------------------------------------------------------
# The draft head


@dataclass
class DraftHead:
    """The LM-head rows drafts are chosen from: the target's whole vocabulary, or a draft
    vocabulary (FR-Spec's frequency-ranked tokens; SGLang's `--speculative-token-map`).

    Lossless either way, since the target verifies every draft. A small drafter's step is
    mostly this head (B-1 rows x V), so a few thousand frequent tokens make drafting several
    times cheaper and lose only the drafts that needed a rare token.
    """

    weight: torch.Tensor  # [V', H]
    bias: torch.Tensor | None  # [V']
    vocab: torch.Tensor | None  # [V'] the token id of each row; None: row i is token i
    vocab_size: int  # V
    module: nn.Module | None = None  # the head itself when every token is drafted: its own forward may be faster

    @classmethod
    def whole(cls, head: nn.Module) -> "DraftHead":
        """The target's LM head as it is: every token."""
        return cls(head.weight.detach(), getattr(head, "bias", None), None, head.weight.shape[0], head)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V'], like the head module
        return F.linear(hidden, self.weight, self.bias) if self.module is None else self.module(hidden)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...] the drafts, as token ids
        return self.tokens(greedy_ids(self(hidden.to(self.weight.dtype))))

    def tokens(self, rows: torch.Tensor) -> torch.Tensor:  # row indices -> token ids
        return rows if self.vocab is None else self.vocab[rows]

    def full(self, probs: torch.Tensor) -> torch.Tensor:  # [n, V'] -> [n, V], zero outside the vocabulary
        if self.vocab is None:
            return probs
        return probs.new_zeros(probs.shape[0], self.vocab_size).index_copy_(1, self.vocab, probs)


def check_draft_vocab(token_ids, vocab_size: int, where: str = "draft vocabulary") -> torch.Tensor:
    """A 1-D tensor of distinct token ids in [0, vocab_size), as int64; else one line naming what is wrong."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DraftOPDError(f"{where}: expected a non-empty 1-D list of integer token ids, got "
                            f"{ids.dtype} of shape {list(ids.shape)}")
    ids = ids.long()
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise DraftOPDError(f"{where}: token id {lo if lo < 0 else hi} outside the vocabulary 0..{vocab_size - 1}")
    if ids.unique().numel() != ids.numel():
        raise DraftOPDError(f"{where}: token ids repeat ({ids.numel()} ids, {ids.unique().numel()} distinct)")
    return ids


TOKEN_MAP = "token_map.pt"  # a drafter directory's draft vocabulary, in the format SGLang's --speculative-token-map reads


def read_token_map(path, vocab_size: int) -> torch.Tensor:
    """A token map file (a tensor or list of token ids, saved with torch.save) as a checked 1-D int64 tensor."""
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DraftOPDError(f"token map {path}: no such file") from None
    except Exception as e:  # unpickling errors come in many types; all mean "not a token map"
        raise DraftOPDError(f"token map {path}: unreadable ({type(e).__name__}); expected a tensor or list "
                            "of token ids saved with torch.save") from None
    if isinstance(ids, (list, tuple)) and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DraftOPDError(f"token map {path}: expected a tensor or list of integer token ids")
    if not isinstance(ids, (torch.Tensor, list, tuple)):
        raise DraftOPDError(f"token map {path}: expected a tensor or list of token ids, got {type(ids).__name__}")
    return check_draft_vocab(ids, vocab_size, where=f"token map {path}")


def write_token_map(ids: torch.Tensor, path) -> None:
    """Save as SGLang reads it: one int64 tensor."""
    torch.save(ids.detach().to(device="cpu", dtype=torch.long).clone(), path)  # its own storage, not a view's


# ---------------------------------------------------------------------------------------------
# The drafter


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: statistics in fp32, weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """RoPE cos/sin for absolute positions; inverse frequencies are derived, not stored."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        self.rope_type = rope.get("rope_type", "default")
        self.config = config
        self.head_dim = config.head_dim
        self.theta = rope["rope_theta"]
        self._inv_freq = None

    def inv_freq(self, device) -> tuple[torch.Tensor, float]:
        if self._inv_freq is None:
            if self.rope_type == "default":
                d = self.head_dim
                inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
                self._inv_freq = (inv, 1.0)
            else:
                self._inv_freq = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, None)
        inv, scale = self._inv_freq
        return inv.to(device), scale

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv, scale = self.inv_freq(positions.device)
        freqs = positions[..., None].float() * inv  # [b, n, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, n, d]
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class ContextCache:
    """Per-layer keys/values of the context rows seen so far ([b, g, n, d] each).

    Context rows are committed tokens, so they are only ever appended; block keys/values
    are never stored, which is what "crop the block away" amounts to.
    """

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def keys_values(cache, layer: int, k_ctx, v_ctx, k_blk, v_blk) -> tuple[torch.Tensor, torch.Tensor]:
    """[earlier context | new context | block] keys and values ([b, g, *, d]), kept as `cache` keeps them.

    A ContextCache keeps context rows only. A transformers Cache (the reference's calling
    convention) keeps everything it is given; its caller crops the block away afterwards.
    """
    if isinstance(cache, ContextCache):
        k_ctx, v_ctx = cache.append(layer, k_ctx, v_ctx)
    k, v = torch.cat([k_ctx, k_blk], dim=2), torch.cat([v_ctx, v_blk], dim=2)
    if cache is None or isinstance(cache, ContextCache):
        return k, v
    return cache.update(k, v, layer)


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        h, g, d, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        bias = config.attention_bias
        self.h, self.g, self.d = h, g, d
        self.q_proj = nn.Linear(H, h * d, bias=bias)
        self.k_proj = nn.Linear(H, g * d, bias=bias)
        self.v_proj = nn.Linear(H, g * d, bias=bias)
        self.o_proj = nn.Linear(h * d, H, bias=bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, n, self.g, self.d)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.g, self.d).transpose(1, 2)
        return apply_rope(k, cos, sin), v  # [b, g, n, d]

    def forward(self, x, ctx, rope_q, rope_c, mask, cache, layer: int, is_causal: bool = False) -> torch.Tensor:
        b, q, _ = x.shape
        query = self.q_norm(self.q_proj(x).view(b, q, self.h, self.d)).transpose(1, 2)
        query = apply_rope(query, *rope_q)
        k, v = keys_values(cache, layer, *self.kv(ctx, *rope_c), *self.kv(x, *rope_q))  # [b, g, keys, d]
        if self.g != self.h:
            k = k.repeat_interleave(self.h // self.g, dim=1)
            v = v.repeat_interleave(self.h // self.g, dim=1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=1 / math.sqrt(self.d),
                                             is_causal=is_causal and mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, ctx, rope_q, rope_c, mask, cache, layer, is_causal=False):
        # The context is already normalised by `hidden_norm`; only block tokens get input_layernorm.
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope_q, rope_c, mask, cache, layer, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


def _from_reference_keywords(noise_embedding, target_hidden, position_ids):
    """The reference's inputs -> (block_embeds, context, block_positions, context_positions).

    Its `position_ids` [b, n + q] run over the new context rows, then the block.
    """
    n, q = target_hidden.shape[1], noise_embedding.shape[1]
    if position_ids is None or position_ids.shape[-1] != n + q:
        got = None if position_ids is None else tuple(position_ids.shape)
        raise ValueError(f"position_ids must cover the {n} context rows then the {q} block tokens, got {got}")
    position_ids = position_ids.expand(noise_embedding.shape[0], -1)
    return noise_embedding, target_hidden, position_ids[:, n:], position_ids[:, :n]


class DFlashDraftModel(PreTrainedModel):
    """Drafts a block [anchor, mask, ...] in one pass; output at offset k predicts position a+k."""

    config_class = Qwen3Config
    base_model_prefix = "dflash"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: Qwen3Config):
        super().__init__(config)
        dflash = config.dflash_config
        self.block_size = int(config.block_size)
        self.mask_token_id = int(dflash["mask_token_id"])
        self.target_layer_ids = [int(i) for i in dflash["target_layer_ids"]]
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fc = nn.Linear(len(self.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self.gradient_checkpointing = False
        # Optional draft vocabulary [V'] (token_map.pt beside the weights); not part of the weights.
        self.register_buffer("draft_vocab", None, persistent=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(
        self,
        block_embeds: torch.Tensor | None = None,  # [b, q, H] target embeddings of the block tokens
        context: torch.Tensor | None = None,  # [b, n, len(target_layer_ids)*H] raw target features
        block_positions: torch.LongTensor | None = None,  # [b, q]
        context_positions: torch.LongTensor | None = None,  # [b, n]
        attention_mask: torch.Tensor | None = None,  # [b|1, 1, q, keys]: bool True = visible, or additive
        cache: ContextCache | None = None,
        *,
        noise_embedding: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        is_causal: bool = False,
    ) -> torch.Tensor:  # [b, q, H] final hidden; score with the target's LM head
        """Final hidden states of the block tokens.

        The reference `dflash` package's keywords work too, with its meaning:
        `noise_embedding` = block_embeds, `target_hidden` = context, `position_ids` [b, n + q] =
        the context positions then the block's, `past_key_values` = a transformers Cache that
        keeps context and block keys/values (the caller crops the block away, as the reference
        does); `use_cache` is accepted and, as there, a given cache is used either way;
        `is_causal` makes attention causal when no mask is given.
        """
        if noise_embedding is not None or target_hidden is not None:
            if block_embeds is not None or context is not None or cache is not None:
                raise TypeError("pass either draftopd's inputs or the reference's (noise_embedding, target_hidden, "
                                "position_ids, past_key_values), not both")
            block_embeds, context, block_positions, context_positions = _from_reference_keywords(
                noise_embedding, target_hidden, position_ids)
            cache = past_key_values
        ctx = self.hidden_norm(self.fc(context.to(self.fc.weight.dtype)))
        x = block_embeds.to(ctx.dtype)
        rope_q = self.rotary(block_positions, x.dtype)
        rope_c = self.rotary(context_positions, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, ctx, rope_q, rope_c, attention_mask, cache, i, is_causal, use_reentrant=False
                )
            else:
                x = layer(x, ctx, rope_q, rope_c, attention_mask, cache, i, is_causal)
        return self.norm(x)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.gradient_checkpointing = True

    def check_target(self, target: nn.Module) -> None:
        """Refuse a target this drafter was not built for, before any tensor op can fail deep inside."""
        c = target.config
        emb = target.get_input_embeddings().weight
        if c.hidden_size != self.config.hidden_size:
            raise DraftOPDError(f"drafter hidden_size {self.config.hidden_size} != target hidden_size {c.hidden_size}")
        if emb.shape[0] != self.config.vocab_size:
            raise DraftOPDError(f"drafter vocab_size {self.config.vocab_size} != target vocabulary {emb.shape[0]}")
        if max(self.target_layer_ids) >= c.num_hidden_layers or min(self.target_layer_ids) < 0:
            raise DraftOPDError(
                f"drafter target_layer_ids {self.target_layer_ids} out of range for a target with "
                f"{c.num_hidden_layers} layers (expected 0..{c.num_hidden_layers - 1})"
            )
        if not 0 <= self.mask_token_id < emb.shape[0]:
            raise DraftOPDError(f"drafter mask_token_id {self.mask_token_id} outside the target vocabulary")
        if self.draft_vocab is not None and int(self.draft_vocab.max()) >= emb.shape[0]:
            raise DraftOPDError(f"drafter draft vocabulary has token id {int(self.draft_vocab.max())}, outside the "
                                f"target vocabulary 0..{emb.shape[0] - 1}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, plus the draft vocabulary (`token_map.pt`) when the checkpoint has one,
        so remote-code users draft from it too."""
        from transformers.utils import cached_file

        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs}
        path = cached_file(pretrained_model_name_or_path, TOKEN_MAP, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub)
        if path is not None:
            model.set_draft_vocab(read_token_map(path, model.config.vocab_size))
        return model

    def compute_logits(self, hidden: torch.Tensor, head) -> torch.Tensor:
        """Score drafted positions with the target's LM head or a `draft_head` ([..., H] -> [..., V or V']),
        in its dtype (the reference's method, kept with its signature)."""
        return head(hidden.to(head.weight.dtype))

    def set_draft_vocab(self, token_ids) -> None:
        """Draft from these tokens only (None: the whole vocabulary); see `DraftHead`."""
        ids = None if token_ids is None else check_draft_vocab(token_ids, self.config.vocab_size)
        self.draft_vocab = None if ids is None else ids.to(self.fc.weight.device)

    def draft_head(self, head: nn.Module) -> DraftHead:
        """The rows of the target's LM head that drafts are chosen from (a copy of V' rows: take it
        once per decode or walk, not per step)."""
        whole = DraftHead.whole(head)
        if self.draft_vocab is None:
            return whole
        vocab = self.draft_vocab.to(whole.weight.device)
        bias = None if whole.bias is None else whole.bias.detach()[vocab]
        return DraftHead(whole.weight[vocab], bias, vocab, whole.vocab_size)

    def new_cache(self) -> ContextCache:
        return ContextCache(len(self.layers))

    @torch.inference_mode()
    def spec_generate(
        self,
        target: nn.Module,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        stop_token_ids: list[int] | None = None,
        temperature: float = 0.0,
        mask_token_id: int | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """The reference inference interface: prompt + generated ids, shape [1, n]."""
        if mask_token_id is not None and int(mask_token_id) != self.mask_token_id:
            raise ValueError(f"mask_token_id {mask_token_id} differs from the checkpoint's {self.mask_token_id}")
        result = spec_generate(self, target, input_ids, max_new_tokens,
                               temperature=temperature, stop_token_ids=stop_token_ids, **kwargs)
        return result.output_ids


# ---------------------------------------------------------------------------------------------
# Lossless block speculative decoding (batch size 1)
#
# One step: draft [anchor, mask x (B-1)] -> the target verifies the block in one pass -> accept a
# prefix (+1 target token) -> crop the target cache, append the accepted rows' context features
# to the drafter's cache. `block_size=1` runs the same loop with no drafting: the honest baseline.


@dataclass
class VerifyCosts:
    """What one decode step costs on this machine: the drafter's pass, and the target verifying
    s = 1..B tokens (seconds). Where a wider verify costs more (an fp32 CPU: 4 tokens ~1.6x one),
    verifying drafts the drafter doubts loses time; where it is nearly free (GPUs, bf16 CPUs)
    the whole block pays. `spec_generate(..., verify_costs=...)` verifies the prefix that
    maximises expected committed tokens per second of the step (`verify_size`); the size depends
    on the drafter's outputs only, so decoding stays lossless."""

    draft: float
    verify: list[float]  # verify[s - 1]: seconds for a verify pass over s tokens

    def verify_size(self, confidence: list[float]) -> int:
        """Tokens to verify (1..B), from the drafter's confidence at each offset ([B-1], the peak of
        its distribution there): expected tokens of s = 1 + sum_{j<s} prod_{i<=j} confidence_i."""
        expected, reach = [1.0], 1.0
        for c in confidence:
            reach *= c
            expected.append(expected[-1] + reach)
        return self.best_size(expected)

    def best_size(self, expected: list[float]) -> int:
        """The n (1..) whose expected committed tokens, `expected[n - 1]`, per second of a step that
        verifies n tokens is highest (a chain's prefix, or a `DraftTree`'s first n nodes)."""
        rates = [e / (self.draft + t) for e, t in zip(expected, self.verify)]
        return 1 + max(range(len(rates)), key=rates.__getitem__)

    @staticmethod
    def rest_after(size: int, rest: int) -> int:
        """Target-only steps to take before drafting again, after a step that verified `size` tokens
        and a previous rest of `rest`: none after a draft worth verifying; after one that was not,
        1, 2, 4, ... up to MAX_REST while that goes on. A drafter that cannot pay on this text costs
        its pass for nothing (an fp32 CPU: ~15% of a target step); text that is hard to draft
        comes in runs, and the doubling probes again soon after it ends."""
        return 0 if size > 1 else min(max(1, 2 * rest), MAX_REST)


@dataclass
class SpecResult:
    output_ids: torch.LongTensor  # [1, prompt + generated]
    num_input_tokens: int
    acceptance_lengths: list[int] = field(default_factory=list)  # tokens committed per verify step
    accepted_drafts: list[int] = field(default_factory=list)  # drafts among them (the last step's may all be)
    verify_sizes: list[int] = field(default_factory=list)  # tokens the target verified per step (anchor + drafts)
    rest_steps: int = 0  # steps without a draft (adaptive verify: the drafter was not paying)
    branch_steps: int = 0  # tree verify: steps that accepted a draft other than the drafter's first choice
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


@functools.cache
def _cache_kwarg_of(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renames `past_key_values` to `cache`; use whichever this model takes."""
    return _cache_kwarg_of(type(model))


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions (negative crop means "remove n" in every 4.x/5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _as_model(target) -> nn.Module:
    """Accept an HF causal LM or anything wrapping one in `.model` (draftopd's Target)."""
    return target if isinstance(target, nn.Module) else target.model


def _check_arguments(input_ids, max_new_tokens, B: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens is None or max_new_tokens <= 0:
        raise DraftOPDError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if B < 1:
        raise DraftOPDError(f"block_size must be >= 1, got {B}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise DraftOPDError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise DraftOPDError(f"input_ids must be one non-empty sequence [1, n], got shape {tuple(input_ids.shape)}")


def _plain_head(head: nn.Module, out) -> bool:
    """Are the target's logits its LM head on its last hidden state (no scaling or soft-capping)?

    Checked on the prefill's last row: only then may greedy verification score rows itself.
    """
    last = out.hidden_states[-1][0, -1:]
    return torch.equal(head(last).to(out.logits.dtype)[0], out.logits[0, -1])


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
    verify_costs: VerifyCosts | None = None,
    tree_tokens: int | None = None,
) -> SpecResult:
    """Decode up to `max_new_tokens` after `input_ids` [1, n]; `on_tokens(list[int])` streams each commit.
    `verify_costs` (this machine's, see `VerifyCosts`) verifies only the drafts that pay; None: every block whole.
    `tree_tokens` (greedy only): verify a tree of the drafter's likeliest paths of up to this many tokens,
    anchor included (`draft_tree`; with `verify_costs`, the size that pays each step) instead of one chain."""
    target = _as_model(target)
    B = draft.block_size if block_size is None else int(block_size)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    _check_arguments(input_ids, max_new_tokens, B, temperature, top_p, top_k)
    if tree_tokens is not None:
        if tree_tokens < 1:
            raise DraftOPDError(f"tree_tokens must be >= 1, got {tree_tokens}")
        if temperature != 0:
            raise DraftOPDError(f"tree verify is greedy-only (temperature 0), got temperature {temperature}")
        check_masked_attention(target, "tree verify")
    if B > 1:
        draft.check_target(target)
        draft.eval()
    device = target.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    draft_head = draft.draft_head(head) if B > 1 else None
    greedy = temperature == 0
    stops = {int(t) for t in stop_token_ids or []}

    def choose(logits):  # [n, V] -> [n] ids, and the probs they were drawn from (None if greedy)
        if greedy:
            return greedy_ids(logits), None
        probs = sampling_probs(logits, temperature, top_p, top_k)
        return sample(probs, generator), probs

    def confidence(logits, probs) -> list[float]:  # the peak of each draft distribution (greedy: the draft's)
        # The peak, not the drawn draft's probability: it is fixed before any draft is drawn, so a cut by
        # it keeps the verified drafts distributed as q and sampling lossless.
        return (logits.float().softmax(-1) if probs is None else probs).amax(-1).tolist()

    n_in = input_ids.shape[1]
    max_length = n_in + max_new_tokens
    out = torch.empty(max_length + B, dtype=torch.long, device=device)
    out[:n_in] = input_ids[0]
    positions = torch.arange(max_length + B, device=device)
    target_cache = DynamicCache(config=target.config)
    if B > 1:
        check_full_attention(target, "speculative decoding (block_size 1 still decodes)")
    kw = _cache_kwarg(target)
    draft_cache = draft.new_cache() if B > 1 else None

    t0 = _now(device)
    # The last row by index, not by slice: a sliced [1, 1, H] view sends bf16 CPU matmuls down a
    # path measured 20x slower.
    o = target(input_ids=input_ids, position_ids=positions[None, :n_in], **{kw: target_cache},
               use_cache=True, output_hidden_states=B > 1, logits_to_keep=positions[n_in - 1 : n_in])
    out[n_in] = choose(o.logits[0, -1:])[0][0]
    if on_tokens is not None:
        on_tokens([int(out[n_in])])
    pending = context_features(o.hidden_states, draft.target_layer_ids) if B > 1 else None  # [1, n, L*H]
    lazy = greedy and B > VERIFY_ROWS and _plain_head(head, o)  # score verify rows only until a rejection
    t1 = _now(device)

    result = SpecResult(output_ids=input_ids, num_input_tokens=n_in, time_to_first_token=t1 - t0)
    start = n_in  # position of the anchor: committed, not yet seen by the target
    stopped = int(out[start]) in stops
    rest, resting = 0, 0  # adaptive verify: the current rest's length, target-only steps left in it
    while start + 1 < max_length and not stopped:
        size = min(B, max_length - start)  # block tokens to verify
        block = out[start : start + B].clone()
        draft_probs, tree = None, None
        drafting = B > 1 and not resting
        if not drafting and B > 1:  # the drafter rests: the target alone, its features kept for later
            resting -= 1
            result.rest_steps += 1
            size = 1
            block = block[:1]
        if drafting:  # always draft a full block (as training and serving engines do); verify `size`
            block[1:] = draft.mask_token_id
            n_ctx = pending.shape[1]
            hidden = draft(
                embed(block[None]), pending,
                block_positions=positions[None, start : start + B],
                context_positions=positions[None, start - n_ctx : start],
                cache=draft_cache,
            )
            draft_logits = draft.compute_logits(hidden[0, 1:size], draft_head)
            if tree_tokens is not None:
                top = draft_logits.float().softmax(-1).topk(min(TREE_TOP, max(tree_tokens - 1, 1), draft_logits.shape[-1]))
                tree = draft_tree(int(block[0]), top.values, draft_head.tokens(top.indices), tree_tokens)
                if verify_costs is not None:  # the first nodes that pay for themselves here
                    tree = tree.prefix(verify_costs.best_size(tree.expected))
                    rest = resting = verify_costs.rest_after(len(tree), rest)
                size, block = len(tree), torch.tensor(tree.tokens, device=device)
                if all(parent == i - 1 for i, parent in enumerate(tree.parents)):
                    tree = None  # a chain: verified as one, bit for bit
            else:
                rows, draft_probs = choose(draft_logits)
                if verify_costs is not None:  # verify the drafts that pay for themselves here
                    chosen = verify_costs.verify_size(confidence(draft_logits, draft_probs))
                    rest = resting = verify_costs.rest_after(chosen, rest)
                    size = min(size, chosen)
                    rows, draft_probs = rows[: size - 1], None if draft_probs is None else draft_probs[: size - 1]
                block[1:size] = draft_head.tokens(rows)
                draft_probs = None if draft_probs is None else draft_head.full(draft_probs)
                block = block[:size]
        if tree is None:
            keep = {"logits_to_keep": positions[: min(size, VERIFY_ROWS)]} if lazy else {}  # the first rows only
            o = target(input_ids=block[None], position_ids=positions[None, start : start + size],
                       **{kw: target_cache}, use_cache=True, output_hidden_states=B > 1, **keep)
        else:  # each node sees the context and its own path, at its path's positions
            o = target(input_ids=block[None], position_ids=start + torch.tensor([tree.depths], device=device),
                       attention_mask=tree_mask(tree.parents, start, embed.weight.dtype, device),
                       **{kw: target_cache}, use_cache=True, output_hidden_states=True)
        logits = o.logits[0]  # [rows, V]: the target's next-token logits after the first block tokens
        if tree is not None:
            path, nxt = tree_accept(tree.tokens, tree.parents, greedy_ids(logits).tolist())
            r = len(path) - 1
            keep_cache_rows(target_cache, start, path)
            result.branch_steps += path != list(range(r + 1))
        elif greedy:
            def argmax_rows(s, e):
                rows = logits[s:e] if e <= logits.shape[0] else head(o.hidden_states[-1][0, s:e])
                return greedy_ids(rows)

            r, nxt = greedy_accept_rows(block[1:], argmax_rows, VERIFY_ROWS if lazy else size)
        else:
            r, nxt = rejection_accept(block[1:], sampling_probs(logits, temperature, top_p, top_k),
                                      draft_probs if size > 1 else logits[:0], generator)
        if tree is None:
            path = list(range(r + 1))  # the block rows committed: the anchor, then accepted drafts
        ids = block.tolist()
        committed = [ids[i] for i in path[1:]] + [nxt]
        produced = min(r + 1, max_length - start - 1)
        hit = next((i for i, t in enumerate(committed[:produced]) if t in stops), None)
        if hit is not None:
            produced, stopped = hit + 1, True
        out[start + 1 : start + 1 + produced] = torch.tensor(committed[:produced], device=device)
        if B > 1:  # the committed rows' features, after any the resting drafter has not seen
            fresh = context_features(o.hidden_states, draft.target_layer_ids)[:, path[:produced]]
            pending = fresh if drafting else torch.cat([pending, fresh], dim=1)
        if on_tokens is not None:
            on_tokens(committed[:produced])
        start += produced
        crop_cache(target_cache, start)
        result.acceptance_lengths.append(produced)
        result.accepted_drafts.append(min(r, produced))  # a cut inside the accepted drafts keeps only drafts
        result.verify_sizes.append(size)

    result.output_ids = out[None, : start + 1].clone()
    result.time_per_output_token = (_now(device) - t1) / max(result.num_output_tokens, 1)
    return result
