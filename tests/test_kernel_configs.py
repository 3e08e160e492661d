"""Every GPU tile configuration of the conv and fc kernels (`CONFIGS` and the exact-fp32 and unaligned tiles in
codegen/conv.py and codegen/fc.py) computes the right numbers, not only builds for sm_90 (tests/test_sm90_conv.py).

Without a GPU the launchers pick the interpreter's one big tile; here each GPU configuration is forced,
on small shapes that are multiples of none of its blocks (pixels, output channels, K = C_in/groups x
KH x KW, batch rows, units, features), batch 2, two groups, and two inputs read as one, in fp32 and bf16
against torch.nn.functional in float64 (tests/test_kernel_conv.py and test_kernel_fc.py).
"""

import pytest
from kernel_support import PRECISIONS
from test_kernel_conv import check_conv
from test_kernel_fc import check_linear

from netdsl.codegen import conv, fc, tile_rules

# The interpreter warns when a matmul meets NaN or inf: a masked load that read memory it should not have.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.usefixtures("interpreter_bf16_dot")]
PRECISIONS_RUN = ["fp32", "bf16"]
assert set(PRECISIONS_RUN) <= set(PRECISIONS)


def config_id(config: dict) -> str:
    return f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}-w{config['num_warps']}-s{config['num_stages']}"


CONV_GEOMETRIES = {
    # M = 2 x 9 x 11 = 198 pixels, N = 70 channels per group, K = 13 x 3 x 3 = 117; group 0 reads 11
    # channels of x0 and 2 of x1 (the split inside a group), group 1 only x1.
    "two-inputs-groups2": {"batch": 2, "channels": (11, 15), "c_out": 140, "size": (9, 11), "kernel": (3, 3),
                           "padding": 1, "groups": 2, "activation": "relu"},
    # M = 2 x 8 x 7 = 112, N = 67, K = 3 x 5 x 3 = 45; strided, asymmetric, padded.
    "strided-groups2": {"batch": 2, "channels": (6,), "c_out": 134, "size": (15, 13), "kernel": (5, 3),
                        "stride": 2, "padding": (2, 1), "groups": 2, "activation": "leaky_relu"},
}  # fmt: skip


@pytest.mark.parametrize("precision", PRECISIONS_RUN)
@pytest.mark.parametrize("geometry", list(CONV_GEOMETRIES))
@pytest.mark.parametrize("config", [*conv.CONFIGS, conv.EXACT_FP32_NARROW], ids=config_id)
def test_conv_config(config: dict, geometry: str, precision: str):
    shape = CONV_GEOMETRIES[geometry]
    c_in_group = sum(shape["channels"]) // shape["groups"]
    k = c_in_group * shape["kernel"][0] * shape["kernel"][1]
    assert k % config["BLOCK_K"] and (shape["c_out"] // shape["groups"]) % config["BLOCK_N"]  # ragged edges
    check_conv(**shape, precision=precision, config=config, seed=len(geometry))


FC_SHAPES = {
    # K = 5 x 3 x 3 + 37 = 82 features from two inputs (a map and a vector), 70 units.
    "two-inputs": {"features": ((5, 3, 3), (37,)), "units": 70, "activation": "relu"},
    "one-input": {"features": ((45,),), "units": 33, "activation": "leaky_relu"},
}


@pytest.mark.parametrize("precision", PRECISIONS_RUN)
@pytest.mark.parametrize("shape", list(FC_SHAPES))
@pytest.mark.parametrize(
    "config", [*fc.CONFIGS, *fc.FP32_CONFIGS, fc.UNALIGNED_CONFIG, fc.EXACT_FP32_CONFIG], ids=config_id
)
def test_fc_config(config: dict, shape: str, precision: str):
    check_linear(batch=2, **FC_SHAPES[shape], precision=precision, config=config, seed=len(shape))


@pytest.mark.parametrize(
    ("text", "version"), [("3.6.0", (3, 6)), ("3.9.0+git1a2b3c", (3, 9)), ("3.10.0rc1", (3, 10)), ("4.0", (4, 0))]
)
def test_the_triton_version_the_tile_pickers_ask_is_read_from_any_release(text: str, version: tuple[int, int]):
    """The square tiles are chosen by (major, minor) as numbers: 3.10 is after 3.9, where strings say otherwise."""
    assert tile_rules._version(text) == version
