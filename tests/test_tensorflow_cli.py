"""``ema-cli average`` over TensorFlow checkpoints made by TensorFlow itself, against the
shadows TF's own ``ExponentialMovingAverage`` held (tests/fixtures/tf, made by
``make_tf_fixtures.py``). No TensorFlow needed: the reader is ema-cli's own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from ema_cli.formats import open_checkpoint
from ema_cli.formats.tensorbundle_proto import encode_varint
from ema_cli.formats.tensorbundle_table import check_block, iter_block, parse_footer, parse_handle
from tests.conftest import assert_fails, run_cli, snapshot

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tf"
KERAS = FIXTURES / "keras"
TF1 = FIXTURES / "tf1"


def test_a_checkpoint_manager_run_averages_to_tfs_own_shadows(tmp_path: Path) -> None:
    """A Keras 3 model (Conv2D, BatchNormalization, Dense) trained with Adam and saved by
    CheckpointManager: decay 0.9 with num_updates=step gives exactly the shadows TF's EMA held;
    optimizer state (told apart by the object graph, not by key prefix) is the last one's."""
    by_index = tmp_path / "a.safetensors"
    options = ["--decay", "0.9", "--num-updates", "step", "--drop-non-tensors", "-q"]
    indexes = [KERAS / f"ckpt-{s}.index" for s in (1, 2, 3)]
    assert run_cli(["average", *indexes, "-o", by_index, *options]).exit_code == 0
    by_prefix = tmp_path / "b.safetensors"
    prefixes = [KERAS / f"ckpt-{s}" for s in (1, 2, 3)]
    assert run_cli(["average", *prefixes, "-o", by_prefix, *options]).exit_code == 0
    assert by_index.read_bytes() == by_prefix.read_bytes()

    out = safetensors.numpy.load_file(str(by_index))
    with np.load(KERAS / "keras_ema.npz") as shadows:
        model = [k[len("step3/") :] for k in shadows if k.startswith("step3/")]
        assert len(model) == 8
        assert any(k.startswith("optimizer/_trainable_variables/") for k in model)
        for key in model:
            assert out[key].tobytes() == shadows[f"step3/{key}"].tobytes(), key
    mapping = json.loads((tmp_path / "a.mapping.json").read_text())
    assert sorted(mapping["mapping"]) == sorted(model)
    with open_checkpoint(indexes[-1]) as last:
        for key in last.tensors:
            if key not in model:  # Adam moments, iterations, learning rate, save_counter
                assert out[key].reshape(-1).tobytes() == last.read(key).tobytes(), key


def test_a_tf1_saver_run_matches_its_own_shadows_in_every_half_dtype(tmp_path: Path) -> None:
    """The TF1 checkpoints hold TF's shadows (``<var>/ExponentialMovingAverage``, started at
    the initial values, which ``model.ckpt-0`` holds): replaying the variables in native
    precision gives them bit for bit in float32, float16 and bfloat16."""
    out = tmp_path / "tf1.safetensors"
    prefixes = [TF1 / f"model.ckpt-{s}" for s in range(4)]
    result = run_cli(
        [
            "average",
            *prefixes,
            "-o",
            out,
            "--decay",
            "0.9",
            "--num-updates",
            "step",
            "--precision",
            "native",
            "--exclude",
            "*/ExponentialMovingAverage",
            "--name",
            "Replay",
            "-q",
        ]
    )
    assert result.exit_code == 0, result.output
    got = safetensors.numpy.load_file(str(out))
    for name, dtype in (("dense/kernel", "float32"), ("half/bias", "float16")):
        assert got[name].dtype.name == dtype
        assert got[name].tobytes() == got[f"{name}/ExponentialMovingAverage"].tobytes(), name
    assert got["bf16/weights"].tobytes() == got["bf16/weights/ExponentialMovingAverage"].tobytes()


def test_what_to_type_and_what_is_refused(tmp_path: Path) -> None:
    everything = sorted(KERAS.glob("ckpt-*"))  # the shell's run/ckpt-* matches the data files
    out = tmp_path / "o.safetensors"
    result = run_cli(["average", *everything, "-o", out, "--decay", "0.9"])
    assert_fails(result, "is a data file of the checkpoint", f"{KERAS}/ckpt-*.index")
    indexes = [KERAS / f"ckpt-{s}.index" for s in (1, 2, 3)]
    assert_fails(
        run_cli(["average", *indexes, "-o", out, "--decay", "0.9"]),
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        "--drop-non-tensors",
    )
    assert not list(tmp_path.iterdir())


def test_a_flipped_data_byte_is_caught_by_its_checksum(tmp_path: Path) -> None:
    for s in (1, 2, 3):
        for f in KERAS.glob(f"ckpt-{s}.*"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    kernel = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"  # a model kernel
    with open_checkpoint(tmp_path / "ckpt-2.index") as reader:
        offset = reader.file_offset(kernel, 3)
    data = tmp_path / "ckpt-2.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[offset] ^= 0x40
    data.write_bytes(bytes(raw))
    result = run_cli(
        [
            "average",
            *[tmp_path / f"ckpt-{s}" for s in (1, 2, 3)],
            "-o",
            tmp_path / "o.safetensors",
            "--decay",
            "0.9",
            "--drop-non-tensors",
            "-q",
        ]
    )
    assert_fails(result, "ckpt-2.data-00000-of-00001", kernel, "checksum")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_tensorflow_output_keeps_every_entry_and_tf_restores_it(tmp_path: Path) -> None:
    """``-o ema.index``: every entry of the last checkpoint (object graph, optimizer state,
    counters) with the model variables averaged (``test_tensorflow_restores_...`` below has
    TensorFlow itself restore it)."""
    out = tmp_path / "ema.index"
    prefixes = [KERAS / f"ckpt-{s}" for s in (1, 2, 3)]
    result = run_cli(
        ["average", *prefixes, "-o", out, "--decay", "0.9", "--num-updates", "step", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ema.data-00000-of-00001").is_file()
    with np.load(KERAS / "keras_ema.npz") as saved:
        shadows = {k[len("step3/") :]: saved[k] for k in saved if k.startswith("step3/")}
    with open_checkpoint(out) as got, open_checkpoint(KERAS / "ckpt-3.index") as last:
        got.verify()  # every crc32c
        assert sorted(got.entries) == sorted(last.entries)
        graph = "_CHECKPOINTABLE_OBJECT_GRAPH"
        assert got.read_raw(graph) == last.read_raw(graph)
        for key in last.tensors:
            want = shadows[key] if key in shadows else last.read(key)
            assert got.read(key).tobytes() == want.tobytes(), key


def test_names_both_holds_the_raw_tensors_and_their_shadows(tmp_path: Path) -> None:
    """--names both (any format): the last checkpoint's raw tensors under their names, the
    averages under TF's shadow names; on a TF1 bundle output the shadows equal TF's own."""
    prefixes = [TF1 / f"model.ckpt-{s}" for s in range(4)]
    options = ["--decay", "0.9", "--num-updates", "step", "--precision", "native"]
    options += ["--exclude", "*/ExponentialMovingAverage", "--name", "Replay", "-q"]
    out = tmp_path / "both.index"
    result = run_cli(["average", *prefixes, "-o", out, *options, "--names", "both"])
    assert result.exit_code == 0, result.output
    original = tmp_path / "original.safetensors"
    assert run_cli(["average", *prefixes, "-o", original, *options]).exit_code == 0
    averaged = safetensors.numpy.load_file(str(original))
    with open_checkpoint(out) as got, open_checkpoint(TF1 / "model.ckpt-3.index") as last:
        for name in ("dense/kernel", "half/bias", "bf16/weights"):
            assert got.read(name).tobytes() == last.read(name).tobytes(), name
            shadow = got.read(f"{name}/Replay").tobytes()
            assert shadow == averaged[name].tobytes(), name
            assert shadow == last.read(f"{name}/ExponentialMovingAverage").tobytes(), name
    mapping = json.loads((tmp_path / "both.mapping.json").read_text())["mapping"]
    assert mapping["dense/kernel"] == "dense/kernel/Replay"


def test_shadow_names_are_refused_for_object_based_outputs(tmp_path: Path) -> None:
    prefixes = [KERAS / f"ckpt-{s}" for s in (1, 2, 3)]
    for names in ("shadow", "both"):
        result = run_cli(
            ["average", *prefixes, "-o", tmp_path / "o.index", "--decay", "0.9", "--names", names]
        )
        assert_fails(result, "object graph", "--names original")
    assert not list(tmp_path.iterdir())


def test_inspect_shows_each_keys_object_path_and_role() -> None:
    result = run_cli(["inspect", KERAS / "ckpt-3", "--json"])
    assert result.exit_code == 0, result.output
    tensors = {t["name"]: t for t in json.loads(result.stdout)[0]["tensors"]}
    kernel = tensors["optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"]
    assert kernel["role"] == "model" and kernel["object_path"].startswith("model/")
    assert tensors["save_counter/.ATTRIBUTES/VARIABLE_VALUE"]["role"] == "counter"
    table = run_cli(["inspect", KERAS / "ckpt-3"]).stdout
    assert "object path" in table and "model/_functional/" in table


def test_a_missing_data_file_is_one_line(tmp_path: Path) -> None:
    for s in (1, 2):
        for f in KERAS.glob(f"ckpt-{s}.*"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "ckpt-2.data-00000-of-00001").unlink()
    result = run_cli(
        [
            "average",
            tmp_path / "ckpt-1",
            tmp_path / "ckpt-2",
            "-o",
            tmp_path / "o.safetensors",
            "--decay",
            "0.9",
            "--drop-non-tensors",
        ]
    )
    assert_fails(result, "ckpt-2.data-00000-of-00001", "missing", "part of the checkpoint")


# --- a TF1 Saver run that saved only the variables ----------------------------------------

TF1_SAVER = FIXTURES / "tf1_saver"
TF1_SAVER_STEPS = (0, 3, 7, 12)
TF1_SHADOW_OPTIONS = ["--decay", "0.9", "--num-updates", "step", "--names", "shadow"]


def tf1_saver_restore() -> dict[str, str]:
    """What TF's ``ema.variables_to_restore()`` maps each checkpoint key to."""
    meta = json.loads((TF1_SAVER / "tf1_saver_restore.json").read_text())
    assert meta["steps"] == list(TF1_SAVER_STEPS)
    restore: dict[str, str] = meta["variables_to_restore"]
    return restore


def tf1_saver_shadows(step: int) -> dict[str, bytes]:
    """The bytes of the shadows TF held after saving ``model.ckpt-<step>``, by shadow key."""
    with np.load(TF1_SAVER / "tf1_saver_shadows.npz") as saved:
        return {
            k.split("/", 1)[1].removesuffix(".bits"): saved[k].tobytes()
            for k in saved
            if k.startswith(f"step{step}/")
        }


def test_a_tf1_saver_run_of_variables_gives_tfs_shadows_under_restore_names(
    tmp_path: Path,
) -> None:
    """Issue 11's done-when: a Saver that saved only the variables, replayed with ``--names
    shadow --precision native``, gives exactly (bitwise) the shadows TF's EMA held for float32,
    float16 and bfloat16, under exactly the keys ``ema.variables_to_restore()`` names (the
    copied global_step keeps its name), for every prefix of the run and as ``.index`` too."""
    restore = tf1_saver_restore()
    dtypes = json.loads((TF1_SAVER / "tf1_saver_restore.json").read_text())["dtypes"]
    assert sorted(dtypes.values()) == ["bfloat16", "float16", "float32", "int64"]
    for n in range(1, len(TF1_SAVER_STEPS) + 1):
        steps = TF1_SAVER_STEPS[:n]
        prefixes = [TF1_SAVER / f"model.ckpt-{s}" for s in steps]
        out = tmp_path / f"upto{steps[-1]}.safetensors"
        result = run_cli(
            ["average", *prefixes, "-o", out, *TF1_SHADOW_OPTIONS, "--precision", "native", "-q"]
        )
        assert result.exit_code == 0, result.output
        got = safetensors.numpy.load_file(str(out))
        assert sorted(got) == sorted(restore)
        shadows = tf1_saver_shadows(steps[-1])
        assert len(shadows) == 3
        for key, value in shadows.items():
            assert got[key].dtype.name == dtypes[restore[key]], key
            assert got[key].tobytes() == value, (steps, key)
        with open_checkpoint(Path(f"{prefixes[-1]}.index")) as last:
            assert got["global_step"].tobytes() == last.read("global_step").tobytes()

    prefixes = [TF1_SAVER / f"model.ckpt-{s}" for s in TF1_SAVER_STEPS]
    out = tmp_path / "ema.index"
    result = run_cli(
        ["average", *prefixes, "-o", out, *TF1_SHADOW_OPTIONS, "--precision", "native", "-q"]
    )
    assert result.exit_code == 0, result.output
    with open_checkpoint(out) as got, open_checkpoint(Path(f"{prefixes[-1]}.index")) as last:
        got.verify()
        assert sorted(got.tensors) == sorted(restore)
        for key, value in tf1_saver_shadows(12).items():
            assert got.read(key).tobytes() == value, key
        assert got.read("global_step").tobytes() == last.read("global_step").tobytes()
    mapping = json.loads((tmp_path / "ema.mapping.json").read_text())["mapping"]
    assert {v: k for k, v in mapping.items()} == {
        k: v for k, v in restore.items() if k != "global_step"
    }


def test_a_tf1_saver_run_in_auto_precision_is_not_tfs_half_arithmetic(tmp_path: Path) -> None:
    """The reason for ``--precision native``: the default (float32 accumulation, one rounding)
    differs from TF's float16/bfloat16 shadows on this run, and equals them for float32."""
    prefixes = [TF1_SAVER / f"model.ckpt-{s}" for s in TF1_SAVER_STEPS]
    out = tmp_path / "auto.safetensors"
    assert run_cli(["average", *prefixes, "-o", out, *TF1_SHADOW_OPTIONS, "-q"]).exit_code == 0
    got = safetensors.numpy.load_file(str(out))
    shadows = tf1_saver_shadows(12)
    key32 = "dense/kernel/ExponentialMovingAverage"
    assert got[key32].tobytes() == shadows[key32]
    differ = [k for k in shadows if k != key32 and got[k].tobytes() != shadows[k]]
    assert differ, "the half-precision shadows should show TF's native rounding"


# --- TensorFlow itself restores the outputs (skipped where TensorFlow is not installed) ----


def keras_model_and_optimizer(keras: Any) -> tuple[Any, Any]:
    """The fixture's Keras 3 model and Adam, built (variables exist) but not trained."""
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="dense"),
        ]
    )
    opt = keras.optimizers.Adam(learning_rate=0.01)
    opt.build(model.trainable_variables)
    return model, opt


def assert_tf_reads_every_key(tf: Any, index: Path) -> None:
    """``tf.train.load_checkpoint(prefix)`` lists exactly our entries and reads each one as
    our reader does (string tensors, the object graph among them, as TF's bytes)."""
    reader = tf.train.load_checkpoint(str(index.with_suffix("")))
    shapes = reader.get_variable_to_shape_map()
    with open_checkpoint(index) as ours:
        assert sorted(shapes) == sorted(ours.entries)
        for key in shapes:
            value = np.asarray(reader.get_tensor(key))
            if key in ours.tensors:
                assert list(value.shape) == list(ours.tensors[key].shape), key
                assert value.tobytes() == ours.read(key).tobytes(), key
            else:
                assert key in ours.raw_entries, key
                assert [value.item()] == ours.read_strings(key), key


def test_tensorflow_restores_the_keras_output_into_model_and_optimizer(tmp_path: Path) -> None:
    """Issue 11's first done-when, in TensorFlow: ``tf.train.Checkpoint(model=...,
    optimizer=...).restore`` of the ``.index`` output matches every object, puts TF's own
    shadow in every model variable (BatchNorm statistics included) and the last checkpoint's
    Adam state and counters in the optimizer; ``tf.train.load_checkpoint`` reads every key."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    out = tmp_path / "ema.index"
    prefixes = [KERAS / f"ckpt-{s}" for s in (1, 2, 3)]
    result = run_cli(
        ["average", *prefixes, "-o", out, "--decay", "0.9", "--num-updates", "step", "-q"]
    )
    assert result.exit_code == 0, result.output
    keys = json.loads((KERAS / "keras_keys.json").read_text())
    with np.load(KERAS / "keras_ema.npz") as saved:
        shadows = {k[len("step3/") :]: saved[k].tobytes() for k in saved if k.startswith("step3/")}

    model, opt = keras_model_and_optimizer(keras)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt)
    status = checkpoint.restore(str(tmp_path / "ema"))
    status.assert_existing_objects_matched()
    assert len(model.variables) == len(keys["model"]) == 8
    for v in model.variables:
        assert np.asarray(v.numpy()).tobytes() == shadows[keys["model"][v.path]], v.path
    with open_checkpoint(KERAS / "ckpt-3.index") as last:
        assert len(opt.variables) == len(keys["optimizer"])
        for v in opt.variables:
            want = last.read(keys["optimizer"][v.path]).tobytes()
            assert np.asarray(v.numpy()).tobytes() == want, v.path
        assert int(checkpoint.save_counter.numpy()) == int(last.read(keys["save_counter"])[0])
    assert_tf_reads_every_key(tf, out)


def test_tensorflow_restores_a_tf1_shadow_output_with_variables_to_restore(
    tmp_path: Path,
) -> None:
    """Issue 11's second done-when, in TensorFlow: the ``--names shadow`` output of the TF1
    Saver run restores through ``Saver(ema.variables_to_restore())`` into a fresh graph of the
    same variables, each holding exactly the shadow TF's EMA held (float32, float16,
    bfloat16) and global_step its last value; ``tf.train.load_checkpoint`` reads every key."""
    tf = pytest.importorskip("tensorflow")
    prefixes = [TF1_SAVER / f"model.ckpt-{s}" for s in TF1_SAVER_STEPS]
    out = tmp_path / "ema.index"
    result = run_cli(
        ["average", *prefixes, "-o", out, *TF1_SHADOW_OPTIONS, "--precision", "native", "-q"]
    )
    assert result.exit_code == 0, result.output
    shadows = tf1_saver_shadows(TF1_SAVER_STEPS[-1])
    with open_checkpoint(Path(f"{prefixes[-1]}.index")) as last:
        shapes = {k: v.shape for k, v in last.tensors.items()}
        dtypes = {k: v.dtype.name for k, v in last.tensors.items()}
    graph = tf.Graph()
    with graph.as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        for name in sorted(shapes):
            if name != "global_step":
                tf.compat.v1.get_variable(
                    name, shapes[name], getattr(tf, dtypes[name]), tf.zeros_initializer()
                )
        ema = tf.compat.v1.train.ExponentialMovingAverage(0.9, num_updates=step)
        to_restore = ema.variables_to_restore()
        assert {k: v.op.name for k, v in to_restore.items()} == tf1_saver_restore()
        saver = tf.compat.v1.train.Saver(to_restore)
        with tf.compat.v1.Session(graph=graph) as sess:
            saver.restore(sess, str(tmp_path / "ema"))
            for key, variable in to_restore.items():
                value = np.asarray(sess.run(variable))
                if key == "global_step":
                    assert int(value) == TF1_SAVER_STEPS[-1]
                else:
                    assert value.dtype.name == dtypes[variable.op.name], key
                    assert value.tobytes() == shadows[key], key
    assert_tf_reads_every_key(tf, out)


# --- bad TensorBundle inputs at the command line --------------------------------------------


def _index_layout(index: bytes) -> dict[str, int]:
    """Byte positions in a one-data-block ``.index``: the header entry's value, the first data
    block's stored CRC, the footer's first handle byte, its padding and its magic."""
    (_, _), (index_offset, index_size) = parse_footer(index[-48:])
    index_block = check_block(index[index_offset : index_offset + index_size + 5], "index")
    (_, handle), *_ = iter_block(index_block, "index")
    block_offset, block_size = parse_handle(handle)
    handles_end = len(b"".join(encode_varint(v) for v in (*parse_footer(index[-48:])[0],)))
    handles_end += len(encode_varint(index_offset) + encode_varint(index_size))
    assert handles_end < 40
    return {
        # entry 0 is the header: varint shared (0), unshared (0), value length, then the value
        "header entry": block_offset + 4,
        "block crc": block_offset + block_size + 2,
        "footer handle": len(index) - 48,
        "footer padding": len(index) - 48 + handles_end,
        "footer magic": len(index) - 1,
    }


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


KERNEL = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"  # conv/kernel, 72 B
ADAM_MOMENT = "optimizer/_variables/2/.ATTRIBUTES/VARIABLE_VALUE"  # conv/kernel's, copied


def _damage(case: str, run: Path) -> list[str]:
    """Damage ``run``'s copy of the Keras fixture as ``case`` says; returns what the error line
    must name (file, tensor where there is one, reason)."""
    # The middle checkpoint, except where only the last one's bytes are used: its object
    # graph (the output's, and what classifies its keys) and the tensors copied from it.
    step = 3 if "last checkpoint" in case else 2
    index, data = run / f"ckpt-{step}.index", run / f"ckpt-{step}.data-00000-of-00001"
    layout = _index_layout(index.read_bytes())
    size = index.stat().st_size
    with open_checkpoint(index) as reader:
        kernel_at = reader.file_offset(KERNEL, 0)
        graph = reader.entries["_CHECKPOINTABLE_OBJECT_GRAPH"]
        moment = reader.entries[ADAM_MOMENT]
    if case == "index: a flipped byte in a data block":
        _flip(index, layout["block crc"] - 40)
        return [f"{index}: ", "block checksum mismatch", "the index is corrupt"]
    if case.startswith("index: a flipped byte in the "):
        where = case.removeprefix("index: a flipped byte in the ")
        _flip(index, layout[where])
        reason = {
            "header entry": "block checksum mismatch",
            "block crc": "block checksum mismatch",
            "footer handle": "not a valid TensorBundle index",
            "footer padding": "padding",
            "footer magic": "no table magic number",
        }[where]
        return [f"{index}: ", reason]
    if case.startswith("index: truncated to "):
        keep = {"0 bytes": 0, "47 bytes": 47, "half": size // 2, "all but 1 byte": size - 1}
        _truncate(index, keep[case.removeprefix("index: truncated to ")])
        return [f"{index}: ", "not a valid TensorBundle index" if size else "empty"]
    if case == "data: a flipped byte in a tensor":
        _flip(data, kernel_at + 5)
        return [f"{data}: tensor '{KERNEL}'", "checksum mismatch"]
    if case == "data: a flipped byte in the object graph of the last checkpoint":
        _flip(data, graph.offset + graph.size - 7)
        return [f"{data}: tensor '_CHECKPOINTABLE_OBJECT_GRAPH'", "checksum mismatch"]
    if case == "data: a flipped byte in a copied tensor of the last checkpoint":
        _flip(data, moment.offset + moment.size - 1)
        return [f"{data}: tensor '{ADAM_MOMENT}'", "checksum mismatch"]
    if case == "data: truncated inside a tensor":
        _truncate(data, kernel_at + 10)
        return [f"{data}: tensor '", "truncated"]
    if case == "data: truncated to 0 bytes":
        _truncate(data, 0)
        return [f"{data}: tensor '", "truncated"]
    if case == "data: missing":
        data.unlink()
        return [f"{data}: ", "missing"]
    raise AssertionError(case)


BAD_TENSORBUNDLE_INPUTS = [
    "index: a flipped byte in a data block",
    "index: a flipped byte in the header entry",
    "index: a flipped byte in the block crc",
    "index: a flipped byte in the footer handle",
    "index: a flipped byte in the footer padding",
    "index: a flipped byte in the footer magic",
    "index: truncated to 0 bytes",
    "index: truncated to 47 bytes",
    "index: truncated to half",
    "index: truncated to all but 1 byte",
    "data: a flipped byte in a tensor",
    "data: a flipped byte in the object graph of the last checkpoint",
    "data: a flipped byte in a copied tensor of the last checkpoint",
    "data: truncated inside a tensor",
    "data: truncated to 0 bytes",
    "data: missing",
]


@pytest.mark.parametrize("suffix", [".index", ".safetensors"])
@pytest.mark.parametrize("case", BAD_TENSORBUNDLE_INPUTS)
def test_a_bad_tensorbundle_input_is_one_line_and_writes_nothing(
    case: str, suffix: str, tmp_path: Path
) -> None:
    """Every bad-input class for TensorBundle inputs (one of three checkpoints damaged):
    exit 2, one ``ema-cli: error: <file>: [tensor '<key>': ]<reason>`` line, no traceback,
    nothing in the output folder, the inputs untouched."""
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2, 3):
        for f in KERAS.glob(f"ckpt-{s}.*"):
            shutil.copy(f, run / f.name)
    fragments = _damage(case, run)
    before = snapshot(run)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    options = ["--drop-non-tensors"] if suffix == ".safetensors" else []
    prefixes = [run / f"ckpt-{s}" for s in (1, 2, 3)]
    result = run_cli(
        ["average", *prefixes, "-o", out_dir / f"ema{suffix}", "--decay", "0.9", "-q", *options]
    )
    assert_fails(result, *fragments)
    assert not list(out_dir.iterdir())
    assert snapshot(run) == before
