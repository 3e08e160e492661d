"""Elementwise layers on [N, C, H, W] maps (or [N, F] matrices): one kernel, the operation picked by constexprs.

    out = ACTIVATION(OP(x))    OP: "copy"   x
                                   "add"    x + y                      (residual joins)
                                   "affine" x * scale[c] + shift[c]    (batch norm at inference, folded)
                               ACTIVATION: "none", "relu", "leaky_relu" (x if x > 0 else slope * x)

A standalone ReLU is OP="copy" with ACTIVATION="relu". Every tensor comes with its own strides, so `out` can be
a channel slice of a larger buffer: concatenation is a copy of each input into its slice. Height and width are
folded into one spatial axis S, which needs stride_h == W * stride_w (true of contiguous maps and of their
channel slices). A 2-D input is treated as [N, F, 1, 1].
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def elementwise_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    C,
    S,
    slope,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_yc,
    stride_ys,
    stride_on,
    stride_oc,
    stride_os,
    OP: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out = ACTIVATION(x), ACTIVATION(x + y) or ACTIVATION(x * scale[c] + shift[c]) (OP: "copy", "add",
    "affine") for a BLOCK_C x BLOCK_S tile (channels x pixels) of one image. Grid: (batch, channel tiles,
    pixel tiles)."""
    pid_n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # A tile one pixel wide serves feature rows (S == 1) only; leaving out the spatial block offset there lets the
    # compiler prove the rows aligned and vectorize along C.
    offs_s = tl.arange(0, 1) if BLOCK_S == 1 else tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_s[None, :] < S)

    x_ptrs = x_ptr + pid_n * stride_xn + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs
    value = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if OP == "add":
        y_ptrs = y_ptr + pid_n * stride_yn + offs_c[:, None] * stride_yc + offs_s[None, :] * stride_ys
        value += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    elif OP == "affine":
        # Loaded as [BLOCK_C, 1] columns, already in the tile's layout: no shuffle through shared memory.
        scale = tl.load(scale_ptr + offs_c[:, None], mask=mask_c[:, None], other=0.0)
        shift = tl.load(shift_ptr + offs_c[:, None], mask=mask_c[:, None], other=0.0)
        value = value * scale + shift

    if ACTIVATION == "relu":
        value = tl.maximum(value, 0.0)
    elif ACTIVATION == "leaky_relu":
        value = tl.where(value > 0.0, value, value * slope)

    out_ptrs = out_ptr + pid_n * stride_on + offs_c[:, None] * stride_oc + offs_s[None, :] * stride_os
    tl.store(out_ptrs, value.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class ElementwiseConfig:
    BLOCK_C: int
    BLOCK_S: int
    num_warps: int


# 1024-element tiles from 1024 channels x 1 pixel (feature rows) to 1 channel x 1024 pixels (large maps).
# A tile one pixel wide handles only S == 1: the kernel then leaves out the spatial offset.
CONFIGS = [ElementwiseConfig(BLOCK_C=1024 // 2**k, BLOCK_S=2**k, num_warps=4) for k in range(11)]

OPS = ("copy", "add", "affine")
ACTIVATIONS = ("none", "relu", "leaky_relu")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_config(spatial: int) -> ElementwiseConfig:
    """The tile whose spatial width is the smallest power of two that covers `spatial` (capped at 1024)."""
    return next((config for config in CONFIGS if spatial <= config.BLOCK_S), CONFIGS[-1])


def elementwise(
    x: torch.Tensor,
    op: str = "copy",
    *,
    other: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str = "none",
    slope: float = 0.01,
    out: torch.Tensor | None = None,
    kernel=None,
) -> torch.Tensor:
    """`activation(op(x))` into `out` (allocated when None); `out` may be a strided view such as a channel slice."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() not in (2, 4):
        raise ValueError(f"elementwise ops take [N, F] or [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"elementwise ops support {SUPPORTED_DTYPES}, got {x.dtype}")
    if spatial_stride(x) is None:
        x = x.contiguous()
    channels = x.shape[1]

    y = x
    if op == "add":
        if other is None or other.shape != x.shape or other.dtype != x.dtype or other.device != x.device:
            raise ValueError(f"add needs `other` of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}")
        y = other if spatial_stride(other) is not None else other.contiguous()
    scale_arg = shift_arg = x
    if op == "affine":
        scale_arg = _per_channel(scale, "scale", channels, x.device)
        shift_arg = _per_channel(shift, "shift", channels, x.device)

    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}, expected {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    stride_os = spatial_stride(out)
    if stride_os is None:
        raise ValueError("out must have height and width that fold into one strided axis (stride_h == W * stride_w)")
    if x.numel() == 0:
        return out

    spatial = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
    config = pick_config(spatial)
    grid = (x.shape[0], triton.cdiv(channels, config.BLOCK_C), triton.cdiv(spatial, config.BLOCK_S))
    (kernel or elementwise_kernel)[grid](
        x,
        y,
        scale_arg,
        shift_arg,
        out,
        channels,
        spatial,
        float(slope) if activation == "leaky_relu" else 0.0,
        x.stride(0),
        x.stride(1),
        spatial_stride(x),
        y.stride(0),
        y.stride(1),
        spatial_stride(y),
        out.stride(0),
        out.stride(1),
        stride_os,
        OP=op,
        ACTIVATION=activation,
        BLOCK_C=config.BLOCK_C,
        BLOCK_S=config.BLOCK_S,
        num_warps=config.num_warps,
    )
    return out


def relu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return elementwise(x, "copy", activation="relu", out=out)


def leaky_relu(x: torch.Tensor, slope: float = 0.01, out: torch.Tensor | None = None) -> torch.Tensor:
    return elementwise(x, "copy", activation="leaky_relu", slope=slope, out=out)


def add(
    x: torch.Tensor, other: torch.Tensor, activation: str = "none", out: torch.Tensor | None = None
) -> torch.Tensor:
    return elementwise(x, "add", other=other, activation=activation, out=out)


def affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    activation: str = "none",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x * scale[c] + shift[c]`, then the activation; scale and shift are [C] vectors."""
    return elementwise(x, "affine", scale=scale, shift=shift, activation=activation, out=out)


def fold_batch_norm(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference batch norm as (scale, shift) in fp32: scale = weight / sqrt(var + eps), shift = bias - mean * scale."""
    scale = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -running_mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str = "none",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch norm with running statistics (inference), optionally followed by an activation."""
    scale, shift = fold_batch_norm(running_mean, running_var, weight, bias, eps)
    return affine(x, scale, shift, activation=activation, out=out)


def concat(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate along dim 1 by copying each input into its channel slice of `out`."""
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    first = tensors[0]
    for t in tensors[1:]:
        if t.dim() != first.dim() or t.shape[0] != first.shape[0] or t.shape[2:] != first.shape[2:]:
            raise ValueError(f"cannot concatenate {tuple(t.shape)} with {tuple(first.shape)} along dim 1")
    shape = (first.shape[0], sum(t.shape[1] for t in tensors), *first.shape[2:])
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out is {tuple(out.shape)}, expected {shape}")
    start = 0
    for t in tensors:
        elementwise(t, "copy", out=out[:, start : start + t.shape[1]])
        start += t.shape[1]
    return out


def _per_channel(values: torch.Tensor | None, name: str, channels: int, device: torch.device) -> torch.Tensor:
    if values is None or values.shape != (channels,):
        raise ValueError(f"affine needs `{name}` of shape ({channels},)")
    return values.to(device=device, dtype=torch.float32).contiguous()


def spatial_stride(t: torch.Tensor) -> int | None:
    """The stride of the folded H*W axis, or None when height and width cannot be folded into one axis."""
    if t.dim() == 2:
        return 1
    _, _, h, w = t.shape
    if h == 1:
        return t.stride(3)
    if w == 1:
        return t.stride(2)
    if t.stride(2) == w * t.stride(3):
        return t.stride(3)
    return None
