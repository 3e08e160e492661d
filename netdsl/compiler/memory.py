"""Memory planning: every step's output gets an offset in its device's arena, reusing dead buffers.

A buffer lives from the step that writes it to the last step on that device that reads it; the net's
inputs and outputs, and buffers another device copies from, live to the end. Offsets are found
greedily, largest buffer first, at the lowest offset that overlaps no buffer alive at the same time
(the "greedy by size" planner of TFLite). Sizes are in elements per image, so the plan scales to any
batch by multiplication. Views (flatten) share their input's buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from netdsl.compiler.steps import Step
from netdsl.ir import copy_graph

ALIGN = 64  # elements: keeps every buffer 256-byte aligned in fp32 (128 in 16-bit types)


@dataclass(frozen=True)
class Buffer:
    step: str
    device: str
    size: int  # elements per image, rounded up to ALIGN
    offset: int  # elements per image from the start of the device's arena
    first: int  # index in the device's launch order of the step that writes it
    last: int  # ... of the last step that reads it


def plan_memory(program: nx.DiGraph) -> nx.DiGraph:
    program = copy_graph(program)
    partitions = program.graph["partitions"]
    views = {name: _view_root(program, name) for name in program.nodes}
    buffers: dict[str, Buffer] = {}
    arena: dict[str, int] = {}
    naive: dict[str, int] = {}
    for device, order in partitions.items():
        lifetimes = _lifetimes(program, order, views)
        placed: list[Buffer] = []
        for name, (first, last) in sorted(lifetimes.items(), key=lambda item: (-_size(program, item[0]), item[0])):
            size = _size(program, name)
            offset = _lowest_free_offset(placed, size, first, last)
            placed.append(Buffer(name, device, size, offset, first, last))
        buffers.update({buffer.step: buffer for buffer in placed})
        arena[device] = max((b.offset + b.size for b in placed), default=0)
        naive[device] = sum(b.size for b in placed)
    program.graph["buffers"] = buffers
    program.graph["views"] = {name: root for name, root in views.items() if root != name}
    program.graph["arena"] = arena  # elements per image: peak with reuse
    program.graph["arena_without_reuse"] = naive
    return program


def _size(program: nx.DiGraph, name: str) -> int:
    return -(-math.prod(program.nodes[name]["step"].shape) // ALIGN) * ALIGN


def _view_root(program: nx.DiGraph, name: str) -> str:
    step: Step = program.nodes[name]["step"]
    while step.kind == "view":
        name = step.inputs[0]
        step = program.nodes[name]["step"]
    return name


def _lifetimes(program: nx.DiGraph, order: list[str], views: dict[str, str]) -> dict[str, tuple[int, int]]:
    index = {name: i for i, name in enumerate(order)}
    end = len(order)
    lifetimes: dict[str, list[int]] = {}
    keep = {views[name] for name in program.graph["outputs"]} | set(program.graph["inputs"])
    for name in order:
        step: Step = program.nodes[name]["step"]
        if step.kind != "view":
            lifetimes[name] = [index[name], end if name in keep else index[name]]
        for source in step.inputs:
            root = views[source]
            if root in lifetimes:  # written on this device (a transfer's source is read on the other)
                lifetimes[root][1] = max(lifetimes[root][1], index[name])
    # A buffer another device copies from (itself or through a view of it) is read at a time this device's
    # order does not show: keep it to the end rather than guess.
    for name in order:
        root = views[name]
        if root in lifetimes and any(program.nodes[r]["step"].kind == "transfer" for r in program.successors(name)):
            lifetimes[root][1] = end
    return {name: (first, last) for name, (first, last) in lifetimes.items()}


def _lowest_free_offset(placed: list[Buffer], size: int, first: int, last: int) -> int:
    busy = sorted((b.offset, b.offset + b.size) for b in placed if b.first <= last and first <= b.last)
    offset = 0
    for start, stop in busy:
        if offset + size <= start:
            break
        offset = max(offset, stop)
    return offset
