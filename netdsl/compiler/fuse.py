"""Fusion: groups of layers that run as one kernel.

Each rule is a pattern (which layers, in which order) plus a legality check (an intermediate result
may be dropped only if nothing else reads it, it is not a net output, and every layer of the group
runs on one device). Emission is elsewhere: this pass only decides the groups.

Rules, tried in order at each layer that no group has claimed yet:
- conv + activation, fc + activation: the activation becomes the kernel's epilogue
  (bias is always part of a conv or fc kernel);
- [relu] + lrn + maxpool (without dilation): the normalized map never goes to memory; lrn alone otherwise;
- a concat read only by convs/fcs on its own device disappears: the readers take its inputs directly;
- flatten is free (a view of its input); everything else is a kernel of its own.
"""

from __future__ import annotations

import networkx as nx

from netdsl.codegen.limits import MAX_CHANNELS_PER_GROUP, MAX_NCHW_FILTER_TAPS
from netdsl.compiler.cost import stage_fusion_wins
from netdsl.compiler.steps import Step, identifier, unique_name
from netdsl.ir import Layer, layer, layers

ACTIVATIONS = {"relu", "leaky_relu"}
MULTI_INPUT_READERS = {"conv", "fc"}  # kernels that read up to two inputs without a copy
MAX_DIRECT_INPUTS = 2


def fuse(graph: nx.DiGraph, batch: int = 1, dtype: str = "fp32") -> nx.DiGraph:
    """Layer graph -> step graph (nodes keyed by step name, attribute `step`)."""
    claimed: dict[str, str] = {}  # layer name -> step name whose output it is (or that computes it)
    steps: list[Step] = []
    names: set[str] = set()
    for item in layers(graph):
        if item.name in claimed:
            continue
        group, kind, options = _match(graph, item, batch, dtype)
        step = Step(_step_name(group, kind, options, names), kind, group, [], item.device, group[-1].shape, options)
        for member in group:
            claimed[member.name] = step.name
        steps.append(step)
    _skip_concats(graph, steps, claimed)
    program = nx.DiGraph()
    program.graph.update(graph.graph)
    program.graph["outputs"] = [claimed[name] for name in graph.graph["outputs"]]
    program.graph["inputs"] = [claimed[name] for name in graph.graph["inputs"]]
    for step in steps:
        if not step.inputs:
            step.inputs = [claimed[name] for name in step.first.inputs]
        program.add_node(step.name, step=step)
        for source in step.inputs:
            program.add_edge(source, step.name)
    return program


def _readers(graph: nx.DiGraph, item: Layer) -> list[Layer]:
    return [layer(graph, name) for name in graph.successors(item.name)]


def _only_reader(graph: nx.DiGraph, item: Layer, op: set[str]) -> Layer | None:
    """The single layer reading `item`, if it has one of the kinds `op`, and fusing drops nothing."""
    readers = _readers(graph, item)
    if len(readers) != 1 or item.name in graph.graph["outputs"]:
        return None
    (reader,) = readers
    if reader.op not in op or reader.device != item.device or reader.inputs != [item.name]:
        return None
    return reader


def _fusable_pool(graph: nx.DiGraph, norm: Layer) -> Layer | None:
    """The max-pool reading only `norm`, if the fused LRN + max-pool kernels can run it (they take no dilation)."""
    pool = _only_reader(graph, norm, {"maxpool"})
    return pool if pool is not None and pool.params["dilation"] == (1, 1) else None


def _stage(graph: nx.DiGraph, conv: Layer) -> list[Layer] | None:
    """conv -> relu -> lrn -> maxpool, each the only reader of the one before, on one device, with every
    channel of a conv group in one tile, the LRN normalizing exactly the conv's groups, and a filter the
    stage's tap mask holds."""
    relu = _only_reader(graph, conv, {"relu"})
    norm = relu and _only_reader(graph, relu, {"lrn"})
    pool = norm and _fusable_pool(graph, norm)
    if pool is None or len(conv.inputs) != 1:
        return None
    groups = conv.params["groups"]
    if conv.params["filters"] // groups > MAX_CHANNELS_PER_GROUP or norm.params["groups"] != groups:
        return None
    if sum(conv.params["size"]) > MAX_NCHW_FILTER_TAPS:
        return None
    return [conv, relu, norm, pool]


def _match(graph: nx.DiGraph, item: Layer, batch: int, dtype: str) -> tuple[list[Layer], str, dict]:
    if item.op == "conv":
        stage = _stage(graph, item)
        if stage is not None and stage_fusion_wins(stage, batch, dtype):  # the cost model decides
            folded = bool(item.fields.get("folded"))
            return stage, "conv_lrn_maxpool", {"bias": item.params["bias"] or folded, "folded": folded}
    if item.op in ("conv", "fc"):
        folded = bool(item.fields.get("folded"))  # a batch norm folded in brings a bias of its own
        group, options = [item], {"bias": item.params["bias"] or folded, "folded": folded, "activation": "none"}
        act = _only_reader(graph, item, ACTIVATIONS)
        if act is not None:
            group.append(act)
            options["activation"] = act.op
            options["slope"] = act.params.get("slope", 0.0)
        return group, item.op, options
    if item.op == "relu":
        norm = _only_reader(graph, item, {"lrn"})
        if norm is not None:
            group, kind, options = _match(graph, norm, batch, dtype)
            return [item, *group], kind, {**options, "relu_first": True}
    if item.op == "lrn":
        pool = _fusable_pool(graph, item)
        if pool is not None:
            return [item, pool], "lrn_maxpool", {"relu_first": False}
        return [item], "lrn", {"relu_first": False}
    if item.op in ("maxpool", "avgpool", "global_avgpool"):
        return [item], "pool", {}
    if item.op == "flatten":
        return [item], "view", {}
    if item.op in ("relu", "leaky_relu", "batchnorm"):
        return [item], "eltwise", {}
    return [item], item.op, {}  # input, softmax, add, concat


def _skip_concats(graph: nx.DiGraph, steps: list[Step], claimed: dict[str, str]) -> None:
    """A concat whose readers can all take its inputs directly costs no kernel and no copy."""
    by_name = {step.name: step for step in steps}
    for step in list(steps):
        if step.kind != "concat":
            continue
        concat = step.first
        readers = _readers(graph, concat)
        direct = (
            readers
            and concat.name not in graph.graph["outputs"]
            and len(concat.inputs) <= MAX_DIRECT_INPUTS
            and all(
                r.op in MULTI_INPUT_READERS and r.inputs == [concat.name] and r.device == concat.device for r in readers
            )
        )
        if not direct:
            continue
        sources = [claimed[name] for name in concat.inputs]
        for reader in readers:
            by_name[claimed[reader.name]].inputs = list(sources)
        steps.remove(step)
        del by_name[step.name]
        claimed[concat.name] = sources[0]  # nothing reads the concat any more


def _step_name(group: list[Layer], kind: str, options: dict, taken: set[str]) -> str:
    """`conv2_gpu1_conv_bias_relu`: the first layer's name and device, then what the kernel does."""
    base = group[0].name.split("@")[0]
    what = [member.op for member in group]
    if kind in ("conv", "fc", "conv_lrn_maxpool"):
        what = [
            "conv" if kind == "conv_lrn_maxpool" else kind,
            *(["bn"] if options.get("folded") else []),
            *(["bias"] if options.get("bias") else []),
        ]
        what += [m.op for m in group[1:]]
    return unique_name(identifier(f"{base}_{group[0].device}_{'_'.join(what)}"), taken)
