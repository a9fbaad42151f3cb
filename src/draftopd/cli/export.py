"""`draftopd export`: a clean reference-format copy of a drafter, bf16 by default as published."""

from pathlib import Path

DEFAULT_TOKEN_MAP_SIZE = 4096


def token_map(source: str, size: int | None, vocab_size: int):
    """(token ids or None, a line saying what they are) from `none`, a token map file or a rollout directory."""
    from draftopd.data.rollouts import load_rollouts
    from draftopd.errors import DraftOPDError
    from draftopd.dflash import read_token_map
    from draftopd.model.draft_vocab import frequent_tokens, token_counts

    if source == "none":
        return None, "token map: none (drafts from the whole vocabulary)"
    path = Path(source)
    if path.is_dir():
        meta, rollouts = load_rollouts(path)
        made_for = meta["target"].get("vocab_size")
        if made_for is not None and made_for != vocab_size:
            raise DraftOPDError(f"--token-map {source}: rollouts of a target with vocabulary {made_for}, but the "
                                f"drafter's is {vocab_size}; use rollouts of the drafter's target")
        counts = token_counts((r.response_ids for r in rollouts), vocab_size)
        ids, coverage = frequent_tokens(counts, size or DEFAULT_TOKEN_MAP_SIZE)
        return ids, (f"token map: the {len(ids)} most frequent of {int((counts > 0).sum())} distinct tokens in "
                     f"{len(rollouts)} responses of {path}, covering {coverage:.1%} of their {int(counts.sum())} tokens")
    if not path.exists():
        raise DraftOPDError(f"--token-map {source}: no such file or rollout directory (or pass 'none')")
    ids = read_token_map(path, vocab_size)
    if size is not None:
        if size < 1:
            raise DraftOPDError(f"--token-map-size must be at least 1, got {size}")
        ids = ids[:size]
    return ids, f"token map: {len(ids)} token ids from {path}"


def cmd_export(args) -> None:
    from draftopd.errors import DraftOPDError
    from draftopd.model.checkpoint import check_drafter_out, load_drafter, save_drafter
    from draftopd.model.precision import parse_dtype

    dtype = parse_dtype(args.dtype)
    check_drafter_out(args.out, args.overwrite)
    if args.token_map_size is not None and args.token_map is None:
        raise DraftOPDError("--token-map-size needs --token-map (a rollout directory or a token map file)")
    draft = load_drafter(args.draft)
    if args.block_size is not None:
        if args.block_size < 2:
            raise DraftOPDError(f"--block-size {args.block_size}: a drafter drafts at least 1 token, so >= 2")
        draft.config.block_size = draft.block_size = args.block_size
    if args.token_map is not None:
        ids, said = token_map(args.token_map, args.token_map_size, draft.config.vocab_size)
        draft.set_draft_vocab(ids)
        print(said)
    save_drafter(draft, args.out, dtype=dtype, overwrite=args.overwrite)
    vocab = "all" if draft.draft_vocab is None else len(draft.draft_vocab)
    print(f"exported {args.draft} -> {args.out} ({str(dtype).removeprefix('torch.')}, block size {draft.block_size}, "
          f"draft vocabulary {vocab} tokens)")


def register(sub) -> None:
    s = sub.add_parser("export", help="write a clean reference-format copy of a drafter (for SGLang/vLLM/dflash)")
    s.add_argument("--draft", required=True, help="drafter directory, shipped alias or HF id")
    s.add_argument("--out", required=True, help="output directory; must be new or empty")
    s.add_argument("--dtype", default="bf16", help="weight dtype: bf16 (default, as published), fp16 or fp32")
    s.add_argument("--block-size", type=int, default=None,
                   help="block size to serve at (engines read it from config.json; default: keep). The weights do "
                        "not depend on it: a drafter trained at B=8 whose tau stays near 1.3 loses almost nothing "
                        "at B=4, and a shorter block is cheaper to draft and verify on a CPU")
    s.add_argument("--token-map", default=None, metavar="ROLLOUTS|FILE|none",
                   help="draft vocabulary written as token_map.pt (FR-Spec; SGLang's --speculative-token-map "
                        "format): a rollout directory (its responses' most frequent tokens), a token map file, or "
                        "'none' to drop one. Drafting from ~4K frequent tokens makes the drafter's LM head ~10x "
                        "cheaper; output is unchanged (the target verifies). Default: keep the source's")
    s.add_argument("--token-map-size", type=int, default=None,
                   help=f"keep this many most frequent tokens (default {DEFAULT_TOKEN_MAP_SIZE} from rollouts; "
                        "a file's first N)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing drafter directory at --out")
    s.set_defaults(func=cmd_export)
