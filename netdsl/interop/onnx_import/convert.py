"""ONNX nodes to netdsl layers: each node becomes a layer (or an alias: Identity, Dropout, a Flatten of a
flat input), constants are folded (fold.py), shapes are worked out with netdsl's own rules as layers are added
(layers.py), padding is matched window for window (windows.py). A few patterns of several nodes are read as one
layer: a zero Pad before a conv or pool is its padding; Split -> the same LRN or Conv per part -> Concat is one
grouped layer; Reshape -> Transpose -> Reshape of a channel shuffle is one shuffle (reshape.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

from netdsl.errors import NetError
from netdsl.interop.onnx_import.fold import BATCH, FOLDABLE, fold
from netdsl.interop.onnx_import.layers import DAMAGED_HINT, UNSUPPORTED_HINT, LayerGraph, channel_vector, fmt
from netdsl.interop.onnx_import.read import CONST_OPS, LAYER_OPS, attributes, node_where, opset_of, shown, to_array
from netdsl.interop.onnx_import.reshape import (
    reading,
    reshaped,
    shuffle_groups,
    swapped,
    swaps_groups,
    target_text,
)
from netdsl.interop.onnx_import.windows import NOT_2D_HINT, netdsl_window, same_pairs

# The method of `Converter` that converts each op: Conv -> op_conv, BatchNormalization -> op_batch_normalization.
_HANDLERS = {
    op: "op_" + {"LRN": "lrn", "MatMul": "matmul"}.get(op, re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower())
    for op in (*LAYER_OPS, "Shape", "Transpose")
    if op != "Split"  # split_group: a pattern of several nodes
}


def convert(model, file: str) -> LayerGraph:
    """The layers of the checked `model` (read from `file`, where every error points), with its outputs."""
    return Converter(model, file).convert()


class Converter:
    """One model's conversion: ONNX nodes in, netdsl layers out. A visitor: `convert` walks the nodes in file
    order and hands each to the method named after its op (`_HANDLERS`), which reads its inputs from the
    tensors seen so far (`acts`: computed by a layer, `consts`: folded). It stays one class because every
    handler shares that state; what does not need it lives in the modules beside this one."""

    def __init__(self, model, file: str) -> None:
        self.model = model
        self.file = file
        self.opset = opset_of(model)
        self.net = LayerGraph(file)
        self.acts: dict[str, int] = {}  # tensor -> the layer that computes it
        self.consts: dict[str, np.ndarray] = {}  # tensor -> folded value
        self.symbolic: set[str] = set()  # constants holding the batch size
        self.unusable: dict[str, str] = {}  # tensor -> why it cannot be read
        self.batch: int | None = None  # the batch size when every input fixes it
        self.skip: set[int] = set()  # nodes folded into a pattern (Split -> op per part -> Concat)
        # A pattern's last node -> what builds its layer there, once the constants its nodes read are folded.
        self.deferred: dict[int, Callable[[], int]] = {}
        # A zero Pad's output -> (the layer it pads, (top, left, bottom, right)): only a conv or pool reads it,
        # which takes the padding as its own.
        self.padded: dict[str, tuple[int, tuple[int, int, int, int]]] = {}
        # The first two results of a channel shuffle (reshape.py): ("grouped" or "transposed", the layer
        # shuffled, its per-image shape as g x C/g x pixels).
        self.shuffling: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        self.consumers: dict[str, list[int]] = {}  # tensor -> the nodes that read it (by index)
        for index, node in enumerate(model.graph.node):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.graph_outputs = {o.name for o in model.graph.output}

    def fail(self, message: str, hint: str = UNSUPPORTED_HINT) -> NetError:
        return self.net.fail(message, hint)

    # --- inputs, values -----------------------------------------------------------------------

    def read_inputs(self) -> None:
        from onnx import TensorProto

        graph = self.model.graph
        for tensor in graph.initializer:
            self.consts[tensor.name] = to_array(tensor, f"initializer '{shown(tensor.name)}'")
        batches = set()
        for vi in graph.input:
            if vi.name in self.consts:
                continue
            name = shown(vi.name)
            hint = "netdsl nets read float32 images N x C x H x W (or vectors N x F) with fixed C, H and W"
            if not vi.type.HasField("tensor_type"):
                raise self.fail(f"input '{name}' is not a tensor", hint)
            tensor_type = vi.type.tensor_type
            if tensor_type.elem_type != TensorProto.FLOAT:
                known = tensor_type.elem_type in TensorProto.DataType.values()
                kind = TensorProto.DataType.Name(tensor_type.elem_type).lower() if known else "unknown (damaged?)"
                raise self.fail(f"input '{name}' holds {kind} values, not float32", hint)
            if not tensor_type.HasField("shape"):
                raise self.fail(f"input '{name}' has no shape", hint)
            dims = list(tensor_type.shape.dim)
            if len(dims) not in (2, 4):
                raise self.fail(f"input '{name}' has {len(dims)} dimensions", hint)
            shape = []
            for axis, dim in zip("CHW" if len(dims) == 4 else "F", dims[1:]):
                if not dim.HasField("dim_value") or dim.dim_value <= 0:
                    symbol = f" `{shown(dim.dim_param)}`" if dim.HasField("dim_param") else ""
                    raise self.fail(
                        f"input '{name}' has no fixed size{symbol} in dimension {axis}", hint + " (the batch may vary)"
                    )
                shape.append(int(dim.dim_value))
            batches.add(int(dims[0].dim_value) if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None)
            key = self.net.add_layer(vi.name, "input", {"shape": tuple(shape)}, [], f"input '{name}'")
            self.acts[vi.name] = key
        if not any(layer.op == "input" for layer in self.net.layers.values()):
            raise self.fail("the model has no inputs (every graph input is an initializer)")
        if len(batches) == 1 and None not in batches:
            self.batch = batches.pop()

    def act(self, name: str, where: str, what: str = "its input") -> int:
        if name in self.acts:
            return self.acts[name]
        if name in self.unusable:
            raise self.fail(self.unusable[name])
        if name in self.consts:
            raise self.fail(
                f"{where}: {what} '{shown(name)}' is a constant; netdsl layers read the input or other layers"
            )
        raise self.fail(f"{where}: {what} '{shown(name)}' is not defined")

    def const(self, name: str, where: str, what: str) -> np.ndarray:
        if name in self.consts:
            if name in self.symbolic:
                raise self.fail(f"{where}: {what} depends on the batch size, which netdsl nets do not fix")
            return self.consts[name]
        if name in self.acts:
            raise self.fail(
                f"{where}: {what} '{shown(name)}' is computed from the input; netdsl needs a constant here",
                hint="weights must be initializers or Constant nodes",
            )
        if name in self.unusable:
            raise self.fail(self.unusable[name])
        raise self.fail(f"{where}: {what} '{shown(name)}' is not defined")

    def weight(self, name: str, where: str, what: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        array = self.const(name, where, what)
        if array.dtype.kind not in "fiu":
            raise self.fail(f"{where}: {what} holds {array.dtype} values, not numbers", DAMAGED_HINT)
        array = np.asarray(array, dtype=np.float32)
        if shape is not None and tuple(array.shape) != tuple(shape):
            raise self.fail(f"{where}: {what} has shape {fmt(array.shape)}, but it must be {fmt(shape)} here")
        if not np.all(np.isfinite(array)):
            raise self.fail(f"{where}: {what} holds NaN or infinite values", DAMAGED_HINT)
        return array

    def channels(self, key: int, where: str, op: str) -> tuple[int, int, int]:
        shape = self.net.layers[key].shape
        if len(shape) != 3:
            raise self.fail(f"{where}: {op} needs an N x C x H x W input, but its input is N x {shape[0]}")
        return shape

    # --- the nodes ----------------------------------------------------------------------------

    def convert(self) -> LayerGraph:
        self.read_inputs()
        graph = self.model.graph
        for index, node in enumerate(graph.node):
            where = node_where(node, index)
            if index in self.deferred:
                self.bind(node, where, self.deferred.pop(index)())
                continue
            if index in self.skip:
                continue
            attrs = attributes(node, where)
            inputs = list(node.input)
            given = [name for name in inputs if name]
            if node.op_type == "Split":
                result = self.split_group(node, where, attrs)
            elif node.op_type in FOLDABLE and all(name in self.consts for name in given):
                values = [self.consts[name] if name else None for name in inputs]
                symbolic = any(name in self.symbolic for name in given)
                result = fold(node.op_type, attrs, values, symbolic, where, self.file)
            else:
                unusable = next((self.unusable[name] for name in given if name in self.unusable), None)
                if unusable is not None and node.op_type in CONST_OPS and node.op_type != "Transpose":
                    raise self.fail(unusable)  # (what makes the input unusable, not this node's op, is the problem)
                if node.op_type in ("Mul", "Sub", "Div") and len(given) == 2:
                    result = self.arithmetic(node, where, inputs)
                elif node.op_type in CONST_OPS and node.op_type not in ("Shape", "Transpose"):
                    raise self.fail(
                        f"{where}: {node.op_type} on the activations is not supported (only on constants, "
                        "which are folded)"
                    )
                else:
                    result = getattr(self, _HANDLERS[node.op_type])(node, where, attrs, inputs)
            self.bind(node, where, result)
        for output in graph.output:
            name = output.name
            if name in self.consts:
                raise self.fail(f"output '{shown(name)}' is a constant, not computed from the input")
            key = self.act(name, f"output '{shown(name)}'", "the output")
            if self.net.layers[key].op == "input" or key in self.net.output_keys():
                # an Identity (or Dropout) of the input, or of another output: `dropout(x, 0)`, the identity,
                # keeps every output of the model under its name
                key = self.net.add_layer(name, "dropout", {"rate": 0.0}, [key], f"output '{shown(name)}'")
            self.net.outputs.append((name, key))
            self.check_declared_shape(output, key)
        return self.net

    def check_declared_shape(self, value_info, key: int) -> None:
        """An output whose ONNX type gives fixed sizes must have the shape netdsl computes."""
        if not value_info.type.HasField("tensor_type") or not value_info.type.tensor_type.HasField("shape"):
            return
        dims = list(value_info.type.tensor_type.shape.dim)
        ours = self.net.layers[key].shape
        if not dims:
            return
        fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if len(fixed) != len(ours) or any(f is not None and f != o for f, o in zip(fixed, ours)):
            declared = " x ".join("?" if f is None else str(f) for f in fixed)
            raise self.fail(
                f"output '{shown(value_info.name)}' is declared N x {declared}, but netdsl computes N x {fmt(ours)}",
                hint="the model's declared output shape does not match its nodes",
            )

    def bind(self, node, where: str, result) -> None:
        outputs = list(node.output)
        if isinstance(result, tuple):  # (value, symbolic)
            result, symbolic = result
            if symbolic:
                self.symbolic.add(outputs[0])
        if isinstance(result, np.ndarray):
            self.consts[outputs[0]] = result
        elif result is not None:
            self.acts[outputs[0]] = result
        for i, name in enumerate(outputs[1:], start=1):
            if name:
                self.unusable[name] = (
                    f"{where}: its output #{i} ('{shown(name)}') is used, but netdsl computes only the first output"
                )
                if name in self.graph_outputs:
                    raise self.fail(self.unusable[name])

    # --- layer ops ----------------------------------------------------------------------------

    def op_shape(self, node, where, attrs, inputs):
        """The shape of an activation: its batch size is a symbol, the rest is known."""
        shape = np.array([BATCH, *self.net.layers[self.act(inputs[0], where)].shape], dtype=np.int64)
        part = shape[attrs.get("start", 0) : attrs.get("end", len(shape))]
        return part, bool(np.any(part == BATCH))

    def op_identity(self, node, where, attrs, inputs):
        return self.act(inputs[0], where)

    def op_dropout(self, node, where, attrs, inputs):
        if len(inputs) > 2 and inputs[2]:
            training = self.const(inputs[2], where, "training_mode")
            if np.any(training):
                raise self.fail(f"{where}: dropout in training mode is random; netdsl imports inference models")
        return self.act(inputs[0], where)

    def op_relu(self, node, where, attrs, inputs):
        return self.net.add_layer(node.output[0], "relu", {}, [self.act(inputs[0], where)], where)

    def op_clip(self, node, where, attrs, inputs):
        """Clip to [0, +inf) is a ReLU; any other bound (ReLU6's 6, say) has no netdsl layer."""
        if self.opset < 11:
            low, high = float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))
        else:
            given = [*inputs[1:3], "", ""]
            low, high = (
                float(self.const(name, where, f"the {what}").reshape(-1)[0]) if name else default
                for name, what, default in zip(given, ("min", "max"), (-np.inf, np.inf))
            )
        if low != 0 or high != np.inf:
            raise self.fail(
                f"{where}: Clip to [{low:g}, {high:g}] is not supported (only [0, inf), a ReLU)",
                hint="netdsl has relu and leaky_relu, no bounded activation such as ReLU6",
            )
        return self.net.add_layer(node.output[0], "relu", {}, [self.act(inputs[0], where)], where)

    def op_leaky_relu(self, node, where, attrs, inputs):
        slope = _f32(attrs.get("alpha", 0.01))
        return self.net.add_layer(node.output[0], "leaky_relu", {"slope": slope}, [self.act(inputs[0], where)], where)

    def lrn_params(self, where: str, attrs: dict) -> dict:
        size = int(attrs["size"])
        if size < 1:
            raise self.fail(f"{where}: LRN size must be at least 1, got {size}")
        # ONNX divides alpha by size; netdsl's lrn uses the paper's alpha (not divided): the shortest
        # decimal that gives back the file's float32 alpha when multiplied by size again.
        onnx_alpha = np.float32(attrs.get("alpha", 1e-4))
        alpha = float(onnx_alpha) / size
        for digits in range(1, 18):
            candidate = float(f"{alpha:.{digits}g}")
            if np.float32(candidate * size) == onnx_alpha:
                alpha = candidate
                break
        return {"size": size, "alpha": alpha, "beta": _f32(attrs.get("beta", 0.75)), "k": _f32(attrs.get("bias", 1.0))}

    def op_lrn(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        self.channels(x, where, "LRN")
        return self.net.add_layer(node.output[0], "lrn", {**self.lrn_params(where, attrs), "groups": 1}, [x], where)

    def op_global_average_pool(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        self.channels(x, where, "GlobalAveragePool")
        return self.net.add_layer(node.output[0], "global_avgpool", {}, [x], where)

    def op_global_max_pool(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        _c, h, w = self.channels(x, where, "GlobalMaxPool")
        params = {"size": (h, w), "stride": (h, w), "pad": (0, 0), "dilation": (1, 1), "ceil": False}
        return self.net.add_layer(node.output[0], "maxpool", params, [x], where)

    def axes(self, inputs, attrs, where) -> list[int] | None:
        """The axes of a Reduce or Squeeze node: its second input (opset 13 and 18 on) or its attribute."""
        if len(inputs) > 1 and inputs[1]:
            return [int(a) for a in self.const(inputs[1], where, "the axes").reshape(-1)]
        return attrs.get("axes")

    def op_reduce_mean(self, node, where, attrs, inputs):
        """The mean over H and W (keepdims=1: N x C x 1 x 1, keepdims=0: N x C) is global_avgpool."""
        x = self.act(inputs[0], where)
        shape = self.net.layers[x].shape
        axes = self.axes(inputs, attrs, where)
        if len(shape) != 3 or axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            raise self.fail(f"{where}: ReduceMean over axes {axes} is not supported (only over H and W: axes 2, 3)")
        key = self.net.add_layer(node.output[0], "global_avgpool", {}, [x], where)
        if attrs.get("keepdims", 1):
            return key
        self.net.layers[key].name = node.output[0] + "/pool"
        return self.net.add_layer(node.output[0], "flatten", {}, [key], where)

    def op_softmax(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.net.layers[x].shape
        rank = len(shape) + 1
        axis = int(attrs.get("axis", 1 if self.opset < 13 else -1))
        axis = axis + rank if axis < 0 else axis
        ok = axis == 1 and (rank == 2 or self.opset >= 13 or shape[1:] == (1, 1))
        if not ok:
            what = "over the channels (axis 1) of N x C x H x W" if rank == 4 else "over axis 1 of N x F"
            raise self.fail(
                f"{where}: Softmax over axis {axis} of an N x {fmt(shape)} input; netdsl's softmax is {what}"
            )
        return self.net.add_layer(node.output[0], "softmax", {}, [x], where)

    def op_flatten(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.net.layers[x].shape
        rank = len(shape) + 1
        axis = int(attrs.get("axis", 1))
        axis = axis + rank if axis < 0 else axis
        if axis != 1:
            raise self.fail(f"{where}: Flatten with axis {axis} is not supported (netdsl flattens from axis 1)")
        if len(shape) == 1:
            return x
        return self.net.add_layer(node.output[0], "flatten", {}, [x], where)

    def op_squeeze(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.net.layers[x].shape
        axes = self.axes(inputs, attrs, where)
        if axes is not None and len(shape) == 3 and sorted(a % 4 for a in axes) == [2, 3] and shape[1:] == (1, 1):
            return self.net.add_layer(node.output[0], "flatten", {}, [x], where)
        raise self.fail(
            f"{where}: Squeeze of N x {fmt(shape)} with axes {axes} is not supported "
            "(only N x C x 1 x 1 -> N x C, axes 2 and 3)"
        )

    def op_reshape(self, node, where, attrs, inputs):
        if inputs[1] not in self.consts:
            self.const(inputs[1], where, "the target shape")
        target = [int(d) for d in self.consts[inputs[1]].reshape(-1)]
        zero = not attrs.get("allowzero", 0)
        if inputs[0] in self.shuffling and self.shuffling[inputs[0]][0] == "transposed":
            return self.end_shuffle(node, where, inputs[0], target, zero)
        x = self.act(inputs[0], where)
        shape = self.net.layers[x].shape
        size = math.prod(shape)
        rest = reshaped(shape, target, zero, self.batch)
        if rest == shape:
            return x
        if rest == (size,):
            return self.net.add_layer(node.output[0], "flatten", {}, [x], where)
        readers = [(self.model.graph.node[i], i) for i in self.consumers.get(node.output[0], [])]
        rank = len(rest or ()) + 1
        swaps = all(
            r.op_type == "Transpose" and swaps_groups(attributes(r, node_where(r, i)).get("perm"), rank)
            for r, i in readers
        )
        if rest is not None and shuffle_groups(shape, rest) and readers and swaps:
            self.shuffling[node.output[0]] = ("grouped", x, rest)
            self.unusable[node.output[0]] = f"{where}: {reading('first Reshape')}"
            return None
        raise self.fail(
            f"{where}: Reshape of N x {fmt(shape)} to {target_text(target)} is not supported: netdsl can only flatten "
            f"(to N x {size}, e.g. shape [0, -1] or [-1, {size}]) or read a channel shuffle (Reshape [N, g, C/g, H, W] "
            "-> Transpose [0, 2, 1, 3, 4] -> Reshape [N, C, H, W])"
        )

    def op_transpose(self, node, where, attrs, inputs):
        """Transpose of the activations: only the middle of a channel shuffle (reshape.py)."""
        pending = self.shuffling.get(inputs[0])
        if pending is None or pending[0] != "grouped" or node.output[0] in self.graph_outputs:
            raise self.fail(
                f"{where}: Transpose on the activations is not supported (only on constants, which are folded, "
                "and as the middle of a channel shuffle: Reshape [N, g, C/g, H, W] -> Transpose [0, 2, 1, 3, 4] -> "
                "Reshape [N, C, H, W])"
            )
        _, x, grouped = pending
        self.shuffling[node.output[0]] = ("transposed", x, grouped)
        self.unusable[node.output[0]] = f"{where}: {reading('Transpose')}"
        return None

    def end_shuffle(self, node, where, name: str, target: list[int], zero: bool):
        """The last Reshape of a channel shuffle: back to N x C x H x W, the shuffle layer (none for 1 or C
        groups, which move nothing)."""
        _, x, grouped = self.shuffling[name]
        shape = self.net.layers[x].shape
        if reshaped(swapped(grouped), target, zero, self.batch) != shape:
            raise self.fail(
                f"{where}: a channel shuffle of N x {fmt(shape)} must be reshaped back to N x {fmt(shape)}, not to "
                f"{target_text(target)}"
            )
        groups = shuffle_groups(shape, grouped)
        if groups in (1, shape[0]):
            return x
        return self.net.add_layer(node.output[0], "shuffle", {"groups": groups}, [x], where)

    def op_concat(self, node, where, attrs, inputs):
        keys = [self.act(name, where, "an input") for name in inputs if name]
        ranks = {len(self.net.layers[k].shape) for k in keys}
        if len(ranks) > 1:
            raise self.fail(f"{where}: Concat of inputs of different ranks")
        rank = ranks.pop() + 1
        axis = int(attrs["axis"])
        axis = axis + rank if axis < 0 else axis
        if axis != 1:
            raise self.fail(f"{where}: Concat on axis {axis} is not supported (netdsl joins on channels, axis 1)")
        if len(keys) == 1:
            return keys[0]
        return self.net.add_layer(node.output[0], "concat", {}, keys, where)

    def op_sum(self, node, where, attrs, inputs):
        given = [name for name in inputs if name]
        if any(name in self.consts for name in given):
            if len(given) == 2:
                return self.op_add(node, where, attrs, given)
            raise self.fail(f"{where}: Sum of layers and constants is not supported")
        keys = [self.act(name, where, "an input") for name in given]
        if len(keys) == 1:
            return keys[0]
        return self.net.add_layer(node.output[0], "add", {}, keys, where)

    def op_add(self, node, where, attrs, inputs):
        a, b = inputs[0], inputs[1]
        if a in self.consts or b in self.consts:
            act, const = (b, a) if a in self.consts else (a, b)
            x = self.act(act, where)
            value = self.weight(const, where, "the constant added")
            key = self.net.add_layer(node.output[0], "_bias", {}, [x], where)
            self.net.layers[key].constant = value
            return key
        keys = [self.act(a, where, "an input"), self.act(b, where, "an input")]
        return self.net.add_layer(node.output[0], "add", {}, keys, where)

    def arithmetic(self, node, where, inputs):
        """Mul, Sub or Div of an activation and a constant that is one number, or one per channel:
        x * scale + shift per channel (a normalization written as arithmetic, e.g. (x - mean) / std)."""
        a, b = inputs
        if (a in self.consts) == (b in self.consts):
            raise self.fail(
                f"{where}: {node.op_type} of two activations is not supported (only with a constant: one number "
                "or one per channel)"
            )
        first_is_const = a in self.consts
        x = self.act(b if first_is_const else a, where)
        value = self.weight(a if first_is_const else b, where, f"the constant of the {node.op_type}")
        vector = channel_vector(value, self.net.layers[x].shape)
        if vector is None:
            raise self.fail(
                f"{where}: {node.op_type} by a constant of shape {fmt(value.shape)} on N x "
                f"{fmt(self.net.layers[x].shape)}; netdsl reads one number or one per channel"
            )
        ones, zeros = np.ones_like(vector), np.zeros_like(vector)
        if node.op_type == "Mul":
            scale, shift = vector, zeros
        elif node.op_type == "Sub":
            scale, shift = (-ones, vector) if first_is_const else (ones, -vector)
        elif first_is_const or not np.all(vector):
            raise self.fail(f"{where}: Div of a constant by an activation, or by zero, is not supported")
        else:
            scale, shift = 1.0 / vector, zeros
        key = self.net.add_layer(node.output[0], "_affine", {}, [x], where)
        self.net.layers[key].scale, self.net.layers[key].shift = scale, shift
        return key

    def op_matmul(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.net.layers[x].shape
        if len(shape) != 1:
            raise self.fail(f"{where}: MatMul of an N x {fmt(shape)} input; netdsl's fc reads N x F (insert a Flatten)")
        weight = self.weight(inputs[1], where, "the weight (B)")
        if weight.ndim != 2 or weight.shape[0] != shape[0]:
            raise self.fail(f"{where}: the weight (B) has shape {fmt(weight.shape)}, but it must be {shape[0]} x units")
        params = {"units": int(weight.shape[1]), "bias": False}
        return self.net.add_layer(node.output[0], "fc", params, [x], where, {"weight": np.ascontiguousarray(weight.T)})

    def op_gemm(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.net.layers[x].shape
        if len(shape) != 1:
            raise self.fail(f"{where}: Gemm of an N x {fmt(shape)} input; Gemm reads N x F (insert a Flatten)")
        if attrs.get("transA", 0):
            raise self.fail(f"{where}: Gemm with transA=1 is not supported (the input would be transposed)")
        b = self.weight(inputs[1], where, "the weight (B)")
        if b.ndim != 2:
            raise self.fail(f"{where}: the weight (B) has shape {fmt(b.shape)}; it must be 2-D")
        weight = b if attrs.get("transB", 0) else b.T
        alpha = np.float32(attrs.get("alpha", 1.0))
        if alpha != 1:
            weight = weight * alpha  # float32, as onnxruntime scales the product
        units, features = weight.shape
        if features != shape[0]:
            layout = f"{units} x {shape[0]}" if attrs.get("transB", 0) else f"{shape[0]} x {units}"
            raise self.fail(
                f"{where}: the weight (B) has shape {fmt(b.shape)}, but the input has {shape[0]} features "
                f"(B must be {layout} with transB={attrs.get('transB', 0)})"
            )
        weights = {"weight": np.ascontiguousarray(weight, dtype=np.float32)}
        beta = float(np.float32(attrs.get("beta", 1.0)))
        if len(inputs) > 2 and inputs[2] and beta != 0:
            c = self.weight(inputs[2], where, "the bias (C)")
            if c.size == 1:
                c = np.full(units, c.reshape(-1)[0], dtype=np.float32)
            elif c.shape in ((units,), (1, units)):
                c = c.reshape(units)
            else:
                raise self.fail(f"{where}: the bias (C) has shape {fmt(c.shape)}; netdsl needs {units} or 1 x {units}")
            weights["bias"] = (c.astype(np.float64) * beta).astype(np.float32)
        params = {"units": int(units), "bias": "bias" in weights}
        return self.net.add_layer(node.output[0], "fc", params, [x], where, weights)

    def op_batch_normalization(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        if attrs.get("training_mode", 0):
            raise self.fail(f"{where}: BatchNormalization in training mode is not supported (inference only)")
        if not attrs.get("spatial", 1):
            raise self.fail(f"{where}: BatchNormalization with spatial=0 is not supported")
        channels = self.net.layers[x].shape[0]
        names = ("weight", "bias", "running_mean", "running_var")
        whats = ("the scale", "the bias (B)", "the mean", "the variance")
        weights = {
            name: self.weight(inputs[i + 1], where, what, (channels,))
            for i, (name, what) in enumerate(zip(names, whats))
        }
        if np.any(weights["running_var"] < 0):
            raise self.fail(f"{where}: the variance has negative values", DAMAGED_HINT)
        # ONNX keeps momentum of the running value (0.9), netdsl and PyTorch of the batch's (0.1)
        momentum = 1.0 - float(attrs.get("momentum", 0.9))
        params = {"eps": _f32(attrs.get("epsilon", 1e-5)), "momentum": round(momentum, 7)}  # float32 digits
        return self.net.add_layer(node.output[0], "batchnorm", params, [x], where, weights)

    def op_conv(self, node, where, attrs, inputs):
        weight = self.weight(inputs[1], where, "the weight (W)")
        x, attrs = self.take_padding(inputs[0], attrs, where, "Conv", weight.shape[2:] if weight.ndim == 4 else None)
        bias = self.weight(inputs[2], where, "the bias (B)") if len(inputs) > 2 and inputs[2] else None
        return self.conv(node.output[0], x, weight, bias, attrs, where, int(attrs.get("group", 1)))

    def conv(self, name, x, weight, bias, attrs, where, groups) -> int:
        c, h, w = self.channels(x, where, "Conv")
        if weight.ndim != 4:
            raise self.fail(f"{where}: the weight (W) has shape {fmt(weight.shape)}; netdsl convolutions are 2-D")
        filters, per_group, kh, kw = (int(d) for d in weight.shape)
        if groups < 1 or c % groups or filters % groups or per_group * groups != c:
            raise self.fail(
                f"{where}: the weight (W) has shape {fmt(weight.shape)}, which does not fit {c} input channels "
                f"in {groups} group(s) (it must be filters x {c // max(groups, 1)} x kh x kw)"
            )
        if "kernel_shape" in attrs and _pair(attrs["kernel_shape"], where, "kernel_shape") != (kh, kw):
            raise self.fail(
                f"{where}: kernel_shape {list(attrs['kernel_shape'])} does not match the weight's {kh} x {kw}"
            )
        if bias is not None and bias.shape != (filters,):
            raise self.fail(f"{where}: the bias (B) has shape {fmt(bias.shape)}, but it must be {filters}")
        stride = _pair(attrs.get("strides", (1, 1)), where, "strides")
        dilation = _pair(attrs.get("dilations", (1, 1)), where, "dilations")
        pad, _ceil = netdsl_window(self.file, where, "conv", attrs, (h, w), (kh, kw), stride, dilation, ceil_mode=False)
        params = {
            "filters": filters,
            "size": (kh, kw),
            "stride": stride,
            "pad": pad,
            "dilation": dilation,
            "groups": groups,
            "bias": bias is not None,
        }
        weights = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return self.net.add_layer(name, "conv", params, [x], where, weights)

    def pool(self, node, where, attrs, inputs, op: str):
        x, attrs = self.take_padding(inputs[0], attrs, where, node.op_type, attrs.get("kernel_shape"))
        _c, h, w = self.channels(x, where, node.op_type)
        kernel = _pair(attrs["kernel_shape"], where, "kernel_shape")
        dilation = _pair(attrs.get("dilations", (1, 1)), where, "dilations")
        stride = _pair(attrs.get("strides", (1, 1)), where, "strides")
        count_pad = bool(attrs.get("count_include_pad", 0)) if op == "avgpool" else None
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        pad, ceil = netdsl_window(self.file, where, op, attrs, (h, w), kernel, stride, dilation, ceil_mode, count_pad)
        if kernel == (1, 1) and stride == (1, 1) and pad == (0, 0):
            return x  # a 1 x 1 window moved by 1: the identity (PyTorch's adaptive pool to the size it has)
        params = {"size": kernel, "stride": stride, "pad": pad, "dilation": dilation, "ceil": ceil}
        if op == "avgpool":
            params["count_pad"] = count_pad
        return self.net.add_layer(node.output[0], op, params, [x], where)

    def op_pad(self, node, where, attrs, inputs):
        """A zero Pad of H and W (as TensorFlow exports write before a VALID conv): remembered, and
        folded into the conv or pool that reads it."""
        x = self.act(inputs[0], where)
        rank = len(self.net.layers[x].shape) + 1
        mode = attrs.get("mode", "constant")
        if mode != "constant":
            raise self.fail(f"{where}: Pad mode `{shown(mode)}` is not supported (only zeros: mode constant)")
        if self.opset < 11:
            pads, value = [int(p) for p in attrs.get("pads", ())], float(attrs.get("value", 0.0))
        else:
            pads = [int(p) for p in self.const(inputs[1], where, "the pads").reshape(-1)]
            has_value = len(inputs) > 2 and inputs[2]
            value = float(self.const(inputs[2], where, "the value").reshape(-1)[0]) if has_value else 0.0
            if len(inputs) > 3 and inputs[3]:  # opset 18: the axes the pads are for
                axes = [int(a) % rank for a in self.const(inputs[3], where, "the axes").reshape(-1)]
                full = [0] * (2 * rank)
                for i, axis in enumerate(axes):
                    full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
                pads = full
        if rank != 4 or len(pads) != 8:
            raise self.fail(f"{where}: Pad of an N x {fmt(self.net.layers[x].shape)} input is not supported")
        if value != 0 or min(pads) < 0 or any(pads[i] for i in (0, 1, 4, 5)):
            raise self.fail(
                f"{where}: only a Pad with zeros of height and width can be read (pads {pads}, value {value:g})",
                hint="it is folded into the Conv or pooling layer after it",
            )
        self.padded[node.output[0]] = (x, (pads[2], pads[3], pads[6], pads[7]))
        self.unusable[node.output[0]] = (
            f"{where}: a Pad can be read only by the Conv or pooling node after it, which takes the padding "
            "as its own (netdsl has no pad layer)"
        )
        return None

    def take_padding(self, name: str, attrs: dict, where: str, op: str, kernel) -> tuple[int, dict]:
        """The layer `name` holds and the node's attributes, with the padding of a Pad before it added (`kernel`:
        the window's size, which SAME padding depends on)."""
        if name not in self.padded:
            return self.act(name, where), attrs
        x, (top, left, bottom, right) = self.padded[name]
        auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
        if auto in ("SAME_UPPER", "SAME_LOWER") and kernel is not None:  # SAME for the size the Pad gives
            _c, h, w = self.channels(x, where, op)
            size = (h + top + bottom, w + left + right)
            stride = _pair(attrs.get("strides", (1, 1)), where, "strides")
            dilation = _pair(attrs.get("dilations", (1, 1)), where, "dilations")
            (t, b), (le, r) = same_pairs(self.file, where, auto, size, _pair(kernel, where, "kernel"), stride, dilation)
            own = [t, le, b, r]
            attrs = {**attrs, "ceil_mode": 0}  # SAME fixes the count: ceil(size / stride)
        elif auto in ("NOTSET", "VALID"):
            own = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))] if auto == "NOTSET" else [0, 0, 0, 0]
        else:
            raise self.fail(f"{where}: a {op} with auto_pad {shown(auto)} after a Pad is not supported")
        if len(own) != 4:
            raise self.fail(f"{where}: pads has {len(own)} values; netdsl layers are 2-D (4 pads)")
        if op == "MaxPool" and self.net.layers[x].op not in ("relu", "softmax"):
            raise self.fail(
                f"{where}: MaxPool after a Pad with zeros is read only when its input is >= 0 (after a Relu): "
                "it pads with -infinity",
            )
        if op == "AveragePool":
            if any(own) or attrs.get("ceil_mode", 0):
                raise self.fail(f"{where}: an AveragePool after a Pad needs no padding and no ceil_mode of its own")
            attrs = {**attrs, "count_include_pad": 1}  # the Pad's zeros are values the average counts
        pads = [own[0] + top, own[1] + left, own[2] + bottom, own[3] + right]
        return x, {**attrs, "auto_pad": "NOTSET", "pads": pads}

    def op_max_pool(self, node, where, attrs, inputs):
        return self.pool(node, where, attrs, inputs, "maxpool")

    def op_average_pool(self, node, where, attrs, inputs):
        return self.pool(node, where, attrs, inputs, "avgpool")

    # --- patterns -----------------------------------------------------------------------------

    def split_group(self, node, where, attrs):
        """Split (channels, equal parts) -> the same LRN or Conv on each part -> Concat, in order: one
        lrn(groups=n) or one conv(groups=n) (what `netdsl export` writes for lrn(groups=n))."""
        graph = self.model.graph
        bad = self.fail(
            f"{where}: Split is supported only as Split (channels, equal parts) -> one LRN or Conv per part -> "
            "Concat of them all, in order (a grouped layer)"
        )
        x = self.act(node.input[0], where)
        shape = self.net.layers[x].shape
        parts = list(node.output)
        axis = int(attrs.get("axis", 0))
        if len(shape) != 3 or axis not in (1, -3) or len(parts) < 2 or any(not p for p in parts):
            raise bad
        if len(node.input) > 1 and node.input[1]:
            sizes = [int(s) for s in self.const(node.input[1], where, "the split sizes").reshape(-1)]
        else:
            sizes = [int(s) for s in attrs.get("split", [shape[0] // len(parts)] * len(parts))]
        if len(set(sizes)) != 1 or sum(sizes) != shape[0]:
            raise bad
        branches = []
        for part in parts:
            users = self.consumers.get(part, [])
            if len(users) != 1 or part in self.graph_outputs:
                raise bad
            branches.append(users[0])
        first = graph.node[branches[0]]
        if first.op_type not in ("LRN", "Conv") or len(set(branches)) != len(branches):
            raise bad
        joins = set()
        for part, b in zip(parts, branches):
            branch = graph.node[b]
            if (
                branch.op_type != first.op_type
                or branch.input[0] != part
                or len([o for o in branch.output if o]) != 1
                or list(branch.attribute) != list(first.attribute)
                or branch.output[0] in self.graph_outputs
            ):
                raise bad
            users = self.consumers.get(branch.output[0], [])
            if len(users) != 1:
                raise bad
            joins.add(users[0])
        if len(joins) != 1:
            raise bad
        join_index = joins.pop()
        join = graph.node[join_index]
        if (
            join.op_type != "Concat"
            or list(join.input) != [graph.node[b].output[0] for b in branches]
            or int(attributes(join, where).get("axis", 0)) not in (1, -3)
        ):
            raise bad
        convs = [graph.node[b] for b in branches]
        if first.op_type == "Conv" and (
            any(len(c.input) < 2 for c in convs) or len({len([i for i in c.input if i]) for c in convs}) != 1
        ):
            raise bad

        def build() -> int:  # at the Concat: the weights may be Constant nodes between the Split and it
            branch_where = node_where(first, branches[0])
            if first.op_type == "LRN":
                params = {**self.lrn_params(branch_where, attributes(first, branch_where)), "groups": len(parts)}
                return self.net.add_layer(join.output[0], "lrn", params, [x], where)
            conv_attrs = attributes(first, branch_where)
            groups = int(conv_attrs.get("group", 1))
            wheres = [node_where(c, b) for c, b in zip(convs, branches)]
            weight = np.concatenate([self.weight(c.input[1], w, "the weight (W)") for c, w in zip(convs, wheres)])
            has_bias = len(first.input) > 2 and bool(first.input[2])
            bias = (
                np.concatenate([self.weight(c.input[2], w, "the bias (B)") for c, w in zip(convs, wheres)])
                if has_bias
                else None
            )
            return self.conv(join.output[0], x, weight, bias, conv_attrs, where, groups * len(parts))

        self.skip.update(branches)
        self.deferred[join_index] = build
        return None


def _f32(value) -> float:
    """A float32 attribute as the shortest decimal that reads back as the same float32."""
    return float(str(np.float32(value)))


def _pair(values, where: str, what: str) -> tuple[int, int]:
    """A 2-D window attribute (kernel_shape, strides, dilations): two whole numbers of at least 1."""
    values = [int(v) for v in values]
    if len(values) != 2:
        raise NetError(f"{where}: {what} has {len(values)} values; netdsl layers are 2-D (h, w)", hint=NOT_2D_HINT)
    if min(values) < 1:
        raise NetError(f"{where}: {what} {values} must be at least 1 in each dimension", hint=DAMAGED_HINT)
    return values[0], values[1]
