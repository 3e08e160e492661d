"""Fully connected layer y = activation(x @ W^T + b) on tensor cores, bias and activation fused.

`x` may be given as two tensors whose features are read as if concatenated (feature k < K0 from x0,
the rest from x1), so AlexNet's fc6 reads both towers' 128 x 6 x 6 maps, each flattened channel-major,
without a copy. W is [units, K] row-major, as torch.nn.Linear keeps it.

The kernel accumulates the transposed product, units by batch rows, so the batch is the narrow side
of the MMA: a batch of one pads (masked) to a 16-wide tile, the smallest tl.dot accepts, while the
unit side keeps the MMA's long dimension. At small batches the layer is a stream of W, so the
small-batch tile keeps its unit tile narrow (32) and spreads W over many programs.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from typing import Any

import torch
import triton
import triton.language as tl

from .limits import tile_fits
from .tile_rules import exact_fp32


@triton.jit
def linear_kernel(
    x0_ptr, x1_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K0, K,
    stride_x0m, stride_x0k,
    stride_x1m, stride_x1k,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    slope,
    NUM_INPUTS: tl.constexpr,  # 2: features [0, K0) come from x0, [K0, K) from x1
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "relu" or "leaky_relu"
    INPUT_PRECISION: tl.constexpr,  # "ieee", "tf32" or "tf32x3"; ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y = activation(x @ W^T + b) for a tile of BLOCK_M batch rows x BLOCK_N units, reduced over the features
    BLOCK_K at a time with fp32 sums (as W @ x^T: the batch is the MMA's narrow side). Grid: (row tiles x unit
    tiles,)."""
    pid = tl.program_id(0)
    # Neighbouring programs share a tile of W, the operand that dominates the traffic.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for source in tl.static_range(NUM_INPUTS):
        if source == 0:
            x_cols = x0_ptr + offs_m.to(tl.int64) * stride_x0m
            stride_xk = stride_x0k
            k_begin = 0
            k_end = K0
        else:
            x_cols = x1_ptr + offs_m.to(tl.int64) * stride_x1m
            stride_xk = stride_x1k
            k_begin = K0
            k_end = K
        for k_start in range(k_begin, k_end, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            mask_k = k < k_end
            x_ptrs = x_cols[None, :] + ((k - k_begin) * stride_xk)[:, None]
            x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
            w = tl.load(w_rows[:, None] + (k * stride_wk)[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(w, x, acc=acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == "leaky_relu":
        acc = tl.where(acc > 0, acc, acc * slope)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + (offs_n * stride_yn)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


# Tile shapes: BLOCK_M batch rows by BLOCK_N units. In 16-bit types, narrow tiles with long K blocks:
# measured on an H200 in bf16 for AlexNet's fc6, fc7 and fc8 at batch 128 and 1 (bench/step_sweep.py;
# bench/results/step_sweep.txt) they spread the weight stream over enough programs, where the
# 64 x 64 x 32 tile ran fc6 3.6 times slower at batch 128. fp32 keeps shorter K blocks: its operands
# take twice the registers, and with K not a multiple of 16 (unvectorized loads) the long blocks spill.
# For the same reason, under Triton 3.6, 16-bit layers whose features are not a multiple of 16 (LeNet-5's)
# take K blocks of 64, and exact fp32 (products on the FMA units, operands in registers) steps K by 16.
# tests/test_sm90_conv.py and tests/test_sm90_nets.py check they build without spills.
CONFIGS = [
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},  # batches above 16
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},  # a stream of W: batch <= 16
]
FP32_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # batches above 16
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},  # batch <= 16
]
UNALIGNED_CONFIG = {**CONFIGS[0], "BLOCK_K": 64}  # 16-bit, batches above 16, features not a multiple of 16
EXACT_FP32_CONFIG = {**FP32_CONFIGS[0], "BLOCK_K": 16}  # exact fp32 ("ieee"), batches above 16

ACTIVATIONS = ("none", "relu", "leaky_relu")
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 512, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1}


# The tiles `netdsl tune` times on the device beside pick_config's (the grid of bench/step_sweep.py, which
# found pick_config's choices on an H200 in bf16).
TUNING_TILES = (
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
)


def tuning_candidates(element_bytes: int) -> list[dict]:
    """The tiles `netdsl tune` times for an fc layer on elements of `element_bytes`: those whose pipelined operand
    tiles fit in shared memory (128 x 32 x 128 in 4 stages does not in fp32)."""
    return [dict(tile) for tile in TUNING_TILES if tile_fits(tile, element_bytes)]


def pick_config(M: int, dtype: torch.dtype = torch.bfloat16, input_precision: str = "ieee", features: int = 0) -> dict:
    """Block sizes for M batch rows of `features` (0: a multiple of 16): up to 16 rows the layer streams W, and the
    narrow tile spreads that stream over many programs."""
    configs = FP32_CONFIGS if dtype == torch.float32 else CONFIGS
    if M <= 16:
        return configs[1]
    if dtype == torch.float32:
        return EXACT_FP32_CONFIG if exact_fp32(dtype, input_precision) else configs[0]
    return UNALIGNED_CONFIG if features % 16 else configs[0]


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [batch, features], features flattened channel-major; a view, never a copy."""
    try:
        return x.view(x.shape[0], -1)
    except RuntimeError as error:
        raise ValueError(f"fc input of shape {tuple(x.shape)} and strides {x.stride()} cannot be flattened") from error


def linear(
    inputs: list[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    out: torch.Tensor | None = None,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """activation(concat(inputs flattened, dim=1) @ weight.T + bias), without materializing the concatenation.

    `inputs` is one tensor or two of shape [batch, ...]; each is flattened after the batch dimension
    (a C x H x W map channel-major), which must be possible as a view. `weight` is [units, K] where
    K is the total number of features. `out` may be any strided [batch, units] view. `config`
    overrides `pick_config` (a dict of block sizes, num_warps, num_stages).
    """
    grid, arguments = linear_launch(inputs, weight, bias, activation, slope, input_precision, out, config)
    (kernel or linear_kernel)[grid](**arguments)  # `kernel`: a generated copy to run instead
    return arguments["y_ptr"]


def linear_launch(
    inputs: list[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[tuple[int], dict[str, Any]]:
    """Everything `linear` does but the launch: checks, allocates `out` and returns the grid and the
    kernel's keyword arguments (launch options included). Works on "meta" tensors."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not 1 <= len(inputs) <= 2:
        raise ValueError(f"fc reads one or two input tensors, got {len(inputs)}")
    rows = [_as_rows(x) for x in inputs]
    dtype = rows[0].dtype
    if dtype not in DTYPES:
        raise TypeError(f"fc supports float32, float16 and bfloat16 inputs, got {dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"unknown input precision {input_precision!r}; expected one of {INPUT_PRECISIONS}")
    batch = rows[0].shape[0]
    features = sum(x.shape[1] for x in rows)
    if any(x.shape[0] != batch for x in rows):
        raise ValueError(f"fc inputs differ in batch size: {[tuple(x.shape) for x in inputs]}")
    if weight.dim() != 2 or weight.shape[1] != features:
        raise ValueError(f"fc weight has shape {tuple(weight.shape)}, expected (units, {features})")
    units = weight.shape[0]
    if bias is not None and bias.shape != (units,):
        raise ValueError(f"fc bias has shape {tuple(bias.shape)}, expected ({units},)")
    for name, tensor in [*(("input", x) for x in rows), ("weight", weight), ("bias", bias)]:
        if tensor is not None and (tensor.dtype != dtype or tensor.device != rows[0].device):
            raise TypeError(f"fc {name} is {tensor.dtype} on {tensor.device}; the input is {dtype} on {rows[0].device}")

    if out is None:
        out = torch.empty((batch, units), dtype=dtype, device=rows[0].device)
    elif out.shape != (batch, units) or out.dtype != dtype:
        raise ValueError(f"fc out is {out.dtype} {tuple(out.shape)}, expected {dtype} {(batch, units)}")

    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        on_cpu = rows[0].device.type == "cpu"
        config = INTERPRETER_CONFIG if on_cpu else pick_config(batch, rows[0].dtype, input_precision, features)
    x0, x1 = rows[0], rows[-1]
    grid = (triton.cdiv(batch, config["BLOCK_M"]) * triton.cdiv(units, config["BLOCK_N"]),)
    arguments = {
        "x0_ptr": x0, "x1_ptr": x1, "w_ptr": weight, "b_ptr": weight if bias is None else bias, "y_ptr": out,
        "M": batch, "N": units, "K0": x0.shape[1], "K": features,
        "stride_x0m": x0.stride(0), "stride_x0k": x0.stride(1),
        "stride_x1m": x1.stride(0), "stride_x1k": x1.stride(1),
        "stride_wn": weight.stride(0), "stride_wk": weight.stride(1),
        "stride_ym": out.stride(0), "stride_yn": out.stride(1),
        "slope": slope,
        "NUM_INPUTS": len(rows), "HAS_BIAS": bias is not None, "ACTIVATION": activation,
        "INPUT_PRECISION": input_precision,
        **config,
    }  # fmt: skip
    return grid, arguments
