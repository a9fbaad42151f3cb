"""Rollout throughput and agreement: vLLM offline engine vs batched HF generate (needs a CUDA GPU).

Both backends answer the same prompts on the same target; the script prints response tokens
per second for each and how many responses are token-for-token equal. bf16 greedy text may
differ on near-ties between two kernels' numerics; any text either one writes is valid
on-policy material (DESIGN.md), so agreement is reported, not required.

    pip install 'draftopd[vllm]'
    python benchmarks/vllm_rollouts.py --target smollm2-135m --prompts "gsm8k[:512]" --max-new-tokens 256
"""

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--prompts", default="gsm8k[:512]")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="keep both rollout directories here (default: a temp dir)")
    args = ap.parse_args()

    import torch

    from draftopd.data.prompts import load_prompts
    from draftopd.data.rollouts import RolloutSettings, generate_rollouts, load_rollouts
    from draftopd.data.vllm_offline import vllm_rollouts
    from draftopd.model.target import load_target

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/vllm_rollouts.py needs a CUDA GPU (vLLM's offline engine)")
    prompts = load_prompts(args.prompts)
    root = Path(args.out or tempfile.mkdtemp(prefix="vllm-rollouts-"))
    settings = RolloutSettings(max_new_tokens=args.max_new_tokens, batch_size=args.hf_batch_size)

    t0 = time.perf_counter()
    vllm_rollouts(args.target, prompts, root / "vllm", settings, dtype="bf16", prompt_spec=args.prompts)
    t_vllm = time.perf_counter() - t0  # includes engine start-up (weights, CUDA graphs)

    target = load_target(args.target, dtype="bf16", device="cuda")
    t0 = time.perf_counter()
    generate_rollouts(target, prompts, root / "hf", settings, prompt_spec=args.prompts)
    t_hf = time.perf_counter() - t0

    a = {r.id: r.response_ids for r in load_rollouts(root / "vllm")[1]}
    b = {r.id: r.response_ids for r in load_rollouts(root / "hf")[1]}
    same = sum(a[k] == b.get(k) for k in a)
    tokens = lambda d: sum(map(len, d.values()))  # noqa: E731
    print(f"{len(a)} prompts, {args.max_new_tokens} new tokens max, bf16 greedy, {args.target}")
    print(f"vLLM offline: {tokens(a) / t_vllm:8.1f} tok/s ({t_vllm:.1f} s incl. start-up)")
    print(f"HF generate : {tokens(b) / t_hf:8.1f} tok/s ({t_hf:.1f} s, batch {args.hf_batch_size})")
    print(f"token-for-token equal responses: {same}/{len(a)}")
    print(f"rollouts kept in {root}")


if __name__ == "__main__":
    main()
