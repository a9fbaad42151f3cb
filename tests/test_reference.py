"""Against the reference implementation: the `dflash` package (PyPI 0.1.0, z-lab, MIT).

`scripts/bootstrap.py` installs it `--no-deps` (its pins would replace transformers). A
drafter we save loads in its DFlashDraftModel with no missing or unexpected keys and its
`dflash_generate` decodes the same tokens with the same acceptance lengths as our
`spec_generate`; a drafter its class saves runs in ours identically; its forward keywords
work on ours. The drafters are first trained on the text they will decode, so drafts do get
accepted (acceptance above 1) and the comparison covers accepted blocks, not just rejections;
on SmolLM2 a scripted drafter (the target's own text, wrong at every 5th position) also takes
both loops through blocks accepted 4 drafts deep.

Its decoding differs from ours in one place: in the last step, when fewer than B positions
remain, it drafts only those while we draft a full block as training and serving engines
do; that step's acceptance may then differ (the tokens cannot: both are lossless).
"""

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from helpers import tiny_drafter, tiny_target
from draftopd.data.prompts import apply_chat_template, load_prompts
from draftopd.decoding.speculative import spec_generate
from draftopd.model.checkpoint import init_drafter, load_drafter, save_drafter
from draftopd.training.blocks import block_labels, replay
from draftopd.training.target_pass import target_states

reference = pytest.importorskip("dflash.model", reason="the reference package: pip install --no-deps dflash==0.1.0")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def cpu_timer(monkeypatch):
    """dflash_generate times itself with torch.cuda.synchronize(); a CPU build has no CUDA."""
    monkeypatch.setattr(reference, "_cuda_time", time.perf_counter)


def overfit(draft, target, text: torch.Tensor, prompt_len: int, steps: int, lr: float):
    """Train `draft` on one text (every anchor of its response) so its drafts get accepted there."""
    n = text.shape[1]
    feats = target_states(target, text, torch.tensor([n]), draft.target_layer_ids).features
    anchors = torch.arange(prompt_len, n - 1)[None]
    labels = block_labels(text, anchors, draft.block_size, torch.tensor([n]))[..., 1:].flatten()
    head = target.get_output_embeddings().weight
    opt = torch.optim.Adam(draft.parameters(), lr=lr)
    draft.train()
    for _ in range(steps):
        hidden = replay(draft, target.get_input_embeddings(), feats, text, anchors)[:, :, 1:]
        loss = F.cross_entropy(hidden.flatten(0, 2) @ head.T, labels, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()


def decode_both(ours, theirs, target, ids, max_new, stops=None):
    mine = spec_generate(ours, target, ids, max_new, stop_token_ids=stops)
    ref = reference.dflash_generate(theirs, target, ids, max_new, stops, return_stats=True)
    return mine, ref


def assert_same_decoding(mine, ref, block_size: int, max_new: int, min_tau: float = 1.2):
    assert mine.output_ids.tolist() == ref.output_ids.tolist()
    assert mine.tau > min_tau, mine.acceptance_lengths  # drafts were accepted: the comparison means something
    *steps, last = mine.acceptance_lengths
    assert steps == ref.acceptance_lengths[:-1]
    last_start = mine.num_input_tokens + sum(steps)
    if mine.num_input_tokens + max_new - last_start >= block_size:  # a full last block: drafted alike
        assert last == ref.acceptance_lengths[-1]


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen3 target, its greedy text, and a drafter trained on that text."""
    target = tiny_target("qwen3")
    prompt = torch.randint(1, 150, (1, 8), generator=torch.Generator().manual_seed(11))
    text = target.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0)
    torch.manual_seed(0)
    draft = overfit(tiny_drafter(target, block_size=8, num_layers=1), target, text, 8, steps=150, lr=1e-2)
    return target, prompt, draft


def test_our_drafter_loads_in_the_reference_without_missing_keys(tiny, tmp_path):
    target, prompt, draft = tiny
    path = save_drafter(draft, tmp_path / "ours")
    theirs, info = reference.DFlashDraftModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (theirs.block_size, theirs.mask_token_id, list(theirs.target_layer_ids)) == \
        (draft.block_size, draft.mask_token_id, draft.target_layer_ids)
    mine, ref = decode_both(draft, theirs.eval(), target, prompt, 48)
    assert_same_decoding(mine, ref, draft.block_size, 48)


def test_reference_saved_drafter_runs_in_ours(tiny, tmp_path):
    target, prompt, draft = tiny
    theirs = reference.DFlashDraftModel(draft.config)
    theirs.load_state_dict(draft.state_dict())
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_drafter(tmp_path / "theirs")
    mine, ref = decode_both(ours, theirs.eval(), target, prompt, 40)
    assert_same_decoding(mine, ref, ours.block_size, 40)


def test_reference_keyword_forward_equals_the_reference(tiny):
    _, _, draft = tiny
    theirs = reference.DFlashDraftModel(draft.config)
    theirs.load_state_dict(draft.state_dict())
    theirs.eval()
    g = torch.Generator().manual_seed(0)
    H, F_ = draft.config.hidden_size, draft.fc.in_features
    ours_cache, ref_cache = DynamicCache(config=draft.config), DynamicCache(config=draft.config)
    start = 5
    with torch.no_grad():
        for n in (7, 2):  # a prefill's context, then one step's accepted rows on top of the cached keys
            kw = dict(noise_embedding=torch.randn(1, 8, H, generator=g), target_hidden=torch.randn(1, n, F_, generator=g),
                      position_ids=torch.arange(start, start + n + 8)[None], use_cache=True)
            mine = draft(**kw, past_key_values=ours_cache)
            ref = theirs(**kw, past_key_values=ref_cache)
            assert torch.equal(mine, ref)
            ours_cache.crop(-8)
            ref_cache.crop(-8)
            start += n
        kw["position_ids"] = torch.arange(0, kw["target_hidden"].shape[1] + 8)[None]
        assert torch.allclose(draft(**kw, is_causal=True), theirs(**kw, is_causal=True), atol=1e-6)
        # and our own calling convention computes the same thing
        own = draft(kw["noise_embedding"], kw["target_hidden"], block_positions=kw["position_ids"][:, 2:],
                    context_positions=kw["position_ids"][:, :2])
        assert torch.equal(own, theirs(**kw))


REMOTE = """
import json, sys
sys.modules["draftopd"] = None  # `import draftopd` fails from here on
try:
    import draftopd.errors
    raise SystemExit("draftopd is importable")
except ImportError:
    pass
import torch
from transformers import AutoModel, AutoModelForCausalLM

draft = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
target = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
module = sys.modules[type(draft).__module__]
res = module.spec_generate(draft, target, torch.tensor(json.loads(sys.argv[3])), int(sys.argv[4]))
print(json.dumps({"module": module.__name__, "ids": res.output_ids.tolist(), "lengths": res.acceptance_lengths,
                  "method": draft.spec_generate(target, torch.tensor(json.loads(sys.argv[3])), int(sys.argv[4])).tolist()}))
"""


def test_checkpoint_code_runs_without_draftopd(tiny, tmp_path):
    target, prompt, draft = tiny
    path = save_drafter(draft, tmp_path / "draft")
    target.save_pretrained(tmp_path / "target")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1", "PATH": ""}
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(path), str(tmp_path / "target"),
                           json.dumps(prompt.tolist()), "48"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules") and got["module"].endswith("dflash")
    mine = spec_generate(draft, target, prompt, 48)
    assert got["ids"] == got["method"] == mine.output_ids.tolist()
    assert got["lengths"] == mine.acceptance_lengths and mine.tau > 1.2


@pytest.fixture(scope="module")
def smol(smollm):
    """The embedded SmolLM2 (fp32), a held-out GSM8K prompt, its greedy answer, a drafter trained on it."""
    tok = smollm.tokenizer
    prompt = torch.tensor([apply_chat_template(tok, load_prompts("gsm8k[1300:1301]")[0].messages)])
    text = smollm.model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    draft = init_drafter(smollm, num_layers=1, block_size=8, seed=0).float()
    return prompt, text, overfit(draft, smollm.model, text, prompt.shape[1], steps=24, lr=3e-3)


@pytest.mark.slow
def test_smollm2_decodes_like_the_reference(smollm, smol, tmp_path):
    prompt, _, draft = smol
    path = save_drafter(draft, tmp_path / "ours")
    theirs, info = reference.DFlashDraftModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    stops = smollm.stop_token_ids
    mine, ref = decode_both(draft, theirs.eval(), smollm.model, prompt, 40, stops)
    assert_same_decoding(mine, ref, draft.block_size, 40, min_tau=1.1)  # two minutes of CPU training: modest


def scripted(cls):
    """`cls` with drafts read from a script by position (one-hot logits): the target's own greedy
    text, made wrong at every 5th position, so blocks are accepted up to 4 drafts deep."""

    class Scripted(cls):
        def forward(self, *args, **kw):
            positions = kw.get("block_positions")
            if positions is None:  # the reference's keywords: context positions, then the block's
                positions = kw["position_ids"][:, kw["target_hidden"].shape[1]:]
            self.drafted = positions[0, 1:]
            return super().forward(*args, **kw)

        def compute_logits(self, hidden, head):
            rows = hidden.shape[-2]
            ids = self.script[self.drafted[:rows]]
            ids = torch.where(self.drafted[:rows] % 5 == 0, (ids + 1) % head.weight.shape[0], ids)
            logits = torch.zeros(*hidden.shape[:-1], head.weight.shape[0])
            return logits.scatter(-1, ids.view(*hidden.shape[:-2], rows, 1), 1.0)

    return Scripted


@pytest.mark.slow
def test_smollm2_deep_acceptance_like_the_reference(smollm, smol):
    """Blocks accepted across the chunks verification scores rows in; same loop behaviour as the reference."""
    prompt, text, draft = smol
    script = torch.cat([text[0], torch.zeros(16, dtype=torch.long)])
    ours = scripted(type(draft))(draft.config)
    theirs = scripted(reference.DFlashDraftModel)(draft.config)
    for model in (ours, theirs):
        model.load_state_dict(draft.state_dict())
        model.script = script
    mine, ref = decode_both(ours.eval(), theirs.eval(), smollm.model, prompt, 40)
    assert_same_decoding(mine, ref, draft.block_size, 40, min_tau=2.5)
    assert max(mine.acceptance_lengths) == 5  # rows past the first chunk of 4 were scored
