"""What a verify policy would give a drafter on a CPU's costs, predicted offline from exact walks.

Times nothing but the costs: the drafter drafts every block of each held-out text in one pass
(exact: greedy decoding commits the same tokens at the same anchors), which gives, per anchor,
its distribution's top choices at each offset and the text's tokens there. Walking those with
`VerifyCosts.verify_size`, `VerifyCosts.rest_after`, and for trees `draft_tree`,
`VerifyCosts.best_size` and `tree_accept` (the functions `spec_generate` uses) and the costs of
one step gives the speedup of each policy on each task:

    speedup = tokens x T_1 / sum over steps of (T_draft + T_s, or T_1 for a rest step)

It predicted stage 2's adaptive verify on AVX2 (emulated) at 0.98x against 0.86x whole blocks,
measured 1.00x and 0.82x. Held-out texts: fp32 greedy rollouts of prompts no drafter trained on:

    draftopd rollout --target smollm2-135m --prompts 'gsm8k[1200:1230],humaneval[134:164],mt-bench[60:80]' \\
        --max-new-tokens 128 --dtype fp32 --out runs/heldout
    python benchmarks/verify_policy.py --rollouts runs/heldout                         # costs measured here
    python benchmarks/verify_policy.py --rollouts runs/heldout --costs 6.0:41.6,67.7,82.9,61.2   # ms, given

Give costs for 1..2B tokens to predict tree verify up to 2B (with B only, trees stop at B).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

from draftopd.data.rollouts import load_rollouts
from draftopd.decoding.costs import measure_verify_costs
from draftopd.decoding.speculative import TREE_TOP, VerifyCosts, draft_tree, tree_accept
from draftopd.decoding.verify import TREE_TOKENS_PER_BLOCK
from draftopd.errors import DraftOPDError
from draftopd.evaluation.bench import TokenSequence
from draftopd.model.checkpoint import load_drafter
from draftopd.model.precision import hardware_record
from draftopd.model.target import load_target
from draftopd.training.blocks import block_labels, replay
from draftopd.training.onpolicy import text_features

POLICIES = ("whole blocks", "adaptive, no rest", "adaptive", "tree")


def parse_costs(text: str) -> VerifyCosts:
    """'DRAFT_MS:V1,V2,...' -> VerifyCosts in seconds (argparse type: a bad value is one line)."""
    try:
        draft, verify = text.split(":")
        return VerifyCosts(float(draft) / 1e3, [float(v) / 1e3 for v in verify.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DRAFT_MS:V1,V2,... (e.g. 6.0:41.6,67.7,82.9,61.2)") from None


@torch.no_grad()
def anchor_table(draft, target, sequences) -> list[dict]:
    """Per text, per anchor from the prompt's end: the drafter's top choices (probabilities
    [B-1, k], token ids [B-1, k]) and the text's tokens at offsets 1..B-1 (-1 past its end)."""
    embed, head = target.get_input_embeddings(), draft.draft_head(target.get_output_embeddings())
    B, table = draft.block_size, []
    for seq, feats in zip(sequences, text_features(target, sequences, draft.target_layer_ids)):
        ids, L = seq.ids[None], seq.ids.shape[0]
        anchors = torch.arange(seq.prompt_len, L - 1)[None]
        probs = head(replay(draft, embed, feats, ids, anchors)[0, :, 1:]).float().softmax(-1)  # [m, B-1, V']
        top = probs.topk(min(TREE_TOP, probs.shape[-1]), -1)
        table.append({"top_p": top.values, "top_ids": head.tokens(top.indices),
                      "labels": block_labels(ids, anchors, B, torch.tensor([L]))[0, :, 1:].tolist()})
    return table


def walk(text: dict, costs: VerifyCosts, policy: str, B: int) -> tuple[int, float, int, int]:
    """One text decoded under `policy`: (tokens, seconds, steps, rest steps)."""
    top_p, top_ids, labels = text["top_p"], text["top_ids"], text["labels"]
    a, tokens, seconds, steps, rests, rest, resting = 0, 0, 0.0, 0, 0, 0, 0
    while a < len(labels):
        if resting:
            resting, n, t = resting - 1, 1, costs.verify[0]
            rests += 1
        elif policy == "tree":
            tree = draft_tree(0, top_p[a], top_ids[a], TREE_TOKENS_PER_BLOCK * B)
            tree = tree.prefix(costs.best_size(tree.expected))
            rest = resting = VerifyCosts.rest_after(len(tree), rest)
            # the target's choice after a node on the text's path is the text's next token (others are never asked)
            path, _ = tree_accept(tree.tokens, tree.parents, [labels[a][d] if d < B - 1 else -1 for d in tree.depths])
            n, t = len(path), costs.draft + costs.verify[len(tree) - 1]
        else:
            drafts = top_ids[a][:, 0].tolist()
            accepted = next((i for i, (d, y) in enumerate(zip(drafts, labels[a])) if d != y), B - 1)
            size = B if policy == "whole blocks" else costs.verify_size(top_p[a][:, 0].tolist()[: B - 1])
            if policy == "adaptive":
                rest = resting = VerifyCosts.rest_after(size, rest)
            n, t = min(accepted, size - 1) + 1, costs.draft + costs.verify[size - 1]
        n = min(n, len(labels) - a)
        a, tokens, seconds, steps = a + n, tokens + n, seconds + t, steps + 1
    return tokens, seconds, steps, rests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", required=True, help="held-out greedy rollouts (fp32 for exact walks)")
    ap.add_argument("--draft", action="append", help="drafter (repeatable; default: the shipped one)")
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--costs", type=parse_costs, help="DRAFT_MS:V1,...,VB for every drafter (default: each one's, measured here)")
    ap.add_argument("--dtype", default="fp32", help="for the walks (fp32: exact) and measured costs")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, held = load_rollouts(args.rollouts)  # before the target loads: a wrong path fails at once
    target = load_target(args.target, dtype=args.dtype)
    sequences = [TokenSequence(torch.tensor(r.prompt_ids + r.response_ids), len(r.prompt_ids)) for r in held]
    tasks = [r.id.split(":")[0] for r in held]
    hw = hardware_record(target.dtype, target.device)
    for path in args.draft or ["smollm2-135m-dflash"]:
        draft = load_drafter(path, dtype=target.dtype)
        if args.costs:
            costs, where = args.costs, "given"
            if len(costs.verify) < draft.block_size:
                ap.error(f"--costs gives verify times for {len(costs.verify)} tokens; {path} drafts blocks of "
                         f"{draft.block_size}: give one per size 1..{draft.block_size} (or ..2B, for trees)")
        else:  # each drafter's own: a deeper one costs more per step
            costs = measure_verify_costs(target, draft, tokens=TREE_TOKENS_PER_BLOCK * draft.block_size)
            where = f"measured here ({hw.get('cpu_capability') or hw.get('gpu')}, {hw['dtype']}, {hw['threads']} threads)"
        print(f"{path}: B={draft.block_size}; costs {where}: drafter {costs.draft * 1e3:.1f} ms, verify of "
              f"1..{len(costs.verify)} tokens {' / '.join(f'{t * 1e3:.1f}' for t in costs.verify)} ms")
        table = anchor_table(draft, target.model, sequences)
        for policy in POLICIES:
            per = defaultdict(lambda: [0, 0.0, 0, 0])
            for task, text in zip(tasks, table):
                for key in (task, "all"):
                    for i, v in enumerate(walk(text, costs, policy, draft.block_size)):
                        per[key][i] += v
            cells = [f"{k} {tok * costs.verify[0] / sec:.3f}x tau {tok / steps:.2f} rest {rests / steps:.0%}"
                     for k, (tok, sec, steps, rests) in sorted(per.items())]
            print(f"  {policy:18s} " + " | ".join(cells))


if __name__ == "__main__":
    try:
        main()
    except DraftOPDError as e:  # a bad drafter, target or rollout directory: one line
        sys.exit(f"verify_policy.py: {e}")
