"""Image lists (`--data LIST.txt`, Caffe's "path class" lines): the same images and classes as a data folder
give the same split and the same training; every mistake in a list is reported at its line and column.

The reference is the data folder route, tested against hand-written PyTorch elsewhere: a list naming a folder's
files in its order, by class name or by class number, must split, measure and train exactly as the folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from train_support import PLAIN
from train_support import THREE_CLASSES as TINY

from netdsl.cli.main import main
from netdsl.errors import NetError
from netdsl.train.data import open_data
from netdsl.train.listing import read_list

CLASSES = ("cat", "dog", "owl")


@pytest.fixture
def folder(tmp_path) -> Path:
    """Classes cat, dog and owl, five random 8 x 8 gray PNGs each (one in a folder with a space in its name)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for name in CLASSES:
        (tmp_path / "images" / name / "more photos").mkdir(parents=True)
        for index in range(5):
            place = f"more photos/{index} b.png" if index == 4 else f"{index}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "images" / name / place)
    return tmp_path / "images"


def _listed(folder: Path, path: Path, numbers: bool) -> Path:
    """A list of the folder's images in the folder's own order: by class name, or by class number."""
    lines = ["# the images of " + str(folder), ""]
    for label, name in enumerate(CLASSES):
        for image in sorted((folder / name).rglob("*.png")):
            lines.append(f"  {image.relative_to(path.parent)}\t{label if numbers else name}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("numbers", [False, True], ids=["names", "numbers"])
def test_a_list_of_a_folders_images_splits_and_trains_as_the_folder(folder, tmp_path, numbers):
    listed = _listed(folder, tmp_path / "list.txt", numbers)
    by_folder = open_data(folder, (1, 8, 8), num_outputs=3, val_fraction=0.2, seed=5)
    by_list = open_data(listed, (1, 8, 8), num_outputs=3, val_fraction=0.2, seed=5)
    assert by_list.classes == (["0", "1", "2"] if numbers else list(CLASSES)) and by_folder.classes == list(CLASSES)
    for ours, theirs in ((by_list.train, by_folder.train), (by_list.val, by_folder.val)):
        assert [Path(p).resolve() for p in map(ours.path, range(len(ours)))] == [
            Path(p).resolve() for p in map(theirs.path, range(len(theirs)))
        ]
        np.testing.assert_array_equal(ours.labels, theirs.labels)
    assert by_list.preprocess.mean == by_folder.preprocess.mean  # the training set measured alike
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    runs = []
    for data, out in ((folder, tmp_path / "a"), (listed, tmp_path / "b")):
        args = ["train", str(net), "--data", str(data), "--batch", "4", "--steps", "3", "--val-fraction", "0.2"]
        assert main([*args, "--seed", "5", *PLAIN, "--mean", "auto", "--out", str(out)]) == 0
        runs.append(load_file(out / "weights.safetensors"))
    for name, value in runs[0].items():
        np.testing.assert_array_equal(runs[1][name], value)


def test_numbered_classes_take_the_nets_outputs_and_paths_may_be_absolute(folder, tmp_path):
    """Class numbers name the net's outputs: a list that uses 0 and 2 of 3 still has the 3 classes; a path may
    be absolute, and a line may be indented or end in a carriage return (a list written on Windows)."""
    cat, owl = sorted((folder / "cat").glob("*.png")), sorted((folder / "owl").glob("*.png"))
    listed = tmp_path / "some.txt"
    lines = [f"{image.resolve()} 0\r\n" for image in cat] + [f" {image} 2\r\n" for image in owl]
    listed.write_text("".join(lines))
    classes, paths, labels = read_list(listed, num_outputs=3)
    assert classes == ["0", "1", "2"] and paths == [image.resolve() for image in cat] + [tmp_path / o for o in owl]
    assert labels.tolist() == [0] * len(cat) + [2] * len(owl)
    assert read_list(listed)[0] == ["0", "1", "2"]  # without the net: up to the largest number


@pytest.mark.parametrize(
    "text, message",
    [
        ("images/cat/0.png 0\nimages/cat/1.png\n", "list.txt:2:1: error: `images/cat/1.png` names no class"),
        ("images/cat/0.png 0\nimages/cat/my 1.png\n", "list.txt:2:1: error: `images/cat/my 1.png` names no class"),
        ("images/cat/0.png 0\n   images/cat/9.png 1\n", "list.txt:2:4: error: no such image: "),
        ("images/cat/0.png 0\nlist.txt 1\n", "list.txt:2:1: error: list.txt is not an image file"),
        ("images/cat/0.png 0\nimages/dog/0.png 7\n", "list.txt:2:18: error: class 7 is beyond the net's 3 outputs"),
        ("# nothing\n\n", "list.txt: error: the list "),
        (b"images/cat/0.png \xff\n", "list.txt: error: "),
        ("images/cat 0\n", "list.txt:1:1: error: images/cat is not an image file"),
    ],
    ids=["no-class", "space-no-class", "missing", "not-image", "beyond", "empty", "not-utf8", "folder"],
)
def test_mistakes_in_a_list_are_errors_at_their_line(folder, tmp_path, capsys, text, message):
    listed = folder.parent / "list.txt"
    listed.write_bytes(text if isinstance(text, bytes) else text.encode())
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    assert main(["train", str(net), "--data", str(listed), "--steps", "1", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_list_is_measured_by_eval_and_matched_to_the_weights_classes_by_name(folder, tmp_path, capsys):
    """A run trained on the folder, measured on a list of some of its images by class name in another order, and
    by class number (the weights' classes in their order, as Caffe's ImageNet lists number the sorted synsets):
    each image scored against the class it was trained as, as the folder's own figures for those images."""
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    assert main(["train", str(net), "--data", str(folder), "--batch", "4", "--steps", "2", *PLAIN,
                 "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    flags = ["--weights", str(tmp_path / "run"), "--split", "all", "--save"]
    assert main(["eval", str(net), *flags, str(tmp_path / "f.npz"), "--data", str(folder)]) == 0
    by_folder = np.load(tmp_path / "f.npz")
    rows = {Path(file).resolve(): row for row, file in enumerate(by_folder["files"])}
    owls, cats = sorted((folder / "owl").rglob("*.png")), sorted((folder / "cat").rglob("*.png"))
    for name, owl, cat in (("names", "owl", "cat"), ("numbers", 2, 0)):  # numbers: the weights' classes in order
        listed = tmp_path / f"owls and cats by {name}.txt"
        listed.write_text("\n".join([f"{image} {owl}" for image in owls] + [f"{image} {cat}" for image in cats]))
        capsys.readouterr()
        assert main(["eval", str(net), *flags, str(tmp_path / "l.npz"), "--data", str(listed)]) == 0
        by_list = np.load(tmp_path / "l.npz")
        assert list(by_list["classes"]) == list(CLASSES)  # the weights' names, not the list's order
        for file, probs, label in zip(by_list["files"], by_list["probabilities"], by_list["labels"], strict=True):
            row = rows[Path(file).resolve()]
            np.testing.assert_allclose(probs, by_folder["probabilities"][row], rtol=0, atol=1e-6)
            assert label == by_folder["labels"][row]
        assert len(by_list["files"]) == 10


def test_a_list_whose_line_names_a_missing_file_says_which(tmp_path):
    listed = tmp_path / "l.txt"
    listed.write_text("gone.png 1\n")
    with pytest.raises(NetError) as caught:
        read_list(listed)
    assert str(caught.value.span) == f"{listed}:1:1" and "no such image" in caught.value.message
