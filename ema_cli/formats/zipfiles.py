"""Zip archive helpers shared by the formats that are zip files (npz, .keras, torch).

Opening an archive with one-line errors, the file offset of a stored member's data (for
positioned reads), and copying or streaming members with their metadata kept.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Protocol

from ema_cli.errors import CheckpointError, TruncatedCheckpointError

_COPY_BYTES = 1 << 20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


def open_zip(path: Path, kind: str, a_kind: str) -> tuple[IO[bytes], zipfile.ZipFile]:
    """Open a zip-based checkpoint (``kind`` "npz file", ``a_kind`` "an npz file"); every
    failure is one line naming ``path``."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the reader
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except IsADirectoryError:
        raise CheckpointError(path, f"is a directory, not {a_kind}") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot open: {e.strerror}") from None
    try:
        return raw, zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raw.seek(0)
        head = raw.read(4)
        raw.close()
        if not head:
            raise TruncatedCheckpointError(path, f"truncated: empty, not {a_kind}") from None
        if head == b"PK\x03\x04":  # a zip that lost its end, where the directory is
            raise TruncatedCheckpointError(
                path, f"truncated {kind} (the zip directory at its end is missing)"
            ) from None
        raise CheckpointError(path, f"not {a_kind} (not a zip archive: {e})") from None


def stored_data_offset(raw: IO[bytes], info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start in the archive (after its local header)."""
    raw.seek(info.header_offset)
    header = raw.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
        raise EOFError(f"zip member {info.filename!r}: local header is cut off")
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"zip member {info.filename!r}: bad local header")
    return int(info.header_offset) + _LOCAL_HEADER.size + int(name_length) + int(extra_length)


def copy_zip_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A fresh ``ZipInfo`` with a member's name, date, compression, permissions and comment."""
    new = zipfile.ZipInfo(info.filename, info.date_time)
    new.compress_type = info.compress_type
    new.external_attr = info.external_attr
    new.create_system = info.create_system
    new.comment = info.comment
    return new


def copy_member(source: zipfile.ZipFile, info: zipfile.ZipInfo, target: zipfile.ZipFile) -> None:
    """Copy one member's content unchanged (re-compressed the same way), streaming."""
    new = copy_zip_info(info)
    new.file_size = info.file_size
    with source.open(info) as src, target.open(new, "w") as dst:
        shutil.copyfileobj(src, dst, _COPY_BYTES)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def stream_member(target: zipfile.ZipFile, info: zipfile.ZipInfo, *parts: Readable) -> None:
    """Write member ``info`` from ``parts`` read to their end, in order."""
    with target.open(info, "w") as dst:
        for part in parts:
            shutil.copyfileobj(part, dst, _COPY_BYTES)


# ---------------------------------------------------------------- reading


#: What reading a damaged zip member can raise (NotImplementedError: a compression method
#: zipfile does not support, such as Deflate64).
ZIP_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
)
