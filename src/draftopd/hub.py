"""Hugging Face Hub ids that fail in seconds, with one line, when the Hub cannot answer.

transformers retries a failed request with back-off (about 50 s without a network before
its error). Here a hub id is asked of the Hub once, with a short timeout; when that fails
the local HF cache is used if it has the repository, else the user gets one line saying why.
`HF_HUB_OFFLINE=1` skips the network altogether.
"""

import os
from pathlib import Path

from draftopd.errors import DraftOPDError

HUB_TIMEOUT_S = 4.0


def is_repo_id(text: str) -> bool:
    """`owner/name`, not a path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def cached_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path | None:
    """The repository's folder in the local HF cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types for that)
        return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def resolve_repo(repo_id: str, *, kind: str, allow_patterns: list[str] | None = None) -> str:
    """`repo_id` if the Hub answers for it now, else its cached folder; one line if neither.

    One request, `HUB_TIMEOUT_S` at most, no retry loop; none at all under HF_HUB_OFFLINE.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if offline():
        problem = "HF_HUB_OFFLINE is set"
    else:
        try:
            HfApi().repo_info(repo_id, timeout=HUB_TIMEOUT_S)
            return repo_id
        except GatedRepoError:
            raise DraftOPDError(f"{kind} {repo_id!r} is gated on the Hugging Face Hub: accept its terms there "
                                "and set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise DraftOPDError(f"{kind} {repo_id!r}: not a local directory, and no such repository on the "
                                "Hugging Face Hub (a private one needs HF_TOKEN)") from None
        except Exception as e:  # no network, DNS, timeout, proxy, server error
            problem = f"the Hugging Face Hub did not answer: {_first_line(e)}"
    cached = cached_snapshot(repo_id, allow_patterns)
    if cached is None:
        raise DraftOPDError(f"{kind} {repo_id!r}: not a local directory, not in the local HF cache, and {problem}")
    return str(cached)


def download(repo_id: str, *, kind: str, allow_patterns: list[str]) -> Path:
    """The repository's files matching `allow_patterns`, from the Hub or the cache."""
    from huggingface_hub import snapshot_download

    where = resolve_repo(repo_id, kind=kind, allow_patterns=allow_patterns)
    if where != repo_id:
        return Path(where)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as e:
        raise DraftOPDError(f"{kind} {repo_id!r}: download failed ({type(e).__name__}: {_first_line(e)})") from None
