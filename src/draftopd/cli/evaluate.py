"""`draftopd eval`: drafters side by side on benchmarks; speedups, τ, tables and plots."""

import argparse
import sys

from draftopd.cli import DTYPE_CHOICES, DTYPE_HELP
from draftopd.data.prompts import hub_dataset
from draftopd.decoding.verify import POLICIES
from draftopd.evaluation.paper import PRESET, TASKS, paper_samples

SAMPLES = 8


def _benches(args) -> tuple[list[str], int | dict[str, int], str | None]:
    """(benchmark specs, prompts per benchmark, preset); `--bench paper` expands to the paper's
    tasks and counts, any --samples replacing every count."""
    from draftopd.errors import DraftOPDError

    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    if benches == [PRESET]:
        counts = paper_samples(args.samples)
        return list(counts), counts, PRESET
    if PRESET in benches:
        raise DraftOPDError(f"--bench {PRESET} stands alone; got {args.bench!r}")
    return benches, args.samples or SAMPLES, None


def _drop_unavailable(benches: list[str], skip: bool) -> list[str]:
    """Refuse, or with `skip` leave out, benchmarks the Hugging Face Hub would serve but cannot now."""
    from draftopd.errors import DraftOPDError
    from draftopd.evaluation.bench import hub_problems

    problems = hub_problems(benches)
    if not problems:
        return benches
    names = {t.bench: t.name for t in TASKS}
    missing = ", ".join(names.get(b, b) for b in problems)
    why = "; ".join(dict.fromkeys(problems.values()))
    if not skip:
        raise DraftOPDError(f"cannot read {missing} from the Hugging Face Hub: {why}; or pass --skip-unavailable "
                            "to run the other benchmarks")
    kept = [b for b in benches if b not in problems]
    if not kept:
        raise DraftOPDError(f"nothing left to run: cannot read {missing} from the Hugging Face Hub: {why}")
    print(f"draftopd eval: skipping {missing}: {why}", file=sys.stderr)
    return kept


def cmd_eval(args) -> None:
    import torch

    from draftopd.errors import DraftOPDError
    from draftopd.evaluation.bench import check_eval_dir, drafter_names, evaluate
    from draftopd.model.checkpoint import load_drafter
    from draftopd.model.target import load_target

    if args.samples is not None and args.samples <= 0:
        raise DraftOPDError(f"--samples must be positive, got {args.samples}")
    names = args.name or drafter_names(args.draft)
    if len(names) != len(args.draft) or len(set(names)) != len(names):
        raise DraftOPDError(f"--name must be given once per --draft, all different; got {names} for "
                            f"{len(args.draft)} drafter(s)")
    check_eval_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    benches, samples, preset = _benches(args)
    benches = _drop_unavailable(benches, args.skip_unavailable)
    drafts = {n: load_drafter(d) for n, d in zip(names, args.draft)}  # first: a bad path fails before the target
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = load_target(args.target, dtype=args.dtype, device=device)
    res = evaluate(target, drafts, benches, samples=samples, temperature=args.temperature,
                   max_new_tokens=args.max_new_tokens, block_size=args.block_size, thinking=args.thinking,
                   max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, out_dir=args.out, resume=args.resume,
                   overwrite=args.overwrite, offline_rollouts=args.offline_rollouts, preset=preset,
                   verify=args.verify)
    for name, m in res["mean"].items():
        speed = "–" if m["speedup"] is None else f"{m['speedup']:.2f}x"
        print(f"{name}: mean speedup {speed} | mean tau {m['tau']:.2f}")
    print(f"results: {args.out}/results.md, results.json, plots in {args.out}")


def register(sub) -> None:
    hub = [t.name for t in TASKS if hub_dataset(t.bench)]
    s = sub.add_parser(
        "eval", help="speculative decoding speedup and acceptance of drafters on benchmarks",
        description="Decode the first N prompts of each benchmark with each drafter, the target alone in the same "
                    "loop (block size 1) and HF generate, all in this process; write OUT/results.json, "
                    "OUT/results.md (rows drafters, columns benchmarks, cells speedup / tau) and PNG plots. "
                    "Every run is appended to OUT/samples.jsonl as it finishes, so --resume continues a killed run.",
    )
    s.add_argument("--target", default="smollm2-135m", help="HF id, local path or embedded alias (default %(default)s)")
    s.add_argument("--draft", action="append", required=True, help="drafter directory; repeat to compare several")
    s.add_argument("--name", action="append", help="display name per --draft, in order (default: directory names)")
    s.add_argument("--bench", default="gsm8k,humaneval,mt-bench",
                   help="comma-separated benchmarks: embedded sets or prompt specs, e.g. gsm8k,my.jsonl,"
                        f"sharegpt[100:] (default %(default)s); '{PRESET}' alone: the Draft-OPD paper's seven tasks "
                        f"({', '.join(t.name for t in TASKS)}), {', '.join(hub)} read from the Hugging Face Hub, "
                        "and results.md laid out like the paper's table beside its published rows")
    s.add_argument("--samples", type=int, default=None,
                   help=f"first N prompts per benchmark (default {SAMPLES}; with --bench {PRESET}, the paper's count "
                        f"per task: {', '.join(f'{t.name} {t.samples}' for t in TASKS)}; N given here replaces "
                        "every count)")
    s.add_argument("--skip-unavailable", action="store_true",
                   help="leave out benchmarks read from the Hugging Face Hub when it cannot serve them now (no "
                        "network, HF_HUB_OFFLINE without a cached copy, no `datasets`) and run the rest; by "
                        "default such a run stops before anything runs, naming them")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, checked lossless (default)")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--block-size", type=int, default=None, help="verify this many tokens per step (default: drafter's)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="skip longer prompts (chat-templated)")
    s.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="chat template thinking switch for targets that have one (Qwen3)")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help=f"target and drafter weights; {DTYPE_HELP} (default %(default)s)")
    s.add_argument("--device", default=None, help="e.g. cuda:1 (default: cuda if available, else cpu)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (per sample: seed + hash of its id)")
    s.add_argument("--out", default="runs/eval", help="output directory (default %(default)s)")
    s.add_argument("--resume", action="store_true", help="skip runs already in OUT/samples.jsonl")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in OUT")
    s.add_argument("--verify", default="full", metavar="POLICY[,POLICY]",
                   help=f"one of {', '.join(POLICIES)}, or a comma list (each drafter runs each way; the first keeps "
                        "its name, the others are named 'NAME POLICY'; 'both' = full,adaptive). full: verify every "
                        "drafted block whole (tau as published; default); adaptive: measure this machine's verify "
                        "cost per width first, then verify only the drafts whose expected acceptance pays for it; "
                        "tree (greedy): verify a tree of the drafter's likeliest paths (its top choices at each "
                        "offset), cut each step to the size that pays at the same costs")
    s.add_argument("--offline-rollouts", default=None, metavar="DIR",
                   help="also report offline tau (exact greedy, no decoding) on this target's cached rollouts")
    s.set_defaults(func=cmd_eval)
