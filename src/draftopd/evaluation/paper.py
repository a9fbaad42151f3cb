"""`--bench paper`: the seven tasks of the Draft-OPD paper (arXiv 2605.29343), its sample counts,
and its published figures, so our runs are laid out beside the paper's table.

Tasks shipped in packages are read locally; MATH-500, MBPP and SWE-bench Lite come from the
Hugging Face Hub: MATH-500 and MBPP as the reference DFlash benchmark reads them (MBPP: the
`sanitized` test split), SWE-bench Lite's test split with its issue text as the prompt.
Prompts are the bare question, as for our embedded sets; the reference benchmark appends a
"reason step by step" line to math prompts, so absolute τ need not match the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESET = "paper"


@dataclass(frozen=True)
class PaperTask:
    name: str  # the paper's column header
    bench: str  # prompt spec
    samples: int  # prompts the paper evaluates


@dataclass(frozen=True)
class PublishedRow:
    """One drafter row of the paper's table. Per-task τ are not in our reference notes, only the mean."""

    drafter: str
    speedups: tuple[float, ...]  # per task, in TASKS order
    mean_speedup: float
    mean_tau: float


TASKS = (
    PaperTask("GSM8K", "gsm8k", 128),
    PaperTask("MATH-500", "hf:HuggingFaceH4/MATH-500:test#problem", 128),
    PaperTask("AIME25", "aime25", 30),
    PaperTask("MBPP", "hf:google-research-datasets/mbpp:sanitized:test", 128),
    PaperTask("HumanEval", "humaneval", 164),
    PaperTask("SWE-Lite", "hf:princeton-nlp/SWE-bench_Lite:test#problem_statement", 128),
    PaperTask("MT-Bench", "mt-bench", 80),
)

PUBLISHED_LABEL = "published, Qwen3-4B, H200"
PUBLISHED_SETTING = "Qwen3-4B non-thinking, one H200, greedy, batch 1, up to 2048 new tokens"
PUBLISHED = (
    PublishedRow("DFlash", (5.36, 6.35, 5.93, 5.00, 5.19, 3.05, 3.01), 4.84, 6.04),
    PublishedRow("Draft-OPD", (6.22, 7.22, 6.39, 5.40, 5.65, 3.18, 3.09), 5.31, 6.60),
)


def paper_samples(samples: int | None) -> dict[str, int]:
    """Prompts per task spec: the paper's counts, or `samples` for every task when given."""
    return {t.bench: t.samples if samples is None else samples for t in TASKS}
