"""Image lists (`--data LIST.txt`, Caffe's "path class" lines): the same images and classes as a data folder
give the same split and the same training; every mistake in a list is reported at its line and column. And
`--val-data` (a list, a folder or an .npz file): validation on other images, as eval measures them.

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
    assert classes == ["0", "1", "2"]
    assert list(map(Path, paths)) == [image.resolve() for image in cat] + [tmp_path / o for o in owl]
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
        (f"{'a' * 300}.png 0\n", "list.txt:1:1: error: no such image: "),
        ("images/cat/0.png 99999999999999999999\n", "list.txt:1:18: error: class 99999999999999999999: more classes"),
        (
            "images/cat/0.png 0\nimages/cat/1.png 1\nimages/dog/0.png 1O\n",
            "list.txt:3:18: error: class `1O` is a name, where the list's other classes are numbers",
        ),
        (
            "images/cat/0.png 2\nimages/cat/1.png cat\nimages/dog/0.png dog\n",
            "list.txt:1:18: error: class `2` is a number, where the list's other classes are names",
        ),
    ],
    ids=[
        "no-class",
        "space-no-class",
        "missing",
        "not-image",
        "beyond",
        "empty",
        "not-utf8",
        "folder",
        "long-name",
        "huge-class",
        "name-among-numbers",
        "number-among-names",
    ],
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


def _val_lines(folder: Path, names: dict[str, str]) -> list[str]:
    """A list line for each image of the classes in `names` (folder class -> the class as the list writes it)."""
    return [f"{image} {written}" for name, written in names.items() for image in sorted((folder / name).rglob("*.png"))]


def test_val_data_validates_on_other_images_as_eval_measures_them(folder, tmp_path, capsys):
    """--val-data LIST: all of --data trains (no val_fraction held out) and the list's images validate, their
    classes matched by name to the training classes (a list of owls and cats, owls first); the run's last
    validation is what `netdsl eval` measures on the list with the last weights, which the run suggests; eval's
    `--split val` of the training data finds nothing held out, and says where the run validated."""
    import json

    from PIL import Image

    rng = np.random.default_rng(8)
    other = tmp_path / "other"  # validation images of two of the classes, none of them trained on
    for name in ("owl", "cat"):
        (other / name).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(other / name / f"{index}.png")
    listed = tmp_path / "val.txt"
    listed.write_text("\n".join(_val_lines(other, {"owl": "owl", "cat": "cat"})) + "\n")
    split = open_data(folder, (1, 8, 8), num_outputs=3, val_spec=listed)
    assert len(split.train) == 15 and len(split.val) == 6 and split.classes == list(CLASSES)
    assert split.val.labels.tolist() == [2, 2, 2, 0, 0, 0]  # owl is the third training class, cat the first
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(net), "--data", str(folder), "--val-data", str(listed), "--batch", "5", "--epochs", "2",
                 *PLAIN, "--out", str(run)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "on 15 images, validating on 6;" in err and f"--data {listed} --split all --mistakes 10" in err
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [record for record in last if record.get("val_top1") is not None][-1]
    assert main(["eval", str(net), "--weights", str(run / "checkpoints" / "last.ckpt"), "--data", str(listed),
                 "--split", "all"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"images 6   top-1 {100 * last['val_top1']:.2f}%" in out
    assert float(out.split("loss ")[1].split()[0]) == pytest.approx(last["val_loss"], abs=1e-4)
    assert main(["eval", str(net), "--weights", str(run), "--data", str(folder)]) == 1  # --split val: none held out
    err = capsys.readouterr().err
    assert f"the run trained on all of it and validated on {listed}: --data {listed} --split all" in err


def test_val_data_of_an_npz_file_and_by_class_numbers(folder, tmp_path):
    """val_data as an .npz file (x, y: class numbers, the training classes in order) and as a folder of class
    folders named by number: labels taken as the numbers they are."""
    rng = np.random.default_rng(9)
    arrays = tmp_path / "val.npz"
    np.savez(arrays, x=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), y=np.array([2, 0, 1, 2]))
    split = open_data(folder, (1, 8, 8), num_outputs=3, val_spec=arrays)
    assert len(split.val) == 4 and split.val.labels.tolist() == [2, 0, 1, 2] and len(split.train) == 15
    listed = tmp_path / "numbers.txt"
    listed.write_text("\n".join(_val_lines(folder, {"dog": "1", "owl": "2"})))
    split = open_data(folder, (1, 8, 8), num_outputs=3, val_spec=listed)
    assert split.val.labels.tolist() == [1] * 5 + [2] * 5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t, f: t / "missing.txt", "missing.txt: error: no validation images at"),
        (lambda t, f: "digits", "digits: error: no validation images at digits"),
        (
            lambda t, f: (t / "v.txt").write_text(f"{next((f / 'cat').glob('*.png'))} lion\n") and t / "v.txt",
            "error: the validation classes lion are not among the training data's 3 (cat, dog, owl)",
        ),
        (lambda t, f: (t / "v.md").write_text("x") and t / "v.md", "v.md: error: "),
    ],
    ids=["missing", "digits", "unknown-class", "not-data"],
)
def test_val_data_mistakes_are_errors_naming_it(folder, tmp_path, capsys, make, message):
    val = make(tmp_path, folder)
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    argv = ["train", str(net), "--data", str(folder), "--val-data", str(val), "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_class_the_training_never_had_is_an_error_at_its_line(folder, tmp_path, capsys):
    """A list's class that the training data (--val-data) or the weights (eval) lack is an error at the line and
    column where the list first gives it."""
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    listed = tmp_path / "v.txt"
    listed.write_text("images/cat/0.png cat\n\nimages/dog/1.png  lion\nimages/dog/2.png lion\n")
    argv = ["train", str(net), "--data", str(folder), "--steps", "1", "--batch", "4", *PLAIN]
    assert main([*argv, "--val-data", str(listed), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert f"{listed}:3:19: error: the validation classes lion are not among the training data's 3" in err, err
    assert "    3 | images/dog/1.png  lion\n      |                   ^^^^\n" in err and "Traceback" not in err
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["eval", str(net), "--weights", str(tmp_path / "b"), "--data", str(listed), "--split", "all"]) == 1
    err = capsys.readouterr().err
    assert f"{listed}:3:19: error: the data's class lion is not among the 3 the weights were trained on" in err, err


def test_data_with_its_own_validation_images_and_val_data_is_refused(folder, tmp_path, capsys):
    import shutil

    split = tmp_path / "split"
    shutil.copytree(folder, split / "train")
    shutil.copytree(folder, split / "val")
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    listed = _listed(folder, tmp_path / "list.txt", numbers=False)
    assert main(["train", str(net), "--data", str(split), "--val-data", str(listed), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"{split}: error: {split} has validation images of its own, and val_data gives others" in err
