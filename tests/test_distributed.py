"""torchrun with 2 CPU processes (gloo, FSDP2): same losses as 1 process at the same global batch,
and a checkpoint saved at world size 2 resumes at world size 1."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from draftopd.model.checkpoint import load_drafter
from draftopd.dflash import TOKEN_MAP, write_token_map
from draftopd.training.metrics_log import read_metrics

pytestmark = pytest.mark.slow


def write_cfg(path, method, tiny_dir, rollouts, out, **extra):
    cfg = {"method": method, "target": str(tiny_dir), "target_dtype": "fp32", "final_dtype": "fp32",
           "out_dir": str(out), "max_steps": 4, "seed": 3,
           "draft": {"num_layers": 2, "block_size": 4}, "data": {"rollouts": str(rollouts), "max_length": 64},
           "sft": {"num_anchors": 8, "gamma": 4.0}, "opd": {"max_anchors": 6},
           "log": {"every": 1, "save_every": 2, "progress": False}, "optim": {"lr": 3e-3, "warmup_ratio": 0.0}}
    for k, v in extra.items():
        node = cfg
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(nproc, cfg, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "draftopd.cli.main", "train", "--config", str(cfg), *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "draftopd.cli.main", "train", "--config", str(cfg), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("method", ["sft", "opd"])
def test_two_processes_match_one_process(method, tiny_dir, tiny_rollouts, tmp_path):
    init = {}
    if method == "opd":
        run(1, write_cfg(tmp_path / "warm.yaml", "sft", tiny_dir, tiny_rollouts, tmp_path / "warm", max_steps=3))
        init = {"draft.init": str(tmp_path / "warm" / "final")}
        vocab = load_drafter(tmp_path / "warm" / "final").config.vocab_size  # a draft vocabulary to carry through
        write_token_map(torch.arange(vocab - 16).flip(0), tmp_path / "warm" / "final" / TOKEN_MAP)
    one = write_cfg(tmp_path / "one.yaml", method, tiny_dir, tiny_rollouts, tmp_path / "one",
                    batch_size=1, grad_accum=2, **init)
    two = write_cfg(tmp_path / "two.yaml", method, tiny_dir, tiny_rollouts, tmp_path / "two",
                    batch_size=1, grad_accum=1, **init)
    run(1, one)
    run(2, two)
    l1 = [m["loss"] for m in read_metrics(tmp_path / "one")]
    l2 = [m["loss"] for m in read_metrics(tmp_path / "two")]
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-5)
    a, b = load_drafter(tmp_path / "one" / "final"), load_drafter(tmp_path / "two" / "final")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max() < 1e-4, k
    if method == "opd":  # the start's token map survives sharded training into the export
        assert a.draft_vocab.tolist() == b.draft_vocab.tolist() == list(reversed(range(vocab - 16)))


def test_checkpoint_from_two_processes_resumes_in_one(tiny_dir, tiny_rollouts, tmp_path):
    full = write_cfg(tmp_path / "full.yaml", "sft", tiny_dir, tiny_rollouts, tmp_path / "full",
                     batch_size=1, grad_accum=2)
    run(1, full)
    part = write_cfg(tmp_path / "part.yaml", "sft", tiny_dir, tiny_rollouts, tmp_path / "part",
                     batch_size=1, grad_accum=1)
    run(2, part)
    state = json.loads((tmp_path / "part" / "checkpoints" / "step-0000002" / "trainer.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    # as if killed after step 2: the step-2 checkpoint is the latest
    (tmp_path / "part" / "checkpoints" / "latest").write_text("step-0000002\n")
    # continue at world size 1 with the same global batch (2 sequences per step)
    run(1, part, "batch_size=1", "grad_accum=2", "--resume")
    l_full = [m["loss"] for m in read_metrics(tmp_path / "full")]
    l_part = [m["loss"] for m in read_metrics(tmp_path / "part")]
    assert l_part == pytest.approx(l_full, rel=1e-4, abs=1e-5)
