"""Our decode loop against the reference's: `spec_generate` vs `dflash_generate` (PyPI dflash 0.1.0).

Same drafter, same target (the embedded SmolLM2-135M), same held-out GSM8K prompts, greedy;
the two loops alternate which goes first on every prompt, so a machine shared with other
jobs slows both alike and the ratio stays fair. Each loop's own clock is used (decode time
after the first token / output tokens: `time_per_output_token` in both). The output tokens
must be identical (asserted); acceptance lengths are compared and reported (in the last step,
when fewer than B positions remain, the reference drafts only those and we draft a full block,
so that one step may differ; a drafter's token_map.pt is read by our loop only, so its drafts,
and then bf16 rounding, may differ too). Goal: ours <= 0.85x the reference's time per output token.

    pip install --no-deps dflash==0.1.0
    python benchmarks/vs_reference.py                         # shipped drafter, fp32 and bf16
    python benchmarks/vs_reference.py --draft runs/demo/opd/final --dtype fp32 --prompts 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer

from draftopd.data.prompts import apply_chat_template, load_prompts
from draftopd.decoding.speculative import spec_generate
from draftopd.errors import DraftOPDError
from draftopd.model.checkpoint import _resolve_drafter_path, init_drafter, load_drafter, save_drafter
from draftopd.model.precision import cpu_capability
from draftopd.model.target import load_target, resolve_target

TARGET = "smollm2-135m"


def reference_module():
    try:
        import dflash.model as reference
    except ImportError:
        raise SystemExit("needs the reference package: pip install --no-deps dflash==0.1.0") from None
    if not torch.cuda.is_available():
        reference._cuda_time = time.perf_counter  # it synchronises CUDA to read its clock
    return reference


def drafter_path(spec: str | None, tmp: str) -> tuple[str, str]:
    """(directory, description) of the drafter both loops use."""
    if spec is not None:
        return str(_resolve_drafter_path(spec)), spec
    try:
        return str(_resolve_drafter_path("smollm2-135m-dflash")), "smollm2-135m-dflash (shipped)"
    except DraftOPDError:
        target = load_target(TARGET, dtype="fp32")
        save_drafter(init_drafter(target, num_layers=1, block_size=16, seed=0), tmp, overwrite=True)
        return tmp, "untrained 1-layer drafter, B=16 (no shipped drafter here: acceptance ~1)"


def run_pair(ours, theirs, target, ids, n, stops, first: str, reference) -> dict:
    runs = {}
    for who in (first, "ref" if first == "ours" else "ours"):
        if who == "ours":
            res = spec_generate(ours, target, ids, n, stop_token_ids=stops)
        else:
            res = reference.dflash_generate(theirs, target.model, ids, n, stops, return_stats=True)
        runs[who] = (res.output_ids.tolist(), res.acceptance_lengths, res.time_per_output_token,
                     res.time_to_first_token)
    return runs


def bench_dtype(dtype: str, path: str, prompts: list[list[int]], args, reference) -> dict:
    target = load_target(TARGET, dtype=dtype)
    ours = load_drafter(path, dtype=target.dtype)
    theirs = reference.DFlashDraftModel.from_pretrained(path, dtype=target.dtype).eval()
    stops = target.stop_token_ids
    warm = torch.tensor([prompts[0]])
    run_pair(ours, theirs, target, warm, 8, stops, "ours", reference)  # first calls pick kernels, allocate
    ratios, t_ours, t_ref, ttft_ours, ttft_ref, taus = [], [], [], [], [], []
    same_lengths = same_tokens = pairs = 0
    for r in range(args.repeats):
        for i, p in enumerate(prompts):
            ids = torch.tensor([p])
            got = run_pair(ours, theirs, target, ids, args.max_new_tokens, stops,
                           "ours" if (r + i) % 2 == 0 else "ref", reference)
            (ids_o, acc_o, tpot_o, ttft_o), (ids_r, acc_r, tpot_r, ttft_r) = got["ours"], got["ref"]
            if ids_o != ids_r and target.dtype == torch.float32:
                raise SystemExit(f"{dtype}: prompt {i}: the two loops produced different tokens")
            pairs += 1
            same_tokens += ids_o == ids_r
            same_lengths += acc_o == acc_r
            ratios.append(tpot_o / tpot_r)
            t_ours.append(tpot_o)
            t_ref.append(tpot_r)
            ttft_ours.append(ttft_o)
            ttft_ref.append(ttft_r)
            taus.append(sum(acc_o) / len(acc_o))
    return {"dtype": dtype, "pairs": pairs, "same_tokens": same_tokens, "same_lengths": same_lengths,
            "tau": statistics.mean(taus),
            "ours_ms": statistics.median(t_ours) * 1e3, "ref_ms": statistics.median(t_ref) * 1e3,
            "ratio_median": statistics.median(ratios), "ratio_total": sum(t_ours) / sum(t_ref),
            "ttft_ours_ms": statistics.median(ttft_ours) * 1e3, "ttft_ref_ms": statistics.median(ttft_ref) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default=None, help="drafter (default: the shipped smollm2-135m-dflash)")
    ap.add_argument("--dtype", default="fp32,bf16", help="comma-separated target dtypes (default %(default)s)")
    ap.add_argument("--prompts", type=int, default=4, help="held-out GSM8K prompts, from gsm8k[1200:]")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: batch-1 decoding on a busy CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reference = reference_module()
    path, what = drafter_path(args.draft, os.path.join(tempfile.mkdtemp(), "untrained"))
    tok = AutoTokenizer.from_pretrained(resolve_target(TARGET))
    prompts = [apply_chat_template(tok, p.messages) for p in load_prompts(f"gsm8k[1200:{1200 + args.prompts}]")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"drafter: {what}\ntarget: {TARGET}  cpu: {cpu_capability()}  torch {torch.__version__}  "
          f"threads {args.threads}  load average {load:.1f} on {os.cpu_count()} CPUs\n"
          f"{len(prompts)} held-out GSM8K prompts x {args.repeats} repeats, {args.max_new_tokens} new tokens, greedy")
    print(f"{'dtype':<9}{'tau':>6}{'ours ms/tok':>13}{'ref ms/tok':>12}{'ours/ref':>10}{'(total)':>9}"
          f"{'same tokens':>13}{'same lengths':>14}{'ttft ours/ref ms':>19}")
    for dtype in args.dtype.split(","):
        s = bench_dtype(dtype, path, prompts, args, reference)
        print(f"{s['dtype']:<9}{s['tau']:>6.2f}{s['ours_ms']:>13.1f}{s['ref_ms']:>12.1f}{s['ratio_median']:>10.3f}"
              f"{s['ratio_total']:>9.3f}{s['same_tokens']:>9}/{s['pairs']}{s['same_lengths']:>10}/{s['pairs']}"
              f"{s['ttft_ours_ms']:>11.0f} / {s['ttft_ref_ms']:.0f}", flush=True)
    print("ours/ref: median over prompt pairs of the time-per-output-token ratio; (total): ratio of the sums")
    print("fp32 must give the same tokens (exact); in bf16 a different draft (a draft vocabulary, which the "
          "reference does not read) changes the verify block, and its rounding can flip near-ties")


if __name__ == "__main__":
    sys.exit(main())
