"""`draftopd eval`: drafters side by side on benchmarks; speedups, τ, tables and plots."""

import argparse

from draftopd.cli import DTYPE_CHOICES, DTYPE_HELP


def _benches(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def cmd_eval(args) -> None:
    import torch

    from draftopd.errors import DraftOPDError
    from draftopd.evaluation.bench import check_eval_dir, drafter_names, evaluate
    from draftopd.model.checkpoint import load_drafter
    from draftopd.model.target import load_target

    if args.samples <= 0:
        raise DraftOPDError(f"--samples must be positive, got {args.samples}")
    names = args.name or drafter_names(args.draft)
    if len(names) != len(args.draft) or len(set(names)) != len(names):
        raise DraftOPDError(f"--name must be given once per --draft, all different; got {names} for "
                            f"{len(args.draft)} drafter(s)")
    check_eval_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    drafts = {n: load_drafter(d) for n, d in zip(names, args.draft)}  # first: a bad path fails before the target
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = load_target(args.target, dtype=args.dtype, device=device)
    res = evaluate(target, drafts, _benches(args.bench), samples=args.samples, temperature=args.temperature,
                   max_new_tokens=args.max_new_tokens, block_size=args.block_size, thinking=args.thinking,
                   max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, out_dir=args.out, resume=args.resume,
                   overwrite=args.overwrite, offline_rollouts=args.offline_rollouts)
    for name, m in res["mean"].items():
        speed = "–" if m["speedup"] is None else f"{m['speedup']:.2f}x"
        print(f"{name}: mean speedup {speed} | mean tau {m['tau']:.2f}")
    print(f"results: {args.out}/results.md, results.json, plots in {args.out}")


def register(sub) -> None:
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
                        "sharegpt[100:] (default %(default)s)")
    s.add_argument("--samples", type=int, default=8, help="first N prompts per benchmark (default %(default)s)")
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
    s.add_argument("--offline-rollouts", default=None, metavar="DIR",
                   help="also report offline tau (exact greedy, no decoding) on this target's cached rollouts")
    s.set_defaults(func=cmd_eval)
