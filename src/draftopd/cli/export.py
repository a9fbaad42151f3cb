"""`draftopd export`: a clean reference-format copy of a drafter, bf16 by default as published."""


def cmd_export(args) -> None:
    from draftopd.errors import DraftOPDError
    from draftopd.model.checkpoint import check_drafter_out, load_drafter, save_drafter
    from draftopd.model.precision import parse_dtype

    dtype = parse_dtype(args.dtype)
    check_drafter_out(args.out, args.overwrite)
    draft = load_drafter(args.draft)
    if args.block_size is not None:
        if args.block_size < 2:
            raise DraftOPDError(f"--block-size {args.block_size}: a drafter drafts at least 1 token, so >= 2")
        draft.config.block_size = draft.block_size = args.block_size
    save_drafter(draft, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"exported {args.draft} -> {args.out} ({str(dtype).removeprefix('torch.')}, block size {draft.block_size})")


def register(sub) -> None:
    s = sub.add_parser("export", help="write a clean reference-format copy of a drafter (for SGLang/vLLM/dflash)")
    s.add_argument("--draft", required=True, help="drafter directory, shipped alias or HF id")
    s.add_argument("--out", required=True, help="output directory; must be new or empty")
    s.add_argument("--dtype", default="bf16", help="weight dtype: bf16 (default, as published), fp16 or fp32")
    s.add_argument("--block-size", type=int, default=None,
                   help="block size to serve at (engines read it from config.json; default: keep). The weights do "
                        "not depend on it: a drafter trained at B=8 whose tau stays near 1.3 loses almost nothing "
                        "at B=4, and a shorter block is cheaper to draft and verify on a CPU")
    s.add_argument("--overwrite", action="store_true", help="replace an existing drafter directory at --out")
    s.set_defaults(func=cmd_export)
