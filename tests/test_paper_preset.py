"""`draftopd eval --bench paper`: the paper's seven tasks at its counts, a one-line refusal when the
Hub tasks cannot be had, the local tasks alone with --skip-unavailable, and results.md laid out like
the paper's table beside its published rows."""

import importlib.machinery
import json
import sys
import types

import pytest

from helpers import without_dtype_notice
from draftopd.cli.evaluate import _benches
from draftopd.cli.main import build_parser, main
from draftopd.data.prompts import hub_dataset, load_prompts
from draftopd.errors import DraftOPDError
from draftopd.evaluation.bench import hub_problems
from draftopd.evaluation.paper import PUBLISHED, TASKS, paper_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAPER = {"GSM8K": 128, "MATH-500": 128, "AIME25": 30, "MBPP": 128, "HumanEval": 164, "SWE-Lite": 128,
         "MT-Bench": 80}  # REFERENCE_RESULTS.md, "Evaluation samples"
HUB_TASKS = ["MATH-500", "MBPP", "SWE-Lite"]
LOCAL = [t for t in TASKS if t.name not in HUB_TASKS]


def _fake_datasets(monkeypatch, load_dataset):
    """A `datasets` module that importlib finds, with `load_dataset` replaced."""
    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


@pytest.fixture
def hub_unreachable(monkeypatch):
    """HF_HUB_OFFLINE set and nothing cached: `datasets` fails to load any Hub dataset, as it does then."""
    def load_dataset(name, config, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (offline mode is enabled)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_datasets(monkeypatch, load_dataset)


def test_preset_expands_to_the_papers_seven_tasks_and_counts():
    assert [(t.name, t.samples) for t in TASKS] == list(PAPER.items())
    args = build_parser().parse_args(["eval", "--draft", "d", "--bench", "paper"])
    benches, samples, preset = _benches(args)
    assert preset == "paper" and benches == [t.bench for t in TASKS]
    assert samples == {t.bench: PAPER[t.name] for t in TASKS}
    args = build_parser().parse_args(["eval", "--draft", "d", "--bench", "paper", "--samples", "3"])
    assert _benches(args)[1] == dict.fromkeys(benches, 3) == paper_samples(3)
    plain = build_parser().parse_args(["eval", "--draft", "d", "--bench", "gsm8k,mt-bench"])
    assert _benches(plain) == (["gsm8k", "mt-bench"], 8, None)
    with pytest.raises(DraftOPDError, match="--bench paper stands alone"):
        _benches(build_parser().parse_args(["eval", "--draft", "d", "--bench", "paper,gsm8k"]))

    assert {t.name: hub_dataset(t.bench) for t in TASKS if hub_dataset(t.bench)} == {
        "MATH-500": "HuggingFaceH4/MATH-500", "MBPP": "google-research-datasets/mbpp",
        "SWE-Lite": "princeton-nlp/SWE-bench_Lite"}
    for task in LOCAL:  # packaged locally, with at least the paper's count
        assert len(load_prompts(f"{task.bench}[:{task.samples}]")) == task.samples, task.name


def test_published_rows_are_the_reference_table():
    """The means the paper prints agree with its per-task speedups (a mistyped cell would not)."""
    assert [p.drafter for p in PUBLISHED] == ["DFlash", "Draft-OPD"]
    assert PUBLISHED[0].speedups == (5.36, 6.35, 5.93, 5.00, 5.19, 3.05, 3.01)
    assert PUBLISHED[1].speedups == (6.22, 7.22, 6.39, 5.40, 5.65, 3.18, 3.09)
    assert [(p.mean_speedup, p.mean_tau) for p in PUBLISHED] == [(4.84, 6.04), (5.31, 6.60)]
    for p in PUBLISHED:
        assert len(p.speedups) == len(TASKS) and sum(p.speedups) / len(TASKS) == pytest.approx(p.mean_speedup,
                                                                                               abs=0.005)


def test_hf_source_field_names_the_prompt(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"problem": f"p{i}", "solution": "s"} for i in range(3)]

    _fake_datasets(monkeypatch, load_dataset)
    prompts = load_prompts("hf:HuggingFaceH4/MATH-500:test#problem[:2]")
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]
    assert [p.messages for p in prompts] == [[{"role": "user", "content": f"p{i}"}] for i in range(2)]
    with pytest.raises(DraftOPDError, match=r"row 0: no non-empty string field 'question'; it has problem, solution"):
        load_prompts("hf:owner/set:test#question")
    with pytest.raises(DraftOPDError, match=r"expected hf:owner/name\[:config\]\[:split\]\[#field\]"):
        load_prompts("hf:owner/set:test#")
    assert hub_dataset("hf:owner/set:main:test#text[:5]") == "owner/set" and hub_dataset("gsm8k[:5]") is None


def test_hub_check_names_what_is_missing_and_why(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    benches = [t.bench for t in TASKS]
    hub = [t.bench for t in TASKS if t.name in HUB_TASKS]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    assert list(hub_problems(benches)) == hub
    assert all("pip install 'draftopd[hub]'" in why for why in hub_problems(benches).values())

    asked = []

    def no_network(self, repo_id, timeout=None):
        asked.append((repo_id, timeout))
        raise OSError("Network is unreachable")

    _fake_datasets(monkeypatch, lambda *a: pytest.fail("the check must not download"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    problems = hub_problems(benches)
    assert list(problems) == hub and all("did not answer within 4 s" in why for why in problems.values())
    assert [t for _, t in asked] == [4.0] * 3 and [r for r, _ in asked] == [hub_dataset(b) for b in hub]

    def answers(self, repo_id, timeout=None):
        if repo_id == "google-research-datasets/mbpp":
            raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
        return object()

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", answers)
    assert hub_problems(benches) == {}  # the Hub answered; a wrong id is for loading to report


def test_default_refuses_in_one_line_and_writes_nothing(hub_unreachable, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--draft", "smollm2-135m-dflash", "--bench", "paper", "--samples", "1", "--max-new-tokens",
                 "4", "--out", str(out)]) == 2  # a few seconds even if the refusal breaks
    err = without_dtype_notice(capsys.readouterr().err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("draftopd eval: error: cannot read MATH-500, MBPP, SWE-Lite from the Hugging Face Hub: ")
    assert "HF_HUB_OFFLINE is set" in err and "--skip-unavailable" in err
    assert not out.exists()


def test_skip_unavailable_runs_the_local_tasks_in_the_papers_layout(hub_unreachable, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--draft", "smollm2-135m-dflash", "--bench", "paper", "--skip-unavailable", "--samples", "1",
               "--max-new-tokens", "4", "--dtype", "fp32", "--out", str(out)])
    err = without_dtype_notice(capsys.readouterr().err)
    assert rc == 0, err
    assert [line for line in err.splitlines() if "skipping" in line] == [
        "draftopd eval: skipping MATH-500, MBPP, SWE-Lite: HF_HUB_OFFLINE is set and they are not in the local "
        "cache (unset it to download)"]

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["preset"] == "paper"
    assert results["config"]["benchmarks"] == [t.bench for t in LOCAL]
    assert results["config"]["samples"] == {t.bench: 1 for t in LOCAL}

    md = (out / "results.md").read_text()
    table = next(block for block in md.split("\n\n") if block.startswith("| Drafter")).splitlines()
    assert table[0] == "| Drafter | " + " | ".join(PAPER) + " | Mean |"
    ours = table[2].strip("| ").split(" | ")
    assert ours[0] == "smollm2-135m-dflash" and len(ours) == len(TASKS) + 2
    for task, cell in zip(TASKS, ours[1:]):
        if task.name in HUB_TASKS:
            assert cell == "—", task.name
        else:
            assert cell.endswith(" / " + f"{results['summary']['smollm2-135m-dflash'][task.bench]['tau']:.2f}")
    assert table[3:] == [
        "| DFlash (published, Qwen3-4B, H200) | 5.36× / – | 6.35× / – | 5.93× / – | 5.00× / – | 5.19× / – "
        "| 3.05× / – | 3.01× / – | 4.84× / 6.04 |",
        "| Draft-OPD (published, Qwen3-4B, H200) | 6.22× / – | 7.22× / – | 6.39× / – | 5.40× / – | 5.65× / – "
        "| 3.18× / – | 3.09× / – | 5.31× / 6.60 |"]
    assert "Not run here (—): MATH-500, MBPP, SWE-Lite" in md
