"""The fc backward kernels (codegen/fc_backward.py) against PyTorch autograd through F.linear + bias + activation.

The reference runs in float64 on the same (already rounded) inputs, and the saved output Y it hands the kernels is
its own output rounded to the kernels' dtype (rounding keeps the sign, so both see the same ReLU mask): the
tolerances (tests/kernel_support.py, per dtype) measure only the kernels: fp32 accumulation, tf32 products on a
GPU when asked, and the rounding of dX, dW and db to fp16 / bf16. Inputs are fresh seeded random numbers, the
weight scaled by 1/sqrt(features) and dY by 1/sqrt(batch), so every gradient is of order one. Without a GPU
this runs in Triton's interpreter.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, PRECISIONS, TOLERANCES, activate, random

from netdsl.codegen.fc_backward import linear_backward, pick_config

# The interpreter warns when a matmul meets NaN or inf: a masked load that read memory it should not have.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.usefixtures("interpreter_bf16_dot")]
# Small tiles: every shape below spans several tiles of rows, units and features, with ragged edges, and wgrad
# splits a batch of 37 into three slices of 16 rows. (The interpreter's time goes by program instance: 16 x 16 x 16
# tiles take twice as long.)
SMALL_TILES = {
    "dgrad": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "wgrad": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLITS": 4, "num_warps": 4, "num_stages": 2},
}
SHAPES = {
    "vector": {"features": ((37,),), "units": 29},
    "map": {"features": ((5, 3, 3),), "units": 33},
    # fc6 in miniature: both towers' C x H x W maps, flattened channel-major.
    "two-maps": {"features": ((4, 3, 3), (5, 3, 3)), "units": 70},
}


def make_layer(batch, features, units, bias, activation, slope, dtype, seed):
    """Inputs, weight, bias and dY in `dtype`, and the float64 reference's gradients and output."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [random(generator, batch, *shape).to(DEVICE, dtype) for shape in features]
    k = sum(x[0].numel() for x in inputs)
    weight = random(generator, units, k, scale=k**-0.5).to(DEVICE, dtype)
    bias_tensor = random(generator, units, scale=0.5).to(DEVICE, dtype) if bias else None
    grad_out = random(generator, batch, units, scale=batch**-0.5).to(DEVICE, dtype)

    leaves = [t.double().requires_grad_() for t in (*inputs, weight, *([bias_tensor] if bias else []))]
    wide_inputs, wide_weight = leaves[: len(inputs)], leaves[len(inputs)]
    wide_bias = leaves[-1] if bias else None
    flat = torch.cat([x.flatten(1) for x in wide_inputs], 1)
    expected_out = activate(F.linear(flat, wide_weight, wide_bias), activation, slope)
    expected_out.backward(grad_out.double())
    expected = {
        "inputs": [x.grad for x in wide_inputs],
        "weight": wide_weight.grad,
        "bias": wide_bias.grad if bias else None,
    }
    return inputs, weight, grad_out, expected_out.detach().to(dtype), expected


def check_backward(
    *,
    batch: int,
    features: tuple[tuple[int, ...], ...],
    units: int,
    bias: bool = True,
    activation: str = "relu",
    slope: float = 0.2,
    precision: str = "fp32",
    config: dict | None = SMALL_TILES,
    input_grad: bool = True,
    seed: int = 0,
) -> None:
    dtype, input_precision = PRECISIONS[precision]
    inputs, weight, grad_out, out, expected = make_layer(batch, features, units, bias, activation, slope, dtype, seed)
    grads = linear_backward(
        grad_out,
        out if activation != "none" else None,
        inputs if len(inputs) > 1 else inputs[0],
        weight,
        has_bias=bias,
        activation=activation,
        slope=slope,
        input_precision=input_precision,
        input_grad=input_grad,
        config=config,
    )
    tolerance = TOLERANCES[precision]
    for got, want, x in zip(grads.inputs, expected["inputs"], inputs, strict=True):
        if input_grad:
            assert got.shape == x.shape and got.dtype == dtype
            torch.testing.assert_close(got.double(), want, **tolerance)
        else:
            assert got is None
    assert grads.weight.dtype == dtype
    torch.testing.assert_close(grads.weight.double(), expected["weight"], **tolerance)
    if bias:
        torch.testing.assert_close(grads.bias.double(), expected["bias"], **tolerance)
    else:
        assert grads.bias is None


@pytest.mark.parametrize("batch", [1, 3, 37])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes_and_batches(shape: str, batch: int):
    check_backward(batch=batch, **SHAPES[shape])


@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_activations_and_bias(bias: bool, activation: str):
    check_backward(batch=37, **SHAPES["two-maps"], bias=bias, activation=activation, seed=1)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("batch", [1, 37])
def test_precisions(batch: int, precision: str):
    check_backward(batch=batch, **SHAPES["two-maps"], activation="leaky_relu", precision=precision, seed=2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_picked_and_interpreter_tiles(precision: str):
    """The launcher's own choice (one big tile under the interpreter) and pick_config's GPU tiles. pick_config
    splits wgrad's batch only where each slice keeps two row steps (not at 37 rows: SMALL_TILES test that)."""
    check_backward(batch=37, **SHAPES["two-maps"], precision=precision, config=None, seed=3)
    dtype = PRECISIONS[precision][0]
    check_backward(batch=37, **SHAPES["vector"], precision=precision, config=pick_config(37, 29, 37, dtype), seed=4)
    assert pick_config(128, 29, 37, dtype)["wgrad"]["SPLITS"] > 1
    assert pick_config(1, 29, 37, dtype)["wgrad"]["SPLITS"] == 1


def test_without_input_gradient():
    check_backward(batch=3, **SHAPES["map"], input_grad=False, seed=5)


def test_reads_strided_inputs_in_place():
    """Inputs that are channel slices of wider maps (flattened as views, never copied), a weight row slice."""
    generator = torch.Generator().manual_seed(6)
    maps = random(generator, 5, 10, 2, 2).to(DEVICE)
    x0, x1 = maps[:, :4], maps[:, 6:]
    weight = random(generator, 40, 32, scale=32**-0.5).to(DEVICE)[5:30]
    grad_out = random(generator, 5, 25).to(DEVICE)
    leaves = [t.double().requires_grad_() for t in (x0, x1, weight)]
    out = F.relu(F.linear(torch.cat([leaves[0].flatten(1), leaves[1].flatten(1)], 1), leaves[2]))
    out.backward(grad_out.double())
    grads = linear_backward(grad_out, out.detach().float(), [x0, x1], weight, has_bias=False, activation="relu",
                            config=SMALL_TILES)  # fmt: skip
    for got, leaf in zip([*grads.inputs, grads.weight], leaves, strict=True):
        torch.testing.assert_close(got.double(), leaf.grad, **TOLERANCES["fp32"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deterministic(precision: str):
    """Two launches give the same bits, the batch split into slices and summed by the reduction kernel."""
    dtype = PRECISIONS[precision][0]
    inputs, weight, grad_out, out, _ = make_layer(37, ((5, 3, 3),), 33, True, "relu", 0.0, dtype, seed=7)
    first, second = (linear_backward(grad_out, out, inputs, weight, activation="relu", config=SMALL_TILES)
                     for _ in range(2))  # fmt: skip
    for a, b in zip([*first.inputs, first.weight, first.bias], [*second.inputs, second.weight, second.bias]):
        assert torch.equal(bits(a), bits(b))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_rejects_bad_arguments():
    x = torch.zeros(2, 8, device=DEVICE)
    weight = torch.zeros(4, 8, device=DEVICE)
    grad = torch.zeros(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="activation"):
        linear_backward(grad, grad, x, weight, activation="gelu")
    with pytest.raises(ValueError, match="slope"):
        linear_backward(grad, grad, x, weight, activation="leaky_relu", slope=-0.1)
    with pytest.raises(ValueError, match="output"):
        linear_backward(grad, None, x, weight, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        linear_backward(grad, grad, x, torch.zeros(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="grad_out"):
        linear_backward(torch.zeros(2, 5, device=DEVICE), None, x, weight)
    with pytest.raises(TypeError, match="bfloat16"):
        linear_backward(grad.bfloat16(), None, x, weight)
