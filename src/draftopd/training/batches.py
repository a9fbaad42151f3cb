"""Training sequences from rollouts, in a deterministic order that resume can replay.

The order of epoch e is a permutation seeded by (seed, e), and micro-batch i of a run is
a pure function of (seed, i): a resumed run sees exactly the batches it would have seen.
"""

from dataclasses import dataclass

import torch

from draftopd.data.rollouts import Rollout
from draftopd.errors import DraftOPDError
from draftopd.seeds import stream


@dataclass
class Sequence:
    index: int  # position in the dataset (keys the feature cache)
    ids: torch.Tensor  # [L] prompt + response
    prompt_len: int
    conversation: str = ""  # a later turn's first turn's id (its prompt holds that turn's answer)
    later_turn: bool = False


@dataclass
class Batch:
    indices: list[int]
    input_ids: torch.Tensor  # [b, n] right-padded with 0
    lengths: torch.Tensor  # [b]
    prompt_lens: torch.Tensor  # [b]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def build_sequences(rollouts: list[Rollout], max_length: int, first_index: int = 0) -> list[Sequence]:
    seqs = []
    for r in rollouts:
        ids = (list(r.prompt_ids) + list(r.response_ids))[:max_length]
        if len(ids) - len(r.prompt_ids) < 2:  # need an anchor and one label inside the response
            continue
        seqs.append(Sequence(first_index + len(seqs), torch.tensor(ids, dtype=torch.long), len(r.prompt_ids),
                             r.meta.get("conversation", r.id), r.meta.get("turn", 1) > 1))
    if not seqs:
        raise DraftOPDError(f"no usable rollouts: every response is empty or shorter than 2 tokens "
                            f"(or prompts exceed data.max_length={max_length})")
    return seqs


def split_heldout(seqs: list[Sequence], fraction: float, seed: int) -> tuple[list[Sequence], list[Sequence]]:
    """A fixed held-out share for offline tau; the rest trains. It is drawn among first turns, and
    a later turn goes where its conversation's first turn went (its prompt holds that turn's
    answer), so a directory that gains later turns (`rollout --turns`) keeps its split."""
    if fraction <= 0:
        return seqs, []
    firsts = [i for i, s in enumerate(seqs) if not s.later_turn]
    order = torch.randperm(len(firsts), generator=stream(seed, "heldout")).tolist()
    drawn = {firsts[j] for j in order[:max(1, int(len(firsts) * fraction))]}
    held_conversations = {seqs[i].conversation for i in drawn}
    held = {i for i, s in enumerate(seqs) if s.conversation in held_conversations}
    train = [s for i, s in enumerate(seqs) if i not in held]
    return train, [seqs[i] for i in sorted(held)]


def training_split(rollout_sets: dict[str, list[Rollout]], max_length: int, fraction: float,
                   seed: int) -> tuple[list[Sequence], list[Sequence]]:
    """(train, held-out) over named rollout sets: each set is split on its own, as if it were the
    only one, so a set's held-out rollouts stay held out when more sets join it; sequence indices
    run on across the sets."""
    train, held = [], []
    for name, rollouts in rollout_sets.items():
        try:
            seqs = build_sequences(rollouts, max_length, first_index=len(train) + len(held))
        except DraftOPDError as e:
            raise DraftOPDError(f"{name}: {e}") from None
        t, h = split_heldout(seqs, fraction, seed)
        train.extend(t)
        held.extend(h)
    return train, held


def collate(seqs: list[Sequence]) -> Batch:
    n = max(len(s.ids) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = s.ids
    return Batch([s.index for s in seqs], ids, torch.tensor([len(s.ids) for s in seqs]),
                 torch.tensor([s.prompt_len for s in seqs]))


class BatchPlan:
    """Micro-batch i -> sequences, for any i, with sharding over `world` processes."""

    def __init__(self, seqs: list[Sequence], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.seqs, self.batch_size, self.seed, self.rank, self.world = seqs, batch_size, seed, rank, world
        self.global_batch = batch_size * world
        self.per_epoch = max(1, len(seqs) // self.global_batch)  # drop the ragged tail: equal work per rank
        self._order: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            g = stream(self.seed, "epoch", epoch)
            self._order = {epoch: torch.randperm(len(self.seqs), generator=g).tolist()}
        return self._order[epoch]

    def micro_batch(self, i: int) -> Batch:
        epoch, j = divmod(i, self.per_epoch)
        order = self.order(epoch)
        start = j * self.global_batch + self.rank * self.batch_size
        picked = [order[k % len(order)] for k in range(start, start + self.batch_size)]
        return collate([self.seqs[k] for k in picked])
