"""`netdsl graph`: Graphviz output with devices as clusters and cross-device edges marked."""

import re
import shutil
from pathlib import Path

import pytest

from netdsl import graph_from_text, load_graph
from netdsl.cli.dot import to_dot
from netdsl.cli.main import main

ALEXNET = Path(__file__).resolve().parent.parent / "nets" / "alexnet.net"


def test_alexnet_dot_has_one_cluster_per_device_and_marks_crossings():
    graph = load_graph(ALEXNET)
    dot = to_dot(graph)
    clusters = re.findall(r'subgraph cluster_\d+ \{\n\s+label="([^"]+)"', dot)
    assert clusters == ["gpu0", "gpu1"]
    crossing = [line for line in dot.splitlines() if "->" in line and "style=dashed" in line]
    expected = sum(1 for u, v in graph.edges if graph.nodes[u]["layer"].device != graph.nodes[v]["layer"].device)
    assert len(crossing) == expected > 0
    assert '"conv2.maxpool@gpu1" -> "conv3@gpu0"' in dot
    assert 'label="128 x 13 x 13  gpu1->gpu0"' in dot  # the shape travels on the edge


def test_dot_output_is_deterministic_and_escapes_names(tmp_path):
    text = "net q\ninput x: 3 x 8 x 8\ny = conv(x, 4, size=3) | relu\n"
    graph = graph_from_text(text, file=str(tmp_path / "q.net"))
    assert to_dot(graph) == to_dot(graph_from_text(text, file=str(tmp_path / "q.net")))
    assert '"y" -> "y.relu" [label="4 x 6 x 6"]' in to_dot(graph)


def test_graph_command_writes_dot(tmp_path, capsys):
    out = tmp_path / "alexnet.dot"
    assert main(["graph", str(ALEXNET), "-o", str(out)]) == 0
    assert out.read_text().startswith('digraph "alexnet"')


def test_graph_command_rejects_unknown_format(tmp_path, capsys):
    assert main(["graph", str(ALEXNET), "-o", str(tmp_path / "x.jpeg")]) == 1
    err = capsys.readouterr().err
    assert "cannot write a graph as `.jpeg`" in err and "Traceback" not in err


NO_DOT = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


@NO_DOT
def test_graph_command_renders_svg(tmp_path):
    out = tmp_path / "alexnet.svg"
    assert main(["graph", str(ALEXNET), "-o", str(out)]) == 0
    assert "<svg" in out.read_text()


@NO_DOT
def test_graph_command_renders_png(tmp_path):
    out = tmp_path / "alexnet.png"
    assert main(["graph", str(ALEXNET), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")  # the PNG signature
    assert data[12:16] == b"IHDR" and int.from_bytes(data[16:20], "big") > 100  # a picture, over 100 px wide
