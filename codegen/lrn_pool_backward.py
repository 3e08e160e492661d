"""Backward of the fused LRN + max-pool (codegen/lrn.py), and the forward that saves what it needs.

The LRN is the paper's (alpha NOT divided by the window size), optionally after a ReLU, with the window of channel c
c - lo .. c + hi (lo = (n - 1) // 2, hi = n - 1 - lo) clipped to c's group of channels (`groups` > 1 normalizes
each group apart, as each tower of the two-tower AlexNet did):

    s[c] = k + alpha * sum_{j in window(c)} x[j]^2,    y[c] = x[c] * s[c]^-beta

and the max-pool keeps, per window, the first position (in row-major window order) holding the largest y, as
PyTorch's max_pool2d does, comparing the values rounded to the output's dtype, as an unfused network would.

Forward (`lrn_maxpool_train`): what `lrn.lrn_maxpool` computes, and for each pooled output (n, c, oh, ow) the
winner's offset in its window, kh * KW + kw, as int8, and the winner's LRN scale s, in fp32. Both are the size
of the pooled output, a quarter of the input for a 3x3 stride-2 pool. With the input x (which the backward
reads too) that is all: everything else is recomputed.

Backward (`lrn_maxpool_backward`), as a gather, one program instance per tile of input elements. The gradient on
the LRN output at (j, h, w) is the sum of the pooled gradients of the windows over (h, w) whose winner it is (a
pixel lies in at most ceil(KH / SH) x ceil(KW / SW) windows: 4 for 3x3 stride 2). Then Caffe's formula, with
the paper's alpha:

    dx[c] = dy[c] * s[c]^-beta - 2 * alpha * beta * x[c] * sum_{j : c in window(j)} dy[j] * x[j] * s[j]^(-beta-1)

where j runs over c - hi .. c + lo (the channels whose window holds c) within c's group; dy[j] is zero except
at winners, where the saved scale gives s[j]. With a ReLU first, x is the ReLU's output and dx is zeroed where
its input was <= 0. No atomics: each input element is written once, by one program.

Any strides work (NCHW, channels-last, views): every tensor is indexed through its own strides.
"""

# ruff: noqa: N803, N806  (Triton convention: sizes and constexprs are upper case)

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .layouts import empty_like_layout, stride_arguments
from .lrn import check_lrn_args, grouping, lrn_sums, pooled_tile, window_pixel
from .pool import check_output, pair, pool_geometry
from .pool_backward import check_max_window
from .windows import four_pads

Padding = int | tuple[int, int] | tuple[int, int, int, int]  # n, (h, w) or (top, left, bottom, right)


@triton.jit
def lrn_pool_train_kernel(
    x_ptr, out_ptr, argmax_ptr, scale_ptr,
    C, H, W, OH, OW, group_channels,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_sn, stride_sc, stride_sh, stride_sw,  # argmax and scale: allocated alike
    alpha, beta, k,
    pool_stride_h, pool_stride_w, pool_pad_h, pool_pad_w,
    SIZE: tl.constexpr,  # LRN window, in channels
    POOL_KH: tl.constexpr, POOL_KW: tl.constexpr,
    RELU_FIRST: tl.constexpr,
    GROUPING: tl.constexpr,  # "none": one group of channels; "tile" or "channel": see lrn.grouping
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """lrn.lrn_pool_kernel's tile of pooled outputs, also keeping each window's winner and its scale."""
    n, offs_c, oh, ow, c_ok, p_ok, group_begin, group_end = pooled_tile(
        C, OH, OW, group_channels, BLOCK_C, BLOCK_P, GROUPING
    )
    x_base = x_ptr + n * stride_xn

    best = tl.full([BLOCK_C, BLOCK_P], float("-inf"), tl.float32)
    best_q = tl.full([BLOCK_C, BLOCK_P], -1, tl.int32)
    best_scale = tl.full([BLOCK_C, BLOCK_P], 1.0, tl.float32)
    # A loop, not unrolled, as in lrn.py: unrolled, the window's loads would all be hoisted and spill.
    for q in range(POOL_KH * POOL_KW):
        inside, pixel = window_pixel(q, oh, ow, p_ok, H, W, stride_xh, stride_xw, pool_stride_h, pool_stride_w,
                                     pool_pad_h, pool_pad_w, POOL_KW)  # fmt: skip
        center, sum_sq = lrn_sums(x_base, offs_c, pixel, inside, group_begin, group_end, stride_xc, SIZE, RELU_FIRST)
        scale = k + alpha * sum_sq
        # The value the pool compares: the LRN output rounded to the output's dtype.
        value = (center * tl.exp2(-beta * tl.log2(scale))).to(out_ptr.dtype.element_ty).to(tl.float32)
        # PyTorch's rule: a larger value or a NaN takes over; the first position inside the input starts.
        take = inside[None, :] & ((value > best) | (value != value) | (best_q < 0))
        best = tl.where(take, value, best)
        best_q = tl.where(take, q, best_q)
        best_scale = tl.where(take, scale, best_scale)

    mask = c_ok[:, None] & p_ok[None, :]
    out_ptrs = out_ptr + n * stride_on + offs_c[:, None] * stride_oc + (oh * stride_oh + ow * stride_ow)[None, :]
    tl.store(out_ptrs, best.to(out_ptr.dtype.element_ty), mask=mask)
    saved = n * stride_sn + offs_c[:, None] * stride_sc + (oh * stride_sh + ow * stride_sw)[None, :]
    tl.store(argmax_ptr + saved, best_q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + saved, best_scale, mask=mask)


@triton.jit
def lrn_pool_backward_kernel(
    grad_out_ptr, x_ptr, argmax_ptr, scale_ptr, grad_x_ptr,
    C, H, W, OH, OW, group_channels,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_gxn, stride_gxc, stride_gxh, stride_gxw,
    stride_gn, stride_gc, stride_gh, stride_gw,  # the pooled gradient
    stride_sn, stride_sc, stride_sh, stride_sw,  # argmax and scale
    alpha, beta,
    pool_stride_h, pool_stride_w, pool_pad_h, pool_pad_w,
    SIZE: tl.constexpr,
    POOL_KH: tl.constexpr, POOL_KW: tl.constexpr,
    COVER_H: tl.constexpr, COVER_W: tl.constexpr,  # the most windows over one pixel: ceil(KH / SH), ceil(KW / SW)
    RELU_FIRST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """dx for a BLOCK_C x BLOCK_P tile of input elements (channels x pixels of one image)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    h = offs_p // W
    w = offs_p % W
    c_ok = offs_c < C
    p_ok = offs_p < H * W
    group_begin = offs_c // group_channels * group_channels
    x_pixel = x_ptr + n * stride_xn + (h * stride_xh + w * stride_xw)[None, :]
    # The last window that may hold the pixel, along each axis (both numerators are >= 0).
    last_oh = (h + pool_pad_h) // pool_stride_h
    last_ow = (w + pool_pad_w) // pool_stride_w

    HI: tl.constexpr = SIZE // 2
    cross = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    direct = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    # A loop, not unrolled: unrolled, the loads of all SIZE channels are hoisted together and the 16 x 64 tile
    # needs 149 registers on sm_90 and spills (90 as a loop).
    for j in range(SIZE):
        # Channel cj = c + j - HI, whose window holds c: c - hi .. c + lo.
        cj = offs_c + (j - HI)
        in_group = (cj >= group_begin) & (cj < group_begin + group_channels) & (cj < C)
        saved_c = n * stride_sn + cj[:, None] * stride_sc
        grad_c = n * stride_gn + cj[:, None] * stride_gc
        # The gradient on the LRN output at (cj, h, w): the windows it won. Its scale, when it won any.
        dy = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        s = tl.full([BLOCK_C, BLOCK_P], 1.0, tl.float32)
        for t in range(COVER_H * COVER_W):
            oh = last_oh - t // COVER_W
            ow = last_ow - t % COVER_W
            kh = h + pool_pad_h - oh * pool_stride_h
            kw = w + pool_pad_w - ow * pool_stride_w
            covers = p_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW) & (kh < POOL_KH) & (kw < POOL_KW)
            mask = in_group[:, None] & covers[None, :]
            window = (oh * stride_sh + ow * stride_sw)[None, :]
            winner = tl.load(argmax_ptr + saved_c + window, mask=mask, other=-1)
            won = mask & (winner.to(tl.int32) == (kh * POOL_KW + kw)[None, :])
            grad_window = grad_c + (oh * stride_gh + ow * stride_gw)[None, :]
            dy += tl.load(grad_out_ptr + grad_window, mask=won, other=0.0).to(tl.float32)
            s = tl.where(won, tl.load(scale_ptr + saved_c + window, mask=won, other=1.0), s)
        a = tl.load(x_pixel + cj[:, None] * stride_xc, mask=in_group[:, None] & p_ok[None, :], other=0.0)
        a = a.to(tl.float32)
        x = tl.maximum(a, 0.0) if RELU_FIRST else a
        s_pow = tl.exp2(-beta * tl.log2(s))  # s^-beta
        cross += dy * x * s_pow / s
        direct = tl.where(j == HI, dy * s_pow, direct)

    mask = c_ok[:, None] & p_ok[None, :]
    a = tl.load(x_pixel + offs_c[:, None] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    x = tl.maximum(a, 0.0) if RELU_FIRST else a
    grad = direct - 2.0 * alpha * beta * x * cross
    if RELU_FIRST:
        grad = tl.where(a > 0, grad, 0.0)
    grad_ptrs = grad_x_ptr + n * stride_gxn + offs_c[:, None] * stride_gxc + (h * stride_gxh + w * stride_gxw)[None, :]
    tl.store(grad_ptrs, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


# Tiles (channels x pixels), largest first; pick_config takes the first that still gives enough program
# instances. Each thread holds 4 values of the tile, as lrn.py's; the training forward keeps three tiles
# (value, winner, scale) where lrn.py keeps one. Not yet measured on a GPU.
CONFIGS = (
    {"BLOCK_C": 16, "BLOCK_P": 64, "num_warps": 8},
    {"BLOCK_C": 8, "BLOCK_P": 64, "num_warps": 4},
    {"BLOCK_C": 8, "BLOCK_P": 32, "num_warps": 2},
    {"BLOCK_C": 4, "BLOCK_P": 32, "num_warps": 1},
)
# Two waves over the 132 SMs of an H100: fewer program instances leave SMs idle.
MIN_PROGRAMS = 264
# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size: the whole
# image in one tile, up to these sizes.
INTERPRETER_MAX_TILE = {"BLOCK_C": 64, "BLOCK_P": 1024}


def pick_config(batch: int, channels: int, pixels: int, on_cpu: bool = False) -> dict:
    """The largest tile that still gives MIN_PROGRAMS program instances over `batch` images of `channels` x
    `pixels` outputs, else the smallest. A tile never holds more channels than the tensor (rounded up to a power
    of two); the pixel side grows to keep its size. `on_cpu`: one tile per image, for the interpreter."""
    if on_cpu:
        return {
            "BLOCK_C": min(INTERPRETER_MAX_TILE["BLOCK_C"], triton.next_power_of_2(channels)),
            "BLOCK_P": min(INTERPRETER_MAX_TILE["BLOCK_P"], max(16, triton.next_power_of_2(pixels))),
            "num_warps": 4,
        }
    chosen = CONFIGS[-1]
    for config in CONFIGS:
        block_c = min(config["BLOCK_C"], triton.next_power_of_2(channels))
        block_p = config["BLOCK_P"] * (config["BLOCK_C"] // block_c)
        if batch * triton.cdiv(channels, block_c) * triton.cdiv(pixels, block_p) >= MIN_PROGRAMS:
            chosen = config
            break
    block_c = min(chosen["BLOCK_C"], triton.next_power_of_2(channels))
    block_p = min(chosen["BLOCK_P"] * (chosen["BLOCK_C"] // block_c), max(16, triton.next_power_of_2(pixels)))
    return {"BLOCK_C": block_c, "BLOCK_P": block_p, "num_warps": chosen["num_warps"]}




def _geometry(
    x: torch.Tensor,
    size: int,
    alpha: float,
    k: float,
    pool_size: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
    pool_padding: Padding,
    ceil_mode: bool,
    groups: int,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The checked window, stride, (top, left, bottom, right) padding and pooled shape (n, c, oh, ow)."""
    check_lrn_args(x, size, alpha, k)
    window = pair(pool_size, "pool_size")
    stride = pair(pool_stride, "pool_stride")
    padding = four_pads(pool_padding)
    check_max_window(window)
    n, c, h, w = x.shape
    if groups < 1 or c % groups:
        raise ValueError(f"LRN groups must divide the {c} channels, got {groups}")
    oh, ow = pool_geometry(h, w, window, stride, padding, (1, 1), ceil_mode)
    return window, stride, padding, (n, c, oh, ow)


def lrn_maxpool_train(
    x: torch.Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    pool_size: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
    pool_padding: Padding = (0, 0),
    ceil_mode: bool = False,
    relu_first: bool = False,
    groups: int = 1,
    out: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """max_pool2d(lrn(x)) as `lrn.lrn_maxpool` computes it (its arguments, and `groups`), and what the backward
    needs: (out, argmax, scale), argmax the winner's offset in its window (int8), scale its LRN scale (fp32),
    both of the pooled shape and laid out as x (channels-last when x is). `config` overrides `pick_config`."""
    saved, grid, arguments = lrn_maxpool_train_launch(
        x, size, alpha, beta, k, pool_size, pool_stride, pool_padding, ceil_mode, relu_first, groups, out, config
    )
    if saved[0].numel() > 0:
        lrn_pool_train_kernel[grid](**arguments)
    return saved


def lrn_maxpool_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    argmax: torch.Tensor,
    scale: torch.Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    pool_size: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
    pool_padding: Padding = (0, 0),
    ceil_mode: bool = False,
    relu_first: bool = False,
    groups: int = 1,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """The gradient on x of `lrn_maxpool_train(x, ...)`, given `grad_out`, the gradient on its output, and the
    argmax and scale it saved; the same LRN and pooling arguments. Returned in x's dtype and layout."""
    grad_x, grid, arguments = lrn_maxpool_backward_launch(
        grad_out, x, argmax, scale, size, alpha, beta, k, pool_size, pool_stride, pool_padding, ceil_mode,
        relu_first, groups, config,
    )  # fmt: skip
    if grad_x.numel() > 0:
        lrn_pool_backward_kernel[grid](**arguments)
    return grad_x


def lrn_maxpool_train_launch(
    x: torch.Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    pool_size: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
    pool_padding: Padding = (0, 0),
    ceil_mode: bool = False,
    relu_first: bool = False,
    groups: int = 1,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[int, int, int], dict[str, Any]]:
    """Everything `lrn_maxpool_train` does but the launch: checks, allocates (out, argmax, scale) and returns them
    with the grid and the kernel's keyword arguments (launch options included). Works on "meta" tensors."""
    window, stride, padding, shape = _geometry(x, size, alpha, k, pool_size, pool_stride, pool_padding, ceil_mode,
                                               groups)  # fmt: skip
    n, c, oh, ow = shape
    if out is None:
        out = empty_like_layout(x, shape, x.dtype)
    check_output(out, x, shape)
    argmax = empty_like_layout(x, shape, torch.int8)
    scale = empty_like_layout(x, shape, torch.float32)
    if config is None:
        config = pick_config(n, c, oh * ow, on_cpu=x.device.type == "cpu")
    grid = (triton.cdiv(oh * ow, config["BLOCK_P"]), triton.cdiv(c, config["BLOCK_C"]), n)
    arguments = {
        "x_ptr": x, "out_ptr": out, "argmax_ptr": argmax, "scale_ptr": scale,
        "C": c, "H": x.shape[2], "W": x.shape[3], "OH": oh, "OW": ow, "group_channels": c // groups,
        **stride_arguments("x", x), **stride_arguments("o", out), **stride_arguments("s", argmax),
        "alpha": float(alpha), "beta": float(beta), "k": float(k),
        **_pooling(stride, padding),
        "SIZE": size, "POOL_KH": window[0], "POOL_KW": window[1], "RELU_FIRST": relu_first,
        "GROUPING": grouping(c, groups, config["BLOCK_C"]), "num_warps": 4, **config,
    }  # fmt: skip
    return (out, argmax, scale), grid, arguments


def lrn_maxpool_backward_launch(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    argmax: torch.Tensor,
    scale: torch.Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    pool_size: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
    pool_padding: Padding = (0, 0),
    ceil_mode: bool = False,
    relu_first: bool = False,
    groups: int = 1,
    config: dict | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int], dict[str, Any]]:
    """Everything `lrn_maxpool_backward` does but the launch: checks, allocates the gradient and returns it with
    the grid and the kernel's keyword arguments (launch options included). Works on "meta" tensors."""
    window, stride, padding, shape = _geometry(x, size, alpha, k, pool_size, pool_stride, pool_padding, ceil_mode,
                                               groups)  # fmt: skip
    for name, tensor, dtype in (("grad_out", grad_out, x.dtype), ("argmax", argmax, torch.int8),
                                ("scale", scale, torch.float32)):  # fmt: skip
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device != x.device:
            raise ValueError(f"LRN + max-pool backward: {name} is {tensor.dtype} {tuple(tensor.shape)} on "
                             f"{tensor.device}, expected {dtype} {shape} on {x.device}")  # fmt: skip
    if argmax.stride() != scale.stride():
        raise ValueError("LRN + max-pool backward: argmax and scale must be laid out alike, as the forward made them")
    n, c, oh, ow = shape
    h, w = x.shape[2], x.shape[3]
    grad_x = empty_like_layout(x, tuple(x.shape), x.dtype)
    if config is None:
        config = pick_config(n, c, h * w, on_cpu=x.device.type == "cpu")
    grid = (triton.cdiv(h * w, config["BLOCK_P"]), triton.cdiv(c, config["BLOCK_C"]), n)
    arguments = {
        "grad_out_ptr": grad_out, "x_ptr": x, "argmax_ptr": argmax, "scale_ptr": scale, "grad_x_ptr": grad_x,
        "C": c, "H": h, "W": w, "OH": oh, "OW": ow, "group_channels": c // groups,
        **stride_arguments("x", x), **stride_arguments("gx", grad_x), **stride_arguments("g", grad_out),
        **stride_arguments("s", argmax),
        "alpha": float(alpha), "beta": float(beta),
        **_pooling(stride, padding),
        "SIZE": size, "POOL_KH": window[0], "POOL_KW": window[1],
        "COVER_H": triton.cdiv(window[0], stride[0]), "COVER_W": triton.cdiv(window[1], stride[1]),
        "RELU_FIRST": relu_first,
        "num_warps": 4, **config,
    }  # fmt: skip
    return grad_x, grid, arguments




def _pooling(stride: tuple[int, int], padding: tuple[int, int, int, int]) -> dict[str, int]:
    """The pool's stride and its top and left padding (where the first window starts), as the kernels take them."""
    return {"pool_stride_h": stride[0], "pool_stride_w": stride[1], "pool_pad_h": padding[0], "pool_pad_w": padding[1]}
