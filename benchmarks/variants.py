"""ema-cli with experimental knobs, for measuring performance proposals side by side.

Runs ``ema-cli`` exactly as the console script does, after patching internals according to
environment variables (each unset = ema-cli's own behaviour):

- ``EMA_BENCH_WORKERS=N``: replay threads (ema-cli uses 2);
- ``EMA_BENCH_BLOCK=BYTES``: block size (ema-cli's replay.DEFAULT_BLOCK_BYTES);
- ``EMA_BENCH_REOPEN=1``: every worker thread opens its own reader of every checkpoint, as
  before readers with ``thread_safe_reads`` were shared by the threads;
- ``EMA_BENCH_PULL=1``: the worker threads pull blocks from a shared list under a lock and
  report bytes at the end, instead of one Future per block and a FIRST_COMPLETED wait (progress
  is then not incremental; a real version would pass counts through a queue).

Any other variable is simply passed on (``EMA_CLI_NO_KERNELS=1``: numpy instead of the C
kernels).

Use it through run.py (``--variant NAME:VAR=VALUE[,VAR=VALUE]``) or directly:

    EMA_BENCH_WORKERS=1 python benchmarks/variants.py average CKPT... -o OUT --decay D -q

This reaches into private code (``ema_cli.replay._Replayer.run``, ``replay_averages(..., workers=,
block_bytes=)``); it is a measuring aid and exits if those are gone, rather than silently
measuring something else.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from ema_cli import fpmode

Replay = Callable[..., Iterator[int]]


def _pull_replay(replay_module: ModuleType, original: Replay) -> Replay:
    """``replay.replay_averages`` whose worker threads pull blocks from a shared list under a
    lock.

    The blocks (and the replayer) are collected by running ema-cli's own single-worker path with
    ``_Replayer.run`` stubbed out, so the blocks and the arithmetic are exactly ema-cli's.
    """
    replayer_class = replay_module._Replayer

    def replay(*args, workers=2, **kwargs):  # type: ignore[no-untyped-def]
        original_run = replayer_class.run
        blocks: list[Any] = []
        replayers: list[Any] = []

        def collect(self, block):  # type: ignore[no-untyped-def]
            replayers[:] = [self]
            blocks.append(block)
            return 0

        replayer_class.run = collect
        try:
            for _ in original(*args, **{**kwargs, "workers": 1}):
                pass
        finally:
            replayer_class.run = original_run
        if not blocks:
            yield 0
            return
        replayer, todo, lock = replayers[0], iter(blocks), threading.Lock()
        done = [0]
        errors: list[BaseException] = []

        def work() -> None:
            fpmode.enter_tf_arithmetic_for_this_thread()  # as ema-cli's own worker threads do
            try:
                while not errors:
                    with lock:
                        block = next(todo, None)
                    if block is None:
                        return
                    n = replayer.run(block)
                    with lock:
                        done[0] += n
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        yield done[0]

    return replay


def _reopen_in_every_worker(replay_module: ModuleType) -> None:
    """The replay ignores the readers it is given for its worker threads
    (``EMA_BENCH_REOPEN``): each thread opens its own, checked against the plan's headers."""
    replayer_class = replay_module._Replayer
    original = replayer_class.__post_init__

    def post_init(self: Any) -> None:
        self.shared = ()
        original(self)

    replayer_class.__post_init__ = post_init


def main() -> None:
    env = os.environ
    from ema_cli import replay

    if env.get("EMA_BENCH_REOPEN"):
        _reopen_in_every_worker(replay)

    if not hasattr(replay._Replayer, "run"):
        sys.exit("variants.py: ema_cli.replay._Replayer has no run(); update variants.py")
    original = replay.replay_averages  # what job.run calls
    options = {}
    if "EMA_BENCH_WORKERS" in env:
        options["workers"] = int(env["EMA_BENCH_WORKERS"])
    if "EMA_BENCH_BLOCK" in env:
        options["block_bytes"] = int(env["EMA_BENCH_BLOCK"])
    if env.get("EMA_BENCH_PULL") or options:
        chosen = _pull_replay(replay, original) if env.get("EMA_BENCH_PULL") else original
        calls = []

        def patched(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            return chosen(*args, **{**kwargs, **options})

        # Patch the module before the CLI imports ``replay_averages`` by name, and any module
        # that did.
        setattr(replay, "replay_averages", patched)  # noqa: B010 - a patch mypy would refuse
        import ema_cli.cli  # noqa: F401 - imports whatever runs the replay

        for module in list(sys.modules.values()):
            if (module.__name__ or "").startswith("ema_cli") and getattr(
                module, "replay_averages", None
            ) is original:
                setattr(module, "replay_averages", patched)  # noqa: B010

        def check() -> None:
            if not calls:
                sys.stderr.write("variants.py: the patched replay_averages() was never called\n")
                sys.stderr.flush()
                os._exit(3)

        atexit.register(check)
    import ema_cli.cli as cli

    sys.argv[0] = "ema-cli"
    cli.main()


if __name__ == "__main__":
    main()
