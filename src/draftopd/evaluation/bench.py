"""The evaluation runner: drafters against the target alone, on prompt benchmarks, in one process.

Per sample it runs the target alone through the same loop at block size 1 (the baseline),
HF `generate` (the reference implementation), then every drafter, back to back: each speedup
divides timings taken seconds apart in the same process, so drifting machine load hits both.
Every run is one line of `samples.jsonl`, flushed at once; `resume=True` skips what is there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from draftopd.data.prompts import Prompt, apply_chat_template, hub_dataset, load_prompts, next_turn
from draftopd.data.rollouts import RolloutSettings, generation_config, pad_token_id
from draftopd.decoding.speculative import spec_generate
from draftopd.errors import DraftOPDError
from draftopd.evaluation import verify_policies
from draftopd.evaluation.metrics import mean_tau, speedup, summarize_runs
from draftopd.hub import HUB_TIMEOUT_S, offline
from draftopd.io import check_output_dir, holds
from draftopd.model.checkpoint import drafter_target_name
from draftopd.model.packed import pack_linears
from draftopd.model.precision import dtype_name, hardware_record
from draftopd.seeds import derive_seed
from draftopd.training.onpolicy import offline_tau, offline_walks

SAMPLES, SETTINGS = "samples.jsonl", "settings.json"
LOOP, HF, DRAFT = "loop", "hf", "draft"  # record methods: target alone (B=1), HF generate, a drafter
WARMUP_TOKENS = 4


@dataclass
class TokenSequence:
    """What the offline walk reads: prompt + response ids, and where the response starts."""

    ids: torch.Tensor
    prompt_len: int


def drafter_names(paths: list[str]) -> list[str]:
    """Directory names, with parent folders prefixed only where two would clash."""
    parts = [Path(os.path.abspath(os.path.expanduser(str(p)))).parts for p in paths]
    names = [p[-1] for p in parts]
    for depth in range(2, max(map(len, parts)) + 1):
        clash = {n for n, p in zip(names, parts) if any(m == n and q != p for m, q in zip(names, parts))}
        if not clash:
            break
        names = ["/".join(p[-depth:]) if n in clash else n for p, n in zip(parts, names)]
    seen: dict[str, int] = {}
    out = []
    for n in names:  # the same directory twice
        seen[n] = seen.get(n, 0) + 1
        out.append(f"{n}#{seen[n]}" if names.count(n) > 1 else n)
    return out


def check_drafter(draft, target, name: str) -> None:
    """Refuse a drafter made for another target before any decoding starts."""
    try:
        draft.check_target(target.model)
    except DraftOPDError as e:
        raise DraftOPDError(f"drafter {name!r} does not fit target {target.name!r}: {e}") from None
    made = drafter_target_name(draft)
    if made and made != target.name:
        raise DraftOPDError(f"drafter {name!r} was made for target {made!r}, not {target.name!r}")


def check_eval_dir(out, *, resume: bool, overwrite: bool) -> bool:
    """May an evaluation be written at `out`? An earlier one is continued or replaced only when asked."""
    return check_output_dir(out, kind="evaluation run", is_kind=holds(SETTINGS), overwrite=overwrite,
                            resume=resume)


def load_bench(bench: str, tokenizer, samples: int, max_prompt_tokens: int | None = None) -> list[Prompt]:
    """The first `samples` prompts of a benchmark (an embedded set or any load_prompts spec)."""
    try:
        return load_prompts(bench, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)[:samples]
    except DraftOPDError as e:
        raise DraftOPDError(f"benchmark {bench!r}: {e}") from None


def hub_problems(benches: list[str]) -> dict[str, str]:
    """Why each benchmark read from the Hugging Face Hub cannot be had now, with the fix; the
    benchmarks that can are absent. One short request per dataset, so a missing network costs
    seconds here instead of the `datasets` library's retries mid-run."""
    problems = {}
    for bench in benches:
        dataset = hub_dataset(bench)
        if dataset is None:
            continue
        if importlib.util.find_spec("datasets") is None:
            problems[bench] = "the `datasets` package is missing (pip install 'draftopd[hub]')"
        elif offline():
            try:
                load_prompts(bench)  # `datasets` reads its local cache, or fails at once
            except DraftOPDError:
                problems[bench] = "HF_HUB_OFFLINE is set and they are not in the local cache (unset it to download)"
        else:
            from huggingface_hub import HfApi
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

            try:
                HfApi().dataset_info(dataset, timeout=HUB_TIMEOUT_S)
            except (GatedRepoError, RepositoryNotFoundError):
                pass  # the Hub answered: loading the benchmark reports what is wrong
            except Exception:  # no network, DNS, timeout, proxy, server error
                problems[bench] = (f"the Hugging Face Hub did not answer within {HUB_TIMEOUT_S:g} s (check the "
                                   "network, or set HF_HUB_OFFLINE=1 to read a cached copy)")
    return problems


class SampleLog:
    """Append-only `samples.jsonl`, one run per line, keyed by (bench, id, method, drafter).

    A resumed log must have been written with the same settings (`settings.json`): mixing
    timings or outputs of two configurations would make the summary meaningless.
    """

    def __init__(self, out: Path, settings: dict, resume: bool):
        self.path, self.records = out / SAMPLES, {}
        settings_path = out / SETTINGS
        if resume and settings_path.exists():
            old = json.loads(settings_path.read_text())
            for key in settings.keys() | old.keys():
                if old.get(key) != settings.get(key):
                    raise DraftOPDError(f"{out} holds samples made with {key}={old.get(key)!r}, but this run has "
                                        f"{key}={settings.get(key)!r}; rerun with the original settings or "
                                        "without --resume")
        if resume and self.path.exists():
            data = self.path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]  # a line cut short by a kill is dropped
            if len(whole) != len(data):
                self.path.write_bytes(whole)
            for lineno, line in enumerate(whole.splitlines(), 1):
                try:
                    r = json.loads(line)
                    self.records[self.key(r)] = r
                except (ValueError, KeyError, TypeError):
                    raise DraftOPDError(f"{self.path}:{lineno}: not a sample record; delete the file or "
                                        "run without --resume") from None
        else:
            self.path.unlink(missing_ok=True)
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")
        self.file = open(self.path, "a", encoding="utf-8")

    @staticmethod
    def key(r: dict) -> tuple:
        return r["bench"], r["id"], r["method"], r["drafter"]

    def get(self, bench: str, sample_id: str, method: str, drafter: str | None = None) -> dict | None:
        return self.records.get((bench, sample_id, method, drafter))

    def add(self, record: dict) -> None:
        self.records[self.key(record)] = record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


class _Clock:
    """A generate() streamer that only takes times: at the prompt, at each new token, at the end.

    put() receives CPU tensors, so on a GPU each time stamp follows a synchronisation.
    """

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


class Runner:
    """Decodes one prompt with every method; knows the decoding settings shared by all runs."""

    def __init__(self, target, drafters: dict, block_sizes: dict[str, int], *, temperature: float,
                 max_new_tokens: int, seed: int, verify: dict | None = None):
        self.target, self.drafters, self.block_sizes = target, drafters, block_sizes
        self.verify = verify or {}  # name -> spec_generate keywords of its verify policy ({}: whole blocks)
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.stops = target.stop_token_ids
        self.pad_id = pad_token_id(target.tokenizer, self.stops)

    def loop(self, draft, ids: torch.Tensor, block_size: int, seed: int, max_new_tokens: int | None = None,
             verify: dict | None = None) -> dict:
        """spec_generate; block_size 1 (and no drafter) is the target alone."""
        gen = torch.Generator(device=self.target.device).manual_seed(seed)
        res = spec_generate(draft, self.target, ids, max_new_tokens or self.max_new_tokens,
                            temperature=self.temperature, stop_token_ids=self.stops, block_size=block_size,
                            generator=gen, **(verify or {}))
        return {"output_ids": res.output_ids[0, res.num_input_tokens:].tolist(),
                "num_input_tokens": res.num_input_tokens, "num_output_tokens": res.num_output_tokens,
                "acceptance_lengths": res.acceptance_lengths, "verify_sizes": res.verify_sizes, "tau": res.tau,
                "rest_steps": res.rest_steps, "branch_steps": res.branch_steps, "time_to_first_token": res.time_to_first_token, "time_per_output_token": res.time_per_output_token}

    @torch.inference_mode()
    def hf_generate(self, ids: torch.Tensor, seed: int, max_new_tokens: int | None = None) -> dict:
        """HF generate, timed like the loop: first token = prefill, the rest per output token."""
        settings = RolloutSettings(max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature)
        config = generation_config(settings, self.stops, self.pad_id)
        torch.manual_seed(seed)
        clock = _Clock()
        out = self.target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         generation_config=config, streamer=clock)
        new = out[0, ids.shape[1]:].tolist()
        return {"output_ids": new, "num_input_tokens": ids.shape[1], "num_output_tokens": len(new),
                "acceptance_lengths": [1] * max(len(new) - 1, 0), "tau": 1.0,
                "time_to_first_token": clock.times[1] - clock.times[0],
                "time_per_output_token": (clock.times[-1] - clock.times[1]) / max(len(new), 1)}

    def warmup(self, prompt_ids: list[int]) -> None:
        """One short untimed run per method: first calls pay for lazy initialisation."""
        ids = torch.tensor([prompt_ids], device=self.target.device)
        n = min(WARMUP_TOKENS, self.max_new_tokens)
        self.loop(None, ids, 1, self.seed, n)
        self.hf_generate(ids, self.seed, n)
        for name, draft in self.drafters.items():
            self.loop(draft, ids, self.block_sizes[name], self.seed, n, self.verify.get(name))

    def sample(self, log: SampleLog, bench: str, sample_id: str, prompt_ids: list[int]) -> None:
        """Every method not yet in `log` on one prompt; greedy drafter runs are also checked
        against the target-alone output and walked offline over it."""
        ids = torch.tensor([prompt_ids], device=self.target.device)
        seed = derive_seed(self.seed, "sample", bench, sample_id)
        head = {"bench": bench, "id": sample_id}
        if log.get(bench, sample_id, LOOP) is None:
            log.add({**head, "method": LOOP, "drafter": None, "block_size": 1, "prompt_ids": prompt_ids,
                     **self.loop(None, ids, 1, seed)})
        if log.get(bench, sample_id, HF) is None:
            log.add({**head, "method": HF, "drafter": None, "block_size": 1, **self.hf_generate(ids, seed)})
        base = log.get(bench, sample_id, LOOP)["output_ids"]
        for name, draft in self.drafters.items():
            if log.get(bench, sample_id, DRAFT, name) is not None:
                continue
            B, verify = self.block_sizes[name], self.verify.get(name)
            rec = {**head, "method": DRAFT, "drafter": name, "block_size": B, **self.loop(draft, ids, B, seed,
                                                                                           verify=verify)}
            if self.temperature == 0:
                rec["match"] = rec["output_ids"] == base
                rec["offline_lengths"] = None
                if B == draft.block_size and not verify:  # the walk drafts and verifies whole blocks
                    seq = TokenSequence(torch.tensor(prompt_ids + base), len(prompt_ids))
                    rec["offline_lengths"] = offline_walks(draft, self.target.model, [seq])[0].lengths
            log.add(rec)


def summarize(records: list[dict], benches: list[str], block_sizes: dict[str, int]) -> dict:
    """results.json's "baseline" (per benchmark), "summary" (per drafter and benchmark) and
    "mean" (per drafter, over benchmarks) from run records."""
    def runs(bench, method, drafter=None):
        return [r for r in records if (r["bench"], r["method"], r["drafter"]) == (bench, method, drafter)]

    baseline = {b: {LOOP: summarize_runs(runs(b, LOOP)), HF: summarize_runs(runs(b, HF))} for b in benches}
    summary, mean = {}, {}
    for name, B in block_sizes.items():
        summary[name] = {}
        for b in benches:
            rs = runs(b, DRAFT, name)
            s = summarize_runs(rs, B)
            s["block_size"] = B
            s["speedup"] = speedup(baseline[b][LOOP]["time_per_output_token"], s["time_per_output_token"])
            s["speedup_hf"] = speedup(baseline[b][HF]["time_per_output_token"], s["time_per_output_token"])
            checked = [r for r in rs if r.get("match") is not None]  # greedy runs only
            s["mismatch_ids"] = [r["id"] for r in checked if not r["match"]]
            s["greedy_mismatches"] = len(s["mismatch_ids"]) if checked else None
            walked = [r for r in rs if r.get("offline_lengths") is not None]
            s["offline_tau"] = mean_tau([r["offline_lengths"] for r in walked])[1] if walked else None
            s["offline_agree"] = sum(r["offline_lengths"] == r["acceptance_lengths"] for r in walked)
            s["offline_samples"] = len(walked)
            verified = [n for r in rs for n in r.get("verify_sizes") or []]
            s["verify_size"] = sum(verified) / len(verified) if verified else None  # tokens verified per step
            s["rest_share"] = sum(r.get("rest_steps", 0) for r in rs) / len(verified) if verified else None
            s["branch_share"] = sum(r.get("branch_steps", 0) for r in rs) / len(verified) if verified else None
            summary[name][b] = s

        def avg(key):
            vals = [summary[name][b][key] for b in benches if summary[name][b][key] is not None]
            return sum(vals) / len(vals) if vals else None

        mean[name] = {"speedup": avg("speedup"), "speedup_hf": avg("speedup_hf"), "tau": avg("tau")}
    return {"baseline": baseline, "summary": summary, "mean": mean}


def _later_turns(prompt: Prompt) -> list[str]:
    return prompt.turns[1:] if prompt.turns else []


def _sample_ids(prompt: Prompt) -> list[str]:
    return [prompt.id] + [f"{prompt.id}:turn{t}" for t in range(2, 2 + len(_later_turns(prompt)))]


def _run_benchmark(runner: Runner, log: SampleLog, bench: str, prompts: list[Prompt], thinking: bool | None,
                   progress: bool, max_prompt_tokens: int | None = None) -> None:
    """Every prompt of one benchmark; a later turn's history is the target-alone answer to the
    turns before it (greedy in greedy runs), so every drafter sees the same conversation. A
    conversation ends where a turn's prompt would pass `max_prompt_tokens`."""
    from tqdm.auto import tqdm

    tok, done = runner.target.tokenizer, []
    with tqdm(total=sum(len(_sample_ids(p)) for p in prompts), desc=bench, unit="sample", disable=not progress,
              dynamic_ncols=True) as bar:
        for p in prompts:
            messages = p.messages
            for turn, (sample_id, question) in enumerate(zip(_sample_ids(p), [None, *_later_turns(p)])):
                if question is not None:
                    messages = next_turn(tok, messages, log.get(bench, done[-1], LOOP)["output_ids"], question)
                ids = apply_chat_template(tok, messages, thinking=thinking)
                if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                    bar.total -= len(_sample_ids(p)) - turn
                    break
                runner.sample(log, bench, sample_id, ids)
                done.append(sample_id)
                bar.update()
            bar.set_postfix_str(_running_tau(log, bench, done, runner.drafters))


def evaluate(target, drafters: dict, benches: list[str], *, samples: int | Mapping[str, int] = 8,
             temperature: float = 0.0, max_new_tokens: int = 256, block_size: int | None = None,
             thinking: bool | None = None, max_prompt_tokens: int | None = None, seed: int = 0,
             out_dir="runs/eval", resume: bool = False, offline_rollouts=None, progress: bool = True,
             overwrite: bool = False, preset: str | None = None, verify: str = "full") -> dict:
    """Evaluate drafters (name -> model, moved to the target's device and dtype) on benchmarks.

    `samples` is the number of prompts per benchmark, or a count for each. `preset` ("paper",
    see evaluation.paper) is recorded in results.json and lays results.md out like that table.
    Writes samples.jsonl, settings.json, results.json, results.md and plots into `out_dir` and
    returns the results.json content. Multi-turn prompts (MT-Bench) also run their later turns
    as samples with id suffix ":turnN". `offline_rollouts` (a rollout directory of this target)
    adds the exact greedy tau of each drafter on those cached responses, without decoding.
    An earlier evaluation in `out_dir` is continued (`resume`) or replaced (`overwrite`), never
    silently; a directory holding anything else is refused. `verify`: a policy of
    `decoding.verify` ("full": whole blocks, tau as published; "adaptive"; "tree") or a comma
    list of them (`verify_policies`), each drafter run each way.
    """
    from draftopd.evaluation.report import write_report

    per_bench = isinstance(samples, Mapping)
    counts = {b: samples.get(b, 0) for b in benches} if per_bench else dict.fromkeys(benches, samples)
    if any(n <= 0 for n in counts.values()):
        raise DraftOPDError(f"samples must be positive for every benchmark, got {samples}")
    if max_new_tokens <= 0:
        raise DraftOPDError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise DraftOPDError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if block_size is not None and block_size < 2:
        raise DraftOPDError(f"block_size must be at least 2 (1 is the baseline, always run), got {block_size}")
    if not drafters or not benches:
        raise DraftOPDError("need at least one drafter and one benchmark")
    if len(set(benches)) != len(benches):
        raise DraftOPDError(f"a benchmark is listed twice: {benches}")
    policies = verify_policies(verify)
    if "tree" in policies and temperature != 0:
        raise DraftOPDError(f"verify tree is greedy-only (temperature 0), got temperature {temperature}")
    if clash := sorted({f"{n} {p}" for n in drafters for p in policies[1:]} & set(drafters)):
        raise DraftOPDError(f"verify {verify} names each drafter's twins 'NAME POLICY', but {clash[0]!r} "
                            "is already a drafter's name; rename it")
    for name, draft in drafters.items():
        check_drafter(draft, target, name)
        pack_linears(draft.to(device=target.device, dtype=target.dtype).eval())
    prompts = {b: load_bench(b, target.tokenizer, counts[b], max_prompt_tokens) for b in benches}  # fail early
    rollouts = _load_rollouts(offline_rollouts, target) if offline_rollouts else None

    sizes = {name: block_size or d.block_size for name, d in drafters.items()}
    settings = {"target": target.identity, "dtype": dtype_name(target.dtype),
                "device": str(target.device), "hardware": hardware_record(target.dtype, target.device),
                "temperature": temperature, "max_new_tokens": max_new_tokens,
                "block_size": block_size, "thinking": thinking, "max_prompt_tokens": max_prompt_tokens, "seed": seed,
                "verify": verify}
    out = Path(out_dir)
    check_eval_dir(out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    log = SampleLog(out, settings, resume)
    drafters, sizes, options = _verify_variants(target, drafters, sizes, policies, temperature)
    runner = Runner(target, drafters, sizes, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                    verify=options)
    ids = [(b, i) for b in benches for p in prompts[b] for i in _sample_ids(p)]  # this run's samples, in order
    methods = [(LOOP, None), (HF, None)] + [(DRAFT, n) for n in drafters]
    t0 = time.perf_counter()
    try:
        if any(log.get(b, i, m, n) is None for b, i in ids for m, n in methods):
            runner.warmup(apply_chat_template(target.tokenizer, prompts[benches[0]][0].messages, thinking=thinking))
        for bench in benches:
            _run_benchmark(runner, log, bench, prompts[bench], thinking, progress, max_prompt_tokens)
    finally:
        log.close()
    records = [r for b, i in ids for m, n in methods if (r := log.get(b, i, m, n)) is not None]  # turns cut short: none
    results = {"config": {**settings, "samples": counts if per_bench else samples,
                          "benchmarks": list(benches), "drafters": sizes, "preset": preset,
                          "draft_vocab": {n: None if d.draft_vocab is None else len(d.draft_vocab)
                                          for n, d in drafters.items()},
                          "offline_rollouts": str(offline_rollouts) if offline_rollouts else None,
                          "verify_costs": {n: None if not o else {"draft_ms": o["verify_costs"].draft * 1e3,
                                                                   "verify_ms": [t * 1e3 for t in o["verify_costs"].verify]}
                                           for n, o in options.items()},
                          "tree_tokens": {n: o.get("tree_tokens") for n, o in options.items()},
                          "seconds": time.perf_counter() - t0},
               **summarize(records, list(benches), sizes),
               "offline_rollouts": ({name: offline_tau(d, target.model, rollouts) for name, d in drafters.items()
                                     if not options[name]} if rollouts else None),
               "samples": records}
    write_report(out, results)
    return results


def _verify_variants(target, drafters: dict, sizes: dict, policies: list[str], temperature: float
                     ) -> tuple[dict, dict, dict]:
    """(drafters, block sizes, spec_generate verify keywords) by name, one variant per drafter and
    policy: the first policy's keeps the drafter's name, the others are "NAME POLICY". Costs are
    measured here, once per drafter and policy."""
    from draftopd.decoding.verify import verify_options

    out_drafters, out_sizes, options = {}, {}, {}
    for i, policy in enumerate(policies):
        for name, draft in drafters.items():
            variant = name if i == 0 else f"{name} {policy}"
            out_drafters[variant], out_sizes[variant] = draft, sizes[name]
            options[variant] = verify_options(policy, target.model, draft, sizes[name], temperature)
    return out_drafters, out_sizes, options


def _running_tau(log: SampleLog, bench: str, done: list[str], drafters: dict) -> str:
    """Progress postfix: each drafter's tau so far on this benchmark."""
    parts = []
    for name in drafters:
        lengths = [n for i in done for n in log.get(bench, i, DRAFT, name)["acceptance_lengths"]]
        parts.append(f"{name} τ={sum(lengths) / max(len(lengths), 1):.2f}")
    return " ".join(parts)


def _load_rollouts(path, target) -> list[TokenSequence]:
    """Cached target rollouts as walkable sequences (checked to come from this target)."""
    from draftopd.data.rollouts import load_rollouts

    _, rollouts = load_rollouts(path, expect_target=target.identity)
    return [TokenSequence(torch.tensor(r.prompt_ids + r.response_ids), len(r.prompt_ids)) for r in rollouts]
