"""Backward of conv + bias + activation: the input gradient (dgrad), the weight and bias gradients (wgrad).

The forward is y = act(conv2d(x, w) + b) with act ReLU, leaky ReLU or none. Given dy (the gradient at y),
the saved output y, x and w, every kernel that reads dy first turns it into dz, the gradient at the conv's
output, on the loaded tile: dz = dy where y > 0, else 0 (ReLU) or dy * slope (leaky ReLU; y > 0 exactly where
the conv's output is, for a positive slope). There is no separate masking pass.

dgrad, an implicit GEMM over the input pixels. dx[n, c, i, j] sums dz[n, o, oh, ow] * w[o, c, kh, kw] over
the taps with oh * stride - pad + kh * dilation = i (and likewise along the width). With a stride above 1 a
given input row is only reached by some of the taps: split the input rows into stride_h phases (rows
i = phase, phase + stride_h, ...) and each phase meets a fixed set of taps, every (stride / gcd(stride,
dilation))-th from the first that reaches it (`phase_taps`). So each of the stride_h * stride_w phases is a
dense implicit GEMM over its own pixels, with no inserted zeros and no test of divisibility per element:
[input channels of the group] x [phase pixels], reduced over (tap of the phase, output channel of the group),
tap by tap with BLOCK_K output channels at a time. A phase that no tap reaches (1x1 filters at stride 2,
dilation 2 at stride 2) runs no reduction and writes its zeros. All phases run in one launch (grid axis 2).

wgrad, a GEMM per group: dw[o, (c, kh, kw)] = dz[o, pixels] @ im2col(x)[pixels, (c, kh, kw)], the reduction
over every output pixel of the batch (N * OH * OW, long: 93,312 for AlexNet's conv2 at batch 128) while the
output is small (128 x 1200). The reduction is cut into `splits` contiguous ranges of pixels (grid axis 2),
each program writing its fp32 partial product to a buffer of its own; a second, small kernel sums the
partials in split order. The result depends only on the shapes and the configuration, never on timing:
no atomics. The bias gradient (db[o] = sum of dz over the pixels) comes out of the same product: with a bias
the im2col matrix gets one more column, all ones, whose column of dw is db; its partials sit after the
weight's in each split's row and the same second kernel reduces them.

The im2col matrix is never built: like the forward kernel (conv.py) each step gathers its tile straight from
the input, decoding k into (c, kh, kw) once per program. Offsets are 32-bit (the launchers refuse tensors of
2**31 elements or more), which keeps the gathers' registers down. Only NCHW is exercised by the tests (any strides
are passed to the kernels, so views should work, untested). Inputs are fp32 (products exact, "ieee", or on
tf32 tensor cores, "tf32"), fp16 or bf16, accumulated in fp32. The gradients have the inputs' dtype.

This file is self-contained: it shares no code with conv.py, whose geometry helpers it mirrors.
"""

# ruff: noqa: N803, N806  (Triton convention: sizes and constexprs are upper case)

from collections.abc import Sequence
from dataclasses import dataclass
from math import gcd, prod
from typing import Any

import torch
import triton
import triton.language as tl

from netdsl.codegen.layouts import stride_arguments
from netdsl.codegen.limits import SM_COUNT
from netdsl.codegen.tile_rules import SQUARE_TILES, exact_fp32
from netdsl.codegen.windows import four_pads, output_length


@triton.jit
def conv2d_dgrad_kernel(
    dy_ptr, y_ptr, w_ptr, dx_ptr,
    BATCH, H, W, OH, OW,
    C_IN_G, C_OUT_G,
    PHASES_W,  # phases along the width: min(STRIDE_W, W)
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    pad_h, pad_w,
    slope,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    TAP_STEP_H: tl.constexpr, TAP_STEP_W: tl.constexpr,  # stride / gcd(stride, dilation), per axis
    ACTIVATION: tl.constexpr,  # "none", "relu" or "leaky_relu": how dy becomes dz
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dx for one tile of BLOCK_N input channels x BLOCK_M input pixels of one group and one stride phase."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    phase = tl.program_id(2)
    phase_h = phase // PHASES_W
    phase_w = phase % PHASES_W
    # This phase's input pixels: rows phase_h, phase_h + STRIDE_H, ... and columns likewise (the launcher
    # starts no phase past the input, so there is at least one of each).
    rows = tl.cdiv(H - phase_h, STRIDE_H)
    cols = tl.cdiv(W - phase_w, STRIDE_W)
    num_pid_n = tl.cdiv(C_IN_G, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < BATCH * rows * cols
    col = offs_m % cols
    row = (offs_m // cols) % rows
    batch = offs_m // (rows * cols)

    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < C_IN_G
    in_channel = group * C_IN_G + offs_c

    # Input row phase_h + STRIDE_H * row meets output row row + offset_h - i * OUT_STEP_H through the
    # phase's i-th tap, kh = first_h + i * TAP_STEP_H.
    first_h, taps_h, offset_h = phase_taps(phase_h, pad_h, KH, STRIDE_H, DIL_H, TAP_STEP_H)
    first_w, taps_w, offset_w = phase_taps(phase_w, pad_w, KW, STRIDE_W, DIL_W, TAP_STEP_W)
    OUT_STEP_H: tl.constexpr = TAP_STEP_H * DIL_H // STRIDE_H
    OUT_STEP_W: tl.constexpr = TAP_STEP_W * DIL_W // STRIDE_W
    oh0 = row + offset_h  # the output each pixel meets through the first tap
    ow0 = col + offset_w
    dy_pixels = batch * stride_dyn + oh0 * stride_dyh + ow0 * stride_dyw
    y_pixels = batch * stride_yn + oh0 * stride_yh + ow0 * stride_yw
    w_channels = w_ptr + offs_c * stride_wc + (first_h * stride_wh + first_w * stride_ww)

    # One flat loop over (tap of the phase, block of output channels), so the pipeliner sees a single loop.
    # A tile past the end of its phase (phases differ by a row or a column) skips it.
    chunks = tl.cdiv(C_OUT_G, BLOCK_K)
    steps = tl.where(pid_m * BLOCK_M < BATCH * rows * cols, taps_h * taps_w * chunks, 0)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(steps):
        tap = step // chunks
        tap_h = tap // taps_w
        tap_w = tap % taps_w
        offs_o = (step % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_o = offs_o < C_OUT_G
        out_channel = group * C_OUT_G + offs_o

        oh = oh0 - tap_h * OUT_STEP_H
        ow = ow0 - tap_w * OUT_STEP_W
        inside = mask_m & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        dy_shift = tap_h * OUT_STEP_H * stride_dyh + tap_w * OUT_STEP_W * stride_dyw
        y_shift = tap_h * OUT_STEP_H * stride_yh + tap_w * OUT_STEP_W * stride_yw
        dz = output_gradient(
            dy_ptr + (out_channel * stride_dyc)[:, None] + (dy_pixels - dy_shift)[None, :],
            y_ptr + (out_channel * stride_yc)[:, None] + (y_pixels - y_shift)[None, :],
            mask_o[:, None] & inside[None, :],
            slope,
            ACTIVATION,
        )
        tap_offset = tap_h * TAP_STEP_H * stride_wh + tap_w * TAP_STEP_W * stride_ww
        w = tl.load(
            w_channels[:, None] + tap_offset + (out_channel * stride_wo)[None, :],
            mask=mask_c[:, None] & mask_o[None, :],
            other=0.0,
        )
        acc = tl.dot(w, dz.to(w.dtype), acc=acc, input_precision=INPUT_PRECISION)

    ih = phase_h + row * STRIDE_H
    iw = phase_w + col * STRIDE_W
    dx_pixels = dx_ptr + batch * stride_dxn + ih * stride_dxh + iw * stride_dxw
    tl.store(
        dx_pixels[None, :] + (in_channel * stride_dxc)[:, None],
        acc.to(dx_ptr.dtype.element_ty),
        mask=mask_c[:, None] & mask_m[None, :],
    )


@triton.jit
def phase_taps(phase, pad, TAPS: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr, TAP_STEP: tl.constexpr):
    """Along one axis, the filter taps that reach the input positions phase, phase + STRIDE, ...

    Tap t carries output o to input o * STRIDE - pad + t * DILATION, so it reaches this phase when
    t * DILATION = phase + pad (mod STRIDE): every TAP_STEP-th tap (TAP_STEP = STRIDE / gcd(STRIDE, DILATION))
    from the first such t, which lies below TAP_STEP if any does. Returns that first tap (TAPS when none
    does), how many taps reach the phase (0 when none does, or when the first is past the filter) and
    `offset`: input phase + j * STRIDE meets output j + offset through the first tap. The division is exact,
    so Triton's integer division (which truncates) gives the floor even when it is negative."""
    residue = (phase + pad) % STRIDE
    first = TAPS  # none yet; t * DILATION mod STRIDE differs for each t below TAP_STEP
    for tap in tl.static_range(TAP_STEP):
        first = tl.where((tap * DILATION) % STRIDE == residue, tap, first)
    count = tl.cdiv(TAPS - first, TAP_STEP)  # 0 when first >= TAPS
    offset = (phase + pad - first * DILATION) // STRIDE
    return first, count, offset


@triton.jit
def output_gradient(dy_ptrs, y_ptrs, mask, slope, ACTIVATION: tl.constexpr):
    """dz, the gradient at the conv's output, for a tile of dy (the gradient at the activation's output) and of
    the saved output y at the same positions: dy where y > 0; elsewhere 0 (ReLU) or dy * slope (leaky ReLU).
    Masked elements are 0. Returned in dy's dtype, or fp32 for leaky ReLU."""
    dy = tl.load(dy_ptrs, mask=mask, other=0.0)
    if ACTIVATION != "none":
        # y is compared in fp32: Triton's interpreter compares bf16 as its raw bits, negatives above zero.
        positive = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) > 0
        if ACTIVATION == "relu":
            dy = tl.where(positive, dy, 0.0)
        else:
            dy = tl.where(positive, dy.to(tl.float32), dy.to(tl.float32) * slope)
    return dy


@triton.jit
def conv2d_wgrad_kernel(
    dy_ptr, y_ptr, x_ptr, partial_ptr,
    BATCH, H, W, OH, OW,
    C_IN_G, C_OUT_G, C_OUT,
    SPLIT_PIXELS, PARTIAL_ROW,  # output pixels per split (whole BLOCK_K steps); partials per split
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    pad_h, pad_w,
    slope,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # add the column of ones whose product is the bias gradient
    ACTIVATION: tl.constexpr,  # "none", "relu" or "leaky_relu": how dy becomes dz
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One split's fp32 partial of dw for a tile of BLOCK_M output channels x BLOCK_N of (c, kh, kw) of one
    group: partial[split, o * K + k], the weight's [C_OUT, K = C_IN_G * KH * KW] layout, and with HAS_BIAS
    partial[split, C_OUT * K + o], the bias gradient's."""
    KHW: tl.constexpr = KH * KW
    pid = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    K = C_IN_G * KHW
    # With a bias, column K (one past the weight's) of the im2col matrix is all ones, so its column of the
    # product sums dz over the pixels: the tensor cores compute the bias gradient with the weight's.
    columns = K
    if HAS_BIAS:
        columns += 1
    # Neighbouring programs share a tile of dz, the operand every column tile reads in full.
    num_pid_n = tl.cdiv(columns, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_o = offs_o < C_OUT_G
    out_channel = group * C_OUT_G + offs_o
    dy_channels = out_channel * stride_dyc
    y_channels = out_channel * stride_yc
    # The columns, decoded once: k = (c, kh, kw), and how far tap (kh, kw) reaches from a window's corner.
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = k < K
    ones = k == K
    reach_h = (k % KHW) // KW * DIL_H
    reach_w = k % KW * DIL_W
    x_taps = (group * C_IN_G + k // KHW) * stride_xc + reach_h * stride_xh + reach_w * stride_xw

    pixels = BATCH * OH * OW
    p_begin = split * SPLIT_PIXELS
    p_end = tl.minimum(p_begin + SPLIT_PIXELS, pixels)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p_start in range(p_begin, p_end, BLOCK_K):
        p = p_start + tl.arange(0, BLOCK_K)
        mask_p = p < p_end
        ow = p % OW
        oh = (p // OW) % OH
        batch = p // (OH * OW)
        dy_pixels = batch * stride_dyn + oh * stride_dyh + ow * stride_dyw
        y_pixels = batch * stride_yn + oh * stride_yh + ow * stride_yw
        dz = output_gradient(
            dy_ptr + dy_channels[:, None] + dy_pixels[None, :],
            y_ptr + y_channels[:, None] + y_pixels[None, :],
            mask_o[:, None] & mask_p[None, :],
            slope,
            ACTIVATION,
        )

        ih0 = oh * STRIDE_H - pad_h  # each window's top-left corner
        iw0 = ow * STRIDE_W - pad_w
        ih = ih0[:, None] + reach_h[None, :]
        iw = iw0[:, None] + reach_w[None, :]
        inside = mask_p[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_corners = x_ptr + batch * stride_xn + ih0 * stride_xh + iw0 * stride_xw
        x = tl.load(x_corners[:, None] + x_taps[None, :], mask=inside, other=0.0)
        if HAS_BIAS:
            x = tl.where(ones[None, :], 1.0, x).to(x.dtype)  # dz is 0 past the split's pixels
        acc = tl.dot(dz.to(x.dtype), x, acc=acc, input_precision=INPUT_PRECISION)

    # Column k < K of the tile goes to the weight's partial, column K to the bias's.
    slot = tl.where(mask_k[None, :], (out_channel * K)[:, None] + k[None, :], (C_OUT * K + out_channel)[:, None])
    partial = partial_ptr + split.to(tl.int64) * PARTIAL_ROW
    tl.store(partial + slot, acc, mask=mask_o[:, None] & (k < columns)[None, :])


@triton.jit
def conv2d_wgrad_reduce_kernel(
    partial_ptr, dw_ptr, db_ptr,
    WEIGHT_NUMEL, NUMEL, SPLITS,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Sums the SPLITS rows of NUMEL fp32 partials, in split order, into dw (the first WEIGHT_NUMEL, a
    contiguous weight) and db (the rest, with HAS_BIAS), each rounded once to its own dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    partials = partial_ptr + offs
    for _ in range(SPLITS):
        total += tl.load(partials, mask=mask, other=0.0)
        partials += NUMEL  # the next split's row: a 64-bit pointer, however many rows
    tl.store(dw_ptr + offs, total.to(dw_ptr.dtype.element_ty), mask=offs < WEIGHT_NUMEL)
    if HAS_BIAS:
        tl.store(db_ptr + (offs - WEIGHT_NUMEL), total.to(db_ptr.dtype.element_ty), mask=mask & (offs >= WEIGHT_NUMEL))


# Tile shapes. dgrad: BLOCK_N input channels (the MMA's M side) x BLOCK_M input pixels of a phase, reducing
# BLOCK_K output channels per step. wgrad: BLOCK_M output channels x BLOCK_N of (c, kh, kw), reducing
# BLOCK_K pixels per step. Not yet timed on a GPU: of the few tried, the largest that compile for sm_90
# (Triton 3.9) without spills at AlexNet's conv1, conv2 and conv4, as tests/test_sm90_conv_backward.py checks.
# Both kernels gather an operand element by element, which costs registers: with 4 warps every wide tile
# spilled, so 8 warps throughout; wgrad's wide tile takes 16 pixels a step (32 spilled), and fp32 dgrad keeps
# its channel tile at 64 and its K step at 16. Triton 3.6 needs more registers still: there bf16's 128-channel tile
# spills (so before 3.9 wide layers take the 64-channel one, tile_rules.SQUARE_TILES) and so do the fp32 tiles
# with exact "ieee" products (on the FMA units, operands in registers), which take half as many pixels.
DGRAD_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # more than 64 channels
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # 17 to 64 (conv2's 48)
    {"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # up to 16 (conv1's 3)
]
FP32_DGRAD_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},  # more than 16 channels
    {"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # up to 16
]
EXACT_FP32_DGRAD_CONFIGS = [{**config, "BLOCK_M": 64} for config in FP32_DGRAD_CONFIGS]
WGRAD_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},  # more than 64 channels
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # up to 64 (conv1's 48)
]
# fp32 wgrad's exact products run on the FMA units, whose operands live in registers. The bf16 tiles spilled
# at LeNet-5's first conv (one input channel, 32 x 32 images) and at SimpleNet's 64 -> 128 conv; 64 columns
# and 16 pixels a step built without spills at every conv of LeNet-5, SimpleNet and AlexNet (at most 198
# registers). A tile is never wider than the columns (c, kh, kw, and the bias's) it has: 9 for SimpleNet's
# first conv.
FP32_WGRAD_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},  # more than 64 channels
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},  # up to 64
]
REDUCE_CONFIG = {"BLOCK": 1024, "num_warps": 4, "num_stages": 1}
# A split reduces at least this many BLOCK_K steps, so that its partials (written once) stay small next to
# the operands it reads (a guess until measured).
MIN_STEPS_PER_SPLIT = 8

# Under Triton's interpreter (CPU tensors) programs run one at a time and each step costs about its tile's
# elements: few programs, with channel blocks no wider than the channels (`interpreter_config`).
REDUCE_INTERPRETER_CONFIG = {"BLOCK": 1 << 16, "num_warps": 4, "num_stages": 1}

ACTIVATIONS = ("none", "relu", "leaky_relu")
INPUT_PRECISIONS = ("ieee", "tf32")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_dgrad_config(c_in_group: int, dtype: torch.dtype = torch.bfloat16, input_precision: str = "ieee") -> dict:
    """Block sizes for dgrad by the group's input channels, the MMA's M side: the narrowest tile that holds them,
    down to the 16 that tl.dot needs."""
    if dtype == torch.float32:
        configs = EXACT_FP32_DGRAD_CONFIGS if exact_fp32(dtype, input_precision) else FP32_DGRAD_CONFIGS
        return configs[0] if c_in_group > 16 else configs[1]
    if c_in_group > 64:
        return DGRAD_CONFIGS[0] if SQUARE_TILES else DGRAD_CONFIGS[1]
    return DGRAD_CONFIGS[1] if c_in_group > 16 else DGRAD_CONFIGS[2]


def pick_wgrad_config(
    c_out_group: int, dtype: torch.dtype = torch.bfloat16, input_precision: str = "ieee", columns: int = 1 << 20
) -> dict:
    """Block sizes for wgrad by the group's output channels (the MMA's M side), the columns of its im2col
    matrix (the N side: c x kh x kw, and one for the bias) and for exact fp32 products."""
    exact = exact_fp32(dtype, input_precision)
    configs = FP32_WGRAD_CONFIGS if exact else WGRAD_CONFIGS
    config = configs[0] if c_out_group > 64 else configs[1]
    config = {**config, "BLOCK_N": min(config["BLOCK_N"], max(16, triton.next_power_of_2(columns)))}
    if exact and config["BLOCK_N"] <= 32:
        # 8 warps over a 64 x 32 tile spilled 4 bytes at VGG-16's first conv (27 columns and the bias); 4 warps
        # build it in 126 registers, and LeNet-5's and SimpleNet's first convs in 128 and 80, without spills
        config["num_warps"] = 4
    return config


def interpreter_config(**blocks: tuple[int, int]) -> dict:
    """Block sizes for the interpreter: each block (name=(extent, most)) covers its extent up to `most`, and is
    at least the 16 that tl.dot needs."""
    sizes = {name: max(16, min(triton.next_power_of_2(extent), most)) for name, (extent, most) in blocks.items()}
    return {**sizes, "num_warps": 4, "num_stages": 1}


def pick_splits(pixels: int, tiles: int, block_k: int) -> int:
    """How many pieces wgrad's reduction over `pixels` is cut into: enough that `tiles` output tiles times the
    splits fill every streaming multiprocessor twice, each piece at least MIN_STEPS_PER_SPLIT steps long.
    A function of the sizes alone, so the summation order (and every bit of the result) is too."""
    wanted = triton.cdiv(2 * SM_COUNT, tiles)
    return max(1, min(wanted, pixels // (block_k * MIN_STEPS_PER_SPLIT)))


@dataclass(frozen=True)
class BackwardGeometry:
    """A checked convolution's sizes: input batch and map, output map, stride, the top and left padding (where
    the first window starts), dilation, the filter's size (KH, KW), the groups and the channels in and out."""

    batch: int
    height: int
    width: int
    out_h: int
    out_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kernel: tuple[int, int]
    groups: int
    c_in_group: int
    c_out: int

    @property
    def c_out_group(self) -> int:
        return self.c_out // self.groups

    @property
    def pixels(self) -> int:
        """Output pixels of the batch: wgrad's reduction."""
        return self.batch * self.out_h * self.out_w

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.c_in_group * self.groups, self.height, self.width)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.c_out, self.c_in_group, *self.kernel)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def backward_geometry(
    name: str,
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | tuple[int, int, int, int],
    dilation: int | tuple[int, int],
    groups: int,
    activation: str,
    input_precision: str,
) -> BackwardGeometry:
    """The checks both launchers (`name`, for messages) make of the sizes and options, and the sizes."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"unknown input precision {input_precision!r}; expected one of {INPUT_PRECISIONS}")
    (stride_h, stride_w), (dil_h, dil_w) = _pair(stride), _pair(dilation)
    top, left, bottom, right = four_pads(padding)
    if min(stride_h, stride_w, dil_h, dil_w) < 1 or min(top, left, bottom, right) < 0:
        raise ValueError(f"{name} needs stride, dilation >= 1 and padding >= 0; got {stride}, {dilation}, {padding}")
    if len(input_shape) != 4 or len(weight_shape) != 4:
        raise ValueError(f"{name} input and weight are 4-D, got {tuple(input_shape)} and {tuple(weight_shape)}")
    batch, c_in, height, width = (int(size) for size in input_shape)
    c_out, c_in_group, kh, kw = (int(size) for size in weight_shape)
    if groups < 1 or c_in % groups or c_out % groups or c_in_group != c_in // groups:
        raise ValueError(f"{name} weight {tuple(weight_shape)} does not fit {c_in} input channels in {groups} groups")
    out_h = output_length(height, kh, stride_h, top, bottom, dil_h)
    out_w = output_length(width, kw, stride_w, left, right, dil_w)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{name}: no window fits input {height} x {width} with kernel {kh} x {kw}")
    expected = (batch, c_out, out_h, out_w)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"{name} grad_out has shape {tuple(grad_out.shape)}, expected the conv's output {expected}")
    if max(prod(input_shape), prod(expected)) >= 2**31:
        raise ValueError(f"{name} addresses tensors with 32-bit offsets: at most 2**31 - 1 elements per tensor")
    if activation != "none" and out is None:
        raise ValueError(f"{name} needs the saved output `out` to differentiate {activation}")
    if out is not None and tuple(out.shape) != expected:
        raise ValueError(f"{name} out has shape {tuple(out.shape)}, expected the conv's output {expected}")
    return BackwardGeometry(
        batch, height, width, out_h, out_w, (stride_h, stride_w), (top, left), (dil_h, dil_w),
        kernel=(kh, kw), groups=groups, c_in_group=c_in_group, c_out=c_out,
    )  # fmt: skip


def check_tensors(name: str, tensors: dict[str, torch.Tensor | None]) -> torch.dtype:
    """All of `tensors` (None skipped) share one supported dtype and one device; returns the dtype."""
    given = {key: tensor for key, tensor in tensors.items() if tensor is not None}
    first_name, first = next(iter(given.items()))
    if first.dtype not in DTYPES:
        raise TypeError(f"{name} supports float32, float16 and bfloat16, got {first_name} in {first.dtype}")
    for key, tensor in given.items():
        if tensor.dtype != first.dtype:
            raise TypeError(f"{name} {key} is {tensor.dtype} but {first_name} is {first.dtype}")
        if tensor.device != first.device:
            raise ValueError(f"{name} {key} is on {tensor.device} but {first_name} is on {first.device}")
    return first.dtype


def checked_output(
    name: str, given: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, contiguous: bool = False
) -> torch.Tensor:
    """`given` checked against the gradient's shape and dtype (and contiguity, where the kernel needs it), or a
    new contiguous tensor."""
    if given is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(given.shape) != shape or given.dtype != like.dtype or given.device != like.device:
        raise ValueError(f"{name} is {given.dtype} {tuple(given.shape)}, expected {like.dtype} {shape}")
    if contiguous and not given.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return given




def _conv_constexprs(g: BackwardGeometry) -> dict[str, int]:
    return {
        "KH": g.kernel[0], "KW": g.kernel[1],
        "STRIDE_H": g.stride[0], "STRIDE_W": g.stride[1],
        "DIL_H": g.dilation[0], "DIL_W": g.dilation[1],
    }  # fmt: skip


def conv2d_dgrad(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    weight: torch.Tensor,
    input_shape: Sequence[int],
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    grad_input: torch.Tensor | None = None,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """The gradient of the conv's input `x` (of shape `input_shape`) for y = activation(conv2d(x, weight) + b):
    `grad_out` is the gradient at y, `out` the saved y (unused, may be None, without an activation).

    `padding` is n, (h, w) or (top, left, bottom, right), as the forward's. `grad_input` may be any strided
    view of the input's shape; `config` overrides `pick_dgrad_config`.
    """
    grid, arguments = conv2d_dgrad_launch(
        grad_out, out, weight, input_shape, stride, padding, dilation, groups, activation, slope, input_precision,
        grad_input, config,
    )  # fmt: skip
    (kernel or conv2d_dgrad_kernel)[grid](**arguments)  # `kernel`: a generated copy to run instead
    return arguments["dx_ptr"]


def conv2d_dgrad_launch(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    weight: torch.Tensor,
    input_shape: Sequence[int],
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    grad_input: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """Everything `conv2d_dgrad` does but the launch: checks, allocates the gradient and returns the grid and the
    kernel's keyword arguments (launch options included). Works on "meta" tensors."""
    check_tensors("conv2d dgrad", {"grad_out": grad_out, "out": out, "weight": weight})
    g = backward_geometry(
        "conv2d dgrad", grad_out, out, input_shape, weight.shape, stride, padding, dilation, groups, activation,
        input_precision,
    )  # fmt: skip
    grad_input = checked_output("conv2d dgrad grad_input", grad_input, g.input_shape, grad_out)
    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        if grad_out.device.type == "cpu":
            config = interpreter_config(BLOCK_M=(g.batch * g.height * g.width, 512), BLOCK_N=(g.c_in_group, 128),
                                        BLOCK_K=(g.c_out_group, 128))  # fmt: skip
        else:
            config = pick_dgrad_config(g.c_in_group, grad_out.dtype, input_precision)
    # A phase starting past the input (an input smaller than the stride) has no pixels and gets no programs.
    phases_h, phases_w = min(g.stride[0], g.height), min(g.stride[1], g.width)
    largest_phase = g.batch * triton.cdiv(g.height, g.stride[0]) * triton.cdiv(g.width, g.stride[1])
    tiles = triton.cdiv(largest_phase, config["BLOCK_M"]) * triton.cdiv(g.c_in_group, config["BLOCK_N"])
    grid = (tiles, g.groups, phases_h * phases_w)
    y = grad_out if out is None else out  # never read without an activation
    arguments = {
        "dy_ptr": grad_out, "y_ptr": y, "w_ptr": weight, "dx_ptr": grad_input,
        "BATCH": g.batch, "H": g.height, "W": g.width, "OH": g.out_h, "OW": g.out_w,
        "C_IN_G": g.c_in_group, "C_OUT_G": g.c_out_group,
        "PHASES_W": phases_w,
        **stride_arguments("dy", grad_out), **stride_arguments("y", y), **stride_arguments("w", weight, "ochw"),
        **stride_arguments("dx", grad_input),
        "pad_h": g.padding[0], "pad_w": g.padding[1],
        "slope": slope,
        **_conv_constexprs(g),
        "TAP_STEP_H": g.stride[0] // gcd(g.stride[0], g.dilation[0]),
        "TAP_STEP_W": g.stride[1] // gcd(g.stride[1], g.dilation[1]),
        "ACTIVATION": activation, "INPUT_PRECISION": input_precision,
        **config,
    }  # fmt: skip
    return grid, arguments


def conv2d_wgrad(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    x: torch.Tensor,
    weight_shape: Sequence[int],
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    bias: bool = True,
    input_precision: str = "ieee",
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
    config: dict | None = None,
    splits: int | None = None,
    kernel=None,
    reduce_kernel=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients of the weight (of shape `weight_shape`) and, with `bias`, of the bias for
    y = activation(conv2d(x, weight) + b): `grad_out` is the gradient at y, `out` the saved y (unused, may be
    None, without an activation). Returns (grad_weight, grad_bias or None).

    `grad_weight` and `grad_bias`, when given, must be contiguous. `config` overrides `pick_wgrad_config`;
    `splits` the number of pieces the reduction over the batch's output pixels is cut into (`pick_splits`).
    Two launches: the split products, then their reduction in a fixed order.
    """
    (grid, arguments), (reduce_grid, reduce_arguments) = conv2d_wgrad_launch(
        grad_out, out, x, weight_shape, stride, padding, dilation, groups, activation, slope, bias, input_precision,
        grad_weight, grad_bias, config, splits,
    )  # fmt: skip
    # `kernel`, `reduce_kernel`: generated copies to run instead
    (kernel or conv2d_wgrad_kernel)[grid](**arguments)
    (reduce_kernel or conv2d_wgrad_reduce_kernel)[reduce_grid](**reduce_arguments)
    return reduce_arguments["dw_ptr"], reduce_arguments["db_ptr"] if bias else None


def conv2d_wgrad_launch(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    x: torch.Tensor,
    weight_shape: Sequence[int],
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    bias: bool = True,
    input_precision: str = "ieee",
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
    config: dict | None = None,
    splits: int | None = None,
) -> tuple[tuple[tuple[int, int, int], dict[str, Any]], tuple[tuple[int], dict[str, Any]]]:
    """Everything `conv2d_wgrad` does but the launches: checks, allocates the gradients and the fp32 partials,
    and returns (grid, keyword arguments) of `conv2d_wgrad_kernel` and of `conv2d_wgrad_reduce_kernel`, launch
    options included. Works on "meta" tensors."""
    check_tensors("conv2d wgrad", {"grad_out": grad_out, "out": out, "x": x})
    g = backward_geometry(
        "conv2d wgrad", grad_out, out, x.shape, weight_shape, stride, padding, dilation, groups, activation,
        input_precision,
    )  # fmt: skip
    grad_weight = checked_output("conv2d wgrad grad_weight", grad_weight, g.weight_shape, grad_out, contiguous=True)
    if bias:
        grad_bias = checked_output("conv2d wgrad grad_bias", grad_bias, (g.c_out,), grad_out, contiguous=True)
    on_cpu = grad_out.device.type == "cpu"
    columns = g.c_in_group * g.kernel[0] * g.kernel[1]
    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        if on_cpu:
            config = interpreter_config(BLOCK_M=(g.c_out_group, 128), BLOCK_N=(columns + bias, 512),
                                        BLOCK_K=(g.pixels, 512))  # fmt: skip
        else:
            config = pick_wgrad_config(g.c_out_group, grad_out.dtype, input_precision, columns + bias)
    tiles = triton.cdiv(g.c_out_group, config["BLOCK_M"]) * triton.cdiv(columns + bias, config["BLOCK_N"])
    if splits is None:
        splits = 1 if on_cpu else pick_splits(g.pixels, tiles * g.groups, config["BLOCK_K"])
    if splits < 1:
        raise ValueError(f"conv2d wgrad splits must be at least 1, got {splits}")
    # Whole BLOCK_K steps per split, and no split left empty.
    pixels_per_split = triton.cdiv(triton.cdiv(g.pixels, splits), config["BLOCK_K"]) * config["BLOCK_K"]
    splits = triton.cdiv(g.pixels, pixels_per_split)
    weight_numel = g.c_out * columns
    partial_row = weight_numel + (g.c_out if bias else 0)
    partials = torch.empty((splits, partial_row), dtype=torch.float32, device=grad_out.device)

    y = grad_out if out is None else out  # never read without an activation
    arguments = {
        "dy_ptr": grad_out, "y_ptr": y, "x_ptr": x, "partial_ptr": partials,
        "BATCH": g.batch, "H": g.height, "W": g.width, "OH": g.out_h, "OW": g.out_w,
        "C_IN_G": g.c_in_group, "C_OUT_G": g.c_out_group, "C_OUT": g.c_out,
        "SPLIT_PIXELS": pixels_per_split, "PARTIAL_ROW": partial_row,
        **stride_arguments("dy", grad_out), **stride_arguments("y", y), **stride_arguments("x", x),
        "pad_h": g.padding[0], "pad_w": g.padding[1],
        "slope": slope,
        **_conv_constexprs(g),
        "HAS_BIAS": bias, "ACTIVATION": activation, "INPUT_PRECISION": input_precision,
        **config,
    }  # fmt: skip
    reduce_config = REDUCE_INTERPRETER_CONFIG if on_cpu else REDUCE_CONFIG
    reduce_arguments = {
        "partial_ptr": partials, "dw_ptr": grad_weight, "db_ptr": grad_bias if bias else grad_weight,
        "WEIGHT_NUMEL": weight_numel, "NUMEL": partial_row, "SPLITS": splits,
        "HAS_BIAS": bias,
        **reduce_config,
    }  # fmt: skip
    grid = (tiles, g.groups, splits)
    return (grid, arguments), ((triton.cdiv(partial_row, reduce_config["BLOCK"]),), reduce_arguments)


def conv2d_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: bool = True,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(grad_input, grad_weight, grad_bias) of y = activation(conv2d(x, weight) + b), with tiles picked for the
    sizes: dgrad (skipped without `input_grad`: a first layer's image needs none) and wgrad, grad_bias None
    without `bias`."""
    options = {
        "stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "activation": activation,
        "slope": slope, "input_precision": input_precision,
    }  # fmt: skip
    grad_input = conv2d_dgrad(grad_out, out, weight, x.shape, **options) if input_grad else None
    grad_weight, grad_bias = conv2d_wgrad(grad_out, out, x, weight.shape, bias=bias, **options)
    return grad_input, grad_weight, grad_bias
