"""`draftopd` command line. Each subcommand is a thin wrapper over a library function.

Errors the user can fix (`DraftOPDError`) print as one line and exit with status 2.
"""

import argparse
import sys
import time

from draftopd.cli import EMBEDDED_TARGET, demo, evaluate, export, generate, init_draft, rollout, train
from draftopd.errors import DraftOPDError

COMMANDS = (init_draft, rollout, train, evaluate, generate, export, demo)  # one module per subcommand


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="draftopd",
        description="Train DFlash block drafters for lossless speculative decoding (SFT and Draft-OPD). "
                    f"Targets: an HF model id, a local folder, or the embedded '{EMBEDDED_TARGET}'.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_hf()
    t0 = time.time()
    try:
        args.func(args)
    except DraftOPDError as e:
        print(f"draftopd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"draftopd {args.command}: interrupted after {time.time() - t0:.0f}s; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
