"""The scan of a data set: every image decoded once, to find the unreadable ones and to sum the training set's
centre crops (its mean, std and colour components come from the sums); and its record, kept in the run folder
so that a resumed run need not decode every image again (at ImageNet's size, an epoch's decoding per resume).

Under torchrun the processes share the scan: each decodes every Nth batch of images and the results are
gathered, then summed in the order one process sums them, so N processes measure the very same statistics,
to the bit, in about an Nth of the time.

The record is keyed by a fingerprint of everything the scan's findings depend on: each file's path, size and
modification time, in the split's order, and the settings that shape a crop. A record whose key differs, or
that is damaged, is not an error: the folder is scanned again. The sums are written as hexadecimal floats, so
a resumed run measures the very same statistics, to the bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from netdsl.errors import NetError
from netdsl.train.augment import crop_view
from netdsl.train.samples import signals_to_the_main_process
from netdsl.train.world import World

BATCH = 32  # images per loader task, and the unit of the shares of several processes
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


def agreed(world: World | None, saved):
    """`saved` (what a record says) where every process of `world` can use its record, else None: the
    processes decode together or not at all (a node whose copy of the data differs in its files' times
    would otherwise wait for the others' shares of a scan they skip)."""
    if world is None or not world.distributed:
        return saved
    return saved if all(world.gather(saved is not None)) else None


def decode(
    samples,
    measure: bool,
    workers: int,
    world: World | None = None,
    meter: Callable | None = None,
    largest: int | None = None,
):
    """Decodes each of `samples` (a Samples) once, by `workers` loader processes, with the sums of the centre
    crops when `measure`. Returns the unreadable images in order, and the sums: the pixel
    count, the per-channel sum and the channels' outer-product sum (float64). With a `world` of several
    processes, each decodes its share of the batches and every process gets the whole result. `meter`, given
    the number of images this process decodes, returns what shows the progress (`advance(count)`, `close()`).
    Each unreadable image is (index, why, hint): the hint None where the file could not be decoded at all.
    `largest`: the largest size training scales an image to (see Preprocess.pixels), or None."""
    batches = -(-len(samples) // BATCH)
    shared = world is not None and world.distributed
    share = range(world.rank, batches, world.size) if shared else range(batches)
    tasks = [range(b * BATCH, min(len(samples), (b + 1) * BATCH)) for b in share]
    loader = DataLoader(
        _Decode(samples, measure, largest),
        batch_sampler=tasks,
        num_workers=workers,
        collate_fn=_sum_batch,
        worker_init_fn=signals_to_the_main_process,
        generator=torch.Generator(),  # DataLoader draws a base seed: from its own generator, not torch's global one
    )
    found, shown = {}, None if meter is None else meter(sum(map(len, tasks)))
    try:
        for b, task, result in zip(share, tasks, loader):
            found[b] = result
            if shown is not None:
                shown.advance(len(task))
    finally:
        if shown is not None:
            shown.close()
    if shared:  # every process, even one whose share is empty
        for part in world.gather(found):
            found.update(part)
    failures, count, total, outer = [], 0, 0.0, 0.0
    for b in range(batches):  # one order, whoever decoded each batch: the same sums to the bit
        batch_failures, batch_count, batch_total, batch_outer = found[b]
        failures += batch_failures
        count, total, outer = count + batch_count, total + batch_total, outer + batch_outer
    return failures, count, total, outer


class _Decode(Dataset):
    """Image i's centre crop's sums (when `measure`), or why it is unreadable."""

    def __init__(self, samples, measure: bool, largest: int | None = None):
        self.samples, self.measure, self.largest = samples, measure, largest

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        preprocess = self.samples.preprocess
        try:
            image = self.samples.image(index)
        except NetError as error:  # no hint of its own: the caller's, on replacing or skipping the file
            return index, error.message, None, None
        try:
            pixels = preprocess.pixels(image, self.largest)
        except NetError as error:  # scaling it: past Pillow's bound on pixels, with what to do about it
            return index, error.message, error.hint, None
        if not self.measure:
            return index, None, None, None
        top, left = (pixels.shape[0] - preprocess.crop[0]) // 2, (pixels.shape[1] - preprocess.crop[1]) // 2
        values = crop_view(pixels, top, left, preprocess.crop, False).reshape(-1, pixels.shape[2]).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite pixels: reported at the first step
            return index, None, None, (len(values), values.sum(axis=0), values.T @ values)


def _sum_batch(items: list):
    failures = [(index, message, hint) for index, message, hint, _ in items if message is not None]
    sums = [stats for *_, stats in items if stats is not None]
    return failures, sum(s[0] for s in sums), sum((s[1] for s in sums), 0.0), sum((s[2] for s in sums), 0.0)
