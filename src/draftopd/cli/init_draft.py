"""`draftopd init-draft`: a randomly initialised drafter sized for a target, in the reference format."""

import argparse

from draftopd.cli import DTYPE_CHOICES, DTYPE_HELP, EMBEDDED_TARGET


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


def register(sub) -> None:
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
