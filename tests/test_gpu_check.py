"""benchmarks/gpu_check.py: the prepared device check runs its own code on the CPU at toy shapes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ["setup", "correctness_fp32", "correctness_bf16", "train_sft", "train_opd", "train_opd_offset_sampling",
            "train_opd_worst_case", "sdpa_replay", "sdpa_verify", "decode"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """`gpu_check.py --tiny` in a subprocess where pydantic and gguf cannot be imported (the device has neither)."""
    out = tmp_path_factory.mktemp("gpu-check") / "x.json"
    code = ("import runpy, sys; sys.modules.update(pydantic=None, gguf=None); "
            f"sys.argv = [{str(SCRIPT)!r}, '--tiny', '--out', {str(out)!r}]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_tiny_run_records_every_section_and_passes_its_correctness_checks(tiny_report):
    sections = tiny_report["sections"]
    assert list(sections) == SECTIONS
    failed = {k: v.get("error") or v.get("skipped") for k, v in sections.items() if not v["ok"]}
    assert not failed, failed
    assert tiny_report["meta"]["plan"] == "tiny" and tiny_report["correctness_passed"] is True

    fp32, bf16 = sections["correctness_fp32"], sections["correctness_bf16"]
    assert fp32["passed"] and bf16["passed"]
    d = fp32["decode"]
    assert d["greedy_equal"] and d["acceptance_as_planned"] and d["walk_equals_live"] and d["walk_agreement"] == 1
    assert d["tau_random"] < 1.5 < 2.5 < d["tau_forced"] == d["tau_planned"]  # the forcing hook makes drafts land
    for check in ("verify", "replay"):
        assert fp32[check]["rel_err"] <= fp32["tolerance_rel"] and fp32[check]["rows"] > 0
        assert bf16[check]["rel_err"] <= bf16["tolerance_rel"]
    assert 0 <= bf16["decode"]["walk_agreement"] <= 1


def test_tiny_run_reports_training_kernels_and_decoding(tiny_report):
    s = tiny_report["sections"]
    published = tiny_report["meta"]["published"]
    for name in ("train_sft", "train_opd", "train_opd_offset_sampling", "train_opd_worst_case"):
        assert s[name]["seconds_per_sequence"] > 0 and s[name]["tokens_per_s"] > 0 and "peak_mem_gb" in s[name]
    assert s["train_sft"]["gradient_checkpointing"] == published["sft_gradient_checkpointing"]
    assert s["train_opd"]["tau_walk"] > 2 and not s["train_opd"]["offset_sampling"]
    assert s["train_opd_offset_sampling"]["offset_sampling"]
    worst = s["train_opd_worst_case"]
    assert worst["tau_walk"] == 1 and worst["accepted_tokens"] == 0
    assert worst["max_anchors"] == published["opd"]["max_anchors"]
    for name in ("sdpa_replay", "sdpa_verify"):
        assert s[name]["default_ops"] and s[name]["MATH"]["ok"]
        assert set(s[name]) >= {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"}
    dec = s["decode"]
    assert dec["block1_equals_hf"] and dec["forced_tau"] > 2
    assert dec["verify_16_ms"] > 0 and dec["step_1_ms"] > 0 and dec["breakeven_tau"] > 0


def test_opd_options_match_the_config_defaults(gpu_check):
    """The script builds OPDStep's options without pydantic; they must not drift from OPDConfig."""
    from draftopd.training.config import OPDConfig

    assert gpu_check.OPD_DEFAULTS == OPDConfig().model_dump()


def test_a_failing_section_is_recorded_and_the_budget_skips_late_ones(gpu_check, tmp_path):
    import torch

    report = gpu_check.Report(tmp_path / "r.json", {"plan": "test"}, budget_s=3600)
    report.section("fine", lambda: {"x": 1}, torch.device("cpu"))
    report.section("broken", lambda: 1 / 0, torch.device("cpu"))
    report.budget_s = 0
    report.section("late", lambda: {"x": 2}, torch.device("cpu"))
    s = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert s["fine"] == {"ok": True, "x": 1, "seconds": s["fine"]["seconds"]}
    assert not s["broken"]["ok"] and s["broken"]["error"].startswith("ZeroDivisionError")
    assert not s["late"]["ok"] and "time budget" in s["late"]["skipped"]
