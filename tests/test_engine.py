"""Rollouts from an OpenAI-compatible engine: the embedded SmolLM2 served on 127.0.0.1 by
engine_server, read back by the engine client; equality with local generation, exactly-once
under dropped answers and interruption, clear errors for unreachable or mismatched servers."""

import socket
from dataclasses import replace

import pytest

import draftopd.data.engine as engine
from draftopd.cli.main import main
from draftopd.data.engine import engine_rollouts, finish, response_ids, target_without_weights
from draftopd.data.engine_server import EngineServer
from draftopd.data.prompts import load_prompts
from draftopd.data.rollouts import RolloutSettings, generate_rollouts, load_rollouts, read_records
from draftopd.errors import DraftOPDError

SPEC = "gsm8k[:6]"
NAME = "smollm2-135m"
SETTINGS = RolloutSettings(max_new_tokens=12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(SPEC)


@pytest.fixture(scope="module")
def identity(smollm):
    return smollm.identity


@pytest.fixture(scope="module")
def reference(smollm, prompts, tmp_path_factory):
    """Local greedy generation in one batch (the server generates one prompt at a time): {id: Rollout}."""
    out = tmp_path_factory.mktemp("engine") / "local"
    generate_rollouts(smollm, prompts, out, replace(SETTINGS, batch_size=len(prompts)), prompt_spec=SPEC,
                      progress=False)
    return {r.id: r for r in load_rollouts(out)[1]}


@pytest.fixture(scope="module")
def server(smollm):
    with EngineServer(smollm.model, smollm.tokenizer, NAME) as s:
        yield s


def run(url, smollm, prompts, out, identity, **kwargs):
    kwargs = {"concurrency": 2, "progress": False, "prompt_spec": SPEC,
              "stop_ids": smollm.stop_token_ids, **kwargs}
    return engine_rollouts(url, NAME, smollm.tokenizer, prompts, out, SETTINGS, target_identity=identity, **kwargs)


def test_engine_equals_local_greedy(smollm, prompts, identity, reference, server, tmp_path):
    out = run(server.url, smollm, prompts, tmp_path / "r", identity)
    meta, rollouts = load_rollouts(out, expect_target=identity)
    assert meta["token_ids"] == "exact" and meta["engine"] == {"url": server.url, "model": NAME}
    assert meta["settings"]["max_new_tokens"] == 12 and meta["prompts"] == SPEC
    assert {r.id: r for r in rollouts} == reference


def test_dropped_answers_are_retried_exactly_once(smollm, prompts, identity, reference, server, tmp_path,
                                                  monkeypatch):
    before = server.completions
    monkeypatch.setattr(server, "drop_every", 2)
    out = run(server.url, smollm, prompts, tmp_path / "r", identity, backoff=0.01)
    assert server.completions - before > len(prompts)  # answers were computed, then lost
    rollouts = read_records(out)  # raises on a duplicate id
    assert len(rollouts) == len(prompts)
    assert {r.id: r for r in rollouts} == reference


def test_interrupted_run_resumes_exactly_once(smollm, prompts, identity, reference, server, tmp_path, monkeypatch):
    from draftopd.data.rollouts import RolloutWriter

    out, written = tmp_path / "r", []
    append = RolloutWriter.append

    def killed_after_three(writer, rollouts):
        append(writer, rollouts)
        written.extend(rollouts)
        if len(written) >= 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(RolloutWriter, "append", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(server.url, smollm, prompts, out, identity)
    monkeypatch.undo()
    first = read_records(out)
    assert 3 <= len(first) < len(prompts)
    with open(out / "rollouts.jsonl", "a") as f:  # and a kill mid-write
        f.write('{"id": "gsm8k:5", "prompt_ids": [1, 2')

    run(server.url, smollm, prompts, out, identity)
    resumed = read_records(out)
    assert len(resumed) == len(prompts)
    assert {r.id: r for r in resumed} == reference
    assert [r.id for r in resumed[:len(first)]] == [r.id for r in first]  # appended, never rewritten


def test_unreachable_server_fails_fast_with_clear_error(smollm, prompts, identity, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DraftOPDError, match=rf"could not reach {url} after 3 tries: .*Connection"):
        run(url, smollm, prompts, tmp_path / "r", identity, retries=2, backoff=0.01)
    assert not (tmp_path / "r").exists()


def test_server_with_another_model_is_refused(smollm, prompts, identity, tmp_path):
    with EngineServer(smollm.model, smollm.tokenizer, "someone/other-model") as other:
        with pytest.raises(DraftOPDError, match=r"serves 'someone/other-model', not the configured target "
                                                r"'smollm2-135m'"):
            run(other.url, smollm, prompts, tmp_path / "r", identity)


def test_server_rejection_is_not_retried(smollm, prompts, identity, server, tmp_path):
    sampled = RolloutSettings(max_new_tokens=12, temperature=0.7)
    with pytest.raises(DraftOPDError, match=r"rejected prompt .*HTTP 400: only greedy"):
        engine_rollouts(server.url, NAME, smollm.tokenizer, prompts[:1], tmp_path / "r", sampled,
                        target_identity=identity, progress=False, backoff=5.0)  # a retry would take 5 s


def test_response_ids_fallbacks(smollm):
    tok, eos = smollm.tokenizer, smollm.tokenizer.eos_token_id
    assert response_ids({"token_ids": [5, 6, eos], "text": "ignored"}, tok) == ([5, 6, eos], True)
    vllm_old = {"text": "x", "logprobs": {"tokens": ["token_id:5", f"token_id:{eos}"]}}
    assert response_ids(vllm_old, tok) == ([5, eos], True)
    text = {"text": " The answer is 4.", "logprobs": {"tokens": [" The", " answer"]}}
    assert response_ids(text, tok) == (tok.encode(" The answer is 4.", add_special_tokens=False), False)
    # The local convention: a stopped response ends with its EOS, even when the engine left it out.
    assert finish([5, 6, eos], "stop", None, [eos]) == ([5, 6, eos], "stop")
    assert finish([5, 6], "stop", None, [eos]) == ([5, 6, eos], "stop")
    assert finish([5, 6], "stop", 7, [eos, 7]) == ([5, 6, 7], "stop")  # SGLang matched_stop
    assert finish([5, 6], "length", None, [eos]) == ([5, 6], "length")


def test_retokenized_responses_are_marked(smollm, prompts, identity, server, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "response_ids", lambda choice, tok: (tok.encode(choice["text"]), False))
    out = run(server.url, smollm, prompts[:2], tmp_path / "r", identity, prompt_spec="gsm8k[:2]")
    meta, rollouts = load_rollouts(out)
    assert meta["token_ids"] == "retokenized" and len(rollouts) == 2


def test_cli_engine_url(smollm, identity, reference, server, tmp_path, capsys):
    tok, served_identity, stop = target_without_weights(NAME)
    assert served_identity == identity and stop == smollm.stop_token_ids
    out = tmp_path / "cli"
    argv = ["rollout", "--target", NAME, "--prompts", "gsm8k[:2]", "--out", str(out), "--max-new-tokens", "12",
            "--batch-size", "1", "--engine-url", server.url + "/v1", "--concurrency", "2"]
    assert main(argv) == 0
    assert "rollouts: 2 (2 new)" in capsys.readouterr().out
    meta, rollouts = load_rollouts(out, expect_target=identity)  # trainable against the local target
    assert {r.id: r for r in rollouts} == {k: reference[k] for k in ("gsm8k:0", "gsm8k:1")}
    assert main(argv + ["--engine-model", "other"]) == 2
    assert "serves 'smollm2-135m', not the configured target 'other'" in capsys.readouterr().err
