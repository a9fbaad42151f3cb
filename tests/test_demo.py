"""The demo on the embedded target, with budgets of seconds: both paths run end to end and
report what the README promises (side-by-side drafters, tau ratio with an interval, lossless check)."""

import json

import pytest

from draftopd.demo import DemoPlan, run_demo

pytestmark = pytest.mark.slow

TINY_BUDGET = {"rollouts": 0.01, "sft": 0.3, "opd": 0.3, "eval": 0.3}  # one batch / a few steps each


def tiny_plan(out, **kw) -> DemoPlan:
    return DemoPlan(out_dir=str(out), dtype="fp32", train_prompts="gsm8k[640:648]", max_new_tokens=24,
                    heldout=("gsm8k[1200:1204]", "mt-bench[60:61]"), budget_minutes=dict(TINY_BUDGET), **kw)


def check_summary(out, start_name: str, capsys) -> dict:
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo-summary.json").read_text())
    walk, dec = summary["walk"], summary["decode"]
    assert set(walk["tau"]) == {start_name, "draft-opd"} and walk["prompts"] >= 1
    assert all(1.0 <= t <= 8.0 for t in walk["tau"].values())
    r = walk["tau_ratio"]
    assert r["low"] <= r["ratio"] <= r["high"]
    assert dec["greedy_runs"] >= 2 and dec["greedy_mismatches"] == 0  # fp32: lossless token for token
    assert summary["hardware"]["dtype"] == "float32" and "cpu_capability" in summary["hardware"]
    assert "target alone" in printed and f"Draft-OPD / {start_name} tau" in printed
    assert (out / "opd" / "final" / "model.safetensors").exists()
    return summary


def test_demo_post_trains_the_shipped_drafter(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "demo"
    run_demo(tiny_plan(out))
    summary = check_summary(out, "shipped-sft", capsys)
    assert summary["walk"]["tau"]["shipped-sft"] > 1.5  # the shipped drafter is trained: its drafts get accepted
    assert not (out / "sft").exists()
    run_demo(tiny_plan(out))  # a finished demo reruns from its saved phases
    rerun = capsys.readouterr().out
    assert "rollouts: kept as training found them" in rerun and "opd: already trained" in rerun


def test_demo_from_scratch_trains_sft_first(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "scratch"
    run_demo(tiny_plan(out, from_scratch=True))
    check_summary(out, "sft", capsys)
    assert (out / "sft" / "final" / "config.json").exists()


def test_fp32_exactness_check_of_a_bf16_demo(smollm, one_torch_thread):
    """The check the demo adds when it times in bf16: exact token equality in fp32."""
    import torch

    from draftopd.data.prompts import apply_chat_template, load_prompts
    from draftopd.demo import exact_fp32_check
    from draftopd.evaluation.bench import TokenSequence
    from draftopd.model.checkpoint import load_drafter

    prompts = [apply_chat_template(smollm.tokenizer, p.messages) for p in load_prompts("gsm8k[1200:1202]")]
    seqs = [TokenSequence(torch.tensor(ids), len(ids)) for ids in prompts]
    drafters = {"shipped": load_drafter("smollm2-135m-dflash")}  # bf16, as the demo holds it
    assert exact_fp32_check(DemoPlan(), drafters, seqs, tokens=16) == {"runs": 2, "mismatches": 0, "tokens": 16}
    assert next(drafters["shipped"].parameters()).dtype == torch.bfloat16  # the caller's drafter is untouched
