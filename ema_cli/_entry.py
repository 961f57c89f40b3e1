"""The console script's entry point: process-wide settings first, then the CLI."""

from __future__ import annotations

import os
import signal
from typing import NoReturn


def _quit_quietly(signum: int, frame: object) -> None:
    # Nothing is open or written yet: one line, and out, with no traceback from the imports.
    what = "terminated" if signum == signal.SIGTERM else "interrupted"
    try:
        os.write(2, f"ema-cli: {what}; nothing was written\n".encode())
    finally:
        os._exit(128 + signum)


def main() -> NoReturn:
    # First, before any import that takes time: Ctrl-C or SIGTERM during start-up ends the
    # process with one line instead of a KeyboardInterrupt traceback from inside an import.
    signal.signal(signal.SIGINT, _quit_quietly)
    signal.signal(signal.SIGTERM, _quit_quietly)
    # ema-cli does no linear algebra; one OpenBLAS thread per core would only cost start-up time.
    # Set before numpy is imported, and only for the command, never for library users.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import gc

    from ema_cli.cli import main as cli_main

    # The modules just imported live as long as the process: keep the garbage collector from
    # walking them again and again while the replay allocates small objects per block.
    gc.freeze()
    cli_main()
