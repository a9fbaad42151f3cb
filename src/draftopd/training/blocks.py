"""Batched drafter replay: many blocks of one sequence in a single forward.

Keys are [context (all n positions) | block 0 | block 1 | ...]; a query in block j sees
context positions < a_j and its own block (bidirectionally), nothing else. That equals
drafting each block alone at inference (tested), at the cost of a dense boolean mask,
which is what CPUs need; GPUs could use FlexAttention with the same rule.

Shapes: b sequences, n positions, m anchors per sequence, B block size, F feature width.
"""

import torch

NO_LABEL = -100  # a block position with no label (past the text, or not trained on): cross-entropy skips it


def block_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, m] anchors -> [b, m, B] absolute positions a_j + k."""
    return anchors[..., None] + torch.arange(block_size, device=anchors.device)


def block_sparse_mask(anchors: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """[b, m] anchors -> bool [b, 1, m*B, n + m*B]; True = visible."""
    b, m = anchors.shape
    B = block_size
    ctx = torch.arange(seq_len, device=anchors.device)
    sees_ctx = ctx[None, None, :] < anchors[..., None]  # [b, m, n]
    sees_ctx = sees_ctx[:, :, None, :].expand(b, m, B, seq_len)
    block_id = torch.arange(m, device=anchors.device)
    own = (block_id[:, None] == block_id[None, :])  # [m, m]
    sees_blk = own[:, None, :, None].expand(m, B, m, B).reshape(m, B, m * B)
    sees_blk = sees_blk[None].expand(b, m, B, m * B)
    mask = torch.cat([sees_ctx, sees_blk], dim=-1)  # [b, m, B, n + m*B]
    return mask.reshape(b, 1, m * B, seq_len + m * B)


def block_inputs(input_ids: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int) -> torch.Tensor:
    """[b, n] ids, [b, m] anchors -> [b, m, B] block tokens [x_a, mask, mask, ...]."""
    b, m = anchors.shape
    blocks = torch.full((b, m, block_size), mask_token_id, dtype=torch.long, device=input_ids.device)
    blocks[..., 0] = input_ids.gather(1, anchors)
    return blocks


def block_labels(input_ids: torch.Tensor, anchors: torch.Tensor, block_size: int, lengths: torch.Tensor,
                 ignore: int = NO_LABEL) -> torch.Tensor:
    """Same-position labels: offset k of block j is the committed token at a_j + k ([b, m, B]).

    Offset 0 (the anchor itself) and positions past a sequence's length get `ignore`.
    """
    pos = block_positions(anchors, block_size)  # [b, m, B]
    inside = pos < lengths[:, None, None]
    labels = input_ids.gather(1, pos.clamp(max=input_ids.shape[1] - 1).flatten(1)).view_as(pos)
    labels = labels.masked_fill(~inside, ignore)
    labels[..., 0] = ignore
    return labels


def replay(draft, embed, features: torch.Tensor, input_ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Draft every block of every sequence in one forward -> final hidden [b, m, B, H]."""
    b, n = input_ids.shape
    m, B = anchors.shape[1], draft.block_size
    blocks = block_inputs(input_ids, anchors, B, draft.mask_token_id)
    ctx_pos = torch.arange(n, device=input_ids.device).expand(b, n)
    hidden = draft(
        embed(blocks.view(b, m * B)),
        features,
        block_positions=block_positions(anchors, B).view(b, m * B),
        context_positions=ctx_pos,
        attention_mask=block_sparse_mask(anchors, n, B),
    )
    return hidden.view(b, m, B, -1)
