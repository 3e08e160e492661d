"""The intermediate representation: a `networkx.DiGraph` whose nodes are layers.

Each node's key is the layer's unique name and its `layer` attribute a `Layer` record. An edge u -> v
means v reads u's output; `Layer.inputs` keeps the order (and multiplicity) of a layer's inputs.
Graph-wide facts live in `graph.graph`: the net's `name`, its `inputs` and `outputs` (layer names),
and its `devices` (name -> `Device`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from netdsl.errors import Frame, Span

Shape = tuple[int, ...]


@dataclass
class Layer:
    """One layer of the net, as the compiler sees it."""

    name: str  # unique: block prefix, name, repeat index, chain part and tower, e.g. "conv1.relu@gpu0"
    op: str  # a key of netdsl.ir.ops.OPS, or "input"
    params: dict[str, object]
    inputs: list[str]  # names of the layers read, in order; several inputs of a one-input op are joined
    device: str
    span: Span
    order: int  # definition order, for stable listings
    trace: tuple[Frame, ...] = ()  # the block expansions this layer came from, outermost first
    tower: str | None = None
    shape: Shape | None = None  # per-image output shape, filled by shape inference
    input_shape: Shape | None = None  # the (joined) input shape of a one-input op, filled likewise
    fields: dict[str, object] = field(default_factory=dict)  # room for later passes


@dataclass(frozen=True)
class Device:
    name: str
    memory: int | None = None  # bytes, when the net states a limit
    span: Span | None = None


def layer(graph: nx.DiGraph, name: str) -> Layer:
    return graph.nodes[name]["layer"]


def layers(graph: nx.DiGraph) -> list[Layer]:
    """All layers in a topological order that follows the source where it can."""
    order = nx.lexicographical_topological_sort(graph, key=lambda n: graph.nodes[n]["layer"].order)
    return [graph.nodes[n]["layer"] for n in order]
