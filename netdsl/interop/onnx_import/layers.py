"""The net being imported: netdsl layers keyed by number, each with its params, inputs, shape and weights.

The converter (convert.py) adds the layers, the clean-ups (clean_up.py) rewrite them, towers.py may copy them
once per tower, and write.py writes them as `.net` text. Shapes are worked out with netdsl's own rules
(netdsl/ir/ops.py), so a layer that netdsl would refuse is refused here, at its ONNX node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from netdsl.errors import NetError
from netdsl.ir.ops import OPS, REQUIRED, ParamError, ShapeError

# The hint of an error about a node, where no better one is given; and of a model whose data cannot be right.
UNSUPPORTED_HINT = "docs/onnx.md lists the ONNX ops, attributes and patterns netdsl imports (Supported ops)"
DAMAGED_HINT = "the model's data cannot be right: check it with onnx.checker, or export it again"


@dataclass
class Layer:
    key: int
    name: str  # the ONNX name: the first output tensor's (or the input's) name
    op: str  # a netdsl op, "input", "_bias" (a constant Add) or "_affine" (x * scale + shift per channel)
    params: dict
    inputs: list[int]
    shape: tuple[int, ...]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    where: str = ""
    order: float = 0.0  # position in the file (for a stable, readable order)
    constant: np.ndarray | None = None  # `_bias`: the constant added
    scale: np.ndarray | None = None  # `_affine`: per channel, float64
    shift: np.ndarray | None = None


class LayerGraph:
    """The layers of one imported model, its outputs, and notes for the user. `where` (the ONNX file) is
    where every error points."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.layers: dict[int, Layer] = {}
        self.outputs: list[tuple[str, int]] = []  # (ONNX output name, layer)
        self.notes: list[str] = []
        self._next = 0

    def fail(self, message: str, hint: str = UNSUPPORTED_HINT) -> NetError:
        return NetError(message, where=self.where, hint=hint)

    def add_layer(self, name: str, op: str, params: dict, inputs: list[int], where: str, weights=None) -> int:
        """A new layer (its shape worked out from its inputs'); returns its key."""
        if op == "input":
            shape = params.pop("shape")
        elif op in ("_bias", "_affine"):
            shape = self.layers[inputs[0]].shape
        else:
            try:
                shape = netdsl_shape(op, params, [self.layers[k].shape for k in inputs], where)
            except NetError as error:
                raise self.fail(error.message, error.hint) from None
        key = self._next
        self._next += 1
        self.layers[key] = Layer(key, name, op, params, list(inputs), shape, dict(weights or {}), where, float(key))
        return key

    def readers(self) -> dict[int, list[int]]:
        """Each layer's readers, in the order of their keys."""
        found: dict[int, list[int]] = {key: [] for key in self.layers}
        for key, layer in self.layers.items():
            for source in layer.inputs:
                found[source].append(key)
        return found

    def replace(self, old: int, new: int) -> None:
        """Every reader of layer `old`, and the outputs, read `new` instead."""
        for layer in self.layers.values():
            layer.inputs = [new if k == old else k for k in layer.inputs]
        self.outputs = [(name, new if k == old else k) for name, k in self.outputs]

    def output_keys(self) -> set[int]:
        return {k for _, k in self.outputs}

    def drop_unused(self) -> None:
        """Removes the layers no output needs (inputs stay: they are the net's interface)."""
        needed, stack = set(), [k for _, k in self.outputs]
        while stack:
            key = stack.pop()
            if key not in needed:
                needed.add(key)
                stack.extend(self.layers[key].inputs)
        dropped = [k for k, layer in self.layers.items() if k not in needed and layer.op != "input"]
        for key in dropped:
            del self.layers[key]

    def order(self) -> list[int]:
        """The layers in an order that puts each after its inputs and otherwise follows the file."""
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(self.layers)
        for key, layer in self.layers.items():
            graph.add_edges_from((source, key) for source in layer.inputs)
        return list(nx.lexicographical_topological_sort(graph, key=lambda k: self.layers[k].order))


def _check_ranges(op: str, params: dict, where: str) -> None:
    for param in OPS[op].params:
        value = params.get(param.name)
        if value is None or isinstance(value, (bool, str)):
            continue
        for v in value if isinstance(value, tuple) else (value,):
            hint = f"netdsl's `{param.name}` is the {param.doc}; {UNSUPPORTED_HINT}"
            if isinstance(v, float) and not math.isfinite(v):
                raise NetError(f"{where}: {op} `{param.name}` must be a finite number, got {v}", hint=DAMAGED_HINT)
            if param.minimum is not None and v < param.minimum:
                raise NetError(f"{where}: {op} `{param.name}` must be at least {param.minimum:g}, got {v:g}", hint=hint)
            if param.maximum is not None and (v >= param.maximum if param.below_maximum else v > param.maximum):
                raise NetError(f"{where}: {op} `{param.name}` must be below {param.maximum:g}, got {v:g}", hint=hint)


def netdsl_shape(op: str, params: dict, in_shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    """The shape (without the batch) of a netdsl `op` layer reading `in_shapes`, by netdsl's own rule."""
    spec = OPS[op]
    _check_ranges(op, params, where)
    full = {p.name: params.get(p.name, p.default) for p in spec.params}
    missing = [name for name, value in full.items() if value is REQUIRED]
    assert not missing, (op, missing)
    try:
        normalized = spec.normalize(full)
        return tuple(int(d) for d in spec.shape(normalized, in_shapes))
    except (ParamError, ShapeError) as error:
        raise NetError(f"{where}: {error}", hint=error.hint) from None


def fmt(shape) -> str:
    """A shape for a message: `3 x 224 x 224`."""
    return " x ".join(str(d) for d in shape) if len(shape) else "a scalar"


def frozen(params: dict) -> tuple:
    """A layer's params as something hashable, to compare layers."""
    return tuple(sorted(params.items()))


def channel_vector(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """A constant added to N x shape, as one number per channel (None if it varies otherwise)."""
    channels = shape[0]
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    dims = list(value.shape)
    while dims and dims[0] == 1 and len(dims) > len(shape):
        dims.pop(0)
    per_channel = [channels] + [1] * (len(shape) - 1)
    if dims == per_channel or (len(shape) == 1 and dims == [channels]):
        return value.reshape(channels).astype(np.float64)
    return None
