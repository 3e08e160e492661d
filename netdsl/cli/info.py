"""`netdsl info`: a table of the layers with their shapes and costs, and totals per device."""

from __future__ import annotations

import networkx as nx

from netdsl.ir import Layer, layer, layers
from netdsl.ir.ops import describe_params
from netdsl.ir.stats import Totals, layer_stats, totals
from netdsl.tables import format_bytes, format_table


def connections(graph: nx.DiGraph, item: Layer) -> str:
    words = []
    for name in item.inputs:
        source = layer(graph, name)
        words.append(name if source.device == item.device else f"{name} ({source.device}->{item.device})")
    return ", ".join(words)


def info_table(graph: nx.DiGraph) -> str:
    header = ("layer", "type", "device", "output", "parameters", "weights", "MACs", "neurons", "inputs")
    rows = []
    per_tower: dict[str, list[int]] = {}  # layer name without its tower -> neurons of each copy
    for item in layers(graph):
        stats = layer_stats(item)
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
    lines = [f"net {graph.graph['name']}: {len(rows)} layers", ""]
    lines += format_table(header, rows, left={0, 1, 2, 3, 4, 8})
    lines += _tower_neurons({name: sum(n) for name, n in per_tower.items() if len(n) > 1})
    overall, per_device = totals(graph)
    lines += ["", *_totals_table(graph, overall, per_device)]
    return "\n".join(lines)


def _tower_neurons(summed: dict[str, int], width: int = 100) -> list[str]:
    """A layer with weights inside `towers` has one row per tower above; this line adds its copies up,
    the way a paper counts the layer: `neurons summed over towers: conv1 290,400, conv2 186,624, ...`."""
    if not summed:
        return []
    words = [f"{name} {value:,}" for name, value in summed.items()]
    lines, line = [], "neurons summed over towers:"
    for i, word in enumerate(words):
        word += "," if i < len(words) - 1 else ""
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = " "
        line += f" {word}"
    return ["", *lines, line]


def _totals_table(graph: nx.DiGraph, overall: Totals, per_device: dict[str, Totals]) -> list[str]:
    crossing = sum(1 for u, v in graph.edges if layer(graph, u).device != layer(graph, v).device)
    header = ("device", "layers", "parameters", "MACs / image", "neurons", "activations / image (fp32)")
    counts = {name: 0 for name in per_device}
    for item in layers(graph):
        counts[item.device] += 1
    rows = [
        (name, str(counts[name]), f"{t.params:,}", f"{t.macs:,}", f"{t.neurons:,}", format_bytes(4 * t.activations))
        for name, t in per_device.items()
    ]
    rows.append(
        (
            "total",
            str(sum(counts.values())),
            f"{overall.params:,}",
            f"{overall.macs:,}",
            f"{overall.neurons:,}",
            format_bytes(4 * overall.activations),
        )
    )
    lines = format_table(header, rows, left={0})
    lines.append(f"connections crossing devices: {crossing}")
    if overall.buffers:
        lines.append(f"stored statistics (not learned): {overall.buffers:,} values")
    return lines
