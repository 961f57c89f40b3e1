"""``ema-cli average`` over torch checkpoints made by torch itself (tests/fixtures/torch).

Always run (no torch needed): outputs are read back with ema-cli's own reader and compared bit
for bit with the TF-style EMA of the inputs. When torch is importable, the outputs are also
loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ema_cli import engine
from ema_cli.formats import open_checkpoint
from ema_cli.formats.torch_pickle import numpy_dtype
from tests.conftest import assert_fails, run_cli, snapshot

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch"
PLAIN = [FIXTURES / f"ckpt-{s}.pt" for s in (1, 2, 3)]
LIGHTNING = [FIXTURES / f"epoch=0-step={s}.ckpt" for s in (2, 4, 6)]
MARKER = Path("/tmp/ema-cli-torch-fixture-pwned")


def tensors(path: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as reader:
        return {
            name: reader.read(name).reshape(info.shape) for name, info in reader.tensors.items()
        }


def ema(inputs: list[np.ndarray], steps: list[int] | list[None], decay: float) -> np.ndarray:
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
    args = ["average", *PLAIN, "-o", out, "--decay", "0.9", "--num-updates", "step", "-q"]
    assert run_cli(args).exit_code == 0
    loaded = torch.load(out, weights_only=True)
    ours = tensors(out)
    assert set(loaded) == set(ours)
    for name, value in loaded.items():
        assert (
            value.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == ours[name].tobytes()
        )
    # The EMA of what torch itself loads from the inputs, every tensor bit for bit.
    assert {k: torch_bits(v) for k, v in loaded.items()} == torch_ema(PLAIN, None, 0.9, [1, 2, 3])
    assert loaded["embed.weight"].untyped_storage().data_ptr() == (
        loaded["head.weight"].untyped_storage().data_ptr()
    )
    assert loaded["extra.transposed"].stride() == (1, 8)  # the saved view, as it was saved


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


# ---------------------------------------------------------------- Hugging Face folders

SHARDED = [FIXTURES / "sharded" / f"checkpoint-{s}" for s in (100, 200, 300)]
TORCH_INDEX = "pytorch_model.bin.index.json"
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json"]


def ema_of(paths: list[Path], steps: list[int] | None, decay: float) -> dict[str, np.ndarray]:
    """Every tensor's expected value: the EMA of float tensors, the last value of the others."""
    inputs = [tensors(p) for p in paths]
    out = {}
    for name, last in inputs[-1].items():
        if engine.is_averageable(last.dtype):
            out[name] = ema([i[name] for i in inputs], steps or [None] * len(paths), decay)
        else:
            out[name] = last
    return out


def assert_bits(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def test_sharded_torch_folders_average_into_a_safetensors_folder_with_a_warning(
    tmp_path: Path,
) -> None:
    out = tmp_path / "ema"
    result = run_cli(["average", *SHARDED, "-o", out, "--decay", "0.9", "--num-updates", "step"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.safetensors", *SIDE_FILES])
    want = ema_of(SHARDED, [100, 200, 300], 0.9)
    assert_bits(tensors(out / "model.safetensors"), want)
    warning = (
        f"ema-cli: warning: {SHARDED[-1]}: tied tensors (embed.weight = head.weight) are written "
        "as separate copies: a safetensors folder cannot share storage (--folder-format torch "
        "keeps them shared)"
    )
    assert warning in result.stderr.splitlines()
    record = json.loads((tmp_path / "ema.mapping.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [100, 200, 300]


def test_folder_format_torch_writes_shards_and_index_that_keep_ties(tmp_path: Path) -> None:
    outs = []
    for name in ("ema", "again"):
        out = tmp_path / name
        result = run_cli(
            [
                "average",
                *SHARDED,
                "-o",
                out,
                "--decay",
                "0.9",
                "--folder-format",
                "torch",
                "--max-shard-size",
                "1kB",
            ]
        )
        assert result.exit_code == 0, result.output
        assert "warning" not in result.stderr
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    shards = [f for f in files if f.endswith(".bin")]
    assert len(shards) >= 2 and all(s.startswith("pytorch_model-0000") for s in shards)
    assert files == sorted([*shards, TORCH_INDEX, *SIDE_FILES])
    assert snapshot(outs[0]) == snapshot(outs[1])  # identical runs, identical bytes
    assert_bits(tensors(outs[0]), ema_of(SHARDED, None, 0.9))
    with open_checkpoint(outs[0]) as reader:
        assert reader.shared_tensors == (("embed.weight", "head.weight"),)


def test_folder_format_is_for_folder_outputs(tmp_path: Path) -> None:
    result = run_cli(
        ["average", *PLAIN, "-o", tmp_path / "ema.pt", "--decay", "0.9", "--folder-format", "torch"]
    )
    assert_fails(result, "--folder-format applies to folder outputs", str(tmp_path / "ema.pt"))
    result = run_cli(
        ["average", *PLAIN, "-o", tmp_path / "ema", "--decay", "0.9", "--folder-format", "bin"]
    )
    assert result.exit_code == 2 and "'bin' is not one of 'safetensors', 'torch'" in result.stderr
    assert sorted(tmp_path.iterdir()) == []


def test_ties_written_to_a_safetensors_file_are_copies_and_said_so(tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = run_cli(["average", *PLAIN, "-o", out, "--decay", "0.9"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == (
        f"ema-cli: warning: {PLAIN[-1]}: tied tensors (embed.weight = head.weight; proj.weight "
        "= extra.transposed) are written as separate copies: a .safetensors file cannot share "
        "storage (a .pt output keeps them shared)"
    )
    got = tensors(out)
    assert got["head.weight"].tobytes() == got["embed.weight"].tobytes()
    assert got["extra.transposed"].tobytes() == got["proj.weight"].T.tobytes()
    assert_bits(got, ema_of(PLAIN, None, 0.9))
    dry = run_cli(["average", *PLAIN, "-o", tmp_path / "x.npz", "--decay", "0.9", "--dry-run"])
    assert "tied tensors (embed.weight = head.weight" in dry.stderr  # --dry-run says it too
    quiet = run_cli(["average", *PLAIN, "-o", out, "--decay", "0.9", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    kept = run_cli(["average", *PLAIN, "-o", tmp_path / "ema.pt", "--decay", "0.9"])
    assert kept.exit_code == 0 and "warning" not in kept.stderr


def test_a_refused_conversion_of_tied_tensors_is_one_error_line_without_a_warning(
    tmp_path: Path,
) -> None:
    out = tmp_path / "ema.safetensors"
    result = run_cli(["average", *LIGHTNING, "-o", out, "--decay", "0.9"])
    assert_fails(result, f"{out}: {LIGHTNING[-1]} holds value ", "--drop-non-tensors")
    dropped = run_cli(["average", *LIGHTNING, "-o", out, "--decay", "0.9", "--drop-non-tensors"])
    assert dropped.exit_code == 0, dropped.output
    warnings = [line for line in dropped.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "(--drop-non-tensors)" in warnings[0]
    assert (
        "tied tensors (state_dict/model.embed.weight = state_dict/model.head.weight"
        in (warnings[1])
    )


def test_a_broken_sharded_torch_folder_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    inputs = []
    for source in SHARDED:
        inputs.append(tmp_path / "run" / source.name)
        shutil.copytree(source, inputs[-1])
    (inputs[1] / "pytorch_model-00002-of-00002.bin").unlink()
    out = tmp_path / "ema"
    result = run_cli(["average", *inputs, "-o", out, "--decay", "0.9", "--folder-format", "torch"])
    assert_fails(
        result,
        f"{inputs[1] / 'pytorch_model-00002-of-00002.bin'}: tensor 'f16.bias': ",
        f"shard listed in {TORCH_INDEX} is missing (5 more tensors are mapped to it)",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---------------------------------------------------------------- checked with torch itself


def torch_bits(value: Any) -> bytes:
    return bytes(value.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())


def torch_ema(
    paths: list[Path], key: str | None, decay: float, steps: list[int] | None = None
) -> dict[str, bytes]:
    """The expected EMA from what torch itself loads (``key``: the state_dict inside;
    ``steps``: each checkpoint's num_updates, or none)."""
    torch = pytest.importorskip("torch")
    loaded = [torch.load(p, weights_only=True) for p in paths]
    if key is not None:
        loaded = [x[key] for x in loaded]
    out = {}
    for name in loaded[-1]:
        values = [torch_to_numpy(x[name]) for x in loaded]
        if engine.is_averageable(values[-1].dtype):
            out[name] = ema(values, steps or [None] * len(paths), decay).tobytes()
        else:
            out[name] = values[-1].tobytes()
    return out


def torch_to_numpy(value: Any) -> np.ndarray:
    import torch

    raw = value.detach().contiguous().view(-1).view(torch.uint8).numpy()
    dtype = numpy_dtype(str(value.dtype).removeprefix("torch."))
    return raw.view(dtype).reshape(tuple(value.shape))


def test_torch_loads_a_lightning_output_with_the_last_training_state(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "ema.ckpt"
    assert run_cli(["average", *LIGHTNING, "-o", out, "--decay", "0.9", "-q"]).exit_code == 0
    got = torch.load(out, weights_only=True)
    last = torch.load(LIGHTNING[-1], weights_only=True)
    assert sorted(got) == sorted(last)
    want = torch_ema(LIGHTNING, "state_dict", 0.9)
    assert {k: torch_bits(v) for k, v in got["state_dict"].items()} == want
    for key in ("epoch", "global_step", "hyper_parameters", "loops", "callbacks"):
        assert got[key] == last[key], key

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and a.shape == b.shape and torch_bits(a) == torch_bits(b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return bool(a == b)

    assert same(got["optimizer_states"], last["optimizer_states"])
    assert same(got["lr_schedulers"], last["lr_schedulers"])


@pytest.mark.parametrize("folder_format", ["safetensors", "torch"])
def test_torch_loads_model_folders_made_from_trainer_checkpoints(
    tmp_path: Path, folder_format: str
) -> None:
    torch = pytest.importorskip("torch")
    folders = []
    for n, source in zip((500, 1000, 1500), PLAIN, strict=True):
        folder = tmp_path / "run" / f"checkpoint-{n}"
        folder.mkdir(parents=True)
        shutil.copyfile(source, folder / "pytorch_model.bin")
        shutil.copyfile(PLAIN[0], folder / "optimizer.pt")
        (folder / "config.json").write_text('{"model_type": "tiny"}')
        folders.append(folder)
    out = tmp_path / "run-ema"
    args = ["average", *folders, "-o", out, "--decay", "0.9", "--folder-format", folder_format]
    assert run_cli([*args, "-q"]).exit_code == 0
    want = torch_ema([f / "pytorch_model.bin" for f in folders], None, 0.9)
    if folder_format == "torch":
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
        got = torch.load(out / "pytorch_model.bin", weights_only=True)
        storage = got["embed.weight"].untyped_storage().data_ptr()
        assert got["head.weight"].untyped_storage().data_ptr() == storage
    else:
        import safetensors.torch

        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        got = safetensors.torch.load_file(out / "model.safetensors")
    assert {k: torch_bits(v) for k, v in got.items()} == want


def test_torch_loads_every_shard_of_a_sharded_torch_output(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "ema"
    args = ["average", *SHARDED, "-o", out, "--decay", "0.9", "--folder-format", "torch"]
    assert run_cli([*args, "--max-shard-size", "1kB", "-q"]).exit_code == 0
    weight_map = json.loads((out / TORCH_INDEX).read_text())["weight_map"]
    got: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        loaded = torch.load(out / shard, weights_only=True)
        assert all(weight_map[name] == shard for name in loaded)
        got.update(loaded)
    # The inputs' tensors, from every shard of every input folder.
    inputs = [
        {
            k: v
            for shard in sorted(folder.glob("pytorch_model-*.bin"))
            for k, v in torch.load(shard, weights_only=True).items()
        }
        for folder in SHARDED
    ]
    want = {}
    for name in inputs[-1]:
        values = [torch_to_numpy(x[name]) for x in inputs]
        averaged = engine.is_averageable(values[-1].dtype)
        want[name] = (ema(values, [None] * 3, 0.9) if averaged else values[-1]).tobytes()
    assert {k: torch_bits(v) for k, v in got.items()} == want
    storage = got["embed.weight"].untyped_storage().data_ptr()
    assert got["head.weight"].untyped_storage().data_ptr() == storage


@pytest.mark.parametrize("how", ["safetensors", "torch", "torch sharded"])
def test_from_pretrained_loads_the_averaged_folder(tmp_path: Path, how: str) -> None:
    """A real transformers model (a tiny GPT-2 built from its config, no download): Trainer
    folders of ``pytorch_model.bin`` + ``config.json`` average into a folder that
    ``from_pretrained`` loads with no missing or unexpected keys, tied weights tied."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    folders = []
    for step in (10, 20, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        config.save_pretrained(folder)
        folders.append(folder)
    out = tmp_path / "ema"
    args = ["average", *folders, "-o", out, "--decay", "0.5", "--num-updates", "step", "-q"]
    if how != "safetensors":
        args += ["--folder-format", "torch"]
    if how == "torch sharded":
        args += ["--max-shard-size", "2kB"]
    assert run_cli(args).exit_code == 0
    assert (out / TORCH_INDEX).exists() == (how == "torch sharded")
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    want = ema_of([f / "pytorch_model.bin" for f in folders], [10, 20, 30], 0.5)
    for name, value in loaded.state_dict().items():
        assert torch_bits(value) == want[name].tobytes(), name
