"""The intermediate representation: a `networkx.DiGraph` whose nodes are layers.

Each node's key is the layer's unique name and its `layer` attribute a `Layer` record. An edge u -> v
means v reads u's output; `Layer.inputs` keeps the order (and multiplicity) of a layer's inputs.
Graph-wide facts live in `graph.graph`: the net's `name`, its `inputs` and `outputs` (layer names),
its `devices` (name -> `Device`) and its `recipe`: the `Setting`s of its `train` blocks, in the order
they are written.
"""

from __future__ import annotations

import os
from copy import copy
from dataclasses import dataclass, field, replace

import networkx as nx

from netdsl.errors import Frame, NetError, Span

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


@dataclass(frozen=True)
class Setting:
    """One `NAME ["PATTERN"] = VALUE` of a `train` block, its value evaluated. The front end does not
    know what a setting means; `netdsl.train.recipe` checks and applies them."""

    name: str
    pattern: str | None  # a glob over weight names (`lr_mult "*.bias" = 2`), or None
    value: bool | int | float | str | tuple[int | float, ...]
    span: Span  # the whole item; it starts at the name
    value_span: Span
    pattern_span: Span | None = None
    word: bool = False  # the value was a bare word (`optimizer = sgd`), not a quoted string


def require_graph(value: object, where: str = "graph") -> nx.DiGraph:
    """`value` when it is a net's layer graph (as `netdsl.load_graph` returns it); a NetError saying what to
    pass otherwise (a path is the likely mistake: `netdsl.load` takes one, the functions on graphs do not)."""
    if isinstance(value, nx.DiGraph) and "outputs" in value.graph and "devices" in value.graph:
        return value
    got = f"the path `{os.fspath(value)}`" if isinstance(value, str | os.PathLike) else f"a {type(value).__name__}"
    raise NetError(
        f"expected a net's layer graph, got {got}", where=where, hint="read the net first: netdsl.load_graph(path)"
    )


def output_names(graph: nx.DiGraph) -> dict[str, str]:
    """Each output layer -> the name a run's outputs go by: the one its `output` statement wrote (`a` for a
    chain `a = conv(...) | relu`), or the layer's own."""
    outputs = graph.graph["outputs"]
    names = graph.graph.get("output_names", outputs)
    return dict(zip(outputs, names if len(names) == len(outputs) else outputs, strict=True))


def layer(graph: nx.DiGraph, name: str) -> Layer:
    return graph.nodes[name]["layer"]


def layers(graph: nx.DiGraph) -> list[Layer]:
    """All layers in a topological order that follows the source where it can."""
    order = nx.lexicographical_topological_sort(graph, key=lambda n: graph.nodes[n]["layer"].order)
    return [graph.nodes[n]["layer"] for n in order]


def copy_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of a layer graph or a step graph whose records (`layer` or `step` of each node), their
    lists and dicts, and the graph-wide facts can all be changed without touching `graph`.

    The convention of every pass: it never changes the graph it is given, it returns a new one. A pass
    that only annotates starts from this copy; the records a step holds in `Step.layers` are shared
    (no pass after fusion changes a layer). The copy is of the graph's own class, as `DiGraph.copy` makes
    it (a layer graph stays a `netdsl.ir.display.LayerGraph`)."""
    result = graph.__class__()
    result.graph.update({key: copy(value) for key, value in graph.graph.items()})
    for name, data in graph.nodes(data=True):
        result.add_node(name, **{key: _clone(value) for key, value in data.items()})
    result.add_edges_from(graph.edges)
    return result


def _clone(record):
    """A record whose list and dict attributes are copies one level deep (a list inside such a dict too)."""
    changes = {}
    for key, value in vars(record).items():
        if isinstance(value, list):
            changes[key] = list(value)
        elif isinstance(value, dict):
            changes[key] = {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
    return replace(record, **changes)
