"""Writes never destroy what they did not create; replacing a drafter is explicit and atomic."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_drafter, tiny_target, without_dtype_notice
from draftopd.cli.main import main
from draftopd.errors import DraftOPDError
from draftopd.io import atomic_dir, check_output_dir, holds
from draftopd.model import checkpoint
from draftopd.model.checkpoint import load_drafter, save_drafter


def snapshot(root: Path) -> dict:
    """Every file and directory under `root` (itself included) with its bytes' digest."""
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def one_line_error(capsys, command: str, message: str) -> None:
    captured = capsys.readouterr()
    err = without_dtype_notice(captured.err)
    assert len(err.splitlines()) == 1, captured.err
    assert err.startswith(f"draftopd {command}: error: ") and message in err, err
    assert "Traceback" not in captured.err


@pytest.fixture
def drafter_dir(tmp_path):
    return save_drafter(tiny_drafter(tiny_target("qwen3")), tmp_path / "draft")


@pytest.fixture
def foreign(tmp_path):
    """Someone's directory of models: a file, a subfolder, a hidden file."""
    d = tmp_path / "models"
    (d / "Qwen3-4B").mkdir(parents=True)
    (d / "Qwen3-4B" / "config.json").write_text('{"model_type": "qwen3"}')
    (d / "Qwen3-4B" / "model.safetensors").write_bytes(b"\x00" * 64)
    (d / "notes.txt").write_text("keep me\n")
    (d / ".hidden").write_text("me too\n")
    return d


def test_check_output_dir_rules(tmp_path, drafter_dir, foreign):
    kind = dict(kind="drafter", is_kind=checkpoint.is_drafter_dir)
    assert check_output_dir(tmp_path / "new", **kind) is False
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", **kind) is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(DraftOPDError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", **kind, overwrite=True)
    with pytest.raises(DraftOPDError, match="file is not a directory, so .* cannot be created"):
        check_output_dir(tmp_path / "file" / "sub" / "out", **kind)
    for flags in ({}, {"overwrite": True}, {"resume": True}):  # someone else's files: never
        with pytest.raises(DraftOPDError, match="does not hold a drafter"):
            check_output_dir(foreign, **kind, **flags)
    with pytest.raises(DraftOPDError, match="already holds a drafter; pass --overwrite"):
        check_output_dir(drafter_dir, **kind)
    assert check_output_dir(drafter_dir, **kind, overwrite=True) is True
    assert check_output_dir(drafter_dir, kind="run", is_kind=holds("config.json", "dflash.py"), resume=True) is True
    # a model folder that is not a drafter is someone else's, even with config.json + weights
    with pytest.raises(DraftOPDError, match="does not hold a drafter"):
        check_output_dir(foreign / "Qwen3-4B", **kind, overwrite=True)


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("killed")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["export", "init-draft"])
@pytest.mark.parametrize("where", ["foreign dir", "file"])
def test_refused_outputs_keep_every_byte(command, where, drafter_dir, foreign, capsys):
    out = foreign if where == "foreign dir" else foreign / "notes.txt"
    before = snapshot(foreign)
    argv = (["export", "--draft", str(drafter_dir)] if command == "export"
            else ["init-draft", "--target", "smollm2-135m", "--num-layers", "1"])
    for extra in ([], ["--overwrite"]):
        assert main([*argv, "--out", str(out), *extra]) == 2
        one_line_error(capsys, command, "not a directory" if where == "file" else "does not hold a drafter")
        assert snapshot(foreign) == before


def test_library_save_refuses_too(tmp_path, foreign):
    before = snapshot(foreign)
    draft = tiny_drafter(tiny_target("qwen3"))
    with pytest.raises(DraftOPDError, match="does not hold a drafter"):
        save_drafter(draft, foreign, overwrite=True)
    with pytest.raises(DraftOPDError, match="not a directory"):
        save_drafter(draft, foreign / "notes.txt", overwrite=True)
    assert snapshot(foreign) == before


def test_export_replaces_a_drafter_only_with_overwrite(drafter_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--draft", str(drafter_dir), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # published drafters are bf16
    before = snapshot(out)
    assert main(["export", "--draft", str(drafter_dir), "--out", str(out), "--dtype", "fp32"]) == 2
    one_line_error(capsys, "export", "already holds a drafter; pass --overwrite")
    assert snapshot(out) == before
    assert main(["export", "--draft", str(drafter_dir), "--out", str(out), "--dtype", "fp32", "--overwrite"]) == 0
    assert load_drafter(out).fc.weight.dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft", "exported"]  # no temp dirs left


def test_overwrite_killed_mid_write_leaves_the_old_drafter(drafter_dir, monkeypatch):
    old = load_drafter(drafter_dir)
    before = snapshot(drafter_dir)
    new = tiny_drafter(tiny_target("qwen3"), seed=9)

    def half_written(state, path, metadata=None):  # the process dies halfway through the weights
        Path(path).write_bytes(b"\x01" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_drafter(new, drafter_dir, overwrite=True)
    assert snapshot(drafter_dir) == before
    again = load_drafter(drafter_dir)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), again.state_dict().values()))
    assert sorted(p.name for p in drafter_dir.parent.iterdir()) == ["draft"]


@pytest.mark.parametrize("where", ["foreign dir", "file"])
def test_rollout_train_eval_demo_refuse_foreign_outputs(where, foreign, tiny_dir, tiny_rollouts, capsys, tmp_path):
    """Every command that writes a directory: someone else's folder or a file is refused with one
    line and every byte stays."""
    out = foreign if where == "foreign dir" else foreign / "notes.txt"
    message = "not a directory" if where == "file" else "does not hold a"
    before = snapshot(foreign)
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({"method": "sft", "target": str(tiny_dir), "out_dir": str(out), "max_steps": 1,
                                  "data": {"rollouts": str(tiny_rollouts)}}))
    commands = {
        "rollout": ["rollout", "--target", str(tiny_dir), "--prompts", "gsm8k[:1]", "--out", str(out)],
        "train": ["train", "--config", str(config)],
        "eval": ["eval", "--target", str(tiny_dir), "--draft", str(save_drafter(tiny_drafter(tiny_target("llama")),
                 tmp_path / "d")), "--bench", "gsm8k", "--samples", "1", "--out", str(out), "--overwrite"],
        "demo": ["demo", "--out", str(out)],
    }
    for command, argv in commands.items():
        assert main(argv) == 2, command
        one_line_error(capsys, command, message)
        assert snapshot(foreign) == before, command


def test_eval_replaces_an_earlier_evaluation_only_when_asked(tmp_path, capsys):
    from draftopd.evaluation.bench import SETTINGS

    out = tmp_path / "eval"
    out.mkdir()
    (out / SETTINGS).write_text("{}")
    with pytest.raises(DraftOPDError, match="already holds an evaluation run; pass --overwrite"):
        check_output_dir(out, kind="evaluation run", is_kind=holds(SETTINGS))
    assert check_output_dir(out, kind="evaluation run", is_kind=holds(SETTINGS), resume=True) is True


def test_saved_drafter_has_the_usual_modes(tmp_path):
    """Readable by others as any model folder (mkdtemp alone would leave it 0700)."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = save_drafter(tiny_drafter(tiny_target("qwen3")), tmp_path / "d")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
