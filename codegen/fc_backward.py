"""Backward of the fully connected layer y = activation(x @ W^T + b) (codegen/fc.py), on tensor cores.

Given the gradient dY [batch, units] and the saved output Y, the gradient on the pre-activation sum is
G = dY * activation'(.), read back from Y's sign: ReLU passes dY where Y > 0, leaky ReLU scales it by the
slope elsewhere (which needs a slope >= 0, so that Y > 0 exactly where the sum was). G is never written: every
kernel that reads dY forms G from its tile of dY and Y in registers. Then

    dX = G @ W          [batch, features]   dgrad: one kernel, reduction over units
    dW = G^T @ X        [units, features]   wgrad: reduction over the batch, split deterministically
    db = sum of G over the batch            in the wgrad kernel, by the programs of the first feature tile

The wgrad reduction over the batch runs in SPLITS slices side by side; each slice writes an fp32 partial, and a
second kernel adds the partials of each element in slice order. No atomics: the same inputs give the same bits.
With one slice the wgrad kernel writes dW and db directly.

X is read in place as [batch, features] (a C x H x W map flattened channel-major, as the forward reads it), from
one tensor or two whose features follow each other (both towers' maps into AlexNet's fc6): each input is its
own launch over the weight's matching column slice, so no tile straddles the two.

Tiles follow fc.py: dgrad keeps the batch on the narrow side of the MMA (acc is features x batch, a batch of one
padded to 16), wgrad's acc is units x features with the batch as its reduction. Names: M batch, N units,
K features, in all three kernels.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .fc import ACTIVATIONS, DTYPES, INPUT_PRECISIONS, _as_rows


@triton.jit
def masked_gradient(dy_ptr, y_ptr, offsets_dy, offsets_y, mask, slope, ACTIVATION: tl.constexpr):
    """A tile of G = dY * activation'(.) in fp32, the derivative read from the saved output Y (0 outside `mask`)."""
    dy = tl.load(dy_ptr + offsets_dy, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != "none":
        # Compared in fp32: Triton's interpreter holds bf16 as raw bits, where a negative value reads as large.
        y = tl.load(y_ptr + offsets_y, mask=mask, other=0.0).to(tl.float32)
        dy = tl.where(y > 0, dy, 0.0 if ACTIVATION == "relu" else dy * slope)
    return dy


@triton.jit
def linear_dgrad_kernel(
    dy_ptr, y_ptr, w_ptr, dx_ptr,
    M, N, K,
    stride_dym, stride_dyn,
    stride_ym, stride_yn,
    stride_wn, stride_wk,
    stride_dxm, stride_dxk,
    slope,
    ACTIVATION: tl.constexpr,  # "none", "relu" or "leaky_relu"
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dX = G @ W, computed transposed (dX^T = W^T @ G^T) so that the batch is the MMA's narrow side."""
    pid = tl.program_id(0)
    # Neighbouring programs share a tile of W, the larger operand.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_k = pid // num_pid_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows_m = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        mask_n = n < N
        tile_mask = mask_n[:, None] & mask_m[None, :]
        g = masked_gradient(
            dy_ptr, y_ptr,
            (n * stride_dyn)[:, None] + (rows_m * stride_dym)[None, :],
            (n * stride_yn)[:, None] + (rows_m * stride_ym)[None, :],
            tile_mask, slope, ACTIVATION,
        )  # fmt: skip
        w_ptrs = w_ptr + (offs_k * stride_wk)[:, None] + (n.to(tl.int64) * stride_wn)[None, :]
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(w, g.to(w.dtype), acc=acc, input_precision=INPUT_PRECISION)

    dx_ptrs = dx_ptr + (rows_m * stride_dxm)[None, :] + (offs_k * stride_dxk)[:, None]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_m[None, :])


@triton.jit
def linear_wgrad_kernel(
    dy_ptr, y_ptr, x_ptr, dw_ptr, db_ptr,
    M, N, K, rows_per_split,
    stride_dym, stride_dyn,
    stride_ym, stride_yn,
    stride_xm, stride_xk,
    stride_dws, stride_dwn, stride_dwk,
    stride_dbs,
    slope,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One slice of the batch's share of dW = G^T @ X (and of db): into dW itself with one slice, else into
    the slice's fp32 partial (stride_dws and stride_dbs apart)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    m_begin = split * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m_start in range(m_begin, m_end, BLOCK_M):
        m = m_start + tl.arange(0, BLOCK_M)
        mask_m = m < m_end
        rows_m = m.to(tl.int64)
        g = masked_gradient(
            dy_ptr, y_ptr,
            (offs_n * stride_dyn)[:, None] + (rows_m * stride_dym)[None, :],
            (offs_n * stride_yn)[:, None] + (rows_m * stride_ym)[None, :],
            mask_n[:, None] & mask_m[None, :], slope, ACTIVATION,
        )  # fmt: skip
        x_ptrs = x_ptr + (rows_m * stride_xm)[:, None] + (offs_k * stride_xk)[None, :]
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(g.to(x.dtype), x, acc=acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(g, axis=1)

    dw_ptrs = dw_ptr + split * stride_dws + (offs_n * stride_dwn)[:, None] + (offs_k * stride_dwk)[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS and pid_k == 0:  # db from the programs of the first feature tile
        tl.store(db_ptr + split * stride_dbs + offs_n, bias_acc.to(db_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def sum_splits_kernel(partial_ptr, out_ptr, SPLITS, L, stride_s, BLOCK: tl.constexpr):
    """out[l] = partial[0, l] + partial[1, l] + ..., in that order; both contiguous along l."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        acc += tl.load(partial_ptr + split * stride_s + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# dgrad tiles: BLOCK_K features by BLOCK_M batch rows, BLOCK_N units per step, shaped like the forward's (fc.py)
# with units and features swapped. Chosen so that every AlexNet and LeNet fc layer builds for sm_90 without
# spills (tests/test_sm90_backward.py): with sizes that are not multiples of 16 (LeNet's 120 -> 84, fc8's 1000
# units) loads are not vectorized, and 128 units per step in 16-bit, or 32 in exact fp32 (whose products run on
# CUDA cores), take up to 255 registers and spill. Not yet timed on a GPU.
DGRAD_CONFIGS = [
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},  # batches above 16
    {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},  # batch <= 16
]
DGRAD_FP32_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
]
# wgrad tiles: BLOCK_N units by BLOCK_K features, BLOCK_M batch rows per step.
WGRAD_CONFIGS = [
    {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},  # batches above 16
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},  # batch <= 16
]
WGRAD_FP32_CONFIGS = [
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
]
SUM_CONFIG = {"BLOCK": 1024, "num_warps": 4}
# Two waves over the 132 SMs of an H100: wgrad splits the batch until it has this many program instances.
MIN_PROGRAMS = 264

# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {
    "dgrad": {"BLOCK_M": 16, "BLOCK_N": 512, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1},
    "wgrad": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 512, "SPLITS": 1, "num_warps": 4, "num_stages": 1},
}


def pick_config(batch: int, units: int, features: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """{"dgrad": tile, "wgrad": tile and SPLITS}: the narrow tiles up to 16 rows, and as many slices of the batch
    as it takes for wgrad to reach MIN_PROGRAMS program instances (each slice at least two row steps)."""
    narrow = 1 if batch <= 16 else 0
    dgrad = (DGRAD_FP32_CONFIGS if dtype == torch.float32 else DGRAD_CONFIGS)[narrow]
    wgrad = (WGRAD_FP32_CONFIGS if dtype == torch.float32 else WGRAD_CONFIGS)[narrow]
    tiles = triton.cdiv(units, wgrad["BLOCK_N"]) * triton.cdiv(features, wgrad["BLOCK_K"])
    splits = max(1, min(triton.cdiv(MIN_PROGRAMS, tiles), batch // (2 * wgrad["BLOCK_M"])))
    return {"dgrad": dict(dgrad), "wgrad": {**wgrad, "SPLITS": splits}}


@dataclass
class Launch:
    """One kernel launch: what `linear_backward` runs, and what the sm_90 tests compile."""

    kernel: Any
    grid: tuple[int, ...]
    arguments: dict[str, Any]

    def run(self) -> None:
        self.kernel[self.grid](**self.arguments)


@dataclass
class LinearGrads:
    """The gradients of an fc layer: one per input (in the input's shape; None when not asked for), the
    weight's and the bias's (None without a bias)."""

    inputs: list[torch.Tensor | None]
    weight: torch.Tensor
    bias: torch.Tensor | None


def linear_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    inputs: list[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool = True,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    input_grad: bool = True,
    config: dict | None = None,
) -> LinearGrads:
    """The gradients of `linear(inputs, weight, bias, activation, slope)` (codegen/fc.py) given `grad_out`, the
    gradient on its output, and `out`, that output (which the mask reads; None with activation "none").

    `inputs` and `weight` are what the forward read. `input_grad=False` skips dX (the first layer's).
    `config` overrides `pick_config` ({"dgrad": ..., "wgrad": ...})."""
    grads, launches = linear_backward_launches(
        grad_out, out, inputs, weight, has_bias, activation, slope, input_precision, input_grad, config
    )
    for launch in launches:
        launch.run()
    return grads


def linear_backward_launches(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    inputs: list[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool = True,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    input_grad: bool = True,
    config: dict | None = None,
) -> tuple[LinearGrads, list[Launch]]:
    """Everything `linear_backward` does but launching: checks, allocates the gradients (and the wgrad
    partials) and returns them with the launches that fill them, in order. Works on "meta" tensors."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not 1 <= len(inputs) <= 2:
        raise ValueError(f"fc reads one or two input tensors, got {len(inputs)}")
    rows = [_as_rows(x) for x in inputs]
    dtype, device = weight.dtype, weight.device
    _check(grad_out, out, rows, weight, activation, slope, input_precision)
    batch, units = grad_out.shape
    features = weight.shape[1]
    if out is None:
        out = grad_out  # not read with activation "none"

    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        config = INTERPRETER_CONFIG if device.type == "cpu" else pick_config(batch, units, features, dtype)
    dgrad, wgrad = dict(config["dgrad"]), dict(config["wgrad"])
    splits = max(1, min(wgrad.pop("SPLITS", 1), triton.cdiv(batch, wgrad["BLOCK_M"])))
    rows_per_split = triton.cdiv(triton.cdiv(batch, splits), wgrad["BLOCK_M"]) * wgrad["BLOCK_M"]
    splits = triton.cdiv(batch, rows_per_split)  # no empty slice

    grads = LinearGrads(
        inputs=[torch.empty(x.shape, dtype=dtype, device=device) if input_grad else None for x in inputs],
        weight=torch.empty((units, features), dtype=dtype, device=device),
        bias=torch.empty((units,), dtype=dtype, device=device) if has_bias else None,
    )
    if splits > 1:
        weight_sums = torch.empty((splits, units, features), dtype=torch.float32, device=device)
        bias_sums = torch.empty((splits, units), dtype=torch.float32, device=device) if has_bias else None
    else:
        weight_sums, bias_sums = grads.weight.unsqueeze(0), None if grads.bias is None else grads.bias.unsqueeze(0)

    common = {
        "dy_ptr": grad_out, "y_ptr": out,
        "stride_dym": grad_out.stride(0), "stride_dyn": grad_out.stride(1),
        "stride_ym": out.stride(0), "stride_yn": out.stride(1),
        "slope": float(slope), "ACTIVATION": activation, "INPUT_PRECISION": input_precision,
    }  # fmt: skip
    launches = []
    k_begin = 0
    for index, x in enumerate(rows):
        k_end = k_begin + x.shape[1]
        w = weight[:, k_begin:k_end]
        if input_grad:
            dx = grads.inputs[index].view(batch, -1)
            grid = (triton.cdiv(batch, dgrad["BLOCK_M"]) * triton.cdiv(x.shape[1], dgrad["BLOCK_K"]),)
            arguments = {
                **common, "w_ptr": w, "dx_ptr": dx,
                "M": batch, "N": units, "K": x.shape[1],
                "stride_wn": w.stride(0), "stride_wk": w.stride(1),
                "stride_dxm": dx.stride(0), "stride_dxk": dx.stride(1),
                **dgrad,
            }  # fmt: skip
            launches.append(Launch(linear_dgrad_kernel, grid, arguments))
        dw = weight_sums[:, :, k_begin:k_end]
        with_bias = has_bias and index == 0  # db once, with the first input
        db = bias_sums if with_bias else dw
        grid = (triton.cdiv(units, wgrad["BLOCK_N"]), triton.cdiv(x.shape[1], wgrad["BLOCK_K"]), splits)
        arguments = {
            **common, "x_ptr": x, "dw_ptr": dw, "db_ptr": db,
            "M": batch, "N": units, "K": x.shape[1], "rows_per_split": rows_per_split,
            "stride_xm": x.stride(0), "stride_xk": x.stride(1),
            "stride_dws": dw.stride(0), "stride_dwn": dw.stride(1), "stride_dwk": dw.stride(2),
            "stride_dbs": db.stride(0),
            "HAS_BIAS": with_bias,
            **wgrad,
        }  # fmt: skip
        launches.append(Launch(linear_wgrad_kernel, grid, arguments))
        k_begin = k_end

    if splits > 1:
        sums = [(weight_sums, grads.weight)] + ([(bias_sums, grads.bias)] if has_bias else [])
        for partial, total in sums:
            length = total.numel()
            arguments = {
                "partial_ptr": partial, "out_ptr": total, "SPLITS": splits, "L": length, "stride_s": length,
                **SUM_CONFIG,
            }  # fmt: skip
            launches.append(Launch(sum_splits_kernel, (triton.cdiv(length, SUM_CONFIG["BLOCK"]),), arguments))
    return grads, launches


def _check(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    rows: list[torch.Tensor],
    weight: torch.Tensor,
    activation: str,
    slope: float,
    input_precision: str,
) -> None:
    dtype = weight.dtype
    if dtype not in DTYPES:
        raise TypeError(f"fc backward supports float32, float16 and bfloat16, got {dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"unknown input precision {input_precision!r}; expected one of {INPUT_PRECISIONS}")
    if activation == "leaky_relu" and slope < 0:
        raise ValueError(f"the leaky ReLU mask is read from the output's sign, which needs a slope >= 0, got {slope}")
    if activation != "none" and out is None:
        raise ValueError(f"the {activation} mask needs the forward's output")
    batch = rows[0].shape[0]
    features = sum(x.shape[1] for x in rows)
    if weight.dim() != 2 or weight.shape[1] != features:
        raise ValueError(f"fc weight has shape {tuple(weight.shape)}, expected (units, {features})")
    expected = (batch, weight.shape[0])
    tensors = [("grad_out", grad_out), ("out", out), *(("input", x) for x in rows)]
    for name, tensor in tensors:
        if tensor is None:
            continue
        if tensor.dtype != dtype or tensor.device != weight.device:
            raise TypeError(f"fc {name} is {tensor.dtype} on {tensor.device}; the weight is {dtype} on {weight.device}")
        if name != "input" and tuple(tensor.shape) != expected:
            raise ValueError(f"fc {name} has shape {tuple(tensor.shape)}, expected {expected}")
        if name == "input" and tensor.shape[0] != batch:
            raise ValueError(f"fc inputs differ in batch size: {[tuple(x.shape) for x in rows]}")
