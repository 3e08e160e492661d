"""`plan.json`: what a runtime follows — per device, the ordered launches with their buffers, the
transfers between devices and the events they wait on, buffer offsets and sizes, inputs and outputs.

Sizes and offsets are in elements per image: multiply by the batch and the element size for bytes.
"""

from __future__ import annotations

import json

import networkx as nx

from netdsl import __version__
from netdsl.fuse import Step
from netdsl.memory import ALIGN

PLAN_VERSION = 1


def _launch(program: nx.DiGraph, step: Step, views: dict[str, str], kernels: dict[str, str]) -> dict:
    entry = {
        "step": step.name,
        "kind": step.kind,
        "layers": [item.name for item in step.layers],
        "inputs": [views.get(name, name) for name in step.inputs],
        "output": views.get(step.name, step.name),
        "shape": list(step.shape),
    }
    if step.name in kernels:
        entry["kernel"] = kernels[step.name]
    if step.options:
        entry["options"] = {key: step.options[key] for key in sorted(step.options)}
    waits = [f"done:{name}" for name in step.inputs if program.nodes[name]["step"].device != step.device]
    if waits:
        entry["wait"] = waits
    if any(program.nodes[reader]["step"].device != step.device for reader in program.successors(step.name)):
        entry["record"] = f"done:{step.name}"
    return entry


def build_plan(program: nx.DiGraph, options, kernels: dict[str, str] | None = None) -> dict:
    """The plan as plain data (ordered so that its JSON is byte-identical for the same input)."""
    kernels = kernels or {}
    views = program.graph["views"]
    buffers = program.graph["buffers"]
    devices = {}
    for device, order in program.graph["partitions"].items():
        steps = [program.nodes[name]["step"] for name in order]
        devices[device] = {
            "arena_elements": program.graph["arena"][device],
            "launches": [_launch(program, step, views, kernels) for step in steps if step.kind != "view"],
            "buffers": {
                name: {"offset": buffers[name].offset, "size": buffers[name].size} for name in order if name in buffers
            },
        }
    by_layer = {}
    for name in program.nodes:
        step: Step = program.nodes[name]["step"]
        if step.kind == "input":
            by_layer.setdefault(step.first.name, {})[step.device] = name
    inputs = [
        {"name": layer, "shape": list(program.nodes[steps[next(iter(steps))]]["step"].shape), "steps": steps}
        for layer, steps in by_layer.items()
    ]
    outputs = [
        {
            "name": program.nodes[name]["step"].last.name,
            "step": views.get(name, name),
            "device": program.nodes[name]["step"].device,
            "shape": list(program.nodes[name]["step"].shape),
        }
        for name in program.graph["outputs"]
    ]
    return {
        "plan_version": PLAN_VERSION,
        "netdsl": __version__,
        "net": program.graph["name"],
        "dtype": options.dtype,
        "batch": options.batch,
        "units": f"sizes and offsets in elements per image, aligned to {ALIGN}",
        "inputs": inputs,
        "outputs": outputs,
        "devices": devices,
    }


def plan_json(plan: dict) -> str:
    return json.dumps(plan, indent=2, sort_keys=False) + "\n"
