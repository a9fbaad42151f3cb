"""Token distributions and the acceptance rules of one verify step (re-exported).

They live in `draftopd.dflash`, the self-contained module every checkpoint carries as its
remote code. Greedy: accept the longest prefix where draft == target argmax, then the
target's token. Sampling: standard speculative rejection sampling; the committed tokens are
distributed exactly as the target's (tempered, top-k/top-p filtered) distribution.
"""

from draftopd.dflash import greedy_accept, greedy_accept_rows, rejection_accept, sample, sampling_probs  # noqa: F401
