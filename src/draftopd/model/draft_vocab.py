"""Draft vocabularies: the tokens a drafter may propose, most frequent first (FR-Spec).

A small drafter's step is mostly the target's LM head over its B-1 drafted rows (here the
49152 x 576 head is ~60% of a 2-layer drafter's step in bf16, ~90% in fp32). Drafting from
the few thousand tokens that make up nearly all of the target's text makes that head ~10-20x
cheaper; decoding stays lossless because the target still verifies every draft, and only a
draft that needed a rare token is lost (`DraftHead` in `draftopd.dflash`).

On disk a drafter directory may hold `token_map.pt`: a 1-D int64 tensor of token ids, the
format SGLang's `--speculative-token-map` reads (`torch.load(..., weights_only=True)`).
`load_drafter` attaches it; `save_drafter` writes it back. We build it from the target's own
responses (rollouts), the text the drafter is asked to predict.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from draftopd.dflash import check_draft_vocab
from draftopd.errors import DraftOPDError

TOKEN_MAP = "token_map.pt"


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


def read_token_map(path: str | Path, vocab_size: int) -> torch.Tensor:
    """A token map file (a tensor or list of token ids) as a checked 1-D int64 tensor."""
    path = Path(path)
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


def write_token_map(ids: torch.Tensor, path: str | Path) -> None:
    """Save as SGLang reads it: one int64 tensor."""
    torch.save(ids.detach().to(device="cpu", dtype=torch.long).clone(), Path(path))  # its own storage, not a view's
