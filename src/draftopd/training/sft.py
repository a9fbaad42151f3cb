"""DFlash SFT step: random anchors, one batched replay, weighted same-position cross-entropy."""

import torch

from draftopd.training.anchors import accepted_prefix, random_anchors
from draftopd.training.blocks import NO_LABEL, block_labels, replay
from draftopd.training.losses import LOGIT_ROWS, offset_weights, weighted_ce


def sft_loss(draft, target, batch, features: torch.Tensor, *, num_anchors: int, gamma: float,
             generator: torch.Generator, chunk: int = LOGIT_ROWS) -> tuple[torch.Tensor, dict]:
    """Loss and per-offset statistics for one micro-batch."""
    device = features.device
    B = draft.block_size
    anchors, valid = random_anchors(batch.prompt_lens, batch.lengths, num_anchors, generator)
    anchors, valid = anchors.to(device), valid.to(device)
    ids = batch.input_ids.to(device)
    labels = block_labels(ids, anchors, B, batch.lengths.to(device))[..., 1:]  # [b, m, B-1]
    labels = labels.masked_fill(~valid[..., None], NO_LABEL)
    hidden = replay(draft, target.get_input_embeddings(), features, ids, anchors)[:, :, 1:]  # [b, m, B-1, H]
    w = offset_weights(B, gamma).to(device).expand_as(labels)
    head = target.get_output_embeddings().weight
    loss, preds = weighted_ce(hidden.reshape(-1, hidden.shape[-1]), head, labels.reshape(-1), w.reshape(-1), chunk)
    preds = preds.view_as(labels)
    return loss, offset_stats(preds, labels)


def offset_stats(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    """Counts to aggregate across steps: correct/total per offset and accepted prefixes."""
    has = labels >= 0
    correct = ((preds == labels) & has).sum(dim=(0, 1))
    total = has.sum(dim=(0, 1))
    blocks = has[..., 0]
    prefix = accepted_prefix(preds, labels)[blocks]
    return {"vectors": {"acc_per_offset": (correct.cpu(), total.cpu())},
            "scalars": {"tau_prefix": 1 + float(prefix.float().mean()) if prefix.numel() else 1.0},
            "blocks": int(blocks.sum())}
