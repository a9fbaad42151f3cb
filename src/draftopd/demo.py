"""The one-command demo on the embedded target, mirroring the paper's recipe at toy scale.

Default: the shipped SFT drafter `smollm2-135m-dflash` (the analogue of
z-lab/Qwen3-4B-DFlash-b16) is post-trained by Draft-OPD for a few minutes on fresh target
rollouts, then target alone, shipped drafter and Draft-OPD drafter are compared side by
side. `from_scratch` instead trains a new drafter by SFT first (init -> SFT -> Draft-OPD).

Every phase has a wall-time budget and is sized by what this machine measures, not by a
constant: rollouts stop starting batches at their budget, training stops at its budget, and
the evaluation picks its prompt counts from the measured decoding speed. Every phase is
resumable (rollouts skip finished prompts, training resumes from its last checkpoint, a
finished phase is skipped), so an interrupted demo picks up where it stopped.

Training follows configs/sft-smollm2.yaml and configs/opd-smollm2.yaml; the demo sets only
its budgets, paths, dtype, seed and start drafter on top (`_recipe`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED = "smollm2-135m-dflash"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the recipes: sft-smollm2.yaml, opd-smollm2.yaml
DEMO_ENTRIES = ("rollouts", "untrained", "sft", "opd", "eval", "demo-summary.json")  # what a demo run writes
FP32_CHECK_TOKENS = 32  # tokens per run of the demo's exact fp32 lossless check
PHASE_MINUTES = {"rollouts": 1.5, "sft": 3.0, "opd": 4.0, "eval": 2.5}  # sft: only with from_scratch


@dataclass
class DemoPlan:
    out_dir: str = "runs/demo"
    target: str = "smollm2-135m"
    drafter: str = SHIPPED
    from_scratch: bool = False
    dtype: str = "auto"
    # Fresh prompts: the shipped drafter was trained on gsm8k[:640], humaneval[:100], mt-bench[:60], sharegpt[:200]
    # and sharegpt[400:] (the first turns of <= 400 tokens).
    train_prompts: str = "gsm8k[640:1200],sharegpt[200:400]"
    heldout: tuple[str, ...] = ("gsm8k[1200:]", "humaneval[100:]", "mt-bench[60:]")
    max_new_tokens: int = 128
    budget_minutes: dict = field(default_factory=lambda: dict(PHASE_MINUTES))
    seed: int = 0


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _recipe(method: str, plan: DemoPlan, out: Path, minutes: float, drafter: dict):
    """configs/{method}-smollm2.yaml with only the demo's run settings on top, as
    `draftopd train --config ... key=value` would apply them: which target, dtype and seed, where
    to read and write, the budget (epochs unbounded: the budget ends training) and the `drafter`
    keys (draft.*) to start from. Every rollout trains (eval_fraction 0): the demo measures tau
    on held-out prompts instead."""
    from draftopd.errors import DraftOPDError
    from draftopd.training.config import load_config

    path = CONFIGS / f"{method}-smollm2.yaml"
    if not path.exists():
        raise DraftOPDError(f"{path}: the demo trains by the repository's recipes; run it from a clone")
    run = {"target": plan.target, "target_dtype": plan.dtype, "seed": plan.seed, "out_dir": str(out / method),
           "max_minutes": minutes, "epochs": 1000, "data.rollouts": str(out / "rollouts"), "data.eval_fraction": 0.0,
           **drafter}
    return load_config(path, [f"{key}={json.dumps(value)}" for key, value in run.items()])


def _train_phase(cfg) -> Path:
    from draftopd.training.checkpointing import latest_checkpoint
    from draftopd.training.trainer import train

    final = Path(cfg.out_dir) / "final"
    if (Path(cfg.out_dir) / "summary.json").exists() and final.exists():
        _say(f"{cfg.method}: already trained -> {final}")
        return final
    res = train(cfg, resume=latest_checkpoint(cfg.out_dir) is not None)
    return res.final_drafter


def _rollouts(target, spec: str, out: Path, plan: DemoPlan, minutes: float, what: str) -> Path:
    from draftopd.data.prompts import load_prompts
    from draftopd.data.rollouts import RolloutSettings, generate_rollouts, read_records

    settings = RolloutSettings(max_new_tokens=plan.max_new_tokens, batch_size=16, max_prompt_tokens=256,
                               seed=plan.seed)
    t0 = time.perf_counter()
    generate_rollouts(target, load_prompts(spec, tokenizer=target.tokenizer), out, settings, prompt_spec=spec,
                      max_seconds=minutes * 60)
    records = read_records(out)
    tokens = sum(len(r.response_ids) for r in records)
    _say(f"{what}: {len(records)} responses, {tokens} tokens in {time.perf_counter() - t0:.0f} s "
         f"(budget {minutes:.1f} min)")
    return out


def run_demo(plan: DemoPlan = DemoPlan()) -> dict:
    from draftopd.io import check_output_dir, write_json_atomic
    from draftopd.model.checkpoint import init_drafter, load_drafter, save_drafter
    from draftopd.model.precision import hardware_record
    from draftopd.model.target import load_target

    out = Path(plan.out_dir)
    check_output_dir(out, kind="demo run", is_kind=lambda p: any((p / n).exists() for n in DEMO_ENTRIES), resume=True)
    out.mkdir(parents=True, exist_ok=True)
    budget = plan.budget_minutes
    t0 = time.time()
    target = load_target(plan.target, dtype=plan.dtype)
    hw = hardware_record(target.dtype, target.device)
    _say(f"target {plan.target} in {hw['dtype']} on {hw.get('cpu_capability') or hw.get('gpu')} "
         f"({hw['threads']} threads); phase budgets {budget} min")

    rollouts = out / "rollouts"
    if any((out / phase).exists() for phase in ("sft", "opd")):  # training began on them: they must not change
        _say(f"1/3 rollouts: kept as training found them -> {rollouts}")
    else:
        _say(f"1/3 rollouts: the target answers fresh prompts {plan.train_prompts} (greedy)")
        _rollouts(target, plan.train_prompts, rollouts, plan, budget["rollouts"], "rollouts")

    if plan.from_scratch:
        untrained = out / "untrained"
        sft_cfg = _recipe("sft", plan, out, budget["sft"], {"draft.init": str(untrained)})
        if not untrained.exists():
            save_drafter(init_drafter(target, num_layers=sft_cfg.draft.new_drafter_layers, block_size=sft_cfg.draft.block_size,
                                      seed=plan.seed), untrained)
        _say(f"   SFT (DFlash recipe) from scratch for {budget['sft']} min")
        start, start_name = _train_phase(sft_cfg), "sft"
    else:
        start, start_name = plan.drafter, "shipped-sft"
    opd_cfg = _recipe("opd", plan, out, budget["opd"],
                      {"draft.init": str(start), "draft.block_size": load_drafter(start).block_size})
    _say(f"2/3 Draft-OPD from {start} for {budget['opd']} min")
    opd = _train_phase(opd_cfg)

    _say(f"3/3 evaluation (greedy, lossless check) on held-out {', '.join(plan.heldout)}; budget {budget['eval']} min")
    drafters = {start_name: load_drafter(start), "draft-opd": load_drafter(opd)}
    results = evaluate_demo(target, drafters, plan, out / "eval", budget["eval"] * 60)
    results["hardware"] = hw
    results["seconds"] = time.time() - t0
    _print_summary(results, out, start_name)
    write_json_atomic(out / "demo-summary.json", results)
    return results


def evaluate_demo(target, drafters: dict, plan: DemoPlan, out: Path, seconds: float) -> dict:
    """Exact greedy tau on many held-out prompts (offline walks over the target's own text,
    no decoding per drafter), and wall-clock speed plus the lossless check on a few of them.

    A third of the budget goes to the held-out text, a quarter to the walks, and what is left,
    less the fp32 check's estimated time (bf16 targets), to timed decoding; prompt counts follow
    from speeds measured here, and the phase prints what each part took.
    """
    from draftopd.data.rollouts import read_records
    from draftopd.evaluation.bench import TokenSequence, evaluate
    from draftopd.evaluation.metrics import tau_ratio
    from draftopd.io import write_json_atomic
    from draftopd.model.packed import pack_linears
    from draftopd.training.onpolicy import offline_walks, text_features

    import torch

    spec = ",".join(plan.heldout)
    t_start = time.perf_counter()
    heldout = _rollouts(target, spec, out / "heldout-text", plan, seconds / 3 / 60, "held-out target text")
    seqs = [TokenSequence(torch.tensor(r.prompt_ids + r.response_ids), len(r.prompt_ids))
            for r in read_records(heldout)]
    counts = {name: [] for name in drafters}
    for draft in drafters.values():
        pack_linears(draft.to(device=target.device, dtype=target.dtype))
    t0 = time.perf_counter()
    layers = {tuple(d.target_layer_ids) for d in drafters.values()}
    for seq in seqs:  # walk both drafters over the same prompts until the budget is spent
        shared = text_features(target.model, [seq], list(*layers)) if len(layers) == 1 else None  # one target pass
        for name, draft in drafters.items():
            w = offline_walks(draft, target.model, [seq], features=shared)[0]
            counts[name].append((sum(w.lengths), len(w.lengths)))
        if time.perf_counter() - t0 > seconds / 4:
            break
    start_name, opd_name = list(drafters)
    ratio = tau_ratio(counts[opd_name], counts[start_name])
    walk_tau = {n: sum(t for t, _ in c) / max(sum(s for _, s in c), 1) for n, c in counts.items()}

    _say(f"   walks: {len(counts[start_name])} held-out texts x {len(drafters)} drafters in "
         f"{time.perf_counter() - t0:.0f} s (budget {seconds / 4:.0f} s)")
    check = target.dtype != torch.float32
    size_file = out / "decode-size.json"  # chosen once: a rerun resumes the same timed decoding
    if size_file.exists():
        size = json.loads(size_file.read_text())
        samples, decode_tokens = size["samples"], size["max_new_tokens"]
        _say(f"   timed decoding: {samples} prompt(s) per benchmark x {decode_tokens} tokens, as first sized")
    else:
        per_token = _decode_seconds_per_token(target)
        left = seconds - (time.perf_counter() - t_start) - (_fp32_check_seconds(per_token, len(drafters)) if check else 0)
        samples, decode_tokens = _decode_size(per_token, len(drafters), len(plan.heldout), left)
        write_json_atomic(size_file, {"samples": samples, "max_new_tokens": decode_tokens})
        _say(f"   timed decoding: {samples} prompt(s) per benchmark x {decode_tokens} tokens "
             f"(target step {per_token * 1000:.0f} ms here; {max(left, 0):.0f} s left for it)")
    decoded = evaluate(target, drafters, list(plan.heldout), samples=samples, max_new_tokens=decode_tokens,
                       out_dir=out / "decode", resume=True)
    result = {"walk": {"prompts": len(counts[start_name]), "tau": walk_tau,
                       "tau_ratio": {"ratio": ratio[0], "low": ratio[1], "high": ratio[2]}},
              "decode": {"mean": decoded["mean"], "baseline": decoded["baseline"],
                         "greedy_mismatches": sum(s.get("greedy_mismatches") or 0
                                                  for per in decoded["summary"].values() for s in per.values()),
                         "greedy_runs": sum(1 for r in decoded["samples"] if r["method"] == "draft")}}
    if check:
        result["exact_fp32"] = exact_fp32_check(plan, drafters, seqs[:2], FP32_CHECK_TOKENS)
    result["seconds"] = time.perf_counter() - t_start
    _say(f"   evaluation took {result['seconds']:.0f} s (budget {seconds:.0f} s)")
    return result


def _fp32_check_seconds(per_token: float, n_drafters: int) -> float:
    """The fp32 check's time, estimated: loading the fp32 target, then 2 prompts x (target alone
    + each drafter) x its tokens at ~2x the bf16 step (fp32 reads twice the bytes)."""
    return 5.0 + 2 * (1 + n_drafters) * FP32_CHECK_TOKENS * 2 * per_token


def exact_fp32_check(plan: DemoPlan, drafters: dict, seqs, tokens: int) -> dict:
    """Greedy speculative output == the target's own greedy decoding, token for token, in fp32.

    In bf16 a verify pass over a block rounds differently from one-token steps, so near-ties
    can flip and the two texts part ways (each is the target's greedy text under its own
    rounding, as in every bf16 engine); fp32 is where losslessness is exact and checkable.
    """
    import copy

    from draftopd.decoding.speculative import spec_generate
    from draftopd.model.target import load_target

    target = load_target(plan.target, dtype="fp32")
    stops = target.stop_token_ids
    runs = mismatches = 0
    for seq in seqs:
        ids = seq.ids[: seq.prompt_len][None]
        ref = target.model.generate(ids, do_sample=False, max_new_tokens=tokens, eos_token_id=stops,
                                    pad_token_id=target.tokenizer.pad_token_id)
        for draft in drafters.values():
            out = spec_generate(copy.deepcopy(draft).float(), target, ids, tokens, stop_token_ids=stops).output_ids
            runs, mismatches = runs + 1, mismatches + int(out.tolist() != ref.tolist())
    return {"runs": runs, "mismatches": mismatches, "tokens": tokens}


def _decode_size(per_token: float, n_drafters: int, n_benches: int, seconds: float) -> tuple[int, int]:
    """(prompts per benchmark, tokens per run) for timed decoding in `seconds`, at `per_token`
    seconds per target step.

    Each prompt runs target alone, HF generate and every drafter (a drafter step costs about a
    target step; 1.3x covers prefill and MT-Bench's second turns). Tokens shrink (to 24) before
    prompts drop below one per benchmark; extra time buys more prompts (up to 4).
    """
    per_prompt_token = per_token * (2 + n_drafters) * n_benches * 1.3
    tokens = int(min(64, max(24, seconds / per_prompt_token)))
    samples = int(min(4, max(1, seconds / (per_prompt_token * tokens))))
    return samples, tokens


def _decode_seconds_per_token(target) -> float:
    """Median time of a one-token target step with a short cache: sizes the timed decoding."""
    import torch
    from transformers import DynamicCache

    from draftopd.decoding.speculative import cache_kwarg

    ids = torch.randint(100, 1000, (1, 64), device=target.device)
    kv = {cache_kwarg(target.model): DynamicCache(config=target.config)}  # the keyword this transformers takes
    times = []
    with torch.inference_mode():
        target.model(input_ids=ids, use_cache=True, **kv)
        for i in range(5):
            t = time.perf_counter()
            target.model(input_ids=ids[:, i:i + 1], use_cache=True, **kv)
            times.append(time.perf_counter() - t)
    return sorted(times)[2]


def _print_summary(results: dict, out: Path, start_name: str) -> None:
    walk, dec = results["walk"], results["decode"]
    mean = dec["mean"]
    hw = results["hardware"]
    print()
    print(f"held-out prompts, greedy, {hw['dtype']} on {hw.get('cpu_capability') or hw.get('gpu')}:")
    print(f"{'':<14} {'tau (walk, ' + str(walk['prompts']) + ' prompts)':>26} {'tau (decoded)':>14} "
          f"{'speedup vs B=1 loop':>20} {'vs HF generate':>15}")
    print(f"{'target alone':<14} {1.0:>26.2f} {1.0:>14.2f} {1.0:>19.2f}x {'':>15}")
    for name in walk["tau"]:
        row = mean[name]
        print(f"{name:<14} {walk['tau'][name]:>26.2f} {row['tau']:>14.2f} {row['speedup']:>19.2f}x "
              f"{row['speedup_hf']:>14.2f}x")
    r = walk["tau_ratio"]
    print(f"\nDraft-OPD / {start_name} tau: {r['ratio']:.3f}x (95% bootstrap interval over prompts "
          f"{r['low']:.3f}-{r['high']:.3f})")
    print(f"lossless check: {dec['greedy_mismatches']} of {dec['greedy_runs']} greedy drafter outputs differed "
          f"from the target alone ({hw['dtype']})")
    if "exact_fp32" in results:
        e = results["exact_fp32"]
        print(f"  in fp32, where rounding cannot flip near-ties: {e['mismatches']} of {e['runs']} differed "
              f"({e['tokens']} tokens each); bf16 differences are near-ties rounded another way by the block verify")
    print(f"drafter (reference DFlash format): {out / 'opd' / 'final'}")
    print(f"report: {out / 'eval' / 'decode' / 'results.md'} | metrics: {out}/opd/metrics.jsonl")
    print(f"demo took {results['seconds'] / 60:.1f} min")
