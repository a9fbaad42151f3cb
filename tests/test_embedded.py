"""End to end on the real embedded SmolLM2-135M: lossless decoding on chat prompts, and the CLI.

Greedy speculative decoding must reproduce `target.model.generate(do_sample=False)` token for
token on real chat-templated prompts, including one that ends with EOS. The CLI tests go
through `draftopd.cli.main.main([...])`, as a user's shell would.
"""

import json

import pytest
import torch
from safetensors import safe_open

from helpers import tiny_drafter, tiny_target, without_dtype_notice
from draftopd.cli.main import main
from draftopd.data.prompts import apply_chat_template, load_prompts
from draftopd.decoding.speculative import spec_generate
from draftopd.model.checkpoint import load_drafter, save_drafter
from draftopd.model.target import stop_token_ids

N_NEW = 24
SETS = "gsm8k[:1],humaneval[:1],mt-bench[:1]"
# Short enough that SmolLM2 answers and emits EOS well within N_NEW tokens.
EOS_PROMPT = "What is the capital of France? Answer in one word."
CLI_PROMPT = "Name three primary colors."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts(smollm, tmp_path_factory):
    """Chat-templated ids of one prompt per embedded set, plus a short one from a JSONL file."""
    path = tmp_path_factory.mktemp("prompts") / "short.jsonl"
    path.write_text(json.dumps({"prompt": EOS_PROMPT}) + "\n")
    loaded = load_prompts(f"{SETS},{path}")
    return {p.id.rsplit("/", 1)[-1]: torch.tensor([apply_chat_template(smollm.tokenizer, p.messages)])
            for p in loaded}


@pytest.fixture(scope="module")
def reference(smollm, prompts):
    """HF greedy generation per prompt (computed once), stopping on the same EOS ids."""
    stops = smollm.stop_token_ids
    done = {}

    def get(name):
        if name not in done:
            done[name] = smollm.model.generate(prompts[name], do_sample=False, max_new_tokens=N_NEW,
                                               eos_token_id=stops, pad_token_id=smollm.tokenizer.pad_token_id)
        return done[name]

    return get


PROMPT_IDS = ["gsm8k:0", "humaneval:0", "mt-bench:0", "short.jsonl:0"]


def test_prompt_ids_and_eos_case(prompts, reference, smollm):
    assert sorted(prompts) == sorted(PROMPT_IDS)
    stops = smollm.stop_token_ids
    assert stops == [2]  # <|im_end|>
    ended = reference("short.jsonl:0")[0, prompts["short.jsonl:0"].shape[1]:].tolist()
    assert ended[-1] in stops and len(ended) < N_NEW  # the EOS case really is one
    for name in PROMPT_IDS[:3]:  # and the long ones really run to the token limit
        assert reference(name).shape[1] == prompts[name].shape[1] + N_NEW


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("name", PROMPT_IDS)
def test_greedy_spec_generate_equals_hf_generate(smollm, smol_drafter, prompts, reference, name, block_size):
    ids, ref = prompts[name], reference(name)
    stops = smollm.stop_token_ids
    res = spec_generate(smol_drafter, smollm, ids, N_NEW, stop_token_ids=stops, block_size=block_size)
    assert res.output_ids.tolist() == ref.tolist()
    assert res.num_output_tokens == ref.shape[1] - ids.shape[1]
    assert sum(res.acceptance_lengths) == res.num_output_tokens - 1  # first token: the prefill's
    assert all(1 <= a <= block_size for a in res.acceptance_lengths)


class ScriptedDrafter:
    """The real drafter runs (shapes, caches, positions), but its proposals come from a script:
    the target's own greedy continuation, made wrong at every `every`-th position. Blocks are
    then accepted partly, which exercises cropping the real KV cache mid-block."""

    def __init__(self, draft, script: torch.Tensor, every: int = 5):
        self.draft, self.script, self.every = draft, script, every

    def __getattr__(self, name):
        return getattr(self.draft, name)

    def __call__(self, *args, block_positions, **kwargs):
        self.positions = block_positions[0, 1:]
        return self.draft(*args, block_positions=block_positions, **kwargs)

    def compute_logits(self, hidden, head):
        vocab = head.weight.shape[0]
        positions = self.positions[: hidden.shape[0]]  # the rows being scored may be fewer than drafted
        ids = self.script[positions].clone()
        wrong = positions % self.every == 0
        ids[wrong] = (ids[wrong] + 1) % vocab
        logits = torch.zeros(len(ids), vocab)
        logits[torch.arange(len(ids)), ids] = 1.0
        return logits


@pytest.mark.parametrize("name", ["gsm8k:0", "short.jsonl:0"])
def test_partially_accepted_blocks_equal_hf_generate(smollm, smol_drafter, prompts, reference, name):
    ids, ref = prompts[name], reference(name)
    script = torch.cat([ref[0], torch.zeros(32, dtype=torch.long)])
    draft = ScriptedDrafter(smol_drafter, script)
    stops = smollm.stop_token_ids
    res = spec_generate(draft, smollm, ids, N_NEW, stop_token_ids=stops, block_size=16)
    assert res.output_ids.tolist() == ref.tolist()
    assert res.num_output_tokens > 6  # several blocks, or the next line would prove little
    assert max(res.acceptance_lengths) >= 3 and len(set(res.acceptance_lengths)) > 1


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "draft"
    assert main(["init-draft", "--out", str(out), "--num-layers", "1", "--block-size", "8", "--dtype", "fp32"]) == 0
    return out


def test_init_draft_loads_everywhere(smollm, tmp_path, capsys):
    out = tmp_path / "draft"
    assert main(["init-draft", "--out", str(out), "--num-layers", "1", "--block-size", "8", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "mask_token_id=16 (<empty_output>)" in printed

    config = json.loads((out / "config.json").read_text())
    assert config["block_size"] == 8 and config["num_hidden_layers"] == 1
    assert config["num_target_layers"] == 30
    assert config["dflash_config"]["target_layer_ids"] == [15]  # recorded, not left to a fallback
    assert config["dflash_config"]["mask_token_id"] == 16
    tok = smollm.tokenizer
    assert tok.convert_ids_to_tokens(16) == "<empty_output>"
    assert 16 not in {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}  # not EOS/pad (2)

    ours = load_drafter(out)
    assert (ours.block_size, ours.mask_token_id, ours.target_layer_ids) == (8, 16, [15])

    from transformers import AutoModel

    remote = AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert type(remote).__module__.endswith("dflash")  # the bundled code, not draftopd's
    assert (remote.block_size, remote.mask_token_id, remote.target_layer_ids) == (8, 16, [15])
    state = ours.state_dict()
    assert set(remote.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in remote.state_dict().items())

    # The bundled decoding code is self-contained and lossless too.
    ids = torch.tensor([apply_chat_template(tok, [{"role": "user", "content": EOS_PROMPT}])])
    stops = stop_token_ids(tok, smollm.model.generation_config)
    got = remote.spec_generate(smollm.model, ids, 10, stop_token_ids=stops)
    ref = smollm.model.generate(ids, do_sample=False, max_new_tokens=10, eos_token_id=stops,
                                pad_token_id=tok.pad_token_id)
    assert got.tolist() == ref.tolist()
    assert remote.spec_generate(smollm.model, ids, 10, stop_token_ids=stops, tree_tokens=16).tolist() == ref.tolist()


def test_generate_json_equals_greedy(smollm, draft_dir, capsys):
    assert main(["generate", "--draft", str(draft_dir), "--max-new-tokens", "12", "--dtype", "fp32", "--json",
                 CLI_PROMPT]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert {"output_ids", "acceptance_lengths", "text"} <= set(got)

    tok = smollm.tokenizer
    ids = torch.tensor([apply_chat_template(tok, [{"role": "user", "content": CLI_PROMPT}])])
    stops = stop_token_ids(tok, smollm.model.generation_config)
    ref = smollm.model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=stops,
                                pad_token_id=tok.pad_token_id)
    assert got["output_ids"] == ref[0].tolist()
    new = ref[0, ids.shape[1]:].tolist()
    assert got["text"] == tok.decode(new, skip_special_tokens=True)
    assert sum(got["acceptance_lengths"]) == len(new) - 1
    assert all(1 <= a <= 8 for a in got["acceptance_lengths"])
    # tree verify (the default when greedy): each step verified 1..2B tokens and committed no more than that
    assert len(got["verify_sizes"]) == len(got["acceptance_lengths"])
    assert all(a <= s <= 16 for a, s in zip(got["acceptance_lengths"], got["verify_sizes"]))
    assert 0 <= got["rest_steps"] < len(got["verify_sizes"])
    assert 0 <= got["branch_steps"] <= len(got["verify_sizes"])


def test_export_bf16_keeps_keys(draft_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--draft", str(draft_dir), "--out", str(out), "--dtype", "bf16"]) == 0
    assert "exported" in capsys.readouterr().out
    with safe_open(str(draft_dir / "model.safetensors"), "pt") as src, safe_open(str(out / "model.safetensors"), "pt") as dst:
        assert set(dst.keys()) == set(src.keys()) and len(src.keys()) > 0
        for k in src.keys():
            t = dst.get_tensor(k)
            assert t.dtype == torch.bfloat16, k
            assert torch.equal(t, src.get_tensor(k).to(torch.bfloat16)), k
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert (out / "dflash.py").exists()
    reloaded = load_drafter(out)
    assert all(p.dtype == torch.bfloat16 for p in reloaded.parameters())


def test_export_block_size_changes_only_the_served_block(draft_dir, tmp_path, capsys):
    out = tmp_path / "b4"
    assert main(["export", "--draft", str(draft_dir), "--out", str(out), "--block-size", "4", "--dtype", "fp32"]) == 0
    assert "block size 4" in capsys.readouterr().out
    src, dst = json.loads((draft_dir / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert src["block_size"] != 4 and dst["block_size"] == 4
    assert {k: v for k, v in dst.items() if k != "block_size"} == {k: v for k, v in src.items() if k != "block_size"}
    assert load_drafter(out).block_size == 4
    assert main(["export", "--draft", str(draft_dir), "--out", str(tmp_path / "b1"), "--block-size", "1"]) == 2
    assert "--block-size 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def foreign_draft_dir(tmp_path_factory):
    """A drafter built for a tiny random Qwen3 (hidden size 64), not for SmolLM2 (576)."""
    target = tiny_target("qwen3")
    return save_drafter(tiny_drafter(target), tmp_path_factory.mktemp("foreign") / "draft")


BAD_INPUTS = {
    "unknown alias": (lambda d, f, tmp: ["init-draft", "--out", str(tmp / "x"), "--target", "smollm2-999m"],
                      "init-draft", "neither an embedded alias"),
    "missing target dir": (lambda d, f, tmp: ["generate", "--draft", str(d), "--target", str(tmp / "nope"), "hi"],
                           "generate", "no such directory"),
    "missing draft dir": (lambda d, f, tmp: ["generate", "--draft", str(tmp / "nope"), "hi"],
                          "generate", "no such directory"),
    "zero max-new-tokens": (lambda d, f, tmp: ["generate", "--draft", str(d), "--max-new-tokens", "0", "hi"],
                            "generate", "max_new_tokens must be positive"),
    "negative max-new-tokens": (lambda d, f, tmp: ["generate", "--draft", str(d), "--max-new-tokens", "-3", "hi"],
                                "generate", "max_new_tokens must be positive"),
    "drafter for another target": (lambda d, f, tmp: ["generate", "--draft", str(f), "hi"],
                                   "generate", "drafter hidden_size 64 != target hidden_size 576"),
    "export missing draft": (lambda d, f, tmp: ["export", "--draft", str(tmp / "nope"), "--out", str(tmp / "o")],
                             "export", "no such directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, draft_dir, foreign_draft_dir, tmp_path, capsys):
    build, command, message = BAD_INPUTS[case]
    assert main(build(draft_dir, foreign_draft_dir, tmp_path)) == 2
    captured = capsys.readouterr()
    err = without_dtype_notice(captured.err)
    assert len(err.splitlines()) == 1, captured.err
    assert err.startswith(f"draftopd {command}: error: ") and message in err, err
    assert captured.out == ""


def test_target_dir_without_model_exits_2(draft_dir, tmp_path, capsys):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert main(["generate", "--draft", str(draft_dir), "--target", str(empty), "hi"]) == 2
    assert without_dtype_notice(capsys.readouterr().err).startswith("draftopd generate: error: target ")
