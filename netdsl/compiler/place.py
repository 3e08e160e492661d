"""Placement: one partition per device, and an explicit transfer wherever a connection crosses devices.

A step reading a tensor produced on another device reads a copy made by a `transfer` step on the
reading device; one copy serves every reader on that device. An input read on several devices is
uploaded to each of them instead. A transfer waits for its producer (an
event on the source device); the readers wait for the transfer.
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx

from netdsl.compiler.steps import Step, identifier, unique_name


def place(program: nx.DiGraph) -> nx.DiGraph:
    result = nx.DiGraph()
    result.graph.update(program.graph)
    copies: dict[tuple[str, str], str] = {}  # (producer, device) -> transfer step
    taken = set(program.nodes)  # the names of new steps are made unique against every step's
    for name in nx.lexicographical_topological_sort(program, key=_order(program)):
        step: Step = program.nodes[name]["step"]
        inputs = []
        for source_name in step.inputs:
            source: Step = program.nodes[source_name]["step"]
            if source.device == step.device:
                inputs.append(source_name)
                continue
            key = (source_name, step.device)
            if key not in copies and source.kind == "input":  # inputs are uploaded to every device reading them
                replica = Step(
                    unique_name(identifier(f"{source.first.name}_{step.device}_input"), taken),
                    "input",
                    source.layers,
                    [],
                    step.device,
                    source.shape,
                    {"replica_of": source_name},
                )
                copies[key] = replica.name
                result.add_node(replica.name, step=replica)
            if key not in copies:
                transfer = Step(
                    unique_name(identifier(f"{source_name}_to_{step.device}"), taken),
                    "transfer",
                    source.layers[-1:],
                    [source_name],
                    step.device,
                    source.shape,
                    {"source_device": source.device},
                )
                copies[key] = transfer.name
                result.add_node(transfer.name, step=transfer)
                result.add_edge(source_name, transfer.name)
            inputs.append(copies[key])
        step = replace(step, inputs=inputs)
        result.add_node(name, step=step)
        for source_name in inputs:
            result.add_edge(source_name, name)
    result.graph["partitions"] = partitions(result)
    return result


def _order(program: nx.DiGraph):
    index = {name: i for i, name in enumerate(program.nodes)}
    return lambda name: index[name]


def partitions(program: nx.DiGraph) -> dict[str, list[str]]:
    """Each device's steps in the order they are launched."""
    index = {name: i for i, name in enumerate(program.nodes)}
    order = nx.lexicographical_topological_sort(program, key=lambda name: index[name])
    result: dict[str, list[str]] = {}
    for name in order:
        result.setdefault(program.nodes[name]["step"].device, []).append(name)
    return result
