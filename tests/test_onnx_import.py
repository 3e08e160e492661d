"""ONNX import (netdsl/interop/onnx_import/, `netdsl import`): small ONNX models built with onnx.helper cover
every supported op and attribute; each is imported, run with netdsl and compared with onnxruntime on
random inputs (fp32, relative error <= 1e-4 in the 2-norm over the whole output). The bundled nets go
.net -> ONNX -> .net and must compute what they computed before. Every kind of bad file is a clear
error, through the API and the command line."""

from __future__ import annotations

import contextlib
import inspect
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from test_onnx_export import SMALL  # noqa: E402

import netdsl  # noqa: E402
from netdsl.cli.main import main  # noqa: E402
from netdsl.errors import NetError  # noqa: E402
from netdsl.interop.onnx_export import export_onnx  # noqa: E402
from netdsl.interop.onnx_import import import_onnx, import_to_files, max_opset  # noqa: E402
from netdsl.ir import layers  # noqa: E402
from netdsl.lang.frontend import graph_from_text, load_graph  # noqa: E402
from netdsl.runtime.weights import init_weights, load_weights, weight_specs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NETS = ROOT / "nets"
TOLERANCE = 1e-4  # relative error, 2-norm over the whole output, fp32


# --- building models -------------------------------------------------------------------------------


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def tensor(shape, seed: int, scale: float = 0.3) -> np.ndarray:
    """Random float32 weights (never all zeros)."""
    return (rng(seed).standard_normal(shape) * scale + 0.01).astype(np.float32)


def model(nodes, inputs, outputs=("y",), inits=None, opset: int = 17, name: str = "m"):
    """A model: `inputs` maps names to shapes (a str dimension is symbolic), outputs have no shapes."""
    inits = inits or {}
    declared = dict(inputs)
    if opset < 9:  # IR version 3: every initializer is also a graph input
        declared.update({k: np.shape(v) for k, v in inits.items()})
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT if n in inputs else _elem(inits[n]), list(s))
            for n, s in declared.items()
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    proto.ir_version = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7}.get(opset, 8)
    with contextlib.suppress(Exception):  # the checker wants typed outputs: take them from shape inference
        proto = onnx.shape_inference.infer_shapes(proto)  # (a deliberately broken model keeps untyped ones)
    for output in proto.graph.output:
        output.type.tensor_type.shape.SetInParent()
    return proto


def _elem(value) -> int:
    return helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)


def save(proto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def feeds_for(proto, batch: int = 2, seed: int = 5) -> dict[str, np.ndarray]:
    out = {}
    weights = {t.name for t in proto.graph.initializer}
    for i, vi in enumerate(v for v in proto.graph.input if v.name not in weights):
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng(seed + i).standard_normal(dims).astype(np.float32)
    return out


def onnxruntime_outputs(path: Path, feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_imported(net_path: Path, weights_path: Path, feeds, backend: str = "torch") -> list[np.ndarray]:
    net = netdsl.load(net_path, weights=weights_path, backend=backend)
    got = net(next(iter(feeds.values())) if len(feeds) == 1 else feeds)
    values = list(got.values()) if isinstance(got, dict) else [got]
    return [v.detach().cpu().numpy() for v in values]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check(proto, tmp_path: Path, backend: str = "torch", towers: bool = False, reference=None, batch: int = 2):
    """Import `proto`, run it with netdsl and compare with onnxruntime (or `reference(feeds)`)."""
    path = save(proto, tmp_path / "model.onnx")
    feeds = feeds_for(proto, batch)
    want = reference(feeds) if reference else onnxruntime_outputs(path, feeds)
    result = import_to_files(path, tmp_path / "model.net", tmp_path / "model.safetensors", towers=towers)
    got = run_imported(tmp_path / "model.net", tmp_path / "model.safetensors", feeds, backend)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert relative_error(g, w) <= TOLERANCE, relative_error(g, w)
    assert main(["check", str(tmp_path / "model.net")]) == 0
    return result.text


def conv_node(x, y, w, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=y, **attrs)


# --- every op and attribute ------------------------------------------------------------------------

CONV_CASES = {
    "symmetric-pads": dict(attrs=dict(pads=[1, 1, 1, 1]), kernel=(3, 3)),
    "stride-dilation": dict(attrs=dict(strides=[2, 1], dilations=[2, 1], pads=[2, 0, 2, 0]), kernel=(3, 2)),
    "asymmetric-unused-end": dict(attrs=dict(pads=[1, 1, 2, 2], strides=[2, 2]), kernel=(3, 3)),
    "auto-same-upper": dict(attrs=dict(auto_pad="SAME_UPPER"), kernel=(3, 5)),
    "auto-same-lower-stride": dict(attrs=dict(auto_pad="SAME_LOWER", strides=[2, 2]), kernel=(3, 3)),
    "auto-valid": dict(attrs=dict(auto_pad="VALID", strides=[2, 2]), kernel=(2, 2)),
    "grouped-no-bias": dict(attrs=dict(group=2, pads=[1, 1, 1, 1]), kernel=(3, 3), bias=False),
    "depthwise": dict(attrs=dict(group=4, kernel_shape=[3, 3]), kernel=(3, 3), filters=8),
}


@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_conv(case, tmp_path):
    spec = CONV_CASES[case]
    groups = spec["attrs"].get("group", 1)
    filters = spec.get("filters", 6)
    inits = {"w": tensor((filters, 4 // groups, *spec["kernel"]), 1)}
    if spec.get("bias", True):
        inits["b"] = tensor((filters,), 2)
    nodes = [conv_node("x", "y", "w", "b" if "b" in inits else None, **spec["attrs"])]
    text = check(model(nodes, {"x": ["N", 4, 9, 9]}, inits=inits), tmp_path)
    assert text.count("conv(") == 1
    if groups > 1:
        assert f"groups={groups}" in text


POOL_CASES = {
    "max-floor": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "max-ceil": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "max-ceil-pads": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "max-same-upper": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    "max-same-lower": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    "max-asymmetric-end": ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])),
    "max-valid-rect": ("MaxPool", dict(kernel_shape=[2, 3], strides=[1, 2], auto_pad="VALID")),
    "avg-count-pad": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    "avg-exclude-pad": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "avg-ceil-count-pad": (
        "AveragePool",
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
    ),
    "avg-ceil-exclude-pad": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "avg-same-upper": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    "avg-default-stride": ("AveragePool", dict(kernel_shape=[2, 2])),
}


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("case", POOL_CASES, ids=list(POOL_CASES))
def test_pooling(case, size, tmp_path):
    op, attrs = POOL_CASES[case]
    nodes = [helper.make_node(op, ["x"], ["y"], **attrs)]
    check(model(nodes, {"x": ["N", 3, size, size]}), tmp_path)


def test_a_one_by_one_pool_is_the_identity(tmp_path):
    """PyTorch exports AdaptiveAvgPool2d to the size its input already has as a 1 x 1 AveragePool."""
    nodes = [
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[1, 1], strides=[1, 1]),
        helper.make_node("MaxPool", ["p"], ["q"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["q"], ["y"]),
    ]
    text = check(model(nodes, {"x": ["N", 3, 5, 4]}), tmp_path)
    assert "pool" not in text and "relu" in text


def pad_node(x, y, pads, opset, **attrs):
    """A Pad of H and W by (top, left, bottom, right), in the form of the opset (attribute before 11)."""
    full = [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]]
    if opset < 11:
        return [helper.make_node("Pad", [x], [y], pads=full, **attrs)]
    name = f"{y}_pads"
    return [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(full, np.int64))),
        helper.make_node("Pad", [x, name], [y], **attrs),
    ]


@pytest.mark.parametrize("opset", [10, 17])
def test_zero_pads_fold_into_the_conv_or_pool_after_them(opset, tmp_path):
    """TensorFlow-style explicit Pad nodes: before a conv, before a max-pool of ReLU outputs (padding with
    zeros or with -infinity is then the same), before an average pool (the zeros are counted)."""
    nodes = [
        *pad_node("x", "p", (1, 2, 1, 2), opset),
        conv_node("p", "c", "w", "b"),
        helper.make_node("Relu", ["c"], ["r"]),
        *pad_node("r", "p2", (1, 1, 1, 1), opset),
        helper.make_node("MaxPool", ["p2"], ["m"], kernel_shape=[3, 3], strides=[2, 2]),
        *pad_node("m", "p3", (1, 1, 1, 1), opset),
        helper.make_node("AveragePool", ["p3"], ["y"], kernel_shape=[3, 3]),
    ]
    inits = {"w": tensor((4, 3, 3, 3), 80), "b": tensor((4,), 81)}
    text = check(model(nodes, {"x": ["N", 3, 8, 9]}, inits=inits, opset=opset), tmp_path)
    assert "c = conv(x, 4, size=3, pad=(1, 2))" in text and "m = maxpool(r, 3, stride=2, pad=1)" in text
    assert "y = avgpool(m, 3, stride=1, pad=1)" in text and "pad(" not in text


def test_pads_that_cannot_be_read(tmp_path, capsys):
    def pad_model(pads, then="Conv", before=None, **attrs):
        nodes = [helper.make_node(before, ["x"], ["a"])] if before else []
        nodes += pad_node("a" if before else "x", "p", pads, 17, **attrs)
        if then == "Conv":
            nodes.append(conv_node("p", "y", "w"))
        elif then == "MaxPool":
            nodes.append(helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2]))
        else:
            nodes.append(helper.make_node(then, ["p"], ["y"]))
        inits = {"w": tensor((2, 2, 3, 3), 82)} if then == "Conv" else {}
        return save(model(nodes, {"x": ["N", 2, 6, 6]}, inits=inits), tmp_path / "pad.onnx")

    import_error(pad_model((1, 1, 1, 1), mode="reflect"), tmp_path, capsys, "Pad mode `reflect` is not supported")
    import_error(pad_model((1, 1, 1, 1), then="MaxPool"), tmp_path, capsys, "after a Relu")
    import_error(pad_model((1, 1, 1, 1), then="Relu"), tmp_path, capsys, "a Pad can be read only by the Conv")
    assert main(["import", str(pad_model((1, 1, 1, 1), then="MaxPool", before="Relu")),
                 "-o", str(tmp_path / "ok.net")]) == 0  # fmt: skip
    capsys.readouterr()


def test_per_channel_arithmetic(tmp_path):
    """(x - mean) / std at the input, a Mul after a conv, an Add after a ReLU and a constant minus the
    result: composed per channel, folded into the conv where it follows one, else batchnorm(eps=0)."""
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"]),
        helper.make_node("Div", ["a", "std"], ["b"]),
        conv_node("b", "c", "w"),
        helper.make_node("Mul", ["c", "two"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Add", ["r", "shift"], ["s"]),
        helper.make_node("Sub", ["three", "s"], ["y"]),
    ]
    inits = {
        "mean": np.array([0.5, 0.4, 0.3], np.float32).reshape(1, 3, 1, 1),
        "std": np.array([0.2, 0.25, 0.3], np.float32).reshape(3, 1, 1),
        "w": tensor((4, 3, 3, 3), 90),
        "two": np.array(2.0, np.float32),
        "shift": tensor((1, 4, 1, 1), 91),
        "three": np.array([3.0], np.float32),
    }
    text = check(model(nodes, {"x": ["N", 3, 8, 8]}, inits=inits), tmp_path)
    assert "b = batchnorm(x, eps=0)" in text and "m = conv(b, 4, size=3)" in text
    assert "y = batchnorm(r, eps=0)" in text and text.count("batchnorm") == 2
    (tmp_path / "triton").mkdir()
    check(model(nodes, {"x": ["N", 3, 8, 8]}, inits=inits), tmp_path / "triton", backend="triton")


def test_arithmetic_that_cannot_be_read(tmp_path, capsys):
    def arith(op, a, b, inits):
        proto = model([helper.make_node(op, [a, b], ["y"])], {"x": ["N", 2, 3, 3]}, inits=inits)
        return save(proto, tmp_path / "a.onnx")

    import_error(arith("Mul", "x", "x", {}), tmp_path, capsys, "Mul of two activations is not supported")
    import_error(arith("Div", "c", "x", {"c": tensor((1, 2, 1, 1), 92)}), tmp_path, capsys, "Div of a constant by")
    zero = {"c": np.array([1.0, 0.0], np.float32).reshape(1, 2, 1, 1)}
    import_error(arith("Div", "x", "c", zero), tmp_path, capsys, "or by zero")
    import_error(arith("Sub", "x", "c", {"c": tensor((3,), 93)}), tmp_path, capsys, "one number or one per channel")


@pytest.mark.parametrize("opset", [10, 17])
def test_clip_from_zero_is_a_relu(opset, tmp_path, capsys):
    if opset < 11:
        relu = helper.make_node("Clip", ["x"], ["y"], min=0.0)
        relu6 = helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)
        inits = {}
    else:
        relu = helper.make_node("Clip", ["x", "zero"], ["y"])
        relu6 = helper.make_node("Clip", ["x", "zero", "six"], ["y"])
        inits = {"zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    text = check(model([relu], {"x": ["N", 3, 4, 4]}, inits=inits, opset=opset), tmp_path)
    assert "y = relu(x)" in text
    bounded = save(model([relu6], {"x": ["N", 3, 4, 4]}, inits=inits, opset=opset), tmp_path / "relu6.onnx")
    import_error(bounded, tmp_path, capsys, "Clip to [0, 6] is not supported", "ReLU6")


def test_global_pools_activations_and_softmax(tmp_path):
    inits = {"w": tensor((6, 3, 3, 3), 3), "b": tensor((6,), 4)}
    nodes = [
        conv_node("x", "c", "w", "b", pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c"], ["l"], alpha=0.2),
        helper.make_node("Softmax", ["l"], ["s"], axis=1),  # over channels at each position
        helper.make_node("GlobalAveragePool", ["s"], ["g"]),
        helper.make_node("GlobalMaxPool", ["l"], ["m"]),
        helper.make_node("Flatten", ["g"], ["gf"]),
        helper.make_node("Flatten", ["m"], ["mf"]),
        helper.make_node("Concat", ["gf", "mf"], ["j"], axis=1),
        helper.make_node("Relu", ["j"], ["r"]),
        helper.make_node("Softmax", ["r"], ["y"], axis=-1),
    ]
    text = check(model(nodes, {"x": ["N", 3, 7, 7]}, inits=inits), tmp_path)
    assert "l = leaky_relu(c, 0.2)" in text and "global_avgpool" in text and "m = maxpool(l, 7)" in text


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_and_squeeze(keepdims, tmp_path):
    """The mean over H and W is global_avgpool; Squeeze of N x C x 1 x 1 on axes 2, 3 a flatten."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=keepdims)]
    if keepdims:
        nodes.append(helper.make_node("Squeeze", ["m", "axes"], ["s"]))
    nodes.append(helper.make_node("Gemm", ["s" if keepdims else "m", "w"], ["y"], transB=1))
    inits = {"w": tensor((3, 4), 5)} | ({"axes": np.array([2, 3], np.int64)} if keepdims else {})
    text = check(model(nodes, {"x": ["N", 4, 3, 5]}, inits=inits), tmp_path)
    assert "global_avgpool(x)" in text


@pytest.mark.parametrize("opset", [11, 17])
def test_softmax_axis_rules(opset, tmp_path):
    nodes = [helper.make_node("Softmax", ["x"], ["y"])]  # default axis: 1 before opset 13, -1 after
    check(model(nodes, {"x": ["N", 10]}, opset=opset), tmp_path)
    bad = model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], {"x": ["N", 3, 4, 4]}, opset=opset)
    with pytest.raises(NetError, match="Softmax over axis 3"):
        import_onnx(save(bad, tmp_path / "bad.onnx"))


def lrn_reference(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """ONNX's LRN: the window of channel c is c - floor((size-1)/2) ... c + ceil((size-1)/2)."""
    channels = x.shape[1]
    out = np.empty_like(x, dtype=np.float64)
    for c in range(channels):
        lo, hi = max(0, c - (size - 1) // 2), min(channels - 1, c + -(-(size - 1) // 2))
        square = (x[:, lo : hi + 1].astype(np.float64) ** 2).sum(axis=1)
        out[:, c] = x[:, c] / (bias + alpha / size * square) ** beta
    return out.astype(np.float32)


@pytest.mark.parametrize("size", [3, 4, 5])
def test_lrn_alpha_is_divided_by_size(size, tmp_path):
    attrs = dict(size=size, alpha=0.05, beta=0.7, bias=1.5)
    proto = model([helper.make_node("LRN", ["x"], ["y"], **attrs)], {"x": ["N", 7, 4, 4]})

    def reference(feeds):  # onnxruntime's CPU LRN accepts only odd sizes
        return [lrn_reference(feeds["x"], size, 0.05, 0.7, 1.5)]

    text = check(proto, tmp_path, reference=reference)
    alpha = float(text.split("alpha=")[1].split(",")[0])
    assert alpha == pytest.approx(0.05 / size, rel=1e-6)
    if size % 2:
        check(proto, tmp_path)  # and onnxruntime agrees


GEMM_CASES = {
    "transB1-alpha-beta": (dict(transB=1, alpha=0.5, beta=2.0), (5, 12), (5,)),
    "transB0": (dict(), (12, 5), (1, 5)),
    "scalar-bias": (dict(transB=1), (5, 12), ()),
    "no-bias": (dict(transB=0, alpha=1.5), (12, 5), None),
}


@pytest.mark.parametrize("case", GEMM_CASES, ids=list(GEMM_CASES))
def test_gemm(case, tmp_path):
    attrs, b_shape, c_shape = GEMM_CASES[case]
    inits = {"b": tensor(b_shape, 7)}
    if c_shape is not None:
        inits["c"] = tensor(c_shape, 8) + 0.5
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f", "b"] + (["c"] if c_shape is not None else []), ["y"], **attrs),
    ]
    text = check(model(nodes, {"x": ["N", 3, 2, 2]}, inits=inits), tmp_path)
    assert "fc(x, 5" in text and "flatten" not in text  # fc flattens by itself


def test_matmul_add_and_constants(tmp_path):
    """MatMul + Add is an fc with a bias; weights may come from Constant, ConstantOfShape, or ops on
    constants (Transpose, Mul), all folded."""
    w = tensor((7, 12), 9)
    nodes = [
        helper.make_node("Constant", [], ["wt"], value=numpy_helper.from_array(w, "wt")),
        helper.make_node("Transpose", ["wt"], ["wk"], perm=[1, 0]),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Mul", ["wk", "two"], ["w2"]),
        helper.make_node("Constant", [], ["shape"], value_ints=[7]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["bias"], value=numpy_helper.from_array(np.array([0.25], np.float32))
        ),
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w3"], ["y"]),  # no Add: an fc without bias
    ]
    proto = model(nodes, {"x": ["N", 3, 2, 2]}, inits={"w3": tensor((7, 4), 10)})
    text = check(proto, tmp_path)
    assert "a = fc(x, 7)" in text and "y = fc(r, 4, bias=false)" in text


def test_conv_with_constant_add_bias(tmp_path):
    nodes = [
        conv_node("x", "c", "w", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "b"], ["y"]),
    ]
    proto = model(nodes, {"x": ["N", 3, 5, 5]}, inits={"w": tensor((4, 3, 3, 3), 11), "b": tensor((1, 4, 1, 1), 12)})
    text = check(proto, tmp_path)
    assert "bias=false" not in text


RESHAPES = {
    "zero-minus-one": [0, -1],
    "minus-one-k": [-1, 48],
    "zero-k": [0, 48],
    "identity-4d": [-1, 3, 4, 4],
}


@pytest.mark.parametrize("case", RESHAPES, ids=list(RESHAPES))
@pytest.mark.parametrize("source", ["initializer", "constant"])
def test_reshape_as_flatten(case, source, tmp_path):
    shape = np.array(RESHAPES[case], dtype=np.int64)
    nodes = [helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("Relu", ["f"], ["y"])]
    inits = {}
    if source == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(shape, "s")))
    else:
        inits["s"] = shape
    check(model(nodes, {"x": ["N", 3, 4, 4]}, inits=inits), tmp_path)


def test_reshape_from_shape_of_the_batch(tmp_path):
    """x.view(x.size(0), -1) as older PyTorch exports it: Shape -> Gather -> Unsqueeze -> Concat."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64), "zero")),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]),
        helper.make_node("Constant", [], ["rest"], value=numpy_helper.from_array(np.array([-1], np.int64), "rest")),
        helper.make_node("Concat", ["n1", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    check(model(nodes, {"x": ["N", 2, 3, 3]}, inits={"w": tensor((4, 18), 13)}, opset=11), tmp_path)


def test_reshape_with_a_fixed_batch(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("Relu", ["f"], ["y"])]
    proto = model(nodes, {"x": [1, 2, 3, 3]}, inits={"s": np.array([1, -1], np.int64)})
    check(proto, tmp_path, batch=1)
    symbolic = model(nodes, {"x": ["N", 2, 3, 3]}, inits={"s": np.array([1, -1], np.int64)})
    with pytest.raises(NetError, match=r"Reshape of N x 2 x 3 x 3 to \[1, -1\] is not supported"):
        import_onnx(save(symbolic, tmp_path / "s.onnx"))


@pytest.mark.parametrize("rank", [4, 2])
def test_batchnorm(rank, tmp_path):
    channels = 5
    stats = {
        "g": tensor((channels,), 14) + 1,
        "be": tensor((channels,), 15),
        "mu": tensor((channels,), 16),
        "var": np.abs(tensor((channels,), 17)) + 0.5,
    }
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "be", "mu", "var"], ["y"], epsilon=1e-3)]
    shape = ["N", channels, 3, 3] if rank == 4 else ["N", channels]
    text = check(model(nodes, {"x": shape}, inits=stats), tmp_path)
    assert "y = batchnorm(x, eps=0.001)" in text
    # ONNX's momentum weighs the running value; netdsl's (PyTorch's) the batch's: 0.99 there is 0.01 here
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "be", "mu", "var"], ["y"], momentum=0.99)]
    text = check(model(nodes, {"x": shape}, inits=stats), tmp_path)
    assert "y = batchnorm(x, momentum=0.01)" in text


def test_concat_add_sum_dropout_identity_and_two_outputs(tmp_path):
    inits = {f"w{i}": tensor((4, 3, 1, 1), 20 + i) for i in range(3)}
    nodes = [
        conv_node("x", "a", "w0"),
        conv_node("x", "b", "w1"),
        conv_node("x", "c", "w2"),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Sum", ["a", "b", "c"], ["t"]),
        helper.make_node("Concat", ["s", "t"], ["j"], axis=1),
        helper.make_node("Dropout", ["j", "ratio"], ["d"]),
        helper.make_node("Identity", ["d"], ["i"]),
        helper.make_node("Relu", ["i"], ["y"]),
        helper.make_node("Identity", ["t"], ["z"]),
    ]
    inits["ratio"] = np.array(0.3, np.float32)
    text = check(model(nodes, {"x": ["N", 3, 4, 4]}, outputs=("y", "z"), inits=inits), tmp_path)
    assert "dropout" not in text and "output y, z" in text


def test_dropout_before_opset_12(tmp_path):
    nodes = [helper.make_node("Dropout", ["x"], ["d"], ratio=0.5), helper.make_node("Relu", ["d"], ["y"])]
    check(model(nodes, {"x": ["N", 6]}, opset=11), tmp_path)


def test_split_patterns_become_grouped_layers(tmp_path):
    """Split -> LRN per part -> Concat is lrn(groups=2); Split -> Conv per part -> Concat is a grouped conv."""
    attrs = dict(size=3, alpha=0.02, beta=0.75, bias=2.0)
    nodes = [
        helper.make_node("Split", ["x", "parts"], ["p0", "p1"], axis=1),
        helper.make_node("LRN", ["p0"], ["l0"], **attrs),
        helper.make_node("LRN", ["p1"], ["l1"], **attrs),
        helper.make_node("Concat", ["l0", "l1"], ["norm"], axis=1),
        helper.make_node("Split", ["norm", "parts"], ["q0", "q1"], axis=1),
        conv_node("q0", "c0", "w0", "b0", pads=[1, 1, 1, 1]),
        conv_node("q1", "c1", "w1", "b1", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["c0", "c1"], ["y"], axis=1),
    ]
    inits = {"parts": np.array([3, 3], np.int64)}
    for i in range(2):
        inits[f"w{i}"], inits[f"b{i}"] = tensor((5, 3, 3, 3), 30 + i), tensor((5,), 32 + i)
    text = check(model(nodes, {"x": ["N", 6, 5, 5]}, inits=inits), tmp_path)
    assert "norm = lrn(x, size=3, alpha=0.0066666665, beta=0.75, k=2, groups=2)" in text
    assert "y = conv(norm, 10, size=3, pad=1, groups=2)" in text


@pytest.mark.parametrize("opset", [7, 9, 13, max_opset()])
def test_opsets(opset, tmp_path):
    nodes = [conv_node("x", "c", "w", "b", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    proto = model(
        nodes, {"x": ["N", 2, 4, 4]}, inits={"w": tensor((3, 2, 3, 3), 40), "b": tensor((3,), 41)}, opset=opset
    )
    path = save(proto, tmp_path / "m.onnx")
    text, weights = import_onnx(path)
    assert set(weights) == {"c.weight", "c.bias"}  # the relu `y` is a statement of its own, not `c.relu`
    graph_from_text(text)
    if opset <= 21:  # what the installed onnxruntime runs
        check(proto, tmp_path)


# --- the triton backend (interpreter) --------------------------------------------------------------


def test_small_net_on_the_triton_backend(tmp_path):
    inits = {"w": tensor((4, 2, 3, 3), 50), "b": tensor((4,), 51), "fw": tensor((3, 16), 52), "fb": tensor((3,), 53)}
    nodes = [
        conv_node("x", "c", "w", "b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["g"], transB=1),
        helper.make_node("Softmax", ["g"], ["y"], axis=1),
    ]
    check(model(nodes, {"x": ["N", 2, 4, 4]}, inits=inits), tmp_path, backend="triton")


def test_lrn_and_avgpool_on_the_triton_backend(tmp_path):
    nodes = [
        helper.make_node("LRN", ["x"], ["l"], size=3, alpha=0.01, beta=0.75, bias=1.0),
        helper.make_node("AveragePool", ["l"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    check(model(nodes, {"x": ["N", 4, 5, 5]}), tmp_path, backend="triton")


# --- the bundled nets: .net -> ONNX -> .net --------------------------------------------------------


# Small nets beside the bundled ones: blocks with repeat, and every layer kind with two outputs.
TEXTS = {
    "mini_vgg": """
net mini_vgg
input image: 3 x 16 x 16
block stage(x, width, n) {
    repeat n { x = conv(x, width, size=3, pad=1) | relu }
    return maxpool(x, 2, stride=2)
}
s1 = stage(image, 8, 2)
s2 = stage(s1, 16, 1)
fc6 = fc(s2, 32) | relu | dropout(0.5)
fc7 = fc(fc6, 10)
prob = softmax(fc7)
output prob
""",
    "every_kind": SMALL.replace("net small", "net every_kind"),  # every layer kind, two outputs (as exported)
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each net exported once with He weights: name -> (net path, graph, weights, onnx path)."""
    folder = tmp_path_factory.mktemp("exported")
    cache = {}

    def get(name: str):
        if name not in cache:
            source = NETS / f"{name}.net"
            if name in TEXTS:
                source = folder / f"{name}.net"
                source.write_text(TEXTS[name])
            graph = load_graph(source)
            weights = init_weights(graph, seed=3, scheme="he")
            path = folder / f"{name}.onnx"
            export_onnx(graph, weights, path)
            cache[name] = source, graph, weights, path
        return cache[name]

    return get


def original_outputs(source: Path, weights, x: np.ndarray) -> list[np.ndarray]:
    got = netdsl.load(source, weights=weights)(x)
    return [v.numpy() for v in (got.values() if isinstance(got, dict) else [got])]


def image_of(graph, batch: int = 1) -> np.ndarray:
    (item,) = [item for item in layers(graph) if item.op == "input"]
    return rng(9).standard_normal((batch, *item.shape)).astype(np.float32)


# VGG-16 itself is left out (its 138 million weights at 224 x 224 cost half a minute here): its export is held to
# ONNX Runtime in test_onnx_export.py, and mini_vgg comes back through the same blocks and repeats.
ROUND_TRIP = ["lenet5", "simplenet", "alexnet_1gpu", "alexnet", "mini_vgg", "every_kind"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_net_round_trip(name, exported, tmp_path):
    """.net -> ONNX (netdsl export) -> .net (netdsl import) computes what the original computed."""
    source, graph, weights, path = exported(name)
    result = import_to_files(path, tmp_path / "net.net", tmp_path / "net.safetensors")
    x = image_of(graph, batch=2)
    got = run_imported(tmp_path / "net.net", tmp_path / "net.safetensors", {"image": x})
    want = original_outputs(source, weights, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= TOLERANCE
    assert f"net {name}\n" in result.text
    assert sorted(w.shape for w in result.weights.values()) == sorted(w.shape for w in weights.values())
    if name in ("lenet5", "alexnet_1gpu"):  # layer names, hence weight names, come back (no blocks, no dropout)
        assert list(result.weights) == list(weights)


def test_alexnet_towers_round_trip(exported, tmp_path):
    """nets/alexnet.net exported (one ONNX node per tower copy) comes back with towers: the same
    layers, the same weight names, the same output."""
    source, graph, weights, path = exported("alexnet")
    result = import_to_files(path, tmp_path / "a.net", tmp_path / "a.safetensors", towers=True)
    assert "towers gpu0, gpu1 {" in result.text
    assert "conv3 = conv(all conv2, 192, size=3, pad=1) | relu" in result.text
    assert "fc8 = fc(all fc7, 1000)" in result.text
    assert result.weights.keys() == weights.keys()  # the same names, in the same order
    for name, value in weights.items():
        np.testing.assert_array_equal(result.weights[name], value)
    imported = load_graph(tmp_path / "a.net")
    original = {item.name: (item.op, item.shape, item.device) for item in layers(graph) if item.op != "dropout"}
    assert {item.name: (item.op, item.shape, item.device) for item in layers(imported)} == original
    x = image_of(graph)
    got = run_imported(tmp_path / "a.net", tmp_path / "a.safetensors", {"image": x})[0]
    assert relative_error(got, original_outputs(source, weights, x)[0]) <= TOLERANCE


def test_grouped_alexnet_splits_into_towers(exported, tmp_path):
    """nets/alexnet_1gpu.net's grouped convolutions, imported with --towers: one tower per group;
    conv1..conv5 are split (conv3 because conv4 reads half of it), fc6 on reads `all conv5`."""
    source, graph, weights, path = exported("alexnet_1gpu")
    result = import_to_files(path, tmp_path / "g.net", tmp_path / "g.safetensors", towers=True)
    assert "towers gpu0, gpu1 {" in result.text and "fc6 = fc(all conv5, 4096)" in result.text
    assert "conv2 = conv(conv1, 128, size=5, pad=2) | relu | norm | maxpool(3, stride=2)" in result.text
    assert "groups" not in result.text  # lrn(groups=2) and the grouped convs are gone: one group per tower
    np.testing.assert_array_equal(result.weights["conv2@gpu1.weight"], weights["conv2.weight"][128:])
    x = image_of(graph)
    got = run_imported(tmp_path / "g.net", tmp_path / "g.safetensors", {"image": x})[0]
    assert relative_error(got, original_outputs(source, weights, x)[0]) <= TOLERANCE


def test_towers_without_groups_is_a_note(exported, tmp_path, capsys):
    path = exported("lenet5")[3]
    assert main(["import", str(path), "-o", str(tmp_path / "l.net"), "--towers"]) == 0
    err = capsys.readouterr().err
    assert "note: --towers: no grouped convolutions" in err
    assert "towers" not in (tmp_path / "l.net").read_text()


@pytest.mark.parametrize(
    "groups, channels, note",
    [(2, 4, "`x` is an input of the net"), (8, 8, "no grouped"), (16, 16, "one count from 2 to 8")],
)
def test_towers_fall_back_with_a_note(groups, channels, note, tmp_path):
    nodes = [conv_node("x", "g", "w", pads=[1, 1, 1, 1], group=groups), helper.make_node("Relu", ["g"], ["y"])]
    if note == "no grouped":  # a conv on the input, then a grouped one: splits fine
        nodes = [
            conv_node("x", "c", "v"),
            conv_node("c", "g", "w", group=groups),
            helper.make_node("Relu", ["g"], ["y"]),
        ]
        note = "split into 8 towers"
    inits = {"w": tensor((channels, channels // groups, 3, 3), 80), "v": tensor((channels, channels, 1, 1), 81)}
    proto = model(nodes, {"x": ["N", channels, 6, 6]}, inits=inits)
    result = import_onnx(save(proto, tmp_path / "m.onnx"), towers=True)
    assert any(note in n for n in result.notes), result.notes
    assert ("towers gpu0" in result.text) == (note == "split into 8 towers")
    check(proto, tmp_path, towers=True)


# --- the written file ------------------------------------------------------------------------------

GOLDEN = """\
# Imported from the ONNX model small.onnx (opset 17) by `netdsl import`.
# Weights: small.safetensors
net torch_jit

input input_1: 3 x 16 x 16

features_0 = conv(input_1, 8, size=3, stride=2, pad=1) | relu | maxpool(2)
classifier = fc(features_0, 10)
probs = softmax(classifier)

output probs
"""


def torch_like_model():
    """Names as torch.onnx.export writes them."""
    nodes = [
        helper.make_node("Conv", ["input.1", "features.0.weight", "features.0.bias"],
                         ["/features/features.0/Conv_output_0"], name="/features/features.0/Conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["/features/features.0/Conv_output_0"], ["/features/features.1/Relu_output_0"],
                         name="/features/features.1/Relu"),
        helper.make_node("MaxPool", ["/features/features.1/Relu_output_0"], ["/features/features.2/MaxPool_output_0"],
                         name="/features/features.2/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["/features/features.2/MaxPool_output_0"], ["/Flatten_output_0"], name="/Flatten"),
        helper.make_node("Gemm", ["/Flatten_output_0", "classifier.weight", "classifier.bias"],
                         ["/classifier/Gemm_output_0"], name="/classifier/Gemm", transB=1),
        helper.make_node("Softmax", ["/classifier/Gemm_output_0"], ["probs"], name="/Softmax", axis=1),
    ]  # fmt: skip
    inits = {
        "features.0.weight": tensor((8, 3, 3, 3), 60),
        "features.0.bias": tensor((8,), 61),
        "classifier.weight": tensor((10, 8 * 4 * 4), 62),
        "classifier.bias": tensor((10,), 63),
    }
    return model(nodes, {"input.1": ["batch", 3, 16, 16]}, outputs=("probs",), inits=inits, name="torch_jit")


def test_golden_text_and_deterministic_files(tmp_path):
    path = save(torch_like_model(), tmp_path / "small.onnx")
    first = import_to_files(path, tmp_path / "small.net")
    assert first.text == GOLDEN
    assert (tmp_path / "small.net").read_text() == GOLDEN
    net_bytes, weight_bytes = (tmp_path / "small.net").read_bytes(), (tmp_path / "small.safetensors").read_bytes()
    import_to_files(path, tmp_path / "small.net")
    assert (tmp_path / "small.net").read_bytes() == net_bytes
    assert (tmp_path / "small.safetensors").read_bytes() == weight_bytes
    graph = load_graph(tmp_path / "small.net")
    loaded = load_weights(tmp_path / "small.safetensors", graph)
    assert list(loaded) == list(weight_specs(graph)) == list(first.weights)
    source = {t.name: numpy_helper.to_array(t) for t in torch_like_model().graph.initializer}
    np.testing.assert_array_equal(loaded["classifier.weight"], source["classifier.weight"])
    check(torch_like_model(), tmp_path)


def test_a_pytorch_export(tmp_path):
    """A small CNN exported by torch.onnx.export (TorchScript exporter): batch norm folded into the
    conv, `x.view(x.size(0), -1)` as Shape -> Gather -> ... -> Reshape, readable names."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),
                nn.AdaptiveAvgPool2d(1),
            )  # fmt: skip
            self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(16, 10), nn.LeakyReLU(0.1), nn.Linear(10, 5))

        def forward(self, x):
            x = self.features(x)
            return torch.softmax(self.classifier(x.view(x.size(0), -1)), dim=1)

    torch.manual_seed(0)
    net = Small().eval()
    with torch.no_grad():
        net.features[1].running_mean.uniform_(-1, 1)
        net.features[1].running_var.uniform_(0.5, 2)
    text = check(torch_export(net, (3, 12, 12), tmp_path / "small.onnx", opset=13), tmp_path)
    assert "features_0 = conv(x, 8, size=3, pad=1) | relu | maxpool(2)" in text
    assert "classifier_1 = fc(features_4, 10) | leaky_relu(0.1)" in text


def torch_export(net, shape: tuple[int, ...], path: Path, opset: int = 17):
    """`net` through torch.onnx.export's TorchScript exporter (input `x`, batch dynamic), loaded back. An export
    that fails fails the test: only a torch whose export has no TorchScript switch at all is skipped."""
    torch = pytest.importorskip("torch")
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        pytest.skip("this torch's onnx.export cannot be told to use the TorchScript exporter (dynamo=False)")
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))  # traced: only its shape counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, example, str(path), opset_version=opset, dynamo=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}},
        )  # fmt: skip
    return onnx.load(str(path))


@pytest.mark.parametrize("size", [3, 5])
def test_pytorch_local_response_norm(size, tmp_path):
    """PyTorch traces LocalResponseNorm into ~40 nodes (Pad, AveragePool, If, ...): read back as one
    lrn whose alpha is PyTorch's divided by the size (PyTorch averages the squares, the paper sums)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(size)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LocalResponseNorm(size, alpha=0.05, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
        nn.Conv2d(8, 6, 3), nn.LocalResponseNorm(3, alpha=1e-3, beta=0.5, k=1.0),
    ).eval()  # fmt: skip
    proto = torch_export(net, (3, 17, 17), tmp_path / "lrn.onnx")
    assert len(proto.graph.node) > 40
    text = check(proto, tmp_path, reference=lambda feeds: [net(torch.from_numpy(feeds["x"])).detach().numpy()])
    norms = re.findall(r"lrn\((?:conv_4, )?size=(\d+), alpha=([0-9.e-]+), beta=([0-9.]+), k=([0-9.]+)\)", text)
    assert [(int(n), float(b), float(k)) for n, _, b, k in norms] == [(size, 0.75, 2.0), (3, 0.5, 1.0)]
    np.testing.assert_allclose([float(a) for _, a, _, _ in norms], [0.05 / size, 1e-3 / 3], rtol=1e-6)
    (tmp_path / "ort").mkdir()
    assert check(proto, tmp_path / "ort") == text  # onnxruntime agrees with PyTorch and netdsl too


def test_pytorch_local_response_norm_of_even_size_is_refused(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LocalResponseNorm(4)).eval()
    path = save(torch_export(net, (3, 9, 9), tmp_path / "even.onnx"), tmp_path / "even.onnx")
    assert main(["import", str(path), "-o", str(tmp_path / "even.net")]) == 1
    err = capsys.readouterr().err
    assert "even size (4)" in err and "one channel lower" in err and "Traceback" not in err


def test_hostile_names_are_sanitized(tmp_path):
    """Names from the file never reach the .net text unchecked: quotes, newlines, unicode, reserved
    words, built-in words, leading digits and names that clash after rewriting."""
    names = ['in"put', "all", "true\nfalse", "名前", "3x", "a/b", "a.b", "a_b", "# comment", "output", "", "conv"]
    nodes, previous = [], "input"
    for i, name in enumerate(names):
        out = name if name else f"t{i}"
        nodes.append(helper.make_node("Relu" if i % 2 else "LeakyRelu", [previous], [out], name=name))
        previous = out
    proto = model(nodes, {"input": ["N", 2, 3, 3]}, outputs=(previous,))
    proto.graph.output[0].name = previous
    text = check(proto, tmp_path)
    graph_from_text(text)
    assert "\n\n\n" not in text and '"' not in text.split("\n", 2)[2] and "名" not in text


# --- errors ----------------------------------------------------------------------------------------


def import_error(path: Path, tmp_path: Path, capsys, *parts: str, towers: bool = False) -> str:
    """The same error through the API and the command line (exit 1, no traceback)."""
    with pytest.raises(NetError) as info:
        import_onnx(path, towers=towers)
    message = str(info.value)
    for part in parts:
        assert part in message, message
    status = main(["import", str(path), "-o", str(tmp_path / "out.net")])
    out, err = capsys.readouterr()
    assert status == 1 and "Traceback" not in out + err
    for part in parts:
        assert part in err
    assert not (tmp_path / "out.net").exists()
    return message


def small_model(opset: int = 17):
    nodes = [conv_node("x", "c", "w"), helper.make_node("Relu", ["c"], ["y"])]
    return model(nodes, {"x": ["N", 2, 4, 4]}, inits={"w": tensor((3, 2, 3, 3), 70)}, opset=opset)


def test_missing_file_and_folder(tmp_path, capsys):
    import_error(tmp_path / "nothing.onnx", tmp_path, capsys, "nothing.onnx: error: ONNX file not found")
    import_error(tmp_path, tmp_path, capsys, "is a folder")


def test_malformed_and_truncated_files(tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    import_error(garbage, tmp_path, capsys, "not an ONNX model")
    text = tmp_path / "text.onnx"
    text.write_text((NETS / "lenet5.net").read_text())
    import_error(text, tmp_path, capsys, "not an ONNX model")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    import_error(empty, tmp_path, capsys, "not an ONNX model: the file is empty")
    whole = save(small_model(), tmp_path / "whole.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(whole[: len(whole) // 2])
    import_error(cut, tmp_path, capsys, "not an ONNX model", "truncated")


def test_unsupported_ops_are_listed_together(tmp_path, capsys):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="ok"),
        helper.make_node("Resize", ["r", "", "scales"], ["up"], name="up1"),
        helper.make_node("Tanh", ["up"], ["t"]),
        helper.make_node("Resize", ["t", "", "scales"], ["y"], name="up\n2"),
    ]
    proto = model(nodes, {"x": ["N", 2, 4, 4]}, inits={"scales": np.array([1, 1, 2, 2], np.float32)})
    message = import_error(
        save(proto, tmp_path / "u.onnx"),
        tmp_path,
        capsys,
        "unsupported ONNX ops: Resize (node 'up1', #1), Tanh (node #2), Resize (node 'up?2', #3)",
    )
    assert "\n" not in message.split("hint:")[0].strip()


@pytest.mark.parametrize("opset, message", [(6, "ONNX opset 6 is too old"), (99, "ONNX opset 99 is newer")])
def test_unsupported_opsets(opset, message, tmp_path, capsys):
    proto = small_model()
    proto.opset_import[0].version = opset
    import_error(save(proto, tmp_path / "o.onnx"), tmp_path, capsys, message, f"opsets 7 to {max_opset()}")


def test_checker_and_input_errors(tmp_path, capsys):
    undefined = model([helper.make_node("Relu", ["nowhere"], ["y"])], {"x": ["N", 2, 4, 4]})
    import_error(save(undefined, tmp_path / "c.onnx"), tmp_path, capsys, "fails onnx.checker")
    ints = small_model()
    ints.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    import_error(save(ints, tmp_path / "i.onnx"), tmp_path, capsys, "input 'x' holds int64 values, not float32")
    symbolic = model([helper.make_node("Relu", ["x"], ["y"])], {"x": ["N", 2, "H", 4]})
    import_error(save(symbolic, tmp_path / "s.onnx"), tmp_path, capsys, "no fixed size `H` in dimension H")
    rank3 = model([helper.make_node("Relu", ["x"], ["y"])], {"x": ["N", 2, 4]})
    import_error(save(rank3, tmp_path / "r.onnx"), tmp_path, capsys, "input 'x' has 3 dimensions")


def test_wrong_weights_and_windows(tmp_path, capsys):
    wrong = model([conv_node("x", "y", "w")], {"x": ["N", 2, 4, 4]}, inits={"w": tensor((3, 4, 3, 3), 71)})
    import_error(
        save(wrong, tmp_path / "w.onnx"), tmp_path, capsys, "Conv node 'y', #0", "does not fit 2 input channels"
    )
    gemm = model(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "b"], ["y"], transB=1)],
        {"x": ["N", 2, 2, 2]},
        inits={"b": tensor((3, 7), 72)},
    )
    import_error(save(gemm, tmp_path / "g.onnx"), tmp_path, capsys, "the input has 8 features")
    negative = model(
        [conv_node("x", "y", "w", pads=[0, 0, -1, 1])], {"x": ["N", 2, 5, 5]}, inits={"w": tensor((3, 2, 2, 2), 73)}
    )
    import_error(save(negative, tmp_path / "a.onnx"), tmp_path, capsys, "negative pads [0, 0, -1, 1]")
    wide = model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 2, 0])], {"x": ["N", 2, 5, 5]}
    )
    import_error(save(wide, tmp_path / "d.onnx"), tmp_path, capsys, "MaxPool node #0", "smaller than the 2x2 window")
    add = model(
        [helper.make_node("Add", ["x", "c"], ["y"])], {"x": ["N", 2, 3, 3]}, inits={"c": tensor((1, 1, 3, 3), 74)}
    )
    import_error(save(add, tmp_path / "add.onnx"), tmp_path, capsys, "one number or one per channel")
    wide = model([helper.make_node("Concat", ["x", "x"], ["y"], axis=2)], {"x": ["N", 2, 3, 3]})
    import_error(save(wide, tmp_path / "cat.onnx"), tmp_path, capsys, "Concat on axis 2 is not supported")
    # windows of nothing: a stride, dilation or size below 1 (ONNX's checker lets them through)
    for i, attributes in enumerate([{"strides": [0, 1]}, {"dilations": [1, -1]}]):
        bad = model(
            [conv_node("x", "y", "w", **attributes)], {"x": ["N", 2, 5, 5]}, inits={"w": tensor((3, 2, 2, 2), 75)}
        )
        (what,) = attributes
        path = save(bad, tmp_path / f"window{i}.onnx")
        message = import_error(path, tmp_path, capsys, f"{what} {attributes[what]} must be at least 1")
        assert message.startswith(f"{path}: error: Conv node 'y'"), message  # named after the model
    pool = model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[0, 0])], {"x": ["N", 2, 5, 5]}
    )
    import_error(save(pool, tmp_path / "p.onnx"), tmp_path, capsys, "strides [0, 0] must be at least 1")
    scaled = model(
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("Gemm", ["f", "b"], ["y"], transB=1, alpha=np.nan),
        ],
        {"x": ["N", 2, 2, 2]},
        inits={"b": tensor((3, 8), 76)},
    )  # folded into the weights, a NaN would be written where `run` later refuses it
    import_error(save(scaled, tmp_path / "nan.onnx"), tmp_path, capsys, "attribute `alpha` is nan, not a finite")


def test_external_data(tmp_path, capsys):
    proto = small_model()
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(proto, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)  # fmt: skip
    _text, weights = import_onnx(folder / "m.onnx")
    assert set(weights) == {"c.weight"}
    (folder / "m.data").rename(tmp_path / "m.data")
    import_error(folder / "m.onnx", tmp_path, capsys, "external data file 'm.data'", "is missing")
    moved = onnx.load(str(folder / "m.onnx"), load_external_data=False)  # a path out of the model's folder
    for entry in moved.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../m.data"
    onnx.save(moved, str(folder / "m.onnx"))
    import_error(folder / "m.onnx", tmp_path, capsys, "cannot read the external data '../m.data'", "outside")


def test_output_folder_missing(tmp_path, capsys):
    path = save(small_model(), tmp_path / "m.onnx")
    assert main(["import", str(path), "-o", str(tmp_path / "no" / "m.net")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err


def test_command_line_end_to_end(tmp_path):
    path = save(small_model(), tmp_path / "m.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "netdsl", "import", str(path), "-o", str(tmp_path / "m.net"),
         "--weights-out", str(tmp_path / "w.safetensors")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'm.net'} and {tmp_path / 'w.safetensors'}" in done.stdout
    assert (tmp_path / "w.safetensors").is_file()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07\x12\x03abc\xff\xff")
    done = subprocess.run(
        [sys.executable, "-m", "netdsl", "import", str(broken), "-o", str(tmp_path / "b.net")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr and "not an ONNX model" in done.stderr


@pytest.mark.slow
def test_damaged_models_give_clear_errors(exported, tmp_path):
    """Seeded byte flips in exported models (mostly in the graph's structure at the head and tail of the
    file, some anywhere): every import ends in a model or in a NetError that is not an internal error.
    (Runs of 9,000 such mutants found five crash classes, fixed: undecodable names, damaged constants,
    unknown element types, models without outputs.)"""
    import random

    torch = pytest.importorskip("torch")
    sources = [exported(name)[3].read_bytes() for name in ("lenet5", "every_kind", "mini_vgg")]
    traced_lrn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LocalResponseNorm(3)).eval()
    sources.append(save(torch_export(traced_lrn, (3, 9, 9), tmp_path / "lrn.onnx"), tmp_path / "lrn.onnx").read_bytes())
    generator = random.Random(2026)
    path = tmp_path / "damaged.onnx"
    outcomes = Counter()
    for _ in range(1000):
        data = bytearray(generator.choice(sources))
        for _ in range(generator.randint(1, 4)):
            where = generator.random()
            span = min(4000, len(data))
            if where < 0.3:
                position = generator.randrange(len(data))
            elif where < 0.65:
                position = generator.randrange(span)
            else:
                position = len(data) - 1 - generator.randrange(span)
            data[position] = generator.randrange(256)
        path.write_bytes(bytes(data))
        try:
            import_onnx(path)
            outcomes["imported"] += 1
        except NetError as error:
            assert "internal error" not in error.message, error.message
            outcomes["error"] += 1
    assert outcomes["imported"] and outcomes["error"]


def test_a_pytorch_resnet_export(tmp_path):
    """Residual blocks as torch.onnx.export writes them (unfolded batch norms, a strided 1 x 1
    downsample, adaptive average pooling to 1 x 1): chains, adds and the pool come back readable."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, width: int, stride: int = 1):
            super().__init__()
            c_in = width if stride == 1 else width // 2
            self.c1, self.b1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.c2, self.b2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
            self.down = None
            if stride != 1:
                self.down = nn.Sequential(nn.Conv2d(c_in, width, 1, stride, bias=False), nn.BatchNorm2d(width))

        def forward(self, x):
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.l1, self.l2, self.fc = Block(8), Block(16, 2), nn.Linear(16, 5)

        def forward(self, x):
            x = self.l2(self.l1(self.stem(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(1)
    net = Small().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    text = check(torch_export(net, (3, 16, 16), tmp_path / "resnet.onnx"), tmp_path)
    assert "l1 = add(l1_c2, stem_0) | relu" in text
    assert "l2_down_0 = conv(l1, 16, size=1, stride=2)" in text  # the exporter folds batch norms
    assert "| relu | global_avgpool" in text


def test_commands_take_an_onnx_model_where_a_net_goes(exported, tmp_path, capsys):
    """check, info, run and compile read an .onnx file as its imported net; run uses the model's weights."""
    _, graph, _, path = exported("lenet5")
    assert main(["check", str(path)]) == 0
    assert main(["info", str(path)]) == 0
    assert "61,706" in capsys.readouterr().out  # LeNet-5's parameters
    out = tmp_path / "y.npy"
    assert main(["run", str(path), "--backend", "torch", "--random", "2", "--seed", "4", "--save", str(out)]) == 0
    x = np.random.default_rng(4).standard_normal((2, *layers(graph)[0].shape), dtype=np.float32)
    np.testing.assert_allclose(np.load(out), onnxruntime_outputs(path, {"image": x})[0], rtol=1e-4, atol=1e-6)

    build = tmp_path / "build"
    assert main(["compile", str(path), "-o", str(build), "--no-sm90"]) == 0
    assert f"netdsl run {build} --weights {build / 'lenet5.safetensors'}" in capsys.readouterr().out
    again = tmp_path / "z.npy"
    command = ["run", str(build), "--weights", str(build / "lenet5.safetensors"), "--backend", "torch"]
    assert main([*command, "--random", "2", "--seed", "4", "--save", str(again)]) == 0
    np.testing.assert_array_equal(np.load(again), np.load(out))


def test_reserved_names_follow_the_grammar():
    """Every word of the grammar that cannot name a layer is one the importer renames (the grammar's
    other words, such as `on` or `x`, are contextual and stay usable as names)."""
    from netdsl.interop.onnx_import.names import BUILTINS, RESERVED
    from netdsl.lang.frontend import graph_from_text
    from netdsl.lang.parse import _keywords

    refused = []
    for word in sorted(_keywords() | BUILTINS):
        text = f"net t\ninput image: 3 x 8 x 8\n{word} = relu(image)\ny = relu({word})\noutput y\n"
        try:
            graph_from_text(text)
        except NetError:
            refused.append(word)
    assert refused and set(refused) <= RESERVED | BUILTINS, refused


def test_constants_that_would_broadcast_into_a_huge_one_are_refused_before_they_are_made():
    """Two constants of 20,000 values multiply into 400 million: refused from their shapes, not after numpy
    has spent 1.6 GB on them; shapes that do not broadcast are an error naming the node."""
    from netdsl.interop.onnx_import.fold import fold

    column, row = np.ones((20_000, 1), np.float32), np.ones((1, 20_000), np.float32)
    with pytest.raises(NetError, match="would have 400000000 values"):
        fold("Mul", {}, [column, row], False, "Mul node 'm'", "f.onnx")
    with pytest.raises(NetError, match="do not broadcast"):
        fold("Add", {}, [np.ones((3, 2)), np.ones(4)], False, "Add node 'a'", "f.onnx")
    value, _ = fold("Sub", {}, [np.arange(3.0)[:, None], np.arange(4.0)], False, "Sub node 's'", "f.onnx")
    np.testing.assert_array_equal(value, np.arange(3.0)[:, None] - np.arange(4.0))
