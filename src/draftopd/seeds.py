"""Seeds for a run's random streams, all derived from its one seed.

Each stream (an epoch's order, a micro-batch's anchors, a live decode, an evaluation sample)
is named by keys; the same keys give the same stream, which is what makes a resumed run
replay exactly, and different keys give unrelated streams (a hash, not `seed + i`, so runs
with neighbouring seeds do not share streams shifted by one).
"""

import hashlib

import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 62-bit seed for the stream named by `keys` in a run seeded with `seed`."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def stream(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for the stream named by `keys` (see `derive_seed`)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))
