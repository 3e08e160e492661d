"""The training data pipeline (netdsl/train/data.py, augment.py): sources, the split, the training set's
statistics, the paper's crops, flips, PCA colour noise and ten test views, the loader's order, and every
data error. References are numpy and Pillow on the same pixels; image folders are made here from seeded
random pixels. Statistical checks state their bounds in binomial / normal standard deviations (seeded, so
they are deterministic)."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import multiprocessing
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netdsl.errors import NetError
from netdsl.train.augment import Augment, Preprocess, principal_components, sample_rng
from netdsl.train.data import batches_per_epoch, epoch_order, loader, loading_workers, open_data, split_rows
from netdsl.train.world import World

BENCH = Path(__file__).resolve().parent.parent / "bench"


def make_folder(root: Path, counts: dict[str, int], *, size=(20, 16), mode="RGB", seed=0, suffix=".png") -> Path:
    """`counts[cls]` images of `size` (W, H) in root/<cls>/, seeded random pixels with a colour cast per image
    (so the channels are correlated, as in photos)."""
    rng = np.random.default_rng(seed)
    width, height = size
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            base = rng.integers(0, 160, (height, width, 1))
            pixels = base + rng.integers(0, 96, (height, width, 3))
            image = Image.fromarray(pixels.astype(np.uint8))
            image.convert(mode).save(root / name / f"{index:03d}{suffix}")
    return root


def pixels_of(path: Path, mode="RGB") -> np.ndarray:
    with Image.open(path) as image:
        array = np.asarray(image.convert(mode))
    return array[..., None] if array.ndim == 2 else array


def all_batches(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# ---- sources and the split -----------------------------------------------------------------------------


def test_folder_with_train_and_val(tmp_path):
    make_folder(tmp_path / "train", {"cat": 3, "dog": 4}, seed=1)
    make_folder(tmp_path / "val", {"cat": 2, "dog": 1}, seed=2)
    split = open_data(tmp_path, (3, 16, 16), num_outputs=2)
    assert split.classes == ["cat", "dog"] and split.preprocess.classes == ["cat", "dog"]
    assert list(split.train.labels) == [0] * 3 + [1] * 4 and list(split.val.labels) == [0, 0, 1]
    assert [Path(split.train.source(i)).parent.name for i in range(7)] == ["cat"] * 3 + ["dog"] * 4
    assert split.skipped == [] and split.val.preprocess is split.preprocess
    x, label = split.val[2]  # a Samples item is the centre view: 20 x 16 -> the middle 16 x 16, less the mean
    reference = pixels_of(tmp_path / "val/dog/000.png")[:, 2:18].transpose(2, 0, 1)
    mean = np.asarray(split.preprocess.mean, dtype=np.float32)[:, None, None]
    assert label == 1 and np.allclose(x, reference - mean, atol=1e-4)


def test_a_val_folder_with_some_of_the_classes_keeps_the_training_numbers(tmp_path):
    """val/ without a class of train/ (a small data set's rare class): its images keep train/'s class numbers by
    name, so that `owl` is 2 in both and never read as `dog`."""
    make_folder(tmp_path / "train", {"cat": 2, "dog": 2, "owl": 2}, seed=1)
    make_folder(tmp_path / "val", {"cat": 1, "owl": 2}, seed=2)
    split = open_data(tmp_path, (3, 16, 16), num_outputs=3)
    assert split.classes == ["cat", "dog", "owl"] and list(split.val.labels) == [0, 2, 2]
    assert [Path(split.val.source(i)).parent.name for i in range(3)] == ["cat", "owl", "owl"]


def test_paths_are_one_array_of_bytes_that_workers_share(tmp_path):
    """A folder's paths are one numpy array of bytes, not Path objects a forked worker would copy page by page
    (touching their reference counts): split, subset and pickled (a spawned worker) they name the same files,
    a name that is not UTF-8 included."""
    import os
    import pickle

    make_folder(tmp_path, {"a": 3, "b": 3}, seed=8)
    odd = tmp_path / "b" / os.fsdecode(b"\xff odd.png")  # a Latin-1 name on a UTF-8 file system
    (tmp_path / "b" / "000.png").rename(odd)
    split = open_data(tmp_path, (3, 16, 16), val_fraction=0.34, seed=2)
    for samples in (split.train, split.val):
        assert isinstance(samples.paths, np.ndarray) and samples.paths.dtype.kind == "S"
    every = sorted(path for path in tmp_path.rglob("*.png"))
    named = sorted(Path(s.source(i)) for s in (split.train, split.val) for i in range(len(s)))
    assert named == every and odd in named
    again = pickle.loads(pickle.dumps(split.train))
    assert [again.source(i) for i in range(len(again))] == [split.train.source(i) for i in range(len(split.train))]
    assert np.array_equal(again[0][0], split.train[0][0])
    part = split.train.subset(np.asarray([2, 0]))
    assert [part.source(0), part.source(1)] == [split.train.source(2), split.train.source(0)]


@pytest.mark.parametrize("layout", ["one folder", "train only"])
def test_folder_split_is_stratified_and_seeded(tmp_path, layout):
    root = tmp_path / "train" if layout == "train only" else tmp_path
    make_folder(root, {"a": 10, "b": 10, "c": 5}, size=(8, 8))
    split = open_data(tmp_path, (3, 8, 8), val_fraction=0.2, seed=3)
    train = {split.train.source(i) for i in range(len(split.train))}
    val = {split.val.source(i) for i in range(len(split.val))}
    assert not train & val and len(train | val) == 25
    assert np.bincount(split.val.labels).tolist() == [2, 2, 1]  # round(n * 0.2) of each class
    again = open_data(tmp_path, (3, 8, 8), val_fraction=0.2, seed=3)
    assert val == {again.val.source(i) for i in range(len(again.val))}
    other = open_data(tmp_path, (3, 8, 8), val_fraction=0.2, seed=4)
    assert val != {other.val.source(i) for i in range(len(other.val))}
    assert open_data(tmp_path, (3, 8, 8), val_fraction=0.0).val is None


def test_split_rows_keeps_one_training_image_per_class():
    labels = np.asarray([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    train, val = split_rows(labels, 0.5, seed=0)
    assert np.bincount(labels[val]).tolist() == [0, 1, 5] and np.bincount(labels[train]).tolist() == [1, 1, 5]
    train, val = split_rows(labels, 0.01, seed=0)
    assert np.bincount(labels[val], minlength=3).tolist() == [0, 1, 1]  # at least one where a class can spare it


def test_gray_and_rgb_convert_to_the_nets_channels(tmp_path):
    make_folder(tmp_path / "gray", {"a": 2}, mode="L", seed=5)
    make_folder(tmp_path / "rgb", {"a": 2}, mode="RGB", seed=6)
    rgb_net = open_data(tmp_path / "gray", (3, 16, 16), val_fraction=0)
    x, _ = rgb_net.train[0]
    gray = pixels_of(tmp_path / "gray/a/000.png", "L")[:, 2:18, 0].astype(np.float32)
    assert x.shape == (3, 16, 16)
    assert all(np.allclose(x[c] + rgb_net.preprocess.mean[c], gray, atol=1e-4) for c in range(3))
    gray_net = open_data(tmp_path / "rgb", (1, 16, 16), val_fraction=0)
    x, _ = gray_net.train[1]
    luma = pixels_of(tmp_path / "rgb/a/001.png", "L")[:, 2:18, 0]  # Pillow's own RGB -> L
    assert x.shape == (1, 16, 16) and np.allclose(x[0] + gray_net.preprocess.mean[0], luma, atol=1e-4)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_and_float_gray_images_keep_their_range(tmp_path, suffix):
    """Pillow's own "L" conversion clips a 16-bit image at 255 (nearly all white): netdsl scales 16 bits to
    0..255 (reference: numpy on the same integers) and reads a float image's values as they are."""
    rng = np.random.default_rng(11)
    wide = rng.integers(0, 65536, (16, 20), dtype=np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(wide).save(tmp_path / "a" / f"wide{suffix}")
    data = open_data(tmp_path, (3, 16, 16), val_fraction=0)
    x, _ = data.train[0]
    expected = wide[:, 2:18].astype(np.float64) * 255 / 65535
    assert x.shape == (3, 16, 16)
    for c in range(3):  # float32 pixels less the mean: about 1e-5 of 255
        assert np.abs(x[c] + data.preprocess.mean[c] - expected).max() < 1e-3
    assert expected.max() > 200 and np.mean(expected > 254) < 0.05  # the reference is not the clipped image
    floats = (rng.random((16, 16)) * 300 - 20).astype(np.float32)
    Image.fromarray(floats).save(tmp_path / "a" / "wide.tif")  # mode "F"
    gray = Preprocess(None, (16, 16), 1, (0.0,))
    assert np.array_equal(gray.apply(tmp_path / "a" / "wide.tif")[0], floats)


def test_a_palette_image_with_transparency_reads_without_a_warning(tmp_path):
    """Pillow warns (a UserWarning naming its own source line, on the user's terminal) when a palette image
    with transparency bytes is converted straight to RGB or L; netdsl reads the same pixels without it."""
    rng = np.random.default_rng(13)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P")
    image.save(tmp_path / "icon.png", transparency=bytes([0] * 10 + [255] * 246))
    with Image.open(tmp_path / "icon.png") as stored, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert stored.mode == "P" and "transparency" in stored.info
        want = {mode: np.asarray(stored.convert(mode), dtype=np.float32) for mode in ("L", "RGB")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = Preprocess(None, (16, 16), 1, (0.0,)).apply(tmp_path / "icon.png")
        rgb = Preprocess(None, (16, 16), 3, (0.0, 0.0, 0.0)).apply(tmp_path / "icon.png")
    assert np.array_equal(gray[0], want["L"]) and np.array_equal(rgb, want["RGB"].transpose(2, 0, 1))


def test_a_photo_with_a_damaged_exif_block_reads_without_a_warning(tmp_path):
    """Pillow warns of an EXIF block whose tags point past the file's end (UserWarnings naming its source
    lines, at every read in every loader worker; photo collections hold such files): netdsl reads the pixels
    as Pillow decodes them, without the warnings; a file that cannot be read at all is still an error."""
    rng = np.random.default_rng(14)
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x0f\x01\x02\x00\xff\x00\x00\x00\x70\x00\x00\x00"
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg", exif=exif)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(tmp_path / "photo.jpg") as stored:
            stored.getexif()
            want = np.asarray(stored.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    assert caught  # Pillow's own warnings, the ones netdsl keeps off the terminal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = Preprocess(None, (12, 10), 3, (0.0, 0.0, 0.0)).apply(tmp_path / "photo.jpg")
        (tmp_path / "torn.tif").write_bytes(b"II*\x00 torn")
        with pytest.raises(NetError, match=r"cannot read .*torn\.tif as an image"):
            Preprocess(None, (12, 10), 3, (0.0, 0.0, 0.0)).apply(tmp_path / "torn.tif")
    assert np.array_equal(got, want)


def test_exif_orientation_turns_a_photo_upright(tmp_path):
    """A camera's picture stored sideways with an EXIF orientation reads as viewers show it (the eight
    orientations against numpy's rotations and flips of the stored pixels)."""
    rng = np.random.default_rng(12)
    stored = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    turns = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: np.rot90(a, 2),
        4: lambda a: a[::-1],
        5: lambda a: np.transpose(a, (1, 0, 2)),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    for orientation, turn in turns.items():
        image = Image.fromarray(stored)
        exif = image.getexif()
        exif[0x0112] = orientation
        path = tmp_path / f"photo{orientation}.png"  # PNG keeps EXIF and the pixels exactly
        image.save(path, exif=exif.tobytes())
        view = turn(stored)
        preprocess = Preprocess(None, view.shape[:2], 3, (0.0, 0.0, 0.0), flip=False)
        assert np.array_equal(preprocess.apply(path), view.transpose(2, 0, 1).astype(np.float32)), orientation
    wide = rng.integers(0, 65536, (12, 20), dtype=np.uint16)  # a 16-bit gray one turned too (Pillow drops
    image = Image.fromarray(wide)  # the format of a turned image, which said how to read its pixels)
    exif = image.getexif()
    exif[0x0112] = 8
    image.save(tmp_path / "wide.png", exif=exif.tobytes())
    got = Preprocess(None, (20, 12), 1, (0.0,)).apply(tmp_path / "wide.png")[0]
    assert np.abs(got - np.rot90(wide, 1) * (255 / 65535)).max() < 1e-3


@pytest.mark.parametrize(
    ("layout", "dtype"), [("nchw", np.uint8), ("nhwc", np.float64), ("nhw", np.int16), ("nchw", np.float32)]
)
def test_npz_shapes_and_dtypes(tmp_path, layout, dtype):
    rng = np.random.default_rng(7)
    gray = layout == "nhw"
    channels = 1 if gray else 3
    images = rng.integers(0, 256, (12, channels, 6, 6)).astype(dtype)  # N x C x H x W
    stored = {"nchw": images, "nhwc": images.transpose(0, 2, 3, 1), "nhw": images[:, 0]}[layout]
    labels = np.arange(12) % 3
    path = tmp_path / "data.npz"
    np.savez(path, x=stored, y=labels, x_val=stored[:4], y_val=labels[:4])
    split = open_data(path, (channels, 6, 6), num_outputs=3)
    assert split.classes == ["0", "1", "2"] and len(split.train) == 12 and len(split.val) == 4
    mean = images.astype(np.float64).mean(axis=(0, 2, 3))
    assert np.allclose(split.preprocess.mean, mean, rtol=1e-12)
    x, y = next(iter(loader(split.val, batch=4, shuffle=False)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 0]
    assert np.allclose(x.numpy(), images[:4] - mean[None, :, None, None].astype(np.float32), atol=1e-4)


def test_npz_without_validation_is_split_and_gray_becomes_rgb(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.random((20, 5, 5)), y=np.arange(20) % 2, classes=np.asarray(["even", "odd"]))
    split = open_data(path, (3, 5, 5), val_fraction=0.2, num_outputs=2)
    assert split.classes == ["even", "odd"] and (len(split.train), len(split.val)) == (16, 4)
    x, _ = split.train[0]
    assert x.shape == (3, 5, 5) and np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])


def test_digits(tmp_path):
    """scikit-learn's real digits: 1,797 images of 10 classes, resized to the net's input."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    split = open_data("digits", (1, 32, 32), num_outputs=10, val_fraction=0.2, seed=0)
    assert split.classes == [str(d) for d in range(10)]
    assert len(split.train) + len(split.val) == 1797 and abs(len(split.val) - 0.2 * 1797) <= 10
    assert set(split.val.labels.tolist()) == set(range(10))
    x, y = next(iter(loader(split.train, batch=8, augment=split.augment)))
    assert x.shape == (8, 1, 32, 32) and y.shape == (8,)
    # at the digits' own 8 x 8 nothing is resampled: the centre view is the image scaled to 0..255, less the mean
    small = open_data("digits", (1, 8, 8), val_fraction=0.2, seed=0)
    expected = load_digits().images * (255.0 / 16.0)
    assert np.isclose(small.preprocess.mean[0], expected[small.train.rows].mean(), rtol=1e-6)
    row = int(small.val.rows[5])
    assert np.allclose(small.val[5][0][0] + small.preprocess.mean[0], expected[row], atol=1e-3)
    rgb = open_data("digits", (3, 12, 12), val_fraction=0.0)
    assert rgb.train[0][0].shape == (3, 12, 12)


# ---- statistics ----------------------------------------------------------------------------------------


def test_mean_std_and_colour_components_against_numpy(tmp_path):
    make_folder(tmp_path, {"a": 5, "b": 4}, size=(20, 16), seed=9)
    split = open_data(tmp_path, (3, 12, 14), size=16, val_fraction=0, std=True)
    # shorter side already 16: no resampling; the statistics are of the centre 12 x 14 crops
    files = sorted(tmp_path.rglob("*.png"))
    pixels = np.concatenate([pixels_of(f)[2:14, 3:17].reshape(-1, 3) for f in files]).astype(np.float64)
    assert np.allclose(split.preprocess.mean, pixels.mean(axis=0), rtol=1e-12)
    assert np.allclose(split.preprocess.std, pixels.std(axis=0), rtol=1e-9)
    covariance = np.cov(pixels.T / 255.0, bias=True)
    values, vectors = np.linalg.eigh(covariance)
    assert np.allclose(split.augment.eigvals, values[::-1], rtol=1e-9)
    found = np.asarray(split.augment.eigvecs)
    assert np.allclose(np.abs(np.sum(found * vectors[:, ::-1], axis=0)), 1.0, atol=1e-9)  # same axes, up to sign
    x, _ = split.train[0]
    centre = (pixels_of(files[0])[2:14, 3:17] - pixels.mean(axis=0)) / pixels.std(axis=0)
    assert np.allclose(x, centre.transpose(2, 0, 1), atol=1e-5)


def test_principal_components_are_ordered_and_signed():
    rng = np.random.default_rng(10)
    basis, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    covariance = basis @ np.diag([0.5, 2.0, 0.1]) @ basis.T
    values, vectors = principal_components(covariance)
    assert np.allclose(values, [2.0, 0.5, 0.1]) and np.allclose(vectors @ np.diag(values) @ vectors.T, covariance)
    assert all(vectors[np.argmax(np.abs(vectors[:, i])), i] > 0 for i in range(3))


# ---- the paper's augmentation --------------------------------------------------------------------------


def coordinate_image(height: int, width: int) -> np.ndarray:
    """A float image whose pixel (r, c) holds 100 * r + c, so a crop tells where it was taken."""
    return (100.0 * np.arange(height)[:, None] + np.arange(width)[None, :]).astype(np.float32)


def test_random_crops_cover_every_offset_and_flip_half_the_time():
    """4,000 presentations of an 8 x 11 image cropped to 4 x 5: every crop is the image's slice at its
    offset (flipped or not), every one of the 5 x 7 offsets occurs (each count within 6 binomial standard
    deviations of 4000/35), and the flip rate is within 6 binomial standard deviations of one half."""
    draws, height, width, crop = 4000, 8, 11, (4, 5)
    preprocess = Preprocess(size=None, crop=crop, channels=1, mean=(0.0,))
    augment = Augment(pca_noise=0.0)
    image = coordinate_image(height, width)
    counts = np.zeros((height - crop[0] + 1, width - crop[1] + 1), dtype=int)
    flips = 0
    for index in range(draws):
        x = preprocess.augmented(image, augment, sample_rng(0, 0, index))[0]
        corner = int(x.min())
        top, left = corner // 100, corner % 100
        flipped = x[0, 0] > x[0, -1]
        expected = image[top : top + crop[0], left : left + crop[1]]
        assert np.array_equal(x, expected[:, ::-1] if flipped else expected)
        counts[top, left] += 1
        flips += flipped
    p = 1 / counts.size
    assert counts.min() > 0 and np.all(np.abs(counts - draws * p) <= 6 * np.sqrt(draws * p * (1 - p)))
    assert abs(flips - draws / 2) <= 6 * np.sqrt(draws / 4)
    still = Augment(pca_noise=0.0, flip=False, random_crop=False)
    centre = preprocess.augmented(image, still, sample_rng(0, 0, 1))[0]
    assert np.array_equal(centre, image[2:6, 3:8])


def test_pca_colour_noise_has_the_papers_covariance():
    """The offset added to a presentation is one colour for every pixel; over 20,000 presentations the
    offsets (in 0..1 units) have covariance eigvecs * diag(0.1^2 * eigvals^2) * eigvecs^T: projected on
    the eigenvectors, each component's std is within 6 / sqrt(2n) (relative) of 0.1 * eigval and any two
    components' correlation is within 6 / sqrt(n) of 0 (normal-theory standard errors of n draws)."""
    rng = np.random.default_rng(11)
    basis, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    basis *= np.sign(basis[np.argmax(np.abs(basis), axis=0), range(3)])
    eigvals = np.asarray([0.2175, 0.0188, 0.0045])  # the paper's ImageNet figures, as published by fb.resnet
    augment = Augment(
        flip=False, random_crop=False, pca_noise=0.1, eigvals=tuple(eigvals), eigvecs=tuple(map(tuple, basis))
    )
    preprocess = Preprocess(size=None, crop=(2, 2), channels=3, mean=(0.0, 0.0, 0.0))
    image = rng.integers(0, 256, (2, 2, 3)).astype(np.uint8)
    draws = 20_000
    offsets = np.empty((draws, 3))
    for index in range(draws):
        x = preprocess.augmented(image, augment, sample_rng(5, 2, index))
        shift = x - image.transpose(2, 0, 1)
        assert np.allclose(shift, shift[:, :1, :1], atol=1e-3)  # one colour, the same at every pixel
        offsets[index] = shift[:, 0, 0] / 255.0
    expected = basis @ np.diag((0.1 * eigvals) ** 2) @ basis.T
    components = offsets @ basis
    stds = components.std(axis=0)
    assert np.all(np.abs(stds / (0.1 * eigvals) - 1) <= 6 / np.sqrt(2 * draws))
    correlation = np.corrcoef(components.T)
    assert np.all(np.abs(correlation - np.eye(3)) <= 6 / np.sqrt(draws))
    assert np.abs(np.cov(offsets.T) - expected).max() <= 0.05 * np.abs(expected).max()


def test_ten_views_against_numpy_slices(tmp_path):
    rng = np.random.default_rng(12)
    image = rng.integers(0, 256, (13, 17, 3)).astype(np.uint8)
    mean, std = (120.0, 110.0, 100.0), (50.0, 60.0, 70.0)
    preprocess = Preprocess(size=None, crop=(8, 9), channels=3, mean=mean, std=std)
    views = preprocess.views(image, 10)
    places = [(2, 4), (0, 0), (0, 8), (5, 0), (5, 8)]  # centre, top-left, top-right, bottom-left, bottom-right
    expected = []
    for flip in (False, True):
        for top, left in places:
            crop = image[top : top + 8, left : left + 9].astype(np.float64)
            crop = crop[:, ::-1] if flip else crop
            expected.append(((crop - mean) / std).transpose(2, 0, 1))
    assert views.shape == (10, 3, 8, 9) and views.dtype == np.float32
    assert np.allclose(views, np.stack(expected), atol=1e-5)
    assert np.array_equal(preprocess.views(image, 1)[0], preprocess.apply(image))
    assert np.array_equal(views[0], preprocess.apply(image))
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    assert np.array_equal(preprocess.apply(path), preprocess.apply(image))  # a file, an array: the same
    assert np.array_equal(preprocess.apply(image.transpose(2, 0, 1)), preprocess.apply(image))  # C x H x W too
    with pytest.raises(NetError, match="1 or 10"):
        preprocess.views(image, 5)


def test_shorter_side_is_scaled_as_netdsl_run_does(tmp_path):
    rng = np.random.default_rng(13)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (30, 50, 3)).astype(np.uint8)).save(path)
    preprocess = Preprocess(size=20, crop=(16, 16), channels=3, mean=(0.0, 0.0, 0.0))
    with Image.open(path) as image:
        resized = np.asarray(image.resize((33, 20), Image.Resampling.BILINEAR), dtype=np.float32)
    assert preprocess.pixels(path).shape == (20, 33, 3)
    assert np.array_equal(preprocess.apply(path), resized[2:18, 8:24].transpose(2, 0, 1))


def test_scale_jittering_crops_the_image_scaled_to_each_size_of_the_range():
    """VGG's scale jittering, sizes (8, 12) of a 16 x 20 image cropped to 6 x 7: each of 1,500 presentations
    is a crop (flipped or not) of the image scaled by Pillow, shorter side S, for exactly one S of 8..12
    (found by comparing with every crop of every scaled image); each S occurs within 6 binomial standard
    deviations of 1500/5. The same generator gives the same presentation; no jitter, the Preprocess's size."""
    rng = np.random.default_rng(16)
    image = rng.integers(0, 256, (16, 20, 3)).astype(np.uint8)
    crop, sizes, draws = (6, 7), range(8, 13), 1500
    preprocess = Preprocess(size=10, crop=crop, channels=3, mean=(0.0, 0.0, 0.0))
    augment = Augment(pca_noise=0.0, sizes=(8, 12))
    windows = {}
    for size in sizes:
        scaled = np.asarray(Image.fromarray(image).resize((round(20 * size / 16), size), Image.Resampling.BILINEAR))
        windows[size] = np.lib.stride_tricks.sliding_window_view(scaled.astype(np.float32), (*crop, 3), (0, 1, 2))
    counts = dict.fromkeys(sizes, 0)
    for index in range(draws):
        x = preprocess.augmented(image, augment, sample_rng(3, 1, index)).transpose(1, 2, 0)
        matches = [
            size
            for size in sizes
            if any((windows[size] == view).all(axis=(-3, -2, -1)).any() for view in (x, x[:, ::-1]))
        ]
        assert len(matches) == 1, f"presentation {index} matches the sizes {matches}"
        counts[matches[0]] += 1
    p = 1 / len(sizes)
    assert all(abs(count - draws * p) <= 6 * np.sqrt(draws * p * (1 - p)) for count in counts.values()), counts
    again = preprocess.augmented(image, augment, sample_rng(3, 1, 7))
    assert np.array_equal(again, preprocess.augmented(image, augment, sample_rng(3, 1, 7)))
    fixed = preprocess.augmented(image, Augment(pca_noise=0.0, flip=False), sample_rng(3, 1, 7))
    assert (windows[10] == fixed.transpose(1, 2, 0)).all(axis=(-3, -2, -1)).any()
    for bad in ((12, 8), (8, 8), (0, 4), (8,)):
        with pytest.raises(NetError, match="low below high"):
            Augment(pca_noise=0.0, sizes=bad)


def test_random_resized_crop_boxes_follow_their_distributions_and_fall_back_to_the_centre():
    """Inception's boxes on a 240 x 240 image with area (0.1, 0.3), where every first try fits: each box lies
    inside the image with its share of the area uniform on (0.1, 0.3) and its log aspect uniform on (log 3/4,
    log 4/3) (the mean and variance of 4,000 boxes within 6 standard errors; the boxes' sides are whole
    pixels, so within that of a pixel too), and the corners spread over the free room; a 10 x 100 strip with
    area (0.9, 1), where no box of such an aspect fits, takes the largest centred box of aspect 4/3."""
    augment = Augment(pca_noise=0.0, area=(0.1, 0.3))
    draws, side = 4000, 240
    boxes = np.array([augment.box(sample_rng(4, 0, index), side, side) for index in range(draws)], dtype=np.float64)
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= side).all() and (left + width <= side).all()

    def uniform_like(values, low, high, slack):
        mean, var = (low + high) / 2, (high - low) ** 2 / 12
        assert abs(values.mean() - mean) <= 6 * np.sqrt(var / draws) + slack, (values.mean(), mean)
        assert abs(values.var() - var) <= 6 * np.sqrt(var**2 * 0.8 / draws) + slack, (values.var(), var)

    uniform_like(height * width / side**2, 0.1, 0.3, 2 / side)
    uniform_like(np.log(width / height), np.log(3 / 4), np.log(4 / 3), 2 / np.sqrt(0.1 * side**2))
    room_top = side - height
    assert 0.4 < (top / np.maximum(room_top, 1)).mean() < 0.6  # the corner is uniform over the free room
    strip = Augment(pca_noise=0.0, area=(0.9, 1.0))
    assert strip.box(sample_rng(0, 0, 0), 10, 100) == (0, (100 - 13) // 2, 10, 13)
    assert strip.box(sample_rng(0, 0, 0), 100, 10) == ((100 - 13) // 2, 0, 13, 10)  # tall: width / 3/4
    assert Augment(pca_noise=0.0, area=(0.5, 1), aspect=(10, 20)).box(sample_rng(0, 0, 0), 4, 4) == (1, 0, 1, 4)
    for bad in ({"area": (0.0, 1.0)}, {"area": (0.5, 0.2)}, {"area": (0.5, 1.5)}, {"aspect": (2.0, 1.0)}):
        with pytest.raises(NetError, match=r"share of an image.s area a crop takes|aspect ratios of the crops"):
            Augment(pca_noise=0.0, **bad)


def test_a_random_resized_crop_is_its_box_scaled_by_pillow():
    """Each presentation equals the box `Augment.box` draws from the same generator, cut from the image as
    stored and scaled to the net's input by Pillow (flipped or not): for 8-bit RGB, for 1-channel float
    pixels (scaled a plane at a time), and for an image smaller than the net's input."""
    rng = np.random.default_rng(18)
    crop = (12, 10)
    for image in (
        rng.integers(0, 256, (30, 41, 3)).astype(np.uint8),
        rng.standard_normal((25, 19, 1)).astype(np.float32) * 50,
        rng.integers(0, 256, (7, 9, 3)).astype(np.uint8),
    ):
        channels = image.shape[2]
        preprocess = Preprocess(size=16, crop=crop, channels=channels, mean=(0.0,) * channels)
        augment = Augment(pca_noise=0.0, area=(0.2, 0.9))
        flips = 0
        for index in range(40):
            x = preprocess.augmented(image, augment, sample_rng(2, 3, index)).transpose(1, 2, 0)
            top, left, height, width = augment.box(sample_rng(2, 3, index), *image.shape[:2])
            box = image[top : top + height, left : left + width]
            if channels == 3:
                want = np.asarray(Image.fromarray(box).resize(crop[::-1], Image.Resampling.BILINEAR), np.float32)
            else:
                plane = Image.fromarray(np.ascontiguousarray(box[..., 0]), mode="F")
                want = np.asarray(plane.resize(crop[::-1], Image.Resampling.BILINEAR))[..., None]
            flipped = not np.array_equal(x, want)
            assert np.array_equal(x, want[:, ::-1] if flipped else want), index
            flips += flipped
        assert 5 < flips < 35


def test_a_drawn_size_too_large_for_an_image_names_the_file(tmp_path, monkeypatch):
    """An image that a jittered size would make larger than Pillow allows stops the loader with the file's
    name and the size, in the training process or a worker's, not with a traceback from the worker."""
    root = make_folder(tmp_path / "data", {"a": 3, "b": 3}, size=(20, 8), seed=17)
    split = open_data(root, (3, 8, 8), size=8, val_fraction=0)
    monkeypatch.setattr("netdsl.train.augment.MAX_RESIZED_PIXELS", 20 * 8 * 4)  # at most twice the sides
    jitter = Augment(pca_noise=0.0, sizes=(8, 40))
    # a worker sees the patched bound where it is forked (Linux's default before Python 3.14)
    for workers in (0, 1) if multiprocessing.get_start_method() == "fork" else (0,):
        with pytest.raises(NetError, match=r"shorter side scaled to \d+, would be") as caught:
            all_batches(loader(split.train, batch=6, augment=jitter, workers=workers, seed=1))
        assert caught.value.where.startswith(str(root)) and caught.value.where.endswith(".png")


def test_the_scan_checks_each_training_image_at_the_top_of_a_range_of_sizes(tmp_path, monkeypatch):
    """With a range of sizes the scan checks each training image at the range's top too: an image that only a
    large draw would push past Pillow's bound is an error naming it before any step (or skipped and counted
    with skip_corrupt), not a stop at whichever batch first draws that size."""
    root = make_folder(tmp_path / "data", {"a": 3, "b": 3}, size=(8, 8), seed=18)
    make_folder(tmp_path / "wide", {"b": 1}, size=(24, 8), seed=19)
    wide = root / "b" / "wide.png"
    (tmp_path / "wide" / "b" / "000.png").rename(wide)
    monkeypatch.setattr("netdsl.train.augment.MAX_RESIZED_PIXELS", 2000)  # 40 x 40 passes, 40 x 120 does not
    middle = open_data(root, (3, 8, 8), size=24, val_fraction=0)
    assert len(middle.train) == 7  # at the middle size all pass
    with pytest.raises(NetError, match=r"8 x 24, its shorter side scaled to 40, would be 40 x 120") as caught:
        open_data(root, (3, 8, 8), size=24, largest=40, val_fraction=0)
    assert caught.value.where.endswith("wide.png")
    assert caught.value.hint == "crop it nearer to a square first, or skip such images with --skip-corrupt"
    split = open_data(root, (3, 8, 8), size=24, largest=40, val_fraction=0, skip_corrupt=True)
    assert len(split.train) == 6 and len(split.skipped) == 1 and split.skipped[0].endswith("wide.png")
    with pytest.raises(NetError, match="would be 40 x 120"):  # the record of the scan at the middle alone is
        open_data(root, (3, 8, 8), size=24, largest=40, val_fraction=0, scan_record=middle.scan)  # not taken for it


def test_preprocess_round_trips_through_json(tmp_path):
    make_folder(tmp_path, {"x": 3, "y": 3}, seed=14)
    split = open_data(tmp_path, (3, 12, 12), size=14, val_fraction=0, std=True)
    text = split.preprocess.to_json()
    again = Preprocess.from_json(text)
    assert again == split.preprocess and again.to_json() == text
    image = tmp_path / "x/000.png"
    assert np.array_equal(again.apply(image), split.preprocess.apply(image))
    assert np.array_equal(again.views(image, 10), split.preprocess.views(image, 10))
    for damaged in ("{", '{"format": 1}', text.replace('"channels": 3', '"channels": 2'), "[]"):
        with pytest.raises(NetError, match="saved preprocessing is damaged") as caught:
            Preprocess.from_json(damaged, where="w.safetensors")
        assert caught.value.where == "w.safetensors"


# ---- the loader's order --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("images"), {"a": 9, "b": 8, "c": 6}, size=(14, 12), seed=15)
    return open_data(root, (3, 10, 10), size=12, val_fraction=0)


def test_order_is_a_seeded_permutation_per_epoch(images):
    train = images.train
    first = all_batches(loader(train, batch=4, seed=1, epoch=0, augment=images.augment))
    assert_same_batches(first, all_batches(loader(train, batch=4, seed=1, epoch=0, augment=images.augment)))
    assert [len(y) for _, y in first] == [4, 4, 4, 4, 4, 3]
    labels = torch.cat([y for _, y in first]).numpy()
    assert np.array_equal(labels, train.labels[epoch_order(len(train), 1, 0)])
    assert sorted(epoch_order(len(train), 1, 0)) == list(range(len(train)))
    second = all_batches(loader(train, batch=4, seed=1, epoch=1, augment=images.augment))
    assert not np.array_equal(epoch_order(len(train), 1, 1), epoch_order(len(train), 1, 0))
    assert not torch.equal(first[0][0], second[0][0])
    # the same order without augmentation gives other pixels: augmentation is drawn per (seed, epoch, index)
    plain = all_batches(loader(train, batch=4, seed=1, epoch=0))
    assert torch.equal(plain[0][1], first[0][1]) and not torch.equal(plain[0][0], first[0][0])
    ordered = all_batches(loader(train, batch=23, shuffle=False))
    assert ordered[0][1].tolist() == train.labels.tolist()


def test_workers_give_the_same_batches_and_leave_torchs_generator_alone(images):
    state = torch.get_rng_state()
    alone = all_batches(loader(images.train, batch=5, seed=2, epoch=3, augment=images.augment, workers=0))
    shared = all_batches(loader(images.train, batch=5, seed=2, epoch=3, augment=images.augment, workers=2))
    assert_same_batches(alone, shared)
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run's dropout draws stay where they were


def test_start_batch_resumes_exactly(images):
    whole = all_batches(loader(images.train, batch=4, seed=3, epoch=2, augment=images.augment))
    batches = loader(images.train, batch=4, seed=3, epoch=2, augment=images.augment, start_batch=4)
    assert (len(batches), batches.per_epoch) == (2, 6)
    assert_same_batches(whole[4:], all_batches(batches))
    assert len(loader(images.train, batch=4, start_batch=6)) == 0


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_see_what_one_rank_with_twice_the_batch_sees(images, drop_last):
    kwargs = {"seed": 4, "epoch": 1, "augment": images.augment, "drop_last": drop_last}
    one = all_batches(loader(images.train, batch=6, **kwargs))
    ranks = [all_batches(loader(images.train, batch=3, rank=r, world=2, **kwargs)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == batches_per_epoch(23, 3, 2, drop_last)
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    sizes = [[len(y) for _, y in rank] for rank in ranks]
    assert sizes == ([[3, 3, 3], [3, 3, 3]] if drop_last else [[3, 3, 3, 3], [3, 3, 3, 2]])


def test_a_short_last_batch_is_shared_evenly_and_may_leave_a_rank_empty(tmp_path):
    """Every rank takes the same number of batches (collectives stay in step); 5 rows over 3 ranks of
    batch 1: the last global batch of 2 goes 1, 1, 0."""
    path = tmp_path / "five.npz"
    np.savez(path, x=np.random.default_rng(16).random((5, 4, 4)), y=np.arange(5) % 2)
    train = open_data(path, (1, 4, 4), val_fraction=0).train
    shapes = [[tuple(x.shape) for x, _ in loader(train, batch=1, world=3, rank=rank)] for rank in range(3)]
    assert shapes == [[(1, 1, 4, 4)] * 2, [(1, 1, 4, 4)] * 2, [(1, 1, 4, 4), (0, 1, 4, 4)]]


# ---- errors --------------------------------------------------------------------------------------------


def expect_error(match: str, *args, **kwargs) -> NetError:
    with pytest.raises(NetError, match=match) as caught:
        open_data(*args, **kwargs)
    assert "Traceback" not in caught.value.format()
    return caught.value


def test_folder_errors(tmp_path):
    error = expect_error("no such data folder", tmp_path / "nowhere", (3, 8, 8))
    assert error.where == str(tmp_path / "nowhere") and "DIR/train/<class>" in error.hint
    assert "did you mean `digits`" in expect_error("no such data folder", "digitz", (1, 8, 8)).hint
    (tmp_path / "empty").mkdir()
    expect_error("is empty", tmp_path / "empty", (3, 8, 8))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat/a.png")
    assert "<class>" in expect_error("no class folders", tmp_path / "flat", (3, 8, 8)).hint
    (tmp_path / "hollow/train/a").mkdir(parents=True)
    assert expect_error("holds no images", tmp_path / "hollow", (3, 8, 8)).where == str(tmp_path / "hollow/train/a")
    make_folder(tmp_path / "differ/train", {"a": 1, "b": 1})
    make_folder(tmp_path / "differ/val", {"a": 1, "c": 1})
    unknown = r"differ/val/c: error: val/ has classes that train/ has not: c\n"
    error = expect_error(unknown, tmp_path / "differ", (3, 8, 8))
    assert error.where == str(tmp_path / "differ/val/c")
    (tmp_path / "notes.md").write_text("hello")
    expect_error("neither a data folder, an image list nor an .npz", tmp_path / "notes.md", (3, 8, 8))
    (tmp_path / "notes.txt").write_text("hello")  # .txt: read as an image list
    expect_error("`hello` names no class", tmp_path / "notes.txt", (3, 8, 8))
    expect_error(r"validation fraction", tmp_path / "differ", (3, 8, 8), val_fraction=1.0)
    make_folder(tmp_path / "three", {"a": 1, "b": 1, "c": 1})
    error = expect_error("has 3 classes, but the net scores 2", tmp_path / "three", (3, 8, 8), num_outputs=2)
    assert "3 outputs" in error.hint
    error = expect_error(r"2-channel inputs; images give 1 \(gray\) or 3 \(RGB\)", tmp_path / "three", (2, 8, 8))
    assert error.where == str(tmp_path / "three")


def test_corrupt_images_are_named_or_skipped_and_counted(tmp_path):
    make_folder(tmp_path / "train", {"a": 3, "b": 3}, suffix=".jpg")
    make_folder(tmp_path / "val", {"a": 1, "b": 1}, suffix=".jpg")
    garbage = tmp_path / "train/a/001.jpg"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "val/b/000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    error = expect_error("cannot read .*001.jpg as an image", tmp_path, (3, 8, 8))
    assert error.where == str(garbage) and "--skip-corrupt" in error.hint
    garbage.write_bytes((tmp_path / "train/a/000.jpg").read_bytes())
    expect_error("cannot read .*val/b/000.jpg as an image", tmp_path, (3, 8, 8))
    garbage.write_bytes(b"\x89PNG broken")
    split = open_data(tmp_path, (3, 8, 8), skip_corrupt=True, workers=2)
    assert split.skipped == [str(garbage), str(truncated)]
    assert (len(split.train), len(split.val)) == (5, 1)
    # a file that breaks after open_data: the loader names it too, from a worker as from this process
    (tmp_path / "train/b/002.jpg").write_bytes(b"gone bad")
    for workers in (0, 2):
        with pytest.raises(NetError, match=r"cannot read .*002\.jpg as an image") as caught:
            list(loader(split.train, batch=2, shuffle=False, workers=workers))
        assert caught.value.where == str(tmp_path / "train/b/002.jpg")


class PendingError(Exception):
    """A process's gather that waits for others' shares."""


class SharedWorld:
    """Process `rank` of `size`, as torchrun starts them: `gather` returns every process's value (as
    all_gather_object does, in rank order) once each has given one, and stops the caller until then."""

    distributed = True

    def __init__(self, rank: int, size: int, board: list) -> None:
        self.rank, self.size, self.board = rank, size, board

    def gather(self, value):
        self.board[self.rank] = dict(value)  # a copy, as all_gather_object's pickling makes
        if any(part is None for part in self.board):
            raise PendingError
        return list(self.board)


@pytest.mark.parametrize("size", [3, 9])
def test_processes_share_the_scan_and_measure_one_process_bits(tmp_path, monkeypatch, size):
    """Under torchrun each process decodes every Nth batch of the images (6 batches of 4 here; at 9
    processes, three decode none) and every process gets what one process finds: the unreadable files in
    order, and the sums to the bit (float images, whose sums round: summed in another order, they differ),
    each image decoded once between them."""
    from netdsl.train import scan
    from netdsl.train.data import ImageFiles

    rng = np.random.default_rng(15)
    paths = [tmp_path / f"{index:02d}.tif" for index in range(22)]
    for path in paths:  # float pixels with every bit of float32 in use
        Image.fromarray((rng.random((17, 21)) * 255).astype(np.float32)).save(path)
    paths[13].write_bytes(b"II*\x00 torn")
    paths[4].write_bytes(b"")
    samples = ImageFiles(paths, np.zeros(len(paths), dtype=np.int64), Preprocess(13, (11, 11), 1, mean=(0.0,)))
    monkeypatch.setattr(scan, "BATCH", 4)
    decoded = []
    real = scan._Decode.__getitem__
    monkeypatch.setattr(scan._Decode, "__getitem__", lambda self, i: decoded.append(i) or real(self, i))

    shown = []

    class Meter:  # what the run's progress meter is told
        def __init__(self, images: int) -> None:
            shown.append([images])

        def advance(self, count: int) -> None:
            shown[-1].append(count)

        def close(self) -> None:
            shown[-1].append("closed")

    failures, *sums = scan.decode(samples, True, 0, meter=Meter)
    assert [index for index, *_ in failures] == [4, 13] and decoded == list(range(22))
    assert shown == [[22, 4, 4, 4, 4, 4, 2, "closed"]]
    decoded.clear()
    board, shared = [None] * size, [None] * size
    for rank in range(size):
        with pytest.raises(PendingError) if rank < size - 1 else contextlib.nullcontext():
            shared[rank] = scan.decode(samples, True, 0, SharedWorld(rank, size, board))
    assert sorted(decoded) == list(range(22))  # each image once, between the processes
    for rank in range(size - 1):  # the others' gathers, answered now
        shared[rank] = scan.decode(samples, True, 0, SharedWorld(rank, size, board))
    for got in shared:
        assert got[0] == failures
        assert all(np.array_equal(mine, theirs) for mine, theirs in zip(got[1:], sums))
    batches = {b: found for part in board for b, found in part.items()}
    assert sorted(batches) == list(range(6))  # each batch decoded by one process
    orders = itertools.permutations(range(6))  # the order matters: the equalities above can fail
    assert any(not np.array_equal(sum((batches[b][3] for b in order), 0.0), sums[2]) for order in orders)


def test_processes_use_a_saved_scan_only_where_every_one_can(monkeypatch):
    """At a resume, a node whose copy of the images has other file times cannot use the run's scan record:
    then no process uses it (each would wait for shares of a scan the others skip). A process that died is
    the error that says so, from every collective of the run's processes (the scan's, an epoch's sums, the
    barriers), not an internal error."""
    import torch.distributed as dist

    from netdsl.train import scan
    from netdsl.train.world import World

    class Others:
        distributed = True

        def __init__(self, answers) -> None:
            self.answers = answers

        def gather(self, value):
            return [value, *self.answers]

    saved = ([[], []], [4, np.ones(1), np.ones((1, 1))])
    assert scan.agreed(Others([True, True]), saved) is saved and scan.agreed(None, saved) is saved
    assert scan.agreed(Others([True, False]), saved) is None and scan.agreed(Others([True]), None) is None

    def dead(*args, **kwargs):
        raise dist.DistBackendError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    for name in ("all_gather_object", "all_reduce", "barrier"):
        monkeypatch.setattr(dist, name, dead)
    world = World(0, 2)
    for collective in (lambda: scan.agreed(world, saved), lambda: world.sum([1.0]), world.barrier):
        with pytest.raises(NetError, match=r"another process of the run stopped answering .*Connection closed"):
            collective()


def test_npz_errors(tmp_path):
    path = tmp_path / "data.npz"
    x, y = np.zeros((4, 1, 8, 8), dtype=np.uint8), np.asarray([0, 1, 2, 1])
    np.savez(path, images=x, y=y)
    assert "numpy.savez" in expect_error("has no array `x`", path, (1, 8, 8)).hint
    np.savez(path, x=x)
    expect_error("has no array `y`", path, (1, 8, 8))
    np.savez(path, x=x, y=y[:3])
    expect_error("x has 4 images but y has 3 labels", path, (1, 8, 8))
    np.savez(path, x=x, y=y, x_val=x)
    expect_error("only one of x_val and y_val", path, (1, 8, 8))
    for labels, hint in (
        (y.astype(np.float32), "save y.astype(int)"),
        (y + 0.5, "class indices are whole numbers 0, 1, ...; y holds others, such as 0.5"),
        (y[:, None], "save y.reshape(-1)"),
        (np.eye(3)[y], "a class index per image, not a row of 3 scores: save y.argmax(axis=1)"),
        (np.asarray(list("abca")), "classes=names and y=indices: names, y = numpy.unique(y, return_inverse=True)"),
        (np.asarray(2), "save one class index per image of x"),
    ):
        np.savez(path, x=x, y=labels)
        assert hint in expect_error("integer class indices", path, (1, 8, 8)).hint
    np.savez(path, x=x, y=y, x_val=x, y_val=np.eye(3)[y])
    assert "save y_val.argmax(axis=1)" in expect_error("y_val must be a 1-D array", path, (1, 8, 8)).hint
    np.savez(path, x=x, y=y)
    error = expect_error(r"x\[2\] has label 2, beyond the net's 2 outputs", path, (1, 8, 8), num_outputs=2)
    assert "at least 3 outputs" in error.hint and str(path) not in error.message  # the file is named once
    np.savez(path, x=x, y=np.asarray([0, 2, 5, 1]))
    error = expect_error(r"x\[1\] has label 2, beyond the net's 2 outputs", path, (1, 8, 8), num_outputs=2)
    assert "at least 6 outputs (the largest label is 5)" in error.hint  # not the first label out of range
    np.savez(path, x=x, y=np.asarray([0, -1, 0, 1]))
    expect_error("label -1; class indices start at 0", path, (1, 8, 8))
    np.savez(path, x=np.zeros((4, 5, 8, 8)), y=y)
    expect_error("does not hold 3-channel images", path, (3, 8, 8))
    path.write_bytes(b"PK not really a zip")
    expect_error("cannot read .* as an .npz file", path, (1, 8, 8))
    expect_error("no such data folder or file", tmp_path / "missing.npz", (1, 8, 8))
    # what zipfile refuses to unpack, beyond a damaged archive: a newer zip version, an encrypted member, an
    # unknown compression method (NotImplementedError, RuntimeError) -- each a data error, not an internal one
    np.savez(path, x=x, y=y)
    whole = path.read_bytes()
    for offset, value, said in ((6, 169, "zip file version 16.9"), (8, 1, "encrypted"), (10, 99, "compression")):
        patched, start = bytearray(whole), 0
        while (start := patched.find(b"PK\x01\x02", start) + 1) > 0:  # every member's central directory entry
            patched[start - 1 + offset : start + 1 + offset] = value.to_bytes(2, "little")
        path.write_bytes(bytes(patched))
        expect_error(f"cannot read .* as an .npz file .*{said}", path, (1, 8, 8))


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed: not found, and `import` fails
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    error = expect_error("comes with scikit-learn, which is not installed", "digits", (1, 8, 8))
    assert error.hint == "pip install 'netdsl[train]'" and error.where == "digits"


@pytest.mark.parametrize("shipped", ["read", "missing", "damaged", "other table"])
def test_the_digits_read_without_scikit_learn_equal_load_digits(tmp_path, monkeypatch, shipped):
    """The file in the scikit-learn wheel, read without importing scikit-learn, holds what its load_digits
    returns; where the file is missing, damaged or another table (a later layout), load_digits is called."""
    pytest.importorskip("sklearn")
    import importlib.util
    from types import SimpleNamespace

    from sklearn.datasets import load_digits as sklearns

    from netdsl.train import digits

    if shipped != "read":
        package = tmp_path / "sklearn"
        (package / "datasets" / "data").mkdir(parents=True)
        shipped_file = package / "datasets" / "data" / "digits.csv.gz"
        if shipped == "damaged":
            shipped_file.write_bytes(b"\x1f\x8b\x08\x00 not gzip")
        elif shipped == "other table":
            np.savetxt(shipped_file, np.random.default_rng(0).integers(0, 17, (20, 65)), delimiter=",")
        found = SimpleNamespace(origin=str(package / "__init__.py"))
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: found if name == "sklearn" else real(name))
    read, calls = digits._read_shipped, []
    monkeypatch.setattr(digits, "_read_shipped", lambda path: calls.append(path) or read(path))
    images, labels = digits.load_digits()
    want = sklearns()
    assert images.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, want.images)
    np.testing.assert_array_equal(labels, want.target)
    assert len(calls) == 1 and (read(calls[0]) is not None) == (shipped == "read")
    assert sorted(set(labels.tolist())) == list(range(10)) and len(set(images.ravel().tolist())) == 17


def test_loader_and_augment_errors(images):
    with pytest.raises(NetError, match="batch size must be at least 1") as caught:
        loader(images.train, batch=0)
    assert caught.value.where == "--batch"
    with pytest.raises(NetError, match="cannot start at batch 7: an epoch has 6 batches"):
        loader(images.train, batch=4, start_batch=7)
    with pytest.raises(NetError, match="rank 2 of a world of 2"):
        loader(images.train, batch=4, rank=2, world=2)
    with pytest.raises(NetError, match="needs the training set's colour eigenvalues"):
        Augment()
    gray = Augment(eigvals=(1.0,), eigvecs=((1.0,),))
    with pytest.raises(NetError, match="1 components, but the images 3 channels"):
        loader(images.train, batch=4, augment=gray)


def test_more_workers_than_cpus_load_with_one_per_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 3}, raising=False)
    assert loading_workers(0) == (0, None) and loading_workers(2) == (2, None)
    count, note = loading_workers(16)
    assert count == 2 and note == "note: --workers 16 is more than the 2 CPUs this process may use; loading with 2"
    # torchrun's processes on one machine: those that may each run on every CPU share them
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    assert loading_workers(2, sharing=4) == (2, None) and loading_workers(8) == (8, None)
    count, note = loading_workers(4, sharing=4)
    assert count == 2 and note.endswith("than the 2 CPUs each of this machine's 4 processes may use; loading with 2")
    assert loading_workers(12, sharing=16) == (1, "note: --workers 12 is more than the 1 CPU each of this "
                                                   "machine's 16 processes may use; loading with 1")  # fmt: skip
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {2, 3}, raising=False)  # bound by the launcher
    assert loading_workers(2, sharing=4) == (2, None)


def test_the_world_reads_how_many_processes_share_this_machine(monkeypatch):
    launch = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert World.from_environment() == World(3, 4, 1, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert World.from_environment() == World(3, 4, 1, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(NetError, match="LOCAL_WORLD_SIZE must be whole numbers") as caught:
        World.from_environment()
    assert caught.value.where == "torchrun"


def test_benchmark_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_train_data", BENCH / "train_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--images", "6", "--width", "24", "--height", "20", "--size", "18", "--crop", "16", "--batch", "4"]
    assert bench.main([*argv, "--workers", "0,1", "--epochs", "1", "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "reproduce: python bench/train_data.py --images 6 --width 24 --height 20" in out
    assert [line.split()[2] for line in out.splitlines() if line.startswith("loader epoch")] == ["0", "1"]
    assert [line.split()[4] for line in out.splitlines() if line.startswith("scan, 2 processes")] == ["6"]
    for kind in ("jitter", "inception"):
        assert bench.main([*argv, "--workers", "0", "--epochs", "1", "--augment", kind]) == 0
        out = capsys.readouterr().out
        rows = [line.split() for line in out.splitlines() if line.startswith("loader epoch")]
        assert f"--augment {kind}" in out and [row[3] for row in rows] == ["6"]
