"""scikit-learn's handwritten digits: 1,797 gray 8 x 8 images, ink counted 0..16, of the classes 0 to 9.

They ship inside the scikit-learn wheel as `sklearn/datasets/data/digits.csv.gz`, one image a row (64 pixels,
then the class). Importing scikit-learn to call `load_digits` takes 1.5 to 2 s of a `netdsl train` that may
last ten; the file is read here without the import. Where it is not found as described (another layout in a
later scikit-learn), `load_digits` gives the same arrays (a test checks they are equal)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from netdsl.errors import NetError

DIGITS = "digits"
COUNT, SIDE, CLASSES, INK = 1797, 8, 10, 16
NAMES = [str(digit) for digit in range(CLASSES)]  # the class names: the digits themselves


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The images (float32, N x 8 x 8, 0..16) and their classes (int64, N)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise NetError(
            "the digits data set comes with scikit-learn, which is not installed",
            where=DIGITS,
            hint="pip install 'netdsl[train]'",
        )
    read = _read_shipped(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz")
    if read is not None:
        return read
    try:
        from sklearn import datasets
    except ImportError:
        raise NetError(
            "the digits data set comes with scikit-learn, which cannot be imported",
            where=DIGITS,
            hint="pip install --force-reinstall scikit-learn",
        ) from None
    digits = datasets.load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _read_shipped(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The file's images and classes, or None where it is missing or not the table described above."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError):
        return None
    if table.shape != (COUNT, SIDE * SIDE + 1) or not np.array_equal(table, table.round()):
        return None
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > INK or labels.min() < 0 or labels.max() >= CLASSES:
        return None
    return pixels.reshape(COUNT, SIDE, SIDE).astype(np.float32), labels.astype(np.int64)
