"""What a training method gives the trainer: a step, (batch, generator) -> (loss, StepStats)."""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from draftopd.training.batches import Batch


@dataclass
class StepStats:
    """One micro-batch's report: `scalars` are averaged between log lines, `vectors` are
    per-offset (numerator, denominator) counts summed before dividing, `blocks` is the
    number of replayed blocks (anchors) trained."""

    scalars: dict[str, float] = field(default_factory=dict)
    vectors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    blocks: int = 0


class Step(Protocol):
    def __call__(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, StepStats]: ...
