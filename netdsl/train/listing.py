"""Where a data set's image files and their classes are listed: a folder of class folders (`class_folders`),
or an image list (`read_list`), a text file that names an image and its class on each line, as Caffe's
ImageData layer and its `convert_imageset` tool read them:

    images/n01440764_10026.JPEG 0
    images/n01443537_1000.JPEG 1

The image's path is relative to the list's folder (or absolute) and may hold spaces: the class is the line's
last word. Classes are whole numbers (0, 1, ...: the net's outputs, as Caffe numbers them) or, where any is
not, names (sorted, as a data folder's class folders are). Blank lines and lines starting with `#` are passed
over. ImageNet's validation set (one flat folder of JPEGs, their classes given apart) is read through such a
list. A list of images to run a net on (`list_images`) may leave the classes out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from netdsl.errors import NetError, Sources, Span, os_hint
from netdsl.train.augment import IMAGE_SUFFIXES, images_in

DATA_HINT = (
    "give an image folder (DIR/train/<class>/*.jpg with DIR/val/<class>/..., or DIR/<class>/*.jpg), "
    "an image list (LIST.txt: a line `images/cat1.jpg 3` per image), an .npz file with arrays x and y, or `digits`"
)
LIST_SUFFIX = ".txt"
MAX_CLASSES = 1_000_000  # a class number past this is a mistake, not a class (a list of them would not fit)
LINE_HINT = 'write each line as an image and its class: "images/cat1.jpg 3" (or "images/cat1.jpg cat")'


def is_image_list(path: Path) -> bool:
    """Whether `path` is an image list: a file whose name ends in LIST_SUFFIX."""
    return path.suffix.lower() == LIST_SUFFIX and path.is_file()


def names_image_files(spec: str) -> bool:
    """Whether the data `spec` names are image files of any size (a folder, or an image list), which a run
    scales as the paper did (256 for 224 crops), rather than arrays of the net's input size."""
    path = Path(spec)
    return spec != "digits" and (path.is_dir() or is_image_list(path))


def read_list(path: Path, num_outputs: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """The class names, the images (as paths) and their class indices that the list at `path` names, in its
    order. Every mistake (a line without a class, an image that is not there or not an image, a class number
    past the net's `num_outputs`) is a NetError at its line and column. Strings, not Path objects, for speed:
    ImageNet's list is 1.28 million lines."""
    file, images, written, places = _read_lines(path, need_class=True)
    numbered = [label.isascii() and label.isdigit() for label in written]
    if any(numbered) and not all(numbered):
        raise _mixed_classes(file, written, places, numbered)
    if all(numbered):  # class numbers, as Caffe's lists
        labels = [int(label) for label in written]
        for label, value, (number, column) in zip(written, labels, places, strict=True):
            if value >= MAX_CLASSES:
                raise NetError(f"class {label}: more classes than a net scores (at most {MAX_CLASSES:,})",
                               span=Span(file, number, column), hint="number the classes from 0, as the net's "
                               "outputs are")  # fmt: skip
            if num_outputs is not None and value >= num_outputs:
                hint = f"give the net's last layer at least {max(labels) + 1} outputs"
                raise NetError(f"class {label} is beyond the net's {num_outputs} outputs (0..{num_outputs - 1})",
                               span=Span(file, number, column), hint=hint)  # fmt: skip
        classes = [str(index) for index in range(max(max(labels) + 1, num_outputs or 0))]
    else:
        classes = sorted(set(written))
        index = {name: number for number, name in enumerate(classes)}
        labels = [index[label] for label in written]
    return classes, images, np.asarray(labels, dtype=np.int64)


def _mixed_classes(file: str, written: list[str], places: list[tuple[int, int]], numbered: list[bool]) -> NetError:
    """The error for a list that numbers some classes and names others, at the first class of the rarer kind. Read
    as names, a numbered list's typo (`1O` for `10`) would be a class of its own, and sorting the names would
    renumber every class after it without a word."""
    rare = sum(numbered) * 2 < len(numbered)  # True: the numbers are the rarer kind
    row = numbered.index(rare)
    label, (number, column) = written[row], places[row]
    kind, others = ("a number", "names") if rare else ("a name", "numbers")
    return NetError(
        f"class `{label}` is {kind}, where the list's other classes are {others}",
        span=Span(file, number, column, number, column + len(label)),
        hint="number every class from 0 (as Caffe's lists do) or name every class; a list cannot mix the two",
    )


def class_place(spec: str, name: str) -> Span | None:
    """Where the image list `spec` first gives the class `name` (for an error about that class); None where
    `spec` is not a list (a folder's classes are its subfolders), or no longer gives it."""
    path = Path(spec)
    if not is_image_list(path):
        return None
    file, _, written, places = _read_lines(path, need_class=True)
    if name not in written:
        return None
    number, column = places[written.index(name)]
    return Span(file, number, column, number, column + len(name))


def list_images(path: Path) -> list[str]:
    """The images that the list at `path` names, in its order, for running a net on them: a line may name an
    image alone (`photos/my cat.jpg`) or with a class, which is passed over (a training or validation list)."""
    return _read_lines(path, need_class=False)[1]


def _read_lines(path: Path, need_class: bool) -> tuple[str, list[str], list[str], list[tuple[int, int]]]:
    """The list at `path` read line by line: its name as errors give it, each line's image, its class as
    written (None where `need_class` is false and the line names only an image) and where the class starts
    (line, column). Blank lines and comments are passed over; an image that is not there is an error."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark, as some editors write, is not a name
    except OSError as error:
        raise NetError(f"cannot read {path}: {error.strerror or error}", where=str(path), hint=os_hint(error)) from None
    except UnicodeDecodeError as error:
        raise NetError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})", where=str(path),
                       hint="save the list as UTF-8 text") from None  # fmt: skip
    file, folder = str(path), str(path.parent)
    Sources.remember(file, text)  # so that an error can quote its line
    images, written, places = [], [], []  # each line's image, its class as written, and where the class is
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        start = len(line) - len(line.lstrip())
        parts = stripped.rsplit(None, 1)
        if len(parts) < 2 or _is_image_name(parts[1]):  # "my cat.jpg": no class
            if need_class:
                raise NetError(f"`{stripped}` names no class", span=Span(file, number, start + 1), hint=LINE_HINT)
            parts = [stripped, None]  # the line is the image's name, spaces and all
        name, label = parts
        image = os.path.join(folder, name)
        if not _is_image_name(name):
            raise NetError(f"{name} is not an image file", span=_name_span(file, number, start, name),
                           hint=f"image files end in {', '.join(sorted(IMAGE_SUFFIXES))}")  # fmt: skip
        if not os.path.isfile(image):  # (False too for a name the system cannot look up)
            raise NetError(f"no such image: {image}", span=_name_span(file, number, start, name),
                           hint="the path is relative to the list's folder")  # fmt: skip
        images.append(image)
        written.append(label)
        places.append((number, start + len(stripped) - len(label or "") + 1))
    if not images:
        hint = LINE_HINT if need_class else "write a line per image: photos/cat1.jpg"
        raise NetError(f"the list {path} names no images", where=file, hint=hint)
    return file, images, written, places


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _name_span(file: str, number: int, start: int, name: str) -> Span:
    return Span(file, number, start + 1, number, start + len(name) + 1)


def class_folders(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """The class names (sorted folder names), and every image file below them with its class index."""
    try:
        entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    except OSError as error:
        raise NetError(
            f"cannot read the data folder {folder}: {error.strerror or error}", where=str(folder), hint=os_hint(error)
        ) from None
    if not entries:
        raise NetError(f"the data folder {folder} is empty", where=str(folder), hint=DATA_HINT)
    classes = sorted(entry.name for entry in entries if entry.is_dir())
    if not classes:
        raise NetError(
            f"the data folder {folder} has no class folders, only files",
            where=str(folder),
            hint=f"put each class's images in a folder of its own: {folder}/<class>/*.jpg",
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = images_in(folder / name, folder)
        if not found:
            raise NetError(
                f"the class folder {folder / name} holds no images",
                where=str(folder / name),
                hint=f"image files end in {', '.join(sorted(IMAGE_SUFFIXES))}",
            )
        paths += found
        labels += [label] * len(found)
    return classes, paths, np.asarray(labels, dtype=np.int64)
