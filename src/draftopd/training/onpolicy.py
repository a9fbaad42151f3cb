"""The on-policy anchor walk: where greedy verification of a fixed text puts the anchors.

Under greedy lossless decoding the committed text is the target's greedy text whatever the
drafter is, and the acceptance at anchor a depends only on that text. So we draft at every
candidate anchor of a cached rollout (no grad, batched), compare with the text, and follow
a_{m+1} = a_m + r_m + 1: the anchors and acceptance lengths a live decode would record.

Drafts come from the drafter's draft head (its draft vocabulary, if it has one), as in
decoding. The LM head dominates cost, so drafts are scored progressively: offset k is scored only
for anchors whose offsets < k all matched (about tau rows per anchor instead of B-1).

The same walk is the exact greedy tau of a drafter on cached target text (`offline_tau`),
without running the decoder: the trainer's held-out curve and the evaluation's fast path.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from draftopd.model.drafter import DFlashDraftModel, DraftHead
from draftopd.training.anchors import onpolicy_walk
from draftopd.training.blocks import block_labels, replay
from draftopd.training.target_pass import target_states

ANCHOR_ROWS = 256  # candidate anchors replayed at once: [256, B, H] hidden states plus their mask


@dataclass
class Walk:
    anchors: list[int]  # positions a_m
    accepted: list[int]  # r_m (drafts accepted)
    lengths: list[int]  # tokens committed per step: min(r_m + 1, L-1-a_m)

    @property
    def tau(self) -> float:
        return sum(self.lengths) / max(len(self.lengths), 1)


@torch.no_grad()
def progressive_accept(hidden: torch.Tensor, head: DraftHead, labels: torch.Tensor) -> torch.Tensor:
    """hidden [m, B-1, H], labels [m, B-1] -> accepted prefix r [m], scoring only live rows."""
    m, K = labels.shape
    r = torch.zeros(m, dtype=torch.long, device=labels.device)
    alive = torch.arange(m, device=labels.device)
    for k in range(K):
        if alive.numel() == 0:
            break
        pred = head.greedy(hidden[alive, k])
        ok = (pred == labels[alive, k]) & (labels[alive, k] >= 0)
        r[alive[ok]] += 1
        alive = alive[ok]
    return r


@torch.no_grad()
def candidate_acceptance(draft: DFlashDraftModel, target: PreTrainedModel, features: torch.Tensor,
                         ids: torch.Tensor, prompt_len: int, length: int, chunk: int = ANCHOR_ROWS) -> torch.Tensor:
    """r at every candidate anchor a in [P, L-2] of one sequence (features [1, n, F], ids [1, n])."""
    embed, head = target.get_input_embeddings(), draft.draft_head(target.get_output_embeddings())
    B = draft.block_size
    cands = torch.arange(prompt_len, length - 1, device=ids.device)
    out = []
    for s in range(0, cands.numel(), chunk):
        a = cands[s : s + chunk][None]  # [1, m]
        hidden = replay(draft, embed, features, ids, a)[0, :, 1:]  # [m, B-1, H]
        labels = block_labels(ids, a, B, torch.tensor([length], device=ids.device))[0, :, 1:]
        out.append(progressive_accept(hidden, head, labels))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def walk_sequence(draft: DFlashDraftModel, target: PreTrainedModel, features: torch.Tensor, ids: torch.Tensor,
                  prompt_len: int, length: int) -> Walk:
    r = candidate_acceptance(draft, target, features, ids, prompt_len, length).tolist()
    anchors, lengths = onpolicy_walk(r, prompt_len, length - 1)
    return Walk(anchors, [r[a - prompt_len] for a in anchors], lengths)


@torch.no_grad()
def text_features(target: PreTrainedModel, sequences, layer_ids: list[int]) -> list[torch.Tensor]:
    """The target's context features [1, L, F] of each cached text: computed once, they serve
    the walks of every drafter that reads the same layers (comparisons over many drafters)."""
    device = next(target.parameters()).device
    out = []
    for seq in sequences:
        ids = seq.ids[None].to(device)
        out.append(target_states(target, ids, torch.tensor([ids.shape[1]], device=device), layer_ids).features)
    return out


@torch.no_grad()
def offline_walks(draft: DFlashDraftModel, target: PreTrainedModel, sequences, layer_ids=None,
                  features: list[torch.Tensor] | None = None) -> list[Walk]:
    """One walk per sequence (objects with `.ids` [L] and `.prompt_len`) over its cached text;
    `features` from `text_features` skips the target pass."""
    device = next(target.parameters()).device
    dtype = next(draft.parameters()).dtype
    walks = []
    for i, seq in enumerate(sequences):
        ids = seq.ids[None].to(device)
        feats = (features[i] if features is not None
                 else text_features(target, [seq], layer_ids or draft.target_layer_ids)[0])
        walks.append(walk_sequence(draft, target, feats.to(dtype), ids, seq.prompt_len, ids.shape[1]))
    return walks


def offline_tau(draft: DFlashDraftModel, target: PreTrainedModel, sequences) -> dict:
    """Token-weighted tau (generated tokens / verify steps) and the mean of per-sequence taus."""
    walks = offline_walks(draft, target, sequences)
    steps = sum(len(w.lengths) for w in walks)
    tokens = sum(sum(w.lengths) for w in walks)
    return {"tau": tokens / max(steps, 1), "tau_per_sample_mean": sum(w.tau for w in walks) / max(len(walks), 1),
            "steps": steps, "sequences": len(walks)}
