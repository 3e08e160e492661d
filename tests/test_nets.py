"""The example nets in nets/: each loads, and reports the totals its paper (or hand arithmetic) gives."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import netdsl
import netdsl.cli.main
from netdsl.ir import layer, layers
from netdsl.ir.stats import layer_stats, totals

NETS = Path(__file__).resolve().parent.parent / "nets"
ALL_NETS = sorted(NETS.glob("*.net"))

# AlexNet at 227 x 227 (Krizhevsky et al. 2012; /work/shared/REFERENCES.md): 60,965,224 parameters,
# 724,406,816 multiply-accumulates and 659,272 neurons, of which conv1 holds 55 * 55 * 96 = 290,400.
ALEXNET = {"params": 60_965_224, "macs": 724_406_816, "neurons": 659_272}
ALEXNET_CONV1_NEURONS = 55 * 55 * 96
assert ALEXNET_CONV1_NEURONS == 290_400


def _simplenet_expected() -> dict[str, int]:
    """SimpleNet's totals by hand: 1 x 64 x 64 in, four 3x3 conv (no bias) + batchnorm + relu + 2x2 pool
    stages of 32, 64, 128 and 256 filters, then dropout and fc 256*4*4 -> 15."""
    channels = [1, 32, 64, 128, 256]
    sizes = [64, 32, 16, 8]  # the conv output size of each stage (pad 1 keeps it; the pool halves it)
    params = macs = neurons = buffers = 0
    for c_in, c_out, hw in zip(channels[:-1], channels[1:], sizes, strict=True):
        params += c_out * c_in * 3 * 3  # conv weights, no bias
        params += 2 * c_out  # batch norm scale and shift
        buffers += 2 * c_out  # batch norm running mean and variance
        macs += c_out * hw * hw * c_in * 3 * 3
        neurons += c_out * hw * hw
    features = 256 * 4 * 4
    params += features * 15 + 15
    macs += features * 15
    neurons += 15
    return {"params": params, "macs": macs, "neurons": neurons, "buffers": buffers}


SIMPLENET = _simplenet_expected()
# The same figures written out, so that a mistake in the helper above cannot hide one in the net.
assert SIMPLENET == {
    "params": (288 + 64) + (18_432 + 128) + (73_728 + 256) + (294_912 + 512) + (61_440 + 15),  # 449,775
    "macs": 1 * 32 * 9 * 64**2 + 32 * 64 * 9 * 32**2 + 64 * 128 * 9 * 16**2 + 128 * 256 * 9 * 8**2 + 4096 * 15,
    "neurons": 32 * 64**2 + 64 * 32**2 + 128 * 16**2 + 256 * 8**2 + 15,
    "buffers": 2 * (32 + 64 + 128 + 256),
}

# Per net, the totals it must report (only the figures given are checked).
EXPECTED: dict[str, dict[str, int]] = {
    "alexnet.net": ALEXNET,
    "alexnet_1gpu.net": ALEXNET,
    # VGG-16, configuration D (Simonyan & Zisserman 2015).
    "vgg16.net": {"params": 138_357_544},
    # LeNet-5 style: (6*25+6) + (16*6*25+16) + (400*120+120) + (120*84+84) + (84*10+10).
    "lenet5.net": {"params": 61_706},
    "simplenet.net": SIMPLENET,
}


def _load(name: str):
    return netdsl.load_graph(NETS / name)


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_every_net_has_expected_totals():
    missing = [p.name for p in ALL_NETS if p.name not in EXPECTED]
    assert not missing, f"add the expected totals of {missing} to EXPECTED"
    absent = [name for name in EXPECTED if not (NETS / name).is_file()]
    assert not absent


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_totals(name):
    overall, per_device = totals(_load(name))
    for key, value in EXPECTED[name].items():
        assert getattr(overall, key) == value, key
    # The per-device figures add up to the overall ones.
    for key in ("params", "macs", "neurons", "buffers", "activations"):
        assert sum(getattr(t, key) for t in per_device.values()) == getattr(overall, key)


def test_lenet_params_by_hand():
    assert (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10) == 61_706


def test_vgg16_params_by_hand():
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(c_out * c_in * 9 + c_out for c_in, c_out in zip([3, *widths], widths, strict=False))
    fcs = (512 * 7 * 7 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    assert convs + fcs == 138_357_544


def _conv1_neurons(graph) -> int:
    return sum(layer_stats(l).neurons for l in layers(graph) if l.op == "conv" and l.name.split("@")[0] == "conv1")


@pytest.mark.parametrize("name", ["alexnet.net", "alexnet_1gpu.net"])
def test_alexnet_conv1_neurons(name):
    assert _conv1_neurons(_load(name)) == ALEXNET_CONV1_NEURONS


def test_alexnet_shapes():
    graph = _load("alexnet.net")
    for tower in ("gpu0", "gpu1"):
        assert layer(graph, f"conv1@{tower}").shape == (48, 55, 55)
        assert layer(graph, f"conv1.maxpool@{tower}").shape == (48, 27, 27)
        assert layer(graph, f"conv2@{tower}").shape == (128, 27, 27)
        assert layer(graph, f"conv2.maxpool@{tower}").shape == (128, 13, 13)
        assert layer(graph, f"conv3@{tower}").shape == (192, 13, 13)
        assert layer(graph, f"conv4@{tower}").shape == (192, 13, 13)
        assert layer(graph, f"conv5@{tower}").shape == (128, 13, 13)
        assert layer(graph, f"conv5.maxpool@{tower}").shape == (128, 6, 6)
        assert layer(graph, f"fc6@{tower}").shape == (2048,)
        # conv3 and fc6 read both towers: all of conv2 (256 maps) and of conv5 (256 x 6 x 6).
        assert layer(graph, f"conv3@{tower}").input_shape == (256, 13, 13)
        assert layer(graph, f"fc6@{tower}").input_shape == (256, 6, 6)
    assert layer(graph, "fc8").shape == (1000,)
    assert layer(graph, "prob").shape == (1000,)


def test_alexnet_1gpu_shapes():
    graph = _load("alexnet_1gpu.net")
    expected = {
        "conv1": (96, 55, 55),
        "conv1.maxpool": (96, 27, 27),
        "conv2": (256, 27, 27),
        "conv2.maxpool": (256, 13, 13),
        "conv3": (384, 13, 13),
        "conv4": (384, 13, 13),
        "conv5": (256, 13, 13),
        "conv5.maxpool": (256, 6, 6),
        "fc6": (4096,),
        "fc7": (4096,),
        "fc8": (1000,),
        "prob": (1000,),
    }
    for name, shape in expected.items():
        assert layer(graph, name).shape == shape, name
    assert {layer(graph, n).params["groups"] for n in ("conv2", "conv4", "conv5")} == {2}
    assert {layer(graph, n).params["groups"] for n in ("conv1", "conv3")} == {1}
    # The LRN is the paper's (k=2, n=5, alpha=1e-4 not divided by n, beta=0.75), each tower's half apart.
    norm = layer(graph, "conv1.norm")
    assert (norm.op, norm.input_shape[0]) == ("lrn", 96)
    assert norm.params == {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0, "groups": 2}
    assert set(totals(graph)[1]) == {"gpu0"}


def test_alexnet_towers_are_equal():
    graph = _load("alexnet.net")
    per_tower: dict[str | None, list[str]] = {}
    for item in layers(graph):
        per_tower.setdefault(item.tower, []).append(item.name.rsplit("@", 1)[0])
    assert set(per_tower) == {None, "gpu0", "gpu1"}
    assert len(per_tower["gpu0"]) == len(per_tower["gpu1"]) == 21  # conv1..conv5 stages, fc6, fc7
    assert per_tower["gpu0"] == per_tower["gpu1"]
    assert all(layer(graph, f"{n}@{t}").device == t for t in ("gpu0", "gpu1") for n in per_tower[t])
    # Half of the kernels of conv1..fc7 live on each device.
    params = {t: sum(layer_stats(l).params for l in layers(graph) if l.tower == t) for t in ("gpu0", "gpu1")}
    assert params["gpu0"] == params["gpu1"] == (ALEXNET["params"] - (4096 * 1000 + 1000)) // 2


def test_vgg16_structure():
    graph = _load("vgg16.net")
    convs = [l for l in layers(graph) if l.op == "conv"]
    assert len(convs) == 13
    assert all(l.params["size"] == (3, 3) and l.params["pad"] == (1, 1) for l in convs)
    assert [layer(graph, f"s{i}").shape for i in range(1, 6)] == [
        (64, 112, 112),
        (128, 56, 56),
        (256, 28, 28),
        (512, 14, 14),
        (512, 7, 7),
    ]
    assert layer(graph, "prob").shape == (1000,)


def test_lenet5_shapes():
    graph = _load("lenet5.net")
    assert layer(graph, "c1").shape == (6, 28, 28)
    assert layer(graph, "c1.maxpool").shape == (6, 14, 14)
    assert layer(graph, "c3").shape == (16, 10, 10)
    assert layer(graph, "c3.maxpool").shape == (16, 5, 5)
    assert graph.graph["outputs"] == ["f7"]
    assert layer(graph, "f7").shape == (10,)


def test_simplenet_structure():
    graph = _load("simplenet.net")
    assert [l.op for l in layers(graph) if l.name == "s1" or l.name.startswith("s1.")] == [
        "conv",
        "batchnorm",
        "relu",
        "maxpool",
    ]
    assert layer(graph, "s4.maxpool").shape == (256, 4, 4)
    assert layer(graph, "prob").shape == (15,)
    assert math.prod(layer(graph, "logits.fc").input_shape) == 256 * 4 * 4


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_NETS, ids=_ids(ALL_NETS))
def test_cli_info(path, capsys):
    assert netdsl.cli.main.main(["info", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    overall, _ = totals(netdsl.load_graph(path))
    total_line = next(line for line in out.splitlines() if line.startswith("total "))
    assert f"{overall.params:,}" in total_line
    assert f"{overall.macs:,}" in total_line
    assert f"{overall.neurons:,}" in total_line
    for key, value in EXPECTED.get(path.name, {}).items():
        if key != "buffers":
            assert f"{value:,}" in total_line, key
    # The per-layer neurons column adds up to the total.
    column = [row["neurons"] for row in _info_rows(out)]
    assert sum(int(cell.replace(",", "")) for cell in column if cell) == overall.neurons


def _info_rows(out: str) -> list[dict[str, str]]:
    """The layer table of `netdsl info`, one dict per row, cells cut at the spans of the dashed rule."""
    lines = out.splitlines()
    assert lines[1] == "" and set(lines[3]) == {"-", " "}
    spans = [m.span() for m in re.finditer(r"-+", lines[3])]
    header = [lines[2][a:b].strip() for a, b in spans]
    rows = []
    for line in lines[4 : lines.index("", 4)]:
        rows.append({name: line[a:b].strip() for name, (a, b) in zip(header, spans, strict=True)})
    return rows


@pytest.mark.parametrize(
    ("name", "rows"), [("alexnet.net", ["conv1@gpu0", "conv1@gpu1"]), ("alexnet_1gpu.net", ["conv1"])]
)
def test_cli_info_shows_alexnet_conv1_neurons(name, rows, capsys):
    """The paper's 290,400 conv1 neurons (96 x 55 x 55) in the info table: with two towers, 145,200 on
    each row and 290,400 on the line that adds the towers up; on one GPU, 290,400 on conv1's row."""
    assert netdsl.cli.main.main(["info", str(NETS / name)]) == 0
    out = capsys.readouterr().out
    neurons = {row["layer"]: row["neurons"] for row in _info_rows(out)}
    summed = re.search(r"^neurons summed over towers:(.*?)\n\n", out, re.MULTILINE | re.DOTALL)
    if len(rows) == 1:
        assert neurons["conv1"] == f"{ALEXNET_CONV1_NEURONS:,}" == "290,400"
        assert summed is None
    else:
        assert [neurons[row] for row in rows] == ["145,200", "145,200"]
        assert summed is not None
        per_layer = dict(re.findall(r"(\S+) (\d{1,3}(?:,\d{3})*)", summed.group(1)))
        assert per_layer["conv1"] == f"{ALEXNET_CONV1_NEURONS:,}" == "290,400"
        assert list(per_layer) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
        # The towers' sums and fc8 (outside the towers) make the paper's 659,272.
        everything = sum(int(v.replace(",", "")) for v in per_layer.values()) + int(neurons["fc8"].replace(",", ""))
        assert everything == ALEXNET["neurons"]


@pytest.mark.parametrize("path", ALL_NETS, ids=_ids(ALL_NETS))
def test_cli_check_is_silent(path, capsys):
    assert netdsl.cli.main.main(["check", str(path)]) == 0
    assert capsys.readouterr() == ("", "")
