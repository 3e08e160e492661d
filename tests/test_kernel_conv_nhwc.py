"""The channels-last conv (codegen/conv_nhwc.py, the compiler's conv for 16+ input channels per group)
against torch.nn.functional.conv2d in float64.

The same geometries as the main conv kernel's tests, with channels-last and NCHW inputs, weights and
outputs, every precision, one input or two read as concatenated (AlexNet's conv3); explicit outputs
start as NaN so an element never written fails.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, INTERPRETING, PRECISIONS, TOLERANCES, activate, explicitly_padded, four_pads, random
from test_kernel_conv import ASYMMETRIC, GEOMETRIES

from netdsl.codegen.conv_nhwc import conv2d_nhwc

pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.usefixtures("interpreter_bf16_dot")]
# Several blocks of pixels, filters and channels per layer, with ragged edges (K blocks of 16: tl.dot's least).
SMALL_TILES = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
CHANNELS_LAST = torch.channels_last


def check(geometry: dict, precision: str = "fp32", layout: str = "nhwc", activation: str = "relu",
          config: dict | None = SMALL_TILES, seed: int = 0) -> None:  # fmt: skip
    dtype, input_precision = PRECISIONS[precision]
    generator = torch.Generator().manual_seed(seed)
    channels = geometry["channels"]  # one input, or two read as their concatenation
    c_in, groups = sum(channels), geometry.get("groups", 1)
    kernel, c_out = geometry["kernel"], geometry["c_out"]
    fan_in = c_in // groups * kernel[0] * kernel[1]
    inputs = [random(generator, geometry["batch"], c, *geometry["size"]).to(DEVICE, dtype) for c in channels]
    weight = random(generator, c_out, c_in // groups, *kernel, scale=fan_in**-0.5).to(DEVICE, dtype)
    bias = random(generator, c_out, scale=0.5).to(DEVICE, dtype)
    conv = {key: geometry.get(key, default) for key, default in (("stride", 1), ("padding", 0), ("dilation", 1))}
    x = explicitly_padded(torch.cat(inputs, dim=1).double(), conv["padding"])
    torch_conv = {**conv, "padding": 0} if four_pads(conv["padding"]) else conv
    expected = activate(F.conv2d(x, weight.double(), bias.double(), groups=groups, **torch_conv), activation, 0.2)
    memory = CHANNELS_LAST if layout == "nhwc" else torch.contiguous_format
    out = torch.full(expected.shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=memory)
    actual = conv2d_nhwc(
        [t.contiguous(memory_format=memory) for t in inputs], weight.contiguous(memory_format=memory), bias,
        groups=groups, activation=activation, slope=0.2, input_precision=input_precision, out=out, config=config,
        **conv,
    )  # fmt: skip
    assert actual is out
    torch.testing.assert_close(actual.double(), expected, **TOLERANCES[precision])


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_geometry(geometry: str, layout: str):
    check(GEOMETRIES[geometry], layout=layout)


@pytest.mark.parametrize("geometry", list(ASYMMETRIC))
def test_padding_each_side_on_its_own(geometry: str):
    """conv.py's cases of padding PyTorch cannot express, with 16+ channels per group as this kernel's layers have."""
    wide = {**ASYMMETRIC[geometry], "channels": (16 * ASYMMETRIC[geometry].get("groups", 1),)}
    check(wide, config=None)


TWO_INPUTS = {
    # AlexNet's conv3 in miniature: both towers' maps, one group; each input fills whole K blocks.
    "both-towers": {"channels": (16, 16), "c_out": 12, "groups": 1},
    # Ragged shares: x0's 20 channels end inside a K block, x1's 12 begin a block of their own.
    "ragged-20+12": {"channels": (20, 12), "c_out": 7, "groups": 1},
    # Group 0 reads channels 0-23: 20 from x0, 4 from x1. Group 1 reads x1 only.
    "split-inside-group": {"channels": (20, 28), "c_out": 6, "groups": 2},
    "split-at-group": {"channels": (24, 24), "c_out": 6, "groups": 2},
}


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("case", list(TWO_INPUTS))
def test_two_inputs_read_as_concatenated(case: str, layout: str):
    geometry = {"batch": 2, "size": (7, 6), "kernel": (3, 3), "padding": 1, **TWO_INPUTS[case]}
    check(geometry, layout=layout, seed=5)


def test_two_inputs_in_16_bit_with_picked_tiles():
    geometry = {"batch": 2, "size": (6, 5), "kernel": (3, 3), "padding": 1, "channels": (32, 16), "c_out": 20}
    check(geometry, precision="bf16", config=None, seed=6)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_precision(precision: str):
    geometry = {"batch": 2, "channels": (40,), "c_out": 24, "size": (9, 8), "kernel": (3, 3), "padding": 1}
    check(geometry, precision=precision, config=None if INTERPRETING else SMALL_TILES, seed=3)


@pytest.mark.parametrize("activation", ["none", "leaky_relu"])
def test_epilogue_and_picked_tiles(activation: str):
    geometry = {"batch": 2, "channels": (20,), "c_out": 70, "size": (7, 7), "kernel": (3, 3), "padding": 1}
    check(geometry, activation=activation, config=None, seed=4)


# Split-K (`SPLIT_K` programs per output tile, each over TAPS_PER_SPLIT taps, the last to arrive adding the partial
# sums in split order): splits of one tap and of several, a last split with fewer taps, groups, two inputs, a 5x5
# filter, fp32 and bf16; each against float64, as one program per tile is.
SPLITS = {
    "9-of-1": ({"batch": 1, "channels": (16,), "c_out": 20, "size": (7, 6), "kernel": (3, 3), "padding": 1}, 9, 1),
    "4-of-2-ragged": ({"batch": 2, "channels": (20, 12), "c_out": 12, "size": (5, 6), "kernel": (3, 3),
                       "padding": 1}, 5, 2),
    "groups-3-of-3": ({"batch": 1, "channels": (48,), "c_out": 12, "size": (6, 6), "kernel": (3, 3), "padding": 1,
                       "groups": 2}, 3, 3),
    "5x5-5-of-5": ({"batch": 1, "channels": (16,), "c_out": 8, "size": (7, 7), "kernel": (5, 5), "padding": 2}, 5, 5),
}  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(SPLITS))
def test_split_k(case: str, precision: str):
    geometry, splits, per = SPLITS[case]
    check(geometry, precision=precision, config={**SMALL_TILES, "SPLIT_K": splits, "TAPS_PER_SPLIT": per}, seed=7)
    check(geometry, precision=precision, config=SMALL_TILES, seed=7)


def test_split_k_adds_in_split_order():
    """The same bits as one program per tile would give are not guaranteed (the sums are grouped by split), but
    the same bits run after run are: twice the same launch, and both within fp32's tolerance of float64."""
    generator = torch.Generator().manual_seed(8)
    x = random(generator, 1, 32, 9, 9).to(DEVICE).contiguous(memory_format=CHANNELS_LAST)
    w = random(generator, 24, 32, 3, 3, scale=0.05).to(DEVICE)
    config = {**SMALL_TILES, "SPLIT_K": 3, "TAPS_PER_SPLIT": 3}
    first, second = (conv2d_nhwc(x, w, padding=1, config=config) for _ in range(2))
    assert torch.equal(first, second)
    torch.testing.assert_close(first.double(), F.conv2d(x.double(), w.double(), padding=1), **TOLERANCES["fp32"])


def test_split_taps_rule():
    from netdsl.codegen.conv_nhwc import split_taps

    assert split_taps(9, 9) == {"SPLIT_K": 9, "TAPS_PER_SPLIT": 1}  # conv3 at batch 1, merged: 81 programs
    assert split_taps(24, 25) == {"SPLIT_K": 5, "TAPS_PER_SPLIT": 5}  # conv2 at batch 1, merged: 120 programs
    assert split_taps(18, 9) == {"SPLIT_K": 5, "TAPS_PER_SPLIT": 2}  # conv4: 7 at most, 2 taps each, 5 splits
    assert split_taps(66, 9) == {"SPLIT_K": 1, "TAPS_PER_SPLIT": 9}  # half the SMs busy: no split
    assert split_taps(10, 1) == {"SPLIT_K": 1, "TAPS_PER_SPLIT": 1}  # a 1x1 conv: nothing to split


def test_split_k_config_must_cover_the_taps():
    generator = torch.Generator().manual_seed(9)
    x, w = random(generator, 1, 16, 6, 6).to(DEVICE), random(generator, 8, 16, 3, 3).to(DEVICE)
    for splits, per in ((2, 4), (4, 3), (0, 9)):
        with pytest.raises(ValueError, match="does not cover 9 taps"):
            conv2d_nhwc(x, w, padding=1, config={**SMALL_TILES, "SPLIT_K": splits, "TAPS_PER_SPLIT": per})


def test_default_output_is_channels_last():
    generator = torch.Generator().manual_seed(10)
    x = random(generator, 1, 16, 6, 6).to(DEVICE).contiguous(memory_format=CHANNELS_LAST)
    w = random(generator, 8, 16, 3, 3, scale=0.1).to(DEVICE)
    y = conv2d_nhwc(x, w, padding=1)
    assert y.is_contiguous(memory_format=CHANNELS_LAST)
    torch.testing.assert_close(y.double(), F.conv2d(x.double(), w.double(), padding=1), **TOLERANCES["fp32"])


def test_rejects_bad_arguments():
    generator = torch.Generator().manual_seed(11)
    x = random(generator, 1, 4, 6, 6).to(DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_nhwc(x, random(generator, 6, 3, 3, 3).to(DEVICE))
    with pytest.raises(TypeError, match=r"weight is torch\.float16 but the input is torch\.float32"):
        conv2d_nhwc(x, random(generator, 6, 4, 3, 3).to(DEVICE, torch.float16))
    with pytest.raises(ValueError, match="empty"):
        conv2d_nhwc(x, random(generator, 6, 4, 7, 7).to(DEVICE))
