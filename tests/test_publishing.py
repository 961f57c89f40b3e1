"""Publishing an output made of several files (``CheckpointWriter`` and ``atomic.publish_all``),
shown with a toy two-file format: ``X.index`` names and checksums its data file.

The toy names its data file either ``X.data`` every time (as a TensorFlow bundle must: its
index does not name its data files) or ``X.data-<generation>`` (a format free to name them).
A kill between the two renames is simulated by raising from ``atomic.put_in_place`` (the one
place a finished file is renamed or swapped into place) when it is about to put the index in
place.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ema_cli import atomic
from ema_cli.checkpoint import TensorInfo
from ema_cli.errors import CheckpointError, OutputError
from ema_cli.formats.base import CheckpointWriter


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs but what ``finally`` blocks do."""


class ToyWriter(CheckpointWriter):
    """One float32 tensor ``w``: its bytes in a data file, then an index naming that file."""

    generations = False

    def begin(self) -> None:
        self._data, self._data_tmp = self.stage_file()
        self._data.truncate(self._expected)
        self._index, self._index_tmp = self.stage_file()

    def write(self, name: str, start: int, values: Any) -> None:
        data = self._block_bytes(name, start, values)
        os.pwrite(self._data.fileno(), data, start * 4)
        self._wrote(len(data))

    def finish(self) -> list[tuple[Path, Path]]:
        self._data.close()
        payload = self._data_tmp.read_bytes()
        if self.generations:
            generation = read_index(self.path)["generation"] + 1 if self.path.exists() else 1
            name = f"{self.path.name}.data-{generation}"
        else:
            generation, name = 0, f"{self.path.name}.data"
        index = {"data": name, "crc": zlib.crc32(payload), "generation": generation}
        with self._index:
            self._index.write(json.dumps(index).encode())
        return [(self._data_tmp, self.path.with_name(name)), (self._index_tmp, self.path)]

    def _discard(self) -> None:
        for handle in (getattr(self, "_data", None), getattr(self, "_index", None)):
            if handle is not None:
                handle.close()

    @classmethod
    def orphans(cls, path: Path) -> list[Path]:
        if not cls.generations or not path.exists():
            return []
        used = read_index(path)["data"]
        return [p for p in path.parent.glob(f"{path.name}.data-*") if p.name != used]


class GenerationWriter(ToyWriter):
    generations = True


def read_index(path: Path) -> dict[str, Any]:
    index: dict[str, Any] = json.loads(path.read_text())
    return index


def read_toy(path: Path) -> np.ndarray:
    """The tensor, checked against the index's checksum (CheckpointError otherwise)."""
    index = read_index(path)
    payload = path.with_name(index["data"]).read_bytes()
    if zlib.crc32(payload) != index["crc"]:
        raise CheckpointError(path, f"{index['data']} does not match its index")
    return np.frombuffer(payload, dtype=np.float32)


def save(writer_class: type[ToyWriter], path: Path, values: list[float]) -> None:
    array = np.array(values, dtype=np.float32)
    with writer_class(path, [TensorInfo("w", array.dtype, array.shape)], {}) as writer:
        writer.write("w", 0, array)
        writer.commit()


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def kill_at(monkeypatch: pytest.MonkeyPatch, victim: Path, error: BaseException) -> list[Path]:
    """Make ``atomic.put_in_place`` raise ``error`` instead of putting a file in place at
    ``victim``; returns every destination put in place, in order."""
    renamed: list[Path] = []
    real = atomic.put_in_place

    def put_in_place(src: Any, dst: Any) -> None:
        if Path(dst) == victim:
            raise error
        real(src, dst)
        renamed.append(Path(dst))

    monkeypatch.setattr(atomic, "put_in_place", put_in_place)
    return renamed


@pytest.mark.parametrize("writer_class", [ToyWriter, GenerationWriter])
def test_data_is_published_before_its_index_and_nothing_is_left(
    tmp_path: Path, writer_class: type[ToyWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ckpt"
    renamed = kill_at(monkeypatch, tmp_path / "never", Killed())
    save(writer_class, out, [1, 2, 3])
    journal = atomic.journal_path(out)
    data = tmp_path / ("ckpt.data-1" if writer_class.generations else "ckpt.data")
    assert renamed == [journal, data, out]  # the journal first, the index last
    assert read_toy(out).tolist() == [1, 2, 3]
    assert hidden(tmp_path) == []


def test_a_kill_between_renames_leaves_fixed_names_inconsistent_until_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ckpt"
    save(ToyWriter, out, [1, 2, 3])
    kill_at(monkeypatch, out, Killed())
    with pytest.raises(Killed):
        save(ToyWriter, out, [4, 5, 6])
    monkeypatch.undo()
    # The new data file replaced the one the old index checksums: what the docstring warns of.
    with pytest.raises(CheckpointError, match="does not match its index"):
        read_toy(out)
    assert atomic.journal_path(out).name in hidden(tmp_path)
    removed = ToyWriter.clean_up(out)  # the next run, under the output's lock
    assert read_toy(out).tolist() == [4, 5, 6]  # the publication was finished
    assert hidden(tmp_path) == [] and removed == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.data"]


def test_a_kill_between_renames_leaves_generation_names_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ckpt"
    save(GenerationWriter, out, [1, 2, 3])
    kill_at(monkeypatch, out, Killed())
    with pytest.raises(Killed):
        save(GenerationWriter, out, [4, 5, 6])
    monkeypatch.undo()
    assert read_toy(out).tolist() == [1, 2, 3]  # the old index still names the old data
    assert (tmp_path / "ckpt.data-2").is_file()  # the new data, not yet named by any index
    removed = GenerationWriter.clean_up(out)
    assert read_toy(out).tolist() == [4, 5, 6]
    assert removed == [tmp_path / "ckpt.data-1"]  # the old generation, an orphan now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.data-2"]


@pytest.mark.parametrize("writer_class", [ToyWriter, GenerationWriter])
def test_a_failure_before_the_journal_leaves_the_old_output_and_no_temporaries(
    tmp_path: Path, writer_class: type[ToyWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ckpt"
    save(writer_class, out, [1, 2, 3])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    kill_at(monkeypatch, atomic.journal_path(out), OSError(28, "No space left on device"))
    with pytest.raises(OutputError, match="No space left on device"):
        save(writer_class, out, [4, 5, 6])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_journal_whose_renames_all_happened_is_just_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ckpt"
    journal = atomic.journal_path(out)
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == journal:
            raise Killed  # killed after the last rename, before the journal went
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(Killed):
        save(ToyWriter, out, [7, 8])
    monkeypatch.undo()
    assert read_toy(out).tolist() == [7, 8]
    assert atomic.recover_publication(out) == []
    assert hidden(tmp_path) == []


def test_stale_temporaries_are_recognised_by_their_exact_names(tmp_path: Path) -> None:
    ours = [tmp_path / ".ema.a1b2c3d4.tmp", tmp_path / ".ema.tmp-0123abcd"]
    others = [
        tmp_path / ".ema.safetensors.a1b2c3d4.tmp",  # another output's, maybe being written
        tmp_path / ".ema.mapping.json.x_y_z_w1.tmp",
        tmp_path / ".ema.notes.tmp",
        tmp_path / ".ema.tmp-backup",
    ]
    ours[0].write_bytes(b"")
    ours[1].mkdir()
    for other in others:
        other.write_bytes(b"")
    assert sorted(atomic.remove_stale_temporaries(tmp_path / "ema")) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)


# --- putting one file in place: a swap where a file is replaced ---------------------------------


@pytest.fixture
def swapping(tmp_path: Path) -> None:
    """Skip unless this system and file system swap files (``renameat2(RENAME_EXCHANGE)``)."""
    a, b = tmp_path / "swap-probe-a", tmp_path / "swap-probe-b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    try:
        swaps = atomic._exchange(a, b) and a.read_bytes() == b"b" and b.read_bytes() == b"a"
    finally:
        a.unlink()
        b.unlink()
    if not swaps:
        pytest.skip("no RENAME_EXCHANGE on this system or file system")


@pytest.mark.usefixtures("swapping")
def test_a_replaced_file_is_swapped_out_not_renamed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    reader = final.open("rb")  # a reader of the old output keeps reading the old bytes
    renames: list[Any] = []
    monkeypatch.setattr(os, "replace", lambda *args: renames.append(args))
    handle, tmp = atomic.temporary_sibling(final)
    with handle:
        handle.write(b"new")
    atomic.publish(tmp, final, durable=False)
    assert renames == []  # the swap, not a rename over the old file (ext4's auto_da_alloc)
    assert final.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # the old one is gone
    assert reader.read() == b"old"
    reader.close()


def test_putting_in_place_over_a_symlink_a_folder_or_nothing_is_os_replace(tmp_path: Path) -> None:
    target = tmp_path / "target.bin"
    target.write_bytes(b"target")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    for final, content in ((link, b"over a link"), (tmp_path / "fresh.bin", b"fresh")):
        tmp = tmp_path / f".{final.name}.abcdefgh.tmp"
        tmp.write_bytes(content)
        atomic.put_in_place(tmp, final)
        assert not final.is_symlink() and final.read_bytes() == content and not tmp.exists()
    assert target.read_bytes() == b"target"  # the link is replaced, not what it points to
    folder = tmp_path / "folder"
    (folder / "inside").mkdir(parents=True)
    tmp = tmp_path / ".folder.abcdefgh.tmp"
    tmp.write_bytes(b"file")
    with pytest.raises(OSError):  # as os.replace: a file does not replace a folder
        atomic.put_in_place(tmp, folder)
    assert (folder / "inside").is_dir() and tmp.read_bytes() == b"file"


def test_without_the_swap_a_file_is_renamed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda tmp, final: False)
    out = tmp_path / "ckpt"
    save(ToyWriter, out, [1, 2, 3])
    save(ToyWriter, out, [4, 5, 6])
    assert read_toy(out).tolist() == [4, 5, 6]
    assert hidden(tmp_path) == []


@pytest.mark.usefixtures("swapping")
def test_a_kill_between_the_swap_and_the_unlink_leaves_a_temporary_not_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ckpt"
    save(ToyWriter, out, [1, 2, 3])
    real_unlink = os.unlink
    swapped: list[Path] = []

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        name = Path(path).name
        if name.startswith(".ckpt.") and name.endswith(".tmp") and not swapped:
            swapped.append(Path(path))
            raise Killed  # the data file was swapped in; the old one is still at the temporary
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(Killed):
        save(ToyWriter, out, [4, 5, 6])
    monkeypatch.undo()
    assert len(swapped) == 1 and swapped[0].is_file()  # the old data, under the temporary's name
    assert np.frombuffer(swapped[0].read_bytes(), np.float32).tolist() == [1, 2, 3]
    # The next run finishes the publication from the journal; it knows the old data by its
    # inode, so it neither swaps it back over the new data nor keeps it.
    ToyWriter.clean_up(out)
    assert read_toy(out).tolist() == [4, 5, 6]
    assert hidden(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.data"]


def test_a_journal_without_inodes_is_still_recovered(tmp_path: Path) -> None:
    """A journal an earlier version wrote: [temporary, final] pairs."""
    out = tmp_path / "ckpt"
    tmp = tmp_path / ".ckpt.abcdefgh.tmp"
    tmp.write_bytes(b"new")
    out.write_bytes(b"old")
    atomic.journal_path(out).write_text(json.dumps({"renames": [[tmp.name, out.name]]}))
    assert atomic.recover_publication(out) == [out]
    assert out.read_bytes() == b"new" and hidden(tmp_path) == []
