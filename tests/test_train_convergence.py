"""Training on real data: LeNet-5 and SimpleNet learn scikit-learn's handwritten digits (held-out images),
and the trained weights classify a digit image with `netdsl run`, and measure with `netdsl eval`.

The digits ship inside the scikit-learn wheel (the `train` extra), so nothing is downloaded. Each run is
seeded; the accuracy floors (the issue's) sit a little below what the seeds reach, so a harmless change
of rounding cannot fail them, while a broken loop, optimizer or data pipeline (chance is 10%) would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from netdsl.cli.main import main

pytest.importorskip("sklearn", reason="the digits need scikit-learn (pip install 'netdsl[train]')")

ROOT = Path(__file__).resolve().parents[1]


def best_top1(run: Path) -> float:
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(line["val_top1"] for line in epochs if line["kind"] == "epoch" and line["val_top1"] is not None)


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory) -> Path:
    """LeNet-5 trained with the recipe in nets/lenet5.net (6 epochs), as the README's first command."""
    run = tmp_path_factory.mktemp("lenet") / "run"
    assert main(["train", str(ROOT / "nets/lenet5.net"), "--data", "digits", "--out", str(run), "--workers", "0"]) == 0
    return run


def test_lenet5_learns_the_digits(lenet_run):
    assert best_top1(lenet_run) >= 0.97


def test_simplenet_learns_the_digits_at_64_by_64(tmp_path):
    run = tmp_path / "run"
    code = main(
        ["train", str(ROOT / "nets/simplenet.net"), "--data", "digits", "--epochs", "3", "--no-flip",
         "--workers", "0", "--log-every", "100", "--out", str(run)]
    )  # fmt: skip
    assert code == 0
    assert best_top1(run) >= 0.95


def test_the_trained_net_reads_a_digit_image(lenet_run, tmp_path, capsys):
    """`netdsl run` applies the saved preprocessing (resize, mean, std) and prints the class names."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    right = 0
    for index in range(1700, 1720):  # the seeded split holds most of these out; what counts is the reading
        path = tmp_path / f"digit{index}.png"
        Image.fromarray((digits.images[index] * 255 / 16).astype(np.uint8)).save(path)
        assert main(["run", str(ROOT / "nets/lenet5.net"), "--weights", str(lenet_run), "--input", str(path),
                     "--backend", "torch", "--top", "1"]) == 0  # fmt: skip
        printed = capsys.readouterr().out
        right += f"top 1: {digits.target[index]}:" in printed
    assert right >= 18
    assert main(["run", str(ROOT / "nets/lenet5.net"), "--weights", str(lenet_run), "--input", str(path),
                 "--backend", "torch", "--views", "10", "--top", "1"]) == 0  # fmt: skip
    assert "top 1: " in capsys.readouterr().out  # ten views of the last image, softmax averaged


def test_eval_reports_accuracy_per_class_and_the_confusion_matrix(lenet_run, tmp_path, capsys):
    picture = tmp_path / "confusion.png"
    code = main(
        ["eval", str(ROOT / "nets/lenet5.net"), "--weights", str(lenet_run), "--data", "digits",
         "--views", "10", "--confusion", str(picture)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    top1 = float(out.split("top-1 ")[1].split("%")[0]) / 100
    # the run's own validation images as ten views each: on 32 x 32 digits resized from 8 x 8 the five crops
    # coincide and the five flipped views are mirrored digits, so the average is a little below one view's
    assert top1 >= 0.9
    assert "confusion matrix" in out and out.count("%") >= 12
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = main(["eval", str(ROOT / "nets/lenet5.net"), "--weights", str(lenet_run), "--data", "digits"])
    assert plain == 0
    one_view = capsys.readouterr().out.split("top-1 ")[1].split("%")[0]
    assert one_view == f"{100 * best_top1(lenet_run):.2f}"  # the same images as the run's best validation
