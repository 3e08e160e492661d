"""Fusion legality (netdsl/compiler/fuse.py): a layer joins the kernel of the layer it reads only when that
layer's output can be dropped, that is when nothing else reads it, it is not a net output, and both
run on one device. Each rule is checked on a small net where it must fuse and on nets where it must
not; the nets that must not fuse also run (the generated kernels, under Triton's interpreter without
a GPU) against PyTorch written out by hand, since a wrong fusion computes a wrong value, not an error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_runtime import paper_lrn, relative_error

import netdsl
from netdsl.compiler.passes import Options, run_pipeline
from netdsl.lang.build import build
from netdsl.lang.parse import parse_text

TOLERANCE = 1e-4  # relative to the largest output, fp32
NORM = {"size": 3, "alpha": 0.5, "beta": 0.75, "k": 2.0}  # a large alpha, so that the LRN matters
NOT_KERNELS = ("input", "transfer")
NORM_PRESET = "const norm = lrn(size=3, alpha=0.5, beta=0.75, k=2)\n"


def kernels(text: str, **options) -> list[tuple[str, list[str]]]:
    """(kind, layers it computes) of every step that is not an input or a transfer, in launch order."""
    program, _ = run_pipeline(build(parse_text(text, "t.net")), Options(**options))
    order = [program.nodes[name]["step"] for names in program.graph["partitions"].values() for name in names]
    return [(step.kind, [item.name for item in step.layers]) for step in order if step.kind not in NOT_KERNELS]


def conv_weights(generator: torch.Generator, name: str, c_out: int, c_in: int, size: int) -> dict[str, torch.Tensor]:
    scale = (c_in * size * size) ** -0.5
    return {
        f"{name}.weight": torch.randn(c_out, c_in, size, size, generator=generator) * scale,
        f"{name}.bias": torch.randn(c_out, generator=generator) * 0.5,
    }


def run_triton(tmp_path: Path, text: str, weights: dict[str, torch.Tensor], x: torch.Tensor):
    path = tmp_path / "t.net"
    path.write_text(text, encoding="utf-8")
    return netdsl.load(path, backend="triton", weights=weights)(x)


def assert_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key in want:
        value = got[key].cpu()  # on a GPU machine the net runs there
        assert value.shape == want[key].shape, key
        assert relative_error(value, want[key]) <= TOLERANCE, (key, relative_error(value, want[key]))


# --- (a) a layer read by its would-be fusion partner and by another layer ------------------------------

SHARED_CONV = """
input x: 3 x 9 x 9
a = conv(x, 4, size=3)
b = relu(a)
c = {join}(a, b)
output c
"""


@pytest.mark.parametrize("join", ["add", "concat"])
def test_conv_read_by_relu_and_another_layer_keeps_its_output(join, tmp_path):
    text = SHARED_CONV.format(join=join)
    assert kernels(text) == [("conv", ["a"]), ("eltwise", ["b"]), (join, ["c"])]
    generator = torch.Generator().manual_seed(1)
    weights = conv_weights(generator, "a", 4, 3, 3)
    x = torch.randn(2, 3, 9, 9, generator=generator)
    a = F.conv2d(x, weights["a.weight"], weights["a.bias"])
    want = a + F.relu(a) if join == "add" else torch.cat([a, F.relu(a)], 1)
    assert_outputs({"c": run_triton(tmp_path, text, weights, x)}, {"c": want})


def test_fc_read_by_relu_and_another_layer_keeps_its_output():
    text = "input x: 12\na = fc(x, 6)\nb = relu(a)\nc = add(a, b)\n"
    assert kernels(text) == [("fc", ["a"]), ("eltwise", ["b"]), ("add", ["c"])]


def test_relu_read_by_lrn_and_another_layer_is_not_fused_into_the_lrn():
    text = f"{NORM_PRESET}input x: 4 x 8 x 8\na = maxpool(x, 2)\nb = relu(a)\nn = norm(b)\nc = add(b, n)\n"
    assert kernels(text) == [("pool", ["a"]), ("eltwise", ["b"]), ("lrn", ["n"]), ("add", ["c"])]


def test_stage_with_a_second_reader_in_the_middle_is_not_one_kernel():
    """conv | relu | lrn | maxpool is one kernel at this size (test_positive_cases_fuse); another reader of
    any of the first three layers splits it where that layer's output must be kept."""
    chain = f"{NORM_PRESET}input x: 3 x 10 x 10\na = conv(x, 4, size=3)\nr = relu(a)\nn = norm(r)\np = maxpool(n, 2)\n"
    assert kernels(chain + "output p, a\n") == [("conv", ["a"]), ("lrn_maxpool", ["r", "n", "p"])]
    assert kernels(chain + "q = add(r, r)\n") == [("conv", ["a", "r"]), ("lrn_maxpool", ["n", "p"]), ("add", ["q"])]
    split = [("conv", ["a", "r"]), ("lrn", ["n"]), ("pool", ["p"]), ("eltwise", ["q"])]
    assert kernels(chain + "q = relu(n)\n") == split


# --- (b) a net output is never dropped -----------------------------------------------------------------

CONV_OUTPUT = """
input x: 3 x 9 x 9
a = conv(x, 4, size=3)
b = relu(a)
output a, b
"""

LRN_OUTPUT = f"""
{NORM_PRESET}input x: 3 x 10 x 10
a = conv(x, 6, size=3)
n = norm(a)
p = maxpool(n, 2)
output n, p
"""


def test_conv_that_is_a_net_output_is_not_fused_with_its_relu(tmp_path):
    assert kernels(CONV_OUTPUT) == [("conv", ["a"]), ("eltwise", ["b"])]
    generator = torch.Generator().manual_seed(2)
    weights = conv_weights(generator, "a", 4, 3, 3)
    x = torch.randn(2, 3, 9, 9, generator=generator)
    a = F.conv2d(x, weights["a.weight"], weights["a.bias"])
    assert_outputs(run_triton(tmp_path, CONV_OUTPUT, weights, x), {"a": a, "b": F.relu(a)})


def test_lrn_that_is_a_net_output_is_not_fused_with_its_maxpool(tmp_path):
    assert kernels(LRN_OUTPUT) == [("conv", ["a"]), ("lrn", ["n"]), ("pool", ["p"])]
    generator = torch.Generator().manual_seed(3)
    weights = conv_weights(generator, "a", 6, 3, 3)
    x = torch.randn(2, 3, 10, 10, generator=generator)
    n = paper_lrn(F.conv2d(x, weights["a.weight"], weights["a.bias"]), **NORM)
    assert_outputs(run_triton(tmp_path, LRN_OUTPUT, weights, x), {"n": n, "p": F.max_pool2d(n, 2)})


def test_relu_that_is_a_net_output_is_not_fused_into_the_lrn():
    text = f"{NORM_PRESET}input x: 4 x 8 x 8\na = maxpool(x, 2)\nb = relu(a)\nn = norm(b)\noutput b, n\n"
    assert kernels(text) == [("pool", ["a"]), ("eltwise", ["b"]), ("lrn", ["n"])]


def test_fc_that_is_a_net_output_is_not_fused_with_its_relu():
    assert kernels("input x: 12\na = fc(x, 6)\nb = relu(a)\noutput a, b\n") == [("fc", ["a"]), ("eltwise", ["b"])]


# --- (c) the reader runs on another device -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        (
            "device gpu0, gpu1\ninput x: 3 x 9 x 9\na = conv(x, 4, size=3) on gpu0\nb = relu(a) on gpu1\n",
            [("conv", ["a"]), ("eltwise", ["b"])],
        ),
        (
            "device gpu0, gpu1\ninput x: 12\na = fc(x, 6) on gpu0\nb = relu(a) on gpu1\n",
            [("fc", ["a"]), ("eltwise", ["b"])],
        ),
        (
            f"{NORM_PRESET}device gpu0, gpu1\ninput x: 4 x 8 x 8\nn = norm(x) on gpu0\np = maxpool(n, 2) on gpu1\n",
            [("lrn", ["n"]), ("pool", ["p"])],
        ),
        (
            f"{NORM_PRESET}device gpu0, gpu1\ninput x: 4 x 8 x 8\nb = relu(x) on gpu0\nn = norm(b) on gpu1\n",
            [("eltwise", ["b"]), ("lrn", ["n"])],
        ),
    ],
    ids=["conv-relu", "fc-relu", "lrn-maxpool", "relu-lrn"],
)
def test_reader_on_another_device_is_not_fused(text, want):
    assert kernels(text) == want


# --- (d) lrn + maxpool with a second reader of the lrn --------------------------------------------------

LRN_SHARED = f"""
{NORM_PRESET}input x: 3 x 10 x 10
a = conv(x, 6, size=3)
n = norm(a)
p = maxpool(n, 2)
q = maxpool(n, 3, stride=3)
output p, q
"""


def test_lrn_with_a_second_reader_runs_alone(tmp_path):
    assert kernels(LRN_SHARED) == [("conv", ["a"]), ("lrn", ["n"]), ("pool", ["p"]), ("pool", ["q"])]
    generator = torch.Generator().manual_seed(4)
    weights = conv_weights(generator, "a", 6, 3, 3)
    x = torch.randn(2, 3, 10, 10, generator=generator)
    n = paper_lrn(F.conv2d(x, weights["a.weight"], weights["a.bias"]), **NORM)
    want = {"p": F.max_pool2d(n, 2), "q": F.max_pool2d(n, 3, 3)}
    assert_outputs(run_triton(tmp_path, LRN_SHARED, weights, x), want)


# --- (e) where every rule is legal, it fuses -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("input x: 3 x 9 x 9\na = conv(x, 4, size=3) | relu\n", [("conv", ["a", "a.relu"])]),
        ("input x: 3 x 9 x 9\na = conv(x, 4, size=3) | leaky_relu(0.1)\n", [("conv", ["a", "a.leaky_relu"])]),
        ("input x: 12\na = fc(x, 6) | relu\n", [("fc", ["a", "a.relu"])]),
        (f"{NORM_PRESET}input x: 4 x 8 x 8\nn = norm(x) | maxpool(2)\n", [("lrn_maxpool", ["n", "n.maxpool"])]),
        (
            f"{NORM_PRESET}input x: 4 x 8 x 8\na = maxpool(x, 2) | relu | norm | maxpool(2)\n",
            [("pool", ["a"]), ("lrn_maxpool", ["a.relu", "a.norm", "a.maxpool"])],
        ),
        (
            f"{NORM_PRESET}input x: 3 x 10 x 10\na = conv(x, 4, size=3) | relu | norm | maxpool(2)\n",
            [("conv_lrn_maxpool", ["a", "a.relu", "a.norm", "a.maxpool"])],
        ),
        (  # the two sides of the device boundary still fuse on their own side
            f"{NORM_PRESET}device gpu0, gpu1\ninput x: 3 x 10 x 10\na = conv(x, 4, size=3) | relu on gpu0\n"
            f"n = norm(a) | maxpool(2) on gpu1\n",
            [("conv", ["a", "a.relu"]), ("lrn_maxpool", ["n", "n.maxpool"])],
        ),
    ],
    ids=["conv-relu", "conv-leaky", "fc-relu", "lrn-maxpool", "relu-lrn-maxpool", "stage", "across-devices"],
)
def test_positive_cases_fuse(text, want):
    assert kernels(text) == want


def test_conv_relu_fusion_options():
    program, _ = run_pipeline(build(parse_text(SHARED_CONV.format(join="add"), "t.net")), Options())
    conv = program.nodes["a_gpu0_conv_bias"]["step"]
    assert conv.options["activation"] == "none"  # the relu is a kernel of its own, the conv keeps its output
    program, _ = run_pipeline(
        build(parse_text("input x: 3 x 9 x 9\na = conv(x, 4, size=3) | leaky_relu(0.1)\n", "t.net")), Options()
    )
    (conv,) = [program.nodes[name]["step"] for name in program.nodes if program.nodes[name]["step"].kind == "conv"]
    assert conv.options["activation"] == "leaky_relu" and conv.options["slope"] == pytest.approx(0.1)
