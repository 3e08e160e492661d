"""Dense evaluation (netdsl/runtime/dense.py): the fc layers as convolutions, the net over whole images of any
size. Against a hand-written PyTorch LeNet-5 run on every window the dense net's scores stand for, and against
the net itself at its own input size (AlexNet's towers, whose fc6 reads both towers' maps joined)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from netdsl.errors import NetError
from netdsl.ir import layer, layers
from netdsl.lang.frontend import graph_from_text, load_graph
from netdsl.runtime.dense import dense_graph, dense_weights
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import init_weights

NETS = Path(__file__).resolve().parent.parent / "nets"


def lenet(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """LeNet-5 as nets/lenet5.net writes it, by hand."""
    w = {name: torch.as_tensor(value) for name, value in weights.items()}
    x = F.max_pool2d(F.relu(F.conv2d(x, w["c1.weight"], w["c1.bias"])), 2, 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, w["c3.weight"], w["c3.bias"])), 2, 2).flatten(1)
    x = F.relu(F.linear(x, w["f5.weight"], w["f5.bias"]))
    x = F.relu(F.linear(x, w["f6.weight"], w["f6.bias"]))
    return F.linear(x, w["f7.weight"], w["f7.bias"])


def test_each_dense_score_is_the_net_on_its_window():
    """LeNet-5 (no padding) over a 44 x 41 image: a 4 x 3 map of scores, the one at (i, j) LeNet-5's on the
    32 x 32 window at (4i, 4j) (its two pools step 4 pixels); the fc layers are convolutions in the graph."""
    graph = load_graph(NETS / "lenet5.net")
    weights = init_weights(graph, seed=4, scheme="he")
    dense = dense_graph(graph, 44, 41)
    assert [item.op for item in layers(dense)][-5:] == ["conv", "relu", "conv", "relu", "conv"]
    assert layer(dense, "f7").shape == (10, 4, 3) and not any(item.op == "flatten" for item in layers(dense))
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((2, 1, 44, 41), dtype=np.float32))
    with torch.no_grad():
        scores = GraphModule(dense, weights=dense_weights(graph, weights)).eval()(x)
        for i in range(4):
            for j in range(3):
                want = lenet(weights, x[:, :, 4 * i : 4 * i + 32, 4 * j : 4 * j + 32])
                error = float((scores[:, :, i, j] - want).norm() / want.norm())
                assert error < 1e-6, (i, j, error)  # float32: the same products, summed in other orders
    assert float((scores[:, :, 0, 0] - scores[:, :, 3, 2]).abs().max()) > 0.1  # the windows differ


@pytest.mark.parametrize("net", ["alexnet", "simplenet"])
def test_at_the_nets_own_size_the_dense_net_is_the_net(net):
    """AlexNet's fc6 reads both towers' conv5 joined, each fc after it a 1 x 1 convolution; SimpleNet's fc reads
    a global average pool. At the input's size the dense net's one position is the net's output."""
    graph = load_graph(NETS / f"{net}.net")
    shape = layer(graph, graph.graph["inputs"][0]).shape
    weights = init_weights(graph, seed=2, scheme="he")
    x = torch.from_numpy(np.random.default_rng(9).standard_normal((2, *shape), dtype=np.float32))
    with torch.no_grad():
        want = GraphModule(graph, weights=weights).eval().logits(x)
        got = GraphModule(dense_graph(graph, *shape[1:]), weights=dense_weights(graph, weights)).eval().logits(x)
    assert got.shape == (*want.shape, 1, 1)
    assert float((got.flatten(1) - want).norm() / want.norm()) < 1e-5


def test_what_cannot_be_applied_densely_is_an_error():
    graph = load_graph(NETS / "lenet5.net")
    with pytest.raises(NetError, match="an image of 31 x 40 is smaller than the net's input 1 x 32 x 32") as caught:
        dense_graph(graph, 31, 40)
    assert caught.value.where == "--dense"
    joined = graph_from_text(  # two flattened maps of different sizes joined: no map to convolve
        "net j\ninput image: 1 x 8 x 8\na = conv(image, 2, size=3) | flatten\nb = conv(image, 2, size=5) | flatten\n"
        "f = concat(a, b) | fc(3)\noutput f\n",
        "j.net",
    )
    with pytest.raises(NetError, match=r"cannot be applied densely: concat `f`: .* 2 x 6 x 6, 2 x 4 x 4") as caught:
        dense_graph(joined, 8, 8)
    assert "fc layers read maps" in caught.value.hint and caught.value.where == "--dense"
    for text, message in (
        ("net v\ninput x: 12\nf = fc(x, 3)\noutput f\n", "the net reads N x 12, not images"),
        ("net o\ninput x: 1 x 8 x 8\nf = conv(x, 2, size=3) | flatten\noutput f\n", "output `f.*` is a flatten"),
        ("net two\ninput a: 1 x 8 x 8\ninput b: 1 x 8 x 8\nf = concat(a, b) | fc(3)\noutput f\n",
         "the net has 2 inputs"),
    ):
        with pytest.raises(NetError, match=message):
            dense_graph(graph_from_text(text, "n.net"), 8, 8)


def test_dense_scores_average_the_image_and_its_mirror(monkeypatch):
    """`DenseScores(flip=True)`: the mean of the softmax of the position-averaged scores of the image and of its
    mirror (by hand with the LeNet-5 above); images of several sizes each get their dense net, the last few kept."""
    from netdsl.train.evaluate import DenseScores

    graph = load_graph(NETS / "lenet5.net")
    weights = init_weights(graph, seed=5, scheme="he")
    rng = np.random.default_rng(10)
    monkeypatch.setattr(DenseScores, "KEPT", 4)
    flipped, plain = DenseScores(graph, weights, flip=True), DenseScores(graph, weights)
    for height, width in ((40, 36), (32, 32), (36, 44), (33, 34), (48, 32), (40, 36)):
        x = rng.standard_normal((1, height, width), dtype=np.float32)
        views = []
        for image in (x, x[:, :, ::-1]):
            window = torch.from_numpy(np.ascontiguousarray(image))[None]
            scores = torch.stack([lenet(weights, window[:, :, i : i + 32, j : j + 32])
                                  for i in range(0, height - 31, 4) for j in range(0, width - 31, 4)])  # fmt: skip
            views.append(torch.softmax(scores.mean(dim=0), dim=1)[0])
        assert torch.allclose(flipped.scores(x), (views[0] + views[1]) / 2, atol=1e-6)
        assert torch.allclose(plain.scores(x), views[0], atol=1e-6)
    assert len(flipped._nets) == DenseScores.KEPT and (40, 36) in flipped._nets
    kept = [dict(net.named_parameters()) for net in flipped._nets.values()]  # one copy of the weights for all
    assert {tensor.data_ptr() for tensors in kept for tensor in tensors.values()} == {
        tensor.data_ptr() for tensor in kept[0].values()}  # fmt: skip


@pytest.mark.parametrize("workers, pending", [(0, 4), (1, 1)])
def test_dense_probabilities_group_images_of_one_size(tmp_path, monkeypatch, workers, pending):
    """eval --dense's pass over a set: twelve gray files of four shapes at two scales, through LeNet-5 with a
    batch of 3 net inputs' pixels. Each image's probabilities are the mean over the scales of `scores` of it
    alone; views of one size share passes (no pass holds more pixels than 3 inputs, unless one view alone
    does); with the views waiting held to one pass's pixels, groups run early, to the same probabilities."""
    from PIL import Image

    from netdsl.train import evaluate
    from netdsl.train.augment import Preprocess
    from netdsl.train.data import ImageFiles

    graph = load_graph(NETS / "lenet5.net")
    weights = init_weights(graph, seed=6, scheme="he")
    rng = np.random.default_rng(11)
    paths = []
    for number, (height, width) in enumerate([(32, 32), (40, 48), (32, 32), (64, 40), (40, 48), (32, 32),
                                              (36, 36), (40, 48), (64, 40), (32, 32), (36, 36), (40, 48)]):  # fmt: skip
        paths.append(tmp_path / f"{number}.png")
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(paths[-1])
    preprocess = Preprocess(size=None, crop=(32, 32), channels=1, mean=(120.0,), std=(60.0,), flip=True)
    samples = ImageFiles(paths, np.zeros(len(paths), dtype=np.int64), preprocess)
    scorer = evaluate.DenseScores(graph, weights, flip=True)
    monkeypatch.setattr(evaluate, "PENDING_BATCHES", pending)
    passes, seen = [], []
    batch_scores = scorer.batch_scores
    monkeypatch.setattr(scorer, "batch_scores", lambda x: passes.append(x.shape) or batch_scores(x))
    got = evaluate.dense_probabilities(samples, (32, 48), scorer, batch=3, workers=workers, advance=seen.append)
    monkeypatch.undo()
    want = []
    for path in paths:
        views = [dataclasses.replace(preprocess, size=size) for size in (32, 48)]
        want.append(torch.stack([scorer.scores(view.normalize(view.pixels(path))) for view in views]).mean(0))
    assert got.shape == (12, 10) and torch.allclose(got, torch.stack(want), atol=1e-6)
    assert sum(seen) == 24 and sum(shape[0] for shape in passes) == 24
    assert all(shape[0] * shape[2] * shape[3] <= 3 * 32 * 32 or shape[0] == 1 for shape in passes)
    assert max(shape[0] for shape in passes) == (3 if pending == 4 else 2) and len(passes) < 24  # shared passes
    assert float((got[0] - got[1]).abs().max()) > 1e-3  # the images differ


def test_dense_probabilities_report_what_cannot_be_read(tmp_path):
    from netdsl.train.augment import Preprocess
    from netdsl.train.data import ImageFiles
    from netdsl.train.evaluate import DenseScores, dense_probabilities

    graph = load_graph(NETS / "lenet5.net")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    preprocess = Preprocess(size=32, crop=(32, 32), channels=1, mean=(0.0,))
    scorer = DenseScores(graph, init_weights(graph, seed=1, scheme="he"))
    with pytest.raises(NetError) as caught:
        dense_probabilities(ImageFiles([bad], np.zeros(1, dtype=np.int64), preprocess), (32,), scorer, batch=4)
    assert caught.value.where == str(bad) and "--skip-corrupt" in caught.value.hint
    with pytest.raises(NetError, match="at least 0, not -1") as caught:
        dense_probabilities(ImageFiles([bad], np.zeros(1, dtype=np.int64), preprocess), (32,), scorer, 4, workers=-1)
    assert caught.value.where == "--workers"


@pytest.mark.parametrize("dtype, tolerance", [("bf16", 2e-2), ("fp16", 3e-3)])
def test_dense_scores_in_sixteen_bits_compute_under_autocast(dtype, tolerance):
    """`DenseScores(dtype=...)` computes as training does in bf16 or fp16: against the hand-written LeNet-5 under
    autocast on each window (tolerances on probabilities: bf16 keeps 8 significant bits, fp16 11), and apart
    from fp32's; another dtype is refused."""
    from netdsl.train.evaluate import DenseScores

    graph = load_graph(NETS / "lenet5.net")
    weights = init_weights(graph, seed=8, scheme="he")
    x = np.random.default_rng(11).standard_normal((1, 40, 44), dtype=np.float32)
    window = torch.from_numpy(x)[None]
    with torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]):
        scores = torch.stack([lenet(weights, window[:, :, i : i + 32, j : j + 32]).float()
                              for i in range(0, 9, 4) for j in range(0, 13, 4)])  # fmt: skip
    want = torch.softmax(scores.mean(dim=0), dim=1)[0]
    got, exact = DenseScores(graph, weights, dtype=dtype).scores(x), DenseScores(graph, weights).scores(x)
    assert want.max() < 0.99 and (got - want).abs().max() <= tolerance
    assert (got - exact).abs().max() > 1e-5  # computed in 16 bits, not in fp32
    with pytest.raises(NetError, match="dense evaluation computes in fp32, bf16, fp16, not tf32"):
        DenseScores(graph, weights, dtype="tf32")
