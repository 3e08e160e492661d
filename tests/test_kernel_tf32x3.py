"""fp32 products on tensor cores as three TF32 products (`input_precision="tf32x3"`, issue 13) against float64.

What the GPU computes: Triton rewrites `tl.dot(a, b, acc, input_precision="tf32x3")` (its F32DotTC pass) as
    a_hi = tf32(a), a_lo = a - a_hi (likewise b);  small = a_lo @ b_hi + a_hi @ b_lo (NaNs zeroed)
    result = acc + (a_hi @ b_hi + small)
with tf32() PTX's `cvt.rna.tf32.f32` (round to 10 mantissa bits, ties away from zero) and each product a TF32
MMA, which reads its fp32 operands truncated to 10 mantissa bits and accumulates in fp32. Per product the error
is about 2^-21 of |a b| (the tails, truncated; a_lo b_lo dropped), where "ieee" has 2^-24, and TF32 alone 2^-11.

Triton's interpreter computes every fp32 dot exactly in fp32, whatever its precision. So that these tests measure
tf32x3's arithmetic on the CPU, the `emulated_tf32x3` fixture makes the interpreter compute tf32x3 dots as above,
bit for bit in the roundings of the inputs (numpy's fp32 matrix products stand for the MMAs' fp32 sums, whose
order on the hardware differs). Each kernel (conv.py, conv_nhwc.py, fc.py, conv_lrn_pool.py) then meets 1e-5
relative to the largest |reference| on AlexNet-like reductions and data, and gives other bits than "ieee" (the
emulation was in effect). On a GPU the same tests run the real instructions (NETDSL_GPU_REPORT records the errors).
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, INTERPRETING, random
from test_kernel_conv_lrn_pool import ALEXNET_LRN
from test_kernel_conv_lrn_pool import reference as stage_reference

from netdsl.codegen.conv import conv2d
from netdsl.codegen.conv_lrn_pool import conv_lrn_maxpool
from netdsl.codegen.conv_nhwc import conv2d_nhwc
from netdsl.codegen.fc import linear

TOLERANCE = 1e-5  # relative to the largest |reference|: the issue's bar for tf32x3 as fp32's default


def tf32_rounded(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to TF32's 10 mantissa bits, to nearest with ties away from zero (`cvt.rna.tf32.f32`)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def tf32_truncated(x: np.ndarray) -> np.ndarray:
    """What a TF32 MMA reads of an fp32 operand: its low 13 mantissa bits dropped."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


def tf32x3_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b as Triton's tf32x3 computes it on an NVIDIA GPU (module docstring), in fp32."""
    a_hi, b_hi = tf32_rounded(a), tf32_rounded(b)
    a_lo, b_lo = tf32_truncated(a - a_hi), tf32_truncated(b - b_hi)
    small = np.matmul(a_lo, b_hi) + np.matmul(a_hi, b_lo)
    small = np.where(np.isnan(small), np.float32(0), small)
    return acc + (np.matmul(a_hi, b_hi) + small)


@pytest.fixture
def emulated_tf32x3(monkeypatch):
    """Under Triton's interpreter, fp32 dots with input_precision "tf32x3" computed as the GPU does (`tf32x3_dot`);
    other dots as before. Nothing changes on a GPU."""
    if not INTERPRETING:
        return
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, acc, input_precision, *rest):
        if input_precision == ir.INPUT_PRECISION.TF32x3 and a.dtype == tl.float32 and b.dtype == tl.float32:
            return interpreter.TensorHandle(tf32x3_dot(a.data, b.data, acc.data), acc.dtype.scalar)
        return original(self, a, b, acc, input_precision, *rest)

    create_dot.widens_bf16 = getattr(original, "widens_bf16", False)  # codegen/interpret.py's patch stays in place
    monkeypatch.setattr(builder, "create_dot", create_dot)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max())


def report(what: str, error: float) -> None:
    """On a GPU, the measured error into NETDSL_GPU_REPORT (bench/gpu_session.sh collects them)."""
    path = os.environ.get("NETDSL_GPU_REPORT")
    if path and DEVICE == "cuda":
        with open(path, "a", encoding="utf-8") as file:
            file.write(f"tf32x3 {what}\t{error:.3e}\n")


def data(generator: torch.Generator, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """Maps as a layer sees them: zero-mean ("normal") or all positive, as images and ReLU outputs are."""
    x = random(generator, *shape)
    return x.abs() if kind == "positive" else x


def check(run, want: torch.Tensor, what: str) -> None:
    """`run(precision)` in tf32x3 within TOLERANCE of the float64 `want`; other bits than "ieee" under emulation."""
    got = run("tf32x3")
    error = relative_error(got, want)
    report(what, error)
    assert error <= TOLERANCE, f"{what}: {error:.2e}"
    if INTERPRETING:
        assert not torch.equal(got, run("ieee")), "the tf32x3 emulation was not in effect"


# AlexNet's layers in miniature: their reductions (K = C_in/groups * KH * KW), small maps.
CONVS = {
    "conv1": {"batch": 2, "channels": (3,), "c_out": 48, "size": (31, 27), "kernel": 11, "stride": 4},
    "conv1-pad2": {"batch": 1, "channels": (3,), "c_out": 32, "size": (23, 25), "kernel": 11, "stride": 4,
                   "padding": 2},
}  # fmt: skip
NHWC_CONVS = {
    "conv2": {"batch": 2, "channels": (48,), "c_out": 64, "size": (9, 8), "kernel": 5, "padding": 2},
    "conv3-both-towers": {"batch": 1, "channels": (64, 64), "c_out": 48, "size": (7, 7), "kernel": 3, "padding": 1},
    "conv4-groups2": {"batch": 2, "channels": (96,), "c_out": 64, "size": (6, 7), "kernel": 3, "padding": 1,
                      "groups": 2},
}  # fmt: skip


def conv_case(geometry: dict, kind: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    groups, k, c_out = geometry.get("groups", 1), geometry["kernel"], geometry["c_out"]
    inputs = [data(generator, (geometry["batch"], c, *geometry["size"]), kind) for c in geometry["channels"]]
    c_in = sum(geometry["channels"])
    weight = random(generator, c_out, c_in // groups, k, k, scale=(c_in // groups * k * k) ** -0.5)
    bias = random(generator, c_out, scale=0.1)
    conv = {"stride": geometry.get("stride", 1), "padding": geometry.get("padding", 0), "groups": groups}
    want = F.conv2d(torch.cat(inputs, dim=1).double(), weight.double(), bias.double(), **conv)
    return inputs, weight, bias, conv, want


@pytest.mark.usefixtures("emulated_tf32x3")
@pytest.mark.parametrize("kind", ["normal", "positive"])
@pytest.mark.parametrize("layer", list(CONVS))
def test_conv_tf32x3_against_float64(layer: str, kind: str):
    inputs, weight, bias, conv, want = conv_case(CONVS[layer], kind, seed=1)
    inputs, weight, bias = [x.to(DEVICE) for x in inputs], weight.to(DEVICE), bias.to(DEVICE)

    def run(precision: str) -> torch.Tensor:
        return conv2d(inputs, weight, bias, **conv, input_precision=precision).cpu()

    check(run, want, f"conv.py {layer} {kind}")


@pytest.mark.usefixtures("emulated_tf32x3")
@pytest.mark.parametrize("kind", ["normal", "positive"])
@pytest.mark.parametrize("layer", list(NHWC_CONVS))
def test_channels_last_conv_tf32x3_against_float64(layer: str, kind: str):
    inputs, weight, bias, conv, want = conv_case(NHWC_CONVS[layer], kind, seed=2)
    last = torch.channels_last
    inputs = [x.to(DEVICE).contiguous(memory_format=last) for x in inputs]
    weight, bias = weight.to(DEVICE).contiguous(memory_format=last), bias.to(DEVICE)

    def run(precision: str) -> torch.Tensor:
        return conv2d_nhwc(inputs, weight, bias, **conv, input_precision=precision).cpu()

    check(run, want, f"conv_nhwc.py {layer} {kind}")


# fc6 (two towers' 128 x 6 x 6 maps: K = 9216) and fc7 (two 2048-wide inputs) in miniature width.
FCS = {"fc6": ((128, 6, 6), 64), "fc7": ((2048,), 96)}


@pytest.mark.usefixtures("emulated_tf32x3")
@pytest.mark.parametrize("kind", ["normal", "positive"])
@pytest.mark.parametrize("layer", list(FCS))
def test_fc_tf32x3_against_float64(layer: str, kind: str):
    shape, units = FCS[layer]
    generator = torch.Generator().manual_seed(3)
    inputs = [data(generator, (2, *shape), kind) for _ in range(2)]
    features = 2 * int(np.prod(shape))
    weight = random(generator, units, features, scale=features**-0.5)
    bias = random(generator, units, scale=0.1)
    want = torch.cat([x.flatten(1) for x in inputs], dim=1).double() @ weight.double().T + bias.double()
    inputs, weight, bias = [x.to(DEVICE) for x in inputs], weight.to(DEVICE), bias.to(DEVICE)

    def run(precision: str) -> torch.Tensor:
        return linear(inputs, weight, bias, input_precision=precision).cpu()

    check(run, want, f"fc.py {layer} {kind}")


@pytest.mark.usefixtures("emulated_tf32x3")
def test_conv_lrn_pool_stage_tf32x3_against_float64():
    """conv1's whole stage in one kernel: the conv GEMM in tf32x3, the LRN sums split in three bf16 pieces."""
    generator = torch.Generator().manual_seed(4)
    x = data(generator, (1, 3, 31, 31), "positive")
    weight = random(generator, 48, 3, 11, 11, scale=363**-0.5)
    bias = random(generator, 48, scale=0.1)
    want = stage_reference(x, weight, bias, 4, 0, 1, ALEXNET_LRN, 3, 2, 0, False)
    x, weight, bias = x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)

    def run(precision: str) -> torch.Tensor:
        return conv_lrn_maxpool(x, weight, bias, 4, 0, 1, 1, *ALEXNET_LRN.values(), 3, 2, input_precision=precision)

    check(lambda precision: run(precision).cpu(), want, "conv_lrn_pool.py conv1 stage")


def test_tf32_rounding_is_ptx_rna_and_tensor_cores_truncate():
    one = np.float32(1.0)
    tie, below_tie = one + np.float32(2.0**-11), one + np.float32(2.0**-12)
    values = np.array([tie, -tie, below_tie, one + np.float32(3 * 2.0**-12)], dtype=np.float32)
    expected = np.array([1 + 2.0**-10, -(1 + 2.0**-10), 1.0, 1 + 2.0**-10], dtype=np.float32)
    np.testing.assert_array_equal(tf32_rounded(values), expected)
    np.testing.assert_array_equal(tf32_truncated(values), np.array([1.0, -1.0, 1.0, 1.0], dtype=np.float32))


def test_the_split_loses_less_than_fp32_sums():
    """Where tf32x3's error comes from, on a K = 4096 product: its three TF32 products, summed exactly, lose less
    than summing exact products in fp32 does (so tf32x3 is as accurate as "ieee"), where one TF32 product is
    about 1e-3 off."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((32, 4096), dtype=np.float32), rng.standard_normal((4096, 48), dtype=np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)

    def error(got: np.ndarray) -> float:
        return float(np.abs(got - want).max() / np.abs(want).max())

    a_hi, b_hi = tf32_rounded(a).astype(np.float64), tf32_rounded(b).astype(np.float64)
    a_lo, b_lo = tf32_truncated(a - tf32_rounded(a)), tf32_truncated(b - tf32_rounded(b))
    split = error(a_hi @ b_hi + a_lo.astype(np.float64) @ b_hi + a_hi @ b_lo.astype(np.float64))
    three = error(tf32x3_dot(a, b, np.zeros((32, 48), dtype=np.float32)))
    one = error(np.matmul(tf32_truncated(a), tf32_truncated(b)))
    assert 0 < split < error(a @ b) and three <= TOLERANCE < one, (split, error(a @ b), three, one)
