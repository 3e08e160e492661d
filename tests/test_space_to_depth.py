"""Space-to-depth (issue 13): a strided conv over few channels lowered to a stride-1 conv over blocks of pixels that
runs channels-last (codegen/space_to_depth.py, netdsl/compiler/space_to_depth.py).

Checked under Triton's interpreter (or on the GPU when there is one): the transform kernel against the PyTorch
reference (the same bits), the lowered conv (transform, rearranged filters, conv_nhwc.py) against F.conv2d in
float64 on AlexNet's conv1 geometry at small odd sizes (11 x 11 at stride 4, padding 0 and 2, three channels, one
group and two, batch 1 and 2), the pass on AlexNet (which steps it adds and changes, and that it stays off unless
asked), and whole nets with it against the same nets without it, on both backends.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, random

import netdsl
from netdsl.cli.main import main
from netdsl.codegen.conv_nhwc import conv2d_nhwc
from netdsl.codegen.layouts import to_layout
from netdsl.codegen.reference import space_to_depth as reference
from netdsl.codegen.space_to_depth import space_to_depth, space_to_depth_weight
from netdsl.codegen.windows import four_pads
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.emit import family_of
from netdsl.compiler.launches import load_kernel_file
from netdsl.compiler.passes import Options, run_passes, run_pipeline
from netdsl.compiler.space_to_depth import MAX_WORK, rewrite, space_to_depth_geometry
from netdsl.errors import NetError
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file
from netdsl.runtime.weights import weight_specs

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5  # relative to the largest |reference|; fp32 with exact products


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.double().cpu()).abs().max() / want.abs().max())


# AlexNet's conv1 at small odd sizes: (batch, channels, groups, height, width, padding).
CONV1 = {
    "pad0": (2, 3, 1, 35, 31, 0),
    "pad2": (1, 3, 1, 27, 33, 2),
    "pad0-groups2": (1, 6, 2, 31, 37, 0),
    "pad2-groups2": (2, 6, 2, 29, 23, 2),
    "pad-each-side": (1, 3, 1, 25, 30, (1, 3, 2, 0)),
}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CONV1))
def test_transform_kernel_is_the_reference(case: str, layout: str):
    """Bit for bit, into a channels-last output that starts as NaN (so a block never written shows)."""
    batch, channels, groups, height, width, padding = CONV1[case]
    x = random(torch.Generator().manual_seed(0), batch, channels, height, width).to(DEVICE)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    geometry = space_to_depth_geometry((channels, height, width), (11, 11), (4, 4), four_pads(padding))
    want = reference(x, geometry.block, geometry.pad, geometry.size, groups)
    out = torch.full_like(want, float("nan")).contiguous(memory_format=torch.channels_last)
    got = space_to_depth(x, geometry.block, geometry.pad, groups, geometry.size, out=out)
    assert got is out and torch.equal(got, want)


@pytest.mark.parametrize("case", list(CONV1))
def test_lowered_conv1_is_the_conv(case: str):
    """The transform, the rearranged filters and the channels-last conv give F.conv2d's output (float64)."""
    batch, channels, groups, height, width, padding = CONV1[case]
    generator = torch.Generator().manual_seed(1)
    x = random(generator, batch, channels, height, width)
    weight = random(generator, 16, channels // groups, 11, 11, scale=(channels // groups * 121) ** -0.5)
    bias = random(generator, 16, scale=0.1)
    pads = four_pads(padding)
    top, left, bottom, right = pads
    want = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), weight.double(), bias.double(), 4, groups=groups)
    geometry = space_to_depth_geometry((channels, height, width), (11, 11), (4, 4), pads)
    assert geometry.taps == (3, 3) and geometry.channels == 16 * channels
    blocks = space_to_depth(x.to(DEVICE), geometry.block, geometry.pad, groups, geometry.size)
    filters = space_to_depth_weight(weight, geometry.block).to(DEVICE).contiguous(memory_format=torch.channels_last)
    got = conv2d_nhwc(blocks, filters, bias.to(DEVICE), groups=groups, activation="none")
    assert got.shape == want.shape
    assert relative_error(got, want) <= TOLERANCE


def test_rearranged_filters_hold_every_tap_once_and_zeros_past_the_filter():
    weight = torch.arange(2 * 3 * 11 * 11, dtype=torch.float64).reshape(2, 3, 11, 11) + 1
    blocks = space_to_depth_weight(weight, (4, 4))
    assert blocks.shape == (2, 48, 3, 3)
    assert sorted(blocks[blocks != 0].tolist()) == sorted(weight.flatten().tolist())
    # tap (t, u) of channel (dy * 4 + dx) * 3 + c is the original tap (4t + dy, 4u + dx) of channel c
    assert blocks[1, (2 * 4 + 3) * 3 + 1, 1, 1] == weight[1, 1, 4 + 2, 4 + 3]
    assert blocks[0, (3 * 4 + 0) * 3 + 2, 2, 0] == 0  # row 11: past the 11 x 11 filter


def alexnet(**options):
    return run_pipeline(build(parse_file(ROOT / "nets/alexnet.net")), Options(batch=2, **options))[0]


def test_pass_lowers_alexnet_conv1_on_each_tower_and_nothing_else():
    lowered, plain = alexnet(space_to_depth=True), alexnet()
    added = sorted(set(lowered.nodes) - set(plain.nodes))
    assert added == ["conv1_gpu0_space_to_depth", "conv1_gpu1_space_to_depth"]
    for tower in ("gpu0", "gpu1"):
        blocks = lowered.nodes[f"conv1_{tower}_space_to_depth"]["step"]
        assert blocks.kind == "space_to_depth" and blocks.shape == (48, 57, 57) and blocks.layout == "nhwc"
        assert blocks.inputs == [f"image_{tower}_input"] and blocks.device == tower
        conv = lowered.nodes[f"conv1_{tower}_conv_bias_relu"]["step"]
        assert conv.inputs == [blocks.name] and family_of(conv) == "conv_nhwc" and conv.shape == (48, 55, 55)
        assert conv.options["space_to_depth"] == (4, 4) and conv.options["activation"] == "relu"
        assert (conv.first.params["size"], conv.first.params["stride"]) == ((3, 3), (1, 1))
        assert conv.first.name == f"conv1@{tower}"  # its weights keep their names
        order = lowered.graph["partitions"][tower]
        assert order.index(blocks.name) == order.index(conv.name) - 1
    for name in plain.nodes:  # every other step as it was
        if "conv1" not in name:
            assert lowered.nodes[name]["step"].shape == plain.nodes[name]["step"].shape
            assert family_of(lowered.nodes[name]["step"]) == family_of(plain.nodes[name]["step"])
    with pytest.raises(NetError, match="runs the lowered conv channels-last") as error:  # not a silent no-op
        alexnet(space_to_depth=True, layout="nchw")
    assert error.value.where == "space_to_depth"
    for command in ("compile", "run"):  # the flags named, exit status 1
        argv = [command, str(ROOT / "nets/alexnet.net"), "--space-to-depth", "--layout", "nchw", "--backend", "torch"]
        assert main([*argv[:-2], "--no-sm90"] if command == "compile" else argv) == 1


def test_which_convs_are_lowered():
    after = run_passes(build(parse_file(ROOT / "nets/alexnet.net")), Options(space_to_depth=True))["place"]
    chosen = {name for name in after.nodes if rewrite(after, after.nodes[name]["step"]) is not None}
    assert chosen == {"conv1_gpu0_conv_bias_relu", "conv1_gpu1_conv_bias_relu"}  # conv2..conv5 have 48+ channels
    for name in ("lenet5", "vgg16", "simplenet"):  # stride 1, or enough channels already
        after = run_passes(build(parse_file(ROOT / f"nets/{name}.net")), Options(space_to_depth=True))["place"]
        assert not any(rewrite(after, after.nodes[step]["step"]) for step in after.nodes), name
    # a 1 x 1 filter at stride 4 would do 16 times the work: not worth it
    assert space_to_depth_geometry((3, 32, 32), (1, 1), (4, 4), (0, 0, 0, 0)).work > MAX_WORK


TOWERS = """net conv1_towers
device gpu0, gpu1
input image: 3 x {height} x {width}
towers gpu0, gpu1 {{
    conv1 = conv(image, 16, size=11, stride=4, pad={pad}) | relu | lrn(size=5, alpha=1e-4, beta=0.75, k=2)
    pool1 = maxpool(conv1, 3, stride=2)
}}
fc = fc(all pool1, 10) on gpu0
output fc
"""
GROUPED = """net conv1_grouped
input image: 6 x {height} x {width}
conv1 = conv(image, 16, size=11, stride=4, pad={pad}, groups=2, bias=false) | batchnorm | relu
fc = fc(conv1, 10)
output fc
"""
NETS = {
    "towers-pad0-batch2": (TOWERS, 0, 35, 31, 2),
    "towers-pad2-batch1": (TOWERS, 2, 29, 33, 1),
    "grouped-batchnorm-pad2-batch2": (GROUPED, 2, 27, 25, 2),
}


@pytest.mark.parametrize("case", list(NETS))
def test_nets_compute_the_same_with_and_without_it(case: str, tmp_path: Path):
    text, pad, height, width, batch = NETS[case]
    path = tmp_path / "net.net"
    path.write_text(text.format(pad=pad, height=height, width=width))
    graph = netdsl.load_graph(path)
    generator = torch.Generator().manual_seed(2)
    weights = {name: random(generator, *shape, scale=0.1) for name, shape in weight_specs(graph).items()}
    for name in weights:
        if name.endswith("running_var"):
            weights[name] = weights[name].abs() + 0.5
    x = random(generator, batch, *graph.nodes["image"]["layer"].shape)
    want = netdsl.load(path, backend="torch", weights=weights, batch=batch)(x)
    for backend in ("torch", "triton"):
        net = netdsl.load(path, backend=backend, weights=weights, batch=batch, space_to_depth=True)
        assert any(step.kind == "space_to_depth" for step in net._steps.values())
        assert relative_error(net(x), want) <= TOLERANCE, backend


def test_compile_flags_dump_and_deterministic_files(tmp_path: Path, capsys):
    net = str(ROOT / "nets/alexnet.net")
    args = ["compile", net, "--no-sm90", "--space-to-depth", "--dump-after", "space_to_depth"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    dump = capsys.readouterr().out
    assert "conv1_gpu0_space_to_depth = space_to_depth(image_gpu0_input)  [conv1@gpu0.space_to_depth]" in dump
    assert "conv1_gpu0_conv_bias_relu = conv(conv1_gpu0_space_to_depth)" in dump
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    for name in ("conv1_gpu0_space_to_depth.py", "conv1_gpu0_conv_bias_relu.py", "fc8_gpu0_fc_bias.py"):
        assert (tmp_path / "a/kernels" / name).read_bytes() == (tmp_path / "b/kernels" / name).read_bytes()
    plain = compile_net(net, Options())
    assert not any("space_to_depth" in name for name in plain.kernels)  # off by default


def test_generated_files_match_their_references(tmp_path: Path):
    """The two files the lowering writes for a tower (the transform, the conv over blocks) each against its own
    PyTorch reference, as tests/test_emitted.py checks every other generated file."""
    path = tmp_path / "net.net"
    path.write_text(TOWERS.format(pad=2, height=29, width=31))
    out = write_build(compile_net(path, Options(space_to_depth=True)), tmp_path / "build")
    generator = torch.Generator().manual_seed(3)
    for name in ("conv1_gpu0_space_to_depth", "conv1_gpu0_conv_bias_relu"):
        module = load_kernel_file(out / "kernels" / f"{name}.py")
        inputs = [to_layout(random(generator, 2, *shape), layout).to(DEVICE) for shape, layout in
                  zip(module.INPUT_SHAPES, module.INPUT_LAYOUTS, strict=True)]  # fmt: skip
        weights = {n: to_layout(random(generator, *shape, scale=0.1), module.WEIGHT_LAYOUTS.get(n, "nchw")).to(DEVICE)
                   for n, shape in module.WEIGHT_SHAPES.items()}  # fmt: skip
        got, want = module.launch(inputs, weights), module.reference(inputs, weights)
        assert got.shape == (2, *module.OUTPUT_SHAPE) and relative_error(got, want) <= TOLERANCE, name
