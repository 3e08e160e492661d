"""Darknet's augmentations. Its colour jitter (`saturation`, `exposure`, `hue`): the HSV conversions against Python's
colorsys pixel by pixel, a presentation against colorsys with the factors drawn, the factors' ranges, the other
draws left as they were, and the settings a gray net cannot take refused by name. Its rotation (`angle`): against
Pillow's Image.rotate and numpy's quarter turns, and through a presentation."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from netdsl.cli.main import main
from netdsl.errors import NetError
from netdsl.train.augment import Augment, Preprocess, hsv_to_rgb, jittered, rgb_to_hsv, rotated_crop, sample_rng


def pixels_with_edges(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random RGB pixels (0..255) and the cases a formula gets wrong: grays, black, white, primaries, ties."""
    values = rng.uniform(0, 255, (count, 3))
    values[:8] = values[:8, :1]  # grays: hue 0, saturation 0
    values[8:16] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [10, 10, 200], [200, 200, 10]]  # fmt: skip
    return values


def test_the_hsv_conversions_are_colorsys_pixel_by_pixel():
    rng = np.random.default_rng(2)
    rgb = pixels_with_edges(rng, 500)
    hsv = rgb_to_hsv(rgb.reshape(20, 25, 3))
    want = np.array([colorsys.rgb_to_hsv(*pixel) for pixel in rgb]).reshape(20, 25, 3)
    np.testing.assert_allclose(hsv, want, rtol=0, atol=1e-12)
    drawn = np.stack([rng.uniform(0, 1, 500), rng.uniform(0, 1, 500), rng.uniform(0, 255, 500)], axis=1)
    drawn[:5, 1] = 0  # no saturation: gray
    want = np.array([colorsys.hsv_to_rgb(*pixel) for pixel in drawn])
    np.testing.assert_allclose(hsv_to_rgb(drawn), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(hsv_to_rgb(hsv).reshape(-1, 3), rgb, rtol=0, atol=1e-9)  # there and back


@pytest.mark.parametrize(("shift", "saturation", "exposure"), [(0.07, 1.4, 0.8), (-0.1, 0.6, 1.5), (0.5, 2.0, 1.0)])
def test_a_jittered_crop_is_colorsys_with_the_factors(shift, saturation, exposure):
    """Each pixel: hue + shift (around the circle), saturation x factor (at most 1), value x factor (at most 255)."""
    rng = np.random.default_rng(3)
    crop = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    crop[0, :3] = [[255, 255, 255], [0, 0, 0], [250, 20, 20]]  # white past 255 when brighter, black, a pure red
    got = jittered(crop, shift, saturation, exposure)
    assert got.dtype == np.float32 and got.shape == crop.shape
    for row, column in np.ndindex(*crop.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*crop[row, column].astype(float))
        want = colorsys.hsv_to_rgb((h + shift) % 1.0, min(s * saturation, 1.0), min(v * exposure, 255.0))
        np.testing.assert_allclose(got[row, column], want, rtol=0, atol=2e-4, err_msg=str((row, column)))
    gray = rng.integers(0, 256, (4, 4, 1), dtype=np.uint8)
    np.testing.assert_allclose(jittered(gray, shift, saturation, exposure), np.minimum(gray * exposure, 255.0),
                               rtol=1e-6)  # fmt: skip


def test_the_draws_factors_and_what_they_leave_alone():
    """Factors within [1/s, s], each side about half the time; shifts within [-hue, hue]; the crop, flip and PCA
    colour drawn as without the jitter (it is drawn after them); off, no jitter at all."""
    eig = {"eigvals": (0.2, 0.02, 0.005), "eigvecs": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))}
    plain = Augment(pca_noise=0.1, **eig)
    colour = Augment(pca_noise=0.1, saturation=1.5, exposure=1.25, hue=0.1, **eig)
    below = 0
    for index in range(400):
        without = plain.draw(sample_rng(1, 0, index), 20, 30, (16, 16))
        draw = colour.draw(sample_rng(1, 0, index), 20, 30, (16, 16))
        assert (draw.top, draw.left, draw.flip) == (without.top, without.left, without.flip)
        np.testing.assert_array_equal(draw.colour, without.colour)
        assert without.jitter is None
        shift, saturation, exposure = draw.jitter
        assert -0.1 <= shift <= 0.1 and 1 / 1.5 <= saturation <= 1.5 and 1 / 1.25 <= exposure <= 1.25
        below += saturation < 1
    assert 150 <= below <= 250  # inverted one time in two
    assert Augment(pca_noise=0.0, exposure=1.5).draw(sample_rng(1, 0, 0), 8, 8, (8, 8)).jitter[1] == 1.0


def test_a_presentation_jitters_its_crop_before_the_mean_is_taken():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    augment = Augment(pca_noise=0.0, saturation=1.5, exposure=1.5, hue=0.2)
    preprocess = Preprocess(size=None, crop=(8, 8), channels=3, mean=(100.0, 110.0, 120.0))
    got = preprocess.augmented(image, augment, sample_rng(3, 1, 7))
    draw = augment.draw(sample_rng(3, 1, 7), 12, 14, (8, 8))
    crop = image[draw.top : draw.top + 8, draw.left : draw.left + 8][:, :: -1 if draw.flip else 1]
    want = jittered(crop, *draw.jitter).transpose(2, 0, 1) - np.array([100.0, 110.0, 120.0])[:, None, None]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert not np.allclose(got, preprocess.augmented(image, Augment(pca_noise=0.0), sample_rng(3, 1, 7)))


def test_saturation_and_hue_need_colour_images():
    for name in ("saturation", "hue"):
        with pytest.raises(NetError, match=f"`{name}` changes colours") as caught:
            Augment(pca_noise=0.0, **{name: 1.5 if name == "saturation" else 0.1}).check_channels(1)
        assert caught.value.where == name
    Augment(pca_noise=0.0, exposure=1.5).check_channels(1)  # a gray image's brightness
    Augment(pca_noise=0.0, saturation=1.5, hue=0.1).check_channels(3)


@pytest.mark.parametrize(
    ("settings", "where"),
    [({"saturation": 0.5}, "saturation"), ({"exposure": float("inf")}, "exposure"), ({"hue": 0.6}, "hue"),
     ({"hue": -0.1}, "hue")],
)  # fmt: skip
def test_ranges_a_jitter_cannot_take(settings, where):
    with pytest.raises(NetError) as caught:
        Augment(pca_noise=0.0, **settings)
    assert caught.value.where == where


def test_a_gray_net_takes_exposure_and_refuses_colour_changes_by_flag(tmp_path, capsys):
    from train_support import TINY

    net, data = tmp_path / "tiny.net", tmp_path / "d.npz"
    net.write_text(TINY)
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.integers(0, 256, (24, 1, 8, 8)).astype(np.uint8), y=rng.integers(0, 10, 24))
    common = ["train", str(net), "--data", str(data), "--steps", "2", "--batch", "4", "--workers", "0"]
    assert main([*common, "--exposure", "1.5", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main([*common, "--saturation", "1.5", "--out", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("--saturation: error: `saturation` changes colours, and the images have 1 channel(s)")
    assert not (tmp_path / "other").exists()


# --- Darknet's rotation (`angle`) ---------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [10.0, -33.0, 57.5])
def test_a_rotated_crop_is_pillows_rotation_cut(degrees):
    """Against Pillow's Image.rotate (bilinear, counter-clockwise about the centre, the fill colour where nothing
    comes from): within Pillow's rounding to whole pixels inside the picture; the crop is its part of the turned
    image; the corners far outside take the fill."""
    from PIL import Image

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (21, 30, 3), dtype=np.uint8)
    fill = (7.0, 80.0, 200.0)
    turned = np.asarray(Image.fromarray(image).rotate(degrees, resample=Image.Resampling.BILINEAR,
                                                      fillcolor=(7, 80, 200)), dtype=np.float64)  # fmt: skip
    whole = rotated_crop(image, 0, 0, (21, 30), degrees, fill)
    np.testing.assert_allclose(whole[5:-5, 8:-8], turned[5:-5, 8:-8], rtol=0, atol=1.0)
    np.testing.assert_allclose(rotated_crop(image, 4, 6, (9, 11), degrees, fill), whole[4:13, 6:17], atol=1e-4)
    assert np.allclose(whole[0, 0], fill) and np.allclose(whole[-1, -1], fill)  # a corner turned out of the picture


def test_quarter_and_half_turns_are_exact():
    rng = np.random.default_rng(6)
    square = rng.integers(0, 256, (12, 12, 1), dtype=np.uint8)
    np.testing.assert_allclose(rotated_crop(square, 0, 0, (12, 12), 90.0, (0.0,)), np.rot90(square), atol=1e-9)
    np.testing.assert_allclose(rotated_crop(square, 0, 0, (12, 12), -90.0, (0.0,)), np.rot90(square, -1), atol=1e-9)
    wide = rng.standard_normal((7, 10, 3)).astype(np.float32)  # an array's own scale, negative values too
    np.testing.assert_allclose(rotated_crop(wide, 0, 0, (7, 10), 180.0, (0.0,) * 3), wide[::-1, ::-1], atol=1e-5)
    np.testing.assert_array_equal(rotated_crop(wide, 2, 3, (4, 5), 0.0, (0.0,) * 3), wide[2:6, 3:8])


def test_a_presentation_turns_its_image_before_the_crop_and_draws_the_angle_last():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (14, 16, 3), dtype=np.uint8)
    augment = Augment(pca_noise=0.0, angle=20.0)
    preprocess = Preprocess(size=None, crop=(8, 8), channels=3, mean=(100.0, 110.0, 120.0))
    angles = []
    for index in range(50):
        draw = augment.draw(sample_rng(3, 1, index), 14, 16, (8, 8))
        plain = Augment(pca_noise=0.0).draw(sample_rng(3, 1, index), 14, 16, (8, 8))
        assert (draw.top, draw.left, draw.flip) == (plain.top, plain.left, plain.flip) and plain.angle == 0.0
        angles.append(draw.angle)
        got = preprocess.augmented(image, augment, sample_rng(3, 1, index))
        crop = rotated_crop(image, draw.top, draw.left, (8, 8), draw.angle, preprocess.mean)
        want = crop[:, :: -1 if draw.flip else 1].transpose(2, 0, 1) - np.array(preprocess.mean)[:, None, None]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert -20 <= min(angles) < -5 and 5 < max(angles) <= 20
    with pytest.raises(NetError) as caught:
        Augment(pca_noise=0.0, angle=200.0)
    assert caught.value.where == "angle"
