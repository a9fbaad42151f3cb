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
    ap.add_argument("--start", required=True, help="SFT drafter both runs start from")
    ap.add_argument("--rollouts", required=True)
    ap.add_argument("--minutes", type=float, default=4.0, help="wall time of each run")
    ap.add_argument("--heldout", default="gsm8k[1200:1212]", help="prompts for decoded tau")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
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
              "max_minutes": args.minutes, "draft": {"init": args.start, "block_size": start.block_size},
              "data": {"rollouts": args.rollouts, "max_length": 384}, "log": {"every": 10, "save_every": 10_000}}
    runs = {}
    for name, extra in (
        ("sft-continued", {"method": "sft", "batch_size": 4, "sft": {"num_anchors": 48, "gamma": 4.0},
                           "optim": {"lr": 3e-4, "warmup_ratio": 0.05, "min_lr_ratio": 0.1}}),
        ("draft-opd", {"method": "opd", "batch_size": 2, "opd": {"max_anchors": 48},
                       "optim": {"lr": 3e-4, "warmup_ratio": 0.05, "min_lr_ratio": 0.1}}),
    ):
        out = Path(args.out) / f"{name}-seed{args.seed}"
        res = train(load_config(None, base={**common, **extra, "out_dir": str(out)}))
        runs[name] = (res.final_drafter, res.steps)

    target = load_target("smollm2-135m", dtype="fp32")
    prompts = load_prompts(args.heldout)
    taus = {"start (SFT checkpoint)": (decoded_tau(start, target, prompts, args.max_new_tokens), 0)}
    for name, (path, steps) in runs.items():
        taus[name] = (decoded_tau(load_drafter(path), target, prompts, args.max_new_tokens), steps)

    print(f"\nheld-out {args.heldout}, greedy fp32, {args.max_new_tokens} new tokens, {args.minutes} min per run, "
          f"seed {args.seed}")
    print(f"{'drafter':<24} {'steps':>6} {'tau':>7}")
    for name, (tau, steps) in taus.items():
        print(f"{name:<24} {steps:>6} {tau:>7.3f}")
    ratio = taus["draft-opd"][0] / taus["sft-continued"][0]
    print(f"\nOPD / continued SFT: {ratio:.3f}x (goal >= 1.05x)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"result-seed{args.seed}.json").write_text(json.dumps(
        {"taus": {k: v[0] for k, v in taus.items()}, "steps": {k: v[1] for k, v in taus.items()},
         "ratio": ratio, "minutes": args.minutes, "seed": args.seed}, indent=2))


if __name__ == "__main__":
    main()
