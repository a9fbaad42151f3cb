"""Where blocks are drafted during training: random anchors (SFT) or the on-policy walk (OPD).

Anchors are response positions: at inference the first anchor is the first generated
token (position P = prompt length) and a block at a predicts a+1..a+B-1.
"""

import torch


def random_anchors(prompt_lens: torch.Tensor, lengths: torch.Tensor, num: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `num` distinct anchors per sequence from [P, L-2] (at least one label), sorted.

    Returns anchors [b, m] and valid [b, m]; short sequences are padded with their first
    candidate and marked invalid (m = the largest count in the batch, at most num).
    """
    counts = (lengths - 1 - prompt_lens).clamp(min=0)  # candidates per sequence
    m = int(min(num, counts.max().item()))
    b = lengths.shape[0]
    anchors = torch.zeros(b, max(m, 1), dtype=torch.long)
    valid = torch.zeros(b, max(m, 1), dtype=torch.bool)
    for i in range(b):
        c = int(counts[i])
        k = min(m, c)
        if k == 0:
            anchors[i] = int(prompt_lens[i].clamp(max=lengths[i] - 1))
            continue
        pick = torch.randperm(c, generator=generator)[:k].sort().values + int(prompt_lens[i])
        anchors[i, :k] = pick
        anchors[i, k:] = pick[0]
        valid[i, :k] = True
    return anchors, valid


def accepted_prefix(drafts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Greedy acceptance r per block: leading offsets where draft == committed token.

    drafts, labels: [..., B-1] (offsets 1..B-1); a label < 0 (past the end) never matches.
    """
    return ((drafts == labels) & (labels >= 0)).int().cumprod(-1).sum(-1)


def onpolicy_walk(accept: list[int], first: int, last: int) -> tuple[list[int], list[int]]:
    """Follow verification along a fixed text: a_0 = first, a_{m+1} = a_m + r_m + 1.

    accept[a - first] is r at anchor a; `last` is the final committed position (L-1).
    Returns the anchors and the tokens committed at each (min(r+1, last - a)), exactly what
    greedy speculative decoding of this text records as acceptance lengths.
    """
    anchors, lengths = [], []
    a = first
    while a < last:
        produced = min(accept[a - first] + 1, last - a)
        anchors.append(a)
        lengths.append(produced)
        a += produced
    return anchors, lengths
