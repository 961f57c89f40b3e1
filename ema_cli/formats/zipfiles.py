"""Zip archive helpers shared by the formats that are zip files (npz, .keras, torch).

Opening an archive with one-line errors, the file offset of a stored member's data (for
positioned reads), and copying or streaming members with their metadata kept.
"""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Protocol

from ema_cli.atomic import open_regular
from ema_cli.errors import CheckpointError, TruncatedCheckpointError

_COPY_BYTES = 1 << 20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


def open_zip(path: Path, kind: str, a_kind: str) -> tuple[IO[bytes], zipfile.ZipFile]:
    """Open a zip-based checkpoint (``kind`` "npz file", ``a_kind`` "an npz file") and check
    every member's directory entry (``check_members``); every failure is one line naming
    ``path``."""
    fd = open_regular(path, a_kind)
    raw = os.fdopen(fd, "rb")
    try:
        archive = zipfile.ZipFile(raw)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,  # a "version needed" zipfile refuses before reading on
    ) as e:
        raw.seek(0)
        head = raw.read(4)
        raw.close()
        if not head:
            raise TruncatedCheckpointError(path, f"truncated: empty, not {a_kind}") from None
        if isinstance(e, NotImplementedError):
            raise CheckpointError(path, f"unsupported {kind} ({e})") from None
        if head == b"PK\x03\x04":  # a zip that lost its end, where the directory is
            raise TruncatedCheckpointError(
                path, f"truncated {kind} (the zip directory at its end is missing)"
            ) from None
        raise CheckpointError(path, f"not {a_kind} (not a zip archive: {e})") from None
    archive.filename = os.fspath(path)  # opened from a descriptor: name it for messages
    try:
        check_members(path, raw, archive, kind)
    except BaseException:
        archive.close()
        raw.close()
        raise
    return raw, archive


#: Compression methods zipfile can read here (bzip2 and lzma only when Python has them).
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
if getattr(zipfile, "bz2", None) is not None:
    _METHODS[zipfile.ZIP_BZIP2] = "bzip2"
if getattr(zipfile, "lzma", None) is not None:
    _METHODS[zipfile.ZIP_LZMA] = "lzma"


_METHOD_NAMES = {9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstd", 95: "xz", 98: "ppmd"}
_METHOD_NAMES.update({99: "AES encryption"})


def check_members(path: Path, raw: IO[bytes], archive: zipfile.ZipFile, kind: str) -> None:
    """Refuse, before anything is read from it, a member that zipfile could only fail on
    later: a "version needed to extract" beyond what it supports, a compression method it has
    no decoder for, encryption, a local header that is not where the directory says or that
    names another file, data beyond the end of the file."""
    size = os.fstat(raw.fileno()).st_size
    for info in archive.infolist():
        where = f"zip member '{info.filename}'"
        if info.extract_version > zipfile.MAX_EXTRACT_VERSION:
            version = f"{info.extract_version // 10}.{info.extract_version % 10}"
            raise CheckpointError(
                path, f"{where} needs zip version {version} to extract, which is not supported"
            )
        if info.compress_type not in _METHODS:
            method = _METHOD_NAMES.get(info.compress_type, "unknown")
            raise CheckpointError(
                path,
                f"{where} uses compression method {info.compress_type} ({method}), which is "
                "not supported",
            )
        if info.flag_bits & 0x1:
            raise CheckpointError(path, f"{where} is encrypted; ema-cli cannot read it")
        try:
            expected = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        except UnicodeEncodeError:
            expected = b""
        try:
            start, local_name = _local_header(raw.fileno(), info, len(expected))
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise CheckpointError(path, f"corrupt {kind}: {e}") from None
        if local_name != expected:
            raise CheckpointError(
                path, f"corrupt {kind}: {where}: its local header names another file"
            )
        if start + info.compress_size > size:
            raise TruncatedCheckpointError(
                path,
                f"truncated {kind}: {where} ends at byte {start + info.compress_size} but the "
                f"file has {size}",
            )


def verify_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, kind: str) -> None:
    """Read a member to its end, so zipfile checks its CRC-32: for members that are copied
    into the output, found bad now rather than when the output is committed."""
    try:
        with archive.open(info) as stream:
            while stream.read(_COPY_BYTES):
                pass
    except ZIP_ERRORS as e:
        raise CheckpointError(path, f"corrupt {kind}: zip member '{info.filename}': {e}") from None


def stored_data_offset(raw: IO[bytes], info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start in the archive (after its local header)."""
    return _local_header(raw.fileno(), info, 0)[0]


def _local_header(fd: int, info: zipfile.ZipInfo, name_bytes: int) -> tuple[int, bytes]:
    """A member's local header, in one positioned read (an archive's members are checked one
    by one when it is opened): where the member's data start, and the file name the header
    holds if it is ``name_bytes`` long (else as much of it as was read, which then differs)."""
    header = os.pread(fd, _LOCAL_HEADER.size + name_bytes, info.header_offset)
    if len(header) < _LOCAL_HEADER.size:
        raise EOFError(f"zip member {info.filename!r}: local header is cut off")
    signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(header)
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"zip member {info.filename!r}: bad local header")
    start = int(info.header_offset) + _LOCAL_HEADER.size + int(name_length) + int(extra_length)
    name = header[_LOCAL_HEADER.size :]
    return start, name if name_length == name_bytes else name + b"\0"  # \0: never a match


def copy_zip_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A fresh ``ZipInfo`` with a member's name, date, compression, permissions and comment."""
    new = zipfile.ZipInfo(info.filename, info.date_time)
    new.compress_type = info.compress_type
    new.external_attr = info.external_attr
    new.create_system = info.create_system
    new.comment = info.comment
    return new


def copy_member(source: zipfile.ZipFile, info: zipfile.ZipInfo, target: zipfile.ZipFile) -> None:
    """Copy one member's content unchanged (re-compressed the same way), streaming. A damaged
    source member (readers verify the ones they copy when they open the archive, so only a
    file changed since) is a ``CheckpointError`` naming the source archive."""
    new = copy_zip_info(info)
    new.file_size = info.file_size

    def damaged(e: Exception) -> CheckpointError:
        return CheckpointError(
            str(source.filename or "zip archive"), f"zip member '{info.filename}': {e}"
        )

    try:
        src = source.open(info)
    except ZIP_ERRORS as e:
        raise damaged(e) from None
    with src, target.open(new, "w") as dst:
        while True:
            try:
                chunk = src.read(_COPY_BYTES)
            except ZIP_ERRORS as e:  # only the source's reads: a failing target is not damage
                raise damaged(e) from None
            if not chunk:
                break
            dst.write(chunk)


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
