"""`netdsl neighbours` (the AlexNet paper's Figure 4, right): the training images nearest to each query by a
layer's values. Checked against the nets written by hand with F.conv2d and F.linear on each image's centre
view and every distance taken in numpy; the layers a name stands for; the search a batch at a time; the picture
tile by tile; and what it cannot do, as errors naming the flag."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import trained_on_folder

from netdsl.cli.filters import tile_pixels
from netdsl.cli.main import main
from netdsl.cli.neighbours import neighbour_picture, picture_size
from netdsl.errors import NetError
from netdsl.lang.frontend import graph_from_text, load_graph
from netdsl.runtime.weights import init_weights
from netdsl.train.features import Features, Nearest, feature_layers

ROOT = Path(__file__).resolve().parent.parent
TOWERS = """net two
device gpu0, gpu1
input image: 1 x 8 x 8
towers gpu0, gpu1 {
    c1 = conv(image, 2, size=3) | relu
    h = fc(all c1, 4) | relu | dropout(0.5)
}
out = fc(all h, 3) on gpu0
output out
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(net, run, folder of classes cat, dog, owl with 6 random 8 x 8 images each): two training steps."""
    return trained_on_folder(tmp_path_factory.mktemp("neighbours"), per_class=6, seed=11, steps=2)


def neighbours(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["neighbours", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def tables(out: str) -> list[tuple[str, list[tuple[str, str, float]]]]:
    """Each query's heading and its rows (image, class, distance), as printed."""
    found = []
    for block in out.split("\nquery ")[1:]:
        lines = block.splitlines()
        rows = [line.split() for line in lines[3:] if re.match(r"\s*\d+\s", line)]
        found.append((lines[0], [(row[1], row[2], float(row[3])) for row in rows]))
    return found


def test_a_name_stands_for_what_the_nets_text_calls_by_it():
    alexnet, lenet = load_graph(ROOT / "nets/alexnet.net"), load_graph(ROOT / "nets/lenet5.net")
    assert feature_layers(alexnet) == ["fc7.dropout@gpu0", "fc7.dropout@gpu1"]  # the last hidden layer
    assert feature_layers(alexnet, "fc7") == ["fc7.dropout@gpu0", "fc7.dropout@gpu1"]  # a chain: its end
    assert feature_layers(alexnet, "fc7@gpu1") == ["fc7.dropout@gpu1"]
    assert feature_layers(alexnet, "fc7.relu") == ["fc7.relu@gpu0", "fc7.relu@gpu1"]
    assert feature_layers(alexnet, "conv1") == ["conv1.maxpool@gpu0", "conv1.maxpool@gpu1"]
    assert feature_layers(alexnet, "image") == ["image"] and feature_layers(alexnet, "prob") == ["prob"]
    assert feature_layers(lenet) == ["f6.relu"] and feature_layers(lenet, "f6") == ["f6.relu"]
    assert feature_layers(lenet, "f7") == ["f7"] and feature_layers(lenet, "c1") == ["c1.maxpool"]
    vgg = load_graph(ROOT / "nets/vgg16.net")
    assert feature_layers(vgg, "s1/x[1]") == ["s1/x[1].relu"] and feature_layers(vgg, "s1") == ["s1"]
    with pytest.raises(NetError, match="the net has no layer `fc9`") as caught:
        feature_layers(alexnet, "fc9")
    assert caught.value.where == "--layer" and "`fc8`" in caught.value.hint  # did you mean


def test_the_search_a_batch_at_a_time_finds_what_one_sort_of_every_distance_finds():
    rng = np.random.default_rng(3)
    images, queries = rng.standard_normal((50, 7)), rng.standard_normal((4, 7))
    images[31] = images[12]  # equal distances: the earlier image first
    queries[2] = images[12] + 1e-3
    nearest = Nearest(torch.from_numpy(queries), 5)
    for stop in (0, 13, 20, 44, 50):  # batches of 0, 13, 7, 24 and 6 images
        nearest.add(torch.from_numpy(images[nearest.seen : stop]))
    assert nearest.seen == 50
    distances = np.sqrt(((queries[:, None] - images[None]) ** 2).sum(-1))
    want = np.argsort(distances, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(nearest.indices.numpy(), want)
    np.testing.assert_allclose(nearest.distances.numpy(), np.take_along_axis(distances, want, 1), rtol=1e-12)
    assert list(nearest.indices[2, :2]) == [12, 31]
    few = Nearest(torch.from_numpy(queries), 9)  # more neighbours asked for than there are images
    few.add(torch.from_numpy(images[:3]))
    assert few.indices.shape == (4, 3)


def test_the_features_of_two_towers_are_both_halves_of_the_layer_in_evaluation_mode():
    """TOWERS by hand: each tower's conv and ReLU, each tower's fc over both towers' maps, dropout off."""
    graph = graph_from_text(TOWERS)
    weights = init_weights(graph, seed=4, scheme="he")
    w = {name: torch.from_numpy(value) for name, value in weights.items()}
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 1, 8, 8)).astype(np.float32))
    maps = [F.relu(F.conv2d(x, w[f"c1@{t}.weight"], w[f"c1@{t}.bias"])).flatten(1) for t in ("gpu0", "gpu1")]
    joined = torch.cat(maps, 1)
    hidden = [F.relu(F.linear(joined, w[f"h@{t}.weight"], w[f"h@{t}.bias"])) for t in ("gpu0", "gpu1")]
    scores = F.linear(torch.cat(hidden, 1), w["out.weight"], w["out.bias"])
    features = Features(graph, weights, feature_layers(graph))
    got, output = features(x.numpy())
    assert features.names == ["h.dropout@gpu0", "h.dropout@gpu1"] and features.size == 8
    torch.testing.assert_close(got, torch.cat(hidden, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output, scores, rtol=1e-5, atol=1e-5)
    pixels, _ = Features(graph, weights, ["image"])(x)
    torch.testing.assert_close(pixels, x.flatten(1))
    maps_only, none = Features(graph, weights, feature_layers(graph, "c1@gpu1"))(x)
    torch.testing.assert_close(maps_only, maps[1], rtol=1e-5, atol=1e-5)
    assert none is not None  # the net's output alongside


def test_the_kernels_compute_the_same_features():
    graph = graph_from_text(TOWERS)
    weights = init_weights(graph, seed=6, scheme="he")
    x = np.random.default_rng(7).standard_normal((2, 1, 8, 8)).astype(np.float32)
    want, _ = Features(graph, weights, feature_layers(graph))(x)
    got, _ = Features(graph, weights, feature_layers(graph), backend="triton")(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 kernels against PyTorch's ops


def test_the_neighbours_of_image_files_are_those_of_the_net_by_hand(trained, tmp_path, capsys):
    """Every image of the folder searched (--val-fraction 0), each one's features by hand: the conv, ReLU and
    max-pool of TINY's c1 on its centre view as the run prepares it; the distances in numpy; the prediction
    from f2; the picture's tiles those images, each scaled to its own range. The folder of the queries asks
    the same."""
    from PIL import Image
    from safetensors.numpy import load_file

    from netdsl.train.start import saved_preprocess

    net, run, folder = trained
    rng = np.random.default_rng(12)
    (tmp_path / "asked").mkdir()
    asked = [tmp_path / "asked" / "q1.png", tmp_path / "asked" / "q2.png"]
    for path in asked:
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    figure = tmp_path / "figure.png"
    code, out, err = neighbours(capsys, net, "--weights", run, "--data", folder, "--val-fraction", "0",
                                "--input", *asked, "-k", 4, "-o", figure, "--batch", 1)  # fmt: skip
    assert code == 0, err
    w = {name: torch.from_numpy(value) for name, value in load_file(run / "weights.safetensors").items()}
    preprocess = saved_preprocess(run / "weights.safetensors")

    def by_hand(path: Path) -> torch.Tensor:
        x = torch.from_numpy(preprocess.apply(path))[None]
        return F.max_pool2d(F.relu(F.conv2d(x, w["c1.weight"], w["c1.bias"])), 2, 2).flatten(1)[0].double()

    images = sorted(folder.glob("*/*.png"))
    searched = torch.stack([by_hand(path) for path in images]).numpy()
    assert out.splitlines()[0] == (
        "the 4 training images of 18 nearest to each query by c1.maxpool (36 values; Euclidean distance)"
    )
    printed = tables(out)
    assert len(printed) == 2 and "neighbours of the query's class" not in out  # files have no class
    for number, (path, (heading, rows)) in enumerate(zip(asked, printed, strict=True), 1):
        query = by_hand(path)
        distances = np.sqrt(((searched - query.numpy()) ** 2).sum(1))
        order = np.argsort(distances, kind="stable")[:4]
        assert [Path(image).resolve() for image, _, _ in rows] == [images[i].resolve() for i in order]
        assert [found for _, found, _ in rows] == [images[i].parent.name for i in order]
        np.testing.assert_allclose([d for _, _, d in rows], distances[order], rtol=0, atol=6e-4)  # printed to 1e-3
        scores = torch.softmax(F.linear(query.float(), w["f2.weight"], w["f2.bias"]).double(), 0)
        best = int(scores.argmax())
        assert heading == f"{number}: {path}, predicted {('cat', 'dog', 'owl')[best]} ({float(scores[best]):.3f})"
    picture = np.asarray(Image.open(figure))
    assert picture.shape == (2 * 65 + 1, 5 * 65 + 1 + 8)  # gray: rows of a query and 4 neighbours, 64 x 64 tiles
    for row, (path, (_, rows)) in enumerate(zip(asked, printed, strict=True)):
        shown = [path, *(Path(image) for image, _, _ in rows)]
        for column, image in enumerate(shown):
            top, left = 1 + 65 * row, 1 + 65 * column + (8 if column else 0)
            want = tile_pixels(preprocess.apply(image), 8)[:, :, 0]
            np.testing.assert_array_equal(picture[top : top + 64, left : left + 64], want)
    code, again, err = neighbours(capsys, net, "--weights", run, "--data", folder, "--val-fraction", "0",
                                  "--input", tmp_path / "asked", "-k", 4)  # fmt: skip
    assert code == 0 and again == out.split("\nwrote ")[0] + "\n", err  # a folder: its images, in order
    (tmp_path / "asked.txt").write_text("asked/q1.png\nasked/q2.png 1\n")  # a list: its images, a class passed over
    code, again, err = neighbours(capsys, net, "--weights", run, "--data", folder, "--val-fraction", "0",
                                  "--input", tmp_path / "asked.txt", "-k", 4)  # fmt: skip
    assert code == 0 and again == out.split("\nwrote ")[0] + "\n", err


def test_without_files_the_first_validation_images_ask(trained, capsys):
    """The run's own split: the queries are validation images, none of them among the training images searched;
    the share of neighbours of the query's class is counted from the rows printed."""
    net, run, folder = trained
    code, out, err = neighbours(capsys, net, "--weights", run, "--data", folder, "--queries", 2, "-k", 3)
    assert code == 0, err
    assert out.splitlines()[0].startswith("the 3 training images of 15 nearest")  # 3 of the 18 held out
    printed = tables(out)
    assert len(printed) == 2
    searched = {image for _, rows in printed for image, _, _ in rows}
    same = 0
    for heading, rows in printed:
        source, label = re.match(r"\d+: (\S+) \(class (\w+)\), predicted \w+ \(\d\.\d{3}\)$", heading).groups()
        assert source not in searched and Path(source).parent.name == label
        same += sum(found == label for _, found, _ in rows)
    assert out.rstrip().splitlines()[-1] == f"neighbours of the query's class: {same} of 6 ({100 * same / 6:.1f}%)"
    again = neighbours(capsys, net, "--weights", run, "--data", folder, "--queries", 2, "-k", 3, "--batch", 1)
    assert again[:2] == (0, out)  # the queries and the images a batch of one at a time: the same


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{f}"], "--weights: error: neighbours compares what trained weights compute"),
        (["--weights", "{r}", "--data", "{f}", "--layer", "c9"], "--layer: error: the net has no layer `c9`"),
        (["--weights", "{r}", "--data", "{f}", "-o", "{d}/out.jpg"], "out.jpg is not a .png file"),
        (["--weights", "{r}", "--data", "{f}", "--input", "{d}/x.npy"], "--input: error: --input takes images"),
        (["--weights", "{r}", "--data", "{f}", "--input", "{f}/cat/0.png", "-o", "{f}/cat/0.png"], "--output: error:"),
        (["--weights", "{r}", "--data", "{f}", "--val-fraction", "0"], "no validation images to ask about"),
        (["--weights", "{r}", "--data", "{f}", "-k", "0"], "-k/--count: "),
        (["--weights", "{r}", "--data", "{f}", "--input", "{f}/cat/0.png", "--queries", "2"], "--queries: error:"),
    ],
    ids=["no-weights", "no-layer", "not-png", "not-image", "overwrite-query", "no-queries", "zero", "both"],
)
def test_what_neighbours_cannot_do_is_a_clear_error(trained, tmp_path, capsys, args, message):
    net, run, folder = trained
    filled = [arg.replace("{f}", str(folder)).replace("{r}", str(run)).replace("{d}", str(tmp_path)) for arg in args]
    code, _, err = neighbours(capsys, net, *filled)
    want = message.replace("{d}", str(tmp_path))
    assert code != 0 and want in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("*.png")) and (folder / "cat/0.png").stat().st_size > 0


def test_a_picture_too_large_to_open_is_refused():
    rows = [[np.zeros((3, 500, 500), np.float32) + index for index in range(7)]] * 300
    with pytest.raises(NetError, match="more than image viewers open") as caught:
        neighbour_picture(rows)
    assert caught.value.where == "--output"
    with pytest.raises(NetError, match="more than image viewers open"):
        picture_size(300, 7, (3, 500, 500))  # as the command checks before its search
    with pytest.raises(NetError, match="images of 2 channels cannot be drawn"):
        picture_size(1, 2, (2, 8, 8))
    assert picture_size(2, 5, (1, 8, 8)) == (2 * 65 + 1, 5 * 65 + 1 + 8)
    small = neighbour_picture([[np.arange(12, dtype=np.float32).reshape(3, 2, 2)]], zoom=1)
    assert small.shape == (4, 4 + 8, 3) and (small[1:3, 1:3] == tile_pixels(np.arange(12).reshape(3, 2, 2), 1)).all()
