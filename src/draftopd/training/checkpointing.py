"""Trainer checkpoints: a drafter in the reference format plus optimizer/scheduler state.

`step-N/` is written in a temporary directory and renamed into place, then the `latest`
pointer file is replaced atomically: a kill at any moment leaves the previous checkpoint
as "latest", never a half-written one.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from draftopd.errors import DraftOPDError
from draftopd.model.checkpoint import load_drafter, save_drafter


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir, step: int, draft, optimizer, scheduler, extra: dict, keep_last: int = 2) -> Path:
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:07d}"
    save_drafter(draft, final / "drafter")
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **extra}
    tmp = final / "trainer_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, final / "trainer_state.pt")
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir) -> Path | None:
    pointer = checkpoint_root(out_dir) / "latest"
    if not pointer.exists():
        return None
    path = checkpoint_root(out_dir) / pointer.read_text().strip()
    if not (path / "trainer_state.pt").exists():
        raise DraftOPDError(f"{pointer} points to {path}, which has no trainer_state.pt")
    return path


def load_checkpoint(path: Path, device: str = "cpu"):
    """-> (drafter, trainer state dict)."""
    draft = load_drafter(path / "drafter", device=device)
    try:
        state = torch.load(path / "trainer_state.pt", map_location=device, weights_only=False)
    except Exception as e:  # a corrupted file: say which
        raise DraftOPDError(f"{path / 'trainer_state.pt'}: unreadable ({type(e).__name__})") from None
    return draft, state


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
