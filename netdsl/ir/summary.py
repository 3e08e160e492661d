"""What `netdsl info` shows of a layer graph, as rows of text cells: each layer with its shape and costs,
then totals per device. The command line prints it as a text table (`netdsl.cli.info`); a notebook shows
it as an HTML table (`netdsl.ir.display`)."""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from netdsl.ir.graph import Layer, layer, layers
from netdsl.ir.ops import describe_params
from netdsl.ir.stats import Totals, layer_stats
from netdsl.tables import format_bytes

LAYER_HEADER = ("layer", "type", "device", "output", "parameters", "weights", "MACs", "neurons", "inputs")
LAYER_TEXT_COLUMNS = frozenset({0, 1, 2, 3, 4, 8})  # aligned left; the others are numbers
DEVICE_HEADER = ("device", "layers", "parameters", "MACs / image", "neurons", "activations / image (fp32)")
DEVICE_TEXT_COLUMNS = frozenset({0})


@dataclass
class Summary:
    name: str
    layer_rows: list[tuple[str, ...]]  # one per layer, in `layers` order, under LAYER_HEADER
    tower_neurons: dict[str, int]  # a layer with weights inside `towers` -> the neurons of its copies, summed
    device_rows: list[tuple[str, ...]]  # one per device, then the total, under DEVICE_HEADER
    notes: list[str]  # the connections crossing devices; the stored statistics, where there are some


def connections(graph: nx.DiGraph, item: Layer) -> str:
    words = []
    for name in item.inputs:
        source = layer(graph, name)
        words.append(name if source.device == item.device else f"{name} ({source.device}->{item.device})")
    return ", ".join(words)


def summarize(graph: nx.DiGraph) -> Summary:
    """The summary of a shaped layer graph."""
    rows = []
    per_tower: dict[str, list[int]] = {}  # layer name without its tower -> neurons of each copy
    counts: dict[str, int] = {}
    overall, per_device = Totals(), {name: Totals() for name in graph.graph["devices"]}
    for item in layers(graph):
        stats = layer_stats(item)
        overall.add(stats)
        per_device[item.device].add(stats)
        counts[item.device] = counts.get(item.device, 0) + 1
        if item.tower and stats.neurons:
            per_tower.setdefault(item.name.removesuffix(f"@{item.tower}"), []).append(stats.neurons)
        rows.append(
            (
                item.name,
                item.op,
                item.device,
                " x ".join(map(str, item.shape)),
                describe_params(item),
                f"{stats.params:,}" if stats.params else "",
                f"{stats.macs:,}" if stats.macs else "",
                f"{stats.neurons:,}" if stats.neurons else "",
                connections(graph, item),
            )
        )
    device_rows = [_device_row(name, counts.get(name, 0), device) for name, device in per_device.items()]
    device_rows.append(_device_row("total", len(rows), overall))
    crossing = sum(1 for u, v in graph.edges if layer(graph, u).device != layer(graph, v).device)
    notes = [f"connections crossing devices: {crossing}"]
    if overall.buffers:
        notes.append(f"stored statistics (not learned): {overall.buffers:,} values")
    summed = {name: sum(neurons) for name, neurons in per_tower.items() if len(neurons) > 1}
    return Summary(graph.graph["name"], rows, summed, device_rows, notes)


def _device_row(name: str, count: int, device: Totals) -> tuple[str, ...]:
    return (
        name,
        str(count),
        f"{device.params:,}",
        f"{device.macs:,}",
        f"{device.neurons:,}",
        format_bytes(4 * device.activations),
    )
