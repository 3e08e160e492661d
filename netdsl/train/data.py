"""Data for training: where the images come from (an image folder, an .npz file, scikit-learn's digits), the
training set's statistics (per-channel mean and std, the colour covariance's principal components), and the
loader that hands out batches in a seeded, resumable, sharded order.

Randomness comes from two places only, both seeded: the order of epoch e is a permutation drawn from
(seed, e); a sample's augmentation is drawn from (seed, epoch, index). So batches do not depend on the
number of loader workers, a run resumed at batch k sees what the uninterrupted run saw, and R ranks with
batch B see, between them, what one rank with batch R*B sees.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from tokenize import TokenError

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from netdsl.errors import NetError, did_you_mean
from netdsl.train import scan
from netdsl.train.augment import (
    PIXEL_RANGE,
    VIEW_COUNTS,
    Augment,
    Preprocess,
    image_mode,
    principal_components,
    sample_rng,
)
from netdsl.train.digits import DIGITS, INK, NAMES, load_digits
from netdsl.train.listing import DATA_HINT, class_folders, class_place, is_image_list, read_list
from netdsl.train.samples import SKIP_HINT, ArrayImages, ImageFiles, Samples, signals_to_the_main_process
from netdsl.train.world import World

__all__ = [
    "ArrayImages",
    "Augment",
    "Batches",
    "DataSplit",
    "ImageFiles",
    "Preprocess",
    "Samples",
    "batches_per_epoch",
    "epoch_order",
    "loader",
    "open_data",
    "split_rows",
]

# What np.load raises for a file that is no readable .npz: beyond a damaged archive or array, zipfile's refusals
# of a newer zip version or compression method (NotImplementedError) and of an encrypted member (RuntimeError)
UNREADABLE_NPZ = (
    OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, TokenError, NotImplementedError, RuntimeError
)  # fmt: skip


@dataclass
class DataSplit:
    """A data set opened for training: both halves share `preprocess` (the training set's mean and std);
    `augment` is the paper's training augmentation with this set's colour statistics (replace fields to
    change it: `dataclasses.replace(split.augment, pca_noise=0)`); `skipped` lists unreadable files left out."""

    train: Samples
    val: Samples | None
    classes: list[str]
    preprocess: Preprocess
    augment: Augment
    skipped: list[str] = field(default_factory=list)
    scan: dict | None = None  # an image folder's scan record (netdsl.train.scan), for `scan_record` next time


def open_data(
    spec: str | Path,
    net_input: tuple[int, int, int],
    *,
    num_outputs: int | None = None,
    size: int | None = None,
    largest: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    std: bool = False,
    skip_corrupt: bool = False,
    workers: int = 0,
    scan_record: dict | None = None,
    world: World | None = None,
    statistics: bool = True,
    check: Sequence[str] = ("train", "val"),
    meter: Callable | None = None,
    val_spec: str | Path | None = None,
) -> DataSplit:
    """Opens `spec` (an image folder, an image list, an .npz file or "digits") for a net taking `net_input`
    (C, H, W) images and scoring `num_outputs` classes (checked when given); with `val_spec` (a folder of class
    folders, an image list or an .npz file's x and y), all of `spec` trains and those images validate.

    `size`: the shorter side is scaled to this before cropping (default: the smaller of H and W; the paper
    used 256 for 224 crops); `largest`: the largest size training scales its images to (the top of a range
    of sizes), at which the scan checks each training image too. `val_fraction`, `seed`: how a set without
    its own validation images is split (per class, so each class keeps its share). `std`: also divide by the
    per-channel std. Every image is decoded once here (by `workers` processes) to measure the training set
    and find unreadable files, which are errors unless `skip_corrupt`; an image folder's `scan_record` of
    the same files (a DataSplit's `scan`, saved) stands for that pass, and the processes of a `world` share
    it. Without `statistics` (an evaluation with the weights' own preprocessing) the mean is 0 and only the
    parts named in `check` are decoded, for their unreadable files. `meter(title, images)` shows the
    progress of reading image files (netdsl.train.progress.Meter)."""
    channels, height, width = net_input
    if min(net_input) < 1:
        raise NetError(
            f"the net's input {channels} x {height} x {width} is not an image's shape",
            where=str(spec),
            hint="a net that trains on images takes C x H x W: write its input as `input image: 3 x 32 x 32`",
        )
    check_workers(workers)
    if not 0 <= val_fraction < 1:
        raise NetError(
            f"the validation fraction must be in [0, 1), not {val_fraction}",
            where="--val-fraction",
            hint="0.1 keeps a tenth of each class for validation; 0 none",
        )
    if size is not None and size < 1:
        raise NetError(
            f"the image size must be positive, not {size}",
            where="--size",
            hint="give the shorter side images are resized to, in pixels, e.g. 256",
        )
    base = Preprocess(size=size or min(height, width), crop=(height, width), channels=channels, mean=(0.0,) * channels)
    where = str(spec)
    if val_spec is not None:
        val_fraction = 0.0  # the validation images are the others
    if where == DIGITS:
        train, val, classes = _open_digits(base, val_fraction, seed)
    else:
        path = Path(spec)
        if path.is_dir():
            train, val, classes = _open_folder(path, base, val_fraction, seed)
        elif path.is_file() and path.suffix.lower() == ".npz":
            train, val, classes = _open_npz(path, base, val_fraction, seed, num_outputs)
        elif is_image_list(path):  # as Caffe's
            image_mode(base.channels, where)
            train, val, classes = _split_files(*read_list(path, num_outputs), base, val_fraction, seed)
        elif not path.exists():
            raise NetError(
                f"no such data folder or file: {spec}", where=where, hint=did_you_mean(where, [DIGITS]) or DATA_HINT
            )
        else:
            raise NetError(f"{spec} is neither a data folder, an image list nor an .npz file", where=where,
                           hint=DATA_HINT)  # fmt: skip
    if val_spec is not None:
        if val is not None:
            raise NetError(f"{spec} has validation images of its own, and val_data gives others ({val_spec})",
                           where=where, hint="give the training images alone, or leave out val_data")  # fmt: skip
        val = _validation_apart(str(val_spec), base, classes, num_outputs)
    _check_classes(classes, [train, val], num_outputs, where)
    key = saved = None
    parts = (statistics or "train" in check, "val" in check)
    whole = statistics and all(parts)  # a scan a record can be made of
    if isinstance(train, ImageFiles) and (val is None or isinstance(val, ImageFiles)):
        if whole or scan_record is not None:  # (a stat of every file: none for a record never made nor read)
            settings = {"size": base.size, "crop": list(base.crop), "channels": channels, "skip_corrupt": skip_corrupt}
            settings.update({"largest": largest} if largest is not None else {})  # a record's key as it was
            key = scan.fingerprint([train.paths, None if val is None else val.paths], settings)
        sizes = [len(train), 0 if val is None else len(val)]
        saved = scan.from_record(scan_record, key, sizes, channels) if key and scan_record is not None else None
        saved = scan.agreed(world, saved)
    reading = (world, meter)
    train, val, skipped, sums, bad = _scan(
        train, val, workers, skip_corrupt, where, saved, reading, statistics, parts, largest
    )
    if statistics:
        preprocess, augment = _statistics(sums, base, classes, std)
    else:
        preprocess, augment = replace(base, classes=list(classes)), Augment(pca_noise=0.0)
    for samples in (train, val):
        if samples is not None:
            samples.preprocess = preprocess
    record = scan.to_record(key, bad, sums) if key and whole else None
    return DataSplit(train, val, classes, preprocess, augment, skipped, record)


def _open_folder(root: Path, base: Preprocess, val_fraction: float, seed: int):
    image_mode(base.channels, str(root))  # a net whose inputs images cannot fill: said once, not per file
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir():
        classes, paths, labels = class_folders(train_dir)
        if val_dir.is_dir():
            val_classes, val_paths, val_labels = class_folders(val_dir)
            unknown = [name for name in val_classes if name not in classes]
            if unknown:
                raise NetError(
                    f"val/ has classes that train/ has not: {_some_of(unknown)}",
                    where=str(val_dir / unknown[0]),
                    hint="give val/ class folders named as train/'s (all of them, or some)",
                )
            val_labels = _renumbered(val_labels, val_classes, classes)  # val/ may lack a class of train/
            return ImageFiles(paths, labels, base), ImageFiles(val_paths, val_labels, base), classes
    else:
        classes, paths, labels = class_folders(root)
    return _split_files(classes, paths, labels, base, val_fraction, seed)


def _split_files(classes: list[str], paths, labels: np.ndarray, base: Preprocess, val_fraction: float, seed: int):
    """Image files of `classes` split for training and validation (per class, seeded): (train, val, classes)."""
    train_rows, val_rows = split_rows(labels, val_fraction, seed)
    files = ImageFiles(paths, labels, base)
    return files.subset(train_rows), files.subset(val_rows) if len(val_rows) else None, classes


def _validation_apart(spec: str, base: Preprocess, classes: list[str], num_outputs: int | None) -> Samples:
    """The validation images `spec` holds apart from the training data (a folder of class folders, an image
    list, or an .npz file's x and y), their labels those of the training data's `classes` of the same names
    (class numbers: the same numbers)."""
    path = Path(spec)
    if path.is_dir() or is_image_list(path):
        image_mode(base.channels, spec)
        listed = class_folders(path) if path.is_dir() else read_list(path, num_outputs)
        val_classes, val = listed[0], ImageFiles(*listed[1:], base)
    elif path.is_file() and path.suffix.lower() == ".npz":
        val, _, val_classes = _open_npz(path, base, 0.0, 0, num_outputs)
    else:
        hint = "give val_data a folder of class folders, an image list or an .npz file"
        raise NetError(f"no validation images at {spec}" if not path.exists() else f"{spec} holds no images",
                       where=spec, hint=hint)  # fmt: skip
    numbered = val_classes == [str(label) for label in range(len(val_classes))]
    if val_classes != classes and not numbered:
        unknown = [name for name in val_classes if name not in classes]
        if unknown:
            known = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise NetError(f"the validation classes {_some_of(unknown)} are not among the training data's "
                           f"{len(classes)} ({known})", where=spec, span=class_place(spec, unknown[0]),
                           hint="validate on images of the training classes, named as they are")  # fmt: skip
        val.labels = _renumbered(val.labels, val_classes, classes)
    return val


def split_rows(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows, split per class: round(n * fraction) of each class's n images (at least
    one when the fraction is above 0, never all) go to validation, chosen by a generator seeded with
    (seed, class). Both lists sorted."""
    train, val = [], []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = min(len(rows) - 1, max(int(fraction > 0), round(len(rows) * fraction)))
        chosen = np.random.default_rng([seed, int(label)]).permutation(rows)
        val.append(chosen[:count])
        train.append(chosen[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _open_npz(path: Path, base: Preprocess, val_fraction: float, seed: int, num_outputs: int | None):
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except UNREADABLE_NPZ as error:
        raise NetError(
            f"cannot read {path} as an .npz file ({error})",
            where=where,
            hint="save it with numpy.savez(file, x=images, y=labels)",
        ) from None
    for key in ("x", "y"):
        if key not in arrays:
            raise NetError(
                f"{path} has no array `{key}` (it has: {', '.join(sorted(arrays)) or 'none'})",
                where=where,
                hint="save it with numpy.savez(file, x=images, y=labels)",
            )
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise NetError(f"{path} has only one of x_val and y_val", where=where, hint="give both, or neither")
    x, y = _npz_pair(arrays, "x", "y", base.channels, where)
    if "classes" in arrays:
        classes = [str(name) for name in arrays["classes"].ravel()]
    else:
        top = max(int(arrays[key].max()) for key in ("y", "y_val") if key in arrays and arrays[key].size)
        classes = [str(label) for label in range(num_outputs or top + 1)]
    train = ArrayImages(x, _layout(x, base.channels, where, "x"), y, base, name=f"{path}: x")
    if "x_val" in arrays:
        x_val, y_val = _npz_pair(arrays, "x_val", "y_val", base.channels, where)
        val = ArrayImages(x_val, _layout(x_val, base.channels, where, "x_val"), y_val, base, name=f"{path}: x_val")
        return train, val, classes
    train_rows, val_rows = split_rows(y, val_fraction, seed)
    return train.subset(train_rows), train.subset(val_rows) if len(val_rows) else None, classes


def labels_by_name(data_classes: list[str], trained: list[str], where: str) -> list[int] | None:
    """For evaluating weights trained on the classes `trained` (by name, in their label order) on data whose
    classes are `data_classes`: each data label's label in training, where the two differ; None where the
    labels already agree (or either side has no names: an .npz file without `classes` numbers them 0..K-1).
    A class of the data the weights never learned is a NetError (blaming the data, `where`)."""
    numbered = data_classes == [str(label) for label in range(len(data_classes))]
    if not trained or numbered or data_classes == trained:
        return None
    unknown = [name for name in data_classes if name not in trained]
    if unknown:
        known = ", ".join(trained[:10]) + (", ..." if len(trained) > 10 else "")
        plural = len(unknown) > 1
        raise NetError(
            f"the data's class{'es' if plural else ''} {_some_of(unknown)} {'are' if plural else 'is'} not "
            f"among the {len(trained)} the weights were trained on ({known})",
            where=where,
            span=class_place(where, unknown[0]),
            hint="evaluate on images of the trained classes, named as in training (a folder's class names are its "
            "subfolders' names, an image list's the last word of each line)",
        )
    return [trained.index(name) for name in data_classes]


def _renumbered(labels: np.ndarray, names: list[str], classes: list[str]) -> np.ndarray:
    """`labels`, numbers into `names`, as the numbers of the same names in `classes` (which holds them all):
    validation images apart keep the training data's class numbers."""
    return np.asarray([classes.index(name) for name in names], dtype=np.int64)[labels]


def _some_of(names: list[str], shown: int = 5) -> str:
    """The first `shown` of `names` for a message, and how many more there are."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _labels_hint(y: np.ndarray, y_key: str, x_key: str) -> str:
    """How to save the labels `y` as class indices: a row of scores per image (one-hot) becomes its largest's
    column, a column of indices a vector, names an index into `classes`; fractions are not rounded for the user
    (they are no class)."""
    if y.dtype.kind in "US":
        split = f"names, {y_key} = numpy.unique({y_key}, return_inverse=True)"
        return f"for classes by name, save classes=names and {y_key}=indices: {split}"
    if y.ndim == 2 and y.shape[1] > 1 and y.dtype.kind in "biuf":
        return f"a class index per image, not a row of {y.shape[1]} scores: save {y_key}.argmax(axis=1)"
    if y.ndim < 1 or y.dtype.kind not in "biuf" or (y.ndim > 1 and y.size != y.shape[0]):
        return f"save one class index per image of {x_key}: a 1-D array of whole numbers"
    flat = y.reshape(-1)
    fractions = np.flatnonzero(~(np.isfinite(flat) & (flat == np.round(flat)))) if y.dtype.kind == "f" else []
    if len(fractions):
        return f"class indices are whole numbers 0, 1, ...; {y_key} holds others, such as {flat[fractions[0]]}"
    fix = f"{y_key}.reshape(-1)" if y.ndim > 1 else y_key
    return f"save {fix}" if y.dtype.kind in "iu" else f"save {fix}.astype(int)"


def _npz_pair(arrays: dict, x_key: str, y_key: str, channels: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = arrays[x_key], arrays[y_key]
    if x.dtype.kind not in "biuf":
        raise NetError(
            f"{x_key} holds {x.dtype} values, not numbers", where=where, hint="save the pixels as numbers"
        )
    if y.ndim != 1 or y.dtype.kind not in "iu":
        shape = " x ".join(map(str, y.shape)) or "() (a single value)"
        raise NetError(
            f"{y_key} must be a 1-D array of integer class indices, not {y.dtype} of shape {shape}",
            where=where,
            hint=_labels_hint(y, y_key, x_key),
        )
    if x.ndim not in (3, 4):  # not a stack of images (a scalar, a vector ...): the layout's error names the shape
        _layout(x, channels, where, x_key)
    if len(x) != len(y):
        raise NetError(
            f"{x_key} has {len(x)} images but {y_key} has {len(y)} labels",
            where=where,
            hint="give one label per image",
        )
    if len(x) == 0:
        raise NetError(f"{x_key} holds no images", where=where, hint="give at least one image")
    negative = np.flatnonzero(y < 0)
    if len(negative):
        row = negative[0]
        raise NetError(
            f"{x_key}[{row}] has label {y[row]}; class indices start at 0",
            where=where,
            hint="number the classes 0, 1, ..., K-1",
        )
    return x, y


def _layout(x: np.ndarray, channels: int, where: str, key: str) -> str:
    """How an array holds its images: N x H x W (gray), N x C x H x W or N x H x W x C, read by the axis that
    has the net's channels, else by the one gray <-> RGB converts."""
    if x.ndim == 3 and channels in (1, 3):
        return "nhw"
    if x.ndim == 4:
        for count in (channels, {1: 3, 3: 1}.get(channels)):
            for axis, layout in ((1, "nchw"), (3, "nhwc")):
                if x.shape[axis] == count:
                    return layout
    gray = " or N x H x W" if channels in (1, 3) else ""
    raise NetError(
        f"{key} has shape {' x '.join(map(str, x.shape)) or '()'}, which does not hold {channels}-channel "
        "images",
        where=where,
        hint=f"give N x {channels} x H x W, N x H x W x {channels}{gray}",
    )


def _open_digits(base: Preprocess, val_fraction: float, seed: int):
    if base.channels not in (1, 3):
        raise NetError(
            f"the digits are gray images; the net takes {base.channels} channels",
            where=DIGITS,
            hint="give the net 1 (or 3) input channels",
        )
    images, labels = load_digits()
    samples = ArrayImages(images, "nhw", labels, base, name="digits", scale=PIXEL_RANGE / INK)  # 0..16 ink
    train_rows, val_rows = split_rows(labels, val_fraction, seed)
    return samples.subset(train_rows), samples.subset(val_rows) if len(val_rows) else None, list(NAMES)


def _check_classes(classes: list[str], sets: list[Samples | None], num_outputs: int | None, where: str) -> None:
    if num_outputs is not None and len(classes) > num_outputs:
        raise NetError(
            f"{where} has {len(classes)} classes, but the net scores {num_outputs}",
            where=where,
            hint=f"give the net's last layer {len(classes)} outputs",
        )
    limit = len(classes) if num_outputs is None else min(len(classes), num_outputs)
    for samples in sets:
        if samples is None or not len(samples):
            continue
        bad = np.flatnonzero(samples.labels >= limit)  # never negative: the npz reader refuses those
        if len(bad):
            label = int(samples.labels[bad[0]])
            largest = max(int(part.labels.max()) for part in sets if part is not None and len(part))
            if limit == num_outputs:
                width, hint = (
                    f"the net's {num_outputs} outputs",
                    f"give the net's last layer at least {largest + 1} outputs (the largest label is {largest})",
                )
            else:
                width, hint = f"the {limit} class names", "give the array `classes` one name per class"
            source = samples.source(bad[0]).removeprefix(f"{where}: ")  # the error names the file already
            raise NetError(f"{source} has label {label}, beyond {width} (0..{limit - 1})", where=where, hint=hint)


def _scan(
    train, val, workers: int, skip_corrupt: bool, where: str, saved, reading, statistics: bool, parts, largest=None
):
    """Decodes image files once, measuring the training set's centre crops on the way (`statistics`):
    unreadable files are an error naming the first, or (skip_corrupt) left out and listed. Arrays need no
    check, so only the training set's are read, for the statistics; `parts` says whether the training and
    the validation files are looked at. `saved`: what a scan of these files found (`scan.from_record`), in
    place of decoding them; `reading`: the processes that share the decoding, and the progress meter (see
    open_data); `largest`: see open_data. Returns the readable sets, the unreadable files, the sums and the
    unreadable positions per set."""
    (world, meter), skipped, kept, sums, bad_parts = reading, [], [], None, []
    for part, (samples, look) in enumerate(zip((train, val), parts)):
        measure = statistics and part == 0
        if samples is None or not (measure or (look and isinstance(samples, ImageFiles))):
            kept.append(samples)
            bad_parts.append([])
            continue
        if saved is not None:
            bad, sums = set(saved[0][part]), saved[1] if measure else sums
        else:
            top = largest if part == 0 else None  # validation takes the middle size only
            shown = _titled(meter, samples, part, world)
            failures, *counted = scan.decode(samples, measure, workers, world, shown, top)
            sums = counted if measure else sums
            if failures and not skip_corrupt:
                index, message, hint = failures[0]
                hint = SKIP_HINT if hint is None else f"{hint}, or skip such images with --skip-corrupt"
                raise NetError(message, where=samples.source(index), hint=hint)
            bad = {index for index, *_ in failures}
        bad_parts.append(sorted(bad))
        skipped += [samples.source(index) for index in sorted(bad)]
        kept.append(samples.subset(np.asarray([i for i in range(len(samples)) if i not in bad], dtype=np.int64)))
    train, val = kept
    if parts[0] and not len(train):
        raise NetError(f"no readable training images in {where}", where=where, hint=DATA_HINT)
    return train, val if val is None or len(val) else None, skipped, sums, bad_parts


def _titled(meter, samples: Samples, part: int, world):
    """The progress meter of reading a part's image files, titled; None for arrays (quick), or without one."""
    if meter is None or not isinstance(samples, ImageFiles):
        return None
    title = f"reading the {('training', 'validation')[part]} images"
    if world is not None and world.distributed:
        title += f" (this process's share of {len(samples):,})"
    return partial(meter, title)


def _statistics(sums: list, base: Preprocess, classes: list[str], std: bool):
    """The training set's per-channel mean (and std) and the Augment carrying its colour components, from
    the sums over the centre crops the net would see."""
    count, total, outer = sums
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite images: checked below, reported at step 1
        mean = total / count
        covariance = outer / count - np.outer(mean, mean)
    spread = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
    preprocess = replace(
        base,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) if v > 0 else 1.0 for v in spread) if std else None,
        classes=list(classes),
    )
    if not np.isfinite(covariance).all():  # images holding NaN or infinities: no colours to take components of;
        values, vectors = np.zeros(len(mean)), np.eye(len(mean))  # the first step stops, naming the input
    else:
        values, vectors = principal_components(covariance / PIXEL_RANGE**2)
    eigvecs = tuple(tuple(float(v) for v in row) for row in vectors)
    return preprocess, Augment(eigvals=tuple(float(v) for v in values), eigvecs=eigvecs)


def check_workers(workers: int) -> None:
    """A count of loader processes is 0 (loading in this process) or more: else the error naming --workers."""
    if workers < 0:
        raise NetError(f"the number of loader workers must be at least 0, not {workers}", where="--workers",
                       hint="0 loads in this process itself; N starts N loading processes")  # fmt: skip


def loading_workers(asked: int, flag: str = "--workers", sharing: int = 1) -> tuple[int, str | None]:
    """The loader processes to start for `asked`: at most one per CPU this process may run on (more only
    take turns, and the batches do not depend on their number), and a note when fewer than asked. `sharing`:
    the processes on this machine (torchrun's); where this one may run on every CPU, so may they, and each
    takes its share of the CPUs (a process bound to some CPUs takes those)."""
    machine = os.cpu_count() or 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    shared = sharing > 1 and cpus >= machine
    if shared:
        cpus = max(1, cpus // sharing)
    if asked <= cpus:
        return asked, None
    cpu_text = f"{cpus} CPU{'' if cpus == 1 else 's'}"
    whose = f"each of this machine's {sharing} processes" if shared else "this process"
    return cpus, f"note: {flag} {asked} is more than the {cpu_text} {whose} may use; loading with {cpus}"


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch `epoch` presents `count` samples: a permutation drawn from (seed, epoch)."""
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng([seed, epoch]).permutation(count)


def batches_per_epoch(count: int, batch: int, world: int = 1, drop_last: bool = False) -> int:
    """How many batches each rank takes in an epoch of `count` samples (global batch: batch * world)."""
    full, rest = divmod(count, batch * world)
    return full + int(rest > 0 and not drop_last)


def _rank_rows(order: np.ndarray, batch: int, rank: int, world: int, drop_last: bool) -> list[np.ndarray]:
    """Rank `rank`'s rows of each global batch: rows rank*B..(rank+1)*B of each world*B block; the last,
    short block (kept unless drop_last) is split as evenly as it goes, rank 0 first (a rank may get none)."""
    block = batch * world
    full = len(order) // block
    rows = [order[b * block + rank * batch : b * block + (rank + 1) * batch] for b in range(full)]
    if full * block < len(order) and not drop_last:
        rows.append(np.array_split(order[full * block :], world)[rank])
    return rows


class _Present(Dataset):
    """Batches as the loader hands them out, made whole inside the worker: each sample augmented with its
    own generator (seed, epoch, index), or its centre view, written straight into the batch (in shared
    memory when a worker makes it, so it reaches the main process without a copy). A file that fails to
    decode is reported, not raised, so the error reaches the main process as a NetError rather than as a
    worker's traceback."""

    def __init__(self, samples: Samples, augment: Augment | None, seed: int, epoch: int, views: int = 1):
        self.samples, self.augment, self.seed, self.epoch, self.views = samples, augment, seed, epoch, views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]):
        preprocess = self.samples.preprocess
        several = self.views > 1  # test-time views: N x views x C x H x W
        x = torch.empty((len(indices), *((self.views,) if several else ()), preprocess.channels, *preprocess.crop))
        if get_worker_info() is not None:
            x.share_memory_()
        out = x.numpy()
        failures = []
        for row, index in enumerate(indices):
            if (image := self.samples.read(index, failures)) is None:
                continue
            try:
                if several:
                    out[row] = preprocess.views(image, self.views)
                elif self.augment is None:
                    preprocess.apply(image, out=out[row])
                else:
                    preprocess.augmented(image, self.augment, sample_rng(self.seed, self.epoch, index), out=out[row])
            except NetError as error:  # preparing it: a size drawn for it (resize = (low, high)) it cannot take, ...
                failures.append((index, error.message, error.hint))
        return x, torch.from_numpy(self.samples.labels[indices]), failures


def _as_made(batch):
    """The DataLoader's collate step: _Present.__getitems__ already made the batch."""
    return batch



class Batches:
    """One epoch's batches for one rank, from `start_batch` on: iterate for (x, y); `len()` is the number
    still to come, `per_epoch` the number in a whole epoch."""

    def __init__(
        self,
        samples: Samples,
        rows: list[np.ndarray],
        per_epoch: int,
        augment: Augment | None,
        seed: int,
        epoch: int,
        workers: int,
        pin_memory: bool,
        views: int = 1,
    ):
        self.samples, self.rows, self.per_epoch = samples, rows, per_epoch
        self.augment, self.seed, self.epoch = augment, seed, epoch
        self.workers, self.pin_memory, self.views = workers, pin_memory, views

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        loader = DataLoader(
            _Present(self.samples, self.augment, self.seed, self.epoch, self.views),
            batch_sampler=[rows.tolist() for rows in self.rows],
            num_workers=self.workers,
            collate_fn=_as_made,
            worker_init_fn=signals_to_the_main_process,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),  # DataLoader draws a base seed: from its own generator, not torch's global one
        )
        for x, y, failures in loader:
            if failures:
                index, message, hint = failures[0]
                raise NetError(message, where=self.samples.source(index), hint=hint)
            yield x, y


def loader(
    dataset: Samples,
    *,
    batch: int,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    shuffle: bool = True,
    augment: Augment | None = None,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> Batches:
    """Epoch `epoch` of `dataset` in batches of (float32 N x C x H x W, int64 N).

    The order is `epoch_order(len(dataset), seed, epoch, shuffle)`; `start_batch` skips the batches a
    resumed run already took. With `world` > 1, rank `rank` takes rows rank*batch..(rank+1)*batch of each
    global batch of world*batch rows. `augment`: training presentations (random crop, flip, colour noise,
    seeded per sample by (seed, epoch, index)); None: centre views. `workers`: decoding processes
    (0: in this process); the batches are the same whatever their number."""
    if batch < 1:
        raise NetError(
            f"the batch size must be at least 1, not {batch}",
            where="--batch",
            hint="give a batch of one image or more, e.g. --batch 128",
        )
    if world < 1 or not 0 <= rank < world:
        raise NetError(
            f"rank {rank} of a world of {world} processes does not exist",
            where="--world",
            hint="start the processes with torchrun, which numbers them from 0",
        )
    if seed < 0 or epoch < 0:
        raise NetError(
            f"the seed and epoch must be at least 0, not {seed} and {epoch}",
            where="--seed",
            hint="give a seed such as 0",
        )
    check_workers(workers)
    channels = dataset.preprocess.channels
    if augment is not None and augment.pca_noise > 0 and len(augment.eigvals) != channels:
        raise NetError(
            f"the colour noise has {len(augment.eigvals)} components, but the images {channels} channels",
            where="pca_noise",
            hint="take the Augment of this data set's DataSplit",
        )
    if augment is not None:
        augment.check_channels(channels)
    per_epoch = batches_per_epoch(len(dataset), batch, world, drop_last)
    if not 0 <= start_batch <= per_epoch:
        raise NetError(
            f"cannot start at batch {start_batch}: an epoch has {per_epoch} batches of {batch}",
            where="--resume",
            hint="resume with the data and batch size the run was started with",
        )
    rows = _rank_rows(epoch_order(len(dataset), seed, epoch, shuffle), batch, rank, world, drop_last)
    return Batches(dataset, rows[start_batch:], per_epoch, augment, seed, epoch, workers, pin_memory)


def view_loader(
    dataset: Samples, *, views: int = 1, batch: int, workers: int = 0, rank: int = 0, world: int = 1
) -> Batches:
    """The whole of `dataset` in order, for evaluation: batches of (float32 N x C x H x W, int64 N) with one
    view, or (N x views x C x H x W, N) with the paper's ten (`Preprocess.views`). With `world` > 1 each
    rank takes its share of every global batch (the last, short one shared as evenly as it goes)."""
    if views not in VIEW_COUNTS:
        raise NetError(f"{views} views: netdsl takes 1 or 10", where="--views", hint="--views 1 or --views 10")
    if batch < 1:
        raise NetError(
            f"the batch size must be at least 1, not {batch}",
            where="--batch",
            hint="give a batch of one image or more, e.g. --batch 128",
        )
    check_workers(workers)
    rows = _rank_rows(np.arange(len(dataset)), batch, rank, world, drop_last=False)
    return Batches(dataset, rows, len(rows), None, 0, 0, workers, False, views)
