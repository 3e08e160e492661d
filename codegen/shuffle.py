"""ShuffleNet's channel shuffle on [N, C, H, W] maps: one gather-copy kernel.

    out[n, i, h, w] = x[n, (i % GROUPS) * PER_GROUP + i // GROUPS, h, w]        PER_GROUP = C / GROUPS

which is `x.view(N, GROUPS, PER_GROUP, H, W).transpose(1, 2)` laid out again as N x C x H x W. Each program
owns one image and a BLOCK_C x BLOCK_S tile of output channels by pixels; every tensor comes with its own four
strides, so NCHW maps, channels-last maps and any strided view (a channel slice of a larger buffer) work. Where
both maps fold height and width into one strided axis (stride_h == W * stride_w: contiguous and channels-last
maps and their channel slices), FOLD_HW addresses pixels by that one stride, which keeps loads and stores along
it contiguous for the compiler; otherwise each pixel's row and column are worked out. The tile is wide along
whichever axis of the output is contiguous: pixels for NCHW, channels for channels-last.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from netdsl.codegen.elementwise import spatial_stride


@triton.jit
def shuffle_kernel(
    x_ptr,
    out_ptr,
    C,
    W,
    S,
    GROUPS,
    PER_GROUP,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    FOLD_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Channel shuffle: output channel c is input channel (c % GROUPS) * PER_GROUP + c // GROUPS, for a BLOCK_C x
    BLOCK_S tile (channels x pixels) of one image (FOLD_HW: rows and columns walked as one axis). Grid: (batch,
    channel tiles, pixel tiles)."""
    pid_n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # output channels
    offs_s = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)  # pixels, row by row
    source = (offs_c % GROUPS) * PER_GROUP + offs_c // GROUPS  # the input channel each output channel reads
    if FOLD_HW:
        x_pixels = offs_s * stride_xw
        out_pixels = offs_s * stride_ow
    else:
        rows = offs_s // W
        cols = offs_s - rows * W
        x_pixels = rows * stride_xh + cols * stride_xw
        out_pixels = rows * stride_oh + cols * stride_ow
    mask = (offs_c < C)[:, None] & (offs_s < S)[None, :]

    x_ptrs = x_ptr + pid_n * stride_xn + source[:, None] * stride_xc + x_pixels[None, :]
    value = tl.load(x_ptrs, mask=mask)
    out_ptrs = out_ptr + pid_n * stride_on + offs_c[:, None] * stride_oc + out_pixels[None, :]
    tl.store(out_ptrs, value.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class ShuffleConfig:
    BLOCK_C: int
    BLOCK_S: int
    num_warps: int


# 1024-element tiles from 1024 channels x 1 pixel (channels-last) to 1 channel x 1024 pixels (NCHW).
CONFIGS = [ShuffleConfig(BLOCK_C=1024 // 2**k, BLOCK_S=2**k, num_warps=4) for k in range(11)]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_config(channels: int, spatial: int, channels_last: bool) -> ShuffleConfig:
    """The tile as wide along the output's contiguous axis as that axis is long (capped at 1024): channels for
    a channels-last output, pixels otherwise."""
    if channels_last:
        return next((config for config in reversed(CONFIGS) if channels <= config.BLOCK_C), CONFIGS[0])
    return next((config for config in CONFIGS if spatial <= config.BLOCK_S), CONFIGS[-1])


def shuffle(x: torch.Tensor, groups: int, out: torch.Tensor | None = None, *, kernel=None) -> torch.Tensor:
    """The channel shuffle of `x` ([N, C, H, W], any strides) in `groups` groups, into `out` (allocated in `x`'s
    layout when None; it may be any strided view, but must not overlap `x`)."""
    if x.dim() != 4:
        raise ValueError(f"shuffle takes [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"shuffle supports {SUPPORTED_DTYPES}, got {x.dtype}")
    channels = x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
        raise ValueError(f"{channels} channels cannot be shuffled in {groups!r} groups: C must be a multiple of groups")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}, expected {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if x.numel() == 0:
        return out

    n, _, height, width = x.shape
    spatial = height * width
    fold = spatial_stride(x) is not None and spatial_stride(out) is not None
    x_strides = (x.stride(2), spatial_stride(x)) if fold else (x.stride(2), x.stride(3))
    out_strides = (out.stride(2), spatial_stride(out)) if fold else (out.stride(2), out.stride(3))
    config = pick_config(channels, spatial, channels_last=out.stride(1) == 1 and channels > 1)
    grid = (n, triton.cdiv(channels, config.BLOCK_C), triton.cdiv(spatial, config.BLOCK_S))
    (kernel or shuffle_kernel)[grid](
        x,
        out,
        channels,
        width,
        spatial,
        groups,
        channels // groups,
        x.stride(0),
        x.stride(1),
        *x_strides,
        out.stride(0),
        out.stride(1),
        *out_strides,
        FOLD_HW=fold,
        BLOCK_C=config.BLOCK_C,
        BLOCK_S=config.BLOCK_S,
        num_warps=config.num_warps,
    )
    return out
