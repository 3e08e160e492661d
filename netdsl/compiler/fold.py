"""Inference-only simplifications of the layer graph.

- dropout is the identity at inference: it disappears and its readers read its input;
- a flatten of several inputs reads them through a concat (a flatten is a view of one buffer);
- batch norm right after a conv (the conv's only reader, on the same device) folds into the conv's
  weights and bias: the conv records which batch norm it absorbed (`Layer.fields["folded"]`) and the
  weights are folded when they are loaded;
- a channel shuffle whose only reader is a conv with groups 1 or an fc on its device (and that is not an
  output) is a relabelling of that reader's input channels: it disappears, the reader records the
  permutation (`Layer.fields["shuffled"]`: where the shuffled channels sit in what it reads) and its weights'
  input channels (a conv's) or columns (an fc's) are permuted when they are loaded. A grouped conv keeps the
  shuffle as a kernel: the permutation would move channels across its groups.
"""

from __future__ import annotations

import math
from dataclasses import replace

import networkx as nx

from netdsl.compiler.steps import unique_name
from netdsl.ir import Layer, copy_graph, layer, layers


def fold_inference(graph: nx.DiGraph) -> nx.DiGraph:
    graph = copy_graph(graph)
    for item in layers(graph):
        if item.op == "dropout" and len(item.inputs) > 1:  # what remains is the joining of its inputs
            item.op, item.params = "concat", {}
        elif item.op == "flatten" and len(item.inputs) > 1:
            _join_first(graph, item)
        elif item.op == "dropout" or (item.op == "batchnorm" and _folds_into_conv(graph, item)):
            if item.op == "batchnorm":
                layer(graph, item.inputs[0]).fields.setdefault("folded", []).append(item.name)
            _bypass(graph, item)
    for item in reversed(layers(graph)):  # readers first: a shuffle of a shuffle folds once the second has
        reader = _shuffle_reader(graph, item) if item.op == "shuffle" else None
        if reader is not None:
            reader.fields.setdefault("shuffled", []).extend(_shuffled_slices(graph, reader, item))
            _bypass(graph, item)
    return graph


def _folds_into_conv(graph: nx.DiGraph, norm: Layer) -> bool:
    """Legal when the batch norm reads one conv on its device that nothing else reads."""
    if len(norm.inputs) != 1:
        return False
    conv = layer(graph, norm.inputs[0])
    return (
        conv.op == "conv"
        and conv.device == norm.device
        and graph.out_degree(conv.name) == 1
        and conv.name not in graph.graph["outputs"]
    )


def _shuffle_reader(graph: nx.DiGraph, shuffle: Layer) -> Layer | None:
    """The conv with groups 1 or the fc that is the only reader of `shuffle` on its device, or None."""
    readers = list(graph.successors(shuffle.name))
    if len(shuffle.inputs) != 1 or len(readers) != 1 or shuffle.name in graph.graph["outputs"]:
        return None
    reader = layer(graph, readers[0])
    takes = reader.op == "fc" or (reader.op == "conv" and reader.params["groups"] == 1)
    return reader if takes and reader.device == shuffle.device else None


def _shuffled_slices(graph: nx.DiGraph, reader: Layer, shuffle: Layer) -> list[dict]:
    """Where `reader` reads `shuffle` in its joined input: the first input channel (a conv's) or feature (an
    fc's, which flattens each input channel-major) of each read, with the shuffle's groups and map size."""
    channels, height, width = shuffle.shape
    slices, start = [], 0
    for name in reader.inputs:
        if name == shuffle.name:
            slices.append({"layer": shuffle.name, "groups": shuffle.params["groups"], "start": start,
                           "channels": channels, "pixels": height * width})  # fmt: skip
        shape = layer(graph, name).shape
        start += shape[0] if reader.op == "conv" else math.prod(shape)
    return slices


def _join_first(graph: nx.DiGraph, item: Layer) -> None:
    """A flatten of several inputs (`flatten(all x)`) reads them joined by a concat of its own: the flatten is a
    view of one buffer, which several inputs are not."""
    name = unique_name(f"{item.name}.join", set(graph.nodes))
    joined = replace(item, name=name, op="concat", params={}, inputs=list(item.inputs), shape=item.input_shape,
                     input_shape=None, fields={})  # fmt: skip
    graph.add_node(name, layer=joined)
    for source in dict.fromkeys(item.inputs):
        graph.remove_edge(source, item.name)
        graph.add_edge(source, name)
    graph.add_edge(name, item.name)
    item.inputs = [name]


def _bypass(graph: nx.DiGraph, item: Layer) -> None:
    """Removes a one-input layer whose output equals its input, rewiring its readers."""
    (source,) = item.inputs
    for reader in list(graph.successors(item.name)):
        target = layer(graph, reader)
        target.inputs = [source if name == item.name else name for name in target.inputs]
        graph.add_edge(source, reader)
    graph.graph["outputs"] = [source if name == item.name else name for name in graph.graph["outputs"]]
    graph.graph.setdefault("removed", {})[item.name] = source
    graph.remove_node(item.name)
