"""The checks every zip-based checkpoint (npz, .keras, torch) gets when it is opened: each
member's local header must be where the central directory says, start with its signature and
name the same file; a damaged one is one line naming the file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from ema_cli.errors import CheckpointError
from ema_cli.formats.zipfiles import open_zip, stored_data_offset


def archive(tmp_path: Path) -> tuple[Path, zipfile.ZipInfo]:
    path = tmp_path / "a.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("first.npy", b"x" * 100)
        z.writestr("weights.npy", b"0123456789")
    with zipfile.ZipFile(path) as z:
        return path, z.getinfo("weights.npy")


def patched(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def test_a_sound_archive_opens_and_knows_where_each_member_starts(tmp_path: Path) -> None:
    path, info = archive(tmp_path)
    raw, opened = open_zip(path, "npz file", "an npz file")
    with raw, opened:
        start = stored_data_offset(raw, info)
        assert path.read_bytes()[start : start + 10] == b"0123456789"


@pytest.mark.parametrize(
    ("where", "new", "message"),
    [
        (30, b"W", "its local header names another file"),  # a letter of the name
        (26, b"\x0c", "its local header names another file"),  # a name 12 bytes long
        (0, b"PK\x05\x06", "bad local header"),  # not a local header's signature
    ],
    ids=["other-name", "other-name-length", "signature"],
)
def test_a_damaged_local_header_is_one_line_naming_the_file(
    tmp_path: Path, where: int, new: bytes, message: str
) -> None:
    path, info = archive(tmp_path)
    patched(path, info.header_offset + where, new)
    with pytest.raises(CheckpointError, match=message) as caught:
        open_zip(path, "npz file", "an npz file")
    assert str(path) in str(caught.value)
    assert "weights.npy" in str(caught.value)
