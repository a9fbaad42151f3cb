"""The one-command demo on the embedded target: rollouts -> SFT -> Draft-OPD -> evaluation.

Every phase is resumable (rollouts skip finished prompts, training resumes from its last
checkpoint, a finished phase is skipped), so an interrupted demo picks up where it stopped.
Training phases are bounded by wall time, which keeps the demo within its budget on any CPU.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from draftopd.training.checkpointing import latest_checkpoint


@dataclass
class DemoPlan:
    out_dir: str = "runs/demo"
    target: str = "smollm2-135m"
    train_prompts: str = "gsm8k[:128],sharegpt[:32]"
    eval_benches: tuple[str, ...] = ("gsm8k[1200:]", "humaneval[100:]", "mt-bench[60:]")
    eval_samples: int = 1
    max_new_tokens: int = 96
    eval_max_new_tokens: int = 48
    block_size: int = 8
    sft_minutes: float = 3.0
    opd_minutes: float = 1.5
    seed: int = 0


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _train_phase(cfg) -> Path:
    from draftopd.training.trainer import train

    final = Path(cfg.out_dir) / "final"
    if (Path(cfg.out_dir) / "summary.json").exists() and final.exists():
        _say(f"{cfg.method}: already trained -> {final}")
        return final
    res = train(cfg, resume=latest_checkpoint(cfg.out_dir) is not None)
    return res.final_drafter


def run_demo(plan: DemoPlan = DemoPlan()) -> dict:
    from draftopd.data.prompts import load_prompts
    from draftopd.data.rollouts import RolloutSettings, generate_rollouts
    from draftopd.evaluation.bench import evaluate
    from draftopd.model.checkpoint import init_drafter, load_drafter, save_drafter
    from draftopd.model.target import load_target
    from draftopd.training.config import load_config

    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    _say(f"1/4 rollouts: the target answers {plan.train_prompts} (greedy, bf16, <= {plan.max_new_tokens} tokens)")
    target = load_target(plan.target, dtype="bf16")
    settings = RolloutSettings(max_new_tokens=plan.max_new_tokens, batch_size=32, max_prompt_tokens=256,
                               seed=plan.seed)
    rollouts = generate_rollouts(target, load_prompts(plan.train_prompts, tokenizer=target.tokenizer),
                                 out / "rollouts", settings, prompt_spec=plan.train_prompts)

    untrained = out / "untrained"
    if not untrained.exists():
        save_drafter(init_drafter(target, num_layers=1, block_size=plan.block_size, seed=plan.seed), untrained)
    common = {"target": plan.target, "target_dtype": "bf16", "seed": plan.seed, "epochs": 1000,
              "data": {"rollouts": str(rollouts), "max_length": 384, "eval_fraction": 0.1},
              "log": {"every": 10, "save_every": 50}}
    sft_cfg = load_config(None, base={
        **common, "method": "sft", "out_dir": str(out / "sft"), "max_minutes": plan.sft_minutes,
        "batch_size": 4, "draft": {"init": str(untrained), "block_size": plan.block_size},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.02, "min_lr_ratio": 0.1}, "sft": {"num_anchors": 48, "gamma": 4.0}})
    _say(f"2/4 SFT (DFlash recipe) for {plan.sft_minutes} min")
    sft = _train_phase(sft_cfg)

    opd_cfg = load_config(None, base={
        **common, "method": "opd", "out_dir": str(out / "opd"), "max_minutes": plan.opd_minutes,
        "batch_size": 2, "draft": {"init": str(sft), "block_size": plan.block_size},
        "optim": {"lr": 3e-4, "warmup_ratio": 0.05, "min_lr_ratio": 0.1},
        "opd": {"max_anchors": 48, "offset_sampling": True}})
    _say(f"3/4 Draft-OPD from the SFT drafter for {plan.opd_minutes} min")
    opd = _train_phase(opd_cfg)

    _say(f"4/4 evaluation (fp32, greedy, lossless check) on held-out {', '.join(plan.eval_benches)}")
    target32 = load_target(plan.target, dtype="fp32")
    drafters = {"untrained": load_drafter(untrained), "sft": load_drafter(sft), "draft-opd": load_drafter(opd)}
    results = evaluate(target32, drafters, list(plan.eval_benches), samples=plan.eval_samples,
                       max_new_tokens=plan.eval_max_new_tokens, out_dir=out / "eval", resume=True)
    _print_summary(results, drafters, out, time.time() - t0)
    return results


def _print_summary(results: dict, drafters: dict, out: Path, seconds: float) -> None:
    mean, summary = results["mean"], results["summary"]
    print()
    print(f"{'drafter':<12} {'tau':>6} {'speedup':>8} {'vs HF generate':>15}   (greedy, fp32, held-out prompts)")
    for name in drafters:
        row = mean[name]
        print(f"{name:<12} {row['tau']:>6.2f} {row['speedup']:>7.2f}x {row['speedup_hf']:>14.2f}x")
    mism = sum(s.get("greedy_mismatches") or 0 for per in summary.values() for s in per.values())
    print(f"\nlossless check: {mism} greedy outputs differed from the target alone")
    print(f"drafter (reference DFlash format): {out / 'opd' / 'final'}")
    print(f"report: {out / 'eval' / 'results.md'} (plots beside it) | metrics: {out}/{{sft,opd}}/metrics.jsonl")
    print(f"demo took {seconds / 60:.1f} min")
    (out / "demo-summary.json").write_text(json.dumps({"mean": mean, "seconds": seconds}, indent=2))
