"""ONNX export (netdsl/interop/onnx_export.py): every bundled net, exported with He weights, runs in
onnxruntime and matches netdsl's torch backend on the same random input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import netdsl  # noqa: E402
from netdsl.interop.onnx_export import export_onnx  # noqa: E402
from netdsl.ir import layers  # noqa: E402
from netdsl.lang.frontend import graph_from_text, load_graph  # noqa: E402
from netdsl.runtime.weights import init_weights  # noqa: E402

NETS = sorted((Path(__file__).resolve().parent.parent / "nets").glob("*.net"))


def _inputs(graph, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        item.name: rng.standard_normal((batch, *item.shape), dtype=np.float32)
        for item in layers(graph)
        if item.op == "input"
    }


def _compare(path: Path, graph, tmp_path: Path, batch: int = 2) -> None:
    weights = init_weights(graph, seed=0, scheme="he")
    onnx_path = tmp_path / f"{path.stem}.onnx"
    export_onnx(graph, weights, onnx_path)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(onnx_path), str(tmp_path / "inferred.onnx"), strict_mode=True)

    inputs = _inputs(graph, batch)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 4
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))

    net = netdsl.load(path, backend="torch", weights=weights)
    expected = net(next(iter(inputs.values())) if len(inputs) == 1 else inputs)
    if not isinstance(expected, dict):
        expected = {graph.graph["outputs"][0]: expected}
    assert len(got) == len(expected)
    for (name, want), value in zip(expected.items(), got.values(), strict=True):
        want = want.detach().cpu().numpy()
        assert value.shape == want.shape, name
        error = np.linalg.norm(value - want) / max(np.linalg.norm(want), 1e-30)
        assert error <= 1e-4, f"{path.name}: output {name}: relative error {error:.2e}"


@pytest.mark.parametrize("path", NETS, ids=[p.stem for p in NETS])
def test_bundled_net_matches_onnxruntime(path, tmp_path):
    _compare(path, load_graph(path), tmp_path, batch=1)


SMALL = """
net small
input image: 3 x 17 x 17
a = conv(image, 8, size=3, pad=1, dilation=1) | leaky_relu(0.1) | lrn(size=3, alpha=1e-3, beta=0.7, k=1.5, groups=2)
b = conv(image, 8, size=3, pad=(2, 1), dilation=(2, 1), groups=1, bias=false) | batchnorm
s = add(a, b) | relu | maxpool(3, stride=2, pad=1, ceil=true)
t = avgpool(s, 3, stride=2, pad=1, ceil=true, count_pad=false)
u = avgpool(s, 2, stride=1) | global_avgpool
j = concat(t, t)
f = flatten(j) | dropout(0.3)
g = flatten(u)
logits = concat(f, g) | fc(7)
prob = softmax(logits)
output prob
output logits
"""


def test_every_layer_kind(tmp_path):
    path = tmp_path / "small.net"
    path.write_text(SMALL)
    graph = graph_from_text(SMALL, str(path))
    kinds = {item.op for item in layers(graph)}
    assert {"conv", "leaky_relu", "lrn", "batchnorm", "add", "maxpool", "avgpool", "global_avgpool"} <= kinds
    assert {"concat", "flatten", "dropout", "fc", "softmax"} <= kinds
    _compare(path, graph, tmp_path, batch=3)


def test_names_are_sanitized_and_batch_is_dynamic(tmp_path):
    path = next(p for p in NETS if p.stem == "alexnet")
    graph = load_graph(path)
    model = export_onnx(graph, init_weights(graph, seed=0, scheme="he"), tmp_path / "a.onnx")
    names = [n.name for n in model.graph.initializer] + [o for n in model.graph.node for o in n.output]
    assert all("@" not in name for name in names)
    assert len(set(names)) == len(names)
    assert model.graph.input[0].name == "image"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    lrn = next(n for n in model.graph.node if n.op_type == "LRN")
    alpha = next(a.f for a in lrn.attribute if a.name == "alpha")
    assert alpha == pytest.approx(1e-4 * 5)


def test_export_command(tmp_path, capsys):
    from netdsl.cli.main import main

    out, lenet = tmp_path / "lenet5.onnx", NETS[0].parent / "lenet5.net"
    assert main(["export", str(lenet), "-o", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((2, 1, 32, 32), dtype=np.float32)
    (result,) = session.run(None, {"image": x})
    want = netdsl.load(lenet, backend="torch", weights=init_weights(load_graph(lenet), seed=0))(x).numpy()
    assert result.shape == want.shape == (2, 10)  # the default weights: the paper's, seed 0
    assert np.abs(result - want).max() <= 1e-4 * np.abs(want).max()
    assert main(["export", str(NETS[0].parent / "lenet5.net"), "-o", str(tmp_path / "missing" / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def test_weights_as_external_data(tmp_path, capsys):
    """`--external-data`: the weights in OUT.onnx.data; onnxruntime and `netdsl import` read the pair as the
    one-file model, and the model file holds none of the large tensors."""
    from netdsl.cli.main import main

    net = str(NETS[0].parent / "lenet5.net")
    assert main(["export", net, "-o", str(tmp_path / "one.onnx")]) == 0
    assert main(["export", net, "-o", str(tmp_path / "two.onnx"), "--external-data"]) == 0
    data = tmp_path / "two.onnx.data"
    assert data.stat().st_size > 200_000 > (tmp_path / "two.onnx").stat().st_size
    x = np.random.default_rng(4).standard_normal((2, 1, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(_outputs(tmp_path / "two.onnx", x), _outputs(tmp_path / "one.onnx", x))
    assert main(["import", str(tmp_path / "two.onnx"), "-o", str(tmp_path / "back.net")]) == 0
    assert main(["import", str(tmp_path / "one.onnx"), "-o", str(tmp_path / "ref.net")]) == 0
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert "Traceback" not in capsys.readouterr().err


def test_a_model_past_2_gib_keeps_its_weights_beside_it(tmp_path, monkeypatch):
    """Protobuf cannot write a message over 2 GiB: such a model goes to external data by itself (the limit
    lowered here, so that a small net stands for a large one)."""
    from netdsl.interop import onnx_export

    graph = load_graph(NETS[0].parent / "lenet5.net")
    weights = init_weights(graph, seed=0, scheme="he")
    monkeypatch.setattr(onnx_export, "MAX_PROTO_BYTES", 100_000)
    export_onnx(graph, weights, tmp_path / "big.onnx")
    monkeypatch.setattr(onnx_export, "MAX_PROTO_BYTES", 10**9)
    export_onnx(graph, weights, tmp_path / "small.onnx")
    assert (tmp_path / "big.onnx.data").exists() and not (tmp_path / "small.onnx.data").exists()
    x = np.random.default_rng(5).standard_normal((1, 1, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(_outputs(tmp_path / "big.onnx", x), _outputs(tmp_path / "small.onnx", x))


def test_the_2_gib_test_measures_the_model_where_its_weights_come_near(monkeypatch):
    """The weights' bytes counted from their shapes decide alone only far below the limit; near it the
    serialized size does, to the byte."""
    from netdsl.interop import onnx_export

    graph = load_graph(NETS[0].parent / "lenet5.net")
    model = onnx_export.build_onnx(graph, init_weights(graph, seed=3, scheme="he"))
    size = model.ByteSize()
    data = sum(len(t.raw_data) for t in model.graph.initializer)
    assert data < size < data + 4096
    for limit, past in ((size - 1, True), (size, False), (2 * data + 2, False)):
        monkeypatch.setattr(onnx_export, "MAX_PROTO_BYTES", limit)
        assert onnx_export._past_protobuf_limit(model) is past, limit
