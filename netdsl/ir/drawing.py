"""The layer graph as a Graphviz picture, one cluster per device (the paper's Figure 2): its `dot` source,
and the source rendered by Graphviz's `dot` program. `netdsl graph` writes it; a notebook shows it."""

from __future__ import annotations

import shutil
import subprocess

import networkx as nx

from netdsl.errors import NetError
from netdsl.ir.graph import layer, layers
from netdsl.ir.ops import describe_params

# What to tell someone whose machine has no `dot`.
INSTALL_DOT = (
    "install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; "
    "conda install graphviz; others: https://graphviz.org/download/)"
)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz source: layers grouped by device; edges carry shapes; cross-device edges stand out."""
    lines = [
        f"digraph {_quote(graph.graph['name'])} {{",
        "  rankdir=TB;",
        '  graph [fontname="Helvetica"];',
        '  node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9, color="#555555"];',
    ]
    by_device: dict[str, list] = {}
    for item in layers(graph):
        by_device.setdefault(item.device, []).append(item)
    for index, (device, items) in enumerate(by_device.items()):
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f'    label={_quote(device)}; style=rounded; color="#4a72b0";')
        for item in items:
            label = f"{item.name}\n{item.op} {describe_params(item)}".rstrip()
            lines.append(f"    {_quote(item.name)} [label={_quote(label)}];")
        lines.append("  }")
    for u, v in graph.edges:
        source, target = layer(graph, u), layer(graph, v)
        shape = " x ".join(map(str, source.shape))
        if source.device != target.device:
            style = (
                f'label={_quote(f"{shape}  {source.device}->{target.device}")}, color="#c0392b", '
                'fontcolor="#c0392b", penwidth=2, style=dashed'
            )
        else:
            style = f"label={_quote(shape)}"
        lines.append(f"  {_quote(u)} -> {_quote(v)} [{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def has_dot() -> bool:
    return shutil.which("dot") is not None


def render_dot(source: str, output_format: str, where: str, timeout: float | None = None) -> bytes:
    """`source` drawn by Graphviz's `dot` as `output_format` (svg, png, pdf). A NetError blaming `where`
    when `dot` is not installed or fails; `subprocess.TimeoutExpired` past `timeout` seconds."""
    dot = shutil.which("dot")
    if dot is None:
        raise NetError(
            f"writing .{output_format} needs Graphviz's `dot`, which is not installed",
            where=where,
            hint=f"{INSTALL_DOT}, or write a .dot file",
        )
    result = subprocess.run(
        [dot, f"-T{output_format}"], input=source.encode(), capture_output=True, check=False, timeout=timeout
    )
    if result.returncode != 0:
        raise NetError(
            f"dot failed: {result.stderr.decode(errors='replace').strip()}",
            where=where,
            hint="write a .dot file and draw it with another Graphviz, or check that `dot` is installed whole",
        )
    return result.stdout
