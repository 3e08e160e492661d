"""2-D convolution as an implicit GEMM over channels-last (NHWC) maps: an experimental variant of
`conv.py`, not yet chosen by the compiler, kept to be measured against it on a GPU (bench/conv_sweep.py).

Why it may be faster. `conv.py` reduces over K = (c, kh, kw) flattened, which keeps conv1's three
channels a long reduction but makes every K step a gather: consecutive k are different taps, so each
element is its own 2-byte load and Triton cannot stage the tile with asynchronous copies. Here the
reduction runs tap by tap, and within a tap over a block of BLOCK_K channels. With channels-last maps
(element stride 1 between channels, which Triton specializes as a constant) each pixel's BLOCK_K
channels are contiguous: 16-byte vector loads that the pipeliner can issue as cp.async several stages
ahead. The GEMM is [pixels, channels] x [channels, filters]; the weight is read per tap as a
[BLOCK_K, BLOCK_N] block (contiguous along K when the weight is channels-last too).

Why it may not be. A tap's reduction is only C_in/groups long, so a layer with few input channels
wastes most of each BLOCK_K (conv1's 3 channels use 3 of 16 lanes): for those `conv.py` stays.

One flattened loop runs over (tap, channel block), so the pipeliner sees a single loop however small
C_in/groups is. Any strides work (the NCHW layout too, just without the vector loads); the output may
be any strided view, channels-last by default.

The pixel decoding and the bias/activation epilogue repeat conv.py's on purpose: every kernel is one
self-contained `@triton.jit` function, because the emitter copies exactly that function into a
generated file (shared `@triton.jit` helpers would not travel with it).
"""

# ruff: noqa: N803, N806  (Triton convention: sizes and constexprs are upper case)

from typing import Any

import torch
import triton
import triton.language as tl

from netdsl.codegen.conv import ACTIVATIONS, DTYPES, INPUT_PRECISIONS, _pair, _strides


@triton.jit
def conv2d_nhwc_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    BATCH, H, W, OH, OW,
    C_IN_G, C_OUT_G,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    slope,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "relu" or "leaky_relu"
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    group = tl.program_id(1)
    num_pid_n = tl.cdiv(C_OUT_G, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    M = BATCH * OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT_G
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    batch = offs_m // (OH * OW)
    ih0 = oh * conv_stride_h - pad_h
    iw0 = ow * conv_stride_w - pad_w
    x_pixels = x_ptr + batch.to(tl.int64) * stride_xn + (group * C_IN_G) * stride_xc
    out_channel = group * C_OUT_G + offs_n
    w_filters = w_ptr + out_channel.to(tl.int64) * stride_wo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(C_IN_G, BLOCK_K)
    for step in range(0, KH * KW * c_blocks):
        tap = step // c_blocks
        c0 = (step - tap * c_blocks) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        channels = c0 + tl.arange(0, BLOCK_K)
        mask_c = channels < C_IN_G
        x = tl.load(
            (x_pixels + ih * stride_xh + iw * stride_xw)[:, None] + (channels * stride_xc)[None, :],
            mask=inside[:, None] & mask_c[None, :],
            other=0.0,
        )
        w = tl.load(
            (w_filters + kh * stride_wh + kw * stride_ww)[None, :] + (channels * stride_wc)[:, None],
            mask=mask_c[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(x, w, acc=acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + out_channel, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == "leaky_relu":
        acc = tl.where(acc > 0, acc, acc * slope)

    y_pixels = y_ptr + batch.to(tl.int64) * stride_yn + oh * stride_yh + ow * stride_yw
    y_ptrs = y_pixels[:, None] + (out_channel * stride_yc)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}


def pick_config(C_IN_G: int, C_OUT_G: int, dtype: torch.dtype) -> dict:
    """A square 128-pixel tile; 64 filters wide for narrow groups; K blocks of 128 bytes per pixel."""
    block_k = 32 if dtype == torch.float32 else 64
    block_k = max(16, min(block_k, triton.next_power_of_2(C_IN_G)))
    block_n = 128 if C_OUT_G > 64 else 64
    return {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 3}


def conv2d_nhwc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """activation(conv2d(x, weight) + bias). `x` is N x C x H x W with any strides (channels-last is
    the fast case), `weight` C_out x C_in/groups x KH x KW (channels-last too, ideally), `out` any
    strided N x C_out x OH x OW view; allocated channels-last when not given."""
    grid, arguments = conv2d_nhwc_launch(
        x, weight, bias, stride, padding, dilation, groups, activation, slope, input_precision, out, config
    )
    conv2d_nhwc_kernel[grid](**arguments)
    return arguments["y_ptr"]


def conv2d_nhwc_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[tuple[int, int], dict[str, Any]]:
    """The checks, the output and the kernel's arguments of `conv2d_nhwc` (works on "meta" tensors)."""
    if x.dtype not in DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"conv2d_nhwc needs float32, float16 or bfloat16 tensors of one dtype, got {x.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_nhwc reads N x C x H x W maps and 4-D weights, got {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"unknown input precision {input_precision!r}; expected one of {INPUT_PRECISIONS}")
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = _pair(stride), _pair(padding), _pair(dilation)
    if min(stride_h, stride_w, dil_h, dil_w) < 1 or min(pad_h, pad_w) < 0:
        raise ValueError(f"conv2d_nhwc needs stride, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    batch, c_in, height, width = x.shape
    c_out, c_in_group, kh, kw = weight.shape
    if groups < 1 or c_in % groups or c_out % groups or c_in_group != c_in // groups:
        raise ValueError(f"conv2d_nhwc weight {tuple(weight.shape)} does not fit {c_in} channels in {groups} groups")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"conv2d_nhwc bias has shape {tuple(bias.shape)}, expected ({c_out},)")
    out_h = (height + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"conv2d_nhwc output would be empty: input {height} x {width}, kernel {kh} x {kw}")
    out_shape = (batch, c_out, out_h, out_w)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    elif out.shape != out_shape or out.dtype != x.dtype:
        raise ValueError(f"conv2d_nhwc out is {out.dtype} {tuple(out.shape)}, expected {x.dtype} {out_shape}")
    c_out_group = c_out // groups
    if config is None:
        config = INTERPRETER_CONFIG if x.device.type == "cpu" else pick_config(c_in_group, c_out_group, x.dtype)
    rows = batch * out_h * out_w
    grid = (triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(c_out_group, config["BLOCK_N"]), groups)
    arguments = {
        "x_ptr": x, "w_ptr": weight, "b_ptr": weight if bias is None else bias, "y_ptr": out,
        "BATCH": batch, "H": height, "W": width, "OH": out_h, "OW": out_w,
        "C_IN_G": c_in_group, "C_OUT_G": c_out_group,
        **_strides("x", "nchw", x), **_strides("w", "ochw", weight), **_strides("y", "nchw", out),
        "conv_stride_h": stride_h, "conv_stride_w": stride_w,
        "pad_h": pad_h, "pad_w": pad_w, "dil_h": dil_h, "dil_w": dil_w,
        "slope": slope,
        "KH": kh, "KW": kw,
        "HAS_BIAS": bias is not None, "ACTIVATION": activation, "INPUT_PRECISION": input_precision,
        **config,
    }  # fmt: skip
    return grid, arguments
