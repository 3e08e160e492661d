"""The implicit-GEMM conv kernel (codegen/conv.py) against torch.nn.functional.conv2d.

The reference runs in float64 on the same (already rounded) inputs, so the tolerances below measure
only the kernel: fp32 accumulation, the tf32 products a GPU makes when asked, and the rounding of
the output to fp16 / bf16. Inputs are fresh seeded random numbers, weights scaled by 1/sqrt(fan-in)
so outputs are of order one, and explicit outputs start as NaN so an element never written fails.
Without a GPU this runs in Triton's interpreter: small shapes, and tiles chosen to span several
blocks in every dimension.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, INTERPRETING, PRECISIONS, TOLERANCES, activate, explicitly_padded, four_pads, random

from netdsl.codegen.conv import conv2d

# The interpreter warns when a matmul meets NaN or inf: a masked load that read memory it should not have.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.usefixtures("interpreter_bf16_dot")]
# Small tiles: every shape below spans several blocks of pixels, channels and K, with ragged edges.
SMALL_TILES = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
# Under the interpreter a program costs the same whatever its size: one big tile per layer.
BIG_TILES = {"BLOCK_M": 512, "BLOCK_N": 128, "BLOCK_K": 128}


def check_conv(
    *,
    batch: int,
    channels: tuple[int, ...],
    c_out: int,
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    bias: bool = True,
    activation: str = "none",
    slope: float = 0.2,
    precision: str = "fp32",
    config: dict | None = SMALL_TILES,
    seed: int = 0,
) -> None:
    """conv2d on inputs with the given channel counts (two: concat-free) against F.conv2d in float64."""
    dtype, input_precision = PRECISIONS[precision]
    generator = torch.Generator().manual_seed(seed)
    c_in = sum(channels)
    fan_in = c_in // groups * kernel[0] * kernel[1]
    inputs = [random(generator, batch, c, *size).to(DEVICE, dtype) for c in channels]
    weight = random(generator, c_out, c_in // groups, *kernel, scale=fan_in**-0.5).to(DEVICE, dtype)
    bias_tensor = random(generator, c_out, scale=0.5).to(DEVICE, dtype) if bias else None

    expected = F.conv2d(
        explicitly_padded(torch.cat([x.double() for x in inputs], 1), padding),
        weight.double(),
        None if bias_tensor is None else bias_tensor.double(),
        stride,
        0 if four_pads(padding) else padding,
        dilation,
        groups,
    )
    expected = activate(expected, activation, slope)
    out = torch.full(expected.shape, float("nan"), dtype=dtype, device=DEVICE)
    actual = conv2d(
        inputs if len(inputs) > 1 else inputs[0],
        weight,
        bias_tensor,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        activation=activation,
        slope=slope,
        input_precision=input_precision,
        out=out,
        config=config,
    )
    assert actual is out
    torch.testing.assert_close(actual.double(), expected, **TOLERANCES[precision])


GEOMETRIES = {
    "1x1": {"batch": 2, "channels": (8,), "c_out": 12, "size": (7, 9), "kernel": (1, 1)},
    "3x3-pad": {"batch": 1, "channels": (3,), "c_out": 10, "size": (11, 13), "kernel": (3, 3), "padding": 1},
    "3x3-stride2": {"batch": 2, "channels": (5,), "c_out": 7, "size": (9, 10), "kernel": (3, 3), "stride": 2,
                    "padding": 1},
    "5x3-asymmetric": {"batch": 1, "channels": (6,), "c_out": 9, "size": (12, 9), "kernel": (5, 3),
                       "stride": (2, 1), "padding": (2, 1)},
    "3x3-dilation2": {"batch": 2, "channels": (4,), "c_out": 6, "size": (13, 11), "kernel": (3, 3), "padding": 2,
                      "dilation": 2},
    "11x11-stride4": {"batch": 1, "channels": (3,), "c_out": 20, "size": (35, 31), "kernel": (11, 11), "stride": 4},
    "groups2": {"batch": 2, "channels": (10,), "c_out": 14, "size": (9, 9), "kernel": (3, 3), "padding": 1,
                "groups": 2},
    "depthwise": {"batch": 2, "channels": (6,), "c_out": 6, "size": (10, 7), "kernel": (3, 3), "padding": 1,
                  "groups": 6},
    "depthwise-multiplier2": {"batch": 1, "channels": (5,), "c_out": 10, "size": (8, 8), "kernel": (5, 5),
                              "padding": 2, "groups": 5},
}  # fmt: skip


@pytest.mark.parametrize("tiles", ["small-tiles", "picked"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_geometry(geometry: str, tiles: str):
    check_conv(**GEOMETRIES[geometry], config=SMALL_TILES if tiles == "small-tiles" else None)


# Padding (top, left, bottom, right) that PyTorch's conv2d cannot express, checked against F.pad then conv2d:
# TensorFlow's SAME for even kernels and strides above 1 (the extra row and column at the bottom and right),
# SAME_LOWER (at the top and left), padding beyond the kernel, with dilation and groups.
ASYMMETRIC = {
    "same-upper-4x4-stride2": {"batch": 2, "channels": (3,), "c_out": 5, "size": (9, 8), "kernel": (4, 4),
                               "stride": 2, "padding": (1, 1, 2, 1)},
    "same-lower-2x2-stride2": {"batch": 1, "channels": (4,), "c_out": 6, "size": (7, 7), "kernel": (2, 2),
                               "stride": 2, "padding": (1, 1, 0, 0)},
    "beyond-the-kernel": {"batch": 1, "channels": (2,), "c_out": 3, "size": (5, 6), "kernel": (2, 3),
                          "padding": (3, 0, 1, 4)},
    "dilated-grouped": {"batch": 2, "channels": (6,), "c_out": 6, "size": (8, 9), "kernel": (3, 2), "dilation": (2, 3),
                        "padding": (0, 2, 3, 1), "groups": 3},
}  # fmt: skip


@pytest.mark.parametrize("geometry", list(ASYMMETRIC))
def test_padding_each_side_on_its_own(geometry: str):
    check_conv(**ASYMMETRIC[geometry], activation="relu", config=BIG_TILES)


TWO_INPUTS = {
    # AlexNet's conv3 in miniature: both towers' maps, one group.
    "both-towers": {"channels": (8, 8), "c_out": 12, "groups": 1},
    "split-3+5": {"channels": (3, 5), "c_out": 7, "groups": 1},
    # Group 0 reads channels 0-3: three from x0, one from x1. Group 1 reads x1 only.
    "split-inside-group": {"channels": (3, 5), "c_out": 6, "groups": 2},
    "split-at-group": {"channels": (4, 4), "c_out": 6, "groups": 2},
}


@pytest.mark.parametrize("case", list(TWO_INPUTS))
def test_two_inputs_read_as_concatenated(case: str):
    check_conv(batch=2, size=(7, 6), kernel=(3, 3), padding=1, **TWO_INPUTS[case])


@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_epilogue(bias: bool, activation: str):
    check_conv(batch=2, channels=(5,), c_out=9, size=(8, 7), kernel=(3, 3), padding=1, bias=bias,
               activation=activation, seed=1)  # fmt: skip


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("geometry", ["two-inputs-3x3", "11x11-stride4"])
def test_precision(geometry: str, precision: str):
    if geometry == "11x11-stride4":
        check_conv(**GEOMETRIES[geometry], activation="relu", precision=precision, seed=2)
    else:
        check_conv(batch=2, channels=(6, 10), c_out=12, size=(9, 8), kernel=(3, 3), padding=1, activation="relu",
                   precision=precision, seed=2)  # fmt: skip


def test_strided_views_in_and_out():
    """Inputs that are a channel slice and a channels-last tensor; the output a channel slice of a wider buffer."""
    generator = torch.Generator().manual_seed(3)
    wide = random(generator, 2, 9, 10, 11).to(DEVICE)
    x0 = wide[:, 2:6]  # 4 channels of 9
    x1 = random(generator, 2, 3, 10, 11).to(DEVICE).to(memory_format=torch.channels_last)
    weight = random(generator, 5, 7, 3, 3, scale=63**-0.5).to(DEVICE)
    bias = random(generator, 5).to(DEVICE)
    buffer = torch.full((2, 12, 5, 6), float("nan"), device=DEVICE)
    out = buffer[:, 4:9]
    conv2d([x0, x1], weight, bias, stride=2, padding=1, activation="relu", out=out, config=SMALL_TILES)
    expected = F.relu(F.conv2d(torch.cat([x0, x1], 1).double(), weight.double(), bias.double(), 2, 1))
    torch.testing.assert_close(out.double(), expected, **TOLERANCES["fp32"])
    assert buffer[:, :4].isnan().all() and buffer[:, 9:].isnan().all(), "wrote outside the output slice"


def test_allocates_output_of_input_dtype():
    generator = torch.Generator().manual_seed(4)
    x = random(generator, 1, 4, 6, 6).to(DEVICE, torch.float16)
    weight = random(generator, 3, 4, 3, 3, scale=36**-0.5).to(DEVICE, torch.float16)
    y = conv2d(x, weight)
    assert y.dtype == torch.float16 and y.shape == (1, 3, 4, 4)
    torch.testing.assert_close(y.double(), F.conv2d(x.double(), weight.double()), **TOLERANCES["fp16"])


@pytest.mark.slow
def test_alexnet_conv1_full_size():
    """3 x 227 x 227 -> 96 x 55 x 55, 11 x 11 at stride 4 (K = 363), bias and ReLU, batch 1."""
    check_conv(batch=1, channels=(3,), c_out=96, size=(227, 227), kernel=(11, 11), stride=4, activation="relu",
               config=BIG_TILES if INTERPRETING else None, seed=5)  # fmt: skip


def test_rejects_bad_arguments():
    x = torch.zeros(1, 4, 6, 6, device=DEVICE)
    weight = torch.zeros(6, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        conv2d(x, torch.zeros(6, 1, 3, 3, device=DEVICE), groups=3)
    with pytest.raises(ValueError, match="activation"):
        conv2d(x, weight, activation="gelu")
    with pytest.raises(ValueError, match="precision"):
        conv2d(x, weight, input_precision="fp64")
    with pytest.raises(TypeError, match="float16"):
        conv2d(x, weight.half())
    with pytest.raises(ValueError, match="out"):
        conv2d(x, weight, out=torch.zeros(1, 6, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="KH \\+ KW"):
        conv2d(torch.zeros(1, 1, 40, 40, device=DEVICE), torch.zeros(1, 1, 16, 16, device=DEVICE))
    with pytest.raises(ValueError, match="batch or spatial"):
        conv2d([x, torch.zeros(1, 2, 5, 6, device=DEVICE)], torch.zeros(6, 6, 3, 3, device=DEVICE))
