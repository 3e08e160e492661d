"""`plan.json`: what a runtime follows — per device, the ordered launches with their buffers, the
transfers between devices and the events they wait on, buffer offsets and sizes, inputs and outputs.

Sizes and offsets are in elements per image: multiply by the batch and the element size for bytes.
A buffer's `layout` is the order of its elements: "nchw", or "nhwc" (channels-last; netdsl.compiler.layout).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import networkx as nx

from netdsl._version import __version__
from netdsl.compiler.memory import ALIGN
from netdsl.compiler.steps import Step
from netdsl.errors import NetError
from netdsl.files import parse_json

PLAN_VERSION = 1
# The compile-time choices a build is made with (netdsl.compiler.passes.Options), which `netdsl run DIR` keeps.
PLAN_OPTIONS = ("layout", "precision", "space_to_depth", "merge_towers", "split_k", "tuning")


def _launch(program: nx.DiGraph, step: Step, views: dict[str, str], kernels: dict[str, str]) -> dict:
    entry = {
        "step": step.name,
        "kind": step.kind,
        "layers": [item.name for item in step.layers],
        "inputs": [views.get(name, name) for name in step.inputs],
        "output": views.get(step.name, step.name),
        "shape": list(step.shape),
        "layout": step.layout,
    }
    merged = {item.name: item.fields["merged"] for item in step.layers if "merged" in item.fields}
    if merged:  # layers made of a towers block's copies (netdsl.compiler.merge_towers): their weights, joined
        entry["merged"] = merged
    if step.name in kernels:
        entry["kernel"] = kernels[step.name]
    if step.options:
        entry["options"] = {key: step.options[key] for key in sorted(step.options)}
    return {**entry, **device_events(program, step)}


def device_events(program: nx.DiGraph, step: Step) -> dict[str, object]:
    """The events a launch waits on (`wait`: one per input made on another device) and records (`record`: when a
    step on another device reads it), named `done:<step>`, as plan.json and train/plan.json write them."""
    events: dict[str, object] = {}
    waits = [f"done:{name}" for name in step.inputs if program.nodes[name]["step"].device != step.device]
    if waits:
        events["wait"] = waits
    if any(program.nodes[reader]["step"].device != step.device for reader in program.successors(step.name)):
        events["record"] = f"done:{step.name}"
    return events


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
                name: {
                    "offset": buffers[name].offset,
                    "size": buffers[name].size,
                    "layout": program.nodes[name]["step"].layout,
                }
                for name in order
                if name in buffers
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
        "options": {name: getattr(options, name) for name in PLAN_OPTIONS},
        "units": f"sizes and offsets in elements per image, aligned to {ALIGN}",
        "inputs": inputs,
        "outputs": outputs,
        "devices": devices,
    }


def plan_json(plan: dict) -> str:
    return json.dumps(plan, indent=2, sort_keys=False) + "\n"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_source(plan: dict, source: Path, out: Path) -> dict:
    """The plan with `source` (the .net file, relative to the build folder, so that the two can move
    together) and its SHA-256 placed after the net's name; a tuning file among the options likewise."""
    entry = {"source": _relative(source, out), "source_sha256": _digest(Path(source))}
    tuning = plan.get("options", {}).get("tuning")
    if tuning is not None:
        plan = {**plan, "options": {**plan["options"], "tuning": _relative(tuning, out)}}
        entry["tuning_sha256"] = _digest(Path(tuning))
    rest = {key: value for key, value in plan.items() if key not in entry}
    keys = list(rest)
    cut = keys.index("net") + 1 if "net" in keys else 0
    return {**{k: rest[k] for k in keys[:cut]}, **entry, **{k: rest[k] for k in keys[cut:]}}


def _relative(path: str | Path, out: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(out).resolve())).as_posix()


def read_plan_source(build_dir: Path) -> tuple[Path, str, dict[str, object]]:
    """The .net file a build folder was compiled from, its dtype and its compile-time options (`PLAN_OPTIONS`;
    a folder written before they were recorded has none); NetError when the folder is not a build, the net is
    gone, or it changed since (the kernels would no longer match it)."""
    plan_path = build_dir / "plan.json"
    where = str(build_dir)
    if not plan_path.is_file():
        raise NetError(
            "the folder is not a build of `netdsl compile` (no plan.json)",
            where=where,
            hint="give a .net file, or a folder written by `netdsl compile NET -o DIR`",
        )
    try:
        plan = parse_json(plan_path.read_text(encoding="utf-8"))
        source, digest, dtype = plan["source"], plan["source_sha256"], plan["dtype"]
        options = dict(plan.get("options", {}))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise NetError(
            f"cannot read {plan_path} ({type(error).__name__}: {error})",
            where=str(plan_path),
            hint="compile the net again: netdsl compile NET -o DIR",
        ) from None
    net = (build_dir / str(source)).resolve()
    if not net.is_file():
        raise NetError(
            f"the net this folder was compiled from, {source}, is gone",
            where=str(plan_path),
            hint="compile the net again: netdsl compile NET -o DIR",
        )
    if _digest(net) != digest:
        raise NetError(
            f"{net} changed since this folder was compiled",
            where=str(plan_path),
            hint=f"compile it again: netdsl compile {net} -o {build_dir}",
        )
    if options.get("tuning") is not None:  # relative to the folder, as the net is; checked as the net is
        tuning = (build_dir / str(options["tuning"])).resolve()
        again = f"compile it again: netdsl compile {net} -o {build_dir} --tuning FILE"
        if not tuning.is_file():
            raise NetError(f"the tuning file this folder was compiled with, {tuning}, is gone", where=str(plan_path),
                           hint=again)  # fmt: skip
        if "tuning_sha256" in plan and _digest(tuning) != plan["tuning_sha256"]:
            raise NetError(f"{tuning} changed since this folder was compiled", where=str(plan_path), hint=again)
        options["tuning"] = str(tuning)
    return net, str(dtype), {name: value for name, value in options.items() if name in PLAN_OPTIONS}
