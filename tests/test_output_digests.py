"""Every byte ema-cli writes, pinned: a refactor that changes any output fails here.

A fixed set of runs over every format and the main options writes its outputs and mappings in
``tmp_path`` (relative paths, so the mappings are the same everywhere); the sha256 of every file
written must equal ``golden/output_digests.json``. After a change that is *meant* to change
bytes, regenerate the file with ``EMA_CLI_WRITE_DIGESTS=1 python -m pytest
tests/test_output_digests.py`` and say why in the commit.

HDF5 files (.h5, .weights.h5, .keras) hold libhdf5's own structures, whose bytes may change with
its version; they are pinned for the libhdf5 version recorded in the file and compared by
content (every dataset's bytes, dtype and attributes) otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import run_cli, write_checkpoint

HERE = Path(__file__).resolve().parent
DIGESTS = HERE / "golden" / "output_digests.json"
KERAS = HERE / "fixtures" / "keras" / "f32"
WRITE = os.environ.get("EMA_CLI_WRITE_DIGESTS") == "1"


def make_inputs(root: Path) -> None:
    rng = np.random.default_rng(424242)
    (root / "npz").mkdir()
    for step in (10, 20, 30, 40, 50):
        tensors = {
            "layer/w32": rng.standard_normal((7, 5)).astype(np.float32),
            "layer/w64": rng.standard_normal(9),
            "layer/w16": rng.standard_normal(11).astype(np.float16),
            "layer/wbf": rng.standard_normal(13).astype(ml_dtypes.bfloat16),
            "counter": np.array(step, dtype=np.int64),
            "mask": rng.integers(0, 2, 6).astype(np.bool_),
        }
        write_checkpoint(root / "st" / f"ckpt-{step}.safetensors", tensors)
        np.savez(
            root / "npz" / f"ckpt-{step}.npz",
            **{k.replace("/", "."): v for k, v in tensors.items()},
        )
    for kind in ("weights_h5", "legacy_h5", "keras"):
        shutil.copytree(KERAS / kind, root / kind)


ST = [f"st/ckpt-{s}.safetensors" for s in (10, 20, 30, 40, 50)]
RUNS: dict[str, list[str]] = {
    "default": [*ST, "-o", "out/default.safetensors", "--decay", "0.9"],
    "native-zero-debias": [
        *ST, "-o", "out/nzd.safetensors", "--decay", "0.99", "--precision", "native",
        "--zero-debias", "--num-updates", "step",
    ],
    "shadow-names": [*ST, "-o", "out/shadow.safetensors", "--decay", "0.5", "--names", "shadow"],
    "select": [
        *ST, "-o", "out/select.safetensors", "--decay", "0.9", "--exclude", "layer/w64",
        "--min-step", "20", "--last", "3", "--num-updates", "index",
    ],
    "trajectory": [*ST, "-o", "out/traj.safetensors", "--decay", "0.9", "--every", "2"],
    "folder": [*ST, "-o", "out/folder", "--decay", "0.9", "--max-shard-size", "200B"],
    "npz": [*[f"npz/ckpt-{s}.npz" for s in (10, 20, 30)], "-o", "out/n.npz", "--decay", "0.8"],
    "weights-h5": [
        *[f"weights_h5/ckpt-{s}.weights.h5" for s in (3, 6, 9)], "-o", "out/kw.weights.h5",
        "--decay", "0.9",
    ],
    "weights-h5-to-st": [
        *[f"weights_h5/ckpt-{s}.weights.h5" for s in (3, 6, 9)], "-o", "out/kst.safetensors",
        "--decay", "0.9",
    ],
    "legacy-h5": [*[f"legacy_h5/ckpt-{s}.h5" for s in (3, 6, 9)], "-o", "out/l.h5", "--decay", "0.9"],
    "keras": [*[f"keras/ckpt-{s}.keras" for s in (3, 6, 9)], "-o", "out/kk.keras", "--decay", "0.9"],
    "state-1": [*ST[:3], "-o", "out/state.safetensors", "--decay", "0.9", "--state", "out/st8",
                "--settle", "0"],
    "state-2": [*ST, "-o", "out/state.safetensors", "--decay", "0.9", "--state", "out/st8",
                "--settle", "0"],
}  # fmt: skip

HDF5_SUFFIXES = (".h5", ".keras")


def content_digest(path: Path) -> str:
    """Every dataset's path, dtype, shape, bytes and attributes of an HDF5 file (or of the
    .h5 members of a .keras zip), hashed: what a libhdf5 version change must not alter."""
    import zipfile

    import h5py

    digest = hashlib.sha256()

    def visit(f: h5py.File) -> None:
        def one(name: str, obj: object) -> None:
            digest.update(name.encode())
            for key in sorted(obj.attrs):  # type: ignore[attr-defined]
                digest.update(key.encode() + repr(obj.attrs[key]).encode())  # type: ignore[attr-defined]
            if isinstance(obj, h5py.Dataset):
                digest.update(str(obj.dtype).encode() + str(obj.shape).encode())
                digest.update(np.ascontiguousarray(obj[()]).tobytes())

        f.visititems(one)

    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                data = z.read(info)
                digest.update(info.filename.encode())
                if info.filename.endswith(".h5"):
                    import io

                    with h5py.File(io.BytesIO(data), "r") as f:
                        visit(f)
                else:
                    digest.update(data)
    else:
        with h5py.File(path, "r") as f:
            visit(f)
    return digest.hexdigest()


def written_files(out: Path) -> dict[str, Path]:
    """Everything the runs wrote but the state folder (its shadows file has a random name and
    state.json records mtimes; the state runs' outputs and mappings are pinned)."""
    return {
        str(p.relative_to(out.parent)): p
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and "st8" not in p.parts
    }


def test_every_output_byte_is_as_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py

    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name, args in RUNS.items():
        result = run_cli(["average", *args, "-q"])
        assert result.exit_code == 0, (name, result.output)
    files = written_files(tmp_path / "out")
    got = {
        "hdf5_version": h5py.version.hdf5_version,
        "bytes": {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items()},
        "content": {k: content_digest(p) for k, p in files.items() if k.endswith(HDF5_SUFFIXES)},
    }
    if WRITE:
        DIGESTS.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    want = json.loads(DIGESTS.read_text())
    assert sorted(got["bytes"]) == sorted(want["bytes"])
    same_hdf5 = got["hdf5_version"] == want["hdf5_version"]
    for key, digest in want["bytes"].items():
        if key.endswith(HDF5_SUFFIXES) and not same_hdf5:
            assert got["content"][key] == want["content"][key], key
        else:
            assert got["bytes"][key] == digest, key
