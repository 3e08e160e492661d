"""Shape inference: each layer's per-image output shape from its inputs' (floor rule; ceil where asked)."""

from __future__ import annotations

import math

import networkx as nx

from netdsl.errors import NetError
from netdsl.ir import Layer, copy_graph, layers
from netdsl.ir.ops import OPS, ShapeError, concat_channels

MAX_ELEMENTS = 2**31 - 1  # per image and tensor: the generated kernels' offsets within an image are 32-bit


def infer_shapes(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of `graph` with every `Layer.shape` (and `Layer.input_shape` of one-input ops) filled in."""
    graph = copy_graph(graph)
    for layer in layers(graph):
        if layer.op == "input":
            layer.shape = layer.params["shape"]
            continue
        producers = [graph.nodes[name]["layer"] for name in layer.inputs]
        shapes = [p.shape for p in producers]
        spec = OPS[layer.op]
        try:
            if spec.inputs == "one":
                layer.input_shape = concat_channels(shapes)
                shapes = [layer.input_shape]
            layer.shape = tuple(spec.shape(layer.params, shapes))
            if math.prod(layer.shape) > MAX_ELEMENTS:
                raise ShapeError(
                    f"its output {' x '.join(map(str, layer.shape))} has more than 2^31 - 1 values per image",
                    hint="kernels index one image with 32-bit offsets; check the sizes, padding and filter counts",
                )
        except ShapeError as error:
            raise _located(error, layer, producers) from None
    return graph


def _located(error: ShapeError, layer: Layer, producers: list[Layer]) -> NetError:
    notes = [(p.span, f"`{p.name}` is {' x '.join(map(str, p.shape))}") for p in producers[:3]]
    return NetError(f"{layer.op} `{layer.name}`: {error}", layer.span, trace=layer.trace, hint=error.hint, notes=notes)
