"""Which layers train as one kernel: the groups the triton backend's training step runs.

Training needs what inference may drop: a conv's output before LRN and pooling (the ReLU mask and the LRN's
backward read it), batch norm on the batch's statistics, dropout's masks. So the groups are fewer than
inference's steps (`fuse`), each one forward kernel with a backward of netdsl's own
(netdsl.runtime.kernel_ops):

    conv [+ relu | leaky_relu]        the activation's mask applied inside the backward kernels
    fc [+ relu | leaky_relu]          likewise
    [relu +] lrn + maxpool            the forward saves the argmax and the LRN scale for a gather backward
    maxpool, avgpool                  max pooling saves each window's argmax; backward gathers over windows
    relu, leaky_relu                  on their own: the mask from the saved output
    batchnorm, dropout                batch statistics; a counter-based mask regenerated in backward

The rest (an LRN alone, global_avgpool, concat, add, flatten, a softmax before the loss) runs as PyTorch
runs it (`reference`): copies and sums whose backward is a view or the identity. A layer joins the group
of the one before only if it is that layer's only reader, on its device, and not a net output, as in
`fuse`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from netdsl.codegen.limits import MAX_WINDOW_TAPS
from netdsl.ir import Layer, layer

ACTIVATIONS = ("relu", "leaky_relu")
RECOMPUTE = ("none", "cheap", "all")  # which runs of groups the backward pass computes again (`recompute_runs`)
WEIGHTED = ("conv", "fc")  # what "cheap" does not run twice, and where "all" starts a run


@dataclass(frozen=True)
class Group:
    kind: str  # conv2d, linear, lrn_maxpool, pool, activation, batch_norm, dropout, reference
    layers: tuple[Layer, ...]  # the layers it computes, in order; the last one's output is the group's
    options: dict = field(default_factory=dict)  # activation, slope, relu_first

    @property
    def first(self) -> Layer:
        return self.layers[0]

    @property
    def last(self) -> Layer:
        return self.layers[-1]


def training_groups(graph: nx.DiGraph, computed: list[Layer]) -> list[Group]:
    """The layers of `computed` (in order, inputs left out) grouped into training kernels."""
    groups: list[Group] = []
    claimed: set[str] = set()
    for item in computed:
        if item.name in claimed:
            continue
        group = _match(graph, item)
        claimed.update(member.name for member in group.layers)
        groups.append(group)
    return groups


def recompute_runs(graph: nx.DiGraph, groups: list[Group], recompute: str) -> list[tuple[int, ...]]:
    """The groups (by index) as runs: a group joins the run of the one before when it reads only that one's
    output, which nothing else reads (on the same device, neither a net output), and it is no conv or fc: with
    "all", a conv or fc and the layers after it (a chain, as a .net file writes one); with "cheap", the
    layers after it, the conv or fc a run of its own; with "none", a run per group. A run of two or more keeps
    only its input for the backward pass, which computes the run again (torch.utils.checkpoint in
    netdsl.runtime.module; netdsl.compiler.train_memory plans it); a run of one is never recomputed."""
    runs: list[list[int]] = []
    outputs = set(graph.graph["outputs"])
    for index, group in enumerate(groups):
        item = group.first
        previous = groups[index - 1] if index else None
        joins = (
            recompute != "none"
            and previous is not None
            and item.inputs == [previous.last.name]
            and item.device == previous.last.device
            and not outputs.intersection((previous.last.name, item.name))
            and graph.out_degree(previous.last.name) == 1
            and item.op not in WEIGHTED
            and not (recompute == "cheap" and previous.first.op in WEIGHTED)
        )
        if joins:
            runs[-1].append(index)
        else:
            runs.append([index])
    return [tuple(run) for run in runs]


def _match(graph: nx.DiGraph, item: Layer) -> Group:
    if item.op in ("conv", "fc"):
        kind = "conv2d" if item.op == "conv" else "linear"
        act = _only_reader(graph, item, ACTIVATIONS)
        if act is None:
            return Group(kind, (item,), {"activation": "none", "slope": 0.0})
        return Group(kind, (item, act), {"activation": act.op, "slope": float(act.params.get("slope", 0.0))})
    if item.op == "relu":
        norm = _only_reader(graph, item, ("lrn",))
        pool = norm and _only_reader(graph, norm, ("maxpool",))
        if pool is not None and _poolable(pool):
            return Group("lrn_maxpool", (item, norm, pool), {"relu_first": True})
    if item.op == "lrn":
        pool = _only_reader(graph, item, ("maxpool",))
        if pool is not None and _poolable(pool):
            return Group("lrn_maxpool", (item, pool), {"relu_first": False})
    if item.op == "avgpool" or (item.op == "maxpool" and _window_fits(item)):
        return Group("pool", (item,))
    if item.op in ACTIVATIONS and float(item.params.get("slope", 0.0)) >= 0:
        return Group("activation", (item,))
    if item.op in ("batchnorm", "dropout"):
        return Group("batch_norm" if item.op == "batchnorm" else "dropout", (item,))
    return Group("reference", (item,))


def _poolable(pool: Layer) -> bool:
    """The fused LRN + max-pool kernel takes no dilation, and a window whose winner's offset fits its int8."""
    return tuple(pool.params.get("dilation", (1, 1))) == (1, 1) and _window_fits(pool)


def _window_fits(pool: Layer) -> bool:
    """The training max-pool kernels save the winner's offset in its window as int8; a larger window runs PyTorch's."""
    height, width = pool.params["size"]
    return height * width <= MAX_WINDOW_TAPS


def _only_reader(graph: nx.DiGraph, item: Layer, ops: tuple[str, ...]) -> Layer | None:
    readers = [layer(graph, name) for name in graph.successors(item.name)]
    if len(readers) != 1 or item.name in graph.graph["outputs"]:
        return None
    (reader,) = readers
    if reader.op not in ops or reader.device != item.device or reader.inputs != [item.name]:
        return None
    return reader
