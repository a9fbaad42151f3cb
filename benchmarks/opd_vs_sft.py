"""Equal compute from one SFT checkpoint: continued SFT vs Draft-OPD, judged by decoded tau.

The small-scale version of the paper's claim. Both runs start from the same drafter, get the
same wall time on the same rollouts, and are then measured with `spec_generate` (greedy,
fp32) on held-out prompts. Goal: OPD tau >= 1.05x continued-SFT tau.

    python benchmarks/opd_vs_sft.py --start runs/demo/sft/final --rollouts runs/demo/rollouts --minutes 4
"""

import argparse
import json
from pathlib import Path

import torch


def decoded_tau(draft, target, prompts, max_new_tokens: int) -> float:
    from draftopd.data.prompts import apply_chat_template
    from draftopd.decoding.speculative import spec_generate
    from draftopd.model.target import stop_token_ids

    stops = stop_token_ids(target.tokenizer, target.model)
    steps = tokens = 0
    for p in prompts:
        ids = torch.tensor([apply_chat_template(target.tokenizer, p.messages)])
        res = spec_generate(draft, target, ids, max_new_tokens, stop_token_ids=stops)
        steps += len(res.acceptance_lengths)
        tokens += sum(res.acceptance_lengths)
    return tokens / max(steps, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", required=True, help="SFT drafter every run starts from")
    ap.add_argument("--rollouts", required=True)
    ap.add_argument("--minutes", type=float, default=4.0, help="wall time of each run")
    ap.add_argument("--heldout", default="gsm8k[1200:1212]", help="prompts for decoded tau")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per step, every run")
    ap.add_argument("--anchors", type=int, default=48, help="SFT random anchors / OPD anchor cap per sequence")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VAL[,KEY=VAL]",
                    help="an OPD run with config overrides, e.g. 'sampled=opd.loss=sampled' (repeatable; "
                         "default: one run with the configured loss)")
    ap.add_argument("--out", default="runs/opd-vs-sft")
    ap.add_argument("--target-dtype", default="bf16", choices=["fp32", "bf16"], help="training target dtype")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from draftopd.data.prompts import load_prompts
    from draftopd.model.checkpoint import load_drafter
    from draftopd.model.target import load_target
    from draftopd.training.config import load_config
    from draftopd.training.trainer import train

    start = load_drafter(args.start)
    common = {"target": "smollm2-135m", "target_dtype": args.target_dtype, "seed": args.seed, "epochs": 1000,
              "max_minutes": args.minutes, "batch_size": args.batch_size,
              "draft": {"init": args.start, "block_size": start.block_size},
              "data": {"rollouts": args.rollouts, "max_length": 384, "eval_fraction": 0.1},
              "optim": {"lr": args.lr, "warmup_ratio": 0.05, "min_lr_ratio": 0.1},
              "log": {"every": 10, "save_every": 10_000}}
    arms = [("sft-continued", {"method": "sft", "sft": {"num_anchors": args.anchors, "gamma": 4.0}}, [])]
    for spec in args.variant or ["draft-opd="]:
        name, _, overrides = spec.partition("=")
        arms.append((name, {"method": "opd", "opd": {"max_anchors": args.anchors}},
                     [o for o in overrides.split(",") if o]))
    runs = {}
    for name, extra, overrides in arms:
        out = Path(args.out) / f"{name}-seed{args.seed}"
        res = train(load_config(None, overrides, base={**common, **extra, "out_dir": str(out)}))
        runs[name] = (res.final_drafter, res.steps, res.heldout["tau"], " ".join(overrides))

    target = load_target("smollm2-135m", dtype="fp32")
    prompts = load_prompts(args.heldout)
    rows = {"start (SFT checkpoint)": (decoded_tau(start, target, prompts, args.max_new_tokens), 0, None, "")}
    for name, (path, steps, offline, overrides) in runs.items():
        rows[name] = (decoded_tau(load_drafter(path), target, prompts, args.max_new_tokens), steps, offline, overrides)

    print(f"\nheld-out prompts {args.heldout}, greedy fp32, {args.max_new_tokens} new tokens; {args.minutes} min "
          f"per run, batch {args.batch_size}, lr {args.lr}, seed {args.seed}")
    print(f"{'drafter':<24} {'steps':>6} {'tau (walk, held-out rollouts)':>30} {'tau (decoded)':>14}  overrides")
    for name, (tau, steps, offline, overrides) in rows.items():
        walk = "" if offline is None else f"{offline:.3f}"
        print(f"{name:<24} {steps:>6} {walk:>30} {tau:>14.3f}  {overrides}")
    sft_tau = rows["sft-continued"][0]
    for name in runs:
        if name != "sft-continued":
            print(f"{name} / continued SFT: {rows[name][0] / sft_tau:.3f}x (goal >= 1.05x)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"result-seed{args.seed}.json").write_text(json.dumps(
        {"rows": {k: dict(zip(("tau_decoded", "steps", "tau_walk_heldout", "overrides"), v)) for k, v in rows.items()},
         "minutes": args.minutes, "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
         "heldout": args.heldout}, indent=2))


if __name__ == "__main__":
    main()
