"""Layouts: which feature maps live channels-last (NHWC) in memory, and which convs read them so.

Every kernel addresses its tensors through explicit element strides, so a map's layout is a choice
of the plan, not of the kernels. Channels-last pays where a conv has many input channels: there the
conv runs `codegen/conv_nhwc.py`, whose reduction walks a tap's channels, contiguous in memory, and
stages them with 16-byte asynchronous copies; `codegen/conv.py`, which gathers NCHW elements one by
one, stays for convs with few input channels (conv1's 3). Measured on an H200 (bench/conv_sweep.py,
bf16, batch 128, bench/results/conv_sweep.tsv): AlexNet's conv2..conv5 run 3.3 to 3.7 times faster
channels-last than conv.py's best tile for them, at cuDNN's speed.

The rule, for each step's output map (C x H x W per image):
- a conv with at least `NHWC_MIN_CHANNELS` input channels per group reads channels-last
  (`options["kernel"] = "nhwc"`) and writes channels-last;
- a map is channels-last when every step reading it can read either layout (convs, LRN, pooling,
  element-wise steps, channel shuffles, transfers whose readers can) and it is written by such a conv or
  read by a step that is itself channels-last or such a conv: LRN, pooling and shuffles between convs keep
  the layout;
- everything else is NCHW: net inputs and outputs, what an fc, softmax or flatten reads (a flattened
  map's element order is C, H, W), and vectors;
- a transfer has its source's layout, so a copy between devices is one contiguous block.

`Options.layout = "nchw"` keeps every map NCHW and every conv on `conv.py` (for comparison).
"""

from __future__ import annotations

import networkx as nx

from netdsl.compiler.steps import Step
from netdsl.ir import copy_graph

LAYOUT_OPTIONS = ("auto", "nchw")
NHWC_MIN_CHANNELS = 16  # input channels per group from which a conv runs channels-last (tl.dot's least K)
# Steps whose kernels take any strides for their map inputs and outputs ...
STRIDED_KINDS = {
    "conv", "conv_lrn_maxpool", "lrn", "lrn_maxpool", "pool", "eltwise", "add", "concat", "shuffle", "transfer"
}  # fmt: skip
# ... and among them those whose output is best laid out as their input is (a conv's is its own choice).
PASS_THROUGH_KINDS = STRIDED_KINDS - {"conv", "conv_lrn_maxpool"}


def nhwc_conv(program: nx.DiGraph, step: Step) -> bool:
    """Whether a conv step should run channels-last: enough input channels per group to fill a K block."""
    if step.kind != "conv":
        return False
    channels = sum(program.nodes[name]["step"].shape[0] for name in step.inputs)
    return channels // step.first.params["groups"] >= NHWC_MIN_CHANNELS


def weight_layouts(step: Step) -> dict[str, str]:
    """Weights a step wants laid out other than as given: a channels-last conv's filters, so that a tap's
    channels are contiguous like its input's."""
    return {"weight": "nhwc"} if step.options.get("kernel") == "nhwc" else {}


def choose_layouts(program: nx.DiGraph, layout: str = "auto") -> nx.DiGraph:
    """Sets `step.layout` ("nchw" or "nhwc") on every step and `options["kernel"] = "nhwc"` on the
    convs that run channels-last."""
    if layout not in LAYOUT_OPTIONS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUT_OPTIONS}")
    program = copy_graph(program)
    steps: dict[str, Step] = {name: program.nodes[name]["step"] for name in program.nodes}
    for step in steps.values():
        step.layout = "nchw"
        if layout == "auto" and nhwc_conv(program, step):
            step.options["kernel"] = "nhwc"
    if layout == "nchw":
        return program
    outputs = set(program.graph["outputs"])

    def accepts(name: str) -> bool:  # can this step read a channels-last map?
        step = steps[name]
        if step.kind == "transfer":
            return all(accepts(reader) for reader in program.successors(name))
        return step.kind in STRIDED_KINDS

    def prefers(name: str) -> bool:  # does this step gain from reading a channels-last map?
        step = steps[name]
        return step.options.get("kernel") == "nhwc" or (step.kind in PASS_THROUGH_KINDS and step.layout == "nhwc")

    for name in reversed(list(nx.topological_sort(program))):
        step = steps[name]
        readers = list(program.successors(name))
        if (
            len(step.shape) == 3
            and step.kind != "view"
            and name not in outputs
            and readers
            and all(accepts(reader) for reader in readers)
            and (step.options.get("kernel") == "nhwc" or any(prefers(reader) for reader in readers))
        ):
            step.layout = "nhwc"
    for name in nx.topological_sort(program):  # a copy keeps its source's layout
        step = steps[name]
        if step.kind == "transfer":
            step.layout = steps[step.inputs[0]].layout
    return program
