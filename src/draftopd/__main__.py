"""`python -m draftopd ...`: the CLI without relying on the console script being on PATH."""

import sys

from draftopd.cli.main import main

sys.exit(main())
