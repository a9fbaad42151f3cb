"""Decode-loop overhead and verify cost on the embedded SmolLM2-135M target.

Two measurements per dtype, printed as tables (nothing here asserts on timing):

1. Loop overhead. `spec_generate(..., block_size=1)` runs draftopd's decode loop without
   drafting: one target forward per token, exactly what `target.model.generate(do_sample=False)`
   does. Both decode the same chat-templated gsm8k prompts for the same number of tokens;
   runs alternate which one goes first, and the ratio is the median of per-run ratios, so a
   noisy machine hurts less. Goal: ours/HF <= 1.15.
2. Verify cost. One target forward over a B-token block (B=16, with hidden states, as a
   verify step runs it) vs one 1-token decode step, both on top of a ~200-token KV cache,
   plus the drafter's own cost for that block (its layers, then the target's LM head on
   the B-1 drafted rows). With tau tokens committed per step, the speed-up over plain
   decoding is tau * T1 / (T_B + T_draft), hence break-even tau = (T_B + T_draft) / T1 and
   tau for 2x = 2 * (T_B + T_draft) / T1.

    python benchmarks/decode_overhead.py            # both dtypes, a few minutes on 2 CPU cores
    python benchmarks/decode_overhead.py --quick    # fewer prompts, tokens and repetitions
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import inspect
import io
import os
import pstats
import statistics
import sys
import time

import torch

from draftopd.data.prompts import apply_chat_template, load_prompts
from draftopd.decoding.speculative import crop_cache, spec_generate
from draftopd.errors import DraftOPDError
from draftopd.model.checkpoint import init_drafter
from draftopd.model.target import load_target, parse_dtype

TARGET = "smollm2-135m"


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def busy() -> tuple[float | None, int]:
    """1-minute load average (None where the OS does not say) and the number of CPUs."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None, os.cpu_count() or 1


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class FirstTokenClock:
    """An HF streamer that only notes when the first generated token arrives.

    `generate` calls `put` once with the prompt, then once per new token.
    """

    def __init__(self, device: torch.device):
        self.device, self.calls, self.first = device, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = sync(self.device)

    def end(self) -> None:
        pass


def table(title: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> str:
    width = max(len(r[0]) for r in rows)
    colw = [max(len(c), *(len(r[1][i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [title, "  " + " " * width + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, colw))]
    for name, cells in rows:
        lines.append("  " + name.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, colw)))
    return "\n".join(lines)


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# 1. decode-loop overhead: spec_generate(block_size=1) vs HF generate


def hf_greedy_config(model, max_new_tokens: int):
    """Greedy, exactly `max_new_tokens` tokens (no EOS stop), no logits processors."""
    gc = copy.deepcopy(model.generation_config)
    gc.update(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=None, eos_token_id=None,
              temperature=None, top_p=None, top_k=None, repetition_penalty=None)
    if gc.pad_token_id is None:
        gc.pad_token_id = 0
    return gc


def run_hf(model, ids, gc, device):
    clock = FirstTokenClock(device)
    t0 = sync(device)
    out = model.generate(ids, generation_config=gc, streamer=clock)
    t2 = sync(device)
    n = out.shape[1] - ids.shape[1]
    first = clock.first if clock.first is not None else t2
    return {"e2e": (t2 - t0) / n, "decode": (t2 - first) / max(n - 1, 1), "ttft": first - t0, "ids": out[0].tolist(), "n": n}


def run_ours(draft, target, ids, n_new, device):
    t0 = sync(device)
    res = spec_generate(draft, target, ids, n_new, block_size=1)
    t2 = sync(device)
    n = res.num_output_tokens
    decode = res.time_per_output_token * n  # the loop after the first token (spec_generate's own clock)
    return {"e2e": (t2 - t0) / n, "decode": decode / max(n - 1, 1), "ttft": res.time_to_first_token,
            "ids": res.output_ids[0].tolist(), "n": n}


def verdict(summary: dict, goal: float = 1.15) -> str:
    if summary["ratio_decode"] <= goal:
        return "ok"
    return "noisy? rerun" if summary["ratio_best"] <= goal else "SLOW"


def loop_overhead(target, draft, prompts, args, device) -> dict:
    model = target.model
    gc = hf_greedy_config(model, args.max_new_tokens)
    warm = hf_greedy_config(model, 4)
    for ids in prompts[:1]:  # warm-up: first calls allocate, pick kernels, fill caches
        model.generate(ids, generation_config=warm)
        spec_generate(draft, target, ids, 4, block_size=1)
    runs = {"hf": [], "ours": []}
    ratios_decode, ratios_e2e, identical = [], [], True
    for r in range(args.repeats):
        for i, ids in enumerate(prompts):
            order = ("hf", "ours") if (r + i) % 2 == 0 else ("ours", "hf")
            got = {}
            for who in order:
                got[who] = run_hf(model, ids, gc, device) if who == "hf" else run_ours(draft, target, ids, args.max_new_tokens, device)
                runs[who].append(got[who])
            if got["hf"]["n"] != args.max_new_tokens or got["ours"]["n"] != args.max_new_tokens:
                raise SystemExit(f"expected {args.max_new_tokens} new tokens, got HF {got['hf']['n']}, ours {got['ours']['n']}")
            identical &= got["hf"]["ids"] == got["ours"]["ids"]
            ratios_decode.append(got["ours"]["decode"] / got["hf"]["decode"])
            ratios_e2e.append(got["ours"]["e2e"] / got["hf"]["e2e"])
    summary = {f"{who}_{k}": median([x[k] for x in runs[who]]) for who in runs for k in ("e2e", "decode", "ttft")}
    best = {who: min(x["decode"] for x in runs[who]) for who in runs}  # least disturbed run of each
    summary.update(ratio_decode=median(ratios_decode), ratio_e2e=median(ratios_e2e), identical=identical,
                   ratio_best=best["ours"] / best["hf"], pairs=len(ratios_decode))
    return summary


def profile_loop(target, draft, ids, args) -> str:
    """cProfile of one block_size=1 decode and one HF generate, top functions by own time."""
    gc = hf_greedy_config(target.model, args.max_new_tokens)
    text = []
    for name, fn in (("spec_generate(block_size=1)", lambda: spec_generate(draft, target, ids, args.max_new_tokens, block_size=1)),
                     ("HF generate", lambda: target.model.generate(ids, generation_config=gc))):
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile_top)
        text.append(f"--- profile: {name} ---\n" + buf.getvalue().strip())
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------
# 2. verify cost: B-token block vs 1-token step on a ~200-token cache, plus the drafter


@torch.inference_mode()
def verify_cost(target, draft, prompts, args, device) -> dict:
    from transformers import DynamicCache

    from draftopd.model.drafter import context_features

    model, B, n = target.model, args.block_size, args.context
    # transformers 5.x names the cache argument `cache`, 4.x `past_key_values` (as spec_generate does)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    text = torch.cat([p[0] for p in prompts])
    ctx_ids = text.repeat(n // text.numel() + 1)[:n][None].to(device)  # real tokens, tiled to n
    positions = torch.arange(n + B, device=device)[None]
    cache = DynamicCache(config=model.config)
    o = model(input_ids=ctx_ids, position_ids=positions[:, :n], **{kw: cache}, use_cache=True,
              output_hidden_states=True, logits_to_keep=1)
    feats = context_features(o.hidden_states, draft.target_layer_ids)  # [1, n, L*H]
    one = ctx_ids[:, -1:]
    block = ctx_ids[:, -B:]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()

    # The drafter's steady state: n-1 context rows cached, 1 pending (tau ~ 1 for a random drafter).
    base = draft.new_cache()
    draft(embed(block), feats[:, : n - 1], block_positions=positions[:, n : n + B],
          context_positions=positions[:, : n - 1], cache=base)
    pending = feats[:, n - 1 :]
    dblock = block.clone()
    dblock[0, 1:] = draft.mask_token_id

    def step1():
        model(input_ids=one, position_ids=positions[:, n : n + 1], **{kw: cache}, use_cache=True)
        crop_cache(cache, n)

    def stepB():
        model(input_ids=block, position_ids=positions[:, n : n + B], **{kw: cache}, use_cache=True,
              output_hidden_states=True)
        crop_cache(cache, n)

    state = {}

    def drafter_fwd():
        c = draft.new_cache()
        c.k, c.v = list(base.k), list(base.v)  # appends make new tensors; `base` is untouched
        state["h"] = draft(embed(dblock), pending, block_positions=positions[:, n : n + B],
                           context_positions=positions[:, n - 1 : n], cache=c)

    def drafter_head():
        draft.compute_logits(state["h"][0, 1:], head).argmax(-1)

    fns = {"t1": step1, "tB": stepB, "draft": drafter_fwd, "head": drafter_head}
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times = {k: [] for k in fns}
    for r in range(args.forward_repeats):
        # rotate the order of the target steps; the head always follows the drafter that feeds it
        seq = ["t1", "tB"] if r % 2 == 0 else ["tB", "t1"]
        seq = seq + ["draft", "head"] if r % 3 else ["draft", "head"] + seq
        for k in seq:
            t0 = sync(device)
            fns[k]()
            times[k].append(sync(device) - t0)
    m = {k: median(v) * 1e3 for k, v in times.items()}
    m["ratio"] = m["tB"] / m["t1"]
    m["step"] = m["tB"] + m["draft"] + m["head"]
    m["ratio_full"] = m["step"] / m["t1"]
    return m


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Measure draftopd's decode-loop overhead against HF generate, and the cost of a "
                    f"B-token verify step vs a 1-token step, on the embedded {TARGET} target.",
        epilog="Timings are medians over interleaved runs; on a busy machine try --threads 1.",
    )
    p.add_argument("--quick", action="store_true",
                   help="fewer prompts, tokens and repetitions (overrides the four counts below)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated target dtypes (default %(default)s)")
    p.add_argument("--prompts", type=int, default=3, help="gsm8k prompts for the loop comparison (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per run (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the prompts, per method (default %(default)s)")
    p.add_argument("--forward-repeats", type=int, default=30,
                   help="timed forwards per kind in the verify-cost part (default %(default)s)")
    p.add_argument("--block-size", type=int, default=16, help="verify block size B (default %(default)s)")
    p.add_argument("--context", type=int, default=200, help="KV-cache length for the verify part (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--skip-loop", action="store_true", help="skip part 1 (loop overhead)")
    p.add_argument("--skip-verify", action="store_true", help="skip part 2 (verify cost)")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of one decode per method")
    p.add_argument("--profile-top", type=int, default=15, help="functions shown per profile (default %(default)s)")
    return p


def main(argv=None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except DraftOPDError as e:  # bad dtype, missing embedded package, ...
        print(f"decode_overhead: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if args.quick:
        args.prompts, args.max_new_tokens, args.repeats, args.forward_repeats = 2, 32, 2, 10
    if min(args.prompts, args.max_new_tokens - 1, args.repeats, args.forward_repeats, args.block_size - 1, args.context) < 1:
        print("decode_overhead: error: counts must be positive, --max-new-tokens and --block-size >= 2", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for dt in dtypes:
        parse_dtype(dt)  # fail before any model loads
    print(f"target {TARGET} on {device} | torch {torch.__version__}, {torch.get_num_threads()} threads | "
          f"{args.prompts} gsm8k prompts x {args.max_new_tokens} new tokens x {args.repeats} rounds | "
          f"verify: B={args.block_size}, cache {args.context}, {args.forward_repeats} reps", flush=True)
    load, cores = busy()
    if load is not None and device.type == "cpu" and load > 0.5 * cores:
        print(f"warning: the machine is busy (load average {load:.1f} on {cores} cores); timings will be noisy"
              + ("" if torch.get_num_threads() == 1 else ", and several threads per process can make every "
                 "forward many times slower: try --threads 1"), flush=True)

    loop, verify, profiles = {}, {}, []
    t_start = time.perf_counter()
    for dt in dtypes:
        target = load_target(TARGET, dtype=dt, device=args.device)
        draft = init_drafter(target, num_layers=1, block_size=args.block_size).to(device).eval()
        tok = target.tokenizer
        prompts = [torch.tensor([apply_chat_template(tok, p.messages)], device=device)
                   for p in load_prompts(f"gsm8k[:{args.prompts}]")]
        if not args.skip_loop:
            loop[dt] = loop_overhead(target, draft, prompts, args, device)
            print(f"  [{dt}] loop: ours/HF decode {loop[dt]['ratio_decode']:.3f} "
                  f"({time.perf_counter() - t_start:.0f}s elapsed)", flush=True)
            if args.profile:
                profiles.append(f"=== {dt} ===\n" + profile_loop(target, draft, prompts[0], args))
        if not args.skip_verify:
            verify[dt] = verify_cost(target, draft, prompts, args, device)
            print(f"  [{dt}] verify: T{args.block_size}/T1 {verify[dt]['ratio']:.2f} "
                  f"({time.perf_counter() - t_start:.0f}s elapsed)", flush=True)
        del target, draft

    print()
    if loop:
        cols = list(loop)
        rows = [
            ("HF generate  ms/token, decode", [fmt(loop[d]["hf_decode"] * 1e3) for d in cols]),
            ("spec_generate(block_size=1)  ms/token, decode", [fmt(loop[d]["ours_decode"] * 1e3) for d in cols]),
            ("HF generate  ms/token, end to end", [fmt(loop[d]["hf_e2e"] * 1e3) for d in cols]),
            ("spec_generate(block_size=1)  ms/token, end to end", [fmt(loop[d]["ours_e2e"] * 1e3) for d in cols]),
            ("HF generate  time to first token, ms", [fmt(loop[d]["hf_ttft"] * 1e3, 1) for d in cols]),
            ("spec_generate  time to first token, ms", [fmt(loop[d]["ours_ttft"] * 1e3, 1) for d in cols]),
            ("ratio ours/HF, decode (median of pairs; goal <= 1.15)", [fmt(loop[d]["ratio_decode"], 3) for d in cols]),
            ("ratio ours/HF, end to end (median of pairs)", [fmt(loop[d]["ratio_e2e"], 3) for d in cols]),
            ("ratio ours/HF, decode, best run of each", [fmt(loop[d]["ratio_best"], 3) for d in cols]),
            ("verdict", [verdict(loop[d]) for d in cols]),
            ("same tokens as HF", ["yes" if loop[d]["identical"] else "NO" for d in cols]),
            ("timed pairs", [str(loop[d]["pairs"]) for d in cols]),
        ]
        print(table(f"1. Decode loop without drafting vs HF generate (greedy, {args.max_new_tokens} new tokens; "
                    "decode = after the first token)", cols, rows))
        print()
    if verify:
        cols, B = list(verify), args.block_size

        def tau(x: float) -> str:
            return fmt(x) + ("  (> B: unreachable)" if x > B else "")

        rows = [
            ("T1: target forward, 1 token, ms", [fmt(verify[d]["t1"]) for d in cols]),
            (f"T{B}: target forward, {B}-token block + hidden states, ms", [fmt(verify[d]["tB"]) for d in cols]),
            (f"T{B} / T1", [fmt(verify[d]["ratio"]) for d in cols]),
            (f"drafter forward, {B}-token block (1 layer), ms", [fmt(verify[d]["draft"]) for d in cols]),
            (f"drafter scoring: LM head on {B - 1} rows + argmax, ms", [fmt(verify[d]["head"]) for d in cols]),
            (f"full step T{B} + drafter, ms", [fmt(verify[d]["step"]) for d in cols]),
            ("full step / T1", [fmt(verify[d]["ratio_full"]) for d in cols]),
            ("break-even tau, target only (= T_B/T1)", [tau(verify[d]["ratio"]) for d in cols]),
            ("tau for 2x, target only (= 2 T_B/T1)", [tau(2 * verify[d]["ratio"]) for d in cols]),
            ("break-even tau, with drafter", [tau(verify[d]["ratio_full"]) for d in cols]),
            ("tau for 2x, with drafter", [tau(2 * verify[d]["ratio_full"]) for d in cols]),
        ]
        print(table(f"2. Verify cost with a {args.context}-token KV cache (median of {args.forward_repeats}; "
                    f"tau = tokens committed per step, at most B={B})", cols, rows))
        print()
    for text in profiles:
        print(text)
        print()
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
