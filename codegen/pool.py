"""2-D max and average pooling over NCHW tensors, global average pooling included.

One program instance computes BLOCK outputs taken from the flattened (n, c, oh, ow) index space, so small
planes (13x13, 6x6) fill a block as well as large ones. Each output walks its KH x KW window in the input, its
taps dil_h and dil_w apart.

Windows are placed as `windows.py` says (ONNX's rules, PyTorch's where both express them): padding may differ
at each end (top, left, bottom, right) and be anything below the window size, as long as every window holds
an input position. Max pooling: positions outside the input (padding, or the overhang of a ceil-mode window)
never win; a NaN in the window gives NaN, as in PyTorch.
Average pooling: with count_include_pad the divisor counts the taps inside the padded input (the padding,
but not the part of a ceil-mode window that hangs past the bottom/right padding); without it the taps
inside the input only.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .windows import empty_window, four_pads, output_length

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def pool2d_kernel(
    x_ptr, out_ptr,
    C, H, W, OH, OW, total,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    MODE: tl.constexpr,  # "max" or "avg"
    COUNT_INCLUDE_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Max or average pooling (MODE) of BLOCK outputs of the flattened [N, C, OH, OW] output over their KH x KW
    windows, in fp32. Grid: (cdiv(total, BLOCK),)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    ow = offs % OW
    rest = offs // OW
    oh = rest % OH
    rest = rest // OH
    c = rest % C
    n = rest // C

    h_start = oh * stride_h - pad_top
    w_start = ow * stride_w - pad_left
    x_base = x_ptr + n.to(tl.int64) * stride_xn + c * stride_xc

    acc = tl.full([BLOCK], float("-inf") if MODE == "max" else 0.0, tl.float32)
    for kh in range(KH):
        ih = h_start + kh * dil_h
        row_ok = valid & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = w_start + kw * dil_w
            inside = row_ok & (iw >= 0) & (iw < W)
            ptrs = x_base + ih * stride_xh + iw * stride_xw
            if MODE == "max":
                v = tl.load(ptrs, mask=inside, other=float("-inf")).to(tl.float32)
                acc = tl.maximum(acc, v, propagate_nan=tl.PropagateNan.ALL)
            else:
                acc += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)

    if MODE == "avg":
        if COUNT_INCLUDE_PAD:  # the taps inside the padded input
            rows = window_taps(h_start, -pad_top, H + pad_bottom, KH, dil_h)
            cols = window_taps(w_start, -pad_left, W + pad_right, KW, dil_w)
        else:  # the taps inside the input
            rows = window_taps(h_start, 0, H, KH, dil_h)
            cols = window_taps(w_start, 0, W, KW, dil_w)
        acc = acc / (rows * cols).to(tl.float32)

    out_ptrs = out_ptr + n.to(tl.int64) * stride_on + c * stride_oc + oh * stride_oh + ow * stride_ow
    tl.store(out_ptrs, acc, mask=valid)


@triton.jit
def window_taps(start, low, high, K: tl.constexpr, dil):
    """How many of the K taps start, start + dil, ... lie in [low, high) (windows.counted_taps), with
    non-negative operands only: integer division rounds the same way on every backend."""
    first = (tl.maximum(low - start, 0) + dil - 1) // dil
    last = tl.minimum((tl.maximum(high - start, 0) + dil - 1) // dil, K)
    return tl.maximum(last - first, 0)


# (BLOCK, num_warps), largest first; pick_config takes the first that still gives enough program instances.
# Every config gives each thread 4 outputs: the compiler issues all KH * KW loads of a window at once.
CONFIGS = (
    {"BLOCK": 1024, "num_warps": 8},
    {"BLOCK": 512, "num_warps": 4},
    {"BLOCK": 256, "num_warps": 2},
    {"BLOCK": 128, "num_warps": 1},
)
# Two waves over the 132 SMs of an H100: fewer program instances leave SMs idle.
MIN_PROGRAMS = 264


# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {"BLOCK": 8192, "num_warps": 4}
# The most outputs one launch indexes: the kernel's flat index is an int32, and its last block reaches up to
# BLOCK past the outputs (masked lanes, which must not wrap around to valid-looking negative indices).
MAX_FLAT_INDEX = 2**31 - 2**16


def pick_config(total_outputs: int) -> dict:
    """Largest block that still gives MIN_PROGRAMS program instances, else the smallest block."""
    for config in CONFIGS:
        if triton.cdiv(total_outputs, config["BLOCK"]) >= MIN_PROGRAMS:
            return dict(config)
    return dict(CONFIGS[-1])


def pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """An int or an (h, w) pair as an (h, w) pair of ints."""
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return int(value[0]), int(value[1])


def pooled_size(
    size: int, window: int, stride: int, padding: int | tuple[int, int], ceil_mode: bool, dilation: int = 1
) -> int:
    """The pooling output size (PyTorch's rule, ONNX's with `padding` (begin, end) differing): floor (or ceil)
    of the window count, and in ceil mode the last window must start inside the input or the begin padding."""
    begin, end = (padding, padding) if isinstance(padding, int) else padding
    out = output_length(size, window, stride, begin, end, dilation, ceil_mode)
    if out < 1:
        raise ValueError(f"pooling window {window} is larger than the padded input {size + begin + end}")
    return out


def check_pool_args(
    window: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int] = (1, 1),
) -> None:
    """`padding` is (top, left, bottom, right)."""
    if min(window) < 1 or min(stride) < 1 or min(padding) < 0 or min(dilation) < 1:
        raise ValueError(f"bad pooling window {window}, stride {stride}, padding {padding} or dilation {dilation}")
    if any(pad >= size for pad, size in zip(padding, (*window, *window), strict=True)):
        # ONNX's limit (PyTorch's is half the window): below it only a dilated window can miss the input.
        raise ValueError(f"padding {padding} must be smaller than the pooling window {window}")


def pool_geometry(
    height: int,
    width: int,
    window: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    ceil_mode: bool,
) -> tuple[int, int]:
    """The checked output size (OH, OW) of pooling a height x width map; `padding` is (top, left, bottom, right)."""
    check_pool_args(window, stride, padding, dilation)
    top, left, bottom, right = padding
    oh = pooled_size(height, window[0], stride[0], (top, bottom), ceil_mode, dilation[0])
    ow = pooled_size(width, window[1], stride[1], (left, right), ceil_mode, dilation[1])
    for n, k, s, begin, d, count in zip((height, width), window, stride, (top, left), dilation, (oh, ow), strict=True):
        if empty_window(n, k, s, begin, d, count) is not None:
            raise ValueError(f"a pooling window reads only padding: {k} taps {d} apart step over {n} positions")
    return oh, ow


def check_output(out: torch.Tensor, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be a {x.dtype} tensor of shape {shape} on {x.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def pool2d(
    x: torch.Tensor,
    kind: str,
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    out: torch.Tensor | None = None,
    *,
    dilation: int | tuple[int, int] = (1, 1),
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """Max ("max") or average ("avg") pooling of an NCHW tensor; `out` may be a channel slice of a larger buffer.

    `padding` is n, (h, w) or (top, left, bottom, right). `config` ({"BLOCK": power of two, "num_warps"})
    overrides `pick_config`."""
    if kind not in ("max", "avg"):
        raise ValueError(f"pooling kind must be 'max' or 'avg', got {kind!r}")
    if x.dim() != 4 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"expected a 4-D float32/float16/bfloat16 NCHW tensor, got {x.dtype} {tuple(x.shape)}")
    window, steps, dilations = pair(size, "size"), pair(stride, "stride"), pair(dilation, "dilation")
    pads = four_pads(padding)
    n, c, h, w = x.shape
    oh, ow = pool_geometry(h, w, window, steps, pads, dilations, ceil_mode)
    if out is None:
        out = torch.empty((n, c, oh, ow), device=x.device, dtype=x.dtype)
    check_output(out, x, (n, c, oh, ow))
    total = n * c * oh * ow
    if total == 0:
        return out

    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        config = INTERPRETER_CONFIG if x.device.type == "cpu" else pick_config(total)
    config = {"num_warps": 4, **config}
    # The kernel's flat output index is 32-bit: a batch whose outputs pass 2**31 runs in slices that do not
    # (one image's are fewer: netdsl.ir.shapes.MAX_ELEMENTS).
    per_slice = max(1, MAX_FLAT_INDEX // (c * oh * ow))
    for start in range(0, n, per_slice):
        xs, outs = x[start : start + per_slice], out[start : start + per_slice]
        count = xs.shape[0] * c * oh * ow
        grid = (triton.cdiv(count, config["BLOCK"]),)
        (kernel or pool2d_kernel)[grid](
            xs, outs,
            c, h, w, oh, ow, count,
            *xs.stride(),
            *outs.stride(),
            steps[0], steps[1], *pads, dilations[0], dilations[1],
            KH=window[0], KW=window[1],
            MODE=kind,
            COUNT_INCLUDE_PAD=count_include_pad,
            BLOCK=config["BLOCK"],
            num_warps=config["num_warps"],
        )  # fmt: skip
    return out


def global_avg_pool2d(x: torch.Tensor, out: torch.Tensor | None = None, *, kernel=None) -> torch.Tensor:
    """Average over the whole H x W plane: N x C x H x W -> N x C x 1 x 1 (`pool2d` with the plane as its window)."""
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D NCHW tensor, got shape {tuple(x.shape)}")
    plane = (x.shape[2], x.shape[3])
    return pool2d(x, "avg", plane, plane, out=out, kernel=kernel)
