"""The trainer on a tiny random target saved to disk: exact resume, atomic checkpoints, errors."""

import json
import os
from pathlib import Path

import pytest
import torch

from draftopd.data.rollouts import Rollout, write_rollouts
from draftopd.errors import DraftOPDError
from draftopd.model.checkpoint import load_drafter
from draftopd.model.target import load_target
from draftopd.training.config import load_config
from draftopd.training.metrics_log import read_metrics
from draftopd.training.trainer import train


def cfg_for(method, tiny_dir, rollouts, out, **extra):
    base = {"method": method, "target": str(tiny_dir), "target_dtype": "fp32", "final_dtype": "fp32",
            "out_dir": str(out), "max_steps": 6, "batch_size": 2,
            "draft": {"num_layers": 1, "block_size": 4}, "data": {"rollouts": str(rollouts), "max_length": 64},
            "sft": {"num_anchors": 8, "gamma": 4.0}, "log": {"every": 1, "save_every": 3, "progress": False},
            "optim": {"lr": 3e-3, "warmup_ratio": 0.0}}
    overrides = [f"{k}={json.dumps(v)}" for k, v in extra.items()]
    return load_config(None, overrides, base=base)


def test_sft_resume_after_kill_matches_uninterrupted(tiny_dir, tiny_rollouts, tmp_path, monkeypatch):
    full = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "full"))
    losses = [m["loss"] for m in read_metrics(full.out_dir)]
    assert len(losses) == 6 and losses[-1] < losses[0]

    import draftopd.training.sft as sft

    real, calls = sft.sft_loss, {"n": 0}

    def killed_in_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sft, "sft_loss", killed_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "part"))
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    monkeypatch.setattr(sft, "sft_loss", real)
    resumed = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "part"), resume=True)
    assert resumed.steps == 6
    again = [m["loss"] for m in read_metrics(tmp_path / "part") if "loss" in m]
    assert again == pytest.approx(losses, rel=1e-5, abs=1e-6)
    a, b = load_drafter(full.final_drafter), load_drafter(resumed.final_drafter)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_half_written_checkpoint_never_becomes_latest(tiny_dir, tiny_rollouts, tmp_path, monkeypatch):
    """A save that dies after the drafter is written but before the optimizer state: `latest`
    keeps naming the complete checkpoint, which resumes."""
    from draftopd.training import checkpointing

    out = tmp_path / "run"
    train(cfg_for("sft", tiny_dir, tiny_rollouts, out, max_steps=3))
    root = out / "checkpoints"
    real_save = checkpointing.dcp.save

    def dying_save(state, checkpoint_id):
        assert (Path(checkpoint_id).parent / "drafter" / "model.safetensors").exists()  # part-way
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for("sft", tiny_dir, tiny_rollouts, out, max_steps=6), resume=True)  # save at step 6 dies
    assert (root / ".step-0000006.tmp" / "drafter").is_dir()  # the half-written one is there...
    assert (root / "latest").read_text().strip() == "step-0000003"  # ...and not latest
    monkeypatch.setattr(checkpointing.dcp, "save", real_save)
    res = train(cfg_for("sft", tiny_dir, tiny_rollouts, out, max_steps=6), resume=True)
    assert res.steps == 6
    assert (root / "latest").read_text().strip() == "step-0000006"


def test_opd_runs_and_logs_walk_statistics(tiny_dir, tiny_rollouts, tmp_path):
    sft = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "sft", max_steps=3))
    for loss in ("exact", "sampled"):
        cfg = cfg_for("opd", tiny_dir, tiny_rollouts, tmp_path / f"opd-{loss}", max_steps=2,
                      **{"draft.init": str(sft.final_drafter), "opd.loss": loss, "opd.max_anchors": 8})
        res = train(cfg)
        rec = read_metrics(res.out_dir)[0]
        assert {"loss", "tau_walk", "accepted_tokens", "rejected_tokens", "accept_rate_per_offset"} <= set(rec)
        assert len(rec["accept_rate_per_offset"]) == 3 and rec["tau_walk"] >= 1


def test_opd_live_mode_decodes_with_the_current_drafter(tiny_dir, tiny_rollouts, tmp_path):
    sft = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "sft", max_steps=2))
    cfg = cfg_for("opd", tiny_dir, tiny_rollouts, tmp_path / "live", max_steps=2,
                  **{"draft.init": str(sft.final_drafter), "opd.rollout_mode": "live", "opd.max_anchors": 4,
                     "opd.live_max_new_tokens": 12})
    recs = read_metrics(train(cfg).out_dir)
    assert len(recs) == 2 and all(r["tau_walk"] >= 1 for r in recs)
    assert all(r["accepted_tokens"] + r["rejected_tokens"] <= 2 * 4 * 3 for r in recs)  # capped: b x 4 x (B-1)


def test_nan_step_is_skipped_and_counted(tiny_dir, tiny_rollouts, tmp_path, monkeypatch):
    import draftopd.training.sft as sft

    real = sft.sft_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        loss, stats = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), stats

    monkeypatch.setattr(sft, "sft_loss", flaky)
    res = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "nan", max_steps=4))
    assert res.skipped_steps == 1 and res.steps == 4
    assert all(torch.isfinite(p).all() for p in load_drafter(res.final_drafter).parameters())


def test_bad_inputs(tiny_dir, tiny_rollouts, tmp_path):
    with pytest.raises(DraftOPDError, match=r"optim\.lrr: unknown key"):
        cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path, **{"optim.lrr": 1})
    with pytest.raises(DraftOPDError, match=r"batch_size: .*integer"):
        cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path, batch_size="four")
    # rollouts made by another target
    other = tmp_path / "other-rollouts"
    ident = {"name": "someone/else", "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4,
             "vocab_size": 160}
    write_rollouts(other, {"target": ident}, [Rollout("x:0", [1, 2], [3, 4, 5], "length")])
    with pytest.raises(DraftOPDError, match="were made by target 'someone/else'"):
        train(cfg_for("sft", tiny_dir, other, tmp_path / "o"))
    # a checkpoint dir that is not a drafter
    (tmp_path / "notadrafter").mkdir()
    with pytest.raises(DraftOPDError, match="not a drafter directory"):
        train(cfg_for("opd", tiny_dir, tiny_rollouts, tmp_path / "x", **{"draft.init": str(tmp_path / "notadrafter")}))
    # block size mismatch between the drafter and the config
    sft = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "b4", max_steps=1))
    with pytest.raises(DraftOPDError, match="block size mismatch"):
        train(cfg_for("opd", tiny_dir, tiny_rollouts, tmp_path / "y",
                      **{"draft.init": str(sft.final_drafter), "draft.block_size": 8}))
    # responses too short to train on (an EOS alone)
    empty = tmp_path / "empty-rollouts"
    target = load_target(str(tiny_dir), dtype="fp32")
    write_rollouts(empty, {"target": target.identity},
                   [Rollout("e:0", [1, 2, 3], [2], "stop")])  # just an EOS
    with pytest.raises(DraftOPDError, match="no usable rollouts"):
        train(cfg_for("sft", tiny_dir, empty, tmp_path / "z"))
    # an existing run is never overwritten without --resume
    with pytest.raises(DraftOPDError, match="already has checkpoints"):
        train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "b4", max_steps=1))
    assert os.path.exists(tmp_path / "b4" / "final" / "model.safetensors")


def test_final_drafter_is_bf16_by_default_as_published(tiny_dir, tiny_rollouts, tmp_path):
    res = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "run", max_steps=1, final_dtype="bf16"))
    config = json.loads((res.final_drafter / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in load_drafter(res.final_drafter).parameters())
    ckpt = load_drafter(res.out_dir / "checkpoints" / "step-0000001" / "drafter")
    assert all(p.dtype == torch.float32 for p in ckpt.parameters())  # training state stays fp32


def test_cpu_budget_clock_ignores_time_the_process_does_not_run(tiny_dir, tiny_rollouts, tmp_path):
    """An equal-compute comparison on a shared CPU: time spent waiting (other jobs, sleep) is not spent."""
    import time

    from draftopd.training.trainer import Schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    clocks = {}
    for clock in ("wall", "cpu"):
        cfg = cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path, max_minutes=1.0, budget_clock=clock)
        sched = Schedule(opt, cfg, total=100)
        time.sleep(0.3)
        clocks[clock] = sched.elapsed()
    assert clocks["wall"] >= 0.3
    assert clocks["cpu"] < 0.15


def test_several_rollout_directories_train_together_and_keep_each_held_out_share(tiny_dir, tiny_rollouts, tmp_path):
    from draftopd.data.rollouts import read_records
    from draftopd.training.batches import split_heldout, build_sequences, training_split

    first = read_records(tiny_rollouts)
    second = [Rollout(f"u:{i}", [5 + i, 6, 7], list(range(30 + i, 50 + i)), "length") for i in range(20)]
    alone_train, alone_held = split_heldout(build_sequences(first, 64), 0.25, seed=3)
    train_seqs, held = training_split({"a": first, "b": second}, 64, 0.25, seed=3)
    # the first set splits exactly as it did alone: adding a set moves none of its held-out rollouts into training
    assert [s.index for s in held[:len(alone_held)]] == [s.index for s in alone_held]
    assert [s.index for s in train_seqs[:len(alone_train)]] == [s.index for s in alone_train]
    assert sorted(s.index for s in train_seqs + held) == list(range(len(first) + len(second)))  # one feature-cache key each
    assert len(held) == len(alone_held) + 5
    with pytest.raises(DraftOPDError, match="^b: no usable rollouts"):
        training_split({"a": first, "b": [Rollout("e:0", [1, 2], [2], "stop")]}, 64, 0.25, seed=3)

    # a later turn (its prompt holds its first turn's answer) is held out exactly when its first turn is
    turns = second + [Rollout(f"u:{i}:turn2", [5 + i, 6, 7] + list(range(30 + i, 50 + i)) + [9], [11, 12, 13],
                              "length", {"conversation": f"u:{i}", "turn": 2}) for i in range(20)]
    t_train, t_held = split_heldout(build_sequences(turns, 64), 0.25, seed=3)
    held_ids = {s.conversation for s in t_held if not s.later_turn}
    assert held_ids and {s.conversation for s in t_held if s.later_turn} == held_ids
    assert not held_ids & {s.conversation for s in t_train}
    # drawn among first turns: the set without its second turns (before `rollout --turns 2` grew it) split alike
    assert held_ids == {s.conversation for s in split_heldout(build_sequences(second, 64), 0.25, seed=3)[1]}

    more = tmp_path / "more-rollouts"
    write_rollouts(more, json.loads((tiny_rollouts / "meta.json").read_text()), second[:6])
    res = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "two", max_steps=2,
                        **{"data.rollouts": [str(tiny_rollouts), str(more)]}))
    assert json.loads((res.out_dir / "config.json").read_text())["data"]["rollouts"] == [str(tiny_rollouts), str(more)]
    with pytest.raises(DraftOPDError, match="listed twice"):
        cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "dup", **{"data.rollouts": [str(tiny_rollouts), str(tiny_rollouts) + "/"]})


def test_init_with_more_layers_grows_the_drafter(tiny_dir, tiny_rollouts, tmp_path):
    start = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "one", max_steps=1))
    grown = train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "three", max_steps=2,
                          **{"draft.init": str(start.final_drafter), "draft.num_layers": 3}))
    deeper = load_drafter(grown.final_drafter)
    assert len(deeper.layers) == 3
    assert deeper.layers[1].mlp.down_proj.weight.any()  # the new layers trained
    with pytest.raises(DraftOPDError, match="fewer than the 3 layers"):
        train(cfg_for("sft", tiny_dir, tiny_rollouts, tmp_path / "cut",
                      **{"draft.init": str(grown.final_drafter), "draft.num_layers": 2}))
    assert not (tmp_path / "cut" / "checkpoints").exists()
