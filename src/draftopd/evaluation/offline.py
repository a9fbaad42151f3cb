"""Offline tau: exact greedy acceptance on cached target text, without running the decoder."""

import torch

from draftopd.training.onpolicy import Walk, walk_sequence
from draftopd.training.target_pass import target_states


@torch.no_grad()
def offline_walks(draft, target, sequences, layer_ids=None) -> list[Walk]:
    """One walk per sequence (objects with `.ids` [L] and `.prompt_len`)."""
    device = next(target.parameters()).device
    walks = []
    for s in sequences:
        ids = s.ids[None].to(device)
        L = ids.shape[1]
        feats = target_states(target, ids, torch.tensor([L], device=device), layer_ids or draft.target_layer_ids).features
        walks.append(walk_sequence(draft, target, feats.to(next(draft.parameters()).dtype), ids, s.prompt_len, L))
    return walks


def offline_tau(draft, target, sequences) -> dict:
    """Token-weighted tau (generated tokens / verify steps) and the mean of per-sequence taus."""
    walks = offline_walks(draft, target, sequences)
    steps = sum(len(w.lengths) for w in walks)
    tokens = sum(sum(w.lengths) for w in walks)
    return {"tau": tokens / max(steps, 1), "tau_per_sample_mean": sum(w.tau for w in walks) / max(len(walks), 1),
            "steps": steps, "sequences": len(walks)}
