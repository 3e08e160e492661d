"""Space-to-depth: a strided convolution over few channels as a stride-1 one over blocks of pixels (issue 13).

A conv whose groups read few input channels (AlexNet's conv1: 3) cannot use the channels-last kernel
(`conv_nhwc.py`), whose reduction walks each tap's channels in blocks of at least 16; it runs `conv.py`'s
element-by-element gather. With a stride of sh x sw it has an exact rewrite. Cut the padded input into blocks of
sh x sw pixels and move each block's pixels into channels, ordered (group, row in block, column in block,
channel): block (bh, bw), channel ((g * sh + dy) * sw + dx) * C_g + c holds input pixel (bh * sh + dy - top,
bw * sw + dx - left) of channel g * C_g + c, zero in the padding. A window of KH x KW taps starting at a block
corner covers TH x TW = ceil(KH / sh) x ceil(KW / sw) blocks, so the conv becomes a stride-1, unpadded conv with a
TH x TW filter over sh * sw * C channels, the same groups and the same outputs; its filter holds the original
taps (kh, kw) = (t * sh + dy, u * sw + dx) and zeros past them. The multiply-adds grow by (TH*sh/KH)(TW*sw/KW).
AlexNet's conv1: 3 x 227 x 227 -> 48 x 57 x 57, 11 x 11 stride 4 -> 3 x 3 stride 1 over 48 channels, the same
55 x 55 outputs, (12/11)^2 = 1.19 times the multiply-adds.

The compiler's `space_to_depth` pass (netdsl/compiler/space_to_depth.py) decides which convs to rewrite and what
they become. Here: `space_to_depth_weight` rearranges a conv's filters (once, when the weights are loaded);
`space_to_depth_kernel` and its launcher `space_to_depth` rearrange the input map on every run, into a map the
conv reads channels-last. The transform is a copy (no arithmetic), so the lowered conv computes the same sums as
the original, in another order.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def space_to_depth_kernel(
    x_ptr, y_ptr,
    BATCH, H, W, OUT_H, OUT_W, C_G, C_OUT,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    pad_h, pad_w,
    SH: tl.constexpr, SW: tl.constexpr,  # the block: the conv's stride
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK_P output pixels (blocks) by BLOCK_C output channels: each element a copy of one input
    pixel of one channel, or zero where that pixel lies in the padding."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < BATCH * OUT_H * OUT_W
    mask_c = offs_c < C_OUT
    block_w = offs_p % OUT_W
    block_h = (offs_p // OUT_W) % OUT_H
    batch = (offs_p // (OUT_H * OUT_W)).to(tl.int64)
    # Output channel ((group * SH + dy) * SW + dx) * C_G + c reads input channel group * C_G + c at (dy, dx).
    c = offs_c % C_G
    dx = (offs_c // C_G) % SW
    dy = (offs_c // (C_G * SW)) % SH
    channel = (offs_c // (C_G * SW * SH)) * C_G + c
    ih = (block_h * SH - pad_h)[:, None] + dy[None, :]
    iw = (block_w * SW - pad_w)[:, None] + dx[None, :]
    inside = mask_p[:, None] & mask_c[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_pixels = x_ptr + batch * stride_xn
    x_ptrs = x_pixels[:, None] + channel[None, :] * stride_xc + ih * stride_xh + iw * stride_xw
    x = tl.load(x_ptrs, mask=inside, other=0.0)
    y_pixels = y_ptr + batch * stride_yn + block_h * stride_yh + block_w * stride_yw
    tl.store(y_pixels[:, None] + offs_c[None, :] * stride_yc, x, mask=mask_p[:, None] & mask_c[None, :])


def space_to_depth_weight(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A conv's F x C_g x KH x KW filters as the rewritten conv's F x (sh * sw * C_g) x TH x TW: tap (t, u) of
    channel (dy * sw + dx) * C_g + c is the original tap (t * sh + dy, u * sw + dx) of channel c, zero past the
    filter. Within a group the channel order is the input's (`space_to_depth_kernel`), so groups need nothing more."""
    filters, channels, kh, kw = weight.shape
    sh, sw = block
    th, tw = -(-kh // sh), -(-kw // sw)
    padded = F.pad(weight, (0, tw * sw - kw, 0, th * sh - kh))
    taps = padded.reshape(filters, channels, th, sh, tw, sw).permute(0, 3, 5, 1, 2, 4)
    return taps.reshape(filters, sh * sw * channels, th, tw)


# A tile of 64 blocks by 64 channels (conv1's 48 in one), four warps: a copy, limited by memory.
CONFIG = {"BLOCK_P": 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1}
# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {"BLOCK_P": 1024, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1}


def space_to_depth(
    x: torch.Tensor,
    block: tuple[int, int],
    pad: tuple[int, int] = (0, 0),
    groups: int = 1,
    size: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """x (N x C x H x W, any strides) cut into blocks of `block` (sh, sw) pixels: N x (sh * sw * C) x HB x WB,
    channel ((g * sh + dy) * sw + dx) * C/groups + c of block (bh, bw) being pixel (bh * sh + dy - top,
    bw * sw + dx - left) of channel g * C/groups + c (zero outside x). `pad` is (top, left); `size` (HB, WB)
    defaults to the blocks that cover the padded input; `out`, any strided view, defaults to channels-last."""
    grid, arguments = space_to_depth_launch(x, block, pad, groups, size, out, config)
    (kernel or space_to_depth_kernel)[grid](**arguments)  # `kernel`: a generated copy to run instead
    return arguments["y_ptr"]


def space_to_depth_launch(
    x: torch.Tensor,
    block: tuple[int, int],
    pad: tuple[int, int] = (0, 0),
    groups: int = 1,
    size: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[tuple[int, int], dict[str, Any]]:
    """The checks, the output and the kernel's arguments of `space_to_depth` (works on "meta" tensors)."""
    if x.dim() != 4:
        raise ValueError(f"space_to_depth reads an N x C x H x W map, got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    (sh, sw), (top, left) = block, pad
    if min(sh, sw) < 1 or groups < 1 or channels % groups:
        raise ValueError(f"space_to_depth needs blocks >= 1 and groups dividing {channels}; got {block}, {groups}")
    if size is None:
        size = (-(-(height + top) // sh), -(-(width + left) // sw))
    shape = (batch, channels * sh * sw, *size)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    elif tuple(out.shape) != shape or out.dtype != x.dtype:
        raise ValueError(f"space_to_depth out is {out.dtype} {tuple(out.shape)}, expected {x.dtype} {shape}")
    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        config = INTERPRETER_CONFIG if x.device.type == "cpu" else CONFIG
    grid = (triton.cdiv(batch * size[0] * size[1], config["BLOCK_P"]), triton.cdiv(shape[1], config["BLOCK_C"]))
    arguments = {
        "x_ptr": x, "y_ptr": out,
        "BATCH": batch, "H": height, "W": width, "OUT_H": size[0], "OUT_W": size[1],
        "C_G": channels // groups, "C_OUT": shape[1],
        **{f"stride_x{axis}": step for axis, step in zip("nchw", x.stride(), strict=True)},
        **{f"stride_y{axis}": step for axis, step in zip("nchw", out.stride(), strict=True)},
        "pad_h": top, "pad_w": left, "SH": sh, "SW": sw,
        **config,
    }  # fmt: skip
    return grid, arguments
