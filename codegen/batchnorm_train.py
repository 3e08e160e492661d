"""Batch norm in training on N x C x H x W maps (and N x C vectors, as H = W = 1): batch statistics forward,
PyTorch's gradients backward.

Forward, per channel c over its M = N * H * W values:

    mean = sum(x) / M,  var = sum((x - mean)^2) / M (biased),  invstd = 1 / sqrt(var + eps)
    y = (x - mean) * invstd * weight + bias
    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var + momentum * var * M / (M - 1)   (unbiased, as PyTorch)

mean and invstd are saved for the backward, which gives (xhat = (x - mean) * invstd):

    dbias = sum(dy),  dweight = sum(dy * xhat)
    dx = weight * invstd * (dy - dbias / M - xhat * dweight / M)

Both directions are two launches over a (channel group, chunk) grid, so a few channels of a large batch still
fill the GPU, and neither uses atomics. A group is CHANNELS channels, a row of the tile each: one on a GPU, where
a channel holds enough values to fill its programs; up to 64 under the interpreter, whose cost is per program
(on this project's 2-core machine the forward and backward of 4 x 256 x 2 x 2 take 0.13 s so, 8 s one channel
a program). Per channel:
1. `batchnorm_partials_kernel`: each program sums its chunk of one channel into two fp32 partials, in a fixed
   order: forward, sum(u) and sum(u^2) with u = x - x[0, c, 0] (shifted data: the variance stays accurate when
   |mean| >> std); backward, sum(dy) and sum(dy * (x - mean)).
2. `batchnorm_forward_kernel` / `batchnorm_backward_kernel`: every program of a channel adds that channel's
   partials in the same order (so they agree bit for bit), then writes its chunk of y or dx; the first chunk's
   program also writes the per-channel results (mean, invstd and the running statistics; dweight and dbias).
Results depend on the chunking, which depends only on the shape and the device: the same bits on every run.
Math is fp32 whatever the storage dtype; y and dx take x's dtype, the per-channel tensors keep their own.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from netdsl.codegen.limits import SM_COUNT


@triton.jit
def batchnorm_partials_kernel(
    x_ptr, dy_ptr, mean_ptr, sums_ptr, products_ptr,
    C, S, M, CHUNK,
    stride_xn, stride_xc, stride_dyn, stride_dyc,
    HAS_DY: tl.constexpr,  # False: the forward's shifted sums of x; True: the backward's sums of dy
    CHANNELS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One chunk's partial sums of CHANNELS channels (a row each), BLOCK values at a time, into sums and
    products[channel, chunk]: without HAS_DY sum(u) and sum(u^2), u = x - x[0, c, 0]; with it sum(dy) and
    sum(dy * (x - mean)). Grid: (channel groups, chunks)."""
    channel = tl.program_id(0) * CHANNELS + tl.arange(0, CHANNELS)
    chunk = tl.program_id(1)
    rows = channel < C
    x_rows = x_ptr + channel.to(tl.int64)[:, None] * stride_xc
    dy_rows = dy_ptr + channel.to(tl.int64)[:, None] * stride_dyc
    if HAS_DY:
        center = tl.load(mean_ptr + channel, mask=rows, other=0.0)
    else:
        center = tl.load(x_ptr + channel.to(tl.int64) * stride_xc, mask=rows, other=0.0).to(tl.float32)

    sum_u = tl.zeros([CHANNELS, BLOCK], tl.float32)
    sum_uv = tl.zeros([CHANNELS, BLOCK], tl.float32)
    chunk_start = chunk * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, M)
    for start in range(chunk_start, chunk_end, BLOCK):
        # A channel's values as one index m over (n, s): any H x W, batch 1 included, fills the blocks.
        m = start + tl.arange(0, BLOCK)
        mask = rows[:, None] & (m < chunk_end)[None, :]
        n = (m // S).to(tl.int64)
        s = m % S
        x = tl.load(x_rows + (n * stride_xn + s)[None, :], mask=mask, other=0.0).to(tl.float32)
        centered = tl.where(mask, x - center[:, None], 0.0)
        u = centered
        if HAS_DY:
            u = tl.load(dy_rows + (n * stride_dyn + s)[None, :], mask=mask, other=0.0).to(tl.float32)
        sum_u += u
        sum_uv += u * centered

    slot = channel * tl.num_programs(1) + chunk
    tl.store(sums_ptr + slot, tl.sum(sum_u, axis=1), mask=rows)
    tl.store(products_ptr + slot, tl.sum(sum_uv, axis=1), mask=rows)


@triton.jit
def channel_totals(sums_ptr, products_ptr, channel, rows, SPLIT, BLOCK_SPLIT: tl.constexpr):
    """The sums of each channel's partials (a vector over `channel`, `rows` the real ones), added in the same
    order by every program that asks."""
    offs = channel[:, None] * SPLIT + tl.arange(0, BLOCK_SPLIT)[None, :]
    mask = rows[:, None] & (tl.arange(0, BLOCK_SPLIT) < SPLIT)[None, :]
    total_u = tl.sum(tl.load(sums_ptr + offs, mask=mask, other=0.0), axis=1)
    total_uv = tl.sum(tl.load(products_ptr + offs, mask=mask, other=0.0), axis=1)
    return total_u, total_uv


@triton.jit
def batchnorm_forward_kernel(
    x_ptr, y_ptr, weight_ptr, bias_ptr, sums_ptr, products_ptr,
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
    C, S, M, CHUNK, SPLIT,
    stride_xn, stride_xc, stride_yn, stride_yc,
    eps, momentum,
    CHANNELS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):  # fmt: skip
    """y = (x - mean) * invstd * weight + bias for one chunk of CHANNELS channels, BLOCK values at a time, from
    the channels' partials; the first chunk's program also writes mean, invstd and the running statistics. Grid:
    (channel groups, chunks)."""
    channel = tl.program_id(0) * CHANNELS + tl.arange(0, CHANNELS)
    chunk = tl.program_id(1)
    rows = channel < C
    x_rows = x_ptr + channel.to(tl.int64)[:, None] * stride_xc
    y_rows = y_ptr + channel.to(tl.int64)[:, None] * stride_yc

    shifted_sum, shifted_squares = channel_totals(sums_ptr, products_ptr, channel, rows, SPLIT, BLOCK_SPLIT)
    shifted_mean = shifted_sum / M
    var = tl.maximum(shifted_squares / M - shifted_mean * shifted_mean, 0.0)
    shift = tl.load(x_ptr + channel.to(tl.int64) * stride_xc, mask=rows, other=0.0).to(tl.float32)
    mean = shift + shifted_mean  # the partials' shift, read again
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    if chunk == 0:
        tl.store(mean_ptr + channel, mean, mask=rows)
        tl.store(invstd_ptr + channel, invstd, mask=rows)
        running_mean = tl.load(running_mean_ptr + channel, mask=rows, other=0.0).to(tl.float32)
        running_var = tl.load(running_var_ptr + channel, mask=rows, other=0.0).to(tl.float32)
        unbiased_var = var * M / (M - 1)
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * unbiased_var
        tl.store(running_mean_ptr + channel, running_mean.to(running_mean_ptr.dtype.element_ty), mask=rows)
        tl.store(running_var_ptr + channel, running_var.to(running_var_ptr.dtype.element_ty), mask=rows)

    scale = tl.load(weight_ptr + channel, mask=rows, other=0.0).to(tl.float32) * invstd
    bias = tl.load(bias_ptr + channel, mask=rows, other=0.0).to(tl.float32)
    chunk_start = chunk * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, M)
    for start in range(chunk_start, chunk_end, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = rows[:, None] & (m < chunk_end)[None, :]
        n = (m // S).to(tl.int64)
        s = m % S
        x = tl.load(x_rows + (n * stride_xn + s)[None, :], mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * scale[:, None] + bias[:, None]
        tl.store(y_rows + (n * stride_yn + s)[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def batchnorm_backward_kernel(
    x_ptr, dy_ptr, dx_ptr, weight_ptr, mean_ptr, invstd_ptr, sums_ptr, products_ptr,
    dweight_ptr, dbias_ptr,
    C, S, M, CHUNK, SPLIT,
    stride_xn, stride_xc, stride_dyn, stride_dyc, stride_dxn, stride_dxc,
    CHANNELS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):  # fmt: skip
    """dx for one chunk of CHANNELS channels, BLOCK values at a time, from the channels' partials; the first
    chunk's program also writes dweight and dbias. Grid: (channel groups, chunks)."""
    channel = tl.program_id(0) * CHANNELS + tl.arange(0, CHANNELS)
    chunk = tl.program_id(1)
    rows = channel < C
    x_rows = x_ptr + channel.to(tl.int64)[:, None] * stride_xc
    dy_rows = dy_ptr + channel.to(tl.int64)[:, None] * stride_dyc
    dx_rows = dx_ptr + channel.to(tl.int64)[:, None] * stride_dxc

    sum_dy, sum_dy_centered = channel_totals(sums_ptr, products_ptr, channel, rows, SPLIT, BLOCK_SPLIT)
    mean = tl.load(mean_ptr + channel, mask=rows, other=0.0)
    invstd = tl.load(invstd_ptr + channel, mask=rows, other=0.0)
    dweight = sum_dy_centered * invstd
    if chunk == 0:
        tl.store(dweight_ptr + channel, dweight.to(dweight_ptr.dtype.element_ty), mask=rows)
        tl.store(dbias_ptr + channel, sum_dy.to(dbias_ptr.dtype.element_ty), mask=rows)

    # dx = weight * invstd * (dy - sum_dy / M - (x - mean) * invstd * dweight / M)
    scale = tl.load(weight_ptr + channel, mask=rows, other=0.0).to(tl.float32) * invstd
    mean_dy = sum_dy / M
    centered_coefficient = invstd * dweight / M
    chunk_start = chunk * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, M)
    for start in range(chunk_start, chunk_end, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = rows[:, None] & (m < chunk_end)[None, :]
        n = (m // S).to(tl.int64)
        s = m % S
        x = tl.load(x_rows + (n * stride_xn + s)[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_rows + (n * stride_dyn + s)[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = scale[:, None] * (dy - mean_dy[:, None] - (x - mean[:, None]) * centered_coefficient[:, None])
        tl.store(dx_rows + (n * stride_dxn + s)[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class BatchNormConfig:
    BLOCK: int  # values of one channel per loop step
    SPLIT: int  # chunks per channel (at most MAX_SPLIT)
    num_warps: int
    CHANNELS: int = 1  # channels per program, a row of the tile each (a power of two)


MAX_SPLIT = 64
# Enough programs to fill every SM a few times, each at least a few blocks long.
TARGET_PROGRAMS = 4 * SM_COUNT
MIN_BLOCKS_PER_CHUNK = 4
GPU_BLOCK = 1024
# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size (7 ms on this
# project's 2-core machine, of which the tile's values are a small part up to some 10^5 of them): few, big
# tiles, the most of each. `pick_config` shrinks them to the map: a block no longer than a channel, and as many
# channels a program as fill INTERPRETER_VALUES.
INTERPRETER_CONFIG = BatchNormConfig(BLOCK=8192, SPLIT=1, num_warps=4, CHANNELS=64)
INTERPRETER_VALUES = 32768

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_config(channels: int, per_channel: int, on_cpu: bool = False) -> BatchNormConfig:
    """Chunks per channel for `channels` channels of `per_channel` (N * H * W) values each (and, under the
    interpreter, channels per program; on a GPU each program takes one channel)."""
    if on_cpu:
        block = min(INTERPRETER_CONFIG.BLOCK, triton.next_power_of_2(per_channel))
        rows = min(INTERPRETER_CONFIG.CHANNELS, triton.next_power_of_2(channels), max(1, INTERPRETER_VALUES // block))
        return replace(INTERPRETER_CONFIG, BLOCK=block, CHANNELS=rows)
    wanted = triton.cdiv(TARGET_PROGRAMS, channels)
    room = max(1, per_channel // (GPU_BLOCK * MIN_BLOCKS_PER_CHUNK))
    return BatchNormConfig(BLOCK=GPU_BLOCK, SPLIT=min(wanted, room, MAX_SPLIT), num_warps=4)


class Chunking(NamedTuple):
    chunk: int  # values of a channel per program, a multiple of the block
    split: int  # programs per channel
    block_split: int  # the power of two that holds `split` partials


def chunking(per_channel: int, config: BatchNormConfig) -> Chunking:
    if not 1 <= config.SPLIT <= MAX_SPLIT:
        raise ValueError(f"SPLIT must be in [1, {MAX_SPLIT}], got {config.SPLIT}")
    chunk = triton.cdiv(triton.cdiv(per_channel, config.SPLIT), config.BLOCK) * config.BLOCK
    split = triton.cdiv(per_channel, chunk)  # no empty chunk at the end
    return Chunking(chunk, split, triton.next_power_of_2(split))


class BatchNormForward(NamedTuple):
    y: torch.Tensor  # like x
    mean: torch.Tensor  # fp32 [C], saved for the backward
    invstd: torch.Tensor  # fp32 [C], 1 / sqrt(biased var + eps), saved for the backward


class BatchNormBackward(NamedTuple):
    dx: torch.Tensor  # like x
    dweight: torch.Tensor  # like weight
    dbias: torch.Tensor  # like weight


def _check_map(x: torch.Tensor, name: str) -> tuple[int, int]:
    """(C, H * W) of an [N, C, H, W] map whose height and width fold into one unit-stride axis; (C, 1) of
    [N, C] flat vectors (after an fc: each feature a channel of one value per image, as H = W = 1)."""
    if x.dim() not in (2, 4):
        raise ValueError(f"batch norm takes [N, C, H, W] maps or [N, C] vectors, got {name} of shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"batch norm supports {SUPPORTED_DTYPES}, got {name} of {x.dtype}")
    if x.dim() == 2:
        return x.shape[1], 1
    _, c, h, w = x.shape
    if not ((w == 1 or x.stride(3) == 1) and (h == 1 or x.stride(2) == w)):
        raise ValueError(f"batch norm needs each channel's H x W plane contiguous; {name} has strides {x.stride()}")
    return c, h * w


def _check_channel_vectors(x: torch.Tensor, **vectors: torch.Tensor) -> None:
    for name, vector in vectors.items():
        if vector.shape != (x.shape[1],) or not vector.is_contiguous() or vector.device != x.device:
            raise ValueError(f"batch norm {name} must be a contiguous ({x.shape[1]},) tensor on {x.device}")
        if not vector.dtype.is_floating_point:
            raise TypeError(f"batch norm {name} must be floating point, got {vector.dtype}")


def batch_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    config: BatchNormConfig | None = None,
    kernels: dict | None = None,
) -> BatchNormForward:
    """Training batch norm of `x` [N, C, H, W] with its batch statistics; `running_mean` and `running_var`
    ([C]) are updated in place. Returns y (into `out` when given) and the mean and invstd the backward needs.
    `config` overrides `pick_config`; `kernels` ("partials", "forward") are copies to run instead."""
    channels, spatial = _check_map(x, "x")
    _check_channel_vectors(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    per_channel = x.shape[0] * spatial
    if per_channel < 2:
        raise ValueError(f"batch norm in training needs more than one value per channel, got x of {tuple(x.shape)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"batch norm momentum must be in [0, 1], got {momentum}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, expected {tuple(x.shape)} {x.dtype} on {x.device}")
    _check_map(out, "out")

    config = config or pick_config(channels, per_channel, on_cpu=x.device.type == "cpu")
    chunk, split, block_split = chunking(per_channel, config)
    sums = torch.empty((channels, split), dtype=torch.float32, device=x.device)
    squares = torch.empty_like(sums)
    mean = torch.empty(channels, dtype=torch.float32, device=x.device)
    invstd = torch.empty_like(mean)
    grid = (triton.cdiv(channels, config.CHANNELS), split)
    kernels = _copies(kernels, ("partials", "forward"))
    _partials(kernels, grid, x, None, mean, sums, squares, spatial, per_channel, chunk, config)
    kernels.get("forward", batchnorm_forward_kernel)[grid](
        x, out, weight, bias, sums, squares,
        mean, invstd, running_mean, running_var,
        channels, spatial, per_channel, chunk, split,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        float(eps), float(momentum),
        CHANNELS=config.CHANNELS, BLOCK=config.BLOCK, BLOCK_SPLIT=block_split, num_warps=config.num_warps,
    )  # fmt: skip
    return BatchNormForward(out, mean, invstd)


def _copies(kernels: dict | None, known: tuple[str, ...]) -> dict:
    """The kernel copies to run instead of this module's, by role; a role misspelt would silently run the
    originals, so an unknown one is an error."""
    unknown = sorted(set(kernels or {}) - set(known))
    if unknown:
        raise ValueError(f"unknown kernel roles {unknown}: this launcher runs {', '.join(known)}")
    return kernels or {}


def _partials(kernels, grid, x, dy, mean, sums, products, spatial, per_channel, chunk, config) -> None:
    """Each chunk's partial sums: of x (dy None: the forward's statistics) or of dy and dy * x (the backward's)."""
    other = x if dy is None else dy  # not read without dy
    kernels.get("partials", batchnorm_partials_kernel)[grid](
        x, other, mean, sums, products,
        x.shape[1], spatial, per_channel, chunk,
        x.stride(0), x.stride(1), other.stride(0), other.stride(1),
        HAS_DY=dy is not None, CHANNELS=config.CHANNELS, BLOCK=config.BLOCK, num_warps=config.num_warps,
    )  # fmt: skip


def batch_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    *,
    config: BatchNormConfig | None = None,
    kernels: dict | None = None,
) -> BatchNormBackward:
    """The gradients of `batch_norm_forward` on x, weight and bias, given dy (the gradient on its output), its
    input x and the mean and invstd it returned. `config` overrides `pick_config`; `kernels` ("partials",
    "backward") are copies to run instead."""
    channels, spatial = _check_map(x, "x")
    _check_map(dy, "dy")
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"dy is {tuple(dy.shape)} {dy.dtype}, expected {tuple(x.shape)} {x.dtype} on {x.device}")
    _check_channel_vectors(x, weight=weight, mean=mean, invstd=invstd)
    if mean.dtype != torch.float32 or invstd.dtype != torch.float32:
        raise TypeError("batch norm backward takes the fp32 mean and invstd that batch_norm_forward returned")
    per_channel = x.shape[0] * spatial
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)

    config = config or pick_config(channels, per_channel, on_cpu=x.device.type == "cpu")
    chunk, split, block_split = chunking(per_channel, config)
    sums = torch.empty((channels, split), dtype=torch.float32, device=x.device)
    products = torch.empty_like(sums)
    grid = (triton.cdiv(channels, config.CHANNELS), split)
    kernels = _copies(kernels, ("partials", "backward"))
    _partials(kernels, grid, x, dy, mean, sums, products, spatial, per_channel, chunk, config)
    kernels.get("backward", batchnorm_backward_kernel)[grid](
        x, dy, dx, weight, mean, invstd, sums, products,
        dweight, dbias,
        channels, spatial, per_channel, chunk, split,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        CHANNELS=config.CHANNELS, BLOCK=config.BLOCK, BLOCK_SPLIT=block_split, num_warps=config.num_warps,
    )  # fmt: skip
    return BatchNormBackward(dx, dweight, dbias)
