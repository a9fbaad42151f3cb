"""Evaluation: benchmarks decoded by each drafter (bench), acceptance math (metrics), reports."""

VERIFY_MODES = ("full", "adaptive", "both")  # whole blocks; only the drafts that pay here (VerifyCosts); both ways
