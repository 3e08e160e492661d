"""A layer graph shows itself in Jupyter: `_repr_svg_` is the picture of `netdsl graph`, `_repr_html_` the
table of `netdsl info`; and it stays a networkx DiGraph for everything else."""

from __future__ import annotations

import copy
import html
import pickle
import re
import shutil
from pathlib import Path

import networkx as nx
import pytest

import netdsl
from netdsl.cli.info import info_table
from netdsl.ir import Device, copy_graph, display, layers
from netdsl.ir.display import LayerGraph
from netdsl.ir.shapes import infer_shapes
from netdsl.ir.summary import summarize
from netdsl.lang.build import build
from netdsl.lang.parse import parse_text

NETS = Path(__file__).resolve().parent.parent / "nets"
HAS_DOT = shutil.which("dot") is not None
SMALL = "net small\ninput image: 3 x 8 x 8\ny = conv(image, 4, size=3) | relu\n"


@pytest.fixture(scope="module")
def alexnet() -> nx.DiGraph:
    return netdsl.load_graph(NETS / "alexnet.net")


@pytest.fixture
def no_dot(monkeypatch, tmp_path):
    """A PATH on which there is no `dot`."""
    monkeypatch.setenv("PATH", str(tmp_path))


def _cells(text: str) -> list[list[str]]:
    """The table cells of each row, unescaped."""
    rows = re.findall(r"<tr>(.*?)</tr>", text)
    return [[html.unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)] for row in rows]


def test_loaded_graphs_are_layer_graphs(alexnet):
    assert isinstance(alexnet, LayerGraph) and isinstance(alexnet, nx.DiGraph)
    assert isinstance(netdsl.graph_from_text(SMALL), LayerGraph)


def test_html_is_the_info_table(alexnet):
    shown = alexnet._repr_html_()
    assert shown.startswith('<div class="netdsl-net">') and shown.endswith("</div>")
    assert f"<strong>net alexnet</strong>: {alexnet.number_of_nodes()} layers" in shown
    rows = [cells for cells in _cells(shown) if cells]
    summary = summarize(alexnet)
    assert rows[: len(summary.layer_rows)] == [list(row) for row in summary.layer_rows]
    total = rows[-1]
    assert total[0] == "total" and total[2:5] == ["60,965,224", "724,406,816", "659,272"]  # the paper's totals
    for note in ("connections crossing devices", "neurons summed over towers: conv1 290,400"):
        assert note in shown
    for figure in ("60,965,224", "724,406,816", "659,272"):  # the same figures as `netdsl info`
        assert figure in info_table(alexnet)


def test_html_aligns_numbers_right_and_names_left(alexnet):
    first = re.search(r"<tbody>\n<tr>(.*?)</tr>", alexnet._repr_html_()).group(1)
    aligns = re.findall(r'text-align: (\w+)">', first)
    assert aligns == ["left"] * 5 + ["right"] * 3 + ["left"]


def test_html_escapes_every_name():
    graph = copy_graph(netdsl.graph_from_text(SMALL))
    graph.graph["name"] = "<script>alert('net')</script>"
    device = 'gpu"0&<b>'
    graph.graph["devices"] = {device: Device(device)}
    for item in layers(graph):
        item.device = device
    html = graph._repr_html_()
    assert "<script>" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&#x27;net&#x27;)&lt;/script&gt;" in html
    assert "gpu&quot;0&amp;&lt;b&gt;" in html


def test_long_nets_list_the_first_rows(monkeypatch):
    monkeypatch.setattr(display, "MAX_TABLE_ROWS", 2)
    html = netdsl.graph_from_text(SMALL)._repr_html_()
    assert len(re.findall(r"<tr><td", html)) == 2 + 2  # two layers, then the device table: gpu0 and the total
    assert "… and 1 more layers (<code>netdsl info</code> lists them all)" in html


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz's dot is not installed")
def test_svg_is_the_graph_picture(alexnet):
    svg = alexnet._repr_svg_()
    assert "<svg" in svg and "</svg>" in svg
    assert "conv1@gpu0" in svg and "cluster" in svg  # a layer, and the devices' boxes
    assert "gpu1&#45;&gt;gpu0" in svg or "gpu1-&gt;gpu0" in svg  # a cross-device edge's label


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz's dot is not installed")
def test_html_shows_the_picture_above_the_table(alexnet):
    """Jupyter shows HTML rather than SVG where an object offers both: the HTML holds the picture too."""
    shown = alexnet._repr_html_()
    picture = alexnet._repr_svg_()
    assert picture[picture.index("<svg") :].strip() in shown
    assert shown.index("<svg") < shown.index("<table>")
    assert "<?xml" not in shown and "<!DOCTYPE" not in shown


def test_the_bundle_draws_the_picture_once(alexnet, monkeypatch):
    """Jupyter asks `_repr_mimebundle_` first: one run of `dot` for both the HTML and the SVG, each what the
    single methods give (a graph and a net)."""
    calls = []
    draw = display.render_dot
    monkeypatch.setattr(display, "render_dot", lambda *args, **kwargs: calls.append(1) or draw(*args, **kwargs))
    monkeypatch.setattr(display, "has_dot", lambda: True)
    if not HAS_DOT:
        monkeypatch.setattr(display, "graph_svg", lambda graph: (calls.append(1), "<svg>drawn</svg>")[1])
    bundle = alexnet._repr_mimebundle_()
    assert len(calls) == 1
    assert bundle == {"text/html": alexnet._repr_html_(), "image/svg+xml": alexnet._repr_svg_()}
    net = netdsl.load(NETS / "lenet5.net", backend="torch")
    single = {"text/html": net._repr_html_(), "image/svg+xml": net._repr_svg_()}
    assert net._repr_mimebundle_() == {kind: shown for kind, shown in single.items() if shown is not None}


def test_without_dot_there_is_no_svg_and_the_table_shows(alexnet, no_dot):
    assert alexnet._repr_svg_() is None
    shown = alexnet._repr_html_()
    assert "<table>" in shown and "<svg" not in shown
    assert alexnet._repr_mimebundle_() == {"text/html": shown}


def test_a_failing_dot_gives_no_svg(tmp_path, monkeypatch):
    fake = tmp_path / "dot"
    fake.write_text("#!/bin/sh\necho 'Error: syntax error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert netdsl.graph_from_text(SMALL)._repr_svg_() is None


def test_large_nets_are_not_drawn(monkeypatch):
    monkeypatch.setattr(display, "MAX_PICTURE_LAYERS", 2)
    monkeypatch.setattr(display, "render_dot", lambda *args, **kwargs: pytest.fail("dot ran"))
    assert netdsl.graph_from_text(SMALL)._repr_svg_() is None


def test_a_graph_without_shapes_shows_as_text():
    unshaped = build(parse_text(SMALL, "small.net"))
    assert isinstance(unshaped, LayerGraph)
    assert unshaped._repr_svg_() is None and unshaped._repr_html_() is None
    assert isinstance(infer_shapes(unshaped), LayerGraph)  # shaping keeps the class


def test_a_layer_graph_is_still_a_digraph(alexnet):
    for other in (
        pickle.loads(pickle.dumps(alexnet)),
        copy.deepcopy(alexnet),
        copy_graph(alexnet),
        alexnet.copy(),
        nx.relabel_nodes(alexnet, {"prob": "probabilities"}, copy=True),
    ):
        assert isinstance(other, LayerGraph)
        assert other.number_of_nodes() == alexnet.number_of_nodes()
        assert other.number_of_edges() == alexnet.number_of_edges()
        assert other.graph["name"] == "alexnet"
    assert set(pickle.loads(pickle.dumps(alexnet)).edges) == set(alexnet.edges)
    view = alexnet.subgraph(["image", "conv1@gpu0"])
    assert list(view.edges) == [("image", "conv1@gpu0")]
    assert nx.is_directed_acyclic_graph(alexnet)
    assert nx.DiGraph(alexnet).number_of_nodes() == alexnet.number_of_nodes()


def test_a_compiled_nets_layer_graph_shows_itself():
    """The compiler's passes copy graphs with `copy_graph`, which keeps the class: `Net.layer_graph` (and
    `Compiled.layers`) show themselves as `load_graph`'s graph does."""
    from netdsl.compiler.compile import compile_net
    from netdsl.compiler.passes import Options

    compiled = compile_net(NETS / "lenet5.net", Options())
    assert isinstance(compiled.layers, LayerGraph)
    assert compiled.layers._repr_html_() == netdsl.load_graph(NETS / "lenet5.net")._repr_html_()


def test_a_net_shows_itself_as_its_layer_graph():
    """A `Net` (netdsl.load) in a notebook: its repr above its layer graph's picture and table."""
    net = netdsl.load(NETS / "lenet5.net", backend="torch")
    shown = net._repr_html_()
    assert shown.startswith(f"<p>{html.escape(repr(net))}</p>\n")
    assert shown.endswith(net.layer_graph._repr_html_())
    assert net._repr_svg_() == net.layer_graph._repr_svg_()
    if HAS_DOT:
        assert net._repr_svg_().lstrip().startswith(("<?xml", "<svg", "<!--"))
