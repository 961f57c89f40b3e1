"""Real Keras checkpoints (tests/fixtures/keras, made by make_keras_fixtures.py with Keras 3 and
TensorFlow): averaging each format reproduces what tf.train.ExponentialMovingAverage held during
the run, the output keeps the last checkpoint's structure, and Keras loads it (when importable).
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest

from ema_cli.formats import open_checkpoint
from ema_cli.formats.keras_archive import WEIGHTS_MEMBER, KerasArchiveReader
from tests.conftest import assert_fails, average_ok, load, load_npz, run_cli, write_checkpoint
from tests.test_hdf5 import assert_same_structure

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
BF16 = np.dtype(ml_dtypes.bfloat16)


SUFFIX = {
    "weights_h5": ".weights.h5",
    "keras": ".keras",
    "legacy_h5": ".h5",
    "legacy_weights": ".h5",
}
OPTIMIZER = {"weights_h5": "optimizer/", "keras": "optimizer/", "legacy_h5": "optimizer_weights/"}
KERAS = importlib.util.find_spec("keras") is not None
needs_keras = pytest.mark.skipif(not KERAS, reason="Keras is not importable here")


def run_files(run: str, fmt: str) -> list[Path]:
    return sorted((FIXTURES / run / fmt).iterdir(), key=lambda p: int(p.name[5:].split(".")[0]))


def expected(run: str, fmt: str) -> dict[str, np.ndarray]:
    """TF's EMA at the end of the run, under the format's tensor names."""
    names = json.loads((FIXTURES / run / "names.json").read_text())[fmt]
    ema = load_npz(FIXTURES / run / "tf_ema.npz")
    return {tensor: ema[variable] for tensor, variable in names.items()}


def average(run: str, fmt: str, out: Path, *options: str) -> Path:
    """Average a fixture run (``--decay 0.9 --num-updates step``) into ``out``."""
    average_ok(
        *run_files(run, fmt), "-o", out, "--decay", "0.9", "--num-updates", "step", "-q", *options
    )
    return out


def read_all(path: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as reader:
        return {n: reader.read(n).reshape(i.shape) for n, i in reader.tensors.items()}


def weights_file(archive: Path, folder: Path) -> Path:
    """The ``model.weights.h5`` of a ``.keras`` archive, extracted."""
    target = folder / f"{archive.name}.weights.h5"
    with zipfile.ZipFile(archive) as z:
        target.write_bytes(z.read(WEIGHTS_MEMBER))
    return target


# ---------------------------------------------------------------- TF parity and structure


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_float32_run_matches_tf_ema_exactly(fmt: str, tmp_path: Path) -> None:
    out = average("f32", fmt, tmp_path / f"ema{SUFFIX[fmt]}")
    got = read_all(out)
    for name, value in expected("f32", fmt).items():
        assert np.array_equal(got[name], value), name
    last = read_all(run_files("f32", fmt)[-1])
    assert set(got) == set(last)
    if fmt in OPTIMIZER:  # optimizer state: the last checkpoint's, bit for bit
        copied = [n for n in last if n.startswith(OPTIMIZER[fmt])]
        assert copied
        for name in copied:
            assert got[name].tobytes() == last[name].tobytes(), name
    mapping = json.loads(out.with_name("ema.mapping.json").read_text())
    assert set(mapping["mapping"]) == set(expected("f32", fmt))
    assert [c["step"] for c in mapping["checkpoints"]] == [3, 6, 9]


@pytest.mark.parametrize("fmt", ["weights_h5", "legacy_h5", "legacy_weights"])
def test_hdf5_output_keeps_the_last_checkpoints_structure(fmt: str, tmp_path: Path) -> None:
    out = average("f32", fmt, tmp_path / f"ema{SUFFIX[fmt]}")
    assert_same_structure(run_files("f32", fmt)[-1], out)


def test_keras_archive_output_is_the_last_archive_with_new_weights(tmp_path: Path) -> None:
    out = average("f32", "keras", tmp_path / "ema.keras")
    last = run_files("f32", "keras")[-1]
    with zipfile.ZipFile(out) as new, zipfile.ZipFile(last) as old:
        assert new.namelist() == old.namelist() == ["metadata.json", "config.json", WEIGHTS_MEMBER]
        for a, b in zip(new.infolist(), old.infolist(), strict=True):
            assert (a.date_time, a.compress_type, a.external_attr) == (
                b.date_time,
                b.compress_type,
                b.external_attr,
            )
        assert new.read("config.json") == old.read("config.json")
        assert new.read("metadata.json") == old.read("metadata.json")
    inner = weights_file(out, tmp_path)
    assert_same_structure(weights_file(last, tmp_path), inner)


@pytest.mark.parametrize("fmt", ["weights_h5", "keras", "legacy_h5"])
def test_bfloat16_run_matches_tf_ema_with_native_precision(fmt: str, tmp_path: Path) -> None:
    """TF's EMA runs in each variable's dtype: bfloat16 and float16 here."""
    out = average("bf16", fmt, tmp_path / f"ema{SUFFIX[fmt]}", "--precision", "native")
    got = read_all(out)
    for name, value in expected("bf16", fmt).items():
        want = value.view(BF16) if value.dtype == np.dtype("V2") else value
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want), name
    if fmt != "keras":
        assert_same_structure(run_files("bf16", fmt)[-1], out)
    with h5py.File(out if fmt != "keras" else weights_file(out, tmp_path), "r") as f:
        opaque = [n for n, o in _datasets(f) if o.id.get_type().get_class() == h5py.h5t.OPAQUE]
        assert opaque  # bfloat16 stays opaque, unchanged in kind
        marked = {n for n, o in _datasets(f) if "dtype" in o.attrs}
        assert marked == (set() if fmt == "legacy_h5" else set(opaque))


def _datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    found: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda n, o: found.append((n, o)) if isinstance(o, h5py.Dataset) else None)
    return found


def test_average_optimizer_opts_in(tmp_path: Path) -> None:
    out = average("f32", "weights_h5", tmp_path / "ema.weights.h5", "--average-optimizer")
    got, last = read_all(out), read_all(run_files("f32", "weights_h5")[-1])
    moments = [
        n
        for n in last
        if n.startswith("optimizer/") and last[n].dtype == np.float32 and last[n].ndim
    ]
    assert moments and all(not np.array_equal(got[n], last[n]) for n in moments)
    assert got["optimizer/vars/0"] == last["optimizer/vars/0"]  # the int64 iteration count
    mapping = json.loads((tmp_path / "ema.mapping.json").read_text())
    assert mapping["average_optimizer"] is True
    assert "optimizer/vars/1/ExponentialMovingAverage" in mapping["mapping"].values()


# ---------------------------------------------------------------- conversions


def test_keras_weights_to_safetensors_and_back(tmp_path: Path) -> None:
    st = average("f32", "weights_h5", tmp_path / "ema.safetensors")
    tensors = load(st)
    for name, value in expected("f32", "weights_h5").items():
        assert np.array_equal(tensors[name], value)
    assert "optimizer/vars/0" in tensors
    copies = [write_checkpoint(tmp_path / "st" / f"ckpt-{s}.safetensors", tensors) for s in (1, 2)]
    result = run_cli(
        ["average", *copies, "-o", tmp_path / "plain.weights.h5", "--decay", "0.9", "-q"]
    )
    assert result.exit_code == 0, result.output
    back = read_all(tmp_path / "plain.weights.h5")
    assert {n: v.tobytes() for n, v in back.items()} == {n: v.tobytes() for n, v in tensors.items()}


def test_keras_archive_to_weights_file(tmp_path: Path) -> None:
    out = average("f32", "keras", tmp_path / "ema.weights.h5")
    assert_same_structure(weights_file(run_files("f32", "keras")[-1], tmp_path), out)


def test_legacy_model_to_npz(tmp_path: Path) -> None:
    out = average("f32", "legacy_h5", tmp_path / "ema.npz")
    loaded = load_npz(out)
    for name, value in expected("f32", "legacy_h5").items():
        assert np.array_equal(loaded[name], value)


def test_a_keras_output_needs_keras_inputs(tmp_path: Path) -> None:
    result = run_cli(
        ["average", *run_files("f32", "weights_h5"), "-o", tmp_path / "o.keras", "--decay", "0.9"]
    )
    assert_fails(result, "a .keras output needs .keras inputs", "write a .weights.h5 output")
    assert list(tmp_path.iterdir()) == []


def rezip(
    source: Path, target: Path, compression: int, extra: dict[str, bytes] | None = None
) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
    return target


def test_deflated_archive_and_assets(tmp_path: Path) -> None:
    files = [
        rezip(p, tmp_path / "run" / p.name, zipfile.ZIP_DEFLATED, {"assets/vocab.txt": b"a\nb\n"})
        for p in run_files("f32", "keras")
    ]
    out = tmp_path / "ema.keras"
    result = run_cli(
        ["average", *files, "-o", out, "--decay", "0.9", "--num-updates", "step", "-q"]
    )
    assert result.exit_code == 0, result.output
    got = read_all(out)
    for name, value in expected("f32", "keras").items():
        assert np.array_equal(got[name], value)
    with zipfile.ZipFile(out) as z:
        assert z.read("assets/vocab.txt") == b"a\nb\n"
        assert z.getinfo(WEIGHTS_MEMBER).compress_type == zipfile.ZIP_DEFLATED
    result = run_cli(["average", *files, "-o", tmp_path / "o.safetensors", "--decay", "0.9"])
    assert_fails(result, "holds archive member 'assets/vocab.txt'", "write a .keras output")


# ---------------------------------------------------------------- broken archives


def broken_archives(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    last = run_files("f32", "keras")[-1]
    data = last.read_bytes()
    cases: dict[str, tuple[bytes | None, str]] = {
        "missing": (None, "no such file"),
        "empty": (b"", "truncated: empty, not a .keras archive"),
        "cut": (data[: len(data) // 2], "truncated .keras archive (the zip directory"),
        "not a zip": (
            b"\x89HDF\r\n\x1a\n" + b"\0" * 100,
            "not a .keras archive (not a zip archive",
        ),
    }
    out: dict[str, tuple[Path, str]] = {}
    for i, (case, (content, message)) in enumerate(cases.items()):
        path = tmp_path / f"c{i}" / "ckpt-99.keras"
        path.parent.mkdir()
        if content is not None:
            path.write_bytes(content)
        out[case] = (path, message)
    members = {"config.json": b"{}", "metadata.json": b"{}"}
    for i, (case, extra, message) in enumerate(
        [
            ("no weights", {}, "not a Keras archive: no model.weights.h5 inside"),
            ("npz weights", {"model.weights.npz": b"x"}, "weights_format='npz'"),
            (
                "garbage weights",
                {WEIGHTS_MEMBER: b"nope" * 10},
                "model.weights.h5: not an HDF5 file",
            ),
            (
                "cut weights",
                {WEIGHTS_MEMBER: b"\x89HDF\r"},
                "model.weights.h5: truncated HDF5 file",
            ),
        ]
    ):
        path = tmp_path / f"m{i}" / "ckpt-99.keras"
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as z:
            for name, content in {**members, **extra}.items():
                z.writestr(name, content)
        out[case] = (path, message)
    return out


def test_broken_archives_exit_2_with_one_line(tmp_path: Path) -> None:
    for case, (bad, message) in broken_archives(tmp_path).items():
        out = tmp_path / "o.keras"
        result = run_cli(["average", *run_files("f32", "keras"), bad, "-o", out, "--decay", "0.9"])
        assert_fails(result, str(bad), message)
        assert not out.exists(), case


def test_reader_exposes_the_weights_layout() -> None:
    with KerasArchiveReader(run_files("f32", "keras")[0]) as reader:
        assert reader.optimizer_prefixes == ("optimizer/",)
        assert reader.non_tensors == []
        assert "layers/conv2d/vars/0" in reader.tensors


# ---------------------------------------------------------------- Keras loads the outputs


def keras_weights(model: object) -> dict[str, np.ndarray]:
    """A loaded model's weights by ``layer/variable`` (loaded models drop the model name)."""
    return {"/".join(w.path.split("/")[-2:]): np.asarray(w.numpy()) for w in model.weights}  # type: ignore[attr-defined]


def assert_holds_tf_ema(model: object, run: str) -> None:
    ema = load_npz(FIXTURES / run / "tf_ema.npz")
    weights = keras_weights(model)
    for path in ema:
        want = ema[path].view(BF16) if ema[path].dtype == np.dtype("V2") else ema[path]
        assert np.array_equal(weights["/".join(path.split("/")[-2:])], want), path


@needs_keras
@pytest.mark.parametrize("run", ["f32", "bf16"])
def test_keras_loads_every_output(run: str, tmp_path: Path) -> None:
    import keras

    precision = ["--precision", "native"] if run == "bf16" else []
    archive = average(run, "keras", tmp_path / "ema.keras", *precision)
    model = keras.models.load_model(archive)
    assert_holds_tf_ema(model, run)
    last = keras.models.load_model(run_files(run, "keras")[-1])
    restored = [np.asarray(v).tobytes() for v in model.optimizer.variables]
    assert restored == [np.asarray(v).tobytes() for v in last.optimizer.variables]  # copied
    weights = average(run, "weights_h5", tmp_path / "ema.weights.h5", *precision)
    model = keras.models.load_model(run_files(run, "keras")[0])
    model.load_weights(weights)
    assert_holds_tf_ema(model, run)
    if run == "f32":  # Keras 3.15 cannot reload bfloat16 from legacy .h5 (even its own files)
        assert_holds_tf_ema(
            keras.models.load_model(average(run, "legacy_h5", tmp_path / "ema.h5")), run
        )
        model = keras.models.load_model(run_files(run, "keras")[0])
        model.load_weights(average(run, "legacy_weights", tmp_path / "w.h5"))
        assert_holds_tf_ema(model, run)
