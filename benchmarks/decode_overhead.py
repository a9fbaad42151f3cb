"""Verify cost on this machine: the bound on any drafter's speedup here.

A verify step runs the target over a B-token block (with hidden states, as `spec_generate`
does) instead of one token, and pays the drafter's own pass (its layers over the new context
rows and the block, then the target's LM head on the B-1 drafted rows). With tau tokens
committed per step, speedup over plain decoding = tau * T_1 / (T_B + T_draft), so

    break-even tau = (T_B + T_draft) / T_1,   tau for 2x = 2 * (T_B + T_draft) / T_1.

All on a ~200-token cache, median of `torch.utils.benchmark` runs, one line per block size,
with the CPU linears packed (as every draftopd command loads a CPU target: `model/packed.py`)
and, for comparison in the same run, plain (`--linears packed,plain`).
Loop overhead (our loop at block size 1 vs HF generate) is in every `draftopd eval` run;
our loop vs the reference `dflash_generate` is `benchmarks/vs_reference.py`.

    python benchmarks/decode_overhead.py                                   # shipped drafter, dtype auto
    python benchmarks/decode_overhead.py --dtype fp32 --block-sizes 4,8,16 --drafter DIR
"""

from __future__ import annotations

import argparse

from draftopd.decoding.costs import CONTEXT, StepTimers, median_seconds
from draftopd.model.checkpoint import load_drafter
from draftopd.model.drafter import DraftHead
from draftopd.model.packed import pack_linears, unpack_linears
from draftopd.model.precision import hardware_record
from draftopd.model.target import load_target


def measure(target, draft, block_sizes: list[int], min_run_time: float) -> list[dict]:
    timers = StepTimers(target.model, draft, max(block_sizes))
    head = target.model.get_output_embeddings()
    heads = {"all": DraftHead.whole(head)}
    if draft.draft_vocab is not None:  # and the drafter's own draft vocabulary
        heads[str(len(draft.draft_vocab))] = draft.draft_head(head)
    t1 = median_seconds(timers.target_step(1), min_run_time)
    rows = []
    for B in block_sizes:
        tb = median_seconds(timers.target_step(B), min_run_time)
        for name, draft_head in heads.items():
            td = median_seconds(timers.draft_step(B, draft_head), min_run_time)
            rows.append({"block_size": B, "draft_vocab": name, "t1_ms": t1 * 1e3, "tB_ms": tb * 1e3,
                         "tdraft_ms": td * 1e3, "verify_ratio": tb / t1, "break_even_tau": (tb + td) / t1,
                         "tau_for_2x": 2 * (tb + td) / t1})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--drafter", default="smollm2-135m-dflash", help="its layers and LM-head rows are timed")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--block-sizes", default="2,4,8,16")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--linears", default="packed,plain", choices=["packed,plain", "packed", "plain"],
                    help="CPU linears as draftopd loads them (packed), plain nn.Linear, or both in turn")
    args = ap.parse_args()
    target = load_target(args.target, dtype=args.dtype)
    draft = load_drafter(args.drafter).to(target.dtype)
    hw = hardware_record(target.dtype, target.device)
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    print(f"{args.target}, drafter {args.drafter} ({len(draft.layers)} layers), {hw['dtype']} on "
          f"{hw.get('cpu_capability') or hw.get('gpu')}, {hw['threads']} threads, cache {CONTEXT} tokens")
    print(f"{'linears':>7} {'B':>3} {'draft vocab':>11} {'T_1 ms':>8} {'T_B ms':>8} {'T_draft ms':>11} {'T_B/T_1':>8} "
          f"{'break-even tau':>15} {'tau for 2x':>11}")
    for kind in args.linears.split(","):
        if kind == "packed":
            pack_linears(target.model), pack_linears(draft)
        else:
            unpack_linears(target.model), unpack_linears(draft)
        for r in measure(target, draft, block_sizes, args.min_run_time):
            print(f"{kind:>7} {r['block_size']:>3} {r['draft_vocab']:>11} {r['t1_ms']:>8.1f} {r['tB_ms']:>8.1f} "
                  f"{r['tdraft_ms']:>11.1f} {r['verify_ratio']:>8.2f} {r['break_even_tau']:>15.2f} "
                  f"{r['tau_for_2x']:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
