"""`netdsl info`: a table of the layers with their shapes and costs, and totals per device."""

from __future__ import annotations

import networkx as nx

from netdsl.ir.summary import DEVICE_HEADER, DEVICE_TEXT_COLUMNS, LAYER_HEADER, LAYER_TEXT_COLUMNS, summarize
from netdsl.tables import format_table


def info_table(graph: nx.DiGraph) -> str:
    summary = summarize(graph)
    lines = [f"net {summary.name}: {len(summary.layer_rows)} layers", ""]
    lines += format_table(LAYER_HEADER, summary.layer_rows, left=LAYER_TEXT_COLUMNS)
    lines += _tower_neurons(summary.tower_neurons)
    lines += ["", *format_table(DEVICE_HEADER, summary.device_rows, left=DEVICE_TEXT_COLUMNS), *summary.notes]
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
