"""`netdsl graph`: the net as a Graphviz picture, one cluster per device (the paper's Figure 2)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import networkx as nx

from netdsl.errors import NetError
from netdsl.ir import layer, layers
from netdsl.ir.ops import describe_params

_FORMATS = {".dot", ".gv", ".svg", ".png", ".pdf"}


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


def write_graph(graph: nx.DiGraph, out: Path) -> None:
    """Writes `.dot`/`.gv` directly; `.svg`, `.png` and `.pdf` through Graphviz's `dot` when installed."""
    suffix = out.suffix.lower()
    if suffix not in _FORMATS:
        raise NetError(
            f"cannot write a graph as `{suffix or out.name}`",
            where=str(out),
            hint=f"use one of {', '.join(sorted(_FORMATS))}",
        )
    source = to_dot(graph)
    if suffix in (".dot", ".gv"):
        _write(out, source.encode())
        return
    dot = shutil.which("dot")
    if dot is None:
        raise NetError(
            f"writing {suffix} needs Graphviz's `dot`, which is not installed",
            where=str(out),
            hint="install graphviz (apt-get install graphviz) or write a .dot file",
        )
    result = subprocess.run([dot, f"-T{suffix[1:]}"], input=source.encode(), capture_output=True, check=False)
    if result.returncode != 0:
        raise NetError(f"dot failed: {result.stderr.decode(errors='replace').strip()}", where=str(out))
    _write(out, result.stdout)


def _write(out: Path, data: bytes) -> None:
    try:
        out.write_bytes(data)
    except OSError as error:
        raise NetError(f"cannot write {out}: {error.strerror}", where=str(out)) from None
