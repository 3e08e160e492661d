"""ONNX's padding and windows in netdsl, against onnxruntime (fp32, relative error <= 1e-4 in the 2-norm).

ONNX models built here, one per kind of window, each node reading the input and giving an output of its own:
pads that differ at each end, SAME_UPPER and SAME_LOWER with even kernels and stride 2, pads past half the
window (up to size - 1) with count_include_pad 0 and 1, and dilated max and average pooling (AveragePool's
dilations: opset 19). Each is imported exactly (the written `.net` says the pads, not an approximation), run by
netdsl on both backends at two input sizes (odd and even) and compared with onnxruntime. Then nets written with
`same`, `same_lower`, four pads and dilations go .net -> ONNX -> .net: the ONNX model runs in onnxruntime as
netdsl runs the net, and the re-imported net computes what the original did.
"""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import helper  # noqa: E402
from test_onnx_import import (  # noqa: E402
    TOLERANCE,
    check,
    conv_node,
    model,
    onnxruntime_outputs,
    relative_error,
    run_imported,
    tensor,
)
from test_padding import ZOO  # noqa: E402

import netdsl  # noqa: E402
from netdsl.interop.onnx_export import export_onnx  # noqa: E402
from netdsl.interop.onnx_import import import_to_files  # noqa: E402
from netdsl.lang.frontend import load_graph  # noqa: E402
from netdsl.runtime.weights import init_weights  # noqa: E402

CHANNELS = 3


def conv(name: str, kernel: tuple[int, int], seed: int, **attrs) -> tuple[list, dict]:
    """A Conv of the input to 4 channels, with its weight and bias."""
    inits = {f"{name}_w": tensor((4, CHANNELS, *kernel), seed), f"{name}_b": tensor((4,), seed + 1)}
    return [conv_node("x", name, f"{name}_w", f"{name}_b", **attrs)], inits


def pool(name: str, op: str, kernel: tuple[int, int], **attrs) -> tuple[list, dict]:
    return [helper.make_node(op, ["x"], [name], name=name, kernel_shape=list(kernel), **attrs)], {}


# case -> nodes (each reads x, each output its own), and what the imported `.net` must say
CASES = {
    "asymmetric-pads": (
        [
            conv("conv_a", (3, 3), 1, strides=[2, 2], pads=[1, 0, 2, 1]),
            conv("conv_b", (2, 3), 3, pads=[0, 2, 1, 0], dilations=[2, 1]),
            pool("max_a", "MaxPool", (3, 3), strides=[2, 2], pads=[0, 1, 2, 0]),
            pool("avg_a", "AveragePool", (3, 3), strides=[2, 2], pads=[2, 0, 1, 1]),
            pool("avg_b", "AveragePool", (3, 3), strides=[2, 2], pads=[2, 0, 1, 1], count_include_pad=1),
            pool("avg_c", "AveragePool", (3, 2), strides=[2, 2], pads=[1, 0, 2, 1], ceil_mode=1, count_include_pad=1),
        ],
        ["conv(x, 4, size=3, stride=2, pad=(1, 0, 2, 1))", "pad=(0, 2, 1, 0), dilation=(2, 1)", "pad=(0, 1, 2, 0)"],
    ),
    "same-upper-even": (
        [
            conv("conv_a", (4, 4), 5, strides=[2, 2], auto_pad="SAME_UPPER"),
            conv("conv_b", (2, 2), 7, strides=[2, 2], auto_pad="SAME_UPPER"),
            pool("max_a", "MaxPool", (2, 2), strides=[2, 2], auto_pad="SAME_UPPER"),
            pool("max_b", "MaxPool", (4, 4), strides=[2, 2], auto_pad="SAME_UPPER"),
            pool("avg_a", "AveragePool", (2, 2), strides=[2, 2], auto_pad="SAME_UPPER"),
            pool("avg_b", "AveragePool", (4, 2), strides=[2, 2], auto_pad="SAME_UPPER", count_include_pad=1),
        ],
        ["conv(x, 4, size=4, stride=2, pad=(1, 1, ", "maxpool(x, 2, pad=(0, 0, "],
    ),
    "same-lower-even": (
        [
            conv("conv_a", (4, 4), 9, strides=[2, 2], auto_pad="SAME_LOWER"),
            conv("conv_b", (2, 2), 11, strides=[2, 2], auto_pad="SAME_LOWER"),
            pool("max_a", "MaxPool", (2, 2), strides=[2, 2], auto_pad="SAME_LOWER"),
            pool("max_b", "MaxPool", (4, 4), strides=[2, 2], auto_pad="SAME_LOWER"),
            pool("avg_a", "AveragePool", (2, 2), strides=[2, 2], auto_pad="SAME_LOWER"),
            pool("avg_b", "AveragePool", (4, 2), strides=[2, 2], auto_pad="SAME_LOWER", count_include_pad=1),
        ],
        ["conv(x, 4, size=2, stride=2, pad=(", "maxpool(x, 4, stride=2, pad=("],
    ),
    "pads-past-half-the-window": (
        [
            pool("max_a", "MaxPool", (3, 3), pads=[2, 2, 2, 2]),
            pool("max_b", "MaxPool", (4, 4), strides=[2, 2], pads=[3, 1, 0, 2], ceil_mode=1),
            pool("avg_a", "AveragePool", (3, 3), pads=[2, 2, 2, 2]),
            pool("avg_b", "AveragePool", (3, 3), pads=[2, 2, 2, 2], count_include_pad=1),
            pool("avg_c", "AveragePool", (4, 4), strides=[3, 3], pads=[3, 0, 2, 3], ceil_mode=1, count_include_pad=1),
            pool("avg_d", "AveragePool", (2, 4), strides=[1, 2], pads=[1, 3, 0, 3], count_include_pad=0),
        ],
        ["maxpool(x, 3, stride=1, pad=2)", "pad=(3, 1, 0, 2), ceil=true", "pad=(3, 0, 2, 3), ceil=true"],
    ),
    "dilated-pools": (
        [
            pool("max_a", "MaxPool", (2, 2), dilations=[2, 2]),
            pool("max_b", "MaxPool", (3, 3), strides=[2, 2], dilations=[2, 1], pads=[2, 1, 1, 0], ceil_mode=1),
            pool("avg_a", "AveragePool", (2, 2), dilations=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
            pool("avg_b", "AveragePool", (3, 3), strides=[2, 2], dilations=[1, 2], pads=[0, 2, 2, 1], ceil_mode=1),
            pool(
                "avg_c", "AveragePool", (3, 3), strides=[2, 2], dilations=[1, 2], pads=[0, 2, 2, 1], ceil_mode=1,
                count_include_pad=1,
            ),
        ],
        ["maxpool(x, 2, stride=1, dilation=2)", "dilation=(2, 1), ceil=true", "dilation=(1, 2), ceil=true)"],
    ),
}  # fmt: skip


def case_model(case: str, size: int):
    parts, says = CASES[case]
    nodes, inits = [], {}
    for part_nodes, part_inits in parts:
        nodes += part_nodes
        inits |= part_inits
    outputs = [node.output[0] for node in nodes]
    proto = model(nodes, {"x": ["N", CHANNELS, size, size + 1]}, outputs=outputs, inits=inits, opset=19)
    for output in proto.graph.output:  # ONNX's shape inference before opset 22 keeps a ceil-mode window that
        del output.type.tensor_type.shape.dim[:]  # starts in the end padding; onnxruntime (and netdsl) drop it
    return proto, says


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_against_onnxruntime(case, size, backend, tmp_path):
    proto, says = case_model(case, size)
    text = check(proto, tmp_path, backend=backend)
    for words in says:
        assert words in text, text


# --- .net -> ONNX -> .net ------------------------------------------------------------------------------

# name -> (net, the opset it is exported at)
ROUND_TRIPS = {
    # same with stride 2, same_lower, four pads, pool pads to size - 1, dilated pools (an average: opset 19)
    "zoo": (ZOO, 19),
    # c's last ceil-mode column would start in the right padding: dropped, as ONNX says from opset 22 on
    "tensorflow_like": (
        """
net tensorflow_like
input x: 3 x 9 x 8
a = conv(x, 6, size=4, stride=2, pad=same) | relu | maxpool(2, pad=same)
b = conv(a, 5, size=2, pad=same_lower) | avgpool(3, stride=2, pad=same, count_pad=false)
c = avgpool(x, 3, stride=2, pad=(2, 0, 1, 2), ceil=true)
output b, c
""",
        22,
    ),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip(name, tmp_path):
    source = tmp_path / f"{name}.net"
    text, opset = ROUND_TRIPS[name]
    source.write_text(text)
    graph = load_graph(source)
    weights = init_weights(graph, seed=3, scheme="he")
    path = tmp_path / f"{name}.onnx"
    proto = export_onnx(graph, weights, path)
    assert proto.opset_import[0].version == opset
    x = np.random.default_rng(7).standard_normal((2, *graph.nodes["x"]["layer"].shape)).astype(np.float32)
    original = netdsl.load(source, weights=weights)(x)
    original = [v.numpy() for v in original.values()]
    for got, want in zip(original, onnxruntime_outputs(path, {"x": x}), strict=True):
        assert relative_error(got, want) <= TOLERANCE
    result = import_to_files(path, tmp_path / "back.net", tmp_path / "back.safetensors")
    again = run_imported(tmp_path / "back.net", tmp_path / "back.safetensors", {"x": x})
    for got, want in zip(again, original, strict=True):
        assert got.shape == want.shape and relative_error(got, want) <= TOLERANCE
    if name == "zoo":
        for words in ("pad=(0, 1, 2, 0)", "pad=(3, 0, 1, 2)", "dilation=(2, 3)", "pad=(1, 1, 2, 1)"):
            assert words in result.text, result.text
