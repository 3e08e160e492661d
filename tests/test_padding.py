"""Padding and windows as ONNX and TensorFlow mean them, from the `.net` text to the kernels.

- `pad` for conv, maxpool and avgpool: n, (h, w), (top, left, bottom, right), `same` (TensorFlow's SAME,
  ONNX's SAME_UPPER: the odd padding at the bottom and right), `same_lower` (SAME_LOWER) and `valid`; pooling
  padding up to size - 1 on each side; dilated pooling. Shapes against TensorFlow's documented SAME formula,
  `netdsl info`, and the mistakes (errors at file:line:col; more in test_errors.py).
- The torch backend (codegen/reference.py) against PyTorch with the padding written out (F.pad and F.unfold:
  tests/kernel_support.py), the triton backend (the emitted kernels, under Triton's interpreter without a GPU)
  against the torch backend, the trainable module's gradients (finite differences), which steps fuse, emitted
  files the same on every compile, and the sm_90 build of every kernel without spills.

ONNX import and export against onnxruntime: tests/test_onnx_padding.py. The kernels alone over shape sweeps:
tests/test_kernel_pool.py, test_kernel_conv.py, test_kernel_conv_nhwc.py, test_kernel_lrn.py and
test_kernel_conv_lrn_pool.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_support import explicit_pool

import netdsl
from netdsl.cli.main import main
from netdsl.codegen.target import SM90_MAX_REGISTERS
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.emit import emit_program
from netdsl.compiler.launches import record_launches, sm90_resources
from netdsl.compiler.passes import Options
from netdsl.ir.ops import OPS, describe_params, layer_pads
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import init_weights

F64 = torch.float64


def graph_of(text: str, file: str = "t.net"):
    return netdsl.graph_from_text(text, file=file)


def tf_same(n: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) of one axis, as its documentation writes it (with the dilated
    filter's size): out = ceil(n / stride), pad_along = max((out - 1) * stride + filter - n, 0), the smaller half
    before."""
    out = -(-n // stride)
    along = max((out - 1) * stride + dilation * (kernel - 1) + 1 - n, 0)
    return along // 2, along - along // 2


# --- the language ---------------------------------------------------------------------------------------

# (layer on `input x: 3 x 9 x 10`, its `pad` after normalization, its output shape)
FORMS = [
    ("conv(x, 4, size=3, pad=(1, 2, 1, 2))", (1, 2), (4, 9, 12)),  # both ends alike: kept as (h, w)
    ("conv(x, 4, size=3, pad=(0, 1, 2, 3))", (0, 1, 2, 3), (4, 9, 12)),
    ("conv(x, 4, size=3, pad=same)", (1, 1), (4, 9, 10)),  # as before
    ("conv(x, 4, size=2, pad=same)", (0, 0, 1, 1), (4, 9, 10)),  # even kernel: the extra one at the end
    ("conv(x, 4, size=2, pad=same_lower)", (1, 1, 0, 0), (4, 9, 10)),
    ("conv(x, 4, size=4, dilation=(1, 2), pad=same)", (1, 3, 2, 3), (4, 9, 10)),
    ("conv(x, 4, size=4, stride=2, pad=same)", "same", (4, 5, 5)),  # depends on the input's size
    ("conv(x, 4, size=3, stride=(1, 2), pad=same_lower)", "same_lower", (4, 9, 5)),
    ("conv(x, 4, size=2, pad=(5, 0, 0, 0))", (5, 0, 0, 0), (4, 13, 9)),  # a conv pads as much as it likes
    ("maxpool(x, 2, pad=same)", "same", (3, 5, 5)),
    ("maxpool(x, 3, stride=1, pad=2)", (2, 2), (3, 11, 12)),  # up to size - 1: past half the window
    ("maxpool(x, 3, stride=2, dilation=2, pad=(0, 2, 1, 0))", (0, 2, 1, 0), (3, 3, 4)),
    ("avgpool(x, 3, stride=1, pad=valid)", (0, 0), (3, 7, 8)),
    ("avgpool(x, 2, stride=1, pad=same_lower, count_pad=false)", (1, 1, 0, 0), (3, 9, 10)),
    ("avgpool(x, (3, 2), stride=2, pad=(2, 1, 0, 0), ceil=true)", (2, 1, 0, 0), (3, 5, 6)),
]


@pytest.mark.parametrize(("layer", "pad", "shape"), FORMS, ids=[f[0] for f in FORMS])
def test_pad_forms(layer, pad, shape):
    item = graph_of(f"input x: 3 x 9 x 10\ny = {layer}\n").nodes["y"]["layer"]
    assert item.params["pad"] == pad
    assert item.shape == shape


@pytest.mark.parametrize("op", ["conv", "maxpool", "avgpool"])
def test_same_is_tensorflows_same(op):
    """Every size, kernel, stride and dilation up to a few: ceil(n / stride) outputs from TensorFlow's padding,
    the odd one at the end (`same`) or at the beginning (`same_lower`)."""
    spec = OPS[op]
    for n in range(1, 13):
        for kernel in range(1, 6):
            for stride in range(1, 4):
                for dilation in range(1, 3):
                    before, after = tf_same(n, kernel, stride, dilation)
                    for word, expected in (("same", (before, after)), ("same_lower", (after, before))):
                        params = {p.name: p.default for p in spec.params} | {"filters": 2, "size": (kernel, 1)}
                        params |= {"stride": (stride, 1), "dilation": (dilation, 1), "pad": word}
                        params = spec.normalize(params)
                        pads = layer_pads(params, (n, 4))
                        assert (pads[0], pads[2]) == expected, (op, word, n, kernel, stride, dilation)
                        if op != "conv" and (max(expected) >= kernel or n < dilation):
                            continue  # more padding than a pooling window takes, or a window of padding only:
                            # errors (tests below and in test_errors.py)
                        assert spec.shape(params, [(2, n, 4)])[1] == -(-n // stride)


def test_describe_and_info_show_the_padding(tmp_path: Path, capsys):
    text = (
        "net padded\ninput x: 3 x 9 x 10\n"
        "a = conv(x, 4, size=2, pad=same)\n"
        "b = conv(x, 4, size=4, stride=2, pad=same_lower)\n"
        "c = maxpool(x, 3, stride=1, pad=(2, 0, 1, 2), dilation=2)\n"
        "d = avgpool(x, 2, pad=(1, 1, 1, 1), count_pad=false)\n"
    )
    graph = graph_of(text)
    described = {name: describe_params(graph.nodes[name]["layer"]) for name in "abcd"}
    assert described == {
        "a": "filters=4 size=2x2 pad=(0,0,1,1)",
        "b": "filters=4 size=4x4 stride=2 pad=same_lower",
        "c": "size=3x3 stride=1 pad=(2,0,1,2) dilation=2",
        "d": "size=2x2 pad=1 count_pad=false",
    }
    path = tmp_path / "padded.net"
    path.write_text(text)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for words in described.values():
        assert words in out


def test_same_padding_a_pool_cannot_take_is_an_error_at_the_layer():
    """`same` worked out for the input: with a dilation it can reach the window size, which pooling refuses."""
    with pytest.raises(netdsl.NetError) as error:
        graph_of("input x: 3 x 8 x 8\ny = maxpool(x, 2, stride=2, dilation=5, pad=same)\n")
    assert "pooling padding 2 must be smaller than the 2x2 window" in error.value.message
    assert (error.value.span.line, error.value.span.col) == (2, 5)


@pytest.mark.parametrize(
    ("layer", "message", "col"),
    [
        ("conv(x, 4, 3, pad=(1, same, 1, 1))", "a tuple item must be a number, got the word `same`", 27),
        ("maxpool(x, 3, pad=(1, 2, 3, 4, 5))", "takes one number, two (h, w) or four", 23),
        ("avgpool(x, 2, dilation=0)", "avgpool `dilation` must be at least 1, got 0", 28),
        ("maxpool(x, 3, pad=(0, 3, 0, 0))", "must be smaller than the 3x3 window", 23),
    ],
)
def test_bad_padding_is_an_error_at_its_place(tmp_path: Path, capsys, layer, message, col):
    path = tmp_path / "bad.net"
    path.write_text(f"input x: 3 x 8 x 8\ny = {layer}\n")
    assert main(["--color=never", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:2:{col}: error: ") and message in err
    assert "Traceback" not in err


# --- the torch backend, the trainable module and the kernels --------------------------------------------------

ZOO = """
net padding_zoo
input x: 3 x 11 x 10
a = conv(x, 8, size=4, stride=2, pad=same) | relu
b = conv(a, 16, size=2, pad=same_lower)
c = conv(b, 16, size=3, stride=2, pad=(0, 1, 2, 0), dilation=2)
d = maxpool(x, 4, stride=2, pad=(3, 0, 1, 2), ceil=true)
e = avgpool(x, 3, stride=2, pad=same, count_pad=false)
f = avgpool(x, (3, 2), stride=1, pad=(2, 1, 0, 1), dilation=(2, 3))
g = maxpool(x, 2, stride=1, dilation=2, pad=1)
h = lrn(b, size=3, alpha=0.1, beta=0.75, k=1) | maxpool(2, stride=2, pad=(0, 0, 1, 1))
i = lrn(b, size=3, alpha=0.1, beta=0.75, k=1) | maxpool(2, stride=1, dilation=2)
output c, d, e, f, g, h, i
"""
ZOO_SHAPES = {
    "c": (16, 2, 1),
    "d": (3, 7, 5),
    "e": (3, 6, 5),
    "f": (3, 9, 9),
    "g": (3, 11, 10),
    "h.maxpool": (16, 3, 3),
    "i.maxpool": (16, 4, 3),
}


def _padded(x: torch.Tensor, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    return F.pad(x, (left, right, top, bottom))


def zoo_by_hand(x: torch.Tensor, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The zoo with every padding written out here (TensorFlow's SAME from its formula), in float64."""
    x = x.double()
    w = {name: value.double() for name, value in w.items()}
    (t, b), (l, r) = tf_same(11, 4, 2), tf_same(10, 4, 2)
    a = F.relu(F.conv2d(_padded(x, t, l, b, r), w["a.weight"], w["a.bias"], stride=2))
    bb = F.conv2d(_padded(a, 1, 1, 0, 0), w["b.weight"], w["b.bias"])  # same_lower of a 2x2 kernel
    c = F.conv2d(_padded(bb, 0, 1, 2, 0), w["c.weight"], w["c.bias"], stride=2, dilation=2)
    (t, b), (l, r) = tf_same(11, 3, 2), tf_same(10, 3, 2)
    norm = F.local_response_norm(bb, 3, alpha=0.1 * 3, beta=0.75, k=1.0)  # PyTorch's alpha is per window
    return {
        "c": c,
        "d": explicit_pool(x, "max", (4, 4), (2, 2), (3, 0, 1, 2), ceil_mode=True),
        "e": explicit_pool(x, "avg", (3, 3), (2, 2), (t, l, b, r), count_include_pad=False),
        "f": explicit_pool(x, "avg", (3, 2), (1, 1), (2, 1, 0, 1), (2, 3), count_include_pad=True),
        "g": F.max_pool2d(x, 2, 1, 1, dilation=2),
        "h": explicit_pool(norm, "max", (2, 2), (2, 2), (0, 0, 1, 1)),  # outputs go by the names `output` wrote
        "i": F.max_pool2d(norm, 2, 1, dilation=2),
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The zoo's file, its weights (seeded), an input batch and the outputs written out by hand."""
    path = tmp_path_factory.mktemp("zoo") / "zoo.net"
    path.write_text(ZOO)
    graph = netdsl.load_graph(path)
    weights = init_weights(graph, seed=3, scheme="he")
    rng = np.random.default_rng(4)
    weights = {n: v + (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in weights.items()}
    x = torch.from_numpy(rng.standard_normal((2, 3, 11, 10)).astype(np.float32))
    expected = zoo_by_hand(x, {name: torch.from_numpy(value) for name, value in weights.items()})
    return path, graph, weights, x, expected


def test_zoo_shapes(zoo):
    _path, graph, *_ = zoo
    assert {name: graph.nodes[name]["layer"].shape for name in ZOO_SHAPES} == ZOO_SHAPES


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_both_backends_against_the_padding_written_out(zoo, backend):
    path, _graph, weights, x, expected = zoo
    got = netdsl.load(path, weights=weights, backend=backend)(x)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        torch.testing.assert_close(got[name].double(), want, rtol=1e-4, atol=1e-5, msg=name)


def test_the_trainable_module_computes_the_same(zoo):
    _path, graph, weights, x, expected = zoo
    module = GraphModule(graph, weights=weights, dtype=F64).eval()
    got = module(x.double())
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-12, msg=name)


GRADIENT_NET = """
input x: 2 x 6 x 7
a = conv(x, 3, size=2, stride=2, pad=same)
b = avgpool(a, 3, stride=1, pad=(2, 0, 1, 2), dilation=(1, 2))
c = maxpool(b, 2, stride=1, pad=(1, 1, 0, 1), dilation=2, ceil=true)
d = avgpool(c, 2, stride=2, pad=same_lower, count_pad=false, ceil=true)
"""


def test_gradients_through_explicit_padding():
    """Finite differences over the input and the conv's weight, through the reference's explicit padding."""
    graph = graph_of(GRADIENT_NET)
    weights = init_weights(graph, seed=5, scheme="he")
    module = GraphModule(graph, weights=weights, dtype=F64).train()
    x = torch.randn(2, 2, 6, 7, generator=torch.Generator().manual_seed(6), dtype=F64, requires_grad=True)
    weight = dict(module.named_parameters())["a.weight"].detach().clone().requires_grad_()

    def run(x, weight):
        return torch.func.functional_call(module, {"a.weight": weight}, (x,))

    assert torch.autograd.gradcheck(run, (x, weight), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_fusion_and_deterministic_kernels(zoo):
    """The LRN + max-pool kernel takes padding that differs at the two ends, not a dilation; the emitted files
    are the same on every compile."""
    path, *_ = zoo
    first = compile_net(path, Options())
    kinds = {step.last.name: step.kind for step in (first.program.nodes[n]["step"] for n in first.program.nodes)}
    assert kinds["h.maxpool"] == "lrn_maxpool"
    assert kinds["i"] == "lrn" and kinds["i.maxpool"] == "pool"
    assert emit_program(first.program) == emit_program(compile_net(path, Options()).program)
    files = emit_program(first.program)
    (h_file,) = [text for name, text in files.items() if name.startswith("h_")]
    assert '"pool_pad": (0, 0, 1, 1)' in h_file
    (e_file,) = [text for name, text in files.items() if name.startswith("e_")]
    assert '"pad": (1, 0, 1, 1)' in e_file  # `same` worked out for the 11 x 10 input


def test_every_kernel_builds_for_sm90_without_spills(zoo, tmp_path, monkeypatch):
    path, *_ = zoo
    monkeypatch.setenv("NETDSL_CACHE_DIR", str(tmp_path / "sm90-cache"))
    out = write_build(compile_net(path, Options(batch=8)), tmp_path / "build")
    built = sm90_resources(record_launches(sorted((out / "kernels").glob("*.py")), 8, "fp32"))
    assert len(built) == len(list((out / "kernels").glob("*.py")))
    for step, r in built.items():
        assert r["spill_stores"] == r["spill_loads"] == 0, (step, r)
        assert 0 < r["registers"] <= SM90_MAX_REGISTERS, (step, r)
