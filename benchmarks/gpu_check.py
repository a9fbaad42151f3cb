"""One GPU check of draftopd at the published Qwen3-4B shapes, written to one JSON file.

Random weights at the real shapes (no hub on the device): the target is a Qwen3-4B
`Qwen3Config` built by hand (36 layers, hidden 2560, intermediate 9728, 32 heads, 8 kv heads,
head_dim 128, vocab 151936, rope_theta 1e6, tied embeddings), bf16, initialised directly on
the GPU; the drafter has z-lab/Qwen3-4B-DFlash-b16's shape (5 layers, block 16,
target_layer_ids [1, 9, 17, 25, 33], mask id 151669). Every measurement goes through the
library's own code paths (`spec_generate`, `replay`, `verify_states`, `offline_walks`,
`sft_loss`, `OPDStep`). Anchor counts, gamma and gradient checkpointing come from
configs/sft-qwen3-4b.yaml and configs/opd-qwen3-4b.yaml.

Device command (the repository tree is all that must travel; nothing here imports pydantic
or gguf: the OPD options are built without the pydantic config, and the test runs this
script with both blocked):

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json       # ~2-3 min after start-up
    python benchmarks/gpu_check.py --tiny --out /tmp/x.json        # toy shapes on the CPU, seconds

Sections, each recorded on its own (`ok`, `seconds`, or `error`), the JSON rewritten after
each, so a crash or a timeout still leaves what finished; a section that would start after
`--budget-s` (default 330 s) is recorded as skipped:

- correctness_fp32 / correctness_bf16. Greedy `spec_generate` vs HF `generate` on a few
  prompts, with the random drafter (drafts almost never accepted) and with *forced
  acceptance*: a forward hook on the drafter adds, at each block position p, a vector that
  makes the target's LM head rank proposals[p] first (the drafter's real forward still
  runs); proposals are the reference text with 14% of positions replaced by a wrong token,
  which plants tau ~ 1 + sum_{k<=15} 0.86^k ~ 6.5 (published Draft-OPD: 6.60). The planted
  acceptance lengths are known in advance, and the on-policy anchor walk over each decoded
  text must give the acceptance lengths the live decode recorded. The batched verify
  (`verify_states`) and batched replay (`replay`) are compared with their per-block
  references: relative error ||got - ref|| / ||ref|| of the final hidden states (tolerance
  1e-4 in fp32, 5e-2 in bf16: a 36-layer, 256-wide random Qwen3 gave ~1e-2 in bf16 on a
  CPU) and agreement of the LM head's argmax. `passed`: in fp32
  everything must be exact (token ids, acceptance lengths) and within tolerance; in bf16
  only the two tolerances count, token-level agreement is reported (near-ties flip).
- train_sft, train_opd, train_opd_offset_sampling, train_opd_worst_case: one update
  (fwd+bwd, no optimizer step; drafter fp32 under bf16 autocast, as the trainer runs it) on
  a 2048-token sequence (256 prompt tokens), batch 1: SFT at 512 random anchors with the
  target pass included (the SFT config recomputes features); Draft-OPD in cached mode, exact
  KL, max_anchors 512, at the forced tau ~ 6.5 with offset sampling off and on; and the worst
  case, the random drafter (tau 1: 512 anchors, every offset rejected, 512 x 14 verify tokens).
  Seconds per sequence, tokens/s, peak `torch.cuda.max_memory_allocated`.
- sdpa_replay, sdpa_verify: which SDPA kernel the drafter replay's block-sparse mask (SFT
  update, 512 anchors) and the target verify pass's 4D mask (512 blocks x 14 drafts) get by
  default (aten op names seen by the profiler), then each backend forced with
  `torch.nn.attention.sdpa_kernel`: works or the error, seconds, peak memory.
- decode (bf16): time per token of `spec_generate(block_size=1)` vs HF `generate` (128
  tokens after a 128-token prompt), of forced tau ~ 6.5 decoding (its speedup over HF; the
  drafts are re-planted on the forced decode's own text until it stops changing, so a bf16
  near-tie flip does not collapse tau), and
  the verify cost: one 16-token target forward vs a 1-token step on a 1024-token KV cache,
  plus the drafter's block (its forward and the LM head on 15 rows). 16 * T1 / T16 bounds
  any drafter's speedup; tau * T1 / (T16 + T_draft) is the speedup at acceptance tau.

Sizing (H200: ~990 TFLOP/s dense bf16, assume ~40% on big GEMMs; batch-1 decoding is
launch-bound, ~25-40 ms per Qwen3-4B token in HF eager mode):
- set-up: imports, CUDA context, 4.0B random parameters initialised on the GPU: ~15 s.
- correctness, per dtype: 3 prompts x 48 tokens x (HF reference + random and forced
  speculative decodes + two walks) ~ 3 x 5 s; 2 x 16 per-block forwards of <= 512 tokens
  ~ 1 s. fp32 doubles the GEMM time, which is not what bounds batch-1 steps: ~20 s each.
- training: target pass over 2048 tokens = 2048 x (2 x 3.6B non-embedding params + 0.6 GF
  attention) ~ 16 TFLOP; SFT drafter fwd+bwd at 512 anchors ~ 3 x (8192 block tokens x 1.0
  GF + 7 TF dense-mask attention) + LM head CE 512 x 15 rows x 3 x 0.78 GF ~ 60 TFLOP;
  OPD at tau 6.5 ~ 115 TFLOP (walk ~45, verify ~20, replay ~20, KL ~10, target pass 16);
  the tau-1 worst case ~ 200 TFLOP (verify of 7168 tokens with a dense mask). At
  ~400 TFLOP/s: 0.2-0.5 s per update, warm-up + 3 timed each: ~15 s for the four.
- SDPA: 2 workloads x 4 backends x (warm-up + 1 run) of <= 1 s: <= 20 s.
- decode: (warm-up + 2) x 128 tokens of HF generate and of block-1 `spec_generate` at
  ~35 ms ~ 27 s; forced decoding, <= 4 settling rounds + 3 runs of ~20 verify steps ~ 5 s;
  3 x 20 micro-steps ~ 3 s: ~35 s.
Total ~2 min; the 330 s budget leaves 2-3x for estimates that are off, inside the 6-minute
target and the 10-minute limit on one device command.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the device runs this tree as copied, not an installed draftopd

from draftopd.decoding.speculative import spec_generate  # noqa: E402
from draftopd.training.onpolicy import offline_walks  # noqa: E402
from draftopd.model.drafter import context_features  # noqa: E402
from draftopd.training.anchors import accepted_prefix, onpolicy_walk  # noqa: E402
from draftopd.training.blocks import block_inputs, replay  # noqa: E402
from draftopd.training.batches import Sequence, collate  # noqa: E402
from draftopd.training.opd import OPDStep, verify_states  # noqa: E402
from draftopd.training.sft import sft_loss  # noqa: E402
from draftopd.training.target_pass import base_model, target_states  # noqa: E402

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)
TOY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
           tie_word_embeddings=True)


@dataclass(frozen=True)
class Plan:
    target: dict  # Qwen3Config fields
    draft_layers: int
    target_layer_ids: list[int] | None  # None: the library's default for the target depth
    mask_token_id: int
    block_size: int = 16
    prompts: int = 3  # correctness: prompts, their length, tokens decoded
    prompt_len: int = 64
    new_tokens: int = 48
    check_len: int = 512  # verify/replay references: text length, blocks compared
    check_blocks: int = 16
    seq_len: int = 2048  # training sequence (prompt + response) and its prompt
    train_prompt_len: int = 256
    train_reps: int = 3
    decode_prompt_len: int = 128
    decode_tokens: int = 128
    decode_reps: int = 2
    cache_len: int = 1024  # verify-cost micro-benchmark: KV cache length, repetitions
    micro_reps: int = 20


PLANS = {
    "h200": Plan(QWEN3_4B, draft_layers=5, target_layer_ids=[1, 9, 17, 25, 33], mask_token_id=151669),
    "tiny": Plan(TOY, draft_layers=2, target_layer_ids=None, mask_token_id=255, prompts=2, prompt_len=12,
                 new_tokens=40, check_len=64, check_blocks=5, seq_len=96, train_prompt_len=16, train_reps=1,
                 decode_prompt_len=16, decode_tokens=24, decode_reps=1, cache_len=32, micro_reps=3),
}

# The fields OPDStep reads, with OPDConfig's defaults (the test keeps them equal): no pydantic on the device.
OPD_DEFAULTS = dict(loss="exact", gamma=0.8, lambda_acc=1.0, lambda_rej=1.0, teacher_temperature=1.0,
                    logprob_clamp=-10.0, ablation="none", rollout_mode="cached", refresh_every=50,
                    live_temperature=0.0, live_max_new_tokens=256, max_anchors=128, offset_sampling=False,
                    correction_forward=None)
REJECT_RATE = 0.14  # forced acceptance: share of positions whose proposal is wrong (tau ~ 6.5 at B = 16)
PUBLISHED_TAU = 6.60  # Draft-OPD, Qwen3-4B, mean over seven tasks
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # relative error of batched vs per-block states


# ---------------------------------------------------------------------------------------------
# plumbing: clocks, memory, the report


def clock(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def timed(dev: torch.device, fn, reps: int, setup=lambda: None):
    """Median seconds of fn(setup()) over `reps` runs after one warm-up (setup is not timed), and fn's last result."""
    result = fn(setup())
    times = []
    for _ in range(reps):
        state = setup()
        t = clock(dev)
        result = fn(state)
        times.append(clock(dev) - t)
    return statistics.median(times), result


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


class Report:
    """The JSON file: meta, then one entry per section, rewritten (atomically) after each."""

    def __init__(self, path: Path, meta: dict, budget_s: float):
        self.path, self.budget_s, self.t0 = path, budget_s, time.perf_counter()
        self.data = {"meta": meta, "sections": {}, "correctness_passed": None, "elapsed_s": 0.0}
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)

    def section(self, name: str, fn, dev: torch.device) -> dict:
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.budget_s:
            entry = {"ok": False, "skipped": f"time budget: {elapsed:.0f} s > {self.budget_s:.0f} s"}
        else:
            t = time.perf_counter()
            try:
                entry = {"ok": True, **fn()}
            except Exception as e:  # noqa: BLE001 -- recorded; the other sections still run
                entry = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                         "traceback": traceback.format_exc()[-3000:]}
            entry["seconds"] = round(time.perf_counter() - t, 3)
        self.data["sections"][name] = entry
        print(f"{name}: {'ok' if entry['ok'] else entry.get('skipped') or entry['error'][:200]} "
              f"({entry.get('seconds', 0):.1f} s)", flush=True)
        self.write()
        free_memory(dev)
        return entry


# ---------------------------------------------------------------------------------------------
# models, texts, forced acceptance


@dataclass
class Run:
    plan: Plan
    dev: torch.device
    sft: dict  # configs/sft-qwen3-4b.yaml
    opd: dict  # configs/opd-qwen3-4b.yaml
    target: torch.nn.Module = None
    draft: torch.nn.Module = None

    def models(self, dtype: torch.dtype, train: bool = False):
        """Target in `dtype`; drafter in `dtype` for inference, fp32 for training (the trainer's `draft.float()`)."""
        self.target.to(dtype)
        self.draft.to(torch.float32 if train else dtype).train(train)
        return self.target, self.draft

    def tokens(self, n: int, seed: int) -> torch.Tensor:
        """Random ids [1, n] below the mask id (real tokens)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, self.plan.mask_token_id, (1, n), generator=g).to(self.dev)


def build_models(run: Run) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from draftopd.model.checkpoint import init_drafter
    from draftopd.model.target import Target

    plan, dev = run.plan, run.dev
    config = Qwen3Config(**plan.target, attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:  # parameters are created (and randomly initialised) on the device
            run.target = Qwen3ForCausalLM(config).to(dev).eval().requires_grad_(False)
            run.draft = init_drafter(Target(run.target, None, "random Qwen3-4B shapes"), num_layers=plan.draft_layers,
                                     block_size=plan.block_size, target_layer_ids=plan.target_layer_ids,
                                     mask_token_id=plan.mask_token_id, seed=1).to(dev)
    finally:
        torch.set_default_dtype(default)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"target_params": count(run.target), "drafter_params": count(run.draft),
            "target_layer_ids": run.draft.target_layer_ids,
            "attn_implementation": run.target.config._attn_implementation, "peak_mem_gb": peak_gb(dev)}


def planted_proposals(text: torch.Tensor, vocab: int, extra: int, seed: int) -> torch.Tensor:
    """Per position, the token the forced drafter proposes: the text's, or (REJECT_RATE of them) another.

    text [n] -> [n + extra] on the CPU (positions past the text propose 0).
    """
    g = torch.Generator().manual_seed(seed)
    text = text.cpu()
    wrong = torch.rand(text.shape, generator=g) < REJECT_RATE
    out = torch.cat([text, torch.zeros(extra, dtype=torch.long)])
    out[: len(text)][wrong] = (text[wrong] + torch.randint(1, vocab, (int(wrong.sum()),), generator=g)) % vocab
    return out


@contextlib.contextmanager
def forced_drafts(draft, head_weight: torch.Tensor, proposals: torch.Tensor):
    """Drafts chosen by position while the drafter's real forward still runs.

    A forward hook adds to the drafter's output at block position p the vector
    10 * W[t] / ||W[t]||^2 (W the target's LM head, t = proposals[p]): the head then scores t
    about 10 above its own ~0.1-scale logits, and any other token s by 10 * W[s].W[t] / ||W[t]||^2
    (~0.1 for random rows). spec_generate, the walk and OPDStep all draft through `draft(...)`.
    """
    rows = head_weight[proposals.to(head_weight.device)].float()
    push = 10 * rows / rows.pow(2).sum(-1, keepdim=True)

    def hook(module, args, kwargs, out):
        pos = kwargs["block_positions"].clamp(max=push.shape[0] - 1)
        return out + push[pos].to(out.dtype)

    handle = draft.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def planned_lengths(proposals: torch.Tensor, text: torch.Tensor, prompt_len: int, block_size: int) -> list[int]:
    """Acceptance lengths greedy verification records when the drafts are `proposals` and the target writes `text`."""
    L = text.shape[0]
    cands = torch.arange(prompt_len, L - 1)[:, None]  # every anchor a the walk may visit
    pos = cands + torch.arange(1, block_size)  # [anchors, B-1] drafted positions
    labels = torch.where(pos < L, text.cpu()[pos.clamp(max=L - 1)], -100)
    r = accepted_prefix(proposals.cpu()[pos.clamp(max=len(proposals) - 1)], labels)
    return onpolicy_walk(r.tolist(), prompt_len, L - 1)[1]


# ---------------------------------------------------------------------------------------------
# correctness


def hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """HF greedy decoding of exactly n tokens (no EOS): prompt + generated, [n_prompt + n]."""
    from transformers import GenerationConfig

    gc_ = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return model.generate(ids, generation_config=gc_)[0]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)


def compare(got: torch.Tensor, ref: torch.Tensor, head_weight: torch.Tensor) -> dict:
    """Relative error, max abs difference and LM-head argmax agreement of two stacks of final hidden states."""
    got, ref = got.float(), ref.float()
    top = lambda h: torch.nn.functional.linear(h.to(head_weight.dtype), head_weight).argmax(-1)  # noqa: E731
    return {"rel_err": float((got - ref).norm() / ref.norm()), "max_abs": float((got - ref).abs().max()),
            "argmax_agreement": float((top(got) == top(ref)).float().mean()), "rows": got.shape[0]}


def check_decoding(run: Run) -> dict:
    """Greedy spec_generate (random and forced drafts) == HF greedy; planted tau; walk == live."""
    plan, target, draft = run.plan, run.target, run.draft
    head = target.get_output_embeddings().weight
    P, n = plan.prompt_len, plan.new_tokens
    rows = []
    for i in range(plan.prompts):
        ids = run.tokens(P, seed=100 + i)
        ref = hf_greedy(target, ids, n).tolist()
        proposals = planted_proposals(torch.tensor(ref), plan.target["vocab_size"], plan.block_size, seed=200 + i)
        rand = spec_generate(draft, target, ids, n)
        rand_tree = spec_generate(draft, target, ids, n, tree_tokens=2 * plan.block_size)
        with forced_drafts(draft, head, proposals):
            forced = spec_generate(draft, target, ids, n)
            forced_tree = spec_generate(draft, target, ids, n, tree_tokens=2 * plan.block_size)
            forced_walk = offline_walks(draft, target, [SimpleNamespace(ids=forced.output_ids[0], prompt_len=P)])[0]
        rand_walk = offline_walks(draft, target, [SimpleNamespace(ids=rand.output_ids[0], prompt_len=P)])[0]
        planned = planned_lengths(proposals, torch.tensor(ref), P, plan.block_size)
        rows.append({
            "random_equal": rand.output_ids[0].tolist() == ref,
            "random_first_difference": first_difference(rand.output_ids[0].tolist()[P:], ref[P:]),
            "random_tau": rand.tau,
            "forced_equal": forced.output_ids[0].tolist() == ref,
            "forced_first_difference": first_difference(forced.output_ids[0].tolist()[P:], ref[P:]),
            "forced_tau": forced.tau, "planned_tau": sum(planned) / len(planned),
            "tree_equal": rand_tree.output_ids[0].tolist() == ref and forced_tree.output_ids[0].tolist() == ref,
            "forced_tree_tau": forced_tree.tau, "forced_tree_branch_steps": forced_tree.branch_steps,
            "forced_as_planned": forced.acceptance_lengths == planned,
            "walk_agreement_random": agreement(rand_walk.lengths, rand.acceptance_lengths),
            "walk_agreement_forced": agreement(forced_walk.lengths, forced.acceptance_lengths),
        })
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"greedy_equal": all(r["random_equal"] and r["forced_equal"] and r["tree_equal"] for r in rows),
            "acceptance_as_planned": all(r["forced_as_planned"] for r in rows),
            "walk_equals_live": all(r["walk_agreement_random"] == 1 and r["walk_agreement_forced"] == 1 for r in rows),
            "walk_agreement": (mean("walk_agreement_random") + mean("walk_agreement_forced")) / 2,
            "tau_random": mean("random_tau"), "tau_forced": mean("forced_tau"), "tau_planned": mean("planned_tau"),
            "tau_forced_tree": mean("forced_tree_tau"),
            "prompts": rows}


def check_anchors(run: Run, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random text [1, n] and sorted distinct anchors [1, m] with a full block after each."""
    plan = run.plan
    n, B = plan.check_len, plan.block_size
    text = run.tokens(n, seed)
    lo = n // 4
    pick = torch.randperm(n - B - lo, generator=torch.Generator().manual_seed(seed))[: plan.check_blocks]
    return text, (pick.sort().values + lo)[None].to(run.dev)


def check_verify(run: Run) -> dict:
    """Batched verify pass (packed drafts after each accepted prefix) vs each block alone after its text."""
    from transformers import DynamicCache

    target, B, dev = run.target, run.plan.block_size, run.dev
    text, anchors = check_anchors(run, seed=300)
    n, m, w = text.shape[1], anchors.shape[1], B - 1
    g = torch.Generator().manual_seed(301)
    accepted = torch.randint(0, w, (1, m), generator=g).to(dev)
    blocks = run.tokens(m * w, seed=302).view(1, m, w)
    for j, (a, r) in enumerate(zip(anchors[0].tolist(), accepted[0].tolist())):
        blocks[0, j, : r + 1] = text[0, a : a + r + 1]  # the accepted prefix is committed text
    feed = torch.arange(w, device=dev) > accepted[..., None]
    model = base_model(target)
    with torch.no_grad():
        cache = DynamicCache(config=target.config)
        model(input_ids=text, use_cache=True, **{cache_kwarg(model): cache})
        ver = verify_states(target, cache, blocks, anchors, accepted, feed, n)[0]
        got, ref = [], []
        for j, (a, r) in enumerate(zip(anchors[0].tolist(), accepted[0].tolist())):
            alone = model(input_ids=torch.cat([text[0, :a], blocks[0, j]])[None]).last_hidden_state[0]
            got.append(ver[j, r + 1 :])
            ref.append(alone[a + r + 1 :])
    return compare(torch.cat(got), torch.cat(ref), target.get_output_embeddings().weight)


def check_replay(run: Run) -> dict:
    """Batched block-sparse replay vs drafting each block through the cached decoding path."""
    target, draft, B = run.target, run.draft, run.plan.block_size
    text, anchors = check_anchors(run, seed=400)
    n = text.shape[1]
    embed = target.get_input_embeddings()
    dtype = next(draft.parameters()).dtype
    pos = lambda s, e: torch.arange(s, e, device=run.dev)[None]  # noqa: E731
    with torch.no_grad():
        lengths = torch.tensor([n], device=run.dev)
        feats = target_states(target, text, lengths, draft.target_layer_ids).features.to(dtype)
        batched = replay(draft, embed, feats, text, anchors)[0]  # [m, B, H]
        got, ref = [], []
        for j, a in enumerate(anchors[0].tolist()):
            cache = draft.new_cache()  # context arrives in two chunks, as across decoding steps
            draft(embed(text[:, :1]), feats[:, : a - 2], block_positions=pos(a - 2, a - 1),
                  context_positions=pos(0, a - 2), cache=cache)
            block = block_inputs(text, anchors[:, j : j + 1], B, draft.mask_token_id)[0]
            alone = draft(embed(block), feats[:, a - 2 : a], block_positions=pos(a, a + B),
                          context_positions=pos(a - 2, a), cache=cache)[0]
            got.append(batched[j, 1:])
            ref.append(alone[1:])
    return compare(torch.cat(got), torch.cat(ref), target.get_output_embeddings().weight)


def cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def correctness(run: Run, dtype: torch.dtype) -> dict:
    run.models(dtype)
    try:
        with torch.no_grad():
            out = {"dtype": str(dtype).removeprefix("torch."), "tolerance_rel": TOLERANCE[dtype],
                   "decode": check_decoding(run), "verify": check_verify(run), "replay": check_replay(run)}
    finally:
        run.models(torch.bfloat16)
    within = all(out[k]["rel_err"] <= TOLERANCE[dtype] for k in ("verify", "replay"))
    d = out["decode"]
    exact = d["greedy_equal"] and d["acceptance_as_planned"] and d["walk_equals_live"]
    out["passed"] = within and (exact or dtype != torch.float32)
    return out


# ---------------------------------------------------------------------------------------------
# training


def training_batch(run: Run):
    ids = run.tokens(run.plan.seq_len, seed=500)[0].cpu()
    return collate([Sequence(0, ids, run.plan.train_prompt_len)])


def autocast(run: Run):
    return torch.autocast(device_type=run.dev.type, dtype=torch.bfloat16)


def sft_update(run: Run, batch, features):
    """One SFT update as the trainer runs it: drafter fp32 under bf16 autocast, the SFT config's anchor
    count, gamma and gradient checkpointing; `features()` gives the target features."""
    target, draft = run.models(torch.bfloat16, train=True)
    draft.gradient_checkpointing = bool(run.sft.get("gradient_checkpointing", False))
    anchors, gamma = run.sft["sft"]["num_anchors"], run.sft["sft"]["gamma"]

    def update(_):
        with autocast(run):
            loss, stats = sft_loss(draft, target, batch, features(), num_anchors=anchors, gamma=gamma,
                                   generator=torch.Generator().manual_seed(0))
            loss.backward()
        draft.zero_grad(set_to_none=True)
        return stats

    return update


def train_sft(run: Run) -> dict:
    """SFT update at the published anchor count, features recomputed (sft.cache_features: false)."""
    batch = training_batch(run)
    ids, lengths = batch.input_ids.to(run.dev), batch.lengths.to(run.dev)

    def features():
        with autocast(run):
            return target_states(run.target, ids, lengths, run.draft.target_layer_ids).features

    update = sft_update(run, batch, features)
    t_target, _ = timed(run.dev, lambda _: features(), run.plan.train_reps)
    reset_peak(run.dev)
    t, stats = timed(run.dev, update, run.plan.train_reps)
    L = batch.num_tokens
    return {"seconds_per_sequence": t, "tokens_per_s": L / t, "target_pass_s": t_target,
            "drafter_fwd_bwd_s": t - t_target, "anchors": stats.blocks, "sequence_tokens": L,
            "gradient_checkpointing": run.draft.gradient_checkpointing, "peak_mem_gb": peak_gb(run.dev)}


def train_opd(run: Run, *, offset_sampling: bool, forced: bool) -> dict:
    """Draft-OPD update, cached mode, exact KL, the published max_anchors; forced tau ~ 6.5 or the random drafter."""
    target, draft = run.models(torch.bfloat16, train=True)
    draft.gradient_checkpointing = bool(run.opd.get("gradient_checkpointing", False))
    options = {**OPD_DEFAULTS, **run.opd["opd"], "rollout_mode": "cached", "loss": "exact",
               "offset_sampling": offset_sampling}
    step = OPDStep(SimpleNamespace(opd=SimpleNamespace(**options)), draft, target)
    batch = training_batch(run)
    proposals = planted_proposals(batch.input_ids[0], run.plan.target["vocab_size"], run.plan.block_size, seed=501)

    def update(_):
        with autocast(run):
            loss, stats = step(batch, torch.Generator().manual_seed(0))
            loss.backward()
        draft.zero_grad(set_to_none=True)
        return {"scalars": stats.scalars, "blocks": stats.blocks, "loss": float(loss.detach())}

    reset_peak(run.dev)
    with forced_drafts(draft, target.get_output_embeddings().weight, proposals) if forced else contextlib.nullcontext():
        t, stats = timed(run.dev, update, run.plan.train_reps)
    L = batch.num_tokens
    s = stats["scalars"]
    return {"seconds_per_sequence": t, "tokens_per_s": L / t, "tau_walk": s["tau_walk"], "anchors": stats["blocks"],
            "max_anchors": options["max_anchors"], "accepted_tokens": s["accepted_tokens"],
            "rejected_tokens": s["rejected_tokens"], "loss": stats["loss"], "offset_sampling": offset_sampling,
            "sequence_tokens": L, "peak_mem_gb": peak_gb(run.dev)}


# ---------------------------------------------------------------------------------------------
# SDPA kernels


BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def dispatched_attention_ops(fn, state) -> list[str]:
    """The aten attention ops one call dispatches to (e.g. aten::_scaled_dot_product_efficient_attention)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(state)
    return sorted({e.name for e in prof.events() if e.name.startswith("aten::") and "attention" in e.name})


def sdpa_trials(run: Run, fn, setup=lambda: None) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"default_ops": dispatched_attention_ops(fn, setup())}
    for name in BACKENDS:
        try:
            reset_peak(run.dev)
            with sdpa_kernel([getattr(SDPBackend, name)]):
                t, _ = timed(run.dev, fn, 1, setup)
            out[name] = {"ok": True, "seconds": t, "peak_mem_gb": peak_gb(run.dev)}
        except Exception as e:  # noqa: BLE001 -- which kernels refuse (or run out of memory) is the result
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        free_memory(run.dev)
    return out


def sdpa_replay(run: Run) -> dict:
    """The SFT update's drafter fwd+bwd (features precomputed): the block-sparse bool mask [1, 1, m*B, n + m*B]."""
    batch = training_batch(run)
    feats = target_states(run.target, batch.input_ids.to(run.dev), batch.lengths.to(run.dev),
                          run.draft.target_layer_ids).features
    update = sft_update(run, batch, lambda: feats)
    return {"num_anchors": run.sft["sft"]["num_anchors"], "gradient_checkpointing": run.draft.gradient_checkpointing,
            **sdpa_trials(run, update)}


def sdpa_verify(run: Run) -> dict:
    """Target verify pass at max_anchors blocks, nothing accepted (every draft fed): the 4D mask [1, 1, T, n + T]."""
    from transformers import DynamicCache

    target = run.models(torch.bfloat16)[0]
    plan, model = run.plan, base_model(target)
    B, w = plan.block_size, plan.block_size - 1
    batch = training_batch(run)
    ids, n = batch.input_ids.to(run.dev), batch.num_tokens
    P = plan.train_prompt_len
    m = min(run.opd["opd"]["max_anchors"], n - P - B)
    anchors = torch.arange(P, P + m, device=run.dev)[None]
    accepted = torch.zeros(1, m, dtype=torch.long, device=run.dev)
    blocks = run.tokens(m * w, seed=502).view(1, m, w)
    blocks[..., 0] = ids[0, P : P + m]
    feed = (torch.arange(w, device=run.dev) > 0).expand(1, m, w)

    def text_cache():
        cache = DynamicCache(config=target.config)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
        return cache

    def verify(cache):
        with autocast(run):
            return verify_states(target, cache, blocks, anchors, accepted, feed, n)

    return {"blocks": m, "fed_tokens": int(feed.sum()), **sdpa_trials(run, verify, text_cache)}


# ---------------------------------------------------------------------------------------------
# decoding


def decode(run: Run) -> dict:
    """bf16 batch-1 decoding: our loop vs HF generate, forced tau ~ 6.5, and the verify cost."""
    target, draft = run.models(torch.bfloat16)
    plan, dev = run.plan, run.dev
    ids, n = run.tokens(plan.decode_prompt_len, seed=600), plan.decode_tokens
    with torch.no_grad():  # timed() warms each path up with one untimed run
        t_hf, ref = timed(dev, lambda _: hf_greedy(target, ids, n), plan.decode_reps)
        t_one, one = timed(dev, lambda _: spec_generate(draft, target, ids, n, block_size=1), plan.decode_reps)
        proposals, rounds = settled_proposals(run, ids, ref)
        with forced_drafts(draft, target.get_output_embeddings().weight, proposals):
            t_forced, forced = timed(dev, lambda _: spec_generate(draft, target, ids, n), plan.decode_reps)
    out = {"new_tokens": n, "prompt_tokens": plan.decode_prompt_len,
           "hf_generate_s_per_token": t_hf / n, "block1_s_per_token": t_one / n,
           "block1_over_hf": t_one / t_hf, "block1_equals_hf": one.output_ids[0].tolist() == ref.tolist(),
           "forced_s_per_token": t_forced / n, "forced_tau": forced.tau, "forced_plant_rounds": rounds,
           "forced_speedup_over_hf": t_hf / t_forced}
    return {**out, **verify_cost(run)}


def settled_proposals(run: Run, ids: torch.Tensor, text: torch.Tensor, rounds: int = 4) -> tuple[torch.Tensor, int]:
    """Forced drafts planted on the text the forced decode itself writes.

    In bf16 a 16-token verify can flip a near-tie that 1-token steps (HF's text) did not; after
    that flip every planted draft is wrong and tau collapses to 1. Re-planting on the forced
    decode's own output moves the first disagreement past each flip, so a few rounds settle.
    """
    target, draft, plan = run.target, run.draft, run.plan
    for i in range(1, rounds + 1):
        proposals = planted_proposals(text, plan.target["vocab_size"], plan.block_size, seed=601)
        with forced_drafts(draft, target.get_output_embeddings().weight, proposals):
            out = spec_generate(draft, target, ids, plan.decode_tokens).output_ids[0]
        if out.tolist() == text.tolist():
            break
        text = out
    return proposals, i


def verify_cost(run: Run) -> dict:
    """One B-token verify forward vs a 1-token step on a KV cache, and the drafter's block."""
    from transformers import DynamicCache

    target, draft = run.target, run.draft
    plan, dev, B = run.plan, run.dev, run.plan.block_size
    L = plan.cache_len
    ctx = run.tokens(L + B, seed=602)
    kw = cache_kwarg(target)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    pos = lambda s, e: torch.arange(s, e, device=dev)[None]  # noqa: E731
    with torch.no_grad():
        cache = DynamicCache(config=target.config)
        o = target(input_ids=ctx[:, :L], use_cache=True, output_hidden_states=True, **{kw: cache})
        feats = context_features(o.hidden_states, draft.target_layer_ids)  # [1, L, F]

        def step(k):
            def run_step(_):
                target(input_ids=ctx[:, L : L + k], position_ids=pos(L, L + k), use_cache=True,
                       output_hidden_states=k > 1, **{kw: cache})
                cache.crop(L - cache.get_seq_length())  # negative: remove that many (4.x and 5.x)
            return run_step

        def draft_cache():  # the drafter has seen the context up to the last verify step's B rows
            c = draft.new_cache()
            draft(embed(ctx[:, :1]), feats[:, : L - B], block_positions=pos(L - B, L - B + 1),
                  context_positions=pos(0, L - B), cache=c)
            return c

        def draft_block(c):  # the step's new B context rows, the block, the LM head on its B-1 drafts
            block = torch.full((1, B), draft.mask_token_id, device=dev)
            block[0, 0] = ctx[0, L]
            hidden = draft(embed(block), feats[:, L - B :], block_positions=pos(L, L + B),
                           context_positions=pos(L - B, L), cache=c)
            return draft.compute_logits(hidden[0, 1:], head).argmax(-1)

        t1, _ = timed(dev, step(1), plan.micro_reps)
        tB, _ = timed(dev, step(B), plan.micro_reps)
        td, _ = timed(dev, draft_block, plan.micro_reps, draft_cache)
    return {"kv_cache_tokens": L, "step_1_ms": t1 * 1e3, f"verify_{B}_ms": tB * 1e3, "draft_block_ms": td * 1e3,
            "verify_over_step": tB / t1, "max_speedup": B * t1 / tB, "breakeven_tau": (tB + td) / t1,
            f"speedup_at_tau_{PUBLISHED_TAU}": PUBLISHED_TAU * t1 / (tB + td)}


# ---------------------------------------------------------------------------------------------


def meta(args, plan: Plan, dev: torch.device, sft: dict, opd: dict) -> dict:
    import transformers

    return {"plan": "tiny" if args.tiny else "h200", "shapes": asdict(plan), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "threads": torch.get_num_threads(), "reject_rate": REJECT_RATE,
            "tolerance_rel": {str(k).removeprefix("torch."): v for k, v in TOLERANCE.items()},
            "published": {"sft_num_anchors": sft["sft"]["num_anchors"], "sft_gradient_checkpointing":
                          sft.get("gradient_checkpointing", False), "opd": opd["opd"]},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write (rewritten after every section)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes on the CPU: the same code in seconds")
    ap.add_argument("--budget-s", type=float, default=330, help="start no section after this many seconds")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    plan = PLANS["tiny" if args.tiny else "h200"]
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --tiny for the CPU version)")
    dev = torch.device("cpu" if args.tiny else "cuda")
    sft = yaml.safe_load((REPO / "configs" / "sft-qwen3-4b.yaml").read_text())
    opd = yaml.safe_load((REPO / "configs" / "opd-qwen3-4b.yaml").read_text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(out, meta(args, plan, dev, sft, opd), args.budget_s)
    run = Run(plan, dev, sft, opd)

    if not report.section("setup", lambda: build_models(run), dev)["ok"]:
        sys.exit(1)
    sections = {
        "correctness_fp32": lambda: correctness(run, torch.float32),
        "correctness_bf16": lambda: correctness(run, torch.bfloat16),
        "train_sft": lambda: train_sft(run),
        "train_opd": lambda: train_opd(run, offset_sampling=False, forced=True),
        "train_opd_offset_sampling": lambda: train_opd(run, offset_sampling=True, forced=True),
        "train_opd_worst_case": lambda: train_opd(run, offset_sampling=False, forced=False),
        "sdpa_replay": lambda: sdpa_replay(run),
        "sdpa_verify": lambda: sdpa_verify(run),
        "decode": lambda: decode(run),
    }
    for name, fn in sections.items():
        report.section(name, fn, dev)
        if name.startswith("correctness"):
            checks = [report.data["sections"][k] for k in sections if k.startswith("correctness")
                      and k in report.data["sections"]]
            report.data["correctness_passed"] = all(c["ok"] and c["passed"] for c in checks)
            report.write()
    print(f"wrote {out} ({report.data['elapsed_s']:.0f} s); correctness passed: {report.data['correctness_passed']}")


if __name__ == "__main__":
    main()
