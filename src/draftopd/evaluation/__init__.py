"""Evaluation: benchmarks decoded by each drafter (bench), acceptance math (metrics), reports."""

from draftopd.decoding.verify import POLICIES
from draftopd.errors import DraftOPDError


def verify_policies(text: str) -> list[str]:
    """`eval --verify` as a list of policies: one of `POLICIES`, a comma list of them (each drafter
    runs each way; the first keeps its name, the others are named "NAME POLICY"), or "both"
    (full,adaptive)."""
    policies = ["full", "adaptive"] if text == "both" else [p.strip() for p in str(text).split(",")]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies or len(set(policies)) != len(policies):
        raise DraftOPDError(f"verify: expected one of {', '.join(POLICIES)}, a comma list of them without repeats, "
                            f"or both; got {text!r}")
    return policies
