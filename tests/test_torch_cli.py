"""``ema-cli average`` over torch checkpoints made by torch itself (tests/fixtures/torch).

Always run (no torch needed): outputs are read back with ema-cli's own reader and compared bit
for bit with the TF-style EMA of the inputs. When torch is importable, the outputs are also
loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ema_cli import engine
from ema_cli.formats import open_checkpoint
from tests.conftest import assert_fails, run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch"
PLAIN = [FIXTURES / f"ckpt-{s}.pt" for s in (1, 2, 3)]
LIGHTNING = [FIXTURES / f"epoch=0-step={s}.ckpt" for s in (2, 4, 6)]
MARKER = Path("/tmp/ema-cli-torch-fixture-pwned")


def tensors(path: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as reader:
        return {
            name: reader.read(name).reshape(info.shape) for name, info in reader.tensors.items()
        }


def ema(inputs: list[np.ndarray], steps: list[int], decay: float) -> np.ndarray:
    """TF's EMA with num_updates = each step; float16/bfloat16 in float32, rounded once."""
    dtype = inputs[0].dtype
    work = engine.compute_dtype(dtype, "auto")
    s = inputs[0].astype(work)
    with np.errstate(all="ignore"):
        for x, step in zip(inputs, steps, strict=True):
            c = engine.coefficient(engine.effective_decay(decay, step), work)
            s = s - (s - x.astype(work)) * c
    return s.astype(dtype)


def test_state_dicts_average_bit_for_bit_and_ties_stay_tied(tmp_path: Path) -> None:
    out = tmp_path / "ema.pt"
    result = run_cli(
        ["average", *PLAIN, "-o", out, "--decay", "0.9", "--num-updates", "step", "-q"]
    )
    assert result.exit_code == 0, result.output
    inputs = [tensors(p) for p in PLAIN]
    got = tensors(out)
    mapping = json.loads((tmp_path / "ema.mapping.json").read_text())["mapping"]
    assert mapping and set(mapping) <= set(got)
    for name, value in got.items():
        if name in mapping:
            want = ema([i[name] for i in inputs], [1, 2, 3], 0.9)
        else:
            want = inputs[-1][name]  # copied: BatchNorm's num_batches_tracked
        assert value.dtype == want.dtype and value.shape == want.shape, name
        assert value.tobytes() == want.tobytes(), name
    with open_checkpoint(out) as reader:
        groups = [set(g) for g in reader.shared_storages.values()]
    assert any({"embed.weight", "head.weight"} <= g for g in groups)


def test_lightning_checkpoints_keep_the_last_optimizer_state(tmp_path: Path) -> None:
    out = tmp_path / "ema.ckpt"
    result = run_cli(["average", *LIGHTNING, "-o", out, "--decay", "0.9", "-q"])
    assert result.exit_code == 0, result.output
    last, got = tensors(LIGHTNING[-1]), tensors(out)
    assert got.keys() == last.keys()
    averaged = 0
    for name, value in got.items():
        if name.startswith("optimizer_states/") or not engine.is_averageable(value.dtype):
            assert value.tobytes() == last[name].tobytes(), name
        elif name.startswith("state_dict/") and "running_" not in name:
            averaged += value.tobytes() != last[name].tobytes()
    assert averaged > 0  # the weights really are an average, not the last checkpoint


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    MARKER.unlink(missing_ok=True)
    hostile = tmp_path / "ckpt-2.pt"
    hostile.write_bytes((FIXTURES / "hostile" / "os_system.pt").read_bytes())
    out = tmp_path / "ema.pt"
    result = run_cli(["average", PLAIN[0], hostile, "-o", out, "--decay", "0.9"])
    assert_fails(result, str(hostile), "refusing to load", "not tensor data")
    assert not MARKER.exists()
    assert not out.exists() and not (tmp_path / "ema.mapping.json").exists()


def test_torch_loads_what_ema_cli_writes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "ema.pt"
    assert run_cli(["average", *PLAIN, "-o", out, "--decay", "0.9", "-q"]).exit_code == 0
    loaded = torch.load(out, weights_only=True)
    ours = tensors(out)
    assert set(loaded) == set(ours)
    for name, value in loaded.items():
        assert (
            value.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == ours[name].tobytes()
        )
    assert loaded["embed.weight"].untyped_storage().data_ptr() == (
        loaded["head.weight"].untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_trainer_checkpoint_folders_average_through_their_model_file(
    tmp_path: Path, weights: str
) -> None:
    """A Trainer ``checkpoint-N/`` holds the model beside optimizer.pt, scheduler.pt and
    rng_state.pth (torch files too): the model file is the checkpoint, and a folder output
    gets the config but none of the training state."""
    folders = []
    for n, source in zip((500, 1000, 1500), PLAIN, strict=True):
        folder = tmp_path / "run" / f"checkpoint-{n}"
        folder.mkdir(parents=True)
        if weights == "model.safetensors":
            convert = run_cli(["average", source, "-o", folder / weights, "--decay", "0.9", "-q"])
            assert convert.exit_code == 0, convert.output
            (folder / "model.mapping.json").unlink()
        else:
            (folder / weights).write_bytes(source.read_bytes())
        for side in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (folder / side).write_bytes(PLAIN[0].read_bytes())
        (folder / "config.json").write_text('{"model_type": "tiny"}')
        folders.append(folder)
    out = tmp_path / "run-ema"
    result = run_cli(
        ["average", *folders, "-o", out, "--decay", "0.9", "--num-updates", "step", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    record = json.loads((tmp_path / "run-ema.mapping.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [500, 1000, 1500]
