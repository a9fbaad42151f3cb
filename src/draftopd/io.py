"""Output directories: written without destroying anything we did not create.

A command that writes a directory asks `check_output_dir` first. A path that exists but is
not a directory, or a non-empty directory holding something other than what the command
writes, is refused with one line whatever the flags; an existing output of the same kind is
replaced only when asked (`overwrite`) or reused by a command that resumes (`resume`).
`atomic_dir` then builds the new directory beside the old one and swaps it in, so an
interrupted write leaves the old output as it was.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from draftopd.errors import DraftOPDError


def holds(*names: str) -> Callable[[Path], bool]:
    """A kind test for `check_output_dir`: the directory has all these entries."""
    return lambda path: all((path / name).exists() for name in names)


def check_output_dir(path: str | Path, *, kind: str, is_kind: Callable[[Path], bool], overwrite: bool = False,
                     resume: bool = False) -> bool:
    """May a `kind` (e.g. "drafter") be written at `path`? True if one is already there.

    Missing or empty: yes (False). Not a directory, or non-empty without being a `kind`
    (`is_kind(path)` false: someone else's files): refused, flags or not. An existing `kind`:
    refused unless `overwrite` (the caller replaces it) or `resume` (the caller continues it).
    """
    path = Path(path)
    blocked = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if blocked is not None and not blocked.is_dir():
        raise DraftOPDError(f"{blocked} is not a directory, so {path} cannot be created there")
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir():
        raise DraftOPDError(f"{path} exists and is not a directory; choose a new path for the {kind}")
    if not any(path.iterdir()):
        return False
    a = "an" if kind[0] in "aeiou" else "a"
    if not is_kind(path):
        raise DraftOPDError(f"{path} is not empty and does not hold {a} {kind}; refusing to write into it "
                            "(choose a new or empty directory)")
    if not (overwrite or resume):
        raise DraftOPDError(f"{path} already holds {a} {kind}; pass --overwrite (overwrite=True) to replace it")
    return True


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; when the block succeeds it becomes `out`.

    A directory already at `out` stays whole until the swap (two renames, then it is deleted);
    the temporary one is removed on any error, and a kill leaves only a hidden `.NAME.tmp-*`
    beside the untouched `out`. Call `check_output_dir` first: this replaces what is there.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise DraftOPDError(f"{out.parent}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
        _default_modes(tmp)
        if out.exists():
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_modes(root: Path) -> None:
    """Give a finished directory the modes a plain mkdir/open would (mkdtemp makes it 0700, and
    some writers make files 0600), so a drafter saved here is readable by an engine run as
    another user, as any other model folder."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON so that a kill leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
