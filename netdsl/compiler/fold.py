"""Inference-only simplifications of the layer graph.

- dropout is the identity at inference: it disappears and its readers read its input;
- batch norm right after a conv (the conv's only reader, on the same device) folds into the conv's
  weights and bias: the conv records which batch norm it absorbed (`Layer.fields["folded"]`) and the
  weights are folded when they are loaded.
"""

from __future__ import annotations

import networkx as nx

from netdsl.ir import Layer, copy_graph, layer, layers


def fold_inference(graph: nx.DiGraph) -> nx.DiGraph:
    graph = copy_graph(graph)
    for item in layers(graph):
        if item.op == "dropout" and len(item.inputs) > 1:  # what remains is the joining of its inputs
            item.op, item.params = "concat", {}
        elif item.op == "dropout" or (item.op == "batchnorm" and _folds_into_conv(graph, item)):
            if item.op == "batchnorm":
                layer(graph, item.inputs[0]).fields.setdefault("folded", []).append(item.name)
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
