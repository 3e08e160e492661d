"""The compiler's pass pipeline: one list of named passes, each a small function of the graph.

    validate -> shapes -> limits -> fold -> merge_towers -> fuse -> place -> space_to_depth -> layout -> split_k
    -> plan_memory

Up to `fold` the graph holds layers (`netdsl.ir.Layer`); from `fuse` on it holds steps
(`netdsl.compiler.fuse.Step`), each one kernel launch, view or transfer. `dump(graph)` prints either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import networkx as nx

from netdsl.codegen.limits import MAX_NCHW_FILTER_TAPS
from netdsl.compiler.fold import fold_inference
from netdsl.compiler.fuse import fuse
from netdsl.compiler.layout import choose_layouts
from netdsl.compiler.memory import plan_memory
from netdsl.compiler.merge_towers import merge_towers
from netdsl.compiler.place import place
from netdsl.compiler.space_to_depth import lower_space_to_depth
from netdsl.errors import NetError
from netdsl.ir import copy_graph, layers
from netdsl.ir.limits import check_memory
from netdsl.ir.ops import describe_params
from netdsl.ir.shapes import infer_shapes


@dataclass(frozen=True)
class Options:
    batch: int = 1
    dtype: str = "fp32"
    memory_limit: int | None = None
    layout: str = "auto"  # "auto": channels-last where convs gain from it (netdsl.compiler.layout); "nchw": never
    precision: str | None = None  # fp32 products: "ieee" or "tf32x3" (None: the default, netdsl.ir.dtypes)
    space_to_depth: bool = False  # strided convs over few channels as stride-1 convs over pixel blocks
    merge_towers: bool = False  # a towers block's copies of a layer as one grouped layer on the first tower's device
    split_k: bool = False  # channels-last convs whose tiles are too few to fill the GPU share each tile's taps
    tuning: str | None = None  # a tuning file of `netdsl tune`: the tiles each kernel takes (netdsl.compiler.tuning)
    recompute: str = "none"  # a training step's runs of layers computed again in its backward pass (training.RECOMPUTE)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[nx.DiGraph, Options], nx.DiGraph]
    doc: str


def validate(graph: nx.DiGraph, options: Options) -> nx.DiGraph:
    """Structural invariants the builder guarantees; a failure here is a compiler bug, not a user error."""
    if not nx.is_directed_acyclic_graph(graph):
        raise AssertionError("the layer graph has a cycle")
    for name in graph.graph["outputs"] + graph.graph["inputs"]:
        if name not in graph:
            raise AssertionError(f"unknown input or output {name!r}")
    for name in graph.nodes:
        for source in graph.nodes[name]["layer"].inputs:
            if not graph.has_edge(source, name):
                raise AssertionError(f"{name!r} reads {source!r} without an edge")
    return graph


def _limits(graph: nx.DiGraph, options: Options) -> nx.DiGraph:
    check_memory(graph, options.batch, options.dtype, options.memory_limit)
    return graph


def check_nchw_taps(program: nx.DiGraph) -> None:
    """A conv left on the NCHW kernel (fewer than 16 input channels per group, or the nchw layout) takes
    filters of KH + KW <= 31 (the fused conv + LRN + max-pool stage is never chosen for larger ones): a larger
    one is an error at the layer when its kernels are built, not at their launch (PyTorch's reference, the
    torch backend, takes any size)."""
    for name in program.nodes:
        step = program.nodes[name]["step"]
        if step.kind != "conv" or step.options.get("kernel") == "nhwc":
            continue
        conv = step.first
        kh, kw = conv.params["size"]
        if kh + kw > MAX_NCHW_FILTER_TAPS:
            raise NetError(
                f"a {kh} x {kw} filter is too large for the NCHW conv kernel, which takes height + width <= "
                f"{MAX_NCHW_FILTER_TAPS}",
                conv.span,
                hint="a conv with 16 or more input channels per group runs channels-last (the default layout), "
                "which takes any size; or use a smaller filter",
            )


def check_options(options: Options, where: dict[str, str] | None = None) -> None:
    """Options that contradict each other are a NetError naming the option (`where`: its name for the caller,
    such as its flag). Space-to-depth lowers a conv to run channels-last, which `layout="nchw"` forbids."""
    if options.space_to_depth and options.layout == "nchw":
        raise NetError(
            "space-to-depth runs the lowered conv channels-last, and the nchw layout keeps every map NCHW",
            where=(where or {}).get("space_to_depth", "space_to_depth"),
            hint="leave out one of the two",
        )


def _space_to_depth(graph: nx.DiGraph, options: Options) -> nx.DiGraph:
    """Only when asked (and not with the nchw layout: `check_options`)."""
    return lower_space_to_depth(graph) if options.space_to_depth else graph


def _merge_towers(graph: nx.DiGraph, options: Options) -> nx.DiGraph:
    """Only when asked: for towers that share one GPU."""
    return merge_towers(graph) if options.merge_towers else graph


def _split_k(graph: nx.DiGraph, options: Options) -> nx.DiGraph:
    """Only when asked: each channels-last conv may share a tile's taps among programs when its tiles are too few
    to fill the GPU (at launch, by the batch: `codegen/conv_nhwc.split_taps`)."""
    if not options.split_k:
        return graph
    graph = copy_graph(graph)
    for name in graph.nodes:
        step = graph.nodes[name]["step"]
        if step.kind == "conv" and step.options.get("kernel") == "nhwc":
            graph.nodes[name]["step"] = replace(step, options={**step.options, "split_k": True})
    return graph


PIPELINE: list[Pass] = [
    Pass("validate", validate, "check the graph's structure"),
    Pass("shapes", lambda g, o: infer_shapes(g), "infer every layer's output shape"),
    Pass("limits", _limits, "check each device's memory limit"),
    Pass("fold", lambda g, o: fold_inference(g), "drop dropout, fold batch norms and shuffles into convs, fcs"),
    Pass("merge_towers", _merge_towers, "each layer's tower copies as one grouped layer (towers on one GPU)"),
    Pass("fuse", lambda g, o: fuse(g, o.batch, o.dtype), "group layers into kernels (the cost model picks some)"),
    Pass("place", lambda g, o: place(g), "partition by device, insert transfers"),
    Pass("space_to_depth", _space_to_depth, "strided convs over few channels as stride-1 convs over pixel blocks"),
    Pass("layout", lambda g, o: choose_layouts(g, o.layout), "choose NCHW or channels-last for every map"),
    Pass("split_k", _split_k, "let channels-last convs split their taps over programs where tiles are few"),
    Pass("plan_memory", lambda g, o: plan_memory(g), "assign buffer offsets with reuse"),
]
PASS_NAMES = [p.name for p in PIPELINE]


def run_passes(graph: nx.DiGraph, options: Options) -> dict[str, nx.DiGraph]:
    """Runs every pass; returns the graph after each, by pass name. A pass never changes the graph it
    is given (it returns a new one), so each graph is as its pass left it."""
    check_options(options)
    after = {}
    for step in PIPELINE:
        graph = after[step.name] = step.run(graph, options)
    return after


def run_pipeline(graph: nx.DiGraph, options: Options, dump_after: str | None = None) -> tuple[nx.DiGraph, str]:
    """Runs every pass; returns the final graph and, if asked, the dump after the pass `dump_after`."""
    check_pass_name(dump_after)
    after = run_passes(graph, options)
    return after[PASS_NAMES[-1]], dump(after[dump_after]) if dump_after else ""


def check_pass_name(name: str | None) -> None:
    if name is not None and name not in PASS_NAMES:
        raise NetError(f"unknown pass `{name}`", where="--dump-after", hint=f"passes: {', '.join(PASS_NAMES)}")


def dump(graph: nx.DiGraph) -> str:
    """A readable listing of a layer graph or a step graph; once memory is planned, each step's buffer
    (offset and size in elements per image, or the buffer it is a view of) and each device's arena."""
    lines = [f"# net {graph.graph['name']}"]
    if any("step" in data for _, data in graph.nodes(data=True)):
        order = graph.graph.get("partitions") or {"": list(nx.topological_sort(graph))}
        buffers = graph.graph.get("buffers")
        if buffers is not None:
            lines.append("# buffers and arenas in elements per image")
        for device, names in order.items():
            if device:
                lines.append(f"device {device}:")
            for name in names:
                step = graph.nodes[name]["step"]
                covered = ", ".join(item.name for item in step.layers)
                shape = " x ".join(map(str, step.shape))
                layout = " nhwc" if step.layout == "nhwc" else ""
                inputs = ", ".join(step.inputs)
                line = f"  {name} = {step.kind}({inputs})  [{covered}]  -> {shape}{layout} @{step.device}"
                if buffers is not None:
                    buffer = buffers.get(name)
                    view = graph.graph["views"].get(name)
                    line += f"  buffer offset {buffer.offset} size {buffer.size}" if buffer else f"  view of {view}"
                lines.append(line)
            if buffers is not None and device:
                peak, naive = graph.graph["arena"][device], graph.graph["arena_without_reuse"][device]
                lines.append(f"  arena {device}: peak {peak} with reuse, {naive} without reuse")
        return "\n".join(lines) + "\n"
    for item in layers(graph):
        shape = " x ".join(map(str, item.shape)) if item.shape else "?"
        params = describe_params(item)
        lines.append(
            f"  {item.name} = {item.op}({', '.join(item.inputs)}{', ' if params and item.inputs else ''}"
            f"{params})  -> {shape} @{item.device}"
        )
    return "\n".join(lines) + "\n"
