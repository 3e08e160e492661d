"""The conv backward kernels (codegen/conv_backward.py) against PyTorch autograd.

The reference is torch autograd through F.conv2d + bias + activation in float64, on the same (already rounded)
inputs and the same incoming gradient, so a tolerance measures only the kernel: fp32 accumulation and the
rounding of the gradients to fp16 / bf16 (and, for leaky ReLU, of dy * slope before a 16-bit tensor-core
product). Errors are measured against the largest reference value of each gradient: max |kernel - reference|
divided by max |reference|. The saved output handed to the kernels is the reference's, rounded to the dtype.
Inputs are fresh seeded random numbers, weights scaled by 1/sqrt(fan-in), gradients written into tensors that
start as NaN, so an element never written fails. Without a GPU this runs in Triton's interpreter, its
fp32 -> bf16 conversion rounding to nearest even as a GPU's does (netdsl.codegen.interpret). Small shapes
throughout; a few cases with small tiles span several blocks in every dimension.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, PRECISIONS, activate, explicitly_padded, four_pads, random

from netdsl.codegen.conv_backward import (
    DGRAD_CONFIGS,
    EXACT_FP32_DGRAD_CONFIGS,
    FP32_DGRAD_CONFIGS,
    WGRAD_CONFIGS,
    conv2d_backward,
    conv2d_dgrad,
    conv2d_wgrad,
)

# The interpreter warns when a matmul meets NaN or inf: a masked load that read memory it should not have.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.usefixtures("interpreter_bf16_dot")]

# Largest error allowed, relative to the largest reference value of the gradient.
TOLERANCES = {
    "fp32": 1e-5,  # exact products ("ieee"), fp32 sums: measured below 5e-7
    "tf32": 1e-2,  # on a GPU, 10-bit mantissa products; the interpreter computes them exactly
    "fp16": 2e-3,  # the gradient rounded to fp16 (2**-11 relative)
    "bf16": 1.6e-2,  # the gradient rounded to bf16 (2**-8 relative), with room for fp32 sums in any order
}
SMALL_TILES = {
    "dgrad": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    "wgrad": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
}


def make_case(geometry: dict, precision: str, bias: bool, activation: str, slope: float, seed: int) -> dict:
    """Random x, weight, bias and incoming gradient, and the reference output and gradients (float64)."""
    dtype, _ = PRECISIONS[precision]
    generator = torch.Generator().manual_seed(seed)
    kh, kw = geometry["kernel"]
    groups = geometry.get("groups", 1)
    c_in, c_out = geometry["c_in"], geometry["c_out"]
    x = random(generator, geometry["batch"], c_in, *geometry["size"]).to(DEVICE, dtype)
    weight = random(generator, c_out, c_in // groups, kh, kw, scale=(c_in // groups * kh * kw) ** -0.5)
    weight = weight.to(DEVICE, dtype)
    bias_tensor = random(generator, c_out, scale=0.5).to(DEVICE, dtype) if bias else None

    padding = geometry.get("padding", 0)
    leaves = [x.double().requires_grad_(), weight.double().requires_grad_()]
    if bias:
        leaves.append(bias_tensor.double().requires_grad_())
    z = F.conv2d(
        explicitly_padded(leaves[0], padding),
        leaves[1],
        leaves[2] if bias else None,
        geometry.get("stride", 1),
        0 if four_pads(padding) else padding,
        geometry.get("dilation", 1),
        groups,
    )
    y = activate(z, activation, slope)
    grad_out = random(generator, *y.shape).to(DEVICE, dtype)
    y.backward(grad_out.double())
    return {
        "x": x,
        "weight": weight,
        "grad_out": grad_out,
        "out": None if activation == "none" else y.detach().to(dtype),  # not needed without an activation
        "expected": [leaf.grad for leaf in leaves],
    }


def run_backward(case: dict, geometry: dict, precision: str, bias: bool, activation: str, slope: float,
                 configs: dict | None = None, splits: int | None = None) -> list[torch.Tensor]:  # fmt: skip
    """dgrad and wgrad into NaN-filled gradients: [grad_input, grad_weight] and grad_bias with a bias."""
    _, input_precision = PRECISIONS[precision]
    x, weight, grad_out = case["x"], case["weight"], case["grad_out"]
    options = {
        "stride": geometry.get("stride", 1), "padding": geometry.get("padding", 0),
        "dilation": geometry.get("dilation", 1), "groups": geometry.get("groups", 1),
        "activation": activation, "slope": slope, "input_precision": input_precision,
    }  # fmt: skip
    configs = configs or {}
    grad_input = torch.full_like(x, float("nan"))
    grad_weight = torch.full_like(weight, float("nan"))
    grad_bias = torch.full((weight.shape[0],), float("nan"), dtype=x.dtype, device=DEVICE) if bias else None
    dx = conv2d_dgrad(grad_out, case["out"], weight, x.shape, **options, grad_input=grad_input,
                      config=configs.get("dgrad"))  # fmt: skip
    dw, db = conv2d_wgrad(grad_out, case["out"], x, weight.shape, **options, bias=bias, grad_weight=grad_weight,
                          grad_bias=grad_bias, config=configs.get("wgrad"), splits=splits)  # fmt: skip
    assert dx is grad_input and dw is grad_weight and db is grad_bias
    return [dx, dw, db] if bias else [dx, dw]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (NaN, and so a failure, if an element was never written)."""
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def check_backward(geometry: dict, *, precision: str = "fp32", bias: bool = True, activation: str = "relu",
                   slope: float = 0.2, configs: dict | None = None, splits: int | None = None,
                   seed: int = 0) -> None:  # fmt: skip
    case = make_case(geometry, precision, bias, activation, slope, seed)
    actual = run_backward(case, geometry, precision, bias, activation, slope, configs, splits)
    for name, got, expected in zip(("grad_input", "grad_weight", "grad_bias"), actual, case["expected"]):
        error = relative_error(got, expected)
        assert error <= TOLERANCES[precision], f"{name}: error {error:.3g} of the largest value"


GEOMETRIES = {
    "3x3-pad1": {"batch": 2, "c_in": 5, "c_out": 7, "size": (9, 10), "kernel": (3, 3), "padding": 1},
    "3x3-stride2-pad1": {"batch": 2, "c_in": 4, "c_out": 6, "size": (11, 9), "kernel": (3, 3), "stride": 2,
                         "padding": 1},
    "5x5-pad2": {"batch": 1, "c_in": 6, "c_out": 8, "size": (9, 9), "kernel": (5, 5), "padding": 2},
    # Three of the four stride phases meet no tap: their gradient is zero.
    "1x1-stride2": {"batch": 2, "c_in": 6, "c_out": 5, "size": (7, 8), "kernel": (1, 1), "stride": 2},
    # 2 x 2 windows at stride 2: every input pixel in exactly one window, every phase one tap.
    "2x2-stride2": {"batch": 3, "c_in": 4, "c_out": 3, "size": (8, 7), "kernel": (2, 2), "stride": 2},
    # An input smaller than the stride: the phases past it have no pixels.
    "1x1-stride4-tiny": {"batch": 2, "c_in": 3, "c_out": 2, "size": (3, 2), "kernel": (1, 1), "stride": 4},
    "3x3-stride4-pad1": {"batch": 1, "c_in": 3, "c_out": 4, "size": (10, 11), "kernel": (3, 3), "stride": 4,
                         "padding": 1},
    "3x3-dilation2-pad2": {"batch": 2, "c_in": 4, "c_out": 6, "size": (10, 11), "kernel": (3, 3), "padding": 2,
                           "dilation": 2},
    # gcd(stride, dilation) = 2: the odd phases meet no tap, the even ones every tap.
    # gcd(stride, dilation) = 1: taps 0 and 2 reach one phase, tap 1 the other, some through outputs above them.
    "3x3-stride2-dilation3": {"batch": 1, "c_in": 3, "c_out": 4, "size": (14, 13), "kernel": (3, 3), "stride": 2,
                              "padding": 1, "dilation": 3},
    "3x3-stride2-dilation2": {"batch": 1, "c_in": 3, "c_out": 4, "size": (13, 12), "kernel": (3, 3), "stride": 2,
                              "padding": 2, "dilation": 2},
    "5x3-stride2x1": {"batch": 1, "c_in": 4, "c_out": 5, "size": (12, 9), "kernel": (5, 3), "stride": (2, 1),
                      "padding": (2, 1)},
    "conv1-11x11-stride4": {"batch": 2, "c_in": 3, "c_out": 8, "size": (23, 27), "kernel": (11, 11), "stride": 4},
    "conv1-batch1": {"batch": 1, "c_in": 3, "c_out": 6, "size": (19, 19), "kernel": (11, 11), "stride": 4},
    "groups2": {"batch": 2, "c_in": 8, "c_out": 6, "size": (9, 9), "kernel": (3, 3), "padding": 1, "groups": 2},
    "groups2-5x5-stride2-pad2": {"batch": 2, "c_in": 6, "c_out": 4, "size": (11, 10), "kernel": (5, 5),
                                 "stride": 2, "padding": 2, "groups": 2},
    "depthwise": {"batch": 1, "c_in": 4, "c_out": 4, "size": (8, 7), "kernel": (3, 3), "padding": 1, "groups": 4},
    # (top, left, bottom, right), as the forward kernels take; the gradient only depends on the top and left.
    "pads-each-side": {"batch": 1, "c_in": 3, "c_out": 4, "size": (7, 8), "kernel": (3, 3), "stride": 2,
                       "padding": (1, 0, 2, 1)},
}  # fmt: skip


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_geometry_fp32(geometry: str):
    check_backward(GEOMETRIES[geometry])


@pytest.mark.parametrize(
    "geometry", ["3x3-stride2-pad1", "3x3-stride2-dilation2", "conv1-11x11-stride4", "groups2-5x5-stride2-pad2"]
)
def test_geometry_bf16(geometry: str):
    check_backward(GEOMETRIES[geometry], precision="bf16", seed=1)


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_other_precisions(precision: str):
    check_backward(GEOMETRIES["3x3-stride2-pad1"], precision=precision, seed=2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["none", "leaky_relu"])
def test_other_activations(activation: str, precision: str):
    check_backward(GEOMETRIES["groups2"], precision=precision, activation=activation, seed=3)


def test_without_bias():
    check_backward(GEOMETRIES["3x3-stride2-pad1"], bias=False, seed=4)


@pytest.mark.parametrize("geometry", ["3x3-stride2-pad1", "2x2-stride2", "groups2-5x5-stride2-pad2"])
def test_small_tiles(geometry: str):
    """Several tiles along every dimension, ragged edges, three splits; "2x2-stride2" has K = 16 weight columns,
    so the bias's column of ones is a column tile of its own."""
    check_backward(GEOMETRIES[geometry], configs=SMALL_TILES, splits=3, seed=5)


# Every tile a GPU launch may pick, once each (fp32 dgrad's few-channel tile is the 16-bit one).
DGRAD_TILES = DGRAD_CONFIGS + FP32_DGRAD_CONFIGS + EXACT_FP32_DGRAD_CONFIGS
GPU_TILES = {f"{kind}-{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}": (kind, config)
             for kind, configs in (("dgrad", DGRAD_TILES), ("wgrad", WGRAD_CONFIGS))
             for config in configs}  # fmt: skip


@pytest.mark.parametrize("tile", list(GPU_TILES))
def test_gpu_tiles(tile: str):
    """Each tile a GPU launch may pick gives the right gradients (here, in the interpreter)."""
    kind, config = GPU_TILES[tile]
    check_backward(GEOMETRIES["groups2-5x5-stride2-pad2"], configs={kind: config}, splits=2, seed=9)


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_split_k(splits: int):
    check_backward(GEOMETRIES["groups2"], configs={"wgrad": SMALL_TILES["wgrad"]}, splits=splits, seed=6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deterministic(precision: str):
    """Two launches give the same bits: the split partials are summed in a fixed order, with no atomics."""
    geometry = GEOMETRIES["conv1-11x11-stride4"]
    case = make_case(geometry, precision, True, "relu", 0.2, seed=7)
    configs = {"wgrad": {**SMALL_TILES["wgrad"], "BLOCK_K": 32}}
    first = run_backward(case, geometry, precision, True, "relu", 0.2, configs, splits=4)
    second = run_backward(case, geometry, precision, True, "relu", 0.2, configs, splits=4)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_backward_picks_tiles_and_skips_the_input_gradient():
    geometry = GEOMETRIES["5x5-pad2"]
    case = make_case(geometry, "fp32", True, "relu", 0.2, seed=8)
    dx, dw, db = conv2d_backward(case["grad_out"], case["out"], case["x"], case["weight"], padding=2,
                                 activation="relu")  # fmt: skip
    for name, got, expected in zip(("grad_input", "grad_weight", "grad_bias"), (dx, dw, db), case["expected"]):
        assert relative_error(got, expected) <= TOLERANCES["fp32"], name
    none, dw_only, no_bias = conv2d_backward(case["grad_out"], case["out"], case["x"], case["weight"], bias=False,
                                             padding=2, activation="relu", input_grad=False)  # fmt: skip
    assert none is None and no_bias is None
    assert torch.equal(dw_only, dw)


def test_rejects_bad_arguments():
    x = torch.zeros(1, 4, 6, 6, device=DEVICE)
    weight = torch.zeros(6, 4, 3, 3, device=DEVICE)
    grad_out = torch.zeros(1, 6, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="grad_out has shape"):
        conv2d_dgrad(grad_out, grad_out, weight, x.shape, padding=1, activation="relu")
    with pytest.raises(ValueError, match="saved output"):
        conv2d_wgrad(grad_out, None, x, weight.shape, activation="relu")
    with pytest.raises(ValueError, match="groups"):
        conv2d_dgrad(grad_out, None, torch.zeros(6, 1, 3, 3, device=DEVICE), x.shape, groups=3)
    with pytest.raises(ValueError, match="activation"):
        conv2d_dgrad(grad_out, grad_out, weight, x.shape, activation="gelu")
    with pytest.raises(ValueError, match="precision"):
        conv2d_wgrad(grad_out, None, x, weight.shape, input_precision="tf32x3")
    with pytest.raises(TypeError, match="float32"):
        conv2d_wgrad(grad_out, None, x.half(), weight.shape)
    with pytest.raises(TypeError, match="int32"):
        conv2d_dgrad(grad_out.int(), None, weight.int(), x.shape)
    with pytest.raises(ValueError, match="splits"):
        conv2d_wgrad(grad_out, None, x, weight.shape, splits=0)
    with pytest.raises(ValueError, match="contiguous"):
        transposed = torch.zeros(6, 3, 3, 4, device=DEVICE).permute(0, 3, 1, 2)
        conv2d_wgrad(grad_out, None, x, weight.shape, grad_weight=transposed)
