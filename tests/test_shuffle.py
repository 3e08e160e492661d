"""The `shuffle(groups)` layer (ShuffleNet's channel shuffle) from the language to the runtime: shapes, `netdsl
info` and errors; the fold that makes a shuffle read only by a conv (groups 1) or an fc free, and the kernel it
stays otherwise, both checked by their steps and their numbers (both backends against the unfolded layer graph
and against hand-written PyTorch); the layouts it passes through; GraphModule's gradients through it against
autograd of the hand-written permutation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import netdsl
from netdsl.cli.main import main
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.passes import Options
from netdsl.errors import NetError
from netdsl.lang.frontend import graph_from_text, load_graph
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import fold_shuffle, init_weights

TOLERANCE = 1e-5  # fp32, relative to the largest output: the folded weights change only the order of the sums


def order(channels: int, groups: int) -> list[int]:
    """The hand-written permutation: output channel b * groups + a is input channel a * channels / groups + b."""
    per_group = channels // groups
    return [a * per_group + b for b in range(per_group) for a in range(groups)]


def write(tmp_path: Path, text: str, name: str = "net") -> Path:
    path = tmp_path / f"{name}.net"
    path.write_text(text)
    return path


def kinds(net: netdsl.Net) -> dict[str, str]:
    """Step name -> kind, for the steps that compute something."""
    steps = (net.program.nodes[name]["step"] for name in net.order)
    return {step.name: step.kind for step in steps if step.kind not in ("input", "view")}


def shuffled_of(net: netdsl.Net, layer: str) -> list[dict]:
    steps = (net.program.nodes[name]["step"] for name in net.order)
    return next(step.first.fields.get("shuffled", []) for step in steps if step.first.name == layer)


def close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    error = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e}"


# --- the language --------------------------------------------------------------------------------------


def test_shapes_params_and_info(tmp_path, capsys):
    path = write(tmp_path, "net s\ninput image: 12 x 8 x 8\na = conv(image, 24, size=1, groups=3) | shuffle(3)\n")
    graph = load_graph(path)
    item = graph.nodes["a.shuffle"]["layer"]
    assert (item.op, item.params, item.shape) == ("shuffle", {"groups": 3}, (24, 8, 8))
    assert graph_from_text("input x: 6 x 2 x 2\ny = shuffle(x, groups=2)").nodes["y"]["layer"].params == {"groups": 2}
    assert main(["info", str(path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("a.shuffle"))
    assert row.split()[1:5] == ["shuffle", "gpu0", "24", "x"] and "groups=3" in row


@pytest.mark.parametrize(
    ("line", "message", "hint"),
    [
        ("a = shuffle(image, 5)", "shuffle `a`: 12 channels cannot be shuffled in 5 groups", "a multiple of groups"),
        ("a = fc(image, 4) | shuffle(2)", "shuffle needs a C x H x W feature map", "before fc and flatten"),
        ("a = shuffle(image)", "shuffle needs `groups`", "e.g. shuffle(x, 4)"),
        ("a = shuffle(image, 0)", "shuffle `groups` must be at least 1, got 0", None),
        ("a = shuffle(image, 2.5)", "shuffle `groups` must be a whole number", None),
    ],
)
def test_errors_point_at_the_layer(line, message, hint):
    with pytest.raises(NetError) as error:
        graph_from_text(f"input image: 12 x 8 x 8\n{line}\n", file="bad.net")
    assert message in error.value.message
    assert error.value.span.line == 2
    if hint:
        assert hint in error.value.hint


# --- folded, or a kernel -----------------------------------------------------------------------------------

FOLDS = """
net folds
input x: 12 x 6 x 5
a = conv(x, 12, size=1) | relu
b = shuffle(a, 3)                  # folded into bc's input channels
bc = conv(b, 8, size=3, pad=1)
c = shuffle(a, 4)                  # a kernel: cc is grouped
cc = conv(c, 12, size=3, groups=2)
d = shuffle(cc, 6)                 # folded into dc's columns
dc = fc(d, 10)
e = shuffle(bc, 2) | shuffle(4)    # both folded
ec = conv(e, 5, size=1, bias=false)   # reads e.shuffle, the chain's last layer
f = shuffle(a, 2)                  # a kernel: two layers read it
g = conv(f, 4, size=1)
h = maxpool(f, 2)
k = shuffle(a, 6)                  # a kernel: an output
m = conv(k, 3, size=1)
output bc, cc, dc, ec, g, h, k, m
"""


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("folds"), FOLDS, "folds")
    graph = load_graph(path)
    weights = init_weights(graph, seed=3, scheme="he")
    x = torch.randn(2, 12, 6, 5, generator=torch.Generator().manual_seed(0))
    return path, graph, weights, x


def test_what_folds_and_what_stays_a_kernel(folds):
    path, *_ = folds
    net = netdsl.load(path)
    shuffles = sorted(name for name, kind in kinds(net).items() if kind == "shuffle")
    assert shuffles == ["c_gpu0_shuffle", "f_gpu0_shuffle", "k_gpu0_shuffle"]
    assert shuffled_of(net, "bc") == [{"layer": "b", "groups": 3, "start": 0, "channels": 12, "pixels": 30}]
    assert shuffled_of(net, "dc") == [{"layer": "d", "groups": 6, "start": 0, "channels": 12, "pixels": 12}]
    assert [s["layer"] for s in shuffled_of(net, "ec")] == ["e.shuffle", "e"]  # the reader's side first
    assert shuffled_of(net, "cc") == shuffled_of(net, "g") == shuffled_of(net, "m") == []
    unfolded = compile_net(path, Options()).layers
    assert {"b", "d", "e", "e.shuffle"} <= set(unfolded.nodes)  # the layer graph keeps them all


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_folded_and_kernel_shuffles_compute_the_unfolded_net(folds, backend):
    path, graph, weights, x = folds
    got = netdsl.load(path, backend=backend, weights=weights)(x)
    want = GraphModule(graph, weights=weights).eval()(x)
    assert list(got) == list(want)
    for name in want:
        close(got[name], want[name], name)


def test_folded_shuffles_against_hand_written_pytorch(folds):
    """The net as one would write it in PyTorch, each shuffle an index into the channels."""
    path, _graph, weights, x = folds
    got = netdsl.load(path, weights=weights)(x)
    w = {name: torch.from_numpy(value) for name, value in weights.items()}
    a = F.conv2d(x, w["a.weight"], w["a.bias"]).relu()
    bc = F.conv2d(a[:, order(12, 3)], w["bc.weight"], w["bc.bias"], padding=1)
    cc = F.conv2d(a[:, order(12, 4)], w["cc.weight"], w["cc.bias"], groups=2)
    dc = F.linear(cc[:, order(12, 6)].flatten(1), w["dc.weight"], w["dc.bias"])
    ec = F.conv2d(bc[:, order(8, 2)][:, order(8, 4)], w["ec.weight"])
    f = a[:, order(12, 2)]
    g, h = F.conv2d(f, w["g.weight"], w["g.bias"]), F.max_pool2d(f, 2)
    k = a[:, order(12, 6)]
    m = F.conv2d(k, w["m.weight"], w["m.bias"])
    for name, want in {"bc": bc, "cc": cc, "dc": dc, "ec": ec, "g": g, "h": h, "k": k, "m": m}.items():
        close(got[name], want, name)


def test_fold_shuffle_permutes_a_slice_of_the_input_channels_or_columns():
    """A reader of several inputs (joined on channels) with the shuffled one in the middle."""
    generator = torch.Generator().manual_seed(1)
    before, shuffled, after = (torch.randn(2, c, 3, 4, generator=generator, dtype=torch.float64) for c in (2, 6, 3))
    record = {"layer": "s", "groups": 3, "start": 2, "channels": 6, "pixels": 12}
    conv_weight = np.random.default_rng(2).standard_normal((5, 11, 3, 3))
    joined = torch.cat([before, shuffled[:, order(6, 3)], after], dim=1)
    unshuffled = torch.cat([before, shuffled, after], dim=1)
    want = F.conv2d(joined, torch.from_numpy(conv_weight))
    folded = torch.from_numpy(fold_shuffle(conv_weight, record))
    assert torch.allclose(F.conv2d(unshuffled, folded), want, rtol=1e-12, atol=1e-12)
    fc_weight = np.random.default_rng(3).standard_normal((4, 11 * 12))
    record["start"] = 2 * 12  # an fc counts features: the two channels before, 12 pixels each
    want = F.linear(joined.flatten(1), torch.from_numpy(fc_weight))
    got = F.linear(unshuffled.flatten(1), torch.from_numpy(fold_shuffle(fc_weight, record)))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not np.array_equal(fold_shuffle(fc_weight, record), fc_weight)


TOWERS = """
net towers
input x: 6 x 5 x 5
towers gpu0, gpu1 {
    a = conv(x, 4, size=1) | shuffle(2)
}
b = conv(all a, 6, size=1) on gpu1
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_shuffle_folds_only_into_a_reader_on_its_device(tmp_path, backend):
    """`all a` joins gpu0's copy (moved to gpu1: a kernel) and gpu1's (folded: channels 4 to 7 of what b reads)."""
    path = write(tmp_path, TOWERS)
    graph = load_graph(path)
    weights = init_weights(graph, seed=4, scheme="he")
    net = netdsl.load(path, backend=backend, weights=weights)
    assert [name for name, kind in kinds(net).items() if kind == "shuffle"] == ["a_shuffle_gpu0_shuffle"]
    assert shuffled_of(net, "b") == [{"layer": "a.shuffle@gpu1", "groups": 2, "start": 4, "channels": 4, "pixels": 25}]
    x = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(5))
    close(net(x), GraphModule(graph, weights=weights).eval()(x), "b")


# --- layouts -----------------------------------------------------------------------------------------------

NHWC = """
net nhwc
input image: 3 x 10 x 10
b = conv(image, 32, size=3) | relu | shuffle(4)
c = conv(b, 32, size=3, groups=2)
"""


@pytest.mark.parametrize("layout", ["auto", "nchw"])
def test_a_shuffle_between_channels_last_convs_keeps_their_layout(tmp_path, layout):
    path = write(tmp_path, NHWC)
    graph = load_graph(path)
    weights = init_weights(graph, seed=6, scheme="he")
    net = netdsl.load(path, backend="triton", weights=weights, layout=layout)
    steps = {name: net.program.nodes[name]["step"] for name in net.order}
    shuffle = steps["b_shuffle_gpu0_shuffle"]
    expected = "nhwc" if layout == "auto" else "nchw"
    assert (steps[shuffle.inputs[0]].layout, shuffle.layout) == (expected, expected)
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(7))
    close(net(x), GraphModule(graph, weights=weights).eval()(x), "c")


def test_generated_files_are_deterministic(tmp_path):
    path = write(tmp_path, FOLDS)
    first = write_build(compile_net(path, Options()), tmp_path / "one")
    second = write_build(compile_net(path, Options()), tmp_path / "two")
    files = sorted(p.relative_to(first) for p in (first / "kernels").glob("*.py"))
    assert [p.name for p in files if p.name.endswith("_shuffle.py")] == [
        "c_gpu0_shuffle.py",
        "f_gpu0_shuffle.py",
        "k_gpu0_shuffle.py",
    ]
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


# --- training ----------------------------------------------------------------------------------------------

TRAINED = """
net trained
input x: 8 x 5 x 5
a = conv(x, 8, size=3, pad=1, groups=2) | relu | shuffle(2) | conv(6, size=3, groups=2) | shuffle(3) | fc(4)
"""


def test_gradients_through_shuffles_match_autograd_of_the_hand_written_permutation():
    graph = graph_from_text(TRAINED)
    weights = init_weights(graph, seed=8, scheme="he")
    module = GraphModule(graph, weights=weights, dtype=torch.float64).train()
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(3, 8, 5, 5, generator=generator, dtype=torch.float64)
    upstream = torch.randn(3, 4, generator=generator, dtype=torch.float64)

    x_module = x.clone().requires_grad_()
    (module(x_module) * upstream).sum().backward()
    got = {name: p.grad for name, p in module.named_parameters()}

    w = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True) for name, value in weights.items()}
    x_hand = x.clone().requires_grad_()
    y = F.conv2d(x_hand, w["a.weight"], w["a.bias"], padding=1, groups=2).relu()[:, order(8, 2)]
    y = F.conv2d(y, w["a.conv.weight"], w["a.conv.bias"], groups=2)[:, order(6, 3)]
    y = F.linear(y.flatten(1), w["a.fc.weight"], w["a.fc.bias"])
    (y * upstream).sum().backward()

    assert set(got) == set(w)
    for name, tensor in w.items():
        torch.testing.assert_close(got[name], tensor.grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(x_module.grad, x_hand.grad, rtol=1e-10, atol=1e-12)
