"""The `space_to_depth` pass (issue 13): a strided conv over few channels as a stride-1 conv over blocks of pixels,
so that it runs on the channels-last kernel like the convs after it.

`codegen/space_to_depth.py` explains the rewrite and holds its kernel; `space_to_depth_geometry` below works out
its sizes in plain integers (this module, like the other passes, imports neither torch nor Triton). For each conv
step it lowers, the pass adds a `space_to_depth` step before it (whose one layer, `<conv>.space_to_depth`, is the
compiler's own: it has a kernel and a PyTorch reference but is no layer of the language) and gives the conv step
the rewritten conv: the same name, weights, bias, activation and output, a TH x TW filter at stride 1 without
padding over the rearranged map, and `options["space_to_depth"]`, the block, from which the runtime rearranges
the filters when it loads the weights (`space_to_depth_weight`). The `layout` pass then finds a conv with enough
channels and runs it channels-last.

Which convs (`rewrite`): a conv step (not a conv stage fused with its LRN and pooling) that reads one map, without
dilation, whose groups read fewer channels than the channels-last kernel's least K block (`NHWC_MIN_CHANNELS`)
while a block of stride_h x stride_w pixels carries at least that many, and whose zero taps add at most half
again the multiply-adds (`MAX_WORK`). AlexNet's conv1 qualifies: 3 channels, 11 x 11 at stride 4, 48 channels
per block, 1.19 times the multiply-adds.

The pass runs only with `Options.space_to_depth` (`--space-to-depth`) and channels-last layouts: whether conv1 is
faster so than on `conv.py` has yet to be measured on a GPU (bench/gpu_session.sh runs AlexNet both ways).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx

from netdsl.codegen.windows import output_length
from netdsl.compiler.layout import NHWC_MIN_CHANNELS
from netdsl.compiler.place import partitions
from netdsl.compiler.steps import Step, identifier, unique_name
from netdsl.ir import Layer
from netdsl.ir.ops import layer_pads

MAX_WORK = 1.5  # the rewritten conv's multiply-adds over the original's, at most


@dataclass(frozen=True)
class SpaceToDepth:
    """What a conv becomes: its input cut into blocks of `block` (sh, sw) pixels, the first block's corner at
    input pixel (-top, -left) (`pad`), `size` (HB, WB) blocks of `channels` (sh * sw * C) each, read by a
    stride-1 conv with `taps` (TH, TW) taps; `work` is the multiply-adds of that conv over the original's."""

    block: tuple[int, int]
    pad: tuple[int, int]
    taps: tuple[int, int]
    channels: int
    size: tuple[int, int]
    work: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """The rearranged map per image: channels x HB x WB."""
        return (self.channels, *self.size)


def space_to_depth_geometry(
    input_shape: tuple[int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> SpaceToDepth:
    """The rewrite of a conv (dilation 1) over a C x H x W map with a KH x KW filter, `stride` (sh, sw) and padding
    (top, left, bottom, right). Its output keeps the original's size: OH + TH - 1 blocks down, OW + TW - 1 across."""
    channels, height, width = input_shape
    (kh, kw), (sh, sw), (top, left, bottom, right) = kernel, stride, pads
    out_h, out_w = output_length(height, kh, sh, top, bottom), output_length(width, kw, sw, left, right)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"the conv has no output: input {height} x {width}, kernel {kh} x {kw}")
    taps = (-(-kh // sh), -(-kw // sw))
    return SpaceToDepth(
        block=(sh, sw),
        pad=(top, left),
        taps=taps,
        channels=channels * sh * sw,
        size=(out_h + taps[0] - 1, out_w + taps[1] - 1),
        work=taps[0] * sh * taps[1] * sw / (kh * kw),
    )


def rewrite(program: nx.DiGraph, step: Step) -> SpaceToDepth | None:
    """The rewrite of a conv step, or None when the step is not one the pass lowers."""
    if step.kind != "conv" or len(step.inputs) != 1:
        return None
    conv = step.first
    p = conv.params
    channels = program.nodes[step.inputs[0]]["step"].shape[0]
    (sh, sw), groups = p["stride"], p["groups"]
    few = channels // groups < NHWC_MIN_CHANNELS <= channels // groups * sh * sw
    if not few or p["dilation"] != (1, 1) or len(conv.input_shape) != 3:
        return None
    geometry = space_to_depth_geometry(conv.input_shape, p["size"], p["stride"], layer_pads(p, conv.input_shape[1:]))
    return geometry if geometry.work <= MAX_WORK else None


def lower_space_to_depth(program: nx.DiGraph) -> nx.DiGraph:
    """The step graph with every conv that `rewrite` accepts lowered; the others' steps as they were."""
    result = nx.DiGraph()
    result.graph.update(program.graph)
    taken = set(program.nodes)
    for name in program.nodes:  # in their order, which `partitions` follows
        step: Step = program.nodes[name]["step"]
        geometry = rewrite(program, step)
        if geometry is not None:
            blocks = _blocks_step(step, geometry, taken)
            result.add_node(blocks.name, step=blocks)
            step = _lowered_conv(step, geometry, blocks.name)
        result.add_node(name, step=step)
    for name in result.nodes:
        for source in result.nodes[name]["step"].inputs:
            result.add_edge(source, name)
    result.graph["partitions"] = partitions(result)
    return result


def _blocks_step(conv_step: Step, geometry: SpaceToDepth, taken: set[str]) -> Step:
    """The step that rearranges the conv's input: `conv1_gpu0_space_to_depth`."""
    conv = conv_step.first
    params = {"block": geometry.block, "pad": geometry.pad, "size": geometry.size, "groups": conv.params["groups"]}
    item = replace(conv, name=f"{conv.name}.space_to_depth", op="space_to_depth", params=params, shape=geometry.shape,
                   fields={})  # fmt: skip
    base = conv.name.split("@")[0]
    name = unique_name(identifier(f"{base}_{conv_step.device}_space_to_depth"), taken)
    return Step(name, "space_to_depth", [item], list(conv_step.inputs), conv_step.device, geometry.shape, {})


def _lowered_conv(step: Step, geometry: SpaceToDepth, source: str) -> Step:
    """The conv step reading the rearranged map with the rewritten filter; a new record (layers are shared)."""
    conv: Layer = step.first
    params = {**conv.params, "size": geometry.taps, "stride": (1, 1), "pad": (0, 0)}
    lowered = replace(conv, params=params, input_shape=geometry.shape, fields=dict(conv.fields))
    options = {**step.options, "space_to_depth": geometry.block}
    return replace(step, layers=[lowered, *step.layers[1:]], inputs=[source], options=options)
