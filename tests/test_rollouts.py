"""Target rollouts on the embedded SmolLM2: records, resume after a kill, batching, errors, CLI."""

import json
import shutil
from dataclasses import replace

import pytest

from draftopd.cli.main import main
from draftopd.data.prompts import apply_chat_template, load_prompts
from draftopd.data.rollouts import (FORMAT, RECORDS, Rollout, RolloutSettings, generate_rollouts, load_rollouts,
                                    read_records, write_rollouts)
from draftopd.errors import DraftOPDError

SPEC = "gsm8k[:6]"
SETTINGS = RolloutSettings(max_new_tokens=16, batch_size=3)


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(SPEC)


@pytest.fixture(scope="module")
def reference(smollm, prompts, tmp_path_factory):
    """An uninterrupted greedy run: (directory, {id: Rollout})."""
    out = tmp_path_factory.mktemp("rollouts") / "ref"
    generate_rollouts(smollm, prompts, out, SETTINGS, prompt_spec=SPEC, progress=False)
    return out, {r.id: r for r in load_rollouts(out)[1]}


def test_one_record_per_prompt(smollm, prompts, reference):
    out, records = reference
    meta, rollouts = load_rollouts(out, expect_target=smollm.identity)
    assert meta["format"] == FORMAT and meta["target"] == smollm.identity
    assert meta["settings"]["max_new_tokens"] == 16 and meta["prompts"] == SPEC and meta["token_ids"] == "exact"
    assert sorted(r.id for r in rollouts) == sorted(p.id for p in prompts)
    stop = smollm.stop_token_ids
    for p in prompts:
        r = records[p.id]
        assert r.prompt_ids == apply_chat_template(smollm.tokenizer, p.messages)
        assert 0 < len(r.response_ids) <= 16
        assert not set(r.response_ids[:-1]) & set(stop)  # cut after the first EOS
        assert r.finish_reason == ("stop" if r.response_ids[-1] in stop else "length")
        assert r.meta["source"] == "gsm8k" and "answer" in r.meta


def test_resume_after_kill_matches_uninterrupted_run(smollm, prompts, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    generate, calls = smollm.model.generate, []

    def killed_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(smollm.model, "generate", killed_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_rollouts(smollm, prompts, out, SETTINGS, prompt_spec=SPEC, progress=False)
    monkeypatch.undo()
    first = read_records(out)
    assert len(first) == 3
    # A kill in the middle of writing the second batch leaves half a line.
    missing = next(r for r in reference[1].values() if r.id not in {f.id for f in first})
    line = json.dumps({"id": missing.id, "prompt_ids": missing.prompt_ids, "response_ids": missing.response_ids,
                       "finish_reason": missing.finish_reason, "meta": missing.meta})
    with open(out / "rollouts.jsonl", "a") as f:
        f.write(line[: len(line) // 2])
    assert len(load_rollouts(out)[1]) == 3  # the partial line is ignored

    generate_rollouts(smollm, prompts, out, SETTINGS, prompt_spec=SPEC, progress=False)
    assert (out / "rollouts.jsonl").read_bytes().endswith(b"\n")
    resumed = load_rollouts(out)[1]
    assert len(resumed) == len(prompts)
    assert {r.id: r for r in resumed} == reference[1]


def test_batched_equals_unbatched_greedy(smollm, prompts, reference, tmp_path):
    out = generate_rollouts(smollm, prompts, tmp_path / "b1", replace(SETTINGS, batch_size=1), progress=False)
    single = {r.id: r.response_ids for r in load_rollouts(out)[1]}
    assert single == {i: r.response_ids for i, r in reference[1].items()}


def test_resume_with_other_settings_names_the_field(smollm, prompts, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    with pytest.raises(DraftOPDError, match=r"settings\.temperature=0\.0.*settings\.temperature=0\.7"):
        generate_rollouts(smollm, prompts, out, replace(SETTINGS, temperature=0.7), prompt_spec=SPEC)
    with pytest.raises(DraftOPDError, match=r"prompts='gsm8k\[:6\]'"):
        generate_rollouts(smollm, prompts, out, SETTINGS, prompt_spec="gsm8k[:7]")


def test_load_checks_target_and_records(reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    meta = json.loads((out / "meta.json").read_text())
    other = dict(meta["target"], name="Qwen/Qwen3-8B", hidden_size=4096)
    with pytest.raises(DraftOPDError, match=r"were made by target 'HuggingFaceTB/SmolLM2.*not 'Qwen/Qwen3-8B'"):
        load_rollouts(out, expect_target=other)
    with pytest.raises(DraftOPDError, match="hidden_size 576 vs 4096"):
        load_rollouts(out, expect_target=dict(meta["target"], hidden_size=4096))

    lines = (out / "rollouts.jsonl").read_text().splitlines(keepends=True)
    (out / "rollouts.jsonl").write_text(lines[0] + '{"id": "gsm8k:9", "prompt_ids": [1]}\n' + "".join(lines[1:]))
    with pytest.raises(DraftOPDError, match=r"rollouts\.jsonl:2: expected an object with keys"):
        load_rollouts(out)
    (out / "rollouts.jsonl").write_text(lines[0] + "{not json\n")
    with pytest.raises(DraftOPDError, match=r"rollouts\.jsonl:2: invalid JSON"):
        load_rollouts(out)
    (out / "rollouts.jsonl").write_text(lines[0] + lines[0])
    with pytest.raises(DraftOPDError, match=r"rollouts\.jsonl:2: duplicate id"):
        load_rollouts(out)
    (out / "rollouts.jsonl").write_text("")
    with pytest.raises(DraftOPDError, match="hold no rollouts"):
        load_rollouts(out)
    with pytest.raises(DraftOPDError, match="not a rollout directory"):
        load_rollouts(tmp_path / "nowhere")


def test_write_rollouts_round_trip(tmp_path):
    target = {"name": "t", "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 100}
    rollouts = [Rollout("a:0", [1, 2], [3, 4, 0], "stop", {"source": "a"}), Rollout("a:1", [5], [6], "length", {})]
    write_rollouts(tmp_path, {"target": target, "settings": {}}, rollouts)
    meta, loaded = load_rollouts(tmp_path, expect_target=target)
    assert loaded == rollouts and meta["format"] == FORMAT
    with pytest.raises(DraftOPDError, match=r"rollout 0 \('a:0'\): 'response_ids'.*empty rollout"):
        write_rollouts(tmp_path, {"target": target}, [Rollout("a:0", [1], [], "stop", {})])
    with pytest.raises(DraftOPDError, match="vocabulary size 100"):
        write_rollouts(tmp_path, {"target": target}, [Rollout("a:0", [1], [100], "stop", {})])


def test_cli_bad_prompt_spec_is_one_line(tmp_path, capsys):
    rc = main(["rollout", "--target", "smollm2-135m", "--prompts", "nosuchset", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("draftopd rollout: error: unknown prompt source 'nosuchset'")


def test_cli_resumes_finished_run(reference, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    rc = main(["rollout", "--target", "smollm2-135m", "--prompts", SPEC, "--out", str(out),
               "--max-new-tokens", "16", "--batch-size", "3", "--dtype", "fp32"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("rollouts: 6 (0 new) | ")


def test_a_budgeted_run_samples_the_prompt_set_not_its_longest_prompts(smollm, tmp_path):
    """With max_seconds the batches run in a seeded random order: a budget that stops after
    one batch keeps a batch from anywhere in the length order, the same one on a rerun."""
    spec = "gsm8k[:4],sharegpt[:12]"  # ShareGPT prompts are the long ones
    prompts = load_prompts(spec, tokenizer=smollm.tokenizer)
    settings = RolloutSettings(max_new_tokens=2, batch_size=4, max_prompt_tokens=4096)
    firsts = []
    for seed in range(4):
        out = tmp_path / f"s{seed}"
        generate_rollouts(smollm, prompts, out, replace(settings, seed=seed), prompt_spec=spec, progress=False,
                          max_seconds=0)
        firsts.append(sorted(r.id for r in read_records(out)))
        assert len(firsts[-1]) == 4  # one batch, then the budget stops it
    longest = sorted(sorted(prompts, key=lambda p: -len(apply_chat_template(smollm.tokenizer, p.messages)))[:4],
                     key=lambda p: p.id)
    assert any(f != [p.id for p in longest] for f in firsts)  # not always the longest batch


def test_prompt_length_bounds_pick_a_band_and_old_runs_resume(smollm, prompts, reference, tmp_path, capsys):
    """min/max prompt tokens keep only the prompts in the band; a run written before
    min_prompt_tokens existed (no such key in its meta) resumes under the default."""
    lengths = sorted(len(apply_chat_template(smollm.tokenizer, p.messages)) for p in prompts)
    low, high = lengths[1], lengths[-2]  # drops the shortest and the longest prompt
    out = tmp_path / "band"
    rc = main(["rollout", "--target", "smollm2-135m", "--prompts", SPEC, "--out", str(out), "--max-new-tokens", "2",
               "--min-prompt-tokens", str(low), "--max-prompt-tokens", str(high), "--dtype", "fp32"])
    assert rc == 0 and "2 prompts outside" in capsys.readouterr().out
    kept = [len(r.prompt_ids) for r in read_records(out)]
    assert len(kept) == len(prompts) - 2 and all(low <= n <= high for n in kept)
    with pytest.raises(DraftOPDError, match="min_prompt_tokens must be in"):
        RolloutSettings(min_prompt_tokens=600, max_prompt_tokens=512)

    old = tmp_path / "old"
    shutil.copytree(reference[0], old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["settings"]["min_prompt_tokens"]
    (old / "meta.json").write_text(json.dumps(meta))
    rc = main(["rollout", "--target", "smollm2-135m", "--prompts", SPEC, "--out", str(old),
               "--max-new-tokens", "16", "--batch-size", "3", "--dtype", "fp32"])
    assert rc == 0 and capsys.readouterr().out.startswith("rollouts: 6 (0 new) | ")


def test_later_turns_follow_the_targets_own_answers(smollm, tmp_path, capsys, monkeypatch):
    """--turns 2: each MT-Bench conversation's second question is asked after the target's own first
    answer, templated as the evaluation puts it; a kill in round 2 resumes to the same records, and so
    does a rerun with --turns 2 into a directory of first turns."""
    spec = "mt-bench[:3]"
    args = ["rollout", "--target", "smollm2-135m", "--prompts", spec, "--max-new-tokens", "4", "--dtype", "fp32",
            "--batch-size", "2", "--turns", "2"]
    out = tmp_path / "two"
    assert main(args + ["--out", str(out)]) == 0
    assert "6 (6 new, 3 of them later turns)" in capsys.readouterr().out
    records = {r.id: r for r in read_records(out)}
    tok = smollm.tokenizer
    for p in load_prompts(spec):
        first, second = records[p.id], records[f"{p.id}:turn2"]
        history = p.messages + [{"role": "assistant", "content": tok.decode(first.response_ids,
                                                                             skip_special_tokens=True).strip()},
                                {"role": "user", "content": p.turns[1]}]
        assert second.prompt_ids == apply_chat_template(tok, history)
        assert second.meta["turn"] == 2 and second.meta["conversation"] == p.id
    assert json.loads((out / "meta.json").read_text())["settings"]["turns"] == 2

    killed = tmp_path / "killed"
    generate, calls = smollm.model.generate, []

    def killed_in_round_two(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # rounds of 2 batches each: the first batch of round 2
            raise KeyboardInterrupt
        return generate(*a, **k)

    monkeypatch.setattr("draftopd.model.target.load_target", lambda *a, **k: smollm)
    monkeypatch.setattr(smollm.model, "generate", killed_in_round_two)
    assert main(args + ["--out", str(killed)]) == 130  # interrupted: what was written stays
    assert "rerun the same command to resume" in capsys.readouterr().err and len(read_records(killed)) == 3
    monkeypatch.setattr(smollm.model, "generate", generate)
    assert main(args + ["--out", str(killed)]) == 0
    assert {r.id: r.response_ids for r in read_records(killed)} == {i: r.response_ids for i, r in records.items()}

    grown = tmp_path / "grown"  # first turns, then a rerun with --turns 2 adds the second turns to them
    one = args[:-2]  # without "--turns 2"
    assert main(one + ["--out", str(grown)]) == 0
    first = (grown / RECORDS).read_bytes()
    capsys.readouterr()
    assert main(args + ["--out", str(grown)]) == 0
    assert "6 (3 new, 3 of them later turns)" in capsys.readouterr().out
    assert (grown / RECORDS).read_bytes().startswith(first)  # the first answers stay as written
    assert {r.id: r.response_ids for r in read_records(grown)} == {i: r.response_ids for i, r in records.items()}
    assert main(one + ["--out", str(grown)]) == 0  # the first command again: nothing to do, the rounds recorded
    assert json.loads((grown / "meta.json").read_text())["settings"]["turns"] == 2

    capsys.readouterr()
    rc = main(["rollout", "--target", "smollm2-135m", "--prompts", spec, "--out", str(tmp_path / "v"),
               "--backend", "vllm", "--turns", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--turns 2 runs with --backend hf or --engine-url" in err
