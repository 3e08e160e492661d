"""The intermediate representation every stage shares: the layer graph (`graph.py`), the registry of
layer kinds (`ops.py`), and what can be computed from a graph alone: shapes, counts, memory limits."""

from netdsl.ir.graph import Device, Layer, Setting, Shape, copy_graph, layer, layers

__all__ = ["Device", "Layer", "Setting", "Shape", "copy_graph", "layer", "layers"]
