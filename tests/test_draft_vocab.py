"""Draft vocabularies (token_map.pt): built from rollouts, checked on the way in, carried by
drafter checkpoints, and only ever a cheaper head for the same lossless output."""

import pytest
import torch

from helpers import tiny_drafter, tiny_target
from draftopd.cli.main import main
from draftopd.data.rollouts import Rollout, write_rollouts
from draftopd.dflash import TOKEN_MAP, check_draft_vocab, read_token_map, write_token_map
from draftopd.errors import DraftOPDError
from draftopd.model.checkpoint import load_drafter, save_drafter
from draftopd.model.draft_vocab import frequent_tokens, token_counts


def test_most_frequent_first_ties_by_id_and_unseen_tokens_left_out():
    counts = token_counts([[3, 3, 7, 1], [7, 3], []], vocab_size=10)
    assert counts.tolist() == [0, 1, 0, 3, 0, 0, 0, 2, 0, 0]
    ids, coverage = frequent_tokens(counts, 2)
    assert ids.tolist() == [3, 7] and coverage == pytest.approx(5 / 6)
    assert frequent_tokens(counts, 100)[0].tolist() == [3, 7, 1]  # only the 3 seen tokens
    assert frequent_tokens(token_counts([[4, 2]], 10), 2)[0].tolist() == [2, 4]
    with pytest.raises(DraftOPDError, match="at least 1"):
        frequent_tokens(counts, 0)
    with pytest.raises(DraftOPDError, match="no response tokens"):
        frequent_tokens(token_counts([[]], 10), 4)


@pytest.mark.parametrize("ids, message", [
    ([[1, 2]], "1-D"), ([], "non-empty"), ([0.5, 1.0], "integer"), ([True, False], "integer"),
    ([3, 10], "token id 10 outside the vocabulary 0..9"), ([-1, 2], "token id -1"), ([2, 5, 2], "repeat"),
])
def test_bad_vocabularies_are_one_line_errors(ids, message):
    with pytest.raises(DraftOPDError, match=message):
        check_draft_vocab(ids, 10)


def test_token_map_files_in_sglang_format_round_trip_and_bad_ones_are_refused(tmp_path):
    write_token_map(torch.tensor([9, 4, 1])[1:], tmp_path / "map.pt")
    assert torch.load(tmp_path / "map.pt", weights_only=True).tolist() == [4, 1]  # one plain tensor, as SGLang loads
    assert read_token_map(tmp_path / "map.pt", 10).tolist() == [4, 1]
    torch.save([5, 2, 8], tmp_path / "list.pt")  # FR-Spec's published maps are lists
    assert read_token_map(tmp_path / "list.pt", 10).tolist() == [5, 2, 8]
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    torch.save({"ids": [1]}, tmp_path / "dict.pt")
    torch.save([1, "a"], tmp_path / "mixed.pt")
    for name, message in [("junk.pt", "unreadable"), ("dict.pt", "got dict"), ("mixed.pt", "integer token ids"),
                          ("missing.pt", "no such file")]:
        with pytest.raises(DraftOPDError, match=message) as e:
            read_token_map(tmp_path / name, 10)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DraftOPDError, match=f"token map {tmp_path / 'list.pt'}: token id 8 outside"):
        read_token_map(tmp_path / "list.pt", 8)


def test_checkpoints_carry_the_vocabulary_beside_unchanged_weights(tmp_path):
    target = tiny_target()
    draft = tiny_drafter(target)
    plain = save_drafter(draft, tmp_path / "plain")
    draft.set_draft_vocab([7, 3, 150])
    with_map = save_drafter(draft, tmp_path / "with-map")
    assert sorted(p.name for p in with_map.iterdir()) == sorted([*(p.name for p in plain.iterdir()), TOKEN_MAP])
    assert (with_map / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    loaded = load_drafter(with_map)
    assert loaded.draft_vocab.tolist() == [7, 3, 150] and load_drafter(plain).draft_vocab is None
    head = loaded.draft_head(target.get_output_embeddings())
    assert torch.equal(head.weight, target.get_output_embeddings().weight[[7, 3, 150]])
    assert head.tokens(torch.tensor([2, 0])).tolist() == [150, 7]
    torch.save(torch.tensor([[1, 2]]), with_map / TOKEN_MAP)
    with pytest.raises(DraftOPDError, match=f"token map {with_map / TOKEN_MAP}: expected a non-empty 1-D"):
        load_drafter(with_map)


def _rollouts(path, target):
    records = [Rollout(f"p{i}", [1, 2], response, "stop") for i, response in
               enumerate([[5, 5, 5, 9, 2], [5, 9, 30, 2], [7, 5, 2]])]
    write_rollouts(path, {"target": {"name": "tiny", "vocab_size": target.config.vocab_size}}, records)
    return path


def test_export_builds_keeps_and_drops_the_token_map(tmp_path, capsys):
    target = tiny_target()
    src = save_drafter(tiny_drafter(target), tmp_path / "src")
    rollouts = _rollouts(tmp_path / "rollouts", target)
    assert main(["export", "--draft", str(src), "--out", str(tmp_path / "a"), "--token-map", str(rollouts),
                 "--token-map-size", "3"]) == 0
    assert "the 3 most frequent of 5 distinct tokens in 3 responses" in capsys.readouterr().out
    assert load_drafter(tmp_path / "a").draft_vocab.tolist() == [5, 2, 9]  # prompts not counted
    assert main(["export", "--draft", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert load_drafter(tmp_path / "b").draft_vocab.tolist() == [5, 2, 9]  # kept by default
    assert main(["export", "--draft", str(tmp_path / "b"), "--out", str(tmp_path / "c"), "--token-map", "none"]) == 0
    assert load_drafter(tmp_path / "c").draft_vocab is None and not (tmp_path / "c" / TOKEN_MAP).exists()
    assert main(["export", "--draft", str(src), "--out", str(tmp_path / "d"),
                 "--token-map", str(tmp_path / "a" / TOKEN_MAP), "--token-map-size", "2"]) == 0
    assert load_drafter(tmp_path / "d").draft_vocab.tolist() == [5, 2]
    capsys.readouterr()
    other = tmp_path / "other-rollouts"  # another target's responses
    write_rollouts(other, {"target": {"name": "big", "vocab_size": 2 * target.config.vocab_size}},
                   [Rollout("p0", [1], [300, 2], "stop")])
    for extra, message in [(["--token-map", str(tmp_path / "nope")], "no such file or rollout directory"),
                           (["--token-map-size", "5"], "--token-map-size needs --token-map"),
                           (["--token-map", str(other)], f"target with vocabulary {2 * target.config.vocab_size}")]:
        assert main(["export", "--draft", str(src), "--out", str(tmp_path / "e"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not (tmp_path / "e").exists()


def test_shipped_drafter_drafts_from_its_token_map_losslessly_on_the_embedded_target(smollm, one_torch_thread):
    """The real thing: SmolLM2 with the shipped drafter and its 4096-token map, fp32 greedy, equals
    the target alone; its drafts all come from the map and some are accepted."""
    from draftopd.data.prompts import apply_chat_template, load_prompts
    from draftopd.decoding.speculative import spec_generate

    draft = load_drafter("smollm2-135m-dflash").float()
    assert draft.draft_vocab is not None and len(draft.draft_vocab) == 4096
    vocab = set(draft.draft_vocab.tolist())
    stops = smollm.stop_token_ids
    prompt = load_prompts("gsm8k[1201:1202]")[0]
    ids = torch.tensor([apply_chat_template(smollm.tokenizer, prompt.messages)])
    res = spec_generate(draft, smollm, ids, 40, stop_token_ids=stops)
    ref = smollm.model.generate(ids, do_sample=False, max_new_tokens=40, eos_token_id=stops,
                                pad_token_id=smollm.tokenizer.pad_token_id)
    assert res.output_ids.tolist() == ref.tolist()
    assert max(res.acceptance_lengths) >= 2
    accepted, pos = [], ids.shape[1] + 1  # each step commits its accepted drafts, then the target's token
    for n in res.acceptance_lengths:
        accepted += res.output_ids[0, pos : pos + n - 1].tolist()
        pos += n
    assert accepted and set(accepted) <= vocab
