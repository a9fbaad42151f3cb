"""Trainer checkpoints: the drafter in the reference format plus sharded optimizer state.

`step-N/` holds `drafter/` (reference DFlash directory, full weights), `state/` (model and
optimizer through torch.distributed.checkpoint, so a run saved at world size N resumes at
any world size) and `trainer.json` (step, elapsed time). It is assembled in a temporary
directory and renamed into place, then the `latest` pointer is replaced atomically: a kill
at any moment leaves the previous checkpoint as "latest", never a half-written one.
"""

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from draftopd.errors import DraftOPDError
from draftopd.model.checkpoint import save_drafter
from draftopd.model.drafter import DFlashDraftModel
from draftopd.training import parallel


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def export_drafter(model, out: Path, ctx: parallel.Context, dtype: torch.dtype | None = None) -> None:
    """Write the (possibly sharded) drafter as one reference-format directory, from rank 0,
    in `dtype` (default: as trained)."""
    if ctx.world == 1:
        save_drafter(model, out, dtype=dtype, overwrite=True)  # a resumed run replaces its own `final`
        return
    state = parallel.full_state_dict(model)
    if ctx.is_main:
        plain = DFlashDraftModel(model.config)
        plain.load_state_dict(state)
        plain.set_draft_vocab(None if model.draft_vocab is None else model.draft_vocab.cpu())  # not in the state
        save_drafter(plain, out, dtype=dtype, overwrite=True)


def save_checkpoint(out_dir, step: int, model, optimizer, extra: dict, ctx: parallel.Context,
                    keep_last: int = 2) -> Path:
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier(ctx)
    export_drafter(model, tmp / "drafter", ctx)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))
    if ctx.is_main:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "world_size": ctx.world, **extra}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        for old in sorted(root.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier(ctx)
    return final


def latest_checkpoint(out_dir) -> Path | None:
    pointer = checkpoint_root(out_dir) / "latest"
    if not pointer.exists():
        return None
    path = checkpoint_root(out_dir) / pointer.read_text().strip()
    if not (path / "trainer.json").exists() or not (path / "drafter").is_dir():
        raise DraftOPDError(f"{pointer} points to {path}, which is not a complete checkpoint")
    return path


def load_trainer_state(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer (resharded to this world size); return trainer.json."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=str(path / "state"))
    except Exception as e:
        raise DraftOPDError(f"{path / 'state'}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "trainer.json").read_text())
