"""Evaluation: metric arithmetic, an end-to-end run on SmolLM2 writing every file, offline tau
equal to decoded tau, resume after a kill, and the user errors."""

import json
import shutil

import pytest

from helpers import tiny_drafter, tiny_target, without_dtype_notice
from draftopd.cli.main import main
from draftopd.data.prompts import apply_chat_template, load_prompts
from draftopd.data.rollouts import Rollout, write_rollouts
from draftopd.errors import DraftOPDError
from draftopd.evaluation.bench import SAMPLES, drafter_names, evaluate, summarize
from draftopd.evaluation.metrics import (acceptance_histogram, mean_tau, offset_acceptance, speedup, summarize_runs,
                                         time_per_token)
from draftopd.evaluation.report import PLOTS
from draftopd.model.checkpoint import init_drafter, load_drafter, save_drafter

BENCHES = ["gsm8k", "humaneval", "mt-bench"]
DRAFTERS = ("draft-a", "draft-b")
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- metrics on hand-made numbers ----

def test_acceptance_histogram_and_offset_rates():
    lengths = [1, 3, 3, 8]
    assert acceptance_histogram(lengths, 8) == [1, 0, 2, 0, 0, 0, 0, 1]
    # offset k accepted <=> length > k: k=1,2 -> 3 of 4 steps; k=3..7 -> only the 8
    assert offset_acceptance(lengths, 8) == [0.75, 0.75, 0.25, 0.25, 0.25, 0.25, 0.25]
    assert offset_acceptance([], 4) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="outside 1..4"):
        acceptance_histogram([5], 4)


def test_tau_means_time_and_speedup():
    per_sample, token_weighted = mean_tau([[1, 3], [8], []])  # the empty sample has no tau
    assert per_sample == pytest.approx((2 + 8) / 2) and token_weighted == pytest.approx(12 / 3)
    assert time_per_token([0.1, 0.3], [10, 30]) == pytest.approx((1 + 9) / 40)
    assert time_per_token([], []) == 0.0
    assert speedup(0.3, 0.1) == pytest.approx(3.0) and speedup(0.3, 0.0) is None
    s = summarize_runs([{"acceptance_lengths": [2, 4], "num_output_tokens": 7, "time_per_output_token": 0.5}], 4)
    assert s["tau"] == 3.0 and s["acceptance_histogram"] == [0, 1, 0, 1] and s["offset_acceptance"] == [1.0, 0.5, 0.5]
    assert s["tokens_per_s"] == 2.0 and s["steps"] == 2 and s["output_tokens"] == 7


def test_summarize_speedups_mismatches_and_offline_agreement():
    def rec(bench, i, method, drafter, lengths, tpot, **extra):
        return {"bench": bench, "id": i, "method": method, "drafter": drafter, "acceptance_lengths": lengths,
                "num_output_tokens": sum(lengths) + 1, "time_per_output_token": tpot, **extra}

    records = [rec("b", "b:0", "loop", None, [1] * 4, 0.4), rec("b", "b:0", "hf", None, [1] * 4, 0.2),
               rec("b", "b:0", "draft", "d", [2, 2], 0.1, match=True, offline_lengths=[2, 2]),
               rec("b", "b:1", "loop", None, [1] * 4, 0.4), rec("b", "b:1", "hf", None, [1] * 4, 0.2),
               rec("b", "b:1", "draft", "d", [4], 0.2, match=False, offline_lengths=[3, 1])]
    res = summarize(records, ["b"], {"d": 4})
    s = res["summary"]["d"]["b"]
    assert s["tau"] == pytest.approx(8 / 3) and s["tau_per_sample_mean"] == pytest.approx(3.0)
    assert s["time_per_output_token"] == pytest.approx((0.1 * 5 + 0.2 * 5) / 10)
    assert s["speedup"] == pytest.approx(0.4 / 0.15) and s["speedup_hf"] == pytest.approx(0.2 / 0.15)
    assert s["greedy_mismatches"] == 1 and s["mismatch_ids"] == ["b:1"]
    assert s["offline_agree"] == 1 and s["offline_samples"] == 2 and s["offline_tau"] == 2.0
    assert res["mean"]["d"]["speedup"] == pytest.approx(s["speedup"])
    assert res["baseline"]["b"]["loop"]["tau"] == 1.0


def test_drafter_names_are_directory_names_made_unique():
    assert drafter_names(["runs/sft/final", "runs/opd/final/", "x/draft"]) == ["sft/final", "opd/final", "draft"]
    assert drafter_names(["a/final", "a/final"]) == ["final#1", "final#2"]


# ---- end to end on the embedded SmolLM2 ----

@pytest.fixture(scope="module")
def run(smollm, tmp_path_factory):
    """2 random drafters (seeds 0, 1) x 3 benchmarks x 1 prompt (+ MT-Bench turn 2), greedy, 6 tokens."""
    root = tmp_path_factory.mktemp("eval")
    for seed, name in enumerate(DRAFTERS):
        save_drafter(init_drafter(smollm, num_layers=1, block_size=8, seed=seed), root / name)
    drafters = {name: load_drafter(root / name) for name in DRAFTERS}
    results = evaluate(smollm, drafters, BENCHES, samples=1, max_new_tokens=NEW_TOKENS, out_dir=root / "out",
                       progress=False)
    return root, results


def test_eval_writes_results_table_and_plots(run):
    root, results = run
    out = root / "out"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"] == results["summary"]
    assert set(on_disk) == {"config", "baseline", "summary", "mean", "offline_rollouts", "samples"}
    assert list(on_disk["summary"]) == list(DRAFTERS)
    ids = ["gsm8k:0", "humaneval:0", "mt-bench:0", "mt-bench:0:turn2"]
    assert [r["id"] for r in on_disk["samples"]] == [i for i in ids for _ in range(2 + len(DRAFTERS))]
    assert len((out / SAMPLES).read_text().splitlines()) == len(on_disk["samples"])
    for name in DRAFTERS:
        for bench in BENCHES:
            s = on_disk["summary"][name][bench]
            assert s["greedy_mismatches"] == 0, s["mismatch_ids"]
            assert s["samples"] == (2 if bench == "mt-bench" else 1)
            assert sum(s["acceptance_histogram"]) == s["steps"] and len(s["offset_acceptance"]) == 7
            assert s["speedup"] > 0 and s["speedup_hf"] > 0 and s["tokens_per_s"] > 0
    for r in on_disk["samples"]:
        assert 0 < r["num_output_tokens"] <= NEW_TOKENS and len(r["output_ids"]) == r["num_output_tokens"]

    table = (out / "results.md").read_text().split("\n\n")[3].splitlines()  # the first paper-style table
    assert table[0] == "| Drafter | " + " | ".join(BENCHES) + " | Mean |"
    assert [row.split(" | ")[0] for row in table[2:]] == [f"| {n}" for n in DRAFTERS]
    assert all(row.count(" / ") == len(BENCHES) + 1 for row in table[2:])
    for plot in PLOTS:
        data = (out / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_mt_bench_turn_two_has_the_target_answer_as_history(smollm, run):
    _, results = run
    by = {(r["id"], r["method"]): r for r in results["samples"]}
    answer = smollm.tokenizer.decode(by["mt-bench:0", "loop"]["output_ids"], skip_special_tokens=True).strip()
    prompt = smollm.tokenizer.decode(by["mt-bench:0:turn2", "loop"]["prompt_ids"])
    question = load_prompts("mt-bench[:1]")[0].turns[1]
    assert answer and prompt.index(answer) < prompt.index(question)


def test_a_later_turn_past_max_prompt_tokens_ends_the_conversation(smollm, smol_drafter, tmp_path):
    """With --max-prompt-tokens, a second turn whose history passes it is not run (the first is),
    and the results are still summarised."""
    first = len(apply_chat_template(smollm.tokenizer, load_prompts("mt-bench[:1]")[0].messages))
    res = evaluate(smollm, {"d": smol_drafter}, ["mt-bench"], samples=1, max_new_tokens=4,
                   max_prompt_tokens=first + 2, out_dir=tmp_path / "out", progress=False)
    assert sorted({r["id"] for r in res["samples"]}) == ["mt-bench:0"]
    assert res["summary"]["d"]["mt-bench"]["samples"] == 1


def test_offline_tau_over_decoded_text_equals_decoded_tau(run):
    _, results = run
    drafted = [r for r in results["samples"] if r["method"] == "draft"]
    assert drafted and all(r["offline_lengths"] == r["acceptance_lengths"] for r in drafted)
    for per_bench in results["summary"].values():
        for s in per_bench.values():
            assert s["offline_samples"] == s["offline_agree"] == s["samples"]
            assert s["offline_tau"] == s["tau"]


def test_cli_resume_after_a_kill_and_offline_rollouts(smollm, run, tmp_path, capsys):
    """A copy of the run with its last line cut mid-write: --resume re-decodes only that run,
    and offline tau on rollouts of the target-alone outputs equals the decoded tau."""
    root, results = run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    lines = (out / SAMPLES).read_text().splitlines(keepends=True)
    (out / SAMPLES).write_text("".join(lines[:-1]) + lines[-1][:40])
    rollouts = [Rollout(r["id"], r["prompt_ids"], r["output_ids"], "length", {})
                for r in results["samples"] if r["method"] == "loop"]
    write_rollouts(tmp_path / "rollouts", {"target": smollm.identity}, rollouts)

    rc = main(["eval", "--draft", str(root / DRAFTERS[0]), "--draft", str(root / DRAFTERS[1]),
               "--bench", ",".join(BENCHES), "--samples", "1", "--max-new-tokens", str(NEW_TOKENS),
               "--out", str(out), "--dtype", "fp32", "--resume", "--offline-rollouts", str(tmp_path / "rollouts")])
    assert rc == 0, capsys.readouterr().err
    resumed = json.loads((out / "results.json").read_text())
    assert len((out / SAMPLES).read_text().splitlines()) == len(lines)
    assert [r["output_ids"] for r in resumed["samples"]] == [r["output_ids"] for r in results["samples"]]
    for name in DRAFTERS:
        drafted = [r for r in resumed["samples"] if r["drafter"] == name]
        decoded = sum(map(sum, (r["acceptance_lengths"] for r in drafted))) / sum(
            len(r["acceptance_lengths"]) for r in drafted)
        assert resumed["offline_rollouts"][name]["tau"] == pytest.approx(decoded, abs=1e-12)
    assert "Offline τ on cached rollouts" in (out / "results.md").read_text()


# ---- errors ----

def test_unknown_benchmark_lists_the_known_ones(smollm, smol_drafter, tmp_path):
    with pytest.raises(DraftOPDError, match=r"'nope'.*gsm8k, humaneval, mt-bench"):
        evaluate(smollm, {"d": smol_drafter}, ["gsm8k", "nope"], samples=1, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_empty_benchmark_and_bad_samples(smollm, smol_drafter, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "a long question " * 20}) + "\n")
    for bench, kw in ((str(long), {"max_prompt_tokens": 16}), ("gsm8k[5000:]", {})):
        with pytest.raises(DraftOPDError, match="no prompts left"):
            evaluate(smollm, {"d": smol_drafter}, [bench], samples=1, out_dir=tmp_path / "out", **kw)
    with pytest.raises(DraftOPDError, match="samples must be positive"):
        evaluate(smollm, {"d": smol_drafter}, ["gsm8k"], samples=0, out_dir=tmp_path / "out")


def test_drafter_recorded_for_another_target_is_refused(smollm, tmp_path):
    draft = init_drafter(smollm, num_layers=1, block_size=4, seed=2)
    draft.config.draftopd = {"target": "someone/other-model"}
    with pytest.raises(DraftOPDError, match="made for target 'someone/other-model', not 'HuggingFaceTB"):
        evaluate(smollm, {"d": draft}, ["gsm8k"], samples=1, out_dir=tmp_path / "out")


def test_cli_errors_are_one_line(tmp_path, capsys):
    small = save_drafter(tiny_drafter(tiny_target("qwen3")), tmp_path / "tiny")
    assert main(["eval", "--draft", str(small), "--bench", "gsm8k", "--samples", "1",
                 "--out", str(tmp_path / "eval")]) == 2
    err = without_dtype_notice(capsys.readouterr().err)
    assert "\n" not in err and "does not fit target" in err and "hidden_size 64 != target hidden_size 576" in err
    assert main(["eval", "--draft", str(small), "--samples", "0"]) == 2
    assert "--samples must be positive" in capsys.readouterr().err
    assert main(["eval", "--draft", str(small), "--name", "a", "--name", "b"]) == 2
    assert "--name must be given once per --draft" in capsys.readouterr().err


def test_tau_ratio_interval_is_paired_over_prompts():
    from draftopd.evaluation.metrics import tau_ratio

    base = [(10, 10), (30, 10), (20, 10), (15, 10)]  # tau 1.0-3.0 per prompt
    better = [(int(t * 1.1), s) for t, s in base]  # 10% more tokens per step on every prompt
    ratio, lo, hi = tau_ratio(better, base)
    assert ratio == pytest.approx(75 / 75 * 1.1, rel=0.02)
    assert lo > 1.05 and lo <= ratio <= hi and hi < 1.15  # paired: prompt difficulty cancels, the interval is narrow
    mixed = [(12, 10), (27, 10), (24, 10), (12, 10)]  # better on half the prompts, worse on the others
    _, lo, hi = tau_ratio(mixed, base)
    assert lo < 1.0 < hi
    with pytest.raises(ValueError, match="same non-empty prompts"):
        tau_ratio(base[:2], base)


def test_tau_ratio_over_seeds_widens_when_one_training_run_disagrees():
    from draftopd.evaluation.metrics import tau_ratio

    base = [(10, 10), (30, 10), (20, 10), (15, 10)]
    better = [(int(t * 1.1), s) for t, s in base]
    _, lo, _ = tau_ratio([better, better, better], [base, base, base])
    assert lo > 1.05  # every seed 10% better: the interval stays clear of 1
    ratio, lo, hi = tau_ratio([better, better, base], [base, base, base])  # one seed gained nothing
    assert lo <= 1.0 < ratio < hi


def test_adaptive_and_tree_verify_run_beside_full_blocks_and_stay_lossless(smollm, tmp_path):
    """--verify full,adaptive,tree on the shipped drafter: the twins measure this machine's costs
    (the tree's up to 2B tokens), decode the same greedy text, and are not walked (walks verify
    whole blocks); the tree commits more per step than the chain."""
    shipped = load_drafter("smollm2-135m-dflash")
    B = shipped.block_size
    results = evaluate(smollm, {"shipped": shipped}, ["gsm8k"], samples=1, max_new_tokens=24, out_dir=tmp_path / "out",
                       progress=False, verify="full,adaptive,tree")
    assert list(results["summary"]) == ["shipped", "shipped adaptive", "shipped tree"]
    costs = results["config"]["verify_costs"]
    assert costs["shipped"] is None and len(costs["shipped adaptive"]["verify_ms"]) == B
    assert len(costs["shipped tree"]["verify_ms"]) == 2 * B
    assert results["config"]["tree_tokens"] == {"shipped": None, "shipped adaptive": None, "shipped tree": 2 * B}
    assert all(t > 0 for t in costs["shipped adaptive"]["verify_ms"]) and costs["shipped adaptive"]["draft_ms"] > 0
    full, adaptive, tree = (results["summary"][n]["gsm8k"] for n in ("shipped", "shipped adaptive", "shipped tree"))
    assert full["greedy_mismatches"] == adaptive["greedy_mismatches"] == tree["greedy_mismatches"] == 0
    assert full["verify_size"] > 1 and 1 <= adaptive["verify_size"] <= B and 1 <= tree["verify_size"] <= 2 * B
    assert full["rest_share"] == 0 and 0 <= adaptive["rest_share"] < 1  # only the costed policies let the drafter rest
    assert full["branch_share"] == 0 and tree["branch_share"] > 0 and tree["tau"] > full["tau"]
    runs = {r["drafter"]: r for r in results["samples"] if r["method"] == "draft"}
    assert runs["shipped"]["output_ids"] == runs["shipped adaptive"]["output_ids"] == runs["shipped tree"]["output_ids"]
    assert runs["shipped adaptive"]["offline_lengths"] is None and runs["shipped"]["offline_lengths"] is not None
    assert "Tree verify (shipped tree: up to 8 tokens)" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(DraftOPDError, match="verify: expected one of full, adaptive, tree"):
        evaluate(smollm, {"shipped": shipped}, ["gsm8k"], samples=1, out_dir=tmp_path / "bad", verify="sometimes")
    with pytest.raises(DraftOPDError, match="'a adaptive' is already a drafter's name"):
        evaluate(smollm, {"a": shipped, "a adaptive": shipped}, ["gsm8k"], samples=1, out_dir=tmp_path / "clash",
                 verify="both")
    with pytest.raises(DraftOPDError, match="greedy-only"):
        evaluate(smollm, {"a": shipped}, ["gsm8k"], samples=1, out_dir=tmp_path / "hot", verify="tree", temperature=0.7)
    assert not (tmp_path / "hot").exists()
    assert not (tmp_path / "bad").exists() and not (tmp_path / "clash").exists()  # refused before writing
