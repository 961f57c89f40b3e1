"""The format registry: a format is one module and one registry line.

``tests/toy_format.py`` is a complete (tiny) format; registered here for the length of a test,
it is found, inspected, step-numbered, averaged, converted and listed like the built-in ones,
and a read-only registration is refused as an output. The README's format table is the
registry's own rendering.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ema_cli import engine
from ema_cli.formats import find_checkpoint, registry
from ema_cli.plan import step_from_name
from tests.conftest import assert_fails, load, run_cli
from tests.toy_format import TOY, TOY_READ_ONLY, ToyWriter

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def toy() -> Iterator[None]:
    with registry.register(TOY), registry.register(TOY_READ_ONLY):
        yield


def write_toy(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from ema_cli.checkpoint import TensorInfo

    infos = [TensorInfo(k, v.dtype, v.shape) for k, v in tensors.items()]
    with ToyWriter(path, infos, {}) as writer:
        for k, v in tensors.items():
            writer.write(k, 0, v.reshape(-1))
        writer.commit(durable=False)
    return path


def test_a_registered_format_is_averaged_inspected_and_listed(toy: None, tmp_path: Path) -> None:
    values = [np.array([1.0, 3.0], np.float32), np.array([3.0, 5.0], np.float32)]
    paths = [
        write_toy(tmp_path / f"ckpt-{step}.toy", {"w": v, "n": np.array(step, np.int64)})
        for step, v in zip((7, 12), values, strict=True)
    ]
    assert step_from_name(str(paths[0])) == 7
    assert find_checkpoint(tmp_path / "ckpt-7.toy") == paths[0]

    out = tmp_path / "ema.toy"
    result = run_cli(["average", *paths, "-o", out, "--decay", "0.5", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ema.mapping.json").read_text())["mapping"] == {
        "w": "w/ExponentialMovingAverage"
    }
    # A toy output reads back through the toy reader: the TF-exact average, the counter copied.
    from tests.toy_format import ToyReader

    with ToyReader(out) as reader:
        c = engine.coefficient(np.float32(0.5), np.dtype(np.float32))
        expected = values[0] - (values[0] - values[1]) * c
        assert reader.read("w").tobytes() == expected.astype(np.float32).tobytes()
        assert int(reader.read("n")[0]) == 12

    converted = tmp_path / "ema.safetensors"
    assert run_cli(["average", *paths, "-o", converted, "--decay", "0.5", "-q"]).exit_code == 0
    assert load(converted)["w"].tobytes() == expected.astype(np.float32).tobytes()

    inspected = run_cli(["inspect", paths[0], "--json"])
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)[0]["format"] == "toy"
    assert ".toy" in run_cli(["average", "--help"]).stdout
    listed = json.loads(run_cli(["formats", "--json"]).stdout)
    assert {"toy", "toy (read only)"} <= {f["name"] for f in listed}


def test_a_read_only_format_is_read_but_never_written(toy: None, tmp_path: Path) -> None:
    paths = []
    for step in (1, 2):
        toy_path = write_toy(tmp_path / f"ckpt-{step}.toy", {"w": np.full(2, step, np.float32)})
        paths.append(toy_path.rename(tmp_path / f"ckpt-{step}.rtoy"))
    ok = run_cli(["average", *paths, "-o", tmp_path / "ema.safetensors", "--decay", "0.9", "-q"])
    assert ok.exit_code == 0, ok.output
    refused = run_cli(["average", *paths, "-o", tmp_path / "ema.rtoy", "--decay", "0.9"])
    assert_fails(refused, "unsupported output format")
    assert not (tmp_path / "ema.rtoy").exists()


def test_unregistered_again_after_the_test(tmp_path: Path) -> None:
    assert registry.by_suffix("x.toy") is None
    assert ".toy" not in run_cli(["average", "--help"]).stdout


def test_the_readme_format_table_is_the_registry() -> None:
    assert registry.markdown_table() in README.read_text(encoding="utf-8")
