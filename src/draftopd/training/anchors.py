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


def shuffled_segments(segments: list[int], first: int, last: int, generator: torch.Generator | None = None
                      ) -> tuple[list[int], list[int]]:
    """The random-anchor ablation as the public Draft-OPD code draws it.

    `segments` are the forward-stream token counts of the on-policy blocks (a block at a
    scores a+1..a+s). They are laid over positions first+1..last in random order, without
    overlap, the positions they leave uncovered spread as random gaps between them: the
    same amount of forward signal per segment, at anchors the drafter did not choose.
    Returns the anchors and the segment lengths in their new order.
    """
    spare = (last - first) - sum(segments)
    if spare < 0 or min(segments, default=1) < 1:
        raise ValueError(f"segments {segments} do not fit in positions {first + 1}..{last}")
    order = torch.randperm(len(segments), generator=generator).tolist()
    gaps = torch.zeros(len(segments) + 1, dtype=torch.long)
    gaps.index_add_(0, torch.randint(len(segments) + 1, (spare,), generator=generator),
                    torch.ones(spare, dtype=torch.long))  # each uncovered position joins a random gap
    anchors, cursor = [], first + int(gaps[0])
    for j, i in enumerate(order):
        anchors.append(cursor)
        cursor += segments[i] + int(gaps[j + 1])
    return anchors, [segments[i] for i in order]
