"""`netdsl graph`: the net as a Graphviz picture (`netdsl.ir.drawing`), written as `dot` source or drawn."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from netdsl.errors import NetError
from netdsl.files import write_atomic_bytes
from netdsl.ir.drawing import render_dot, to_dot

_FORMATS = {".dot", ".gv", ".svg", ".png", ".pdf"}


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
    _write(out, render_dot(source, suffix[1:], where=str(out)))


def _write(out: Path, data: bytes) -> None:
    write_atomic_bytes(out, data)
