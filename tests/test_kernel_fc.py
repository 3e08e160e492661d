"""The fully connected kernel (codegen/fc.py) against torch.nn.functional.linear.

The reference runs in float64 on the same (already rounded) inputs, so the tolerances below measure
only the kernel: fp32 accumulation, the tf32 products a GPU makes when asked, and the rounding of
the output to fp16 / bf16. Inputs are fresh seeded random numbers, weights scaled by 1/sqrt(K) so
outputs are of order one, and outputs start as NaN so an element never written fails. Without a
GPU this runs in Triton's interpreter.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, INTERPRETING, PRECISIONS, TOLERANCES, activate, random

from netdsl.codegen.fc import linear

# The interpreter warns when a matmul meets NaN or inf: a masked load that read memory it should not have.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.usefixtures("interpreter_bf16_dot")]
# Small tiles: every shape below spans several blocks of rows, units and K, with ragged edges.
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
# Under the interpreter a program costs the same whatever its size: a few big tiles per layer.
BIG_TILES = {"BLOCK_M": 16, "BLOCK_N": 512, "BLOCK_K": 2048}


def check_linear(
    *,
    batch: int,
    features: tuple[tuple[int, ...], ...],
    units: int,
    bias: bool = True,
    activation: str = "none",
    slope: float = 0.2,
    precision: str = "fp32",
    config: dict | None = SMALL_TILES,
    seed: int = 0,
) -> None:
    """linear on one or two inputs of per-sample shapes `features` against F.linear in float64."""
    dtype, input_precision = PRECISIONS[precision]
    generator = torch.Generator().manual_seed(seed)
    inputs = [random(generator, batch, *shape).to(DEVICE, dtype) for shape in features]
    k = sum(x[0].numel() for x in inputs)
    weight = random(generator, units, k, scale=k**-0.5).to(DEVICE, dtype)
    bias_tensor = random(generator, units, scale=0.5).to(DEVICE, dtype) if bias else None

    flat = torch.cat([x.double().flatten(1) for x in inputs], 1)
    expected = F.linear(flat, weight.double(), None if bias_tensor is None else bias_tensor.double())
    expected = activate(expected, activation, slope)
    out = torch.full(expected.shape, float("nan"), dtype=dtype, device=DEVICE)
    actual = linear(
        inputs if len(inputs) > 1 else inputs[0],
        weight,
        bias_tensor,
        activation=activation,
        slope=slope,
        input_precision=input_precision,
        out=out,
        config=config,
    )
    assert actual is out
    torch.testing.assert_close(actual.double(), expected, **TOLERANCES[precision])


SHAPES = {
    "vector": {"features": ((37,),), "units": 29},
    # fc6 in miniature: both towers' C x H x W maps, flattened channel-major.
    "two-maps": {"features": ((4, 3, 3), (5, 3, 3)), "units": 70},
    "two-vectors": {"features": ((24,), (17,)), "units": 33},
}


@pytest.mark.parametrize("tiles", ["small-tiles", "picked"])
@pytest.mark.parametrize("batch", [1, 3, 20, 130])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes_and_batches(shape: str, batch: int, tiles: str):
    check_linear(batch=batch, **SHAPES[shape], config=SMALL_TILES if tiles == "small-tiles" else None)


@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_epilogue(bias: bool, activation: str):
    check_linear(batch=5, **SHAPES["two-maps"], bias=bias, activation=activation, seed=1)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("batch", [1, 20])
def test_precision(batch: int, precision: str):
    check_linear(batch=batch, **SHAPES["two-maps"], activation="relu", precision=precision, seed=2)


def test_strided_views_in_and_out():
    """Inputs that are channel slices of wider maps, the weight a row slice, the output a column slice."""
    generator = torch.Generator().manual_seed(3)
    maps = random(generator, 3, 10, 2, 2).to(DEVICE)
    x0, x1 = maps[:, :4], maps[:, 6:]
    weight = random(generator, 40, 32, scale=32**-0.5).to(DEVICE)[5:30]
    bias = random(generator, 25).to(DEVICE)
    buffer = torch.full((3, 40), float("nan"), device=DEVICE)
    out = buffer[:, 10:35]
    linear([x0, x1], weight, bias, activation="relu", out=out, config=SMALL_TILES)
    expected = F.relu(F.linear(torch.cat([x0.flatten(1), x1.flatten(1)], 1).double(), weight.double(), bias.double()))
    torch.testing.assert_close(out.double(), expected, **TOLERANCES["fp32"])
    assert buffer[:, :10].isnan().all() and buffer[:, 35:].isnan().all(), "wrote outside the output slice"


def test_allocates_output_of_input_dtype():
    generator = torch.Generator().manual_seed(4)
    x = random(generator, 2, 19).to(DEVICE, torch.bfloat16)
    weight = random(generator, 7, 19, scale=19**-0.5).to(DEVICE, torch.bfloat16)
    y = linear(x, weight)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 7)
    torch.testing.assert_close(y.double(), F.linear(x.double(), weight.double()), **TOLERANCES["bf16"])


@pytest.mark.slow
def test_alexnet_fc6_full_size():
    """One tower's fc6 at batch 1: both towers' 128 x 6 x 6 maps (K = 9216) -> 2048 units, bias and ReLU."""
    check_linear(batch=1, features=((128, 6, 6), (128, 6, 6)), units=2048, activation="relu",
                 config=BIG_TILES if INTERPRETING else None, seed=5)  # fmt: skip


def test_rejects_bad_arguments():
    x = torch.zeros(2, 8, device=DEVICE)
    weight = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cannot be flattened"):
        linear(torch.zeros(2, 4, 6, device=DEVICE).transpose(1, 2), torch.zeros(4, 24, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        linear(x, torch.zeros(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="activation"):
        linear(x, weight, activation="gelu")
    with pytest.raises(TypeError, match="float16"):
        linear(x, weight.half())
    with pytest.raises(ValueError, match="out"):
        linear(x, weight, out=torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="batch size"):
        linear([x, torch.zeros(3, 8, device=DEVICE)], torch.zeros(4, 16, device=DEVICE))
