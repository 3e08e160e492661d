"""Local response normalization across channels, alone or fused with the max-pool that follows it.

The formula is the AlexNet paper's, with the sum of squares NOT divided by the window size:

    b[c] = a[c] / (k + alpha * sum_{j = c - lo .. c + hi} a[j]^2) ^ beta,   lo = (n - 1) // 2, hi = n - 1 - lo,

with the window clipped at channel 0 and C - 1 (the ONNX window; for an even n PyTorch's window sits one channel
lower). PyTorch's and Caffe's alpha is this alpha times n. In a two-tower net each tower's LRN sees only its own
channels: `groups` splits the channels into groups whose windows stop at their edges (AlexNet's towers on one
device), or pass a tower's channel slice as `x`.

The power is computed as a * exp2(-beta * log2(d)) with d = k + alpha * sum >= k. With k > 0 that is always finite.
With k = 0 and a window of zeros, d = 0, log2(d) = -inf and the result is 0 * inf = NaN, as PyTorch's 0 / 0.

Fused LRN + max-pool: a program instance owns a BLOCK_C x BLOCK_P tile of pooled outputs (channels x output
pixels of one image). For each of the POOL_KH x POOL_KW window positions it loads the `size` neighbouring channels
at that input pixel, forms the LRN value in registers and folds it into a running max, so the LRN output never goes
to memory. LRN values under overlapping windows are recomputed: a 3x3 stride-2 pool computes each input pixel's
LRN 9/4 = 2.25 times on average, and each of those reads `size` inputs (mostly cache hits). With POOL off the same
kernel is plain LRN (a 1x1 window of stride 1).
"""

# ruff: noqa: N803, N806  (Triton convention: sizes and constexprs are upper case)

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pool import SUPPORTED_DTYPES, check_output, pair, pool_geometry
from .windows import four_pads


@triton.jit
def group_bounds(offs_c, first_c, C, group_channels, GROUPING: tl.constexpr):
    """The channels [begin, end) of each channel's group, where its LRN windows stop: 0 and C for one group, one
    pair for the tile when it lies in one group, a pair per channel otherwise (clipped at C for the padded ones)."""
    if GROUPING == "none":
        return 0, C
    elif GROUPING == "tile":
        begin = first_c // group_channels * group_channels
        return begin, begin + group_channels
    else:
        begin = offs_c // group_channels * group_channels
        return begin, tl.minimum(begin + group_channels, C)


def grouping(channels: int, groups: int, block_c: int) -> str:
    """How a kernel bounds its LRN windows (`group_bounds`): "none" (one group), "tile" (every tile of block_c
    channels lies in one group: bounds per program) or "channel" (bounds per channel; more registers)."""
    if groups == 1:
        return "none"
    return "tile" if (channels // groups) % block_c == 0 else "channel"


@triton.jit
def pooled_tile(C, OH, OW, group_channels, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, GROUPING: tl.constexpr):
    """This program's tile of pooled outputs: its image, channels and output pixels (row, column), which of them
    exist, and each channel's group bounds (`group_bounds`)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    group_begin, group_end = group_bounds(offs_c, pid_c * BLOCK_C, C, group_channels, GROUPING)
    return n, offs_c, offs_p // OW, offs_p % OW, offs_c < C, offs_p < OH * OW, group_begin, group_end


@triton.jit
def window_pixel(
    q, oh, ow, p_ok, H, W, stride_xh, stride_xw, pool_stride_h, pool_stride_w, pool_pad_h, pool_pad_w,
    POOL_KW: tl.constexpr,
):  # fmt: skip
    """Where window offset q (row-major) of each output pixel's pooling window falls: whether inside the input, and
    its offset there."""
    ih = oh * pool_stride_h - pool_pad_h + q // POOL_KW
    iw = ow * pool_stride_w - pool_pad_w + q % POOL_KW
    inside = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return inside, ih * stride_xh + iw * stride_xw


@triton.jit
def lrn_sums(
    x_base, offs_c, pixel, inside, group_begin, group_end, stride_xc,
    SIZE: tl.constexpr, RELU_FIRST: tl.constexpr,
):  # fmt: skip
    """The input at channels offs_c (after the ReLU, if first) and the sums of squares over their LRN windows at
    one input pixel per column, in fp32; a window stops at its group's channels [group_begin, group_end)."""
    LO: tl.constexpr = (SIZE - 1) // 2
    sum_sq = tl.zeros([offs_c.shape[0], pixel.shape[0]], tl.float32)
    for j in tl.static_range(SIZE):
        cj = offs_c + (j - LO)
        in_group = (cj >= group_begin) & (cj < group_end)
        a = tl.load(x_base + cj[:, None] * stride_xc + pixel[None, :], mask=in_group[:, None] & inside[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        if RELU_FIRST:
            a = tl.maximum(a, 0.0)
        if j == LO:
            center = a
        sum_sq += a * a
    return center, sum_sq


@triton.jit
def lrn_pool_kernel(
    x_ptr, out_ptr,
    C, H, W, OH, OW, group_channels,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    alpha, beta, k,
    pool_stride_h, pool_stride_w, pool_pad_h, pool_pad_w,
    SIZE: tl.constexpr,  # LRN window, in channels
    POOL: tl.constexpr,  # False: plain LRN, one output per input pixel
    POOL_KH: tl.constexpr, POOL_KW: tl.constexpr,
    RELU_FIRST: tl.constexpr,
    GROUPING: tl.constexpr,  # "none": one group of channels; "tile" or "channel": see `grouping`
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """LRN across channels (after ReLU with RELU_FIRST), max-pooled when POOL, for a BLOCK_C x BLOCK_P tile of
    outputs (channels x output pixels of one image). Grid: (pixel tiles, channel tiles, batch)."""
    n, offs_c, oh, ow, c_ok, p_ok, group_begin, group_end = pooled_tile(
        C, OH, OW, group_channels, BLOCK_C, BLOCK_P, GROUPING
    )
    x_base = x_ptr + n * stride_xn

    result = tl.full([BLOCK_C, BLOCK_P], float("-inf"), tl.float32)
    # A loop, not unrolled: unrolling hoists all POOL_KH * POOL_KW * SIZE loads and spills on sm_90.
    for q in range(POOL_KH * POOL_KW):
        inside, pixel = window_pixel(q, oh, ow, p_ok, H, W, stride_xh, stride_xw, pool_stride_h, pool_stride_w,
                                     pool_pad_h, pool_pad_w, POOL_KW)  # fmt: skip
        center, sum_sq = lrn_sums(x_base, offs_c, pixel, inside, group_begin, group_end, stride_xc, SIZE, RELU_FIRST)
        lrn = center * tl.exp2(-beta * tl.log2(k + alpha * sum_sq))
        if POOL:
            # Window positions outside the input (padding, ceil-mode overhang) never win.
            lrn = tl.where(inside[None, :], lrn, float("-inf"))
            result = tl.maximum(result, lrn, propagate_nan=tl.PropagateNan.ALL)
        else:
            result = lrn

    out_ptrs = out_ptr + n * stride_on + offs_c[:, None] * stride_oc + (oh * stride_oh + ow * stride_ow)[None, :]
    tl.store(out_ptrs, result, mask=c_ok[:, None] & p_ok[None, :])


# Tiles of pooled outputs (channels x pixels), largest first; pick_config takes the first that still gives
# enough program instances. Every config gives each thread 4 values of the tile: with 8 the fused kernel
# needs about 120 registers on sm_90 (each of the SIZE loads carries a 64-bit address per value).
CONFIGS = (
    {"BLOCK_C": 16, "BLOCK_P": 64, "num_warps": 8},
    {"BLOCK_C": 8, "BLOCK_P": 64, "num_warps": 4},
    {"BLOCK_C": 8, "BLOCK_P": 32, "num_warps": 2},
    {"BLOCK_C": 4, "BLOCK_P": 32, "num_warps": 1},
)
# Two waves over the 132 SMs of an H100: fewer program instances leave SMs idle.
MIN_PROGRAMS = 264


# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {"BLOCK_C": 64, "BLOCK_P": 1024, "num_warps": 4}


# The tiles (channels x pooled pixels) `netdsl tune` times on the device beside pick_config's (the grid of
# bench/step_sweep.py, which found the channels-last choices on an H200 in bf16).
TUNING_TILES = (
    {"BLOCK_C": 16, "BLOCK_P": 64, "num_warps": 8},
    {"BLOCK_C": 8, "BLOCK_P": 64, "num_warps": 4},
    {"BLOCK_C": 64, "BLOCK_P": 16, "num_warps": 4},
    {"BLOCK_C": 64, "BLOCK_P": 32, "num_warps": 8},
    {"BLOCK_C": 32, "BLOCK_P": 32, "num_warps": 4},
    {"BLOCK_C": 128, "BLOCK_P": 8, "num_warps": 4},
    {"BLOCK_C": 128, "BLOCK_P": 16, "num_warps": 8},
    {"BLOCK_C": 64, "BLOCK_P": 64, "num_warps": 8},
    {"BLOCK_C": 32, "BLOCK_P": 16, "num_warps": 2},
)


def tuning_candidates(channels: int) -> list[dict]:
    """The tiles `netdsl tune` times for an LRN (+ max-pool) over `channels` channels: none holds more channels
    than the map has (rounded up to a power of two), duplicates dropped."""
    most = triton.next_power_of_2(channels)
    tiles = [{**tile, "BLOCK_C": min(tile["BLOCK_C"], most)} for tile in TUNING_TILES]
    return [dict(tile) for tile in {tuple(tile.items()): tile for tile in tiles}.values()]


def pick_config(batch: int, channels: int, pixels: int, channels_last: bool = False) -> dict:
    """Largest tile that still gives MIN_PROGRAMS program instances, else the smallest tile. A tile never holds
    more channels than the tensor (rounded up to a power of two); the pixel side grows to keep its size.

    Channels-last maps (adjacent channels adjacent in memory) take fixed tiles instead, measured on an
    H200 in bf16 for AlexNet's two LRN + max-pool steps at batch 128 and 1 (bench/step_sweep.py;
    bench/results/step_sweep.txt): every channel of a 128-channel map in one tile (1.6 times faster than
    the tile above for conv2's), 16 channels by 64 pixels otherwise (the best for conv1's 48 channels,
    and at batch 1 faster than the small tiles the rule above picks)."""
    if channels_last:
        if channels % 128 == 0:
            return {"BLOCK_C": 128, "BLOCK_P": 16, "num_warps": 8}
        block_c = min(16, triton.next_power_of_2(channels))
        return {"BLOCK_C": block_c, "BLOCK_P": 64 * 16 // block_c, "num_warps": 8}
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


def check_lrn_args(x: torch.Tensor, size: int, alpha: float, k: float, groups: int = 1) -> None:
    if x.dim() != 4 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"expected a 4-D float32/float16/bfloat16 NCHW tensor, got {x.dtype} {tuple(x.shape)}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if size < 1:
        raise ValueError(f"LRN size must be at least 1, got {size}")
    if k < 0 or alpha < 0:
        # Keeps the base of the power non-negative; k = 0 is allowed (see the module docstring).
        raise ValueError(f"LRN needs k >= 0 and alpha >= 0, got k={k}, alpha={alpha}")


def launch(
    x: torch.Tensor,
    out: torch.Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    pool: bool,
    window: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, ...],  # top and left first: where the first window starts
    relu_first: bool,
    config: dict | None,
    kernel=None,
    groups: int = 1,
) -> torch.Tensor:
    n, c, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out
    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        config = (
            INTERPRETER_CONFIG
            if x.device.type == "cpu"
            else pick_config(n, c, oh * ow, channels_last=x.stride(1) == 1 and c > 1)
        )
    config = {"num_warps": 4, **config}
    grid = (triton.cdiv(oh * ow, config["BLOCK_P"]), triton.cdiv(c, config["BLOCK_C"]), n)
    (kernel or lrn_pool_kernel)[grid](
        x, out,
        c, h, w, oh, ow, c // groups,
        *x.stride(),
        *out.stride(),
        float(alpha), float(beta), float(k),
        stride[0], stride[1], padding[0], padding[1],
        SIZE=size,
        POOL=pool,
        POOL_KH=window[0], POOL_KW=window[1],
        RELU_FIRST=relu_first,
        GROUPING=grouping(c, groups, config["BLOCK_C"]),
        BLOCK_C=config["BLOCK_C"], BLOCK_P=config["BLOCK_P"],
        num_warps=config["num_warps"],
    )  # fmt: skip
    return out


def lrn(
    x: torch.Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    relu_first: bool = False,
    out: torch.Tensor | None = None,
    *,
    groups: int = 1,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """The paper's LRN across the channels of an NCHW tensor (alpha not divided by size), optionally after a ReLU;
    with `groups`, each group of channels normalized apart (its windows stop at its edges), in the one launch.

    `config` ({"BLOCK_C", "BLOCK_P", "num_warps"}, powers of two) overrides `pick_config`."""
    check_lrn_args(x, size, alpha, k, groups)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    check_output(out, x, tuple(x.shape))
    return launch(x, out, size, alpha, beta, k, False, (1, 1), (1, 1), (0, 0), relu_first, config, kernel, groups)


def lrn_maxpool(
    x: torch.Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    pool_size: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
    pool_padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    ceil_mode: bool = False,
    relu_first: bool = False,
    out: torch.Tensor | None = None,
    *,
    groups: int = 1,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """max_pool2d(lrn(x)) in one kernel, without writing the LRN output; pooling follows `pool.pool2d`'s rules
    (`pool_padding` n, (h, w) or (top, left, bottom, right); no dilation); `groups` as for `lrn`."""
    check_lrn_args(x, size, alpha, k, groups)
    window = pair(pool_size, "pool_size")
    stride = pair(pool_stride, "pool_stride")
    padding = four_pads(pool_padding)
    n, c, h, w = x.shape
    oh, ow = pool_geometry(h, w, window, stride, padding, (1, 1), ceil_mode)
    if out is None:
        out = torch.empty((n, c, oh, ow), device=x.device, dtype=x.dtype)
    check_output(out, x, (n, c, oh, ow))
    return launch(x, out, size, alpha, beta, k, True, window, stride, padding, relu_first, config, kernel, groups)
