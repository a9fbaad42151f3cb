"""The DFlash block drafter: Qwen3-style layers whose keys/values also see target context.

Self-contained on purpose (torch + transformers only): this file is written into every
checkpoint as part of `dflash.py`, so `AutoModel.from_pretrained(dir, trust_remote_code=True)`
works without draftopd installed. The drafter has no embedding and no LM head; it borrows
the target's (frozen) ones.

Shapes: b batch, q block/query tokens, n context tokens, H hidden, h heads, g kv heads, d head dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from draftopd.errors import DraftOPDError


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """One draft layer reads the middle target layer; more read layers spread over 1..L-3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def context_features(hidden_states, layer_ids: list[int]) -> torch.Tensor:
    """Concatenate decoder-layer outputs ([b, n, H] each -> [b, n, len(layer_ids)*H]).

    transformers puts the embedding output at `hidden_states[0]`, so layer L is `[L + 1]`.
    """
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


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

    def forward(self, x, ctx, rope_q, rope_c, mask, cache: ContextCache | None, layer: int) -> torch.Tensor:
        b, q, _ = x.shape
        query = self.q_norm(self.q_proj(x).view(b, q, self.h, self.d)).transpose(1, 2)
        query = apply_rope(query, *rope_q)
        k_blk, v_blk = self.kv(x, *rope_q)
        k_ctx, v_ctx = self.kv(ctx, *rope_c)
        if cache is not None:
            k_ctx, v_ctx = cache.append(layer, k_ctx, v_ctx)
        k = torch.cat([k_ctx, k_blk], dim=2)  # [b, g, n+q, d]
        v = torch.cat([v_ctx, v_blk], dim=2)
        if self.g != self.h:
            k = k.repeat_interleave(self.h // self.g, dim=1)
            v = v.repeat_interleave(self.h // self.g, dim=1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=1 / math.sqrt(self.d))
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

    def forward(self, x, ctx, rope_q, rope_c, mask, cache, layer):
        # The context is already normalised by `hidden_norm`; only block tokens get input_layernorm.
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope_q, rope_c, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        block_embeds: torch.Tensor,  # [b, q, H] target embeddings of the block tokens
        context: torch.Tensor,  # [b, n, len(target_layer_ids)*H] raw target features
        block_positions: torch.LongTensor,  # [b, q]
        context_positions: torch.LongTensor,  # [b, n]
        attention_mask: torch.Tensor | None = None,  # bool [b|1, 1, q, cached+n+q], True = visible
        cache: ContextCache | None = None,
    ) -> torch.Tensor:  # [b, q, H] final hidden; score with the target's LM head
        ctx = self.hidden_norm(self.fc(context.to(self.fc.weight.dtype)))
        x = block_embeds.to(ctx.dtype)
        rope_q = self.rotary(block_positions, x.dtype)
        rope_c = self.rotary(context_positions, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, ctx, rope_q, rope_c, attention_mask, cache, i, use_reentrant=False
                )
            else:
                x = layer(x, ctx, rope_q, rope_c, attention_mask, cache, i)
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

    def compute_logits(self, hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """Score drafted positions with the target's LM head ([..., H] -> [..., V]), in its dtype."""
        return head(hidden.to(head.weight.dtype))

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
        from draftopd.decoding.speculative import spec_generate

        result = spec_generate(
            self, target, input_ids, max_new_tokens,
            temperature=temperature, stop_token_ids=stop_token_ids, **kwargs,
        )
        return result.output_ids
