"""Is drafter B better than drafter A? Exact greedy tau of each, per task, with paired intervals.

Walks every drafter over the same held-out fp32 greedy texts (exact: greedy decoding commits
the same tokens at the same anchors, so no target decoding per drafter): a chain of whole
blocks, and trees of fixed sizes (the `--verify tree` policy before it cuts each step to what
pays on this machine's costs). Prints tau per task (later turns of a conversation apart, e.g.
MT-Bench's second) and each drafter's tau ratio to the first with a 95% paired bootstrap
interval over texts. How the shipped drafter's stages were compared (README):

    draftopd rollout --target smollm2-135m --prompts 'gsm8k[1200:1230],humaneval[134:164],mt-bench[60:80]' \\
        --turns 2 --max-new-tokens 128 --dtype fp32 --out runs/heldout
    python benchmarks/compare_drafters.py --rollouts runs/heldout --draft OLD --draft NEW

The walks take ~1 min per drafter for 100 texts of 128 tokens (2 threads, 2-core AVX512 EPYC).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

from draftopd.data.rollouts import check_rollout_target, load_rollouts
from draftopd.decoding.speculative import draft_tree, tree_accept
from draftopd.errors import DraftOPDError
from draftopd.evaluation.bench import TokenSequence, check_drafter
from draftopd.evaluation.metrics import tau_ratio
from draftopd.model.checkpoint import load_drafter
from draftopd.model.precision import hardware_record
from draftopd.model.target import load_target
from draftopd.training.opd import rollout_temperature
from verify_policy import anchor_table


def tree_walk(text: dict, nodes: int) -> tuple[int, int]:
    """(tokens, steps) of one text when every step verifies the `nodes`-token tree of the likeliest
    paths (nodes = 0: the whole chain, the first choice at each offset)."""
    top_p, top_ids, labels = text["top_p"], text["top_ids"], text["labels"]
    a = tokens = steps = 0
    while a < len(labels):
        if nodes:
            tree = draft_tree(0, top_p[a], top_ids[a], nodes)
        else:  # a chain: the first choice at each offset, as whole-block verify
            tree = draft_tree(0, top_p[a][:, :1], top_ids[a][:, :1], top_p.shape[1] + 1)
        # the target's choice after a node on the text's path is the text's next token (others are never asked)
        path, _ = tree_accept(tree.tokens, tree.parents,
                              [labels[a][d] if d < len(labels[a]) else -1 for d in tree.depths])
        n = min(len(path), len(labels) - a)
        a, tokens, steps = a + n, tokens + n, steps + 1
    return tokens, steps


def task_of(rollout) -> str:
    """'gsm8k', 'mt-bench', or 'mt-bench turn 2' for a later turn: the prompt set the rollout
    recorded, else its id's ('<set>:<n>' or '<set>:<n>:turn<t>')."""
    head, _, turn = rollout.id.partition(":turn")
    source = rollout.meta.get("source") or head.rsplit(":", 1)[0]
    turn = rollout.meta.get("turn") or int(turn or 1)
    return source + (f" turn {turn}" if turn > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", required=True, help="held-out greedy rollouts (fp32 for exact walks)")
    ap.add_argument("--draft", action="append", required=True, help="drafter (repeat; ratios are to the first)")
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--trees", default="6,8", help="tree sizes in tokens, comma-separated (default 6,8)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sizes = [0] + [int(n) for n in args.trees.split(",") if n]
    except ValueError:
        ap.error(f"--trees {args.trees!r}: expected comma-separated token counts, e.g. 6,8")
    if any(n < 2 for n in sizes[1:]):
        ap.error(f"--trees {args.trees!r}: a tree holds the anchor and at least one draft (>= 2 tokens)")
    meta, held = load_rollouts(args.rollouts)  # before the target loads: a wrong path fails at once
    temperature = rollout_temperature(meta)
    if temperature > 0:
        raise DraftOPDError(f"{args.rollouts}: sampled at temperature {temperature}; "
                            "the walks need greedy target text (rollout --temperature 0)")
    if meta.get("dtype") not in (None, "fp32", "float32"):
        print(f"note: {args.rollouts} was decoded in {meta['dtype']}; walks run in fp32, so tau is "
              "close to, not exactly, what decoding gives")
    target = load_target(args.target, dtype="fp32")
    check_rollout_target(args.rollouts, meta, target.identity)
    drafts = [load_drafter(path, dtype=target.dtype) for path in args.draft]  # all checked before any walk
    for draft, path in zip(drafts, args.draft):
        check_drafter(draft, target, path)
    sequences = [TokenSequence(torch.tensor(r.prompt_ids + r.response_ids), len(r.prompt_ids)) for r in held]
    tasks = [task_of(r) for r in held]
    hw = hardware_record(target.dtype, target.device)
    print(f"{len(held)} held-out texts from {args.rollouts}; fp32 walks on {hw.get('cpu_capability') or hw.get('gpu')}")
    counts = {}  # (drafter's index, size) -> [(tokens, steps)] per text
    for j, draft in enumerate(drafts):
        table = anchor_table(draft, target.model, sequences)
        for n in sizes:
            counts[j, n] = [tree_walk(text, n) for text in table]
    per = defaultdict(list)  # task -> indices of its texts
    for i, task in enumerate(tasks):
        per[task].append(i)
        per["all"].append(i)
    groups = sorted(per.items())
    for n in sizes:
        print(f"\n{'chain, whole blocks' if not n else f'tree, {n} tokens'}:")
        for j, path in enumerate(args.draft):
            c = counts[j, n]
            taus = [(k, sum(c[i][0] for i in v) / max(1, sum(c[i][1] for i in v))) for k, v in groups]
            print(f"  {path}: " + " | ".join(f"{k} {tau:.3f}" for k, tau in taus))
            if j:
                ratios = [(k, *tau_ratio([c[i] for i in v], [counts[0, n][i] for i in v])) for k, v in groups]
                print("    / first: " + " | ".join(f"{k} {r:.3f} ({lo:.3f}-{hi:.3f})" for k, r, lo, hi in ratios))


if __name__ == "__main__":
    try:
        main()
    except DraftOPDError as e:  # a bad drafter, target or rollout directory: one line
        sys.exit(f"compare_drafters.py: {e}")
