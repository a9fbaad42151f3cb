"""Verify policies: which drafted tokens the target checks in each step's one pass.

- full: the drafter's whole block (DFlash as published; tau comparable with the paper's);
- adaptive: the prefix of the block that pays for its wider pass at this machine's measured
  costs, resting the drafter where drafts do not pay (`VerifyCosts`);
- tree (greedy): a tree of the drafter's likeliest paths, its top choices at each offset, up to
  `TREE_TOKENS_PER_BLOCK` x B tokens, cut each step to the size that pays at the same costs
  (`draft_tree`). The drafter's pass already scores every candidate, so the tree costs only the
  wider verify.

Every policy is lossless: it decides what to verify from the drafter's outputs alone.
"""

from __future__ import annotations

from draftopd.errors import DraftOPDError

POLICIES = ("full", "adaptive", "tree")
TREE_TOKENS_PER_BLOCK = 2  # measured on the shipped drafter (B = 4): 8 tokens was best or within 1% on both CPUs


def verify_options(policy: str, target, draft, block_size: int | None = None, temperature: float = 0.0) -> dict:
    """`spec_generate` keywords for `policy` with `draft` on `target`: measures this machine's
    verify costs (about a second) unless the policy is full."""
    from draftopd.decoding.costs import measure_verify_costs

    if policy not in POLICIES:
        raise DraftOPDError(f"verify policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "tree" and temperature != 0:
        raise DraftOPDError(f"verify tree is greedy-only (temperature 0), got temperature {temperature}; "
                            "use adaptive or full when sampling")
    B = block_size or draft.block_size
    if policy == "full" or B < 2:
        return {}
    tokens = TREE_TOKENS_PER_BLOCK * B if policy == "tree" else None
    return {"verify_costs": measure_verify_costs(target, draft, B, tokens=tokens), "tree_tokens": tokens}
