"""DFlash SFT step: random anchors, one batched replay, weighted same-position cross-entropy."""

from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from draftopd.model.drafter import DFlashDraftModel
from draftopd.training.anchors import accepted_prefix, random_anchors
from draftopd.training.batches import Batch
from draftopd.training.blocks import NO_LABEL, block_labels, replay
from draftopd.training.losses import LOGIT_ROWS, offset_weights, weighted_ce
from draftopd.training.step import StepStats
from draftopd.training.target_pass import FeatureCache, target_states

if TYPE_CHECKING:  # pydantic stays off the import path of the kernels (the GPU check runs without it)
    from draftopd.training.config import TrainConfig


class SFTStep:
    """Callable (batch, generator) -> (loss, stats): target features (cached per sequence when
    `cache_features`, since rollouts are fixed), then `sft_loss`."""

    def __init__(self, cfg: "TrainConfig", draft: DFlashDraftModel, target: PreTrainedModel):
        self.cfg, self.draft, self.target = cfg, draft, target
        self.cache = FeatureCache() if cfg.sft.cache_features else None

    def __call__(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, StepStats]:
        dtype = next(self.draft.parameters()).dtype
        if self.cache is not None:
            feats = self.cache.features(self.target, batch, self.draft.target_layer_ids, dtype)
        else:
            dev = next(self.target.parameters()).device
            feats = target_states(self.target, batch.input_ids.to(dev), batch.lengths.to(dev),
                                  self.draft.target_layer_ids).features
        return sft_loss(self.draft, self.target, batch, feats, num_anchors=self.cfg.sft.num_anchors,
                        gamma=self.cfg.sft.gamma, generator=generator)


def sft_loss(draft: DFlashDraftModel, target: PreTrainedModel, batch: Batch, features: torch.Tensor, *, num_anchors: int, gamma: float,
             generator: torch.Generator, chunk: int = LOGIT_ROWS) -> tuple[torch.Tensor, StepStats]:
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


def offset_stats(preds: torch.Tensor, labels: torch.Tensor) -> StepStats:
    """Counts to aggregate across steps: correct/total per offset and accepted prefixes."""
    has = labels >= 0
    correct = ((preds == labels) & has).sum(dim=(0, 1))
    total = has.sum(dim=(0, 1))
    blocks = has[..., 0]
    prefix = accepted_prefix(preds, labels)[blocks]
    return StepStats(scalars={"tau_prefix": 1 + float(prefix.float().mean()) if prefix.numel() else 1.0},
                     vectors={"acc_per_offset": (correct.cpu(), total.cpu())}, blocks=int(blocks.sum()))
