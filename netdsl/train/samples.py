"""Labelled images as a data set: `ImageFiles` (files decoded by Pillow each time they are read) and
`ArrayImages` (rows of one array), both `Samples`, prepared by a Preprocess. netdsl.train.data opens them."""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from netdsl.errors import NetError
from netdsl.train.augment import Preprocess, open_image

SKIP_HINT = "replace or delete the file, or skip unreadable images with --skip-corrupt"


class Samples(Dataset, ABC):
    """Labelled images. `samples[i]` is image i's centre view (C x H x W float32) and its label, prepared
    by `preprocess` (which `open_data` sets once the training set's statistics are known)."""

    def __init__(self, labels: np.ndarray, preprocess: Preprocess):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.preprocess.apply(self.image(index)), int(self.labels[index])

    @abstractmethod
    def image(self, index: int):
        """Image `index` as stored: a Pillow image or an H x W x C array, not yet scaled or cropped."""

    # the hint an unreadable image's error gives; None: the decoder's own (for images named one by one, as
    # `netdsl run`'s, which has no --skip-corrupt)
    unreadable_hint: str | None = SKIP_HINT

    def read(self, index: int, failures: list):
        """`image(index)`, or None with (index, why, hint) added to `failures`: how a loader's worker reports a
        file it cannot decode, so that the main process raises it as a NetError naming the file."""
        try:
            return self.image(index)
        except NetError as error:
            failures.append((index, error.message, self.unreadable_hint or error.hint))
            return None

    @abstractmethod
    def source(self, index: int) -> str:
        """Where image `index` comes from, for messages: a file, or an array and its row."""

    @abstractmethod
    def subset(self, keep: np.ndarray) -> Samples:
        """The images at the positions `keep`, in that order."""


class ImageFiles(Samples):
    """Image files decoded by Pillow each time they are read (in the loader's workers).

    The paths are held as one array of bytes, not a list of Path objects: a loader's forked workers touch
    the reference count of every object they read, copying the pages that hold it, so ImageNet's 1.28
    million paths (about 350 MB of Path objects, 60 MB as bytes) would be copied into every worker."""

    def __init__(self, paths: Sequence[Path] | np.ndarray, labels: np.ndarray, preprocess: Preprocess):
        super().__init__(labels, preprocess)
        if isinstance(paths, np.ndarray):
            self.paths = paths
        else:
            self.paths = np.asarray([os.fsencode(path) for path in paths], dtype=np.bytes_)

    def path(self, index: int) -> Path:
        return Path(os.fsdecode(self.paths[index]))

    def image(self, index: int):
        return open_image(self.path(index), self.preprocess.channels)

    def source(self, index: int) -> str:
        return str(self.path(index))

    def subset(self, keep: np.ndarray) -> ImageFiles:
        return ImageFiles(self.paths[np.asarray(keep, dtype=np.int64)], self.labels[keep], self.preprocess)


class ArrayImages(Samples):
    """Images held in one array (`layout`: "nhw" gray, "nchw" or "nhwc"); `rows` picks this set's rows and
    `scale` multiplies the values (digits: 0..16 -> 0..255)."""

    def __init__(
        self,
        array: np.ndarray,
        layout: str,
        labels: np.ndarray,
        preprocess: Preprocess,
        *,
        name: str,
        rows: np.ndarray | None = None,
        scale: float = 1.0,
    ):
        super().__init__(labels, preprocess)
        self.array, self.layout, self.name, self.scale = array, layout, name, scale
        self.rows = np.arange(len(labels)) if rows is None else np.asarray(rows)

    def image(self, index: int) -> np.ndarray:
        pixels = self.array[self.rows[index]]
        if self.layout == "nhw":
            pixels = pixels[..., None]
        elif self.layout == "nchw":
            pixels = pixels.transpose(1, 2, 0)
        return pixels.astype(np.float32) * np.float32(self.scale) if self.scale != 1.0 else pixels

    def source(self, index: int) -> str:
        return f"{self.name}[{self.rows[index]}]"

    def subset(self, keep: np.ndarray) -> ArrayImages:
        return ArrayImages(
            self.array,
            self.layout,
            self.labels[keep],
            self.preprocess,
            name=self.name,
            rows=self.rows[keep],
            scale=self.scale,
        )


def signals_to_the_main_process(worker: int) -> None:
    """A loading process (a DataLoader's `worker_init_fn`) ignores Ctrl-C and SIGTERM, which a terminal,
    `timeout` or a cluster's scheduler sends to every process of the group: the main process decides. Training
    ends its step, writes a checkpoint and stops, and needs its loaders until then (one killed by SIGTERM was an
    internal error, and the step's checkpoint lost); the loaders end with it, as a DataLoader's do when their
    parent goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
