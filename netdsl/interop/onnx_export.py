"""Export a net and its weights as a standard ONNX model.

`export_onnx(graph, weights, path)` writes one ONNX node (or a few) per layer of the layer graph
(`netdsl.lang.frontend.load_graph`'s), the weights as initializers, the net's inputs with a dynamic batch
dimension `N` and its outputs. The model is checked with `onnx.checker` (full check) and strict
shape inference before it is written.

Conventions carried over from netdsl/ir/ops.py:

- LRN uses the paper's alpha (not divided by the window size); ONNX divides by size, so the exported
  alpha is `alpha * size`. An LRN with `groups > 1` becomes Split (channels) -> LRN per group -> Concat.
  (ONNX allows an even window size, but onnxruntime's CPU LRN accepts only odd sizes.)
- fc flattens each input (channel-major), joins them, then Gemm with transB=1 (weight is units x inputs).
- a one-input layer reading several inputs gets a Concat on channels (axis 1) first.
- dropout is the identity at inference and is left out.
- a channel shuffle becomes Reshape [N, groups, C/groups, H, W] -> Transpose [0, 2, 1, 3, 4] -> Reshape
  [N, C, H, W], as PyTorch exports ShuffleNet's (the batch kept by 0 entries of the shapes).
- padding is written as the four `pads` of the input it reads (`same` worked out for its size). A dilated
  average pool needs opset 19, and a ceil-mode pool whose last window would start in the end padding (dropped,
  as onnxruntime drops it) opset 22, which says so: the model then gets that opset.

Trained weights' preprocessing (the JSON record `netdsl train` saves as "netdsl.preprocess") goes into the
model's `metadata_props` under the same key, and its class names under "names" (netdsl/interop/onnx_metadata.py).

Names: ONNX allows any string, but layer names such as `conv1.relu@gpu0` are rewritten to
`conv1.relu_gpu0` (anything outside letters, digits, `_`, `.`, `-` becomes `_`), kept unique.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import networkx as nx
import numpy as np

from netdsl.errors import NetError
from netdsl.files import write_atomic_bytes
from netdsl.interop.onnx_metadata import export_props
from netdsl.ir import layers
from netdsl.ir.graph import require_graph
from netdsl.ir.ops import layer_pads
from netdsl.runtime.weights import checked_weights, weight_specs

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class _Names:
    """Readable, unique ONNX names for netdsl names."""

    def __init__(self) -> None:
        self.given: dict[str, str] = {}
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        if name in self.given:
            return self.given[name]
        base = _UNSAFE.sub("_", name) or "_"
        candidate, n = base, 1
        while candidate in self.used:
            n += 1
            candidate = f"{base}_{n}"
        self.used.add(candidate)
        self.given[name] = candidate
        return candidate

    def fresh(self, base: str) -> str:
        candidate, n = base, 1
        while candidate in self.used:
            n += 1
            candidate = f"{base}_{n}"
        self.used.add(candidate)
        return candidate


def build_onnx(graph: nx.DiGraph, weights: Mapping[str, np.ndarray], opset: int = 17, preprocess: str | None = None):
    """The ONNX `ModelProto` of `graph` with `weights` as initializers (checked, not written). The weights are
    checked as any net checks them (netdsl.runtime.weights.checked_weights: names, shapes, finite values).
    `preprocess`: the weights' preprocessing record (the JSON text `netdsl train` saved in their metadata as
    "netdsl.preprocess"), kept in the model's metadata_props."""
    import torch
    from onnx import TensorProto, helper

    if opset < 13:
        raise ValueError(f"opset {opset} is too old: export needs opset 13 or later")
    checked = checked_weights(weights, weight_specs(require_graph(graph)))
    weights = {name: tensor.to("cpu", torch.float32).numpy() for name, tensor in checked.items()}
    opset = max(opset, needed_opset(graph))
    names = _Names()
    nodes: list = []
    initializers: list[tuple[str, np.ndarray]] = []
    tensor_of: dict[str, str] = {}  # layer name -> ONNX tensor holding its output
    graph_inputs: list = []

    def init(name: str, value: np.ndarray) -> str:
        onnx_name = names(name)
        initializers.append((onnx_name, value))
        return onnx_name

    def weight(layer_name: str, tensor: str) -> str:
        key = f"{layer_name}.{tensor}"
        if key not in weights:
            raise KeyError(f"weight `{key}` is missing")
        return init(key, np.asarray(weights[key], dtype=np.float32))

    def constant(base: str, value: np.ndarray) -> str:
        onnx_name = names.fresh(base)
        initializers.append((onnx_name, value))
        return onnx_name

    def node(op: str, inputs: list[str], output: str | list[str], **attrs) -> str:
        outputs = [output] if isinstance(output, str) else output
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{outputs[0]}/{op}", **attrs))
        return output

    for item in layers(graph):
        if item.op == "input":
            out = names(item.name)
            graph_inputs.append(
                helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", *(int(d) for d in item.shape)])
            )
            tensor_of[item.name] = out
            continue
        p = item.params
        ins = [tensor_of[name] for name in item.inputs]
        out = names(item.name)
        if item.op == "add":
            node("Sum", ins, out)
        elif item.op == "concat":
            node("Concat", ins, out, axis=1) if len(ins) > 1 else node("Identity", ins, out)
        elif item.op == "fc":
            flat = [node("Flatten", [x], names.fresh(f"{out}/flat"), axis=1) for x in ins]
            x = flat[0] if len(flat) == 1 else node("Concat", flat, names.fresh(f"{out}/join"), axis=1)
            gemm_in = [x, weight(item.name, "weight")]
            if p.get("bias", True):
                gemm_in.append(weight(item.name, "bias"))
            node("Gemm", gemm_in, out, transB=1)
        else:
            x = ins[0] if len(ins) == 1 else node("Concat", ins, names.fresh(f"{out}/join"), axis=1)
            if item.op == "dropout":  # the identity at inference: readers take its input
                tensor_of[item.name] = x
                continue
            if item.op == "shuffle":
                _shuffle(item, x, out, node, constant, names)
            else:
                _one_input(item, p, x, out, node, weight, init, names)
        tensor_of[item.name] = out

    graph_outputs = []
    for name in graph.graph["outputs"]:
        item = graph.nodes[name]["layer"]
        out = tensor_of[name]
        if out != names(name):  # an output that is an input or a left-out dropout: give it its own name
            out = node("Identity", [out], names(name))
        graph_outputs.append(
            helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", *(int(d) for d in item.shape)])
        )

    onnx_graph = helper.make_graph(
        nodes, _UNSAFE.sub("_", str(graph.graph.get("name") or "net")), graph_inputs, graph_outputs
    )
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="netdsl")
    for onnx_name, value in initializers:  # into the model's own graph: make_graph and make_model copy
        _add_initializer(model.graph, onnx_name, value)
    model.ir_version = min(model.ir_version, _ir_version_for(opset))
    if preprocess is not None:
        helper.set_model_props(model, export_props(preprocess))
    check_structure(model)
    return model


def _add_initializer(onnx_graph, name: str, value: np.ndarray) -> None:
    """Appends `value` as an initializer named `name` to `onnx_graph`: the tensor numpy_helper.from_array
    makes (little-endian raw data), built in its place. Each copy of a VGG-16's 550 MB of weights costs
    seconds, and make_graph and make_model each copy their initializers once more."""
    from onnx import helper

    value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    tensor = onnx_graph.initializer.add()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    tensor.dims.extend(value.shape)
    tensor.raw_data = value.tobytes()


def needed_opset(graph: nx.DiGraph) -> int:
    """The oldest opset that says what every layer computes: 22 where a ceil-mode pool drops a last window that
    would start in the end padding (onnxruntime always drops it, but ONNX says so, and infers shapes so, only
    from opset 22 on); 19 for a dilated average pool (AveragePool's `dilations`)."""
    needed = 13
    for item in layers(graph):
        if item.op not in ("maxpool", "avgpool"):
            continue
        if item.params["ceil"] and _drops_a_window(item):
            needed = max(needed, 22)
        if item.op == "avgpool" and item.params["dilation"] != (1, 1):
            needed = max(needed, 19)
    return needed


def _drops_a_window(item) -> bool:
    """Whether a ceil-mode pool has fewer windows than ceil((n + pads - span) / stride) + 1 along an axis."""
    pads = layer_pads(item.params, item.input_shape[1:])
    for n, k, s, d, begin, end, out in zip(
        item.input_shape[1:], item.params["size"], item.params["stride"], item.params["dilation"], pads[:2], pads[2:],
        item.shape[1:], strict=True,
    ):  # fmt: skip
        if -(-(n + begin + end - d * (k - 1) - 1) // s) + 1 != out:
            return True
    return False


def check_structure(model) -> None:
    """`onnx.checker` (full check) and strict shape inference on `model` without its large weights:
    float initializers become typed graph inputs of the same shapes, so a VGG-sized model checks in
    well under a second (serializing its weights would take seconds). Small int64 constants stay."""
    import onnx

    skeleton = onnx.ModelProto()
    _copy_without_weights(model, skeleton)
    onnx.checker.check_model(skeleton, full_check=True)
    onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)


def _copy_without_weights(model, skeleton) -> None:
    from onnx import TensorProto, helper

    kept = [t for t in model.graph.initializer if t.data_type != TensorProto.FLOAT]
    moved = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    graph = model.graph
    light = helper.make_graph(
        list(graph.node),
        graph.name,
        [*graph.input, *(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)],
        list(graph.output),
        kept,
    )
    skeleton.CopyFrom(helper.make_model(light, opset_imports=list(model.opset_import), producer_name="netdsl"))
    skeleton.ir_version = model.ir_version


def _ir_version_for(opset: int) -> int:
    """The IR version matching an opset (so that older runtimes can load the model)."""
    table = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}
    return table.get(opset, 11 if opset > 23 else 8)


def _one_input(item, p: dict, x: str, out: str, node, weight, init, names) -> None:
    op = item.op
    if op == "conv":
        conv_in = [x, weight(item.name, "weight")]
        if p.get("bias", True):
            conv_in.append(weight(item.name, "bias"))
        kh, kw = p["size"]
        node(
            "Conv",
            conv_in,
            out,
            kernel_shape=[kh, kw],
            strides=list(p["stride"]),
            pads=list(layer_pads(p, item.input_shape[1:])),
            dilations=list(p["dilation"]),
            group=int(p["groups"]),
        )
    elif op == "relu":
        node("Relu", [x], out)
    elif op == "leaky_relu":
        node("LeakyRelu", [x], out, alpha=float(p["slope"]))
    elif op == "lrn":
        attrs = dict(size=int(p["size"]), alpha=float(p["alpha"]) * int(p["size"]), beta=float(p["beta"]))
        attrs["bias"] = float(p["k"])
        groups = int(p.get("groups", 1))
        if groups == 1:
            node("LRN", [x], out, **attrs)
        else:
            channels = item.input_shape[0]
            split = init(f"{item.name}.split", np.full(groups, channels // groups, dtype=np.int64))
            parts = [names.fresh(f"{out}/part{g}") for g in range(groups)]
            node("Split", [x, split], parts, axis=1)
            normed = [node("LRN", [part], names.fresh(f"{out}/lrn{g}"), **attrs) for g, part in enumerate(parts)]
            node("Concat", normed, out, axis=1)
    elif op in ("maxpool", "avgpool"):
        attrs = dict(
            kernel_shape=list(p["size"]),
            strides=list(p["stride"]),
            pads=list(layer_pads(p, item.input_shape[1:])),
            ceil_mode=int(bool(p["ceil"])),
        )
        if p["dilation"] != (1, 1):
            attrs["dilations"] = list(p["dilation"])
        if op == "avgpool":
            attrs["count_include_pad"] = int(bool(p["count_pad"]))
        node("MaxPool" if op == "maxpool" else "AveragePool", [x], out, **attrs)
    elif op == "global_avgpool":
        node("GlobalAveragePool", [x], out)
    elif op == "softmax":
        node("Softmax", [x], out, axis=1)
    elif op == "batchnorm":
        tensors = [weight(item.name, t) for t in ("weight", "bias", "running_mean", "running_var")]
        # ONNX's momentum weighs the running value, netdsl's (PyTorch's) the batch's
        node("BatchNormalization", [x, *tensors], out, epsilon=float(p["eps"]), momentum=1.0 - float(p["momentum"]))
    elif op == "flatten":
        node("Flatten", [x], out, axis=1)
    else:
        raise ValueError(f"cannot export layer `{item.name}`: op `{op}` has no ONNX form")


def _shuffle(item, x: str, out: str, node, constant, names: _Names) -> None:
    """A channel shuffle as exporters write one (PyTorch's `x.view(N, g, C // g, H, W).transpose(1, 2)` then
    `.view(N, C, H, W)`): Reshape -> Transpose -> Reshape, the batch kept by 0 entries of the shapes."""
    channels, height, width = item.shape
    groups = int(item.params["groups"])
    split = constant(f"{out}/grouped_shape", np.array([0, groups, channels // groups, height, width], np.int64))
    grouped = node("Reshape", [x, split], names.fresh(f"{out}/grouped"))
    swapped = node("Transpose", [grouped], names.fresh(f"{out}/transposed"), perm=[0, 2, 1, 3, 4])
    joined = constant(f"{out}/shape", np.array([0, channels, height, width], np.int64))
    node("Reshape", [swapped, joined], out)


# A protobuf message, and so an ONNX file holding its weights, is at most 2 GiB; a larger model keeps its
# weights in a second file beside it (ONNX's external data), and so may any model asked to.
MAX_PROTO_BYTES = 2**31 - 1
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in the model, as onnx.save does


def export_onnx(
    graph: nx.DiGraph,
    weights: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    opset: int = 17,
    external_data: bool | None = None,
    preprocess: str | None = None,
):
    """Writes `graph` with `weights` to `path` as an ONNX model; returns the `ModelProto`. `preprocess`: as
    for `build_onnx`, the weights' preprocessing record (`weights_metadata(file).get("netdsl.preprocess")`).

    `external_data`: the weights in `PATH.data` beside the model (ONNX's external data, which onnx,
    onnxruntime and `netdsl import` read) rather than inside it; None: only where the model would pass
    protobuf's 2 GiB. The data file is written (atomically) before the model that names it."""
    import onnx

    path = Path(path)
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding, which Python holds as lone surrogates
        raise NetError(
            "the model's file name is not UTF-8 text",
            where=str(path).encode("utf-8", "backslashreplace").decode("ascii"),
            hint="ONNX names the weights' file in UTF-8 and onnx.checker opens the model by a UTF-8 path: "
            "choose a name of UTF-8 characters",
        ) from None
    model = build_onnx(graph, weights, opset, preprocess)
    if external_data is None:
        external_data = _past_protobuf_limit(model)
    if external_data:
        data = path.with_name(path.name + ".data")
        write_atomic_bytes(data, _move_to_external(model, data.name))
    write_atomic_bytes(path, model.SerializeToString())
    onnx.checker.check_model(os.fspath(path), full_check=True)  # the file itself, weights included
    return model


def _past_protobuf_limit(model) -> bool:
    """Whether `model` serializes to more than MAX_PROTO_BYTES. Its initializers' bytes are counted from
    their shapes; the message itself is measured only where they pass half the limit (what else a model
    holds, its nodes, names and metadata, is kilobytes), since upb's ByteSize encodes the whole message,
    seconds for a VGG-16."""
    from onnx import helper

    data = sum(
        int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )
    return data > MAX_PROTO_BYTES // 2 and model.ByteSize() > MAX_PROTO_BYTES


def _move_to_external(model, location: str) -> bytes:
    """Moves each initializer of EXTERNAL_MIN_BYTES or more out of `model` into one blob, which it returns,
    each tensor naming its place in it (offsets aligned to 64 bytes for readers that map the file)."""
    from onnx import TensorProto

    blob = bytearray()
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
            continue
        blob.extend(bytes(-len(blob) % 64))
        entries = {"location": location, "offset": str(len(blob)), "length": str(len(tensor.raw_data))}
        blob.extend(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in entries.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return bytes(blob)


__all__ = ["build_onnx", "export_onnx"]
