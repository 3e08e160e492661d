"""The `merge_towers` pass (issue 13): a `towers` block's copies of each layer as one grouped layer on one device.

A `towers gpu0, gpu1 { ... }` block puts a copy of each of its layers on each device, as the paper split AlexNet
over two GPUs. When both towers run on one GPU, the copies are twice the launches of half the size, and every `all`
(conv3, fc6, fc7 read both towers' maps) copies a map from one partition's arena into the other's. This pass
rewrites the towers as the one-device net that computes the same thing (`nets/alexnet_1gpu.net`, Caffe's
bvlc_alexnet): the copies of a layer, `conv2@gpu0` and `conv2@gpu1`, become one layer `conv2` whose output is their
outputs joined on channels in tower order, on the first tower's device:

- a copy that reads its own tower's copy of a merged layer (`conv(conv1, ...)` in the block) reads the merged
  layer instead, with its channel groups multiplied by the number of towers: a conv's `groups` (and its
  filters), an LRN's `groups` (each tower's channels normalized apart, as each GPU did); ReLU, pooling, batch
  norm, flatten and an `add` of own-tower maps work channel by channel and need nothing more;
- a conv with one group or an fc whose copies all read the same thing (`all conv2`, the net's `image`) reads
  it once and has the towers' filters (units) one after the other: the merged conv's filters, the towers'
  weights joined on their first axis, which the runtime does when it loads them (`Layer.fields["merged"]` names
  the copies, in tower order);
- a layer outside the block that reads every tower's copy in tower order (`fc8 = fc(all fc7, ...)`) reads the
  merged layer.

The copies read and are read in no other way in the nets this is for; when any copy does (an fc of its own
tower's map, a concat, a net output that is one tower's copy, a reader of one tower's copy from outside the
block), the pass leaves the graph as it is and says why in `graph.graph["merge_towers"]`, which the report shows.
It runs after `fold` (dropout gone, batch norms folded into their convs: the folded weights are joined) and only
with `Options.merge_towers` (`--merge-towers`): whether one grouped launch beats two streams of half launches on
one GPU is for bench/gpu_session.sh to measure (`netdsl-grouped` rows of bench/alexnet_gpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx

from netdsl.compiler.steps import unique_name
from netdsl.ir import Layer, copy_graph, layer, layers
from netdsl.ir.shapes import infer_shapes

# One-input ops that work channel by channel: a copy reading its own tower's map merges as is.
CHANNELWISE = frozenset(
    {"relu", "leaky_relu", "maxpool", "avgpool", "global_avgpool", "dropout", "batchnorm", "flatten"}
)
# One-input ops whose channel groups multiply with the towers: (op, parameter).
GROUPED = {"conv": "groups", "lrn": "groups"}
# Ops whose copies may read one shared input (filters or units side by side): (op, parameter multiplied).
SIDE_BY_SIDE = {"conv": "filters", "fc": "units"}


@dataclass(frozen=True)
class Towers:
    """The copies of one layer of a `towers` block, in tower order."""

    base: str  # the layer's name without the tower, e.g. "conv2.relu"
    members: tuple[str, ...]


def tower_sets(graph: nx.DiGraph) -> list[Towers]:
    """Every layer of a `towers` block with its copies, in the order of the net (each set ordered by tower)."""
    found: dict[str, list[Layer]] = {}
    for item in layers(graph):
        if item.tower is not None and item.name.endswith(f"@{item.tower}"):
            found.setdefault(item.name.removesuffix(f"@{item.tower}"), []).append(item)
    return [
        Towers(base, tuple(m.name for m in sorted(members, key=lambda m: m.order)))
        for base, members in found.items()
        if len(members) > 1
    ]


def merge_towers(graph: nx.DiGraph) -> nx.DiGraph:
    """The graph with every tower set merged (see the module's doc), or, when one cannot be, the graph as it was
    with the reason in `graph.graph["merge_towers"]`."""
    sets = tower_sets(graph)
    if not sets:
        return _unchanged(graph, "the net has no towers")
    merging = _Merging(graph, sets)
    new_layers: list[Layer] = []
    for index in range(len(sets)):
        merged, why = merging.merged_layer(index)
        if merged is None:
            return _unchanged(graph, why)
        new_layers.append(merged)
    for name in graph.graph["outputs"]:
        if name in merging.set_of:
            return _unchanged(graph, f"the net's output `{name}` is one tower's copy")
    readers: dict[str, list[str]] = {}
    for item in layers(graph):
        if item.name in merging.set_of:
            continue
        inputs = merging.translated(item.inputs)
        if inputs is None:
            return _unchanged(graph, f"`{item.name}` reads the towers' copies other than all of them in tower order")
        readers[item.name] = inputs

    result = copy_graph(graph)
    result.remove_nodes_from(list(merging.set_of))
    for merged in new_layers:
        result.add_node(merged.name, layer=merged)
    for name, inputs in readers.items():
        layer(result, name).inputs = inputs
    for item in [*new_layers, *(layer(result, name) for name in readers)]:
        for source in item.inputs:
            result.add_edge(source, item.name)
    result.graph["merge_towers"] = f"merged {len(sets)} layers of {len(sets[0].members)} towers"
    return infer_shapes(result)


class _Merging:
    """The tower sets of a graph, the name each merged layer takes, and how a layer's inputs read them."""

    def __init__(self, graph: nx.DiGraph, sets: list[Towers]) -> None:
        self.graph = graph
        self.sets = sets
        self.set_of = {member: index for index, towers in enumerate(sets) for member in towers.members}
        taken = set(graph.nodes)
        self.names = [unique_name(towers.base, taken) for towers in sets]

    def translated(self, inputs: list[str]) -> list[str] | None:
        """`inputs` with each run of every copy of a set, in tower order, replaced by the merged layer; None
        where a copy is read otherwise."""
        result, i = [], 0
        while i < len(inputs):
            index = self.set_of.get(inputs[i])
            if index is None:
                result.append(inputs[i])
                i += 1
                continue
            members = self.sets[index].members
            if tuple(inputs[i : i + len(members)]) != members:
                return None
            result.append(self.names[index])
            i += len(members)
        return result

    def own_inputs(self, copy: Layer, position: int) -> list[int] | None:
        """The sets whose copy at tower `position` the copy reads, one per input; None if it reads anything else."""
        found = []
        for source in copy.inputs:
            index = self.set_of.get(source)
            if index is None or self.sets[index].members.index(source) != position:
                return None
            found.append(index)
        return found

    def merged_layer(self, index: int) -> tuple[Layer | None, str]:
        """Set `index` as one layer, or None and why it cannot be."""
        towers = self.sets[index]
        copies = [layer(self.graph, member) for member in towers.members]
        first, count = copies[0], len(copies)
        label = f"`{first.name}`"
        if any(c.op != first.op or c.params != first.params for c in copies):
            return None, f"the copies of {label} differ in their parameters"
        params = dict(first.params)
        own = [self.own_inputs(c, position) for position, c in enumerate(copies)]
        if all(inputs is not None for inputs in own):  # each copy reads its own tower's copies
            if len(first.inputs) != 1 and first.op != "add":
                return None, f"{label} joins several maps of its tower (their channels would interleave)"
            if first.op in GROUPED:
                params[GROUPED[first.op]] = params[GROUPED[first.op]] * count
                if first.op == "conv":
                    params["filters"] = params["filters"] * count
            elif first.op not in CHANNELWISE and first.op != "add":
                return None, f"{label} is a {first.op}, which does not work channel by channel"
            inputs = [self.names[source] for source in own[0]]
        elif all(c.inputs == first.inputs for c in copies):  # each copy reads the same maps
            inputs = self.translated(first.inputs)
            if inputs is None:
                return None, f"{label} reads the towers' copies other than all of them in tower order"
            if first.op not in SIDE_BY_SIDE or params.get("groups", 1) != 1:
                return None, f"every copy of {label} reads the same input, which only a conv of one group or an fc can"
            params[SIDE_BY_SIDE[first.op]] = params[SIDE_BY_SIDE[first.op]] * count
        else:
            return None, f"the copies of {label} read different layers"
        fields: dict[str, object] = {"merged": list(towers.members)}
        folded = [norm for c in copies for norm in c.fields.get("folded", [])]
        if folded:
            fields["folded"] = folded
        merged = replace(first, name=self.names[index], params=params, inputs=inputs, tower=None, shape=None,
                         input_shape=None, fields=fields)  # fmt: skip
        return merged, ""


def _unchanged(graph: nx.DiGraph, why: str) -> nx.DiGraph:
    result = copy_graph(graph)
    result.graph["merge_towers"] = f"not merged: {why}"
    return result
