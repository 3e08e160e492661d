"""Merging towers (issue 13): a `towers` block's copies of each layer as one grouped layer on one device
(netdsl/compiler/merge_towers.py, `--merge-towers`).

Checked: the merged AlexNet is, layer for layer, the hand-written one-device AlexNet (nets/alexnet_1gpu.net, Caffe's
grouped convs) and meets the float64 golden of the hand-written PyTorch model on both backends; a three-tower net
that uses every kind of merge (a conv over a shared input, grouped convs and LRN, batch norms folded and not, an add
of a tower's own maps, pools, fcs side by side, a reader outside the towers on another device) gives the unmerged
net's output on both backends; each way a tower's copy can be read that merging cannot express leaves the graph as
written and says why; the option reaches the report, plan.json, the dumps and the command line.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from golden.regenerate import golden_path
from kernel_support import DEVICE

import netdsl
from netdsl.cli.main import main
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.passes import Options, run_passes
from netdsl.ir import layers
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file
from netdsl.runtime.weights import weight_specs

ROOT = Path(__file__).resolve().parent.parent
NETS = ROOT / "nets"
TOLERANCE = 1e-5  # fp32, relative to the largest |output| of the unmerged net (or 1e-4 of the float64 golden)

THREE_TOWERS = """
net three_towers
device a, b, c
input x: 6 x 12 x 12

towers a, b, c {
    c1 = conv(x, 4, size=3, pad=1) | relu | batchnorm
    c2 = conv(c1, 4, size=3, pad=1, groups=2) | batchnorm | leaky_relu(0.1)
    s  = add(c1, c2) | avgpool(2)
    c3 = conv(all s, 6, size=1) | lrn(size=3, k=1, alpha=0.5) | maxpool(2)
    g  = c3 | global_avgpool
    f  = fc(all g, 5) | relu
}
out = fc(all f, 10) on b
output out
"""


def layer_graph_after(path: Path, name: str, **options):
    return run_passes(build(parse_file(path)), Options(**options))[name]


def random_weights(path: Path, seed: int) -> dict[str, np.ndarray]:
    """Every weight of the net drawn at random (variances positive), so that no tower's copy equals another's."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_specs(netdsl.load_graph(path)).items():
        value = rng.standard_normal(shape) * 0.5
        weights[name] = (np.abs(value) + 0.5 if name.endswith("running_var") else value).astype(np.float32)
    return weights


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture
def three_towers(tmp_path) -> Path:
    path = tmp_path / "three.net"
    path.write_text(THREE_TOWERS, encoding="utf-8")
    return path


# --- the pass ------------------------------------------------------------------------------------------------------


def test_merged_alexnet_is_the_one_device_alexnet():
    """Every layer of the merged two-tower AlexNet is the layer of the same name in nets/alexnet_1gpu.net (folded
    too): op, parameters, inputs and shape; the copies each merged layer came from are named in tower order."""
    merged = layer_graph_after(NETS / "alexnet.net", "merge_towers", merge_towers=True)
    grouped = layer_graph_after(NETS / "alexnet_1gpu.net", "fold")
    assert merged.graph["merge_towers"] == "merged 19 layers of 2 towers"
    assert [item.name for item in layers(merged)] == [item.name for item in layers(grouped)]
    for ours, theirs in zip(layers(merged), layers(grouped), strict=True):
        assert (ours.op, ours.params, ours.inputs, ours.shape) == (
            theirs.op,
            theirs.params,
            theirs.inputs,
            theirs.shape,
        )
        assert ours.device == "gpu0" and ours.tower is None
        if ours.name not in ("image", "fc8", "prob"):
            assert ours.fields["merged"] == [f"{ours.name}@gpu0", f"{ours.name}@gpu1"]
    program = layer_graph_after(NETS / "alexnet.net", "plan_memory", merge_towers=True)
    assert list(program.graph["partitions"]) == ["gpu0"]
    assert not [name for name in program.nodes if program.nodes[name]["step"].kind == "transfer"]


def test_off_unless_asked():
    plain = layer_graph_after(NETS / "alexnet.net", "merge_towers")
    assert "merge_towers" not in plain.graph
    assert "conv1@gpu1" in plain and "conv1" not in plain


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merged_alexnet_matches_golden(backend, weights):
    """The two-tower weights, joined when loaded, against the float64 hand-written model (tests/test_golden.py);
    on the GPU when there is one, in a CUDA graph."""
    with np.load(golden_path("alexnet")) as stored:
        x, want = stored["input"], stored["output"]
    on_gpu = DEVICE == "cuda" and backend == "triton"
    net = netdsl.load(
        NETS / "alexnet.net", backend=backend, weights=weights("alexnet"), devices=DEVICE, merge_towers=True,
        cuda_graph=on_gpu,
    )  # fmt: skip
    assert [step.kind for step in net._steps.values()].count("transfer") == 0
    for _ in range(3 if on_gpu else 1):  # eager, capture, replay
        got = net(torch.from_numpy(x).to(DEVICE)).double().cpu().numpy()
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_kind_of_merge_gives_the_same_output(three_towers, backend):
    merged_graph = layer_graph_after(three_towers, "merge_towers", merge_towers=True)
    by_name = {item.name: item for item in layers(merged_graph)}
    assert merged_graph.graph["merge_towers"] == "merged 13 layers of 3 towers"
    assert by_name["c1"].params["filters"] == 12 and by_name["c1"].inputs == ["x"]  # side by side, shared input
    assert (by_name["c2"].params["filters"], by_name["c2"].params["groups"]) == (12, 6)  # grouped, groups x 3
    assert by_name["c2"].fields["folded"] == ["c2.batchnorm@a", "c2.batchnorm@b", "c2.batchnorm@c"]
    assert by_name["c3"].params == {**by_name["c3"].params, "filters": 18, "groups": 1}
    assert by_name["c3.lrn"].params["groups"] == 3 and by_name["s"].inputs == ["c1.batchnorm", "c2.leaky_relu"]
    assert by_name["out"].inputs == ["f.relu"] and by_name["out"].device == "b"

    weights = random_weights(three_towers, seed=5)
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((2, 6, 12, 12)).astype(np.float32))
    plain = netdsl.load(three_towers, backend=backend, weights=weights, devices="cpu")
    merged = netdsl.load(
        three_towers, backend=backend, weights=weights, devices={"a": "cpu", "b": "cpu", "c": "cpu"}, merge_towers=True
    )
    assert list(merged.program.graph["partitions"]) == ["a", "b"]  # nothing is left on c
    want, got = plain(x), merged(x)
    assert want.abs().max() > 0.1  # not a degenerate output
    assert relative_error(got, want) <= TOLERANCE
    with torch.no_grad():  # the module of the net as written, every tower on the device it was merged onto
        assert relative_error(merged.as_module()(x), want) <= TOLERANCE


# Each way a copy can be read that a merged layer cannot stand for: (what the block says, the reason given).
UNMERGEABLE = {
    "fc-of-own-map": ("f = fc(c1, 5)", "`f@a` is a fc, which does not work channel by channel"),
    "concat": ("f = concat(c1, c1)", "joins several maps of its tower"),
    "relu-of-all": ("f = relu(all c1)", "only a conv of one group or an fc can"),
    "grouped-conv-of-all": ("f = conv(all c1, 4, size=1, groups=2)", "only a conv of one group or an fc can"),
}


@pytest.mark.parametrize("case", list(UNMERGEABLE))
def test_what_cannot_merge_stays_as_written(tmp_path, case):
    body, reason = UNMERGEABLE[case]
    path = tmp_path / "net.net"
    path.write_text(
        f"net n\ndevice a, b\ninput x: 4 x 8 x 8\ntowers a, b {{\n    c1 = conv(x, 4, size=3) | relu\n    {body}\n}}\n"
        "y = concat(all f) on a\noutput y\n",
        encoding="utf-8",
    )
    graph = layer_graph_after(path, "merge_towers", merge_towers=True)
    assert graph.graph["merge_towers"].startswith("not merged: ") and reason in graph.graph["merge_towers"]
    assert [item.name for item in layers(graph)] == [item.name for item in layers(layer_graph_after(path, "fold"))]


@pytest.mark.parametrize(
    "outside, reason",
    [
        ("y = relu(c1@b) on a\noutput y", "`y` reads the towers' copies other than all of them in tower order"),
        ("y = concat(c1@b, c1@a) on a\noutput y", "other than all of them in tower order"),
        ("output c1@a", "the net's output `c1.relu@a` is one tower's copy"),
    ],
)
def test_readers_outside_the_block(tmp_path, outside, reason):
    path = tmp_path / "net.net"
    path.write_text(
        f"net n\ndevice a, b\ninput x: 4 x 8 x 8\ntowers a, b {{\n    c1 = conv(x, 4, size=3) | relu\n}}\n{outside}\n",
        encoding="utf-8",
    )
    graph = layer_graph_after(path, "merge_towers", merge_towers=True)
    assert graph.graph["merge_towers"] == f"not merged: {reason}" or reason in graph.graph["merge_towers"]


def test_a_net_without_towers(tmp_path):
    graph = layer_graph_after(NETS / "lenet5.net", "merge_towers", merge_towers=True)
    assert graph.graph["merge_towers"] == "not merged: the net has no towers"


# --- what it reaches -----------------------------------------------------------------------------------------------


def test_report_plan_and_determinism(tmp_path):
    options = Options(batch=2, merge_towers=True)
    compiled = compile_net(NETS / "alexnet.net", options)
    assert "towers: merged 19 layers of 2 towers" in compiled.report
    launches = compiled.plan["devices"]["gpu0"]["launches"]
    conv2 = next(launch for launch in launches if launch["step"] == "conv2_gpu0_conv_bias_relu")
    assert conv2["merged"] == {
        "conv2": ["conv2@gpu0", "conv2@gpu1"],
        "conv2.relu": ["conv2.relu@gpu0", "conv2.relu@gpu1"],
    }
    assert "towers:" not in compile_net(NETS / "alexnet.net", Options(batch=2)).report
    first, second = tmp_path / "one", tmp_path / "two"
    write_build(compiled, first)
    write_build(compile_net(NETS / "alexnet.net", options), second)
    for path in sorted(first.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path


def test_command_line(tmp_path, capsys, three_towers):
    assert main(["compile", str(three_towers), "--merge-towers", "--no-sm90", "-o", str(tmp_path / "b"),
                 "--dump-after", "merge_towers"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "c2 = conv(c1.batchnorm, filters=12 size=3x3 pad=1 groups=6)" in out
    assert "towers: merged 13 layers of 3 towers" in out
    assert main(["run", str(three_towers), "--merge-towers", "--backend", "torch", "--batch", "2"]) == 0
    assert main(["run", str(three_towers), "--merge-towers", "--distributed"]) == 1
    err = capsys.readouterr().err
    assert "--merge-towers" in err and "one process per device" in err and "Traceback" not in err
