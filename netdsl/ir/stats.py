"""What a net costs: parameters, multiply-accumulates, neurons and activation sizes, per layer and device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from netdsl.ir import Layer, layers
from netdsl.ir.ops import NEURON_OPS, OPS


@dataclass(frozen=True)
class LayerStats:
    params: int  # learned values (weights and biases)
    buffers: int  # stored but not learned (batch norm's running statistics)
    macs: int  # multiply-accumulates per image
    neurons: int  # output values per image of a layer with weights (the paper's "neurons")
    activations: int  # output values per image


@dataclass
class Totals:
    params: int = 0
    buffers: int = 0
    macs: int = 0
    neurons: int = 0
    activations: int = 0

    def add(self, stats: LayerStats) -> None:
        self.params += stats.params
        self.buffers += stats.buffers
        self.macs += stats.macs
        self.neurons += stats.neurons
        self.activations += stats.activations


def layer_stats(layer: Layer) -> LayerStats:
    size = math.prod(layer.shape)
    if layer.op == "input":
        return LayerStats(0, 0, 0, 0, size)
    spec = OPS[layer.op]
    x = layer.input_shape
    params = sum(math.prod(s) for s in spec.weights(layer.params, x).values()) if x else 0
    buffers = sum(math.prod(s) for s in spec.buffers(layer.params, x).values()) if x else 0
    macs = spec.macs(layer.params, x, layer.shape) if x else 0
    return LayerStats(params, buffers, macs, size if layer.op in NEURON_OPS else 0, size)


def totals(graph: nx.DiGraph) -> tuple[Totals, dict[str, Totals]]:
    """Totals over the whole net and per device."""
    overall = Totals()
    per_device: dict[str, Totals] = {name: Totals() for name in graph.graph["devices"]}
    for layer in layers(graph):
        stats = layer_stats(layer)
        overall.add(stats)
        per_device[layer.device].add(stats)
    return overall, per_device
