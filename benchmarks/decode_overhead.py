"""Verify cost on this machine: the bound on any drafter's speedup here.

A verify step runs the target over a B-token block (with hidden states, as `spec_generate`
does) instead of one token, and pays the drafter's own pass (its layers over the new context
rows and the block, then the target's LM head on the B-1 drafted rows). With tau tokens
committed per step, speedup over plain decoding = tau * T_1 / (T_B + T_draft), so

    break-even tau = (T_B + T_draft) / T_1,   tau for 2x = 2 * (T_B + T_draft) / T_1.

All on a ~200-token cache, median of `torch.utils.benchmark` runs, one line per block size.
Loop overhead (our loop at block size 1 vs HF generate) is in every `draftopd eval` run;
our loop vs the reference `dflash_generate` is `benchmarks/vs_reference.py`.

    python benchmarks/decode_overhead.py                                   # shipped drafter, dtype auto
    python benchmarks/decode_overhead.py --dtype fp32 --block-sizes 4,8,16 --drafter DIR
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.benchmark import Timer
from transformers import DynamicCache

from draftopd.decoding.speculative import cache_kwarg, crop_cache
from draftopd.model.checkpoint import load_drafter
from draftopd.model.drafter import ContextCache, DraftHead, context_features
from draftopd.model.precision import hardware_record
from draftopd.model.target import load_target

CACHE = 200  # tokens already in the KV caches
NEW_ROWS = 2  # context rows a drafter step appends (tau of the step before)


def median_s(fn, min_run_time: float) -> float:
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


@torch.inference_mode()
def measure(target, draft, block_sizes: list[int], min_run_time: float) -> list[dict]:
    model, dev = target.model, target.device
    ids = torch.randint(100, 10_000, (1, CACHE + max(block_sizes)), device=dev)
    model_cache = DynamicCache(config=model.config)
    kv = {cache_kwarg(model): model_cache}  # the KV-cache keyword this transformers version takes
    out = model(input_ids=ids[:, :CACHE], **kv, use_cache=True, output_hidden_states=True)
    feats = context_features(out.hidden_states, draft.target_layer_ids)  # [1, CACHE, F]
    positions = torch.arange(CACHE + max(block_sizes) + NEW_ROWS, device=dev)[None]

    def target_step(n: int):
        def run():
            model(input_ids=ids[:, CACHE:CACHE + n], position_ids=positions[:, CACHE:CACHE + n],
                  **kv, use_cache=True, output_hidden_states=n > 1)
            crop_cache(model_cache, CACHE)
        return run

    cache = ContextCache(len(draft.layers))
    draft(model.get_input_embeddings()(ids[:, :1]), feats[:, :CACHE - NEW_ROWS], block_positions=positions[:, :1],
          context_positions=positions[:, :CACHE - NEW_ROWS], cache=cache)
    kept = list(zip(cache.k, cache.v))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()

    def draft_step(B: int, draft_head):
        block = torch.full((1, B), draft.mask_token_id, device=dev)
        def run():
            hidden = draft(embed(block), feats[:, CACHE - NEW_ROWS:], block_positions=positions[:, CACHE:CACHE + B],
                           context_positions=positions[:, CACHE - NEW_ROWS:CACHE], cache=cache)
            draft_head.greedy(hidden[0, 1:])
            cache.k, cache.v = [k for k, _ in kept], [v for _, v in kept]  # drop the rows just appended
        return run

    heads = {"all": DraftHead.whole(head)}
    if draft.draft_vocab is not None:  # and the drafter's own draft vocabulary
        heads[str(len(draft.draft_vocab))] = draft.draft_head(head)
    t1 = median_s(target_step(1), min_run_time)
    rows = []
    for B in block_sizes:
        tb = median_s(target_step(B), min_run_time)
        for name, draft_head in heads.items():
            td = median_s(draft_step(B, draft_head), min_run_time)
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
    args = ap.parse_args()
    target = load_target(args.target, dtype=args.dtype)
    draft = load_drafter(args.drafter).to(target.dtype)
    hw = hardware_record(target.dtype, target.device)
    rows = measure(target, draft, [int(b) for b in args.block_sizes.split(",")], args.min_run_time)
    print(f"{args.target}, drafter {args.drafter} ({len(draft.layers)} layers), {hw['dtype']} on "
          f"{hw.get('cpu_capability') or hw.get('gpu')}, {hw['threads']} threads, cache {CACHE} tokens")
    print(f"{'B':>3} {'draft vocab':>11} {'T_1 ms':>8} {'T_B ms':>8} {'T_draft ms':>11} {'T_B/T_1':>8} "
          f"{'break-even tau':>15} {'tau for 2x':>11}")
    for r in rows:
        print(f"{r['block_size']:>3} {r['draft_vocab']:>11} {r['t1_ms']:>8.1f} {r['tB_ms']:>8.1f} {r['tdraft_ms']:>11.1f} "
              f"{r['verify_ratio']:>8.2f} {r['break_even_tau']:>15.2f} {r['tau_for_2x']:>11.2f}")


if __name__ == "__main__":
    main()
