"""The layout pass (netdsl/compiler/layout.py): which maps live channels-last, which convs run conv_nhwc, and that a
net computes the same whatever the layouts, on every kind of step that reads or writes a channels-last map."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import netdsl
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.emit import family_of
from netdsl.compiler.launches import record_launches
from netdsl.compiler.passes import Options, run_pipeline
from netdsl.ir.dtypes import torch_dtype
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file, parse_text

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot")


def program_of(text: str, **options):
    program, _ = run_pipeline(build(parse_text(text, "t.net")), Options(**options))
    return program


def steps(program) -> dict:
    return {name: program.nodes[name]["step"] for name in program.nodes}


def test_alexnet_runs_conv2_to_conv5_channels_last_and_hands_fc6_nchw():
    program, _ = run_pipeline(build(parse_file(ROOT / "nets/alexnet.net")), Options(batch=128, dtype="bf16"))
    by_name = steps(program)
    for tower in ("gpu0", "gpu1"):
        assert family_of(by_name[f"conv1_{tower}_conv_bias_relu"]) == "conv"  # 3 input channels: conv.py
        for layer in ("conv2", "conv3", "conv4", "conv5"):
            step = by_name[f"{layer}_{tower}_conv_bias_relu"]
            assert family_of(step) == "conv_nhwc" and step.layout == "nhwc", layer
        # LRN + pooling between convs keep the layout; the pool before fc6 writes NCHW for the flatten
        assert by_name[f"conv1_{tower}_conv_bias_relu"].layout == "nhwc"
        assert by_name[f"conv1_norm_{tower}_lrn_maxpool"].layout == "nhwc"
        assert by_name[f"conv2_norm_{tower}_lrn_maxpool"].layout == "nhwc"
        assert by_name[f"conv5_maxpool_{tower}_maxpool"].layout == "nchw"
        assert by_name[f"image_{tower}_input"].layout == "nchw"  # read by conv.py only
    for step in by_name.values():
        if step.kind == "transfer":
            assert step.layout == by_name[step.inputs[0]].layout, step.name
        if len(step.shape) == 1:
            assert step.layout == "nchw", step.name
    for name in program.graph["outputs"]:
        assert by_name[name].layout == "nchw"


def test_layout_nchw_keeps_every_map_nchw_and_every_conv_on_conv_py():
    program, _ = run_pipeline(build(parse_file(ROOT / "nets/alexnet.net")), Options(layout="nchw"))
    assert {step.layout for step in steps(program).values()} == {"nchw"}
    assert "conv_nhwc" not in {family_of(step) for step in steps(program).values()}


def test_a_map_read_by_a_flatten_stays_nchw():
    program = program_of(
        """
        net t
        input x: 16 x 8 x 8
        a = conv(x, 16, size=3, pad=1) | relu
        b = conv(a, 16, size=3, pad=1)
        f = flatten(a)
        y = fc(f, 4)
        output b, y
        """
    )
    by_name = steps(program)
    producer = next(step for step in by_name.values() if step.first.name == "a")
    assert producer.options.get("kernel") == "nhwc"  # it reads 16 channels
    assert producer.layout == "nchw", "flatten reads it: its element order must be C, H, W"
    output = next(step for step in by_name.values() if step.first.name == "b")
    assert output.layout == "nchw"  # a net output


# Every kind of step that passes a channels-last map through: element-wise (leaky ReLU), add,
# standalone LRN, LRN + max-pool with ceil mode, a concat of three inputs (a kernel writing channel
# slices), a grouped conv, a conv reading two inputs from two devices (a transfer in between), average
# pooling, and the global pooling + fc that end it.
PASS_THROUGH = """
net t
device gpu0, gpu1
input x: 16 x 11 x 10
a = conv(x, 24, size=3, pad=1)
b = conv(x, 24, size=1) | batchnorm | leaky_relu(0.1)
s = add(a, b) | leaky_relu(0.2)
n = lrn(s, size=5, alpha=1e-2, beta=0.75, k=2)
p = lrn(n, size=3, alpha=1e-2, beta=0.75, k=1) | maxpool(3, stride=2, ceil=true)
q = conv(p, 32, size=3, pad=1, groups=2) | relu
r = conv(p, 16, size=1) on gpu1
j = concat(r, q, p) on gpu1
k = conv(j, 16, size=3, pad=1)
c = concat(k, q)
l = conv(c, 16, size=3, pad=1) | relu
m = avgpool(l, 2, stride=1, pad=1)
g = global_avgpool(m)
y = fc(g, 5)
output y
"""


def test_pass_through_steps_keep_channels_last():
    by_name = steps(program_of(PASS_THROUGH))
    families = {family_of(step) for step in by_name.values()}
    assert {"conv", "conv_nhwc", "add", "eltwise", "lrn", "lrn_maxpool", "concat", "transfer", "pool"} <= families
    layouts = {step.first.name: step.layout for step in by_name.values() if step.kind not in ("transfer", "input")}
    for layer in ("a", "b", "s", "s.leaky_relu", "n", "p", "q", "r", "j", "k", "l"):
        assert layouts[layer] == "nhwc", (layer, layouts)
    # m is where the layout turns: read only by the global pool, whose output an fc flattens
    assert layouts["m"] == layouts["g"] == layouts["y"] == "nchw"
    conv_l = next(step for step in by_name.values() if step.first.name == "l")
    assert len(conv_l.inputs) == 2 and conv_l.options["kernel"] == "nhwc"  # k and q's copy, no concat
    transfers = [step for step in by_name.values() if step.kind == "transfer"]
    assert transfers and all(step.layout == "nhwc" for step in transfers)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layouts_do_not_change_what_a_net_computes(tmp_path, dtype):
    """The Triton kernels with channels-last maps against the same with every map NCHW (relative error 1e-5
    in fp32, 1e-2 in bf16: only summation orders differ), and both against the PyTorch backend in fp32 on
    the same He-initialized weights and a fresh random input (1e-4 in fp32; 3e-2 in bf16, where ten
    steps each round their output to 8 bits of mantissa)."""
    path = tmp_path / "t.net"
    path.write_text(PASS_THROUGH)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(3, 16, 11, 10, generator=generator)
    want = netdsl.load(path, backend="torch", seed=3, init="he")(x).double()
    channels_last = netdsl.load(path, backend="triton", dtype=dtype, seed=3, init="he")
    assert any(step.layout == "nhwc" for step in channels_last._steps.values())
    nchw = netdsl.load(path, backend="triton", dtype=dtype, seed=3, init="he", layout="nchw")
    got = channels_last(x.to(torch_dtype(dtype))).double()
    got_nchw = nchw(x.to(torch_dtype(dtype))).double()
    assert got.is_contiguous()

    def error(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert error(got, got_nchw) <= (1e-5 if dtype == "fp32" else 1e-2)
    for result in (got, got_nchw):
        assert error(result, want) <= (1e-4 if dtype == "fp32" else 3e-2)


def test_bad_layout_is_a_clear_error():
    with pytest.raises(netdsl.NetError, match="unknown layout `nhcw`"):
        netdsl.load(ROOT / "nets/lenet5.net", layout="nhcw")


def test_plan_and_kernel_files_record_the_layouts(tmp_path):
    compiled = compile_net(ROOT / "nets/alexnet.net", Options(batch=4, dtype="bf16"))
    out = write_build(compiled, tmp_path / "alexnet")
    plan = json.loads((out / "plan.json").read_text())
    launches = {entry["step"]: entry for entry in plan["devices"]["gpu0"]["launches"]}
    assert launches["conv3_gpu0_conv_bias_relu"]["layout"] == "nhwc"
    assert launches["conv5_maxpool_gpu0_maxpool"]["layout"] == "nchw"
    buffers = plan["devices"]["gpu0"]["buffers"]
    assert buffers["conv2_gpu0_conv_bias_relu"]["layout"] == "nhwc"
    source = (out / "kernels/conv3_gpu0_conv_bias_relu.py").read_text()
    assert 'INPUT_LAYOUTS = ["nhwc", "nhwc"]' in source and 'WEIGHT_LAYOUTS = {"weight": "nhwc"}' in source
    assert "def conv2d_nhwc_kernel(" in source
    # The recorded launch is the one the runtime makes: unit channel strides are constants (what lets
    # Triton use 16-byte loads), and the channel counts are known to be multiples of 16.
    (launch,) = record_launches([out / "kernels/conv3_gpu0_conv_bias_relu.py"], 4, "bf16")
    assert launch.constexprs["stride_x0c"] == launch.constexprs["stride_x1c"] == launch.constexprs["stride_wc"] == 1
    assert {"C0", "C_IN_G", "C_OUT_G", "x0_ptr", "x1_ptr", "w_ptr"} <= set(launch.divisible_by_16)


def test_layout_flag_of_compile_and_run(tmp_path, capsys):
    from netdsl.cli.main import main

    net = tmp_path / "t.net"
    net.write_text(PASS_THROUGH)
    for layout, expected in (("auto", True), ("nchw", False)):
        out = tmp_path / layout
        assert main(["compile", str(net), "-o", str(out), "--layout", layout, "--no-sm90"]) == 0
        assert ('"layout": "nhwc"' in (out / "plan.json").read_text()) is expected
    saved = {}
    for layout in ("auto", "nchw"):
        saved[layout] = tmp_path / f"{layout}.npy"
        args = ["run", str(net), "--random", "2", "--init", "he", "--layout", layout, "--save", str(saved[layout])]
        assert main(args) == 0
    first, second = (np.load(saved[layout]) for layout in ("auto", "nchw"))
    assert np.abs(first - second).max() <= 1e-5 * np.abs(second).max()
    capsys.readouterr()
    assert main(["compile", str(net), "--layout", "nhwc"]) == 1
    assert "invalid choice: 'nhwc'" in capsys.readouterr().err
