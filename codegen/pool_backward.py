"""Backward of 2-D max and average pooling (codegen/pool.py), global average pooling included, and the max
pool's training forward, which saves what its backward needs.

Windows are placed as the forward places them (`windows.py`, ONNX's rules): padding (top, left, bottom, right),
dilation, ceil mode. Every tensor is indexed through its own strides (NCHW, channels-last, views).

Max pooling. The training forward (`max_pool2d_train`) computes what `pool.pool2d(x, "max", ...)` does and, for
each output, its winner's offset in the window, kh * KW + kw, as int8 (windows of up to 128 taps): the first
largest value in row-major window order, as PyTorch's max_pool2d picks, a NaN taking over from whatever came
before it (PyTorch's rule too, so of several NaNs the last wins). The backward reads only that offset and the
incoming gradient, never x. Saved rather than recomputed in the backward: the forward finds the winner anyway
(a register, and a one-byte store per output: a quarter of a byte per input element for 3x3/2), and the backward
then reads a byte and a gradient per window over each input element. Recomputing would read x (2 or 4 bytes an
element) and every tap of each window over each input element (4 windows x 9 taps for 3x3/2), as comparing x
with the saved output cannot tell which of tied values comes first.

Backward, as a gather: one program instance per BLOCK input elements, each summing the gradients of the
windows over it that it won (max) or the gradient of every window over it divided by that window's divisor
(average: the forward's, `pool.window_taps`, counting the padding or not, never a ceil-mode overhang). An input
row ih lies in the windows oh <= (ih + top) / stride whose taps reach it: at most COVER_H = ceil(span / stride)
of them (span = dilation * (KH - 1) + 1: 2 for 3x3/2, 3 for 3x3/1), tried from the last down, a window kept
when the distance from its first row to ih is a whole number of dilations below the span; likewise along the
width. Each input element is written once, by one program, zero when no window holds it: no atomics, no
clearing pass, and the sum runs in a fixed order (fp32), so the bits never vary.

Global average pooling is average pooling with the plane as its window (one window over every pixel).
Average pooling has no training forward of its own: its backward needs the shapes only.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from .layouts import empty_like_layout, is_channels_last, stride_arguments
from .limits import MAX_WINDOW_TAPS
from .pool import INTERPRETER_CONFIG, MIN_PROGRAMS, SUPPORTED_DTYPES, check_output, pair, pool_geometry, window_taps
from .windows import four_pads

Padding = int | tuple[int, int] | tuple[int, int, int, int]  # n, (h, w) or (top, left, bottom, right)


@triton.jit
def max_pool2d_train_kernel(
    x_ptr, out_ptr, argmax_ptr,
    C, H, W, OH, OW, total,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # walk the outputs channel fastest (coalesced on channels-last maps)
    BLOCK: tl.constexpr,
):  # fmt: skip
    """pool.pool2d_kernel's max over BLOCK outputs, also storing each window's winner (kh * KW + kw, int8)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    n, c, oh, ow = unflatten(offs, C, OH, OW, CHANNELS_LAST)

    h_start = oh * stride_h - pad_top
    w_start = ow * stride_w - pad_left
    x_base = x_ptr + n.to(tl.int64) * stride_xn + c * stride_xc

    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_q = tl.full([BLOCK], -1, tl.int32)
    for kh in range(KH):
        ih = h_start + kh * dil_h
        row_ok = valid & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = w_start + kw * dil_w
            inside = row_ok & (iw >= 0) & (iw < W)
            # Compared in fp32: Triton's interpreter compares bf16 as raw bits.
            v = tl.load(x_base + ih * stride_xh + iw * stride_xw, mask=inside, other=float("-inf")).to(tl.float32)
            # PyTorch's rule: a larger value or a NaN takes over; the first tap inside the input starts.
            take = inside & ((v > best) | (v != v) | (best_q < 0))
            best = tl.where(take, v, best)
            best_q = tl.where(take, kh * KW + kw, best_q)

    window = n.to(tl.int64) * stride_on + c * stride_oc + oh * stride_oh + ow * stride_ow
    tl.store(out_ptr + window, best.to(out_ptr.dtype.element_ty), mask=valid)
    saved = n.to(tl.int64) * stride_an + c * stride_ac + oh * stride_ah + ow * stride_aw
    tl.store(argmax_ptr + saved, best_q.to(tl.int8), mask=valid)


@triton.jit
def pool2d_backward_kernel(
    grad_out_ptr, argmax_ptr, grad_x_ptr,
    C, H, W, OH, OW, total,
    stride_gn, stride_gc, stride_gh, stride_gw,  # the pooled gradient
    stride_an, stride_ac, stride_ah, stride_aw,  # the saved winners (max only)
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    COVER_H: tl.constexpr, COVER_W: tl.constexpr,  # the most windows over one pixel along each axis
    MODE: tl.constexpr,  # "max" or "avg"
    COUNT_INCLUDE_PAD: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # walk the input elements channel fastest (coalesced on channels-last maps)
    BLOCK: tl.constexpr,
):  # fmt: skip
    """dx for BLOCK input elements: the gather over the windows that hold each of them."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    n, c, h, w = unflatten(offs, C, H, W, CHANNELS_LAST)
    grad_base = n.to(tl.int64) * stride_gn + c * stride_gc
    argmax_base = n.to(tl.int64) * stride_an + c * stride_ac
    # The last window that may hold the pixel, along each axis (the numerators are >= 0).
    last_oh = (h + pad_top) // stride_h
    last_ow = (w + pad_left) // stride_w

    acc = tl.zeros([BLOCK], tl.float32)
    for th in range(COVER_H):
        oh = last_oh - th
        reach_h = h + pad_top - oh * stride_h  # from the window's first row to h: >= 0
        kh = reach_h // dil_h
        row_ok = valid & (oh >= 0) & (oh < OH) & (reach_h % dil_h == 0) & (kh < KH)
        if MODE == "avg":
            if COUNT_INCLUDE_PAD:
                rows = window_taps(oh * stride_h - pad_top, -pad_top, H + pad_bottom, KH, dil_h)
            else:
                rows = window_taps(oh * stride_h - pad_top, 0, H, KH, dil_h)
        for tw in range(COVER_W):
            ow = last_ow - tw
            reach_w = w + pad_left - ow * stride_w
            kw = reach_w // dil_w
            covers = row_ok & (ow >= 0) & (ow < OW) & (reach_w % dil_w == 0) & (kw < KW)
            grad_ptrs = grad_out_ptr + grad_base + oh * stride_gh + ow * stride_gw
            if MODE == "max":
                winner = tl.load(argmax_ptr + argmax_base + oh * stride_ah + ow * stride_aw, mask=covers, other=-1)
                won = covers & (winner.to(tl.int32) == kh * KW + kw)
                acc += tl.load(grad_ptrs, mask=won, other=0.0).to(tl.float32)
            else:
                if COUNT_INCLUDE_PAD:
                    cols = window_taps(ow * stride_w - pad_left, -pad_left, W + pad_right, KW, dil_w)
                else:
                    cols = window_taps(ow * stride_w - pad_left, 0, W, KW, dil_w)
                grad = tl.load(grad_ptrs, mask=covers, other=0.0).to(tl.float32)
                # A window that holds the pixel counts it: its divisor is >= 1 (the others are skipped).
                acc += tl.where(covers, grad / tl.maximum(rows * cols, 1).to(tl.float32), 0.0)

    grad_x_ptrs = grad_x_ptr + n.to(tl.int64) * stride_dxn + c * stride_dxc + h * stride_dxh + w * stride_dxw
    tl.store(grad_x_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=valid)


@triton.jit
def unflatten(offs, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, h, w) of flat indices over an N x C x H x W map, in NCHW order or, CHANNELS_LAST, NHWC order."""
    if CHANNELS_LAST:
        c = offs % C
        rest = offs // C
        w = rest % W
        rest = rest // W
        h = rest % H
        n = rest // H
    else:
        w = offs % W
        rest = offs // W
        h = rest % H
        rest = rest // H
        c = rest % C
        n = rest // C
    return n, c, h, w


# (BLOCK, num_warps), largest first; pick_config takes the first that still gives MIN_PROGRAMS program instances.
# Two elements a thread, where pool.py's forward has four: with four, the gather of a dilated average (9 windows
# over a pixel, a divisor each) needs 128 registers at 8 warps and spills on sm_90, and so does the bf16
# training forward at 1 warp; with two, 48 to 80 (tests/test_sm90_pool_backward.py). Not yet timed on a GPU.
CONFIGS = (
    {"BLOCK": 512, "num_warps": 8},
    {"BLOCK": 256, "num_warps": 4},
    {"BLOCK": 128, "num_warps": 2},
    {"BLOCK": 64, "num_warps": 1},
)


def pick_config(total: int) -> dict:
    """Largest block that still gives MIN_PROGRAMS program instances over `total` elements, else the smallest."""
    for config in CONFIGS:
        if triton.cdiv(total, config["BLOCK"]) >= MIN_PROGRAMS:
            return dict(config)
    return dict(CONFIGS[-1])


def max_pool2d_train(
    x: torch.Tensor,
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: Padding = 0,
    ceil_mode: bool = False,
    out: torch.Tensor | None = None,
    *,
    dilation: int | tuple[int, int] = 1,
    config: dict | None = None,
    kernel=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pool.pool2d(x, "max", ...)` (same arguments) and what its backward needs: (out, argmax), argmax each
    window's winner as its offset kh * KW + kw (int8), both laid out as x (channels-last when x is) unless `out`
    is given. `config` ({"BLOCK", "num_warps"}) overrides `pick_config`; `kernel`: a generated copy to run."""
    saved, grid, arguments = max_pool2d_train_launch(x, size, stride, padding, ceil_mode, out, dilation, config)
    if arguments["total"] > 0:
        (kernel or max_pool2d_train_kernel)[grid](**arguments)
    return saved


def max_pool2d_backward(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    input_shape: Sequence[int],
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: Padding = 0,
    ceil_mode: bool = False,
    grad_input: torch.Tensor | None = None,
    *,
    dilation: int | tuple[int, int] = 1,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """The gradient on the input (of `input_shape`) of `max_pool2d_train`, given `grad_out`, the gradient on its
    output, and the `argmax` it saved; the forward's pooling arguments. `grad_input` may be any strided tensor of
    the input's shape and grad_out's dtype; by default one laid out as grad_out (channels-last when it is)."""
    grad_input, grid, arguments = max_pool2d_backward_launch(
        grad_out, argmax, input_shape, size, stride, padding, ceil_mode, grad_input, dilation, config
    )
    if arguments["total"] > 0:
        (kernel or pool2d_backward_kernel)[grid](**arguments)
    return grad_input


def avg_pool2d_backward(
    grad_out: torch.Tensor,
    input_shape: Sequence[int],
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: Padding = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    grad_input: torch.Tensor | None = None,
    *,
    dilation: int | tuple[int, int] = 1,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """The gradient on the input (of `input_shape`) of `pool.pool2d(x, "avg", ...)` with the same arguments, given
    `grad_out`, the gradient on its output. `grad_input` as in `max_pool2d_backward`."""
    grad_input, grid, arguments = avg_pool2d_backward_launch(
        grad_out, input_shape, size, stride, padding, ceil_mode, count_include_pad, grad_input, dilation, config
    )
    if arguments["total"] > 0:
        (kernel or pool2d_backward_kernel)[grid](**arguments)
    return grad_input


def global_avg_pool2d_backward(
    grad_out: torch.Tensor,
    input_shape: Sequence[int],
    grad_input: torch.Tensor | None = None,
    *,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """The gradient on the N x C x H x W input of `pool.global_avg_pool2d`, given `grad_out` (N x C x 1 x 1):
    each element gets its plane's gradient / (H * W)."""
    grad_input, grid, arguments = global_avg_pool2d_backward_launch(grad_out, input_shape, grad_input, config)
    if arguments["total"] > 0:
        (kernel or pool2d_backward_kernel)[grid](**arguments)
    return grad_input


def max_pool2d_train_launch(
    x: torch.Tensor,
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: Padding = 0,
    ceil_mode: bool = False,
    out: torch.Tensor | None = None,
    dilation: int | tuple[int, int] = 1,
    config: dict | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int], dict[str, Any]]:
    """Everything `max_pool2d_train` does but the launch: checks, allocates (out, argmax) and returns them with the
    grid and the kernel's keyword arguments (launch options included). Works on "meta" tensors."""
    if x.dim() != 4 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"max-pool training forward: expected a 4-D float32/float16/bfloat16 tensor, "
                         f"got {x.dtype} {tuple(x.shape)}")  # fmt: skip
    window, steps, pads, dilations, shape = _geometry(tuple(x.shape), size, stride, padding, dilation, ceil_mode)
    check_max_window(window)
    if out is None:
        out = empty_like_layout(x, shape, x.dtype)
    check_output(out, x, shape)
    argmax = empty_like_layout(x, shape, torch.int8)
    total = _total(shape)
    config = _config(total, x.device, config)
    arguments = {
        "x_ptr": x, "out_ptr": out, "argmax_ptr": argmax,
        "C": shape[1], "H": x.shape[2], "W": x.shape[3], "OH": shape[2], "OW": shape[3], "total": total,
        **stride_arguments("x", x), **stride_arguments("o", out), **stride_arguments("a", argmax),
        "stride_h": steps[0], "stride_w": steps[1], "pad_top": pads[0], "pad_left": pads[1],
        "dil_h": dilations[0], "dil_w": dilations[1],
        "KH": window[0], "KW": window[1], "CHANNELS_LAST": is_channels_last(out),
        **config,
    }  # fmt: skip
    return (out, argmax), (triton.cdiv(total, config["BLOCK"]),), arguments


def max_pool2d_backward_launch(
    grad_out: torch.Tensor,
    argmax: torch.Tensor,
    input_shape: Sequence[int],
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: Padding = 0,
    ceil_mode: bool = False,
    grad_input: torch.Tensor | None = None,
    dilation: int | tuple[int, int] = 1,
    config: dict | None = None,
) -> tuple[torch.Tensor, tuple[int], dict[str, Any]]:
    """Everything `max_pool2d_backward` does but the launch: checks, allocates the gradient and returns it with the
    grid and the kernel's keyword arguments (launch options included). Works on "meta" tensors."""
    return _backward_launch("max", grad_out, argmax, input_shape, size, stride, padding, ceil_mode, True,
                            grad_input, dilation, config)  # fmt: skip


def avg_pool2d_backward_launch(
    grad_out: torch.Tensor,
    input_shape: Sequence[int],
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: Padding = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    grad_input: torch.Tensor | None = None,
    dilation: int | tuple[int, int] = 1,
    config: dict | None = None,
) -> tuple[torch.Tensor, tuple[int], dict[str, Any]]:
    """Everything `avg_pool2d_backward` does but the launch, as `max_pool2d_backward_launch`."""
    return _backward_launch("avg", grad_out, None, input_shape, size, stride, padding, ceil_mode, count_include_pad,
                            grad_input, dilation, config)  # fmt: skip


def global_avg_pool2d_backward_launch(
    grad_out: torch.Tensor,
    input_shape: Sequence[int],
    grad_input: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, tuple[int], dict[str, Any]]:
    """Everything `global_avg_pool2d_backward` does but the launch, as `max_pool2d_backward_launch`."""
    if len(input_shape) != 4:
        raise ValueError(f"global average pool backward: expected a 4-D input shape, got {tuple(input_shape)}")
    plane = (int(input_shape[2]), int(input_shape[3]))
    return avg_pool2d_backward_launch(grad_out, input_shape, plane, plane, 0, False, True, grad_input, 1, config)


def _backward_launch(
    kind: str,
    grad_out: torch.Tensor,
    argmax: torch.Tensor | None,
    input_shape: Sequence[int],
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: Padding,
    ceil_mode: bool,
    count_include_pad: bool,
    grad_input: torch.Tensor | None,
    dilation: int | tuple[int, int],
    config: dict | None,
) -> tuple[torch.Tensor, tuple[int], dict[str, Any]]:
    """The checks, the gradient's allocation, the grid and the keyword arguments of `pool2d_backward_kernel`."""
    input_shape = tuple(int(extent) for extent in input_shape)
    window, steps, pads, dilations, shape = _geometry(input_shape, size, stride, padding, dilation, ceil_mode)
    if argmax is not None:
        check_max_window(window)
        if tuple(argmax.shape) != shape or argmax.dtype != torch.int8 or argmax.device != grad_out.device:
            raise ValueError(f"max-pool backward: argmax is {argmax.dtype} {tuple(argmax.shape)} on {argmax.device}, "
                             f"expected int8 {shape} on {grad_out.device}, as max_pool2d_train saves it")  # fmt: skip
    if tuple(grad_out.shape) != shape or grad_out.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{kind}-pool backward: grad_out is {grad_out.dtype} {tuple(grad_out.shape)}, expected a "
                         f"float32/float16/bfloat16 tensor of the pooled shape {shape}")  # fmt: skip
    if grad_input is None:
        grad_input = empty_like_layout(grad_out, input_shape, grad_out.dtype)
    given = (tuple(grad_input.shape), grad_input.dtype, grad_input.device)
    if given != (input_shape, grad_out.dtype, grad_out.device):
        raise ValueError(f"{kind}-pool backward: grad_input is {given[1]} {given[0]} on {given[2]}, "
                         f"expected {grad_out.dtype} {input_shape} on {grad_out.device}")  # fmt: skip
    total = _total(input_shape)
    config = _config(total, grad_out.device, config)
    saved = grad_out if argmax is None else argmax  # never read by the average
    spans = [d * (k - 1) + 1 for k, d in zip(window, dilations, strict=True)]
    arguments = {
        "grad_out_ptr": grad_out, "argmax_ptr": saved, "grad_x_ptr": grad_input,
        "C": input_shape[1], "H": input_shape[2], "W": input_shape[3], "OH": shape[2], "OW": shape[3],
        "total": total,
        **stride_arguments("g", grad_out), **stride_arguments("a", saved), **stride_arguments("dx", grad_input),
        "stride_h": steps[0], "stride_w": steps[1],
        "pad_top": pads[0], "pad_left": pads[1], "pad_bottom": pads[2], "pad_right": pads[3],
        "dil_h": dilations[0], "dil_w": dilations[1],
        "KH": window[0], "KW": window[1],
        "COVER_H": triton.cdiv(spans[0], steps[0]), "COVER_W": triton.cdiv(spans[1], steps[1]),
        "MODE": kind, "COUNT_INCLUDE_PAD": count_include_pad, "CHANNELS_LAST": is_channels_last(grad_input),
        **config,
    }  # fmt: skip
    return grad_input, (triton.cdiv(total, config["BLOCK"]),), arguments


def _geometry(
    input_shape: tuple[int, ...],
    size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: Padding,
    dilation: int | tuple[int, int],
    ceil_mode: bool,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int], tuple[int, int], tuple[int, int, int, int]]:
    """The checked window, stride, (top, left, bottom, right) padding, dilation and pooled shape (n, c, oh, ow)."""
    if len(input_shape) != 4:
        raise ValueError(f"pooling takes 4-D maps, got shape {input_shape}")
    window, steps, dilations = pair(size, "size"), pair(stride, "stride"), pair(dilation, "dilation")
    pads = four_pads(padding)
    n, c, h, w = input_shape
    oh, ow = pool_geometry(h, w, window, steps, pads, dilations, ceil_mode)
    return window, steps, pads, dilations, (n, c, oh, ow)


def check_max_window(window: tuple[int, int]) -> None:
    """The winner's offset in a max-pool window is saved as int8: at most MAX_WINDOW_TAPS taps."""
    if window[0] * window[1] > MAX_WINDOW_TAPS:
        raise ValueError(f"the max-pool winner's offset is saved as int8: a window of {window} has more than "
                         f"{MAX_WINDOW_TAPS} taps")  # fmt: skip


def _total(shape: Sequence[int]) -> int:
    """The elements a kernel walks with a 32-bit flat index."""
    total = shape[0] * shape[1] * shape[2] * shape[3]
    if total >= 2**31:
        raise ValueError(f"pooling indexes a map of {total} elements with 32 bits: at most 2**31 - 1")
    return total


def _config(total: int, device: torch.device, config: dict | None) -> dict:
    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        config = INTERPRETER_CONFIG if device.type == "cpu" else pick_config(total)
    return {"num_warps": 4, **config}

