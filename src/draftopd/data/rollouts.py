"""Target rollouts: the target's own responses to prompts, which drafters are trained on.

A rollout set is a directory: `meta.json` (target identity, settings, prompt spec) and
`rollouts.jsonl`, one record per prompt. Records are appended and fsync'd batch by batch, so a
killed run loses at most the batch in flight; rerunning with the same arguments resumes it,
skipping finished prompts and dropping a last line cut short mid-write.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from draftopd.data.prompts import Prompt, apply_chat_template, next_turn
from draftopd.errors import DraftOPDError
from draftopd.io import check_output_dir, holds, write_json_atomic
from draftopd.model.precision import dtype_name, hardware_record
from draftopd.model.target import Target
from draftopd.seeds import derive_seed, stream

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel

FORMAT = "draftopd-rollouts/1"
META = "meta.json"
RECORDS = "rollouts.jsonl"
FINISH_REASONS = ("stop", "length")


@dataclass
class Rollout:
    id: str  # the Prompt id
    prompt_ids: list[int]  # chat-templated prompt tokens
    response_ids: list[int]  # generated tokens, ending with the EOS when one was generated
    finish_reason: str  # "stop" (EOS generated) | "length" (max_new_tokens reached)
    meta: dict = field(default_factory=dict)  # e.g. source, reference answer


@dataclass
class RolloutSettings:
    """Everything besides the target that shapes the responses; a resumed run must match it
    (but for `turns`: a rerun with more answers the later turns of the conversations there)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 16
    max_prompt_tokens: int = 512  # longer prompts (chat-templated) get no rollout
    min_prompt_tokens: int = 0  # nor shorter ones: adds a set's long prompts to a run made below a cap
    thinking: bool | None = None  # chat-template switch for targets that have one (Qwen3)
    seed: int = 0
    turns: int = 1  # user turns answered per multi-turn conversation (MT-Bench, ShareGPT), each after the last answer

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "max_prompt_tokens", "turns"):
            if getattr(self, name) < 1:
                raise DraftOPDError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise DraftOPDError(f"min_prompt_tokens must be in [0, max_prompt_tokens={self.max_prompt_tokens}], "
                                f"got {self.min_prompt_tokens}")
        if self.temperature < 0:
            raise DraftOPDError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DraftOPDError(f"top_p must be in (0, 1], got {self.top_p}")

    def fits(self, prompt_tokens: int) -> bool:
        """Whether a chat-templated prompt of this length gets a rollout."""
        return self.min_prompt_tokens <= prompt_tokens <= self.max_prompt_tokens


def generate_rollouts(target: Target, prompts: list[Prompt], out_dir, settings: RolloutSettings, *,
                      prompt_spec: str = "", progress: bool = True, max_seconds: float | None = None) -> Path:
    """Write the target's response to each prompt into `out_dir`, resuming a run left there.

    Prompts are sorted longest first (less padding; an out-of-memory shows at once) and cut
    into batches before finished ones are skipped, so a resumed run forms the same batches,
    and seeds, as an uninterrupted one. Prompts outside `settings`' prompt-length bounds are skipped.
    `max_seconds` starts no new batch once that much time has passed (a rerun continues); the
    batches then run in a seeded random order, so what fits the budget is a fair sample of the
    prompt set rather than its longest prompts.
    """
    tok, model = target.tokenizer, target.model
    prompt_ids = prompt_token_ids(tok, prompts, settings)
    meta = rollout_meta(target.identity, dtype_name(target.dtype), settings, prompt_spec,
                        hardware=hardware_record(target.dtype, target.device))
    stop = target.stop_token_ids
    pad_id = pad_token_id(tok, stop)
    config = generation_config(settings, stop, pad_id)
    t0 = time.perf_counter()
    with RolloutWriter(out_dir, meta, prompt_ids, progress=progress) as writer:
        order = sorted((p for p in prompts if p.id in prompt_ids), key=lambda p: -len(prompt_ids[p.id]))
        batches = list(enumerate(order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)))
        if max_seconds is not None:  # a budget may stop early: take batches in random order, not longest first
            batches = [batches[i] for i in torch.randperm(len(batches), generator=stream(settings.seed, "batches"))]
        for index, batch in batches:
            batch = [p for p in batch if p.id not in writer.done]
            if not batch:
                continue
            if settings.temperature > 0:
                torch.manual_seed(sampling_seed(settings, batch[0], index))
            responses = generate_batch(model, [prompt_ids[p.id] for p in batch], config, pad_id, set(stop))
            writer.append([Rollout(p.id, prompt_ids[p.id], r, "stop" if r[-1] in stop else "length",
                                   {"source": p.source, **p.meta}) for p, r in zip(batch, responses)])
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                break
    return writer.out


def prompt_token_ids(tokenizer, prompts: list[Prompt], settings: RolloutSettings) -> dict[str, list[int]]:
    """Chat-templated prompt tokens by prompt id, without the prompts outside
    [`min_prompt_tokens`, `max_prompt_tokens`]."""
    prompt_ids: dict[str, list[int]] = {}
    for p in prompts:
        if p.id in prompt_ids:
            raise DraftOPDError(f"prompt id {p.id!r} occurs twice; rollouts are keyed by prompt id")
        ids = apply_chat_template(tokenizer, p.messages, thinking=settings.thinking)
        if settings.fits(len(ids)):
            prompt_ids[p.id] = ids
    if not prompt_ids:
        raise DraftOPDError(f"none of the {len(prompts)} prompts is {settings.min_prompt_tokens}-"
                            f"{settings.max_prompt_tokens} tokens long (min_prompt_tokens, max_prompt_tokens)")
    return prompt_ids


def answer_turns(run: Callable[[list[Prompt]], Path], prompts: list[Prompt], tokenizer,
                 settings: RolloutSettings) -> Path:
    """`run(prompts)` (any backend, writing one rollout directory), then rounds 2..`settings.turns`:
    round t asks the t-th user turn of each multi-turn conversation after the target's own answers
    to the turns before it, as MT-Bench's second turn is asked. Rounds resume like runs."""
    out = run(prompts)
    for turn in range(2, settings.turns + 1):
        prompts = later_turn_prompts(prompts, {r.id: r for r in read_records(out)}, tokenizer, turn, settings)
        if not prompts:
            break
        out = run(prompts)
    return out


def later_turn_prompts(prompts: list[Prompt], records: dict[str, Rollout], tokenizer, turn: int,
                       settings: RolloutSettings) -> list[Prompt]:
    """Turn `turn` of every prompt in `prompts` (the turn before's) that has one and an answer in
    `records`, within the prompt-length bounds; ids `<first turn's id>:turn<turn>`."""
    later = []
    for p in prompts:
        answer = records.get(p.id)
        if answer is None or not p.turns or len(p.turns) < turn:
            continue
        conversation = p.meta.get("conversation", p.id)
        q = Prompt(id=f"{conversation}:turn{turn}", messages=next_turn(tokenizer, p.messages, answer.response_ids,
                                                                        p.turns[turn - 1]),
                   source=p.source, turns=p.turns, meta={**p.meta, "conversation": conversation, "turn": turn})
        if settings.fits(len(apply_chat_template(tokenizer, q.messages, thinking=settings.thinking))):
            later.append(q)
    return later


def sampling_seed(settings: RolloutSettings, prompt: Prompt, i: int) -> int:
    """The seed of draw `i` (a batch, or a prompt's position) of a sampled run: `settings.seed + i`
    for first turns, a stream of its own for each later turn, so rounds do not replay each other."""
    turn = prompt.meta.get("turn", 1)
    return settings.seed + i if turn == 1 else derive_seed(settings.seed, "turn", turn, i)


def prompt_seeds(prompts: list[Prompt], settings: RolloutSettings) -> dict[str, int]:
    """Sampling seed per prompt id: prompt i (in `prompts` order) gets `sampling_seed(..., i)`."""
    return {p.id: sampling_seed(settings, p, i) for i, p in enumerate(prompts)}


def load_rollouts(out_dir, *, expect_target: dict | None = None) -> tuple[dict, list[Rollout]]:
    """(meta, rollouts) of a rollout directory; `expect_target` (a target_identity) guards against
    training a drafter on another target's responses. A last line cut short by a kill is ignored."""
    out = Path(out_dir)
    meta = read_meta(out)
    if expect_target is not None:
        check_rollout_target(out, meta, expect_target)
    rollouts = read_records(out, vocab_size=meta["target"].get("vocab_size"))
    if not rollouts:
        raise DraftOPDError(f"rollouts {out} hold no rollouts yet ({out / RECORDS} is empty or missing); "
                            "rerun `draftopd rollout` to make them")
    return meta, rollouts


def check_rollout_target(out, meta: dict, identity: dict) -> None:
    """Refuse rollouts (meta of directory `out`) that another target wrote, naming the first difference."""
    made = meta["target"]
    if made != identity:
        key = _first_difference(made, identity)
        detail = "" if key == "name" else f" ({key} {made.get(key)!r} vs {identity.get(key)!r})"
        raise DraftOPDError(f"rollouts {out} were made by target {made.get('name')!r}, "
                            f"not {identity.get('name')!r}{detail}")


def rollout_meta(identity: dict, dtype: str, settings: RolloutSettings, prompt_spec: str, **extra) -> dict:
    """meta.json of a new rollout run: what a resumed run must match, and where it came from."""
    return {"format": FORMAT, "target": identity, "dtype": dtype, "settings": asdict(settings),
            "prompts": prompt_spec, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token_ids": "exact", **extra}


class RolloutWriter:
    """The one writer of a rollout directory, shared by every backend (local, HTTP engine, vLLM).

    Entering creates the directory with `meta`, or resumes the run left there (same target,
    dtype, prompt spec and settings, else one line); `done` holds the ids already on disk.
    `append` writes a group of records whole (one write, then fsync), so a kill cuts at most
    the last line short, and the next run drops it. A progress bar counts `prompt_ids`.
    """

    def __init__(self, out_dir, meta: dict, prompt_ids: dict, *, progress: bool = True):
        self.out, self.meta, self.prompt_ids, self.progress = Path(out_dir), meta, prompt_ids, progress
        self.done: set[str] = set()
        self.tokens = 0

    def __enter__(self) -> "RolloutWriter":
        self.done = _start_or_resume(self.out, self.meta)
        self._file = open(self.out / RECORDS, "ab")
        finished = sum(1 for i in self.prompt_ids if i in self.done)
        self._bar = tqdm(total=len(self.prompt_ids), initial=finished, unit="prompt", desc="rollouts",
                         disable=not self.progress)
        self._t0 = time.perf_counter()
        return self

    def append(self, records: list[Rollout]) -> None:
        _append(self._file, records)
        self.done.update(r.id for r in records)
        self.tokens += sum(len(r.response_ids) for r in records)
        self._bar.update(len(records))
        self._bar.set_postfix_str(f"{self.tokens / (time.perf_counter() - self._t0):.1f} tok/s")

    def update_meta(self, **changes) -> None:
        """Record a change of the run's meta (e.g. token ids retokenized) before such records land."""
        self.meta = {**read_meta(self.out), **changes}
        write_json_atomic(self.out / META, self.meta)

    def __exit__(self, *exc) -> None:
        self._bar.close()
        self._file.close()


def write_rollouts(out_dir, meta: dict, rollouts: list[Rollout]) -> None:
    """Write a complete rollout set made elsewhere (an inference engine, a test), replacing one there.

    `meta` needs "target" (a target_identity dict); format, created and token_ids default as in
    generate_rollouts.
    """
    out = Path(out_dir)
    meta = {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token_ids": "exact", **meta}
    if meta["format"] != FORMAT or not isinstance(meta.get("target"), dict):
        raise DraftOPDError(f"rollout meta needs format {FORMAT!r} and a 'target' identity dict")
    if not rollouts:
        raise DraftOPDError("no rollouts to write")
    seen: set[str] = set()
    for i, r in enumerate(rollouts):
        problem = _problem(r, meta["target"].get("vocab_size")) or ("duplicate id" if r.id in seen else None)
        if problem:
            raise DraftOPDError(f"rollout {i} ({r.id!r}): {problem}")
        seen.add(r.id)
    check_output_dir(out, kind="rollout directory", is_kind=holds(META), overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RECORDS + ".tmp")
    with open(tmp, "wb") as f:
        _append(f, rollouts)
    os.replace(tmp, out / RECORDS)
    write_json_atomic(out / META, meta)


def read_records(out_dir, *, vocab_size: int | None = None) -> list[Rollout]:
    """The records written so far, in file order, without checking meta.json (for resuming and
    progress reports). An unterminated last line is a write cut short by a kill and is skipped."""
    path = Path(out_dir) / RECORDS
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")  # the last item is b"" or the partial line
    records, seen = [], set()
    for lineno, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except ValueError as e:  # JSONDecodeError or bad UTF-8
            raise DraftOPDError(f"{where}: invalid JSON ({getattr(e, 'msg', e)}); "
                                "expected one rollout object per line") from None
        try:
            r = Rollout(**row)
        except TypeError:  # not an object, or missing/unknown keys
            raise DraftOPDError(f"{where}: expected an object with keys id, prompt_ids, response_ids, "
                                f"finish_reason, meta; got {str(row)[:80]}") from None
        problem = _problem(r, vocab_size) or (f"duplicate id {r.id!r}" if r.id in seen else None)
        if problem:
            raise DraftOPDError(f"{where}: {problem}")
        seen.add(r.id)
        records.append(r)
    return records


def _problem(r: Rollout, vocab_size: int | None) -> str | None:
    """Why `r` is not a valid record, or None."""
    def token_ids(x) -> bool:
        return (isinstance(x, list) and len(x) > 0 and all(type(t) is int and t >= 0 for t in x)
                and (vocab_size is None or max(x) < vocab_size))

    if not isinstance(r.id, str) or not r.id:
        return "'id' must be a non-empty string"
    if not token_ids(r.prompt_ids):
        return f"'prompt_ids' must be a non-empty list of token ids below the vocabulary size {vocab_size}"
    if not token_ids(r.response_ids):
        return (f"'response_ids' must be a non-empty list of token ids below the vocabulary size {vocab_size}"
                " (an empty rollout?)")
    if r.finish_reason not in FINISH_REASONS:
        return f"'finish_reason' must be one of {FINISH_REASONS}, got {r.finish_reason!r}"
    if not isinstance(r.meta, dict):
        return "'meta' must be an object"
    return None


def check_rollout_dir(out) -> bool:
    """May rollouts be written at `out`? True if a rollout run is there to resume (see draftopd.io)."""
    return check_output_dir(out, kind="rollout directory", is_kind=holds(META), resume=True)


def _start_or_resume(out: Path, meta: dict) -> set[str]:
    """Create `out`, or check that the run left there had the same target and settings.

    Returns the ids already written, after truncating a partial last line so appends stay whole.
    """
    if not check_rollout_dir(out):
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / META, meta)
        return set()
    old = read_meta(out)
    for key in ("target", "dtype", "prompts", "settings"):
        a, b = old.get(key), meta[key]
        if key == "settings" and isinstance(a, dict):  # rounds change no response: a directory may gain turns
            a, b = {**a, "turns": None}, {**b, "turns": None}
        if a != b:
            name = key
            if isinstance(a, dict) and isinstance(b, dict):
                sub = _first_difference(a, b)
                name, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
            raise DraftOPDError(f"{out} holds rollouts made with {name}={a!r}, but this run has {name}={b!r}; "
                                "rerun with the original arguments to resume, or write to a new directory")
    if meta["settings"]["turns"] > old["settings"]["turns"]:  # meta says how many rounds were asked for
        write_json_atomic(out / META, {**old, "settings": {**old["settings"], "turns": meta["settings"]["turns"]}})
    path = out / RECORDS
    if path.exists():
        with open(path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    return {r.id for r in read_records(out, vocab_size=meta["target"]["vocab_size"])}


def read_meta(out: Path) -> dict:
    path = out / META
    if not path.is_file():
        raise DraftOPDError(f"{out} is not a rollout directory (no {META}); make one with `draftopd rollout`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DraftOPDError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DraftOPDError(f"{path}: format {found!r} is not {FORMAT!r}")
    if not isinstance(meta.get("target"), dict):
        raise DraftOPDError(f"{path}: no 'target' identity")
    if isinstance(meta.get("settings"), dict):  # settings added since the run keep their defaults
        meta["settings"] = {**asdict(RolloutSettings()), **meta["settings"]}
    return meta


def _append(f, rollouts: list[Rollout]) -> None:
    """One write then fsync per batch, so a kill can cut at most the last line short."""
    f.write("".join(json.dumps(asdict(r)) + "\n" for r in rollouts).encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


def _first_difference(a: dict, b: dict) -> str | None:
    keys = list(a) + [k for k in b if k not in a]
    return next((k for k in keys if a.get(k) != b.get(k)), None)


def pad_token_id(tokenizer, stop: list[int]) -> int:
    """The tokenizer's pad id, else the first stop id (finished rows are padded with it), else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)


def generation_config(settings: RolloutSettings, stop: list[int], pad_id: int):
    from transformers import GenerationConfig

    sampling = {}
    if settings.temperature > 0:
        # generate() fills unset knobs from the model's own generation_config (Qwen3 ships
        # top_k=20), so every one that shapes the distribution is set: settings alone decide.
        sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0, min_p=0.0,
                        typical_p=1.0)
    return GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.temperature > 0,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=stop or None,
                            pad_token_id=pad_id, **sampling)


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, prompts: list[list[int]], config: GenerationConfig, pad_id: int,
                   stop: set[int]) -> list[list[int]]:
    """Responses to a batch of prompts; left padding makes every row's new tokens start at one column."""
    width = max(map(len, prompts))
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # [b, width]
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    responses = []
    for row in out[:, width:].tolist():  # finished rows are padded on the right
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        responses.append(row[:end])
    return responses
