"""2-D convolution as an implicit GEMM over channels-last (NHWC) maps: the compiler's conv for layers
with 16 or more input channels per group (netdsl.compiler.layout); `conv.py` keeps the ones with fewer.

Why it is faster. `conv.py` reduces over K = (c, kh, kw) flattened, which keeps conv1's three
channels a long reduction but makes every K step a gather: consecutive k are different taps, so each
element is its own 2-byte load and Triton cannot stage the tile with asynchronous copies. Here the
reduction runs tap by tap, and within a tap over a block of BLOCK_K channels. With channels-last maps
(element stride 1 between channels, which Triton specializes as a constant) each pixel's BLOCK_K
channels are contiguous: 16-byte vector loads that the pipeliner issues as cp.async several stages
ahead. The GEMM is [pixels, channels] x [channels, filters]; the weight is read per tap as a
[BLOCK_K, BLOCK_N] block (contiguous along K when the weight is channels-last too). Measured on an
H200 in bf16 at batch 128 (bench/conv_sweep.py; bench/results/conv_sweep.tsv): AlexNet's conv2..conv5
3.3 to 3.7 times faster than `conv.py` under its best tile, 0.9 to 1.1 times cuDNN's time.

Why not everywhere. A tap's reduction is only C_in/groups long, so a layer with few input channels
wastes most of each BLOCK_K (conv1's 3 channels use 3 of 16 lanes): for those `conv.py` stays.

One flattened loop runs over (tap, channel block) per input, so the pipeliner sees a single loop however
small C_in/groups is. Like `conv.py` it may read its channels from two tensors (channel c < C0 from x0,
the rest from x1: AlexNet's conv3 reads both towers without a concatenated copy); each input's share of
a group starts a channel block of its own, so blocks never straddle the two. Any strides work (NCHW
too, just without the vector loads); the output may be any strided view, channels-last by default.

The pixel decoding, the bias/activation epilogue and the launch arguments are conv.py's (`conv_pixels`,
`conv_epilogue`, `conv_arguments`).
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from typing import Any

import torch
import triton
import triton.language as tl

from netdsl.codegen.conv import (
    TUNING_TILES,
    conv_arguments,
    conv_epilogue,
    conv_geometry,
    conv_output,
    conv_pixels,
)
from netdsl.codegen.limits import SM_COUNT, tile_fits
from netdsl.codegen.tile_rules import exact_fp32


@triton.jit
def conv2d_nhwc_kernel(
    x0_ptr, x1_ptr, w_ptr, b_ptr, y_ptr,
    BATCH, H, W, OH, OW,
    C0, C_IN_G, C_OUT_G,
    stride_x0n, stride_x0c, stride_x0h, stride_x0w,
    stride_x1n, stride_x1c, stride_x1h, stride_x1w,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    slope,
    part_ptr, count_ptr,  # SPLIT_K > 1: fp32 partial sums [SPLIT_K, pixels, C_out] and a zeroed int32 per tile
    KH: tl.constexpr, KW: tl.constexpr,
    NUM_INPUTS: tl.constexpr,  # 2: channels [0, C0) come from x0, the rest from x1
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "relu" or "leaky_relu"
    INPUT_PRECISION: tl.constexpr,  # "ieee", "tf32" or "tf32x3"; ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,  # programs sharing one output tile, each over TAPS_PER_SPLIT of the taps
    TAPS_PER_SPLIT: tl.constexpr = 1,
):  # fmt: skip
    """conv2d_kernel's tile for channels-last maps (BLOCK_M output pixels x BLOCK_N output channels of one group),
    reduced tap by tap over BLOCK_K channels at a time. Grid: (pixel tiles x channel tiles, groups, SPLIT_K); with
    SPLIT_K > 1 each program takes TAPS_PER_SPLIT taps, and the tile's last to finish adds the partials in split
    order and runs the epilogue."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    num_pid_n = tl.cdiv(C_OUT_G, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_OUT_G
    batch, oh, ow, ih0, iw0, mask_m = conv_pixels(
        pid_m, BATCH, OH, OW, conv_stride_h, conv_stride_w, pad_h, pad_w, BLOCK_M
    )
    out_channel = group * C_OUT_G + offs_n
    w_filters = w_ptr + out_channel.to(tl.int64) * stride_wo

    # This group's input channels [0, c_split) live in x0, [c_split, C_IN_G) in x1.
    c_split = C_IN_G
    if NUM_INPUTS == 2:
        c_split = tl.minimum(tl.maximum(C0 - group * C_IN_G, 0), C_IN_G)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for source in tl.static_range(NUM_INPUTS):
        # Channels are counted from where this input's share of the group begins, in the input
        # (x_first) and in the filter (w_first), so block starts stay multiples of BLOCK_K.
        if source == 0:
            x_ptr = x0_ptr
            stride_xn, stride_xc, stride_xh, stride_xw = stride_x0n, stride_x0c, stride_x0h, stride_x0w
            x_first = group * C_IN_G
            w_first = 0
            c_count = c_split
        else:
            x_ptr = x1_ptr
            stride_xn, stride_xc, stride_xh, stride_xw = stride_x1n, stride_x1c, stride_x1h, stride_x1w
            x_first = tl.maximum(group * C_IN_G - C0, 0)
            w_first = c_split
            c_count = C_IN_G - c_split
        x_pixels = x_ptr + batch.to(tl.int64) * stride_xn + x_first * stride_xc
        w_taps = w_filters + w_first * stride_wc
        # One flattened loop over (tap, channel block), so the pipeliner sees a single loop; with SPLIT_K, over
        # this program's share of the taps.
        c_blocks = tl.cdiv(c_count, BLOCK_K)
        first_step = 0
        last_step = KH * KW * c_blocks
        if SPLIT_K > 1:
            first_tap = tl.program_id(2) * TAPS_PER_SPLIT
            first_step = first_tap * c_blocks
            last_step = tl.minimum(first_tap + TAPS_PER_SPLIT, KH * KW) * c_blocks
        for step in range(first_step, last_step):
            tap = step // c_blocks
            c0 = (step - tap * c_blocks) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            channels = c0 + tl.arange(0, BLOCK_K)
            mask_c = channels < c_count
            x = tl.load(
                (x_pixels + ih * stride_xh + iw * stride_xw)[:, None] + (channels * stride_xc)[None, :],
                mask=inside[:, None] & mask_c[None, :],
                other=0.0,
            )
            w = tl.load(
                (w_taps + kh * stride_wh + kw * stride_ww)[None, :] + (channels * stride_wc)[:, None],
                mask=mask_c[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = tl.dot(x, w, acc=acc, input_precision=INPUT_PRECISION)

    if SPLIT_K > 1:
        # Each split stores its partial sums; the last of the tile's splits to arrive adds all of them up in
        # split order (the same order whichever arrives last: the same bits every run) and runs the epilogue.
        pixels = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        part_tile = part_ptr + pixels[:, None] * (C_OUT_G * tl.num_programs(1)) + out_channel[None, :]
        part_size = (tl.zeros([], dtype=tl.int64) + BATCH * OH * OW) * C_OUT_G * tl.num_programs(1)
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(part_tile + tl.program_id(2) * part_size, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial stored before the tile's count goes up (release, below)
        arrived = tl.atomic_add(count_ptr + group * tl.num_programs(0) + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):  # past L1 (".cg"): other SMs wrote these
                total += tl.load(part_tile + split * part_size, mask=mask, other=0.0, cache_modifier=".cg")
            conv_epilogue(
                total, b_ptr, y_ptr, batch, oh, ow, mask_m, out_channel, mask_n,
                stride_yn, stride_yc, stride_yh, stride_yw, slope, HAS_BIAS, ACTIVATION, PIXEL_AXIS=0,
            )  # fmt: skip
    else:
        conv_epilogue(
            acc, b_ptr, y_ptr, batch, oh, ow, mask_m, out_channel, mask_n,
            stride_yn, stride_yc, stride_yh, stride_yw, slope, HAS_BIAS, ACTIVATION, PIXEL_AXIS=0,
        )  # fmt: skip


# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {"BLOCK_M": 512, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}


def pick_config(
    M: int, C_IN_G: int, C_OUT_G: int, dtype: torch.dtype, input_precision: str = "tf32", groups: int = 1
) -> dict:
    """Block sizes for M output pixels and one group's C_IN_G -> C_OUT_G channels, of `groups` groups.

    From bench/conv_sweep.py on an H200 (bf16 and TF32, batch 128, AlexNet's conv2..conv5; the table
    is in bench/results/conv_sweep.tsv): 128 filters wide where the group's filters are a multiple of 128
    (conv2: 128), 64 wide otherwise (conv3, conv4: 192 would waste a third of a second 128-wide tile);
    a 64-pixel tile when 128-pixel ones would leave most SMs idle (conv5 at 13 x 13; the tiles of every
    group count, as one launch runs them all: AlexNet's towers merged into groups); K blocks of
    128 bytes per pixel (64 channels in 16-bit, 32 in fp32), fewer for narrow groups. Exact fp32
    ("ieee": the dot on the FMA units, its operands in registers) never takes the 128 x 128 tile, which
    spills there; tf32x3 takes the tensor-core tiles (244 registers on the square one, no spills).
    """
    block_k = 32 if dtype == torch.float32 else 64
    block_k = max(16, min(block_k, triton.next_power_of_2(C_IN_G)))
    if C_OUT_G % 128 == 0 and not exact_fp32(dtype, input_precision):
        config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 3}
    elif dtype == torch.float32:
        config = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 3}
    else:
        config = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 4}
    tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(C_OUT_G, config["BLOCK_N"]) * groups
    if tiles < 2 * SM_COUNT:
        config = {**config, "BLOCK_M": 64, "BLOCK_K": min(block_k, 32), "num_warps": 4, "num_stages": 3}
        if dtype == torch.float32:  # 8 warps and 2 stages: with 4 or 3, ptxas spills some fp32 (FMA-dot) builds
            config.update(num_warps=8, num_stages=2)
    return config


def tuning_candidates(c_in_group: int, element_bytes: int) -> list[dict]:
    """The tiles `netdsl tune` times for a channels-last conv of `c_in_group` input channels per group on elements of
    `element_bytes`: conv.py's, each K block no wider than the channels a tap has (at least 16, the tensor cores'
    K), duplicates dropped, only those whose pipelined operands fit in shared memory."""
    widest = max(16, triton.next_power_of_2(c_in_group))
    tiles = [{**tile, "BLOCK_K": min(tile["BLOCK_K"], widest)} for tile in TUNING_TILES]
    unique = {tuple(tile.items()): tile for tile in tiles}.values()
    return [dict(tile) for tile in unique if tile_fits(tile, element_bytes)]


def split_taps(programs: int, taps: int) -> dict:
    """SPLIT_K and TAPS_PER_SPLIT for a launch of `programs` output tiles over a filter of `taps` taps: when the
    tiles leave most SMs idle (AlexNet's conv3..conv5 at batch 1: 9 to 18 tiles for 132 SMs, each looping over
    up to 3456 products a pixel), the taps are shared among up to SM_COUNT / programs programs per tile, every
    split the same number of taps. Not yet measured on a GPU: only with `split_k=True` (`--split-k`)."""
    most = min(taps, SM_COUNT // max(programs, 1))
    if programs >= SM_COUNT // 2 or most < 2:
        return {"SPLIT_K": 1, "TAPS_PER_SPLIT": taps}
    per = triton.cdiv(taps, most)
    return {"SPLIT_K": triton.cdiv(taps, per), "TAPS_PER_SPLIT": per}


def conv2d_nhwc(
    inputs: list[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    out: torch.Tensor | None = None,
    config: dict | None = None,
    kernel=None,
    split_k: bool = False,
) -> torch.Tensor:
    """activation(conv2d(concat(inputs, dim=1), weight) + bias), without materializing the concatenation.

    `inputs` is one N x C x H x W tensor or two whose channels are read as if concatenated, with any
    strides (channels-last is the fast case); `weight` C_out x C_in/groups x KH x KW (channels-last
    too, ideally); `out` any strided N x C_out x OH x OW view, allocated channels-last when not given.
    `split_k`: share each output tile's taps among several programs when the tiles are too few to fill the
    GPU (`split_taps`); `config` may set SPLIT_K and TAPS_PER_SPLIT itself.
    """
    grid, arguments = conv2d_nhwc_launch(
        inputs, weight, bias, stride, padding, dilation, groups, activation, slope, input_precision, out, config,
        split_k,
    )  # fmt: skip
    (kernel or conv2d_nhwc_kernel)[grid](**arguments)  # `kernel`: a generated copy to run instead
    return arguments["y_ptr"]


def conv2d_nhwc_launch(
    inputs: list[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    activation: str = "none",
    slope: float = 0.01,
    input_precision: str = "ieee",
    out: torch.Tensor | None = None,
    config: dict | None = None,
    split_k: bool = False,
) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """The checks, the output and the kernel's arguments of `conv2d_nhwc` (works on "meta" tensors); with SPLIT_K,
    the partial sums' workspace and the tiles' zeroed counters are allocated here, on the input's device."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    g = conv_geometry(
        "conv2d_nhwc", inputs, weight, bias, stride, padding, dilation, groups, activation, input_precision
    )
    out = conv_output("conv2d_nhwc", out, g.out_shape, inputs[0], torch.channels_last)
    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        on_cpu = inputs[0].device.type == "cpu"
        config = (
            INTERPRETER_CONFIG
            if on_cpu
            else pick_config(g.pixels, g.c_in_group, g.c_out_group, inputs[0].dtype, input_precision, g.groups)
        )
    taps = g.kernel[0] * g.kernel[1]
    if "SPLIT_K" not in config:
        config = {**config, "SPLIT_K": 1, "TAPS_PER_SPLIT": taps}
        if split_k:  # under the interpreter too, whose big tiles are always few: the same code path as the GPU's
            tiles = triton.cdiv(g.pixels, config["BLOCK_M"]) * triton.cdiv(g.c_out_group, config["BLOCK_N"])
            config.update(split_taps(tiles * g.groups, taps))
            if config["SPLIT_K"] > 1 and config["BLOCK_M"] * config["BLOCK_N"] > 32 * 32 * config["num_warps"]:
                config["num_warps"] = 8  # the sum of the partials holds a second fp32 tile: 4 warps spill
    splits = config["SPLIT_K"]
    if splits < 1 or (splits - 1) * config["TAPS_PER_SPLIT"] >= taps or splits * config["TAPS_PER_SPLIT"] < taps:
        raise ValueError(f"SPLIT_K {splits} x TAPS_PER_SPLIT {config['TAPS_PER_SPLIT']} does not cover {taps} taps")
    grid, arguments = conv_arguments(inputs, weight, "ochw", bias, out, g, activation, slope, input_precision, config)
    part = count = out  # not read with one split
    if splits > 1:
        device = inputs[0].device
        part = torch.empty((splits, g.pixels, g.groups * g.c_out_group), dtype=torch.float32, device=device)
        count = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=device)
    return (*grid, splits), {**arguments, "part_ptr": part, "count_ptr": count}
