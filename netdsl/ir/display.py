"""How a layer graph shows itself in a Jupyter notebook: the picture `netdsl graph` draws (where Graphviz's
`dot` is installed) above the table `netdsl info` prints, with nothing to call.

Jupyter shows the richest answer its front end takes, HTML before SVG. It asks `_repr_mimebundle_` first and
the `_repr_*_` methods only for what the bundle lacks, so the bundle (`graph_bundle`) draws the picture once and
gives it both ways: inside the HTML (inline SVG, above the table) and alone as SVG, for what takes only images
(exports, other front ends); without `dot` the HTML is the table alone. `_repr_html_` and `_repr_svg_` answer
the same one at a time. The front end builds every layer graph as a `LayerGraph`, and
`copy_graph` keeps the class, so graphs from `netdsl.load_graph`, shaped or folded, show themselves; to
networkx and to everything else it is a `DiGraph`.
"""

from __future__ import annotations

import html
import subprocess

import networkx as nx

from netdsl.errors import NetError
from netdsl.ir.drawing import has_dot, render_dot, to_dot
from netdsl.ir.summary import DEVICE_HEADER, DEVICE_TEXT_COLUMNS, LAYER_HEADER, LAYER_TEXT_COLUMNS, summarize

MAX_PICTURE_LAYERS = 1000  # beyond this `dot` takes minutes and the picture is unreadable: the table only
DOT_SECONDS = 30  # a notebook waits this long for `dot` at most
MAX_TABLE_ROWS = 300  # layers listed in the HTML table; `netdsl info` lists them all


class LayerGraph(nx.DiGraph):
    """A `networkx.DiGraph` of `Layer` records that a notebook shows as a picture and a table."""

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        return graph_bundle(self)

    def _repr_svg_(self) -> str | None:
        return graph_svg(self)

    def _repr_html_(self) -> str | None:
        return graph_html(self)


def _shaped(graph: nx.DiGraph) -> bool:
    """Whether every node is a layer with its shape: the pictures and tables need them."""
    return graph.number_of_nodes() > 0 and all(
        "layer" in data and data["layer"].shape is not None for _, data in graph.nodes(data=True)
    )


def graph_svg(graph: nx.DiGraph) -> str | None:
    """The picture of `netdsl graph` as SVG text, or None where it cannot be drawn (no `dot`, a graph
    not yet shaped or too large, `dot` failing or too slow)."""
    if not has_dot() or not _shaped(graph) or graph.number_of_nodes() > MAX_PICTURE_LAYERS:
        return None
    try:
        return render_dot(to_dot(graph), "svg", where="notebook", timeout=DOT_SECONDS).decode("utf-8")
    except (NetError, subprocess.TimeoutExpired, OSError, UnicodeDecodeError):
        return None


def graph_bundle(graph: nx.DiGraph, heading: str = "") -> dict[str, str]:
    """Jupyter's MIME bundle: "text/html" (`graph_html`, after `heading`, itself HTML) and "image/svg+xml" (the
    picture), each where there is one; the picture drawn once for both."""
    picture = graph_svg(graph)
    bundle = {}
    shown = graph_html(graph, picture)
    if shown is not None:
        bundle["text/html"] = heading + shown
    if picture is not None:
        bundle["image/svg+xml"] = picture
    return bundle


_DRAW = object()  # graph_html's default: draw the picture


def graph_html(graph: nx.DiGraph, picture: str | object | None = _DRAW) -> str | None:
    """The picture of `netdsl graph` (where it can be drawn; `picture`: the SVG already drawn, or None for none)
    above the table of `netdsl info`, as HTML with every name escaped; None for a graph not yet shaped."""
    if not _shaped(graph):
        return None
    if picture is _DRAW:
        picture = graph_svg(graph)
    summary = summarize(graph)
    shown = summary.layer_rows[:MAX_TABLE_ROWS]
    heading = f"<p><strong>net {_text(summary.name)}</strong>: {len(summary.layer_rows):,} layers</p>"
    parts = ['<div class="netdsl-net">', heading]
    if isinstance(picture, str):  # the <svg> element itself: an XML prolog has no place inside HTML
        parts.append(picture[picture.find("<svg") :].strip())
    parts.append(_table(LAYER_HEADER, shown, LAYER_TEXT_COLUMNS))
    if len(shown) < len(summary.layer_rows):
        more = len(summary.layer_rows) - len(shown)
        parts.append(f"<p>… and {more:,} more layers (<code>netdsl info</code> lists them all)</p>")
    if summary.tower_neurons:
        words = ", ".join(f"{_text(name)} {value:,}" for name, value in summary.tower_neurons.items())
        parts.append(f"<p>neurons summed over towers: {words}</p>")
    parts.append(_table(DEVICE_HEADER, summary.device_rows, DEVICE_TEXT_COLUMNS))
    parts += [f"<p>{_text(note)}</p>" for note in summary.notes]
    parts.append("</div>")
    return "\n".join(parts)


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], text_columns: frozenset[int]) -> str:
    """Names aligned left, numbers right, as in the text table."""

    def cell(tag: str, index: int, value: str) -> str:
        align = "left" if index in text_columns else "right"
        return f'<{tag} style="text-align: {align}">{_text(value)}</{tag}>'

    lines = ["<table>", "<thead><tr>" + "".join(cell("th", i, v) for i, v in enumerate(header)) + "</tr></thead>"]
    lines.append("<tbody>")
    lines += ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows]
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)

