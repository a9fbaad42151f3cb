"""`draftopd rollout`: the target answers a prompt set; its responses become drafter training data."""

import argparse
import os
import sys
import time
from functools import partial

from draftopd.cli import DTYPE_CHOICES, DTYPE_HELP


def register(sub) -> None:
    s = sub.add_parser(
        "rollout", help="write the target's responses to a prompt set (drafter training data)",
        description="Generate target responses with batched HF generate and write them as a rollout "
                    "directory (meta.json + rollouts.jsonl). Records are saved after every batch; "
                    "rerunning the same command resumes an interrupted run.")
    s.add_argument("--target", required=True,
                   help="HF model id, local folder, or the embedded alias 'smollm2-135m'")
    s.add_argument("--prompts", required=True,
                   help="prompt spec, e.g. 'gsm8k[:1000],sharegpt[:500]' or a .jsonl path")
    s.add_argument("--out", required=True, help="rollout directory to create or resume")
    s.add_argument("--max-new-tokens", type=int, default=256, help="response length cap (default %(default)s)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="prompts per generate call and per saved chunk (default 16; 512 with --backend vllm)")
    s.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="skip prompts longer than this after the chat template (default %(default)s)")
    s.add_argument("--min-prompt-tokens", type=int, default=0,
                   help="skip prompts shorter than this, e.g. to add a set's longer prompts to rollouts made "
                        "with a lower --max-prompt-tokens (default %(default)s)")
    s.add_argument("--turns", type=int, default=1,
                   help="user turns answered per multi-turn conversation (MT-Bench; ShareGPT, cut to its first "
                        "two): turn t is asked after the target's own answers to the turns before, as in MT-Bench. "
                        "Later turns get ids '<id>:turn<t>'; with --backend hf or --engine-url. Rerun into a "
                        "directory with a larger --turns to add later turns to its first answers (default %(default)s)")
    s.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="chat template thinking switch for targets that have one (Qwen3)")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help=f"target weights; {DTYPE_HELP} (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed; batch i uses seed + i (default %(default)s)")
    s.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: batched transformers generate here; vllm: vLLM's offline engine in this process "
                        "(pip install 'draftopd[vllm]', a CUDA GPU) (default %(default)s)")
    s.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs vLLM shards the target over with --backend vllm (default %(default)s)")
    s.add_argument("--engine-url", default=None,
                   help="generate on a running vLLM/SGLang (OpenAI-compatible) server at this URL instead of "
                        "locally; only the target's tokenizer and config are loaded. An API key is read from "
                        "$DRAFTOPD_ENGINE_API_KEY")
    s.add_argument("--engine-model", default=None, help="model id the server serves (default: the --target spec)")
    s.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight with --engine-url (default %(default)s)")
    s.set_defaults(func=cmd_rollout)


def cmd_rollout(args) -> None:
    from draftopd.data.prompts import load_prompts
    from draftopd.data.rollouts import (RolloutSettings, answer_turns, check_rollout_dir, generate_rollouts,
                                        read_records)
    from draftopd.errors import DraftOPDError
    from draftopd.model.target import load_target

    batch_size = args.batch_size or (512 if args.backend == "vllm" else 16)
    settings = RolloutSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               batch_size=batch_size, max_prompt_tokens=args.max_prompt_tokens,
                               min_prompt_tokens=args.min_prompt_tokens,
                               thinking=args.thinking, seed=args.seed, turns=args.turns)
    prompts = load_prompts(args.prompts)  # first: a bad spec or output fails before the target loads
    check_rollout_dir(args.out)
    if settings.turns > 1 and not any(p.turns and len(p.turns) > 1 for p in prompts):
        print(f"draftopd rollout: --turns {settings.turns}: none of these prompts has a later user turn "
              "(multi-turn sets: mt-bench, sharegpt); answering first turns", file=sys.stderr)
    if args.engine_url and args.backend != "hf":
        raise DraftOPDError(f"--engine-url and --backend {args.backend}: choose one (the URL's server generates)")
    if args.backend == "vllm" and settings.turns > 1:
        raise DraftOPDError(f"--turns {settings.turns} runs with --backend hf or --engine-url; with --backend vllm "
                            "answer first turns only (each round would start a new engine on the same GPU)")
    if args.backend == "vllm":
        from draftopd.data.vllm_offline import vllm_rollouts

        run, tokenizer = partial(vllm_rollouts, args.target, out_dir=args.out, settings=settings, dtype=args.dtype,
                                 tensor_parallel_size=args.tensor_parallel_size, chunk=settings.batch_size,
                                 prompt_spec=args.prompts), None  # first turns only (above)
    elif args.engine_url:
        from draftopd.data.engine import engine_rollouts, target_without_weights

        tokenizer, identity, stop = target_without_weights(args.target)
        run = partial(engine_rollouts, args.engine_url, args.engine_model or args.target, tokenizer,
                      out_dir=args.out, settings=settings, target_identity=identity, stop_ids=stop,
                      prompt_spec=args.prompts, concurrency=args.concurrency,
                      api_key=os.environ.get("DRAFTOPD_ENGINE_API_KEY"))
    else:
        target = load_target(args.target, dtype=args.dtype)
        run, tokenizer = partial(generate_rollouts, target, out_dir=args.out, settings=settings,
                                 prompt_spec=args.prompts), target.tokenizer
    before = {r.id for r in read_records(args.out)}
    t0 = time.perf_counter()
    try:
        out = answer_turns(lambda ps: run(prompts=ps), prompts, tokenizer, settings)
    except KeyboardInterrupt:
        print(f"\n{len(read_records(args.out))} rollouts are saved in {args.out}; "
              "rerun the same command to resume", file=sys.stderr)
        raise
    seconds = time.perf_counter() - t0
    rollouts = read_records(out)
    new_tokens = sum(len(r.response_ids) for r in rollouts if r.id not in before)
    total_tokens = sum(len(r.response_ids) for r in rollouts)
    first = {p.id for p in prompts}
    skipped = len(first) - sum(1 for r in rollouts if r.id in first)
    later = sum(1 for r in rollouts if r.id not in first and r.id not in before)
    print(f"rollouts: {len(rollouts)} ({len(rollouts) - len(before)} new"
          + (f", {later} of them later turns" if later else "")
          + (f", {skipped} prompts outside {settings.min_prompt_tokens}-{settings.max_prompt_tokens} tokens skipped"
             if skipped else "")
          + f") | {total_tokens} response tokens | {new_tokens / seconds:.1f} tok/s | {out}")
