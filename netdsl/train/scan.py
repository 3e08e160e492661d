"""What the scan of an image folder found, kept in the run folder so that a resumed run need not decode every
image again (at ImageNet's size, an epoch's decoding per resume).

A scan decodes each file once: which ones are unreadable, and the sums over the training set's centre crops
that give its mean, std and colour components. Its record is keyed by a fingerprint of everything those
depend on: each file's path, size and modification time, in the split's order, and the settings that shape
a crop. A record whose key differs, or that is damaged, is not an error: the folder is scanned again. The
sums are written as hexadecimal floats, so a resumed run measures the very same statistics, to the bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

FORMAT = 1  # the version of the record's layout
FILE = "data_scan.json"  # in the run folder


def fingerprint(parts: Sequence[np.ndarray | None], settings: dict) -> str | None:
    """A hex digest of `settings` and, for each part (the training and validation paths as bytes, or None),
    every file's path, size and modification time; None when a file cannot be looked at (the scan says why)."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    for paths in parts:
        digest.update(b"\0part\0")
        for raw in () if paths is None else paths:
            try:
                status = os.stat(bytes(raw))
            except (OSError, ValueError):
                return None
            digest.update(bytes(raw) + b"\0" + f"{status.st_size} {status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def to_record(key: str, bad: list[list[int]], sums: Sequence) -> dict:
    """The scan's record: the unreadable images' positions per part, and the training set's sums."""
    count, total, outer = sums
    return {
        "format": FORMAT,
        "key": key,
        "bad": [[int(index) for index in part] for part in bad],
        "count": int(count),
        "total": [float(value).hex() for value in np.ravel(total)],
        "outer": [float(value).hex() for value in np.ravel(outer)],
    }


def from_record(record, key: str, sizes: Sequence[int], channels: int):
    """(bad positions per part, [count, total, outer]) from a record of this `key` for parts of `sizes`
    images; None for any other record, a damaged one included."""
    try:
        if record.get("format") != FORMAT or record.get("key") != key:
            return None
        bad = record["bad"]
        if len(bad) != len(sizes):
            return None
        for part, size in zip(bad, sizes):
            if any(not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size for index in part):
                return None
        count = record["count"]
        total = np.asarray([float.fromhex(value) for value in record["total"]], dtype=np.float64)
        outer = np.asarray([float.fromhex(value) for value in record["outer"]], dtype=np.float64)
        if not isinstance(count, int) or count < 1 or total.shape != (channels,) or outer.size != channels**2:
            return None
        return [list(part) for part in bad], [count, total, outer.reshape(channels, channels)]
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        return None
