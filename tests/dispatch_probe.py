"""Everything whose bytes must not depend on the CPU, computed once, for ``test_determinism``.

Run as ``python -m tests.dispatch_probe INPUTS OUT [--kernels simd|portable|none]`` in a fresh
process (so ``NPY_DISABLE_CPU_FEATURES`` and ``EMA_CLI_NO_KERNELS`` take effect at import):

* every golden case through the engine, each result's bytes appended to ``OUT/golden.bin``;
* ``ema-cli average`` over the checkpoints in ``INPUTS`` with every precision, zero debias on and
  off, and ``num_updates`` off and ``step``, each writing ``OUT/run-<k>.safetensors`` and its
  mapping (which holds the reported weights) with paths relative to ``OUT``.

The parent compares every file byte for byte across numpy's dispatch levels and kernel modes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

#: (precision, zero debias, num_updates) of every CLI run, in order.
RUNS = [
    (precision, zero_debias, num_updates)
    for precision in ("auto", "native")
    for zero_debias in (False, True)
    for num_updates in (None, "step")
]


def golden_bytes() -> bytes:
    from ema_cli import engine, fpmode
    from tests.golden import golden_cases

    chunks = []
    for case in golden_cases.load_cases():
        for tensor in case.tensors:
            work = engine.compute_dtype(tensor.dtype, case.precision)  # type: ignore[arg-type]
            with fpmode.tf_arithmetic():
                state = None
                for k, x in enumerate(tensor.inputs):
                    n = case.num_updates_for(k)
                    c = engine.coefficient(engine.effective_decay(case.decay, n), work)
                    xw = np.asarray(x).astype(work)
                    if state is None:
                        state = engine.init_state(xw, zero_debias=case.zero_debias, dtype=work)
                    engine.apply(state, xw, c)
                assert state is not None
                chunks.append(np.ascontiguousarray(engine.average(state)).tobytes())
    return b"".join(chunks)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kernels", choices=["simd", "portable", "none"], default="simd")
    args = parser.parse_args()
    from ema_cli import kernels

    if args.kernels == "portable":
        assert kernels._kernels is not None and kernels._enabled
        kernels._kernels.set_hardware(False)
    if args.kernels == "none":
        assert not kernels._enabled, "run with EMA_CLI_NO_KERNELS=1"
    from click.testing import CliRunner

    from ema_cli.cli import cli

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "golden.bin").write_bytes(golden_bytes())
    checkpoints = sorted(str(p) for p in args.inputs.resolve().glob("ckpt-*.safetensors"))
    os.chdir(out)
    for k, (precision, zero_debias, num_updates) in enumerate(RUNS):
        options = ["--decay", "0.9", "--precision", precision, "-q"]
        options += ["--zero-debias"] if zero_debias else []
        options += ["--num-updates", num_updates] if num_updates else []
        result = CliRunner().invoke(
            cli, ["average", *checkpoints, "-o", f"run-{k}.safetensors", *options]
        )
        if result.exit_code != 0:
            print(result.output, file=sys.stderr)
            return 1
    # The other averages (float64 sums and recurrences, rounded once), in one sweep.
    Path("w.json").write_text(json.dumps([1.5, -0.25] + [0.0] * (len(checkpoints) - 3) + [-0.25]))
    sweep = ["--mean", "--decay-per-step", "0.99", "--sigma-rel", "0.1", "--weights", "w.json"]
    result = CliRunner().invoke(
        cli, ["average", *checkpoints, "-o", "sweep.safetensors", *sweep, "--decay", "0.9", "-q"]
    )
    if result.exit_code != 0:
        print(result.output, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
