"""benchmarks/compare_drafters.py: its chain walk is the exact walk (tested equal to decoding
elsewhere), and its report pairs each drafter with the first over the same texts."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_drafter
from draftopd.data.prompts import apply_chat_template
from draftopd.data.rollouts import Rollout
from draftopd.evaluation.bench import TokenSequence
from draftopd.model.checkpoint import load_drafter, save_drafter
from draftopd.model.target import load_target
from draftopd.training.onpolicy import offline_walks

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(BENCHMARKS))  # it imports verify_policy, beside it
    spec = importlib.util.spec_from_file_location("compare_drafters", BENCHMARKS / "compare_drafters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCHMARKS))


def test_chain_walk_is_the_exact_walk_of_the_shipped_drafter(compare, smollm):
    draft = load_drafter("smollm2-135m-dflash", dtype=torch.float32)
    sequences = []
    for question in ("What is 12 times 7?", "Name three colours."):
        prompt = torch.tensor([apply_chat_template(smollm.tokenizer, [{"role": "user", "content": question}])])
        text = smollm.model.generate(prompt, max_new_tokens=24, do_sample=False)[0]
        sequences.append(TokenSequence(text, prompt.shape[1]))
    table = compare.anchor_table(draft, smollm.model, sequences)
    chain = [compare.tree_walk(t, 0) for t in table]
    assert chain == [(sum(w.lengths), len(w.lengths)) for w in offline_walks(draft, smollm.model, sequences)]
    assert all(tokens == len(s.ids) - 1 - s.prompt_len for (tokens, _), s in zip(chain, sequences))
    for nodes in (2, 8):  # every step of a tree walk commits 1..B tokens, the anchor's token included
        for text, seq in zip(table, sequences):
            tokens, steps = compare.tree_walk(text, nodes)
            assert tokens == len(seq.ids) - 1 - seq.prompt_len and steps <= tokens <= steps * draft.block_size
    assert compare.task_of(Rollout("mt-bench:81:turn2", [1], [2], "stop")) == "mt-bench turn 2"
    assert compare.task_of(Rollout("hf:openai/gsm8k:main:test:3", [1], [2], "stop")) == "hf:openai/gsm8k:main:test"
    assert compare.task_of(Rollout("x:4", [1], [2], "stop", {"source": "gsm8k", "turn": 1})) == "gsm8k"


def test_report_pairs_each_drafter_with_the_first(compare, tiny_dir, tiny_rollouts, tmp_path, capsys, monkeypatch):
    target = load_target(str(tiny_dir), dtype="fp32")
    paths = []
    for seed in (1, 2):
        paths.append(str(save_drafter(tiny_drafter(target.model, seed=seed), tmp_path / f"d{seed}")))
    monkeypatch.setattr(sys, "argv", ["compare_drafters.py", "--rollouts", str(tiny_rollouts), "--target",
                                      str(tiny_dir), "--draft", paths[0], "--draft", paths[1], "--draft", paths[0],
                                      "--trees", "3"])
    compare.main()
    out = capsys.readouterr().out
    assert "12 held-out texts" in out and "chain, whole blocks:" in out and "tree, 3 tokens:" in out
    # the first drafter again, last: the same walks, so ratio 1 with no spread, in both sections
    lines = out.splitlines()
    again = [lines[i + 1] for i, line in enumerate(lines) if line.startswith(f"  {paths[0]}:")][1::2]
    assert len(again) == 2 and all(line.startswith("    / first: all 1.000 (1.000-1.000)") for line in again)
    monkeypatch.setattr(sys, "argv", ["compare_drafters.py", "--rollouts", str(tiny_rollouts), "--draft", paths[0],
                                      "--trees", "1"])
    with pytest.raises(SystemExit):
        compare.main()
    assert "at least one draft (>= 2 tokens)" in capsys.readouterr().err
