"""Files written atomically: through a temporary file in the same folder, renamed into place, so a reader
(another process, a second compile at the same time) sees the old file or the new one, never half of one.

Unlike `tempfile.mkstemp` (always 0600), the temporary gets the mode any new file gets, 0666 less the
umask, and keeps it when renamed: a build folder, an imported net or a weights file reads like any
file its user writes.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from netdsl.errors import NetError, os_hint

TEMPORARY_TRIES = 100  # random names tried for a temporary file, as tempfile.mkstemp does


def new_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside `path`, opened for writing: its descriptor and its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(TEMPORARY_TRIES):
        temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}"
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue  # another writer's temporary: draw another name
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def parse_json(text: str | bytes):
    """`json.loads`, with text nested past Python's recursion limit a ValueError like any other text json
    cannot read (it raises RecursionError there): every reader of a user's JSON catches ValueError alone. So is
    a string that is not text: an escape of half a UTF-16 pair alone (`"\\udcff"`), which json reads into a
    str that no file or terminal can take (writing it, to a report or a message, fails)."""
    import json

    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                half = item[error.start : error.end]
                raise ValueError(f"the string {item[:40]!a} holds {half!a}, half of a UTF-16 pair: not text") from None
    return value


def refuse_overwriting(output: Path, inputs, flag: str) -> None:
    """NetError (on `flag`) where `output` is one of the files the command reads: writing it would destroy it."""
    try:
        target = Path(output).resolve()
    except (OSError, RuntimeError):  # a symlink loop: the write fails and says so
        return
    for read in inputs:
        if read is not None and Path(read).exists() and Path(read).resolve() == target:
            same = "" if str(read) == str(output) else f" ({read})"
            raise NetError(
                f"{output} is a file this command reads{same}: writing it would destroy it",
                where=flag,
                hint="write the output under another name",
            )


def refuse_folder(output: Path, flag: str) -> None:
    """NetError (on `flag`) where `output` cannot name a file: empty, `.` or `..`, or a folder that exists. Said
    before the command does its work, not by the write at its end."""
    path = Path(output)
    if path.name in ("", ".", "..") or path.is_dir():
        raise NetError(
            f"{str(output) or repr(str(output))} is a folder, not a file to write",
            where=flag,
            hint="give the name of a file (in a folder that exists)",
        )


def write_temporary(path: Path, data: bytes) -> Path:
    """`data` written whole to a new temporary beside `path`, which the caller renames into place (or
    removes); NetError (naming the file) when it cannot be written."""
    try:
        handle, temporary = new_temporary(path)
    except OSError as error:
        raise NetError(
            f"cannot write {path}: {error.strerror or error}", where=str(path), hint=os_hint(error)
        ) from None
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise NetError(
            f"cannot write {path}: {error.strerror or error}", where=str(path), hint=os_hint(error)
        ) from None
    return temporary


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` atomically; NetError (naming the file) when it cannot."""
    temporary = write_temporary(path, data)
    try:
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise NetError(
            f"cannot write {path}: {error.strerror or error}", where=str(path), hint=os_hint(error)
        ) from None


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` (UTF-8, line ends as given) to `path` atomically."""
    write_atomic_bytes(path, text.encode("utf-8"))


def write_array(path: Path, array) -> None:
    """Writes a numpy array as a `.npy` file, atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic_bytes(path, buffer.getvalue())


def write_arrays(path: Path, arrays: dict) -> None:
    """Writes numpy arrays by name as an `.npz` file (what np.savez writes: `NAME.npy` members of a zip), atomically.
    Written member by member rather than by `np.savez(file, **arrays)`, where a name such as `file` or
    `allow_pickle` would be taken for one of its own arguments."""
    import io
    import zipfile

    import numpy as np

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    write_atomic_bytes(path, buffer.getvalue())


def sorted_safetensors_header(head: bytes) -> bytes:
    """A safetensors file's first bytes (the 8-byte length and the JSON header it counts) with the header's keys
    sorted, the same length: the Rust writer orders the metadata by hash, so one content could give other bytes
    from run to run. Only the header moves; the tensors' offsets into the data after it stay as they are."""
    import json
    import struct

    (size,) = struct.unpack("<Q", head[:8])
    header = json.loads(head[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > size:  # the writer's own JSON is as compact; keep it rather than move the data
        return head[: 8 + size]
    return head[:8] + text + b" " * (size - len(text))  # spaces pad a header, as the format allows


def sort_safetensors_header(path: Path) -> None:
    """Sorts the header of the safetensors file at `path` in place (`sorted_safetensors_header`)."""
    import struct

    with open(path, "r+b") as file:
        length = file.read(8)
        (size,) = struct.unpack("<Q", length)
        head = length + file.read(size)
        file.seek(0)
        file.write(sorted_safetensors_header(head))
