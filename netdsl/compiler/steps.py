"""Steps: the IR of every stage after fusion.

From the `fuse` pass on, the program is a `networkx.DiGraph` whose nodes are keyed by step name and
carry a `Step` (attribute `step`): one kernel launch, a free view, an input upload or a transfer
between devices. An edge u -> v means step v reads step u's output.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import networkx as nx

from netdsl.ir import Layer, Shape

# the longest step name: a kernel's file is named by its step, and a file system takes 255 bytes a name
NAME_LIMIT = 96


@dataclass
class Step:
    """One kernel launch (or a free view, or a transfer) in the fused program."""

    name: str  # a Python identifier: what it fuses and where it runs, e.g. conv2_gpu1_conv_bias_relu
    kind: str  # conv, fc, lrn, lrn_maxpool, pool, softmax, eltwise, add, concat, view, input, transfer
    layers: list[Layer]  # the layers it computes, in order
    inputs: list[str]  # steps read, in order
    device: str
    shape: Shape  # per-image output shape
    options: dict[str, object] = field(default_factory=dict)  # activation, slope, ... for the emitter
    layout: str = "nchw"  # of its output in memory, "nchw" or "nhwc" (channels-last): netdsl.compiler.layout decides

    @property
    def first(self) -> Layer:
        return self.layers[0]

    @property
    def last(self) -> Layer:
        return self.layers[-1]


def identifier(text: str) -> str:
    """A safe Python identifier made only of ASCII letters, digits and underscores."""
    text = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "step"
    return text if not text[0].isdigit() else f"k_{text}"


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_2`, `base_3`, ... : the first that no step of the program has yet; added to `taken`.
    Every name a pass makes goes through here, so two things never share a name, whatever the names the
    net's layers and devices have (joined with `_`, `a` on device `b_c` and `a_b` on `c` read alike). A base
    longer than NAME_LIMIT (from a long layer name) is cut, and told apart by a digest of the whole."""
    if len(base) > NAME_LIMIT:
        base = f"{base[: NAME_LIMIT - 9]}_{hashlib.sha256(base.encode()).hexdigest()[:8]}"
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}_{number}"
    taken.add(name)
    return name


def launch_order(program: nx.DiGraph) -> list[str]:
    """Every step in one topological order that follows each device's launch order (`graph["partitions"]`),
    the devices one after another where nothing else decides."""
    order = [name for names in program.graph["partitions"].values() for name in names]
    index = {name: i for i, name in enumerate(order)}
    return list(nx.lexicographical_topological_sort(program, key=index.get))
