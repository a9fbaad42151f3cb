"""Draft vocabularies: the tokens a drafter may propose, most frequent first (FR-Spec).

A small drafter's step is mostly the target's LM head over its B-1 drafted rows (here the
49152 x 576 head is ~60% of a 2-layer drafter's step in bf16, ~90% in fp32). Drafting from
the few thousand tokens that make up nearly all of the target's text makes that head ~10-20x
cheaper; decoding stays lossless because the target still verifies every draft, and only a
draft that needed a rare token is lost (`DraftHead` in `draftopd.dflash`).

On disk a drafter directory may hold `token_map.pt`: a 1-D int64 tensor of token ids, the
format SGLang's `--speculative-token-map` reads (`torch.load(..., weights_only=True)`).
`draftopd.dflash` reads and writes it (remote code attaches it too); `load_drafter` attaches
it, `save_drafter` writes it back. We build it here from the target's own responses
(rollouts), the text the drafter is asked to predict.
"""

from collections.abc import Iterable, Sequence

import torch

from draftopd.errors import DraftOPDError


def token_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in `sequences` -> [vocab_size] counts."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        if len(seq):
            counts += torch.bincount(torch.as_tensor(seq, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    return counts


def frequent_tokens(counts: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent token ids (most frequent first; ties by id) and the share of all
    counted tokens they cover. Tokens never seen are not included, so the result may be shorter."""
    if size < 1:
        raise DraftOPDError(f"draft vocabulary size must be at least 1, got {size}")
    seen = int((counts > 0).sum())
    if seen == 0:
        raise DraftOPDError("no tokens to count: the rollouts hold no response tokens")
    order = torch.argsort(-counts, stable=True)[: min(size, seen)]
    return order, float(counts[order].sum()) / float(counts.sum())
