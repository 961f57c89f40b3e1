"""The shipped example (examples/): its checkpoints are reproducible and the documented commands
do what examples/README.md says they do."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import average_ok

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHECKPOINTS = EXAMPLES / "checkpoints"
PARAMS = ("dense/kernel", "dense/bias", "output/kernel", "output/bias")

# The numbers quoted in examples/README.md (held-out loss, 4 decimals).
README_LAST_LOSS = 0.2999
README_EMA_LOSS = 0.2558
README_STEP_LOSS = 0.2796  # --decay 0.99 --num-updates step


def _load(name: str) -> ModuleType:
    """A script from examples/ by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_checkpoints() -> ModuleType:
    return _load("make_checkpoints")


@pytest.fixture(scope="module")
def evaluate() -> ModuleType:
    return _load("evaluate")


def _step(path: Path) -> int:
    return int(path.name.removesuffix(".safetensors").rsplit("-", 1)[1])


def shipped() -> list[Path]:
    """The shipped checkpoints in shell-glob (text) order, as `examples/checkpoints/*` expands."""
    return sorted(CHECKPOINTS.glob("*.safetensors"))


def by_step() -> list[Path]:
    return sorted(shipped(), key=_step)


def tf_ema(paths: list[Path], decay: float) -> dict[str, np.ndarray]:
    """TF default EMA over float32 weights: shadow starts at the first value, s -= (s - x) * c."""
    c = np.float32(1) - np.float32(decay)
    shadow: dict[str, np.ndarray] = {}
    for path in paths:
        tensors = load_file(str(path))
        for name in PARAMS:
            x = tensors[name]
            s = shadow.setdefault(name, x.copy())
            shadow[name] = s - (s - x) * c
    return shadow


# --- the checkpoints ---------------------------------------------------------------------------


def test_shipped_checkpoints_exist_and_are_small() -> None:
    steps = [_step(p) for p in by_step()]
    assert steps == list(range(250, 3001, 250))
    # Unpadded step numbers: text order is not step order, which is the point of the example.
    assert [_step(p) for p in shipped()] != steps
    assert sum(p.stat().st_size for p in shipped()) < 100_000


def test_regenerating_checkpoints_is_byte_identical(
    make_checkpoints: ModuleType, tmp_path: Path
) -> None:
    make_checkpoints.main(["--out", str(tmp_path)])
    regenerated = sorted(p.name for p in tmp_path.iterdir())
    assert regenerated == [p.name for p in shipped()]
    for path in shipped():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_checkpoint_contents() -> None:
    for path in shipped():
        tensors = load_file(str(path))
        assert set(tensors) == {*PARAMS, "global_step"}
        assert all(tensors[name].dtype == np.float32 for name in PARAMS)
        assert tensors["global_step"].dtype == np.int64
        assert tensors["global_step"].shape == ()
        assert int(tensors["global_step"]) == _step(path)


def test_evaluate_cli_prints_a_table(
    evaluate: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate.main([str(by_step()[-1])])
    out = capsys.readouterr().out
    assert "ckpt-3000.safetensors" in out
    assert f"{README_LAST_LOSS:.4f}" in out


# --- the documented commands -------------------------------------------------------------------


def test_documented_average_command(evaluate: ModuleType, tmp_path: Path) -> None:
    """`ema-cli average examples/checkpoints/*.safetensors -o averaged.safetensors --decay 0.9`"""
    out = tmp_path / "averaged.safetensors"
    average_ok(*map(str, shipped()), "-o", str(out), "--decay", "0.9")

    inputs = load_file(str(by_step()[-1]))
    averaged = load_file(str(out))
    assert set(averaged) == set(inputs)
    for name, tensor in inputs.items():
        assert averaged[name].dtype == tensor.dtype, name
        assert averaged[name].shape == tensor.shape, name
    # Copied, not averaged, and from the last checkpoint by step (not by text order).
    assert averaged["global_step"].dtype == np.int64
    assert int(averaged["global_step"]) == 3000
    # TF's arithmetic, bit for bit.
    for name, expected in tf_ema(by_step(), 0.9).items():
        np.testing.assert_array_equal(averaged[name], expected, err_msg=name)

    mapping = json.loads((tmp_path / "averaged.mapping.json").read_text())
    assert mapping["mapping"] == {name: f"{name}/ExponentialMovingAverage" for name in PARAMS}
    assert "global_step" in mapping["passthrough"]
    assert [Path(c["path"]).name for c in mapping["checkpoints"]] == [p.name for p in by_step()]
    assert [c["step"] for c in mapping["checkpoints"]] == [_step(p) for p in by_step()]

    # The point of the example: the average beats the last raw checkpoint (numbers in README).
    last_loss, last_acc = evaluate.evaluate(by_step()[-1])
    ema_loss, ema_acc = evaluate.evaluate(out)
    assert ema_loss < last_loss
    assert ema_acc > last_acc
    assert round(last_loss, 4) == README_LAST_LOSS
    assert round(ema_loss, 4) == README_EMA_LOSS


def test_piped_paths_give_the_same_average(tmp_path: Path) -> None:
    """`ls examples/checkpoints/*.safetensors | ema-cli average - -o ... --decay 0.9`"""
    plain, piped = tmp_path / "plain.safetensors", tmp_path / "piped.safetensors"
    average_ok(*map(str, shipped()), "-o", str(plain), "--decay", "0.9", "-q")
    listing = "".join(f"{p}\n" for p in shipped())
    average_ok("-", "-o", str(piped), "--decay", "0.9", "-q", stdin=listing)
    a, b = load_file(str(plain)), load_file(str(piped))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_num_updates_step_variants(evaluate: ModuleType, tmp_path: Path) -> None:
    """README: with --decay 0.9 the step ramp (>= 251/260) never binds, so nothing changes;
    with --decay 0.99 it does, and the result sits between the last checkpoint and decay 0.9."""
    plain, step09, step099 = (tmp_path / f"{n}.safetensors" for n in ("plain", "s09", "s099"))
    average_ok(*map(str, shipped()), "-o", str(plain), "--decay", "0.9", "-q")
    common = ["--num-updates", "step", "-q"]
    average_ok(*map(str, shipped()), "-o", str(step09), "--decay", "0.9", *common)
    average_ok(*map(str, shipped()), "-o", str(step099), "--decay", "0.99", *common)

    a, b = load_file(str(plain)), load_file(str(step09))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert json.loads((tmp_path / "s099.mapping.json").read_text())["num_updates"] == "step"

    last_loss, _ = evaluate.evaluate(by_step()[-1])
    loss_09, _ = evaluate.evaluate(plain)
    loss_099, _ = evaluate.evaluate(step099)
    assert loss_09 < loss_099 < last_loss
    assert round(loss_099, 4) == README_STEP_LOSS


def test_order_given_follows_the_command_line(tmp_path: Path) -> None:
    """README: with --order given the shell's text order ends the replay on ckpt-750."""
    out = tmp_path / "given.safetensors"
    average_ok(*map(str, shipped()), "-o", str(out), "--decay", "0.9", "--order", "given", "-q")
    assert shipped()[-1].name == "ckpt-750.safetensors"
    assert int(load_file(str(out))["global_step"]) == 750
