"""The channel shuffle and ONNX, against onnxruntime (fp32, relative error <= 1e-4 in the 2-norm), on both backends.

ONNX holds a shuffle as Reshape [N, g, C/g, H, W] -> Transpose [0, 2, 1, 3, 4] -> Reshape [N, C, H, W]. Models
built here write it every way exporters do: constant shapes, the batch as a symbol (Shape -> Gather -> Unsqueeze ->
Concat), -1 and 0 entries, a fixed batch, the pixels as one axis; before a conv (folded into its weights), a grouped
conv, an fc and a ReLU (kernels). A real `torch.onnx.export` of a ShuffleNet unit is read back too. Then a net with
shuffles goes .net -> ONNX (checker, strict shape inference) -> .net.
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
    feeds_for,
    model,
    onnxruntime_outputs,
    relative_error,
    run_imported,
    save,
    tensor,
    torch_export,
)

import netdsl  # noqa: E402
from netdsl.errors import NetError  # noqa: E402
from netdsl.interop.onnx_export import export_onnx  # noqa: E402
from netdsl.interop.onnx_import import import_onnx, import_to_files  # noqa: E402
from netdsl.lang.frontend import graph_from_text  # noqa: E402
from netdsl.runtime.weights import init_weights  # noqa: E402

H, W = 7, 6  # unequal, so that a mix-up of the two shows
I64 = np.int64


def shuffle_nodes(x: str, out: str, channels: int, groups: int, style: str) -> tuple[list, dict]:
    """x (N x channels x H x W) shuffled in `groups` into `out`, the shapes written in `style`."""
    per = channels // groups
    inits, nodes = {}, []
    if style == "constant":  # what a fixed-shape export folds to: 0 keeps the batch
        inits = {f"{out}_s1": np.array([0, groups, per, H, W], I64), f"{out}_s2": np.array([0, -1, H, W], I64)}
    elif style == "minus-one":
        inits = {f"{out}_s1": np.array([0, groups, -1, H, W], I64), f"{out}_s2": np.array([-1, channels, H, W], I64)}
    elif style == "pixels":  # one axis for the pixels: N x g x C/g x H*W, perm [0, 2, 1, 3]
        inits = {f"{out}_s1": np.array([0, groups, per, H * W], I64), f"{out}_s2": np.array([0, channels, H, W], I64)}
    elif style == "fixed-batch":
        inits = {f"{out}_s1": np.array([2, groups, per, H, W], I64), f"{out}_s2": np.array([2, channels, H, W], I64)}
    else:  # "symbol": the batch from Shape -> Gather -> Unsqueeze -> Concat, as torch.onnx.export writes view(n, ...)
        inits = {f"{out}_i0": np.array(0, I64), f"{out}_ax": np.array([0], I64)}
        inits |= {f"{out}_rest1": np.array([groups, per, H, W], I64), f"{out}_rest2": np.array([-1, H, W], I64)}
        nodes = [
            helper.make_node("Shape", [x], [f"{out}_shape"]),
            helper.make_node("Gather", [f"{out}_shape", f"{out}_i0"], [f"{out}_n"], axis=0),
            helper.make_node("Unsqueeze", [f"{out}_n", f"{out}_ax"], [f"{out}_n1"]),
            helper.make_node("Concat", [f"{out}_n1", f"{out}_rest1"], [f"{out}_s1"], axis=0),
            helper.make_node("Concat", [f"{out}_n1", f"{out}_rest2"], [f"{out}_s2"], axis=0),
        ]
    perm = [0, 2, 1, 3] if style == "pixels" else [0, 2, 1, 3, 4]
    nodes += [
        helper.make_node("Reshape", [x, f"{out}_s1"], [f"{out}_grouped"]),
        helper.make_node("Transpose", [f"{out}_grouped"], [f"{out}_swapped"], perm=perm),
        helper.make_node("Reshape", [f"{out}_swapped", f"{out}_s2"], [out]),
    ]
    return nodes, inits


def conv(x: str, out: str, channels: int, filters: int, seed: int, groups: int = 1, kernel: int = 1):
    weight = tensor((filters, channels // groups, kernel, kernel), seed)
    inits = {f"{out}_w": weight, f"{out}_b": tensor((filters,), seed + 1)}
    pads = [kernel // 2] * 4
    return [conv_node(x, out, f"{out}_w", f"{out}_b", group=groups, pads=pads)], inits


def branches(*parts) -> tuple[list, dict]:
    nodes, inits = [], {}
    for part_nodes, part_inits in parts:
        nodes += part_nodes
        inits |= part_inits
    return nodes, inits


def shuffles_model():
    """Five branches from x (N x 3 x H x W), one output each."""
    nodes, inits = branches(
        # constant shapes, read by a conv: folded into its weights
        conv("x", "a0", 3, 12, 1), shuffle_nodes("a0", "a1", 12, 3, "constant"), conv("a1", "ya", 12, 6, 3, kernel=3),
        # the batch as a symbol, read by a grouped conv: a kernel
        conv("x", "b0", 3, 12, 5), shuffle_nodes("b0", "b1", 12, 4, "symbol"), conv("b1", "yb", 12, 12, 7, groups=2),
        # -1 entries, then a ReLU: a kernel
        conv("x", "c0", 3, 12, 9), shuffle_nodes("c0", "c1", 12, 6, "minus-one"),
        ([helper.make_node("Relu", ["c1"], ["yc"])], {}),
        # the pixels as one axis, then Flatten -> Gemm: folded into the fc's columns
        conv("x", "d0", 3, 8, 11), shuffle_nodes("d0", "d1", 8, 2, "pixels"),
        ([helper.make_node("Flatten", ["d1"], ["d2"]), helper.make_node("Gemm", ["d2", "dw", "db"], ["yd"], transB=1)],
         {"dw": tensor((5, 8 * H * W), 13), "db": tensor((5,), 14)}),
        # one group: the identity, no layer
        conv("x", "e0", 3, 4, 15), shuffle_nodes("e0", "ye", 4, 1, "constant"),
    )  # fmt: skip
    return model(nodes, {"x": ["N", 3, H, W]}, outputs=("ya", "yb", "yc", "yd", "ye"), inits=inits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exporters_shuffles_against_onnxruntime(backend, tmp_path):
    text = check(shuffles_model(), tmp_path, backend=backend)
    assert [line for line in text.splitlines() if "shuffle(" in line] == [
        "a1 = shuffle(a0, 3)",
        "b1 = shuffle(b0, 4)",
        "c1 = shuffle(c0, 6)",
        "d1 = shuffle(d0, 2)",
    ]
    assert "ye = conv(x, 4, size=1)\n" in text  # one group moves nothing
    net = netdsl.load(tmp_path / "model.net", weights=tmp_path / "model.safetensors")
    kinds = [net.program.nodes[name]["step"].kind for name in net.order]
    assert kinds.count("shuffle") == 2  # before the grouped conv and the ReLU; the conv and the fc absorb theirs


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_fixed_batch(backend, tmp_path):
    nodes, inits = branches(conv("x", "a0", 3, 12, 21), shuffle_nodes("a0", "y", 12, 3, "fixed-batch"))
    text = check(model(nodes, {"x": [2, 3, H, W]}, inits=inits), tmp_path, backend=backend)
    assert "y = shuffle(a0, 3)\n" in text


def shufflenet_unit():
    """A ShuffleNet unit (grouped 1x1 conv, shuffle, depthwise 3x3, grouped 1x1, residual) as PyTorch writes it,
    then a shuffle before a plain 1x1 conv and a classifier."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def channel_shuffle(x, groups):  # torchvision's ShuffleNetV2 writes it so
        n, c, h, w = x.size()
        x = x.view(n, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(n, -1, h, w)

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 12, 3, padding=1)
            self.reduce = nn.Sequential(nn.Conv2d(12, 12, 1, groups=3), nn.BatchNorm2d(12), nn.ReLU())
            self.depthwise = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12))
            self.expand = nn.Sequential(nn.Conv2d(12, 12, 1, groups=3), nn.BatchNorm2d(12))
            self.mix = nn.Conv2d(12, 8, 1)
            self.classifier = nn.Linear(8, 5)

        def forward(self, x):
            x = self.stem(x)
            y = channel_shuffle(self.reduce(x), 3)
            x = torch.relu(x + self.expand(self.depthwise(y)))
            x = self.mix(channel_shuffle(x, 2))
            return self.classifier(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Unit().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_pytorch_export_of_a_shufflenet_unit(backend, tmp_path):
    torch = pytest.importorskip("torch")
    net = shufflenet_unit()
    proto = torch_export(net, (3, H, W), tmp_path / "unit.onnx", opset=13)
    assert [n.op_type for n in proto.graph.node].count("Transpose") == 2
    text = check(proto, tmp_path, backend=backend)
    assert text.count("shuffle(3)") == 1 and text.count("shuffle(2)") == 1
    imported = netdsl.load(tmp_path / "model.net", weights=tmp_path / "model.safetensors")
    kernels = [name for name in imported.order if imported.program.nodes[name]["step"].kind == "shuffle"]
    assert len(kernels) == 1  # the one before the depthwise conv; the one before `mix` is folded into its weights
    feeds = feeds_for(proto)
    with torch.no_grad():
        want = net(torch.from_numpy(feeds["x"])).numpy()
    assert relative_error(onnxruntime_outputs(tmp_path / "model.onnx", feeds)[0], want) <= TOLERANCE


# --- .net -> ONNX -> .net ----------------------------------------------------------------------------------

ROUND_TRIP = f"""
net round_trip
input image: 6 x {H} x {W}
a = conv(image, 12, size=1, groups=3) | relu | shuffle(3)
b = conv(a, 12, size=3, pad=1, groups=3) | shuffle(4) | conv(8, size=1)
c = shuffle(b, 2) | maxpool(2)
output b, c
"""


def test_export_round_trip(tmp_path):
    graph = graph_from_text(ROUND_TRIP, file=str(tmp_path / "round_trip.net"))
    (tmp_path / "round_trip.net").write_text(ROUND_TRIP)
    weights = init_weights(graph, seed=2, scheme="he")
    path = tmp_path / "round_trip.onnx"
    export_onnx(graph, weights, path)  # onnx.checker (full) and strict shape inference on the way
    onnx.shape_inference.infer_shapes_path(str(path), str(tmp_path / "inferred.onnx"), strict_mode=True)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Transpose") == 3 and ops.count("Reshape") == 6
    assert all(list(n.attribute[0].ints) == [0, 2, 1, 3, 4] for n in proto.graph.node if n.op_type == "Transpose")

    feeds = feeds_for(proto)
    onnx_out = onnxruntime_outputs(path, feeds)
    original = netdsl.load(tmp_path / "round_trip.net", weights=weights)(feeds["image"])
    for value, want in zip(onnx_out, original.values(), strict=True):
        assert relative_error(value, want.numpy()) <= TOLERANCE

    result = import_to_files(path, tmp_path / "back.net", tmp_path / "back.safetensors")
    statements = [line for line in ROUND_TRIP.strip().splitlines() if line.startswith(("a =", "b =", "c =", "output"))]
    assert all(f"\n{line}\n" in result.text for line in statements), result.text  # the same net again
    for backend in ("torch", "triton"):
        back = run_imported(tmp_path / "back.net", tmp_path / "back.safetensors", feeds, backend)
        for value, want in zip(back, original.values(), strict=True):
            assert relative_error(value, want.numpy()) <= TOLERANCE, backend


# --- what is refused -----------------------------------------------------------------------------------------


def broken(kind: str):
    nodes, inits = branches(conv("x", "a0", 3, 12, 31), shuffle_nodes("a0", "y", 12, 3, "constant"))
    outputs = ["y"]
    if kind == "wrong-perm":
        nodes[2] = helper.make_node("Transpose", ["y_grouped"], ["y_swapped"], perm=[0, 1, 2, 4, 3])
    elif kind == "wrong-shape-back":
        inits["y_s2"] = np.array([0, 4, 3, H, W], I64)
    elif kind == "grouped-read-elsewhere":
        nodes.append(helper.make_node("Relu", ["y_grouped"], ["z"]))
        outputs.append("z")
    elif kind == "grouped-is-output":
        outputs.append("y_grouped")
    elif kind == "swapped-read-elsewhere":
        nodes.append(helper.make_node("Relu", ["y_swapped"], ["z"]))
        outputs.append("z")
    elif kind == "plain-transpose":
        nodes.append(helper.make_node("Transpose", ["a0"], ["z"], perm=[0, 1, 3, 2]))
        outputs.append("z")
    return model(nodes, {"x": ["N", 3, H, W]}, outputs=outputs, inits=inits)


ERRORS = {
    "wrong-perm": r"Reshape of N x 12 x 7 x 6 to \[0, 3, 4, 7, 6\] is not supported: netdsl can only flatten .* "
    r"or read a channel shuffle",
    "wrong-shape-back": r"a channel shuffle of N x 12 x 7 x 6 must be reshaped back to N x 12 x 7 x 6, not to "
    r"\[0, 4, 3, 7, 6\]",
    "grouped-read-elsewhere": r"Reshape of N x 12 x 7 x 6 to \[0, 3, 4, 7, 6\] is not supported",
    "grouped-is-output": r"a channel shuffle's first Reshape can be read only by the next node of the pattern",
    "swapped-read-elsewhere": r"a channel shuffle's Transpose can be read only by the next node of the pattern",
    "plain-transpose": r"Transpose on the activations is not supported \(only on constants, which are folded, "
    r"and as the middle of a channel shuffle",
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_what_is_not_a_channel_shuffle_is_a_clear_error(kind, tmp_path):
    path = save(broken(kind), tmp_path / f"{kind}.onnx")
    with pytest.raises(NetError, match=ERRORS[kind]) as error:
        import_onnx(path)
    assert error.value.where == str(path)
