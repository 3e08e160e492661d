"""`netdsl filters`: a conv's filters as a picture (the AlexNet paper's Figure 3), checked pixel by pixel against
the weights: each filter scaled to its own range, enlarged, in rows of tiles, one block per tower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netdsl.cli.filters import filter_picture
from netdsl.cli.main import main
from netdsl.lang.frontend import load_graph
from netdsl.runtime.weights import init_weights, save_weights

ROOT = Path(__file__).resolve().parent.parent
TOWERS = """net two
input image: 3 x 12 x 12
towers gpu0, gpu1 {
    c1 = conv(image, 5, size=3) | relu
}
f = fc(all c1, 4) on gpu0
output f
"""


def tile(weights: np.ndarray, zoom: int) -> np.ndarray:
    """One filter (C x kh x kw) as its tile, written out: lowest weight 0, highest 255, each weight zoom x zoom."""
    scaled = (weights - weights.min()) / (weights.max() - weights.min())
    pixels = np.round(scaled * 255).astype(np.uint8).transpose(1, 2, 0)
    return np.kron(pixels, np.ones((zoom, zoom, 1), dtype=np.uint8))


def test_the_picture_is_each_filter_scaled_to_its_range_in_rows_of_tiles():
    rng = np.random.default_rng(1)
    first, second = rng.standard_normal((5, 3, 2, 3)), rng.standard_normal((5, 3, 2, 3))
    second[4] = 0.25  # a constant filter: mid-gray
    picture = filter_picture([first, second], columns=3, zoom=2)
    # each block: 2 rows of 3 tiles of 4 x 6 pixels, a pixel of white around each; the blocks half a tile apart
    block_height = 2 * (4 + 1) + 1
    assert picture.shape == (2 * block_height + 2, 3 * (6 + 1) + 1, 3) and picture.dtype == np.uint8
    for block, kernel in enumerate((first, second)):
        for number in range(5):
            top = block * (block_height + 2) + 1 + (number // 3) * 5
            left = 1 + (number % 3) * 7
            got = picture[top : top + 4, left : left + 6]
            want = np.full((4, 6, 3), 128, dtype=np.uint8) if block and number == 4 else tile(kernel[number], 2)
            np.testing.assert_array_equal(got, want)
    assert (picture[block_height : block_height + 2] == 255).all()  # the space between the blocks
    assert (picture[11 - 5 : 11, 1 + 2 * 7 : 21] == 255).all()  # no sixth filter: the last tile blank
    gray = filter_picture([rng.standard_normal((2, 1, 3, 3))], zoom=1)
    assert gray.shape == (5, 9)  # one row of two 3 x 3 tiles, gray: H x W


def test_filters_draws_each_towers_first_conv_as_a_block(tmp_path, capsys):
    from PIL import Image

    net = tmp_path / "two.net"
    net.write_text(TOWERS)
    graph = load_graph(net)
    weights = init_weights(graph, seed=3, scheme="he")
    save_weights(tmp_path / "w.safetensors", weights)
    out = tmp_path / "filters.png"
    assert main(["filters", str(net), "--weights", str(tmp_path / "w.safetensors"), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}: 10 filters of c1@gpu0, c1@gpu1 (3 x 3 x 3)\n"
    picture = np.asarray(Image.open(out))
    zoom = 16  # tiles of about 48 pixels
    assert picture.shape == (2 * (48 + 2) + 24, 5 * 49 + 1, 3)
    for block, tower in enumerate(("gpu0", "gpu1")):
        for number in range(5):
            top, left = block * (50 + 24) + 1, 1 + number * 49
            want = tile(weights[f"c1@{tower}.weight"][number].astype(np.float64), zoom)
            np.testing.assert_array_equal(picture[top : top + 48, left : left + 48], want)
    one = tmp_path / "one.png"  # one tower's copy, by its own name
    assert main(["filters", str(net), "--weights", str(tmp_path / "w.safetensors"), "-o", str(one),
                 "--layer", "c1@gpu1", "--zoom", "2", "--columns", "2"]) == 0  # fmt: skip
    assert np.asarray(Image.open(one)).shape == (3 * 7 + 1, 2 * 7 + 1, 3)


def test_an_onnx_model_draws_its_own_filters(tmp_path, capsys):
    pytest.importorskip("onnx")
    from PIL import Image

    net = tmp_path / "two.net"
    net.write_text(TOWERS)
    save_weights(tmp_path / "w.safetensors", init_weights(load_graph(net), seed=4, scheme="he"))
    model = tmp_path / "two.onnx"
    assert main(["export", str(net), "--weights", str(tmp_path / "w.safetensors"), "-o", str(model)]) == 0
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["filters", str(model), "-o", str(out)]) == 0
    assert main(["filters", str(net), "--weights", str(tmp_path / "w.safetensors"), "-o", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


@pytest.mark.parametrize(
    "args, message",
    [
        (["-o", "{d}/f.png"], "--weights: error: filters draws trained weights, and none were given"),
        (["--weights", "{d}/w.safetensors", "-o", "{d}/f.jpg"], "--output: error: {d}/f.jpg is not a .png file"),
        (["--weights", "{d}/w.safetensors", "-o", "{d}"], "--output: error: "),
        (["--weights", "{d}/w.safetensors", "-o", "{d}/f.png", "--layer", "c3"], "the filters of `c3` read 6 channels"),
        (["--weights", "{d}/w.safetensors", "-o", "{d}/f.png", "--layer", "c2"], "no layer `c2`"),
        (["--weights", "{d}/w.safetensors", "-o", "{d}/f.png", "--layer", "f5"], "`f5` is a fc layer, not a conv"),
        (["--weights", "{d}/none.safetensors", "-o", "{d}/f.png"], "none.safetensors: error: "),
        (["--weights", "{d}/w.safetensors", "-o", "{d}/f.png", "--zoom", "0"], "--zoom: not a positive"),
        (["--weights", "{d}/w.safetensors", "-o", "{d}/f.png", "--zoom", "1000000"], "--zoom: error: the picture "
         "would be 30,000,007 x 5,000,002 pixels"),
    ],
    ids=["no-weights", "not-png", "folder", "six-channels", "no-layer", "not-conv", "missing-weights", "zoom",
         "huge"],
)
def test_what_filters_cannot_draw_is_a_clear_error(tmp_path, capsys, args, message):
    lenet = ROOT / "nets/lenet5.net"
    save_weights(tmp_path / "w.safetensors", init_weights(load_graph(lenet)))
    assert main(["filters", str(lenet), *(arg.replace("{d}", str(tmp_path)) for arg in args)]) == 1
    err = capsys.readouterr().err
    assert message.replace("{d}", str(tmp_path)) in err and "Traceback" not in err, err
    assert not (tmp_path / "f.png").exists()
