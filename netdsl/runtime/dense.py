"""A net applied densely, VGG's way of testing (Simonyan & Zisserman, 2015, section 3.2): its fc layers
become convolutions (the first, over the map it reads, with a kernel of that map's size; the others 1 x 1),
its flattens go, and the net then reads a whole image of any size at least its input's, giving a map of class
scores, one for each window of the input's size the convolutions step over.

`dense_graph(graph, height, width)` is the rewritten layer graph for an image of height x width;
`dense_weights(graph, weights)` the weights for it (an fc's matrix reshaped to its convolution's kernels:
an fc reads its input flattened channel-major, so column c*h*w + y*w + x is the kernel's tap (c, y, x)).
At the input's own size the dense net computes what the net does.
"""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx
import numpy as np

from netdsl.errors import NetError
from netdsl.ir import copy_graph, layer, layers
from netdsl.ir.graph import require_graph
from netdsl.ir.ops import OPS
from netdsl.ir.shapes import infer_shapes

DENSE_HINT = "dense evaluation takes nets whose fc layers read maps (or other fc layers) through flattens at most"


def dense_graph(graph: nx.DiGraph, height: int, width: int) -> nx.DiGraph:
    """`graph` (shaped, one image input) rewritten to read height x width images densely (see the module)."""
    graph = require_graph(graph)
    inputs = graph.graph["inputs"]
    if len(inputs) != 1:
        raise NetError(f"the net has {len(inputs)} inputs; dense evaluation reads one image", where="--dense",
                       hint=DENSE_HINT)  # fmt: skip
    source = layer(graph, inputs[0])
    if len(source.shape) != 3:
        raise NetError(f"the net reads N x {' x '.join(map(str, source.shape))}, not images", where="--dense",
                       hint=DENSE_HINT)  # fmt: skip
    if height < source.shape[1] or width < source.shape[2]:
        raise NetError(
            f"an image of {height} x {width} is smaller than the net's input {' x '.join(map(str, source.shape))}",
            where="--dense",
            hint="scale images to at least the net's input (--scales)",
        )
    flat = [name for name in graph.graph["outputs"] if layer(graph, name).op == "flatten"]
    if flat:
        raise NetError(f"the net's output `{flat[0]}` is a flatten", where="--dense", hint=DENSE_HINT)
    dense = copy_graph(graph)
    for item in layers(graph):
        if item.op == "flatten":  # its readers read what it read
            (read,) = item.inputs
            for reader in list(dense.successors(item.name)):
                record = layer(dense, reader)
                record.inputs = [read if name == item.name else name for name in record.inputs]
                dense.add_edge(read, reader)
            dense.remove_node(item.name)
        elif item.op == "fc":
            params = {"filters": item.params["units"], "size": _map_read(item)[1:], "stride": 1, "pad": 0,
                      "dilation": 1, "groups": 1, "bias": item.params["bias"], "init_std": None,
                      "init_bias": None}  # fmt: skip
            record = layer(dense, item.name)
            record.op, record.params = "conv", OPS["conv"].normalize(params)
    first = layer(dense, inputs[0])
    first.params = {**first.params, "shape": (source.shape[0], height, width)}
    try:
        return infer_shapes(dense)
    except NetError as error:
        raise NetError(f"the net cannot be applied densely: {error.message}", where="--dense",
                       hint=DENSE_HINT) from None  # fmt: skip


def dense_weights(graph: nx.DiGraph, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`weights` of `graph` (shaped) for its dense graph: each fc's matrix as its convolution's kernels."""
    dense = dict(weights)
    for item in layers(require_graph(graph)):
        if item.op == "fc":
            key = f"{item.name}.weight"
            dense[key] = np.asarray(weights[key]).reshape(item.params["units"], *_map_read(item))
    return dense


def _map_read(item) -> tuple[int, int, int]:
    """The C x H x W map an fc layer reads (a vector of C, another fc's output, as C x 1 x 1)."""
    return item.input_shape if len(item.input_shape) == 3 else (item.input_shape[0], 1, 1)


__all__ = ["dense_graph", "dense_weights"]
