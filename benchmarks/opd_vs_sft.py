"""Equal compute from one SFT checkpoint: continued SFT vs Draft-OPD, judged by decoded tau.

The small-scale version of the paper's claim. Every run starts from the same drafter, gets
the same wall time on the same rollouts (the same held-out split), and is then measured
with `spec_generate` (greedy, fp32) on held-out prompts; the ratio to continued SFT comes
with a 95% bootstrap interval over prompts. Goal: OPD tau >= 1.05x continued-SFT tau.

Start from an SFT drafter that has stopped improving (its held-out tau flat; the paper
starts OPD from a 6-epoch SFT drafter): from an early one, SFT's dense labels still win.
The measured protocol (README):

    draftopd demo        # rollouts (gsm8k[:160],sharegpt[:32]) and a 3-minute SFT drafter in runs/demo
    draftopd train --config configs/sft-smollm2.yaml draft.init=runs/demo/sft/final \
        data.rollouts=runs/demo/rollouts target_dtype=bf16 epochs=1000 max_minutes=22 sft.num_anchors=48 \
        optim.warmup_ratio=0.02 optim.min_lr_ratio=0.1 log.eval_every=60 out_dir=runs/sft-plateau
    python benchmarks/opd_vs_sft.py --start runs/sft-plateau/final --rollouts runs/demo/rollouts \
        --minutes 8 --variant opd-exact-os=opd.offset_sampling=true --seed 0    # and seeds 1, 2
    # 4-minute variants: --minutes 4 --variant opd-exact= --variant opd-all-forward=opd.ablation=all_forward
"""

import argparse
import json
from pathlib import Path

import torch

from draftopd.evaluation.metrics import tau_ratio


def decoded(draft, target, prompts, max_new_tokens: int) -> torch.Tensor:
    """Per prompt (tokens committed, verify steps) of greedy `spec_generate`: [prompts, 2]."""
    from draftopd.data.prompts import apply_chat_template
    from draftopd.decoding.speculative import spec_generate
    from draftopd.model.target import stop_token_ids

    stops = stop_token_ids(target.tokenizer, target.model)
    out = []
    for p in prompts:
        ids = torch.tensor([apply_chat_template(target.tokenizer, p.messages)])
        lengths = spec_generate(draft, target, ids, max_new_tokens, stop_token_ids=stops).acceptance_lengths
        out.append((sum(lengths), len(lengths)))
    return torch.tensor(out, dtype=torch.float)


def tau(counts: torch.Tensor) -> float:
    return float(counts[:, 0].sum() / counts[:, 1].sum().clamp_min(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", required=True, help="SFT drafter every run starts from")
    ap.add_argument("--rollouts", required=True)
    ap.add_argument("--minutes", type=float, default=4.0, help="wall time of each run")
    ap.add_argument("--heldout", default="gsm8k[1200:1240]", help="prompts for decoded tau")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per step, every run")
    ap.add_argument("--anchors", type=int, default=48, help="SFT random anchors / OPD anchor cap per sequence")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VAL[,KEY=VAL]",
                    help="an OPD run with config overrides, e.g. 'sampled=opd.loss=sampled' (repeatable; "
                         "default: one run with the configured loss)")
    ap.add_argument("--out", default="runs/opd-vs-sft",
                    help="runs land in OUT/NAME-seedS; a finished one found there is measured, not retrained")
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

    start_block = load_drafter(args.start).block_size
    common = {"target": "smollm2-135m", "target_dtype": args.target_dtype, "seed": args.seed, "epochs": 1000,
              "max_minutes": args.minutes, "batch_size": args.batch_size,
              "draft": {"init": args.start, "block_size": start_block},
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
        if (out / "summary.json").exists():  # finished by an earlier invocation: measure it again
            summary = json.loads((out / "summary.json").read_text())
            runs[name] = (out / "final", summary["steps"], summary["heldout"]["tau"], " ".join(overrides))
            continue
        res = train(load_config(None, overrides, base={**common, **extra, "out_dir": str(out)}))
        runs[name] = (res.final_drafter, res.steps, res.heldout["tau"], " ".join(overrides))

    target = load_target("smollm2-135m", dtype="fp32")
    prompts = load_prompts(args.heldout)
    cache_file = Path(args.out) / "decoded.json"  # greedy decoding is deterministic: measure each drafter once
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    def measure(path) -> torch.Tensor:
        key = f"{Path(path).resolve()}|{args.heldout}|{args.max_new_tokens}"
        if key not in cache:
            cache[key] = decoded(load_drafter(path), target, prompts, args.max_new_tokens).tolist()
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache))
        return torch.tensor(cache[key])

    counts = {"start (SFT checkpoint)": measure(args.start)}
    info = {"start (SFT checkpoint)": (0, None, "")}
    for name, (path, steps, offline, overrides) in runs.items():
        counts[name] = measure(path)
        info[name] = (steps, offline, overrides)

    print(f"\nheld-out prompts {args.heldout}, greedy fp32, {args.max_new_tokens} new tokens; {args.minutes} min "
          f"per run, batch {args.batch_size}, lr {args.lr}, seed {args.seed}")
    print(f"{'drafter':<24} {'steps':>6} {'tau (walk, held-out rollouts)':>30} {'tau (decoded)':>14}  overrides")
    for name, (steps, offline, overrides) in info.items():
        walk = "" if offline is None else f"{offline:.3f}"
        print(f"{name:<24} {steps:>6} {walk:>30} {tau(counts[name]):>14.3f}  {overrides}")
    sft = counts["sft-continued"]
    ratios = {}
    for name in runs:
        if name != "sft-continued":
            ratios[name] = tau_ratio(counts[name].tolist(), sft.tolist())
            lo, hi = ratios[name][1:]
            print(f"{name} / continued SFT: {ratios[name][0]:.3f}x (95% interval over prompts {lo:.3f}-{hi:.3f}; "
                  f"goal >= 1.05x)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"result-seed{args.seed}.json").write_text(json.dumps(
        {"rows": {k: {"tau_decoded": tau(counts[k]), "steps": v[0], "tau_walk_heldout": v[1], "overrides": v[2],
                      "per_prompt_tokens_steps": counts[k].tolist()} for k, v in info.items()},
         "ratios_vs_sft": ratios, "minutes": args.minutes, "seed": args.seed, "batch_size": args.batch_size,
         "lr": args.lr, "heldout": args.heldout}, indent=2))


if __name__ == "__main__":
    main()
