"""`draftopd` command line. Each subcommand is a thin wrapper over a library function.

Errors the user can fix (`DraftOPDError`) print as one line and exit with status 2.
"""

import argparse
import json
import sys
import time

from draftopd.cli import DTYPE_CHOICES, DTYPE_HELP
from draftopd.errors import DraftOPDError

EMBEDDED_TARGET = "smollm2-135m"


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_init_draft(args) -> None:
    from draftopd.model.checkpoint import check_drafter_out, init_drafter, save_drafter
    from draftopd.model.target import load_target

    check_drafter_out(args.out, args.overwrite)  # before the target loads: a refused --out fails at once
    target = load_target(args.target, dtype=args.dtype)
    draft = init_drafter(target, num_layers=args.num_layers, block_size=args.block_size,
                         target_layer_ids=args.target_layer_ids, mask_token_id=args.mask_token_id, seed=args.seed)
    save_drafter(draft, args.out, overwrite=args.overwrite)
    n = sum(p.numel() for p in draft.parameters())
    tok = target.tokenizer.convert_ids_to_tokens(draft.mask_token_id) if draft.mask_token_id < len(target.tokenizer) else "<spare row>"
    print(f"drafter: {args.out}  layers={args.num_layers} block_size={args.block_size} params={n / 1e6:.1f}M "
          f"target_layer_ids={draft.target_layer_ids} mask_token_id={draft.mask_token_id} ({tok})")


def cmd_generate(args) -> None:
    import torch

    from draftopd.data.prompts import apply_chat_template
    from draftopd.decoding.speculative import spec_generate
    from draftopd.model.checkpoint import load_drafter
    from draftopd.model.target import load_target, stop_token_ids

    if args.max_new_tokens <= 0:
        raise DraftOPDError(f"max_new_tokens must be positive, got {args.max_new_tokens}")
    draft = load_drafter(args.draft)  # first: a bad path fails before the target loads
    target = load_target(args.target, dtype=args.dtype)
    draft.to(target.dtype)
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

    res = spec_generate(draft, target, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, stop_token_ids=stop_token_ids(tok, target.model),
                        block_size=args.block_size, generator=gen, on_tokens=None if args.json else stream)
    new = res.output_ids[0, res.num_input_tokens:].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    tps = 1 / res.time_per_output_token if res.time_per_output_token else 0.0
    if args.json:
        print(json.dumps({"output_ids": res.output_ids[0].tolist(), "generated_ids": new, "text": text,
                          "acceptance_lengths": res.acceptance_lengths, "tau": res.tau,
                          "num_output_tokens": res.num_output_tokens, "time_to_first_token": res.time_to_first_token,
                          "time_per_output_token": res.time_per_output_token}))
        return
    print()
    print(f"\n[tau={res.tau:.2f} over {len(res.acceptance_lengths)} verify steps | {res.num_output_tokens} tokens "
          f"| {tps:.1f} tok/s | ttft {res.time_to_first_token * 1000:.0f} ms]", file=sys.stderr)


def cmd_export(args) -> None:
    from draftopd.model.checkpoint import check_drafter_out, load_drafter, save_drafter
    from draftopd.model.precision import parse_dtype

    dtype = parse_dtype(args.dtype)
    check_drafter_out(args.out, args.overwrite)
    draft = load_drafter(args.draft)
    save_drafter(draft, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"exported {args.draft} -> {args.out} ({str(dtype).removeprefix('torch.')})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="draftopd",
        description="Train DFlash block drafters for lossless speculative decoding (SFT and Draft-OPD). "
                    f"Targets: an HF model id, a local folder, or the embedded '{EMBEDDED_TARGET}'.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init-draft", help="create a randomly initialised drafter sized for a target")
    s.add_argument("--target", default=EMBEDDED_TARGET, help="HF id, local path or embedded alias (default: %(default)s)")
    s.add_argument("--num-layers", type=int, default=1, help="drafter decoder layers (published: 5; default %(default)s)")
    s.add_argument("--block-size", type=int, default=16, help="block size B: anchor + B-1 drafts (default %(default)s)")
    s.add_argument("--target-layer-ids", type=_int_list, default=None,
                   help="target layers whose outputs condition the drafter, e.g. 1,9,17 (default: spread over 1..L-3)")
    s.add_argument("--mask-token-id", type=int, default=None,
                   help="id whose embedding marks masked slots (default: a spare row, else an unused special token)")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=f"{DTYPE_HELP} (default %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output directory (reference DFlash format); must be new or empty")
    s.add_argument("--overwrite", action="store_true", help="replace an existing drafter directory at --out")
    s.set_defaults(func=cmd_init_draft)

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
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("export", help="write a clean reference-format copy of a drafter (for SGLang/vLLM/dflash)")
    s.add_argument("--draft", required=True, help="drafter directory, shipped alias or HF id")
    s.add_argument("--out", required=True, help="output directory; must be new or empty")
    s.add_argument("--dtype", default="bf16", help="weight dtype: bf16 (default, as published), fp16 or fp32")
    s.add_argument("--overwrite", action="store_true", help="replace an existing drafter directory at --out")
    s.set_defaults(func=cmd_export)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


from draftopd.cli import demo, evaluate, rollout, train  # noqa: E402  (each registers one subcommand)

_EXTRA_COMMANDS: list = [rollout.register, train.register, evaluate.register, demo.register]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_hf()
    t0 = time.time()
    try:
        args.func(args)
    except DraftOPDError as e:
        print(f"draftopd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"draftopd {args.command}: interrupted after {time.time() - t0:.0f}s; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
