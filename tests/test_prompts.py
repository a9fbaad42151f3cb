"""Prompt specs: embedded sets, slicing, local JSONL, HF wrapping, and the chat-template helper."""

import json
import sys
import types

import pytest

from draftopd.data import prompts as prompts_module
from draftopd.data.prompts import EMBEDDED_SETS, Prompt, apply_chat_template, load_prompts
from draftopd.errors import DraftOPDError


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from draftopd.model.target import resolve_target

    return AutoTokenizer.from_pretrained(resolve_target("smollm2-135m"))


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name,count", [("gsm8k", 1319), ("humaneval", 164), ("mt-bench", 80),
                                        ("aime25", 30), ("gpqa", 198)])
def test_embedded_set_counts(name, count):
    prompts = load_prompts(name)
    assert len(prompts) == count
    assert prompts[0].id == f"{name}:0" and prompts[-1].id == f"{name}:{count - 1}"
    for p in prompts:
        assert p.source == name
        assert p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip()


def test_every_listed_embedded_set_loads_and_the_error_names_them():
    for name in EMBEDDED_SETS:
        assert load_prompts(f"{name}[:1]")[0].source == name
    with pytest.raises(DraftOPDError) as e:
        load_prompts("nosuchset")
    assert all(name in str(e.value) for name in EMBEDDED_SETS)


def test_mt_bench_keeps_both_turns():
    prompts = load_prompts("mt-bench")
    assert all(len(p.turns) == 2 for p in prompts)
    assert all(p.messages == [{"role": "user", "content": p.turns[0]}] for p in prompts)
    assert {"question_id", "category"} <= prompts[0].meta.keys()


def test_humaneval_is_phrased_as_a_request():
    p = load_prompts("humaneval[:1]")[0]
    assert p.messages[0]["content"].startswith("Complete the following Python function:\n```python\n")
    assert "def has_close_elements" in p.messages[0]["content"]
    assert p.meta["task_id"] == "HumanEval/0"


def test_slicing_is_deterministic_and_ids_follow_source_index():
    a = load_prompts("gsm8k[100:110]")
    assert [p.id for p in a] == [f"gsm8k:{i}" for i in range(100, 110)]
    assert a == load_prompts("gsm8k[100:110]")
    full = load_prompts("gsm8k")
    assert [p.messages for p in a] == [p.messages for p in full[100:110]]
    assert [p.id for p in load_prompts("gsm8k[-2:]")] == ["gsm8k:1317", "gsm8k:1318"]
    assert [p.id for p in load_prompts("aime25[::10]")] == ["aime25:0", "aime25:10", "aime25:20"]


def test_multiple_sources_keep_spec_order():
    prompts = load_prompts("aime25[:2], gsm8k[:3]")
    assert [p.id for p in prompts] == ["aime25:0", "aime25:1", "gsm8k:0", "gsm8k:1", "gsm8k:2"]


def test_sharegpt_head_streams_quickly(monkeypatch):
    """The file is ~125 MB and truncated: a head slice must read only its first megabytes."""
    read_chars = []

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            read_chars.append(len(data))
            return data

    monkeypatch.setattr(prompts_module, "open", lambda *a, **k: CountingFile(open(*a, **k)), raising=False)
    prompts = load_prompts("sharegpt[:50]")
    assert 0 < sum(read_chars) < 4 << 20
    assert len(prompts) == 50
    assert all(p.messages[0]["role"] == "user" and p.messages[0]["content"].strip() for p in prompts)
    assert prompts[0].meta["record_id"] == "QWJhYvA_0"
    assert [p.id for p in load_prompts("sharegpt[10:12]")] == ["sharegpt:10", "sharegpt:11"]
    # each keeps its first two user turns, as MT-Bench has: the first is the prompt
    assert all(1 <= len(p.turns) <= 2 and p.turns[0] == p.messages[0]["content"] for p in prompts)
    assert sum(len(p.turns) == 2 for p in prompts) >= 20


def test_sharegpt_stops_cleanly_at_truncated_tail():
    last = load_prompts("sharegpt[-1:]", dedup=False)
    assert [p.id for p in last] == ["sharegpt:11167"]  # 11,168 records open with a human turn
    assert last[0].meta["record_id"] == "hlWUIwT_0"


def test_dedup_keeps_first_and_ignores_whitespace_and_case(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hello  world"}, {"prompt": "other"},
                                               {"prompt": "hello world\n"}])
    assert [p.id for p in load_prompts(path)] == [f"{path}:0", f"{path}:1"]
    assert len(load_prompts(path, dedup=False)) == 3
    # across sources too
    assert len(load_prompts("gsm8k[:5],gsm8k[3:8]")) == 8


def test_local_jsonl_both_formats(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2+2?"},
        "",
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Red."}]},
    ])
    first, second = load_prompts(path)
    assert first == Prompt(id=f"{path}:0", messages=[{"role": "user", "content": "What is 2+2?"}],
                           source=path, meta={"line": 1})
    assert second.messages[-1] == {"role": "user", "content": "Name a colour."}  # trailing answer dropped
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.meta == {"line": 3}
    assert len(load_prompts(f"{path}[1:]")) == 1


@pytest.mark.parametrize("bad,expected", [
    ('{"prompt": "ok"', "invalid JSON"),
    ('{"text": "no prompt"}', "'prompt'"),
    ('{"messages": [{"role": "system", "content": "only system"}]}', "user turn"),
    ('["not", "an", "object"]', "got list"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, expected):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, "", bad])
    with pytest.raises(DraftOPDError, match=rf"bad\.jsonl:3: .*{expected}"):
        load_prompts(path)


def test_unknown_source_lists_known_sets():
    with pytest.raises(DraftOPDError) as err:
        load_prompts("gsm9k")
    assert "'gsm9k'" in str(err.value)
    assert all(name in str(err.value) for name in EMBEDDED_SETS)


@pytest.mark.parametrize("spec,expected", [
    ("missing/prompts.jsonl", "does not exist"),
    ("gsm8k[5]", "bad slice"),
    ("gsm8k[a:b]", "bad slice"),
    ("gsm8k[::0]", "step cannot be zero"),
    ("gsm8k[:10", "bad slice"),
    ("gsm8k[2000:]", r"no prompts left from 'gsm8k\[2000:\]' after slicing"),
    (" , ", "empty prompt spec"),
])
def test_bad_specs(spec, expected):
    with pytest.raises(DraftOPDError, match=expected):
        load_prompts(spec)


def test_max_prompt_tokens_filter(tok):
    prompts = load_prompts("gsm8k[:40]")
    lengths = [len(apply_chat_template(tok, p.messages)) for p in prompts]
    limit = sorted(lengths)[len(lengths) // 2]
    kept = load_prompts("gsm8k[:40]", tokenizer=tok, max_prompt_tokens=limit)
    assert [p.id for p in kept] == [p.id for p, n in zip(prompts, lengths) if n <= limit]
    assert 0 < len(kept) < len(prompts)
    with pytest.raises(DraftOPDError, match=r"no prompts left from 'gsm8k\[:40\]' after dropping .* 5 tokens"):
        load_prompts("gsm8k[:40]", tokenizer=tok, max_prompt_tokens=5)
    with pytest.raises(DraftOPDError, match="needs a tokenizer"):
        load_prompts("gsm8k[:5]", max_prompt_tokens=100)


def test_apply_chat_template_ends_with_generation_prompt(tok):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = apply_chat_template(tok, messages)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[-len(header):] == header
    assert tok.decode(ids).endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert apply_chat_template(tok, messages, thinking=False) == ids  # SmolLM2's template ignores it


def test_apply_chat_template_without_template_uses_last_user_text(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": "second question"}]
    assert apply_chat_template(tok, messages) == tok.encode("second question")


def test_hf_source_converts_rows_and_wraps_failures(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "owner/broken":
            raise ConnectionError("Couldn't reach the Hub\nlong traceback detail")
        return [{"question": "q0"}, {"messages": [{"role": "user", "content": "q1"}]}, {"prompt": "q2"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    prompts = load_prompts("hf:owner/set:main:test[1:]")
    assert calls == [("owner/set", "main", "test")]
    assert [p.id for p in prompts] == ["hf:owner/set:main:test:1", "hf:owner/set:main:test:2"]
    assert [p.messages[0]["content"] for p in prompts] == ["q1", "q2"]
    load_prompts("hf:owner/set")
    assert calls[-1] == ("owner/set", None, "train")
    with pytest.raises(DraftOPDError, match=r"^could not load .*'hf:owner/broken:test': ConnectionError: "
                                            r"Couldn't reach the Hub$"):
        load_prompts("hf:owner/broken:test")
