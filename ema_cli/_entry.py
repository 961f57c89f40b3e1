"""The console script's entry point: process-wide settings first, then the CLI."""

from __future__ import annotations

import gc
import os
from typing import NoReturn


def main() -> NoReturn:
    # ema-cli does no linear algebra; one OpenBLAS thread per core would only cost start-up time.
    # Set before numpy is imported, and only for the command, never for library users.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ema_cli.cli import main as cli_main

    # The modules just imported live as long as the process: keep the garbage collector from
    # walking them again and again while the replay allocates small objects per block.
    gc.freeze()
    cli_main()
