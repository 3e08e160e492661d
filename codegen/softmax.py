"""Softmax over the feature axis: dim 1 of a [N, F] matrix or of an [N, C, H, W] map.

The net's softmax normalizes the class scores of each sample, so it runs over dim 1: the features of a
fully connected output, or the channels at every pixel of a convolutional one. A 2-D input is treated as
[N, F, 1, 1]; the height and width of a map are folded into one spatial axis S.

Each program owns one sample and BLOCK_S spatial positions, and walks the channels in BLOCK_C chunks twice:
first an online max and sum (the sum is rescaled whenever the max grows, so logits of 1e4 never overflow exp),
then exp(x - max) / sum written out. Any number of channels works; math is fp32 whatever the storage dtype.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from netdsl.codegen.elementwise import spatial_stride


@triton.jit
def softmax_kernel(
    x_ptr,
    out_ptr,
    C,
    S,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_on,
    stride_oc,
    stride_os,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Softmax over the C channels at BLOCK_S pixels of one image, BLOCK_C channels at a time: one pass for the
    running max and sum, one to write. Grid: (batch, pixel tiles)."""
    pid_n = tl.program_id(0)
    # A tile one pixel wide serves feature rows (S == 1) only; leaving out the spatial block offset there lets the
    # compiler prove the rows aligned and vectorize along C.
    offs_s = tl.arange(0, 1) if BLOCK_S == 1 else tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    x_base = x_ptr + pid_n.to(tl.int64) * stride_xn + offs_s[None, :] * stride_xs
    out_base = out_ptr + pid_n.to(tl.int64) * stride_on + offs_s[None, :] * stride_os

    running_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_S], tl.float32)
    for c_start in range(0, C, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_s[None, :]
        x = tl.load(x_base + offs_c[:, None] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        # Padding is a huge finite negative, not -inf: a column of pure padding then gives exp(0), not
        # exp(-inf - -inf) = NaN, and next to any real logit it still contributes exp(...) = 0.
        x = tl.where(mask, x, -3.0e38)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[None, :]), axis=0)
        running_max = new_max

    inv_sum = 1.0 / running_sum
    for c_start in range(0, C, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_s[None, :]
        x = tl.load(x_base + offs_c[:, None] * stride_xc, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.exp(x - running_max[None, :]) * inv_sum[None, :]
        tl.store(out_base + offs_c[:, None] * stride_oc, y.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class SoftmaxConfig:
    BLOCK_C: int
    BLOCK_S: int
    num_warps: int


# Feature rows (S == 1, and only they: the kernel leaves out the spatial offset when BLOCK_S == 1) take the
# smallest tile that holds a whole row, and loop when none does;
# maps put up to 128 pixels side by side so that loads along the contiguous spatial axis coalesce.
CONFIGS = [
    SoftmaxConfig(BLOCK_C=128, BLOCK_S=1, num_warps=1),
    SoftmaxConfig(BLOCK_C=1024, BLOCK_S=1, num_warps=4),
    SoftmaxConfig(BLOCK_C=4096, BLOCK_S=1, num_warps=8),
    SoftmaxConfig(BLOCK_C=64, BLOCK_S=32, num_warps=4),
    SoftmaxConfig(BLOCK_C=32, BLOCK_S=128, num_warps=8),
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_config(channels: int, spatial: int) -> SoftmaxConfig:
    """The tile for `channels` features at each of `spatial` positions (1 for a [N, F] input)."""
    if spatial == 1:
        rows = [config for config in CONFIGS if config.BLOCK_S == 1]
        return next((config for config in rows if channels <= config.BLOCK_C), rows[-1])
    maps = [config for config in CONFIGS if config.BLOCK_S > 1]
    return next((config for config in maps if spatial <= config.BLOCK_S), maps[-1])


def softmax(x: torch.Tensor, out: torch.Tensor | None = None, *, kernel=None) -> torch.Tensor:
    """Softmax of `x` ([N, F] or [N, C, H, W]) over dim 1; `out` may be a strided view, e.g. a channel slice."""
    if x.dim() not in (2, 4):
        raise ValueError(f"softmax takes [N, F] or [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"softmax supports {SUPPORTED_DTYPES}, got {x.dtype}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}, expected {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if spatial_stride(x) is None:
        x = x.contiguous()
    stride_os = spatial_stride(out)
    if stride_os is None:
        raise ValueError("out must have height and width that fold into one strided axis (stride_h == W * stride_w)")

    n, c = x.shape[0], x.shape[1]
    s = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
    if x.numel() == 0:
        return out
    config = pick_config(c, s)
    grid = (n, triton.cdiv(s, config.BLOCK_S))
    (kernel or softmax_kernel)[grid](
        x,
        out,
        c,
        s,
        x.stride(0),
        x.stride(1),
        spatial_stride(x),
        out.stride(0),
        out.stride(1),
        stride_os,
        BLOCK_C=config.BLOCK_C,
        BLOCK_S=config.BLOCK_S,
        num_warps=config.num_warps,
    )
    return out
