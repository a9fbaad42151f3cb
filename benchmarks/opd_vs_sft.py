"""Equal compute from one SFT drafter: continued SFT vs Draft-OPD and its ablations, over seeds.

The small-scale version of the paper's claim and its ablation table. Every run starts from
the same drafter (default: the shipped `smollm2-135m-dflash`), trains on the same fresh
rollouts for the same CPU time (`budget_clock=cpu`: other jobs on a shared machine do not
eat into a run's budget), one torch thread per run. Each drafter is then judged by exact
greedy tau: an offline walk over the fp32 target's own greedy text on held-out prompts,
which equals decoding with that drafter token for token (tests/test_walk_live.py) and needs
no target decoding per drafter. Ratios come with 95% bootstrap intervals that resample
prompts and seeds. Goal (issue 14): Draft-OPD / continued SFT >= 1.10x.

The measured protocol (README, "Draft-OPD vs continued SFT"):

    draftopd rollout --target smollm2-135m --prompts 'gsm8k[640:880],sharegpt[200:300]' \\
        --max-new-tokens 160 --batch-size 32 --max-prompt-tokens 200 --out runs/campaign-data/rollouts
    draftopd rollout --target smollm2-135m --prompts 'gsm8k[1200:1230],humaneval[134:164],mt-bench[60:80]' \\
        --dtype fp32 --max-new-tokens 128 --max-prompt-tokens 400 --out runs/campaign-data/heldout
    draftopd export --draft smollm2-135m-dflash --out runs/campaign-data/start-b8 --block-size 8   # as trained
    python benchmarks/opd_vs_sft.py --start runs/campaign-data/start-b8 --rollouts runs/campaign-data/rollouts \\
        --heldout runs/campaign-data/heldout --seeds 0,1,2 --cpu-minutes 4 --jobs 2 --out runs/campaign

Runs land in OUT/ARM-seedS; a finished one is measured, not retrained, so an interrupted
campaign resumes where it stopped, and more seeds or arms can be added later. OUT must be new,
empty, or an earlier campaign (it holds campaign.json): other folders are refused in one line.
"""

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from draftopd.evaluation.metrics import tau_ratio
from draftopd.io import check_output_dir, holds, write_json_atomic

# arm -> (method, config overrides): the paper's ablations (Table 4) in the public code's semantics
ARMS = {
    "sft-continued": ("sft", []),
    "draft-opd": ("opd", []),
    "opd+correction-fwd": ("opd", ["opd.correction_forward=true"]),
    "opd-sampled": ("opd", ["opd.loss=sampled"]),
    "all-forward": ("opd", ["opd.ablation=all_forward"]),
    "all-reverse": ("opd", ["opd.ablation=all_reverse"]),
    "no-decay": ("opd", ["opd.ablation=no_decay"]),
    "random-anchors": ("opd", ["opd.ablation=random_anchors"]),
}
# published MATH-500 tau of each ablation, Qwen3-4B (REFERENCE_RESULTS.md)
PAPER_MATH500_TAU = {"draft-opd": 6.57, "all-forward": 6.35, "no-decay": 6.18, "all-reverse": 6.14,
                     "random-anchors": 6.08}


def run_config(args, arm: str, seed: int, start_block: int) -> dict:
    method, overrides = ARMS[arm]
    base = {"method": method, "target": "smollm2-135m", "target_dtype": args.target_dtype, "seed": seed,
            "epochs": 1000, "max_minutes": args.cpu_minutes, "budget_clock": "cpu", "batch_size": args.batch_size,
            "out_dir": str(Path(args.out) / f"{arm}-seed{seed}"),
            "draft": {"init": args.start, "block_size": start_block},
            "data": {"rollouts": args.rollouts, "max_length": 384},
            "optim": {"lr": args.lr, "warmup_ratio": 0.05, "min_lr_ratio": 0.1},
            "sft": {"num_anchors": args.anchors, "gamma": 4.0}, "opd": {"max_anchors": args.anchors},
            "log": {"every": 10, "save_every": 10_000, "progress": False}}
    return {"base": base, "overrides": overrides}


def train_run(spec: dict) -> tuple[str, int, float]:
    """One training run in its own process, one torch thread: (out_dir, steps, wall seconds)."""
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from draftopd.training.config import load_config
    from draftopd.training.trainer import train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.time()
    resume = (Path(spec["base"]["out_dir"]) / "checkpoints").exists()  # a run cut short: its CPU time carries on
    res = train(load_config(None, spec["overrides"], base=spec["base"]), resume=resume)
    return spec["base"]["out_dir"], res.steps, time.time() - t0


def walk_counts(path, target, sequences, features, cache: Path) -> list[tuple[int, int]]:
    """Per held-out text (tokens committed, verify steps) of the drafter at `path`, fp32, cached."""
    if cache.exists():
        return [tuple(c) for c in json.loads(cache.read_text())]
    from draftopd.model.checkpoint import load_drafter
    from draftopd.training.onpolicy import offline_walks

    draft = load_drafter(path).to(dtype=torch.float32).eval()
    counts = [(sum(w.lengths), len(w.lengths)) for w in offline_walks(draft, target.model, sequences,
                                                                       features=features)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, counts)
    return counts


def heldout_sequences(path: str, target) -> list:
    from draftopd.data.rollouts import load_rollouts
    from draftopd.evaluation.bench import TokenSequence

    meta, rollouts = load_rollouts(path, expect_target=target.identity)
    if meta.get("dtype") not in (None, "float32", "fp32"):
        raise SystemExit(f"--heldout {path}: rollouts were made in {meta.get('dtype')}; exact greedy tau needs "
                         f"the fp32 target's text (draftopd rollout --dtype fp32)")
    return [TokenSequence(torch.tensor(r.prompt_ids + r.response_ids), len(r.prompt_ids)) for r in rollouts]


def ratio_row(a, b) -> dict:
    r, lo, hi = tau_ratio(a, b)
    return {"ratio": r, "low": lo, "high": hi}


def report(out: Path, rows: dict, start_tau: float, args) -> str:
    lines = [f"# Draft-OPD vs continued SFT, equal CPU time ({args.cpu_minutes} CPU-min per run, 1 thread)", "",
             f"From `{args.start}` (held-out tau {start_tau:.3f}); rollouts `{args.rollouts}`; held-out "
             f"`{args.heldout}` ({rows['sft-continued']['prompts']} prompts, exact greedy fp32 walk); batch "
             f"{args.batch_size}, lr {args.lr}, anchors {args.anchors}; seeds {args.seeds}. "
             f"Intervals: 95% bootstrap over prompts and seeds.", "",
             "| arm | steps/run | tau (pooled) | tau per seed | / start | / continued SFT | / Draft-OPD "
             "| paper MATH-500 tau (/ Draft-OPD) |", "|---|---|---|---|---|---|---|---|"]

    def cell(r):
        return f"{r['ratio']:.3f} ({r['low']:.3f}-{r['high']:.3f})" if r else "—"

    for arm, row in rows.items():
        paper = PAPER_MATH500_TAU.get(arm)
        paper_cell = f"{paper:.2f} ({paper / PAPER_MATH500_TAU['draft-opd']:.3f})" if paper else "—"
        lines.append(f"| {arm} | {row['steps']:.0f} | {row['tau']:.3f} | "
                     f"{' / '.join(f'{t:.3f}' for t in row['tau_per_seed'])} | {cell(row['vs_start'])} | "
                     f"{cell(row['vs_sft'])} | {cell(row['vs_opd'])} | {paper_cell} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot(out: Path, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in rows if rows[a]["vs_sft"]]
    r = [rows[a]["vs_sft"] for a in arms]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.errorbar(range(len(arms)), [x["ratio"] for x in r],
                yerr=[[x["ratio"] - x["low"] for x in r], [x["high"] - x["ratio"] for x in r]], fmt="o", capsize=4)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel("tau / continued SFT")
    ax.set_title("Equal CPU time from one SFT drafter (95% interval over prompts and seeds)")
    fig.tight_layout()
    fig.savefig(out / "opd_vs_sft.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="smollm2-135m-dflash", help="SFT drafter every run starts from")
    ap.add_argument("--rollouts", required=True, help="fresh rollout directory every run trains on")
    ap.add_argument("--heldout", required=True, help="rollout directory of fp32 greedy target text on held-out "
                    "prompts (draftopd rollout --dtype fp32)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cpu-minutes", type=float, default=4.0, help="CPU time of each run (one thread)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per step, every run")
    ap.add_argument("--anchors", type=int, default=48, help="SFT random anchors / OPD anchor cap per sequence")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--target-dtype", default="auto", choices=["auto", "fp32", "bf16"], help="training target")
    ap.add_argument("--out", default="runs/campaign")
    args = ap.parse_args()
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    if unknown := sorted(set(arms) - set(ARMS)):
        ap.error(f"--arms: unknown {', '.join(unknown)}; expected some of {', '.join(ARMS)}")
    if "sft-continued" not in arms:
        ap.error("--arms: sft-continued is the baseline every ratio is taken against; include it")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from draftopd.model.checkpoint import load_drafter
    from draftopd.model.target import load_target
    from draftopd.training.onpolicy import text_features

    out = Path(args.out)
    check_output_dir(out, kind="campaign", is_kind=holds("campaign.json"), resume=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "campaign.json", {"start": args.start, "rollouts": args.rollouts, "heldout": args.heldout})
    start_block = load_drafter(args.start).block_size
    todo = [run_config(args, arm, seed, start_block) for seed in seeds for arm in arms  # every arm at a seed first
            if not (out / f"{arm}-seed{seed}" / "summary.json").exists()]
    print(f"{len(todo)} run(s) to train ({len(arms) * len(seeds) - len(todo)} already done), {args.jobs} at once, "
          f"{args.cpu_minutes} CPU-min each", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for run_dir, steps, wall in pool.map(train_run, todo):
            print(f"  trained {run_dir}: {steps} steps, {wall / 60:.1f} min wall", flush=True)

    target = load_target("smollm2-135m", dtype="fp32")
    sequences = heldout_sequences(args.heldout, target)
    key = Path(args.heldout).resolve().name
    t0 = time.time()
    features = text_features(target.model, sequences, load_drafter(args.start).target_layer_ids)
    print(f"  target features of {len(sequences)} held-out texts: {time.time() - t0:.0f} s", flush=True)
    start_counts = walk_counts(args.start, target, sequences, features, out / f"start-walk-{key}.json")
    counts, steps = {}, {}
    for arm in arms:
        counts[arm], steps[arm] = [], []
        for seed in seeds:
            run = out / f"{arm}-seed{seed}"
            counts[arm].append(walk_counts(run / "final", target, sequences, features, run / f"walk-{key}.json"))
            steps[arm].append(json.loads((run / "summary.json").read_text())["steps"])
        print(f"  walked {arm}", flush=True)

    def pooled(c) -> float:
        t = torch.tensor(c, dtype=torch.float64).reshape(-1, 2).sum(0)
        return float(t[0] / t[1])

    rows = {}
    for arm in arms:
        rows[arm] = {"tau": pooled(counts[arm]), "tau_per_seed": [pooled(c) for c in counts[arm]],
                     "steps": sum(steps[arm]) / len(seeds), "prompts": len(sequences),
                     "vs_start": ratio_row(counts[arm], [start_counts] * len(seeds)),
                     "vs_sft": ratio_row(counts[arm], counts["sft-continued"]) if arm != "sft-continued" else None,
                     "vs_opd": (ratio_row(counts[arm], counts["draft-opd"])
                                if "draft-opd" in counts and arm not in ("draft-opd", "sft-continued") else None)}
    write_json_atomic(out / "results.json", {
        "rows": rows, "start_tau": pooled(start_counts), "settings": vars(args),
        "per_prompt_tokens_steps": counts, "start_per_prompt": start_counts,
        "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    print("\n" + report(out, rows, pooled(start_counts), args))
    plot(out, rows)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'opd_vs_sft.png'}")


if __name__ == "__main__":
    from draftopd.errors import DraftOPDError

    try:
        main()
    except DraftOPDError as e:  # bad input: one line, not a traceback
        raise SystemExit(f"opd_vs_sft: {e}") from None
