"""`draftopd generate`: speculative decoding of one prompt, streamed; `--json` for machines."""

import argparse
import json
import sys

from draftopd.cli import DTYPE_CHOICES, DTYPE_HELP, EMBEDDED_TARGET
from draftopd.decoding.verify import POLICIES
from draftopd.errors import DraftOPDError


def cmd_generate(args) -> None:
    import torch

    from draftopd.data.prompts import apply_chat_template
    from draftopd.decoding.speculative import spec_generate
    from draftopd.decoding.verify import verify_options
    from draftopd.model.checkpoint import load_drafter
    from draftopd.model.packed import pack_linears
    from draftopd.model.target import load_target, stop_token_ids

    if args.max_new_tokens <= 0:
        raise DraftOPDError(f"max_new_tokens must be positive, got {args.max_new_tokens}")
    policy = args.verify or ("tree" if args.temperature == 0 else "adaptive")
    if policy == "tree" and args.temperature != 0:
        raise DraftOPDError(f"--verify tree is greedy-only, got --temperature {args.temperature}; "
                            "use --verify adaptive or full when sampling")
    draft = load_drafter(args.draft)  # first: a bad path fails before the target loads
    target = load_target(args.target, dtype=args.dtype)
    pack_linears(draft.to(target.dtype))
    tok = target.tokenizer
    ids = torch.tensor([apply_chat_template(tok, [{"role": "user", "content": args.prompt}], thinking=args.thinking)])
    gen = torch.Generator().manual_seed(args.seed)
    streamed: list[int] = []
    shown = [""]

    def stream(new_ids: list[int]) -> None:  # print the text as blocks are committed
        streamed.extend(new_ids)
        text = tok.decode(streamed, skip_special_tokens=True)
        print(text[len(shown[0]):], end="", flush=True)
        shown[0] = text

    options = verify_options(policy, target.model, draft, args.block_size, args.temperature)
    costs = options.get("verify_costs")
    if costs is not None:
        if not args.json:
            print(f"[verify costs here: drafter {costs.draft * 1e3:.1f} ms, target over 1..{len(costs.verify)} tokens "
                  f"{' / '.join(f'{t * 1e3:.1f}' for t in costs.verify)} ms]", file=sys.stderr)
    res = spec_generate(draft, target, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, stop_token_ids=stop_token_ids(tok, target.model.generation_config),
                        block_size=args.block_size, generator=gen, on_tokens=None if args.json else stream,
                        **options)
    new = res.output_ids[0, res.num_input_tokens:].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    tps = 1 / res.time_per_output_token if res.time_per_output_token else 0.0
    if args.json:
        print(json.dumps({"output_ids": res.output_ids[0].tolist(), "generated_ids": new, "text": text,
                          "acceptance_lengths": res.acceptance_lengths, "verify_sizes": res.verify_sizes, "tau": res.tau,
                          "rest_steps": res.rest_steps, "branch_steps": res.branch_steps, "num_output_tokens": res.num_output_tokens, "time_to_first_token": res.time_to_first_token,
                          "time_per_output_token": res.time_per_output_token}))
        return
    print()
    width = (f", {sum(res.verify_sizes) / max(len(res.verify_sizes), 1):.2f} tokens verified per step, "
             f"drafter rested {res.rest_steps}" if costs else "")
    if options.get("tree_tokens"):
        width += f", {res.branch_steps} steps accepted a drafter's second-or-later choice"
    print(f"\n[tau={res.tau:.2f} over {len(res.acceptance_lengths)} verify steps{width} | {res.num_output_tokens} tokens "
          f"| {tps:.1f} tok/s | ttft {res.time_to_first_token * 1000:.0f} ms]", file=sys.stderr)


def register(sub) -> None:
    s = sub.add_parser("generate", help="speculative decoding of one prompt; prints text, tau and tok/s")
    s.add_argument("prompt")
    s.add_argument("--target", default=EMBEDDED_TARGET)
    s.add_argument("--draft", default="smollm2-135m-dflash",
                   help="drafter directory, shipped alias or HF id (default: %(default)s, for the embedded target)")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--block-size", type=int, default=None, help="verify this many tokens per step (default: drafter's)")
    s.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="chat template thinking switch for targets that have one (Qwen3)")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=f"{DTYPE_HELP} (default %(default)s)")
    s.add_argument("--verify", choices=POLICIES, default=None,
                   help="tree (default when greedy): time this machine's verify passes first (~1 s), then verify "
                        "a tree of the drafter's likeliest paths (its top choices at each offset), cut each step "
                        "to the size that pays; adaptive (default when sampling): the same for the block's "
                        "prefix; full: every block whole. The output is the same whichever")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    s.set_defaults(func=cmd_generate)
