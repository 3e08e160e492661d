"""maxpool(lrn(relu(conv2d(x, w) + b))) in one kernel: neither the conv output nor the LRN output goes to memory.

This is AlexNet's conv1 -> LRN -> pool1 and conv2 -> LRN -> pool2 as one launch. A program instance owns every output
channel of one group (BLOCK_N >= C_out/groups, padded channels computed as zeros) and BLOCK_P pooled output pixels of
one image. For each of the POOL_KH x POOL_KW pool window offsets it

1. computes the conv outputs at the conv pixels those pooled pixels cover, as the implicit GEMM of `conv.py`
   (a transposed [channels, pixels] tile, K = (C_in/groups)*KH*KW flattened as (c, kh, kw), fp32 accumulation);
2. adds the bias and applies ReLU;
3. forms the LRN sums of squares across channels with a second tl.dot, against a constant banded 0/1 matrix built
   in the kernel: band[i, j] = 1 when channel j lies in channel i's window and j < C_out/groups, so padded channels
   never count. The band is bf16 (exact for 0/1) and the fp32 squares go in as 2 bf16 pieces (3 for exact fp32),
   each the rounding error of those before: tensor cores, and half the registers of an fp32 band, which spills;
4. normalizes, b = a * exp2(-beta * log2(k + alpha * sums)), the paper's formula with alpha NOT divided by the
   window size (see `lrn.py`, whose window and conventions this follows);
5. folds b into a running max; window offsets that fall outside the conv output (pool padding, ceil-mode overhang)
   never win.

Only the [C_out/groups, BLOCK_P] pooled tile is stored. The price is recomputation: neighbouring pool windows
overlap, and each conv output is computed once per window that covers it, POOL_KH*POOL_KW / (stride_h*stride_w)
times on average: 9/4 = 2.25 for AlexNet's 3x3 stride-2 pools, 1 for a 2x2 stride-2 pool. The conv FLOPs grow by
that factor; in exchange the conv output is never written and the LRN never reads it back.

With groups > 1 each group's channels are normalized on their own, as each tower's LRN in the two-tower AlexNet sees
only its tower: for groups > 1 this is NOT an LRN across all output channels.
"""

# ruff: noqa: N803, N806  (Triton convention: sizes and constexprs are upper case)

from typing import Any

import torch
import triton
import triton.language as tl

from .layouts import stride_arguments
from .limits import MAX_CHANNELS_PER_GROUP, MAX_NCHW_FILTER_TAPS, fits_shared_memory
from .pool import pair, pool_geometry
from .tile_rules import exact_fp32
from .windows import four_pads, output_length


@triton.jit
def conv_lrn_pool_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, CONV_OH, CONV_OW, OH, OW,
    C_IN_G, C_OUT_G,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wk,
    stride_yn, stride_yc, stride_yh, stride_yw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    alpha, beta, k,
    pool_stride_h, pool_stride_w, pool_pad_h, pool_pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    LRN_SIZE: tl.constexpr,
    POOL_KH: tl.constexpr, POOL_KW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # of the conv GEMM: "ieee", "tf32" or "tf32x3"; ignored for 16-bit
    LRN_PIECES: tl.constexpr,  # bf16 pieces the squares are split into for the band product
    BF16_BAND: tl.constexpr,  # False under Triton's interpreter, whose bf16 tl.dot is wrong: one fp32 product
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """maxpool(lrn(relu(conv + bias))) for BLOCK_P pooled pixels of one image and all BLOCK_N >= C_OUT_G
    output channels of one group, the conv computed at each pool window offset, BLOCK_K of K at a time (the
    module's docstring). Grid: (pooled-pixel tiles, groups, batch)."""
    KHW: tl.constexpr = KH * KW
    LO: tl.constexpr = (LRN_SIZE - 1) // 2
    HI: tl.constexpr = LRN_SIZE - 1 - LO
    pid_p = tl.program_id(0)
    group = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < OH * OW
    mask_n = offs_n < C_OUT_G
    pooled_h = offs_p // OW
    pooled_w = offs_p % OW

    out_channel = group * C_OUT_G + offs_n
    w_rows = w_ptr + out_channel.to(tl.int64) * stride_wo
    bias = tl.load(b_ptr + out_channel, mask=mask_n, other=0.0).to(tl.float32)
    x_image = x_ptr + n * stride_xn + (group * C_IN_G).to(tl.int64) * stride_xc
    k_end = C_IN_G * KHW

    # sums = band @ squares adds up each channel's LRN window; columns past the group's channels are zero.
    rows = offs_n[:, None]
    cols = offs_n[None, :]
    # (Through an fp32 where: Triton's interpreter turns a bool cast straight to bf16 into raw bits.)
    band = tl.where((cols >= rows - LO) & (cols <= rows + HI) & (cols < C_OUT_G), 1.0, 0.0)
    if BF16_BAND:
        band = band.to(tl.bfloat16)

    result = tl.full((BLOCK_N, BLOCK_P), float("-inf"), tl.float32)
    # A loop, not unrolled: each window offset is a whole implicit GEMM.
    for q in range(POOL_KH * POOL_KW):
        conv_h = pooled_h * pool_stride_h - pool_pad_h + q // POOL_KW
        conv_w = pooled_w * pool_stride_w - pool_pad_w + q % POOL_KW
        inside = mask_p & (conv_h >= 0) & (conv_h < CONV_OH) & (conv_w >= 0) & (conv_w < CONV_OW)
        ih0 = conv_h * conv_stride_h - pad_h
        iw0 = conv_w * conv_stride_w - pad_w
        # Which filter taps of each conv pixel land inside the image (bit kh for its row, bit KH + kw for its
        # column), as in conv.py; pixels outside the conv output get none, so they read nothing.
        taps = tl.zeros((BLOCK_P,), dtype=tl.int32)
        for tap_h in tl.static_range(KH):
            ih = ih0 + tap_h * dil_h
            taps |= ((ih >= 0) & (ih < H)).to(tl.int32) << tap_h
        for tap_w in tl.static_range(KW):
            iw = iw0 + tap_w * dil_w
            taps |= ((iw >= 0) & (iw < W)).to(tl.int32) << (KH + tap_w)
        taps = tl.where(inside, taps, 0)
        x_cols = x_image + ih0 * stride_xh + iw0 * stride_xw

        acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        for k_start in range(0, k_end, BLOCK_K):
            kk = k_start + tl.arange(0, BLOCK_K)
            mask_k = kk < k_end
            c = kk // KHW
            kh = (kk % KHW) // KW
            kw = kk % KW
            row_bit = tl.where(mask_k, kh, 31)  # k past the end tests bit 31, which no pixel has
            col_bit = KH + kw
            tap_ok = ((taps[None, :] >> row_bit[:, None]) & (taps[None, :] >> col_bit[:, None]) & 1) != 0
            x_rows = c * stride_xc + kh * dil_h * stride_xh + kw * dil_w * stride_xw
            x = tl.load(x_cols[None, :] + x_rows[:, None], mask=tap_ok, other=0.0)
            w = tl.load(w_rows[:, None] + kk[None, :] * stride_wk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(w, x, acc=acc, input_precision=INPUT_PRECISION)

        a = tl.maximum(acc + bias[:, None], 0.0)
        # Squares split into LRN_PIECES bf16 pieces (each the rounding error of the ones before), so the band
        # product runs on tensor cores with a 0/1 matrix that is exact in bf16: 2 pieces keep ~16 mantissa bits,
        # 3 all of fp32's 24. An fp32 band would hold twice the registers.
        rest = a * a
        if BF16_BAND:
            sums = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
            for _ in tl.static_range(LRN_PIECES):
                piece = rest.to(tl.bfloat16)
                sums = tl.dot(band, piece, acc=sums)
                rest -= piece.to(tl.float32)
        else:
            sums = tl.dot(band, rest, input_precision="ieee")
        lrn = a * tl.exp2(-beta * tl.log2(k + alpha * sums))
        lrn = tl.where(inside[None, :], lrn, float("-inf"))
        result = tl.maximum(result, lrn, propagate_nan=tl.PropagateNan.ALL)

    y_cols = y_ptr + n * stride_yn + pooled_h * stride_yh + pooled_w * stride_yw
    y_ptrs = y_cols[None, :] + (out_channel * stride_yc)[:, None]
    tl.store(y_ptrs, result.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_p[None, :])


# BLOCK_N covers a whole group's channels (the LRN window needs its neighbours), so only the pixel side is free.
# Exact fp32 runs its conv GEMM without tensor cores, whose operand tiles need far more registers, and splits the
# squares into three pieces rather than two: it takes smaller tiles. On Triton 3.9 for sm_90 each of these compiles
# without spills for AlexNet's conv1 and conv2 (tests/test_kernel_conv_lrn_pool.py keeps it so); with 4 warps, or
# BLOCK_P = 64 on the wide tile, they spill. tf32x3's three products hold more operands: under Triton 3.6 its narrow
# tile steps K by 16 (by 32 it spills).
CONFIGS = {
    "narrow": {"BLOCK_N": 64, "BLOCK_P": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
    "narrow-fp32": {"BLOCK_N": 64, "BLOCK_P": 32, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2},
    "narrow-tf32x3": {"BLOCK_N": 64, "BLOCK_P": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2},
    "wide": {"BLOCK_N": 128, "BLOCK_P": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
    "wide-fp32": {"BLOCK_N": 128, "BLOCK_P": 16, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2},
}
# Under Triton's interpreter, which runs one program at a time: big pixel and K blocks (BLOCK_N, a whole group's
# channels, is added per launch).
INTERPRETER_CONFIG = {"BLOCK_P": 256, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_config(channels_per_group: int, dtype: torch.dtype = torch.bfloat16, input_precision: str = "ieee") -> dict:
    """The narrowest tile that holds all of a group's output channels (BLOCK_N at least 16, the smallest tl.dot),
    smaller for exact fp32."""
    _check_channels(channels_per_group)
    name = "narrow" if channels_per_group <= 64 else "wide"
    if exact_fp32(dtype, input_precision):
        name += "-fp32"
    elif name == "narrow" and dtype == torch.float32 and input_precision == "tf32x3":
        name += "-tf32x3"
    config = CONFIGS[name]
    return {**config, "BLOCK_N": min(config["BLOCK_N"], max(16, triton.next_power_of_2(channels_per_group)))}


# The (BLOCK_P, BLOCK_K, num_warps, num_stages) `netdsl tune` times beside pick_config's, BLOCK_N always the
# narrowest that holds a group's channels: the pixel and K blocks around the measured choices.
TUNING_TILES = (
    (16, 16, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2),
    (64, 16, 8, 3),
)  # fmt: skip


def tuning_candidates(channels_per_group: int, element_bytes: int) -> list[dict]:
    """The tiles `netdsl tune` times for a stage whose conv groups have `channels_per_group` output channels, on
    elements of `element_bytes`: those whose pipelined operand tiles fit in shared memory."""
    block_n = max(16, triton.next_power_of_2(channels_per_group))
    return [
        {"BLOCK_N": block_n, "BLOCK_P": p, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}
        for p, k, warps, stages in TUNING_TILES
        if fits_shared_memory(p, block_n, k, stages, element_bytes)
    ]


def _check_channels(channels_per_group: int) -> None:
    if channels_per_group > MAX_CHANNELS_PER_GROUP:
        raise ValueError(
            f"conv+LRN+maxpool holds a group's output channels in one tile: at most {MAX_CHANNELS_PER_GROUP} "
            f"channels per group, got {channels_per_group}"
        )


def _lrn_pieces(dtype: torch.dtype, input_precision: str) -> int:
    """bf16 pieces of the squares: all of fp32's bits where the conv keeps fp32's accuracy (exact products, or
    tf32x3's three TF32 products), two otherwise."""
    return 3 if dtype == torch.float32 and input_precision in ("ieee", "tf32x3") else 2


def conv_lrn_maxpool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | tuple[int, int, int, int],
    dilation: int | tuple[int, int],
    groups: int,
    lrn_size: int,
    alpha: float,
    beta: float,
    k: float,
    pool_size: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
    pool_padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    ceil_mode: bool = False,
    input_precision: str = "ieee",
    out: torch.Tensor | None = None,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """max_pool2d(lrn(relu(conv2d(x, weight, bias)))) with the paper's LRN (alpha not divided by `lrn_size`),
    each group's channels normalized on their own; pooling follows `pool.pool2d`'s rules, ceil mode included.

    `x` is N x C_in x H x W, `weight` C_out x C_in/groups x KH x KW with at most 128 output channels per group,
    `bias` (C_out,). `out` may be any strided N x C_out x OH x OW view of the input's dtype. `config` overrides
    `pick_config` (BLOCK_N, BLOCK_P, BLOCK_K, num_warps, num_stages).
    """
    grid, arguments = conv_lrn_maxpool_launch(
        x, weight, bias, stride, padding, dilation, groups, lrn_size, alpha, beta, k,
        pool_size, pool_stride, pool_padding, ceil_mode, input_precision, out, config,
    )  # fmt: skip
    (kernel or conv_lrn_pool_kernel)[grid](**arguments)  # `kernel`: a generated copy to run instead
    return arguments["y_ptr"]


def conv_lrn_maxpool_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | tuple[int, int, int, int],
    dilation: int | tuple[int, int],
    groups: int,
    lrn_size: int,
    alpha: float,
    beta: float,
    k: float,
    pool_size: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
    pool_padding: int | tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    ceil_mode: bool = False,
    input_precision: str = "ieee",
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """Everything `conv_lrn_maxpool` does but the launch: checks, allocates `out`, and returns the grid and the
    kernel's keyword arguments (launch options included). Works on "meta" tensors, for sm_90 compile checks."""
    _check_tensors(x, weight, bias)
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"unknown input precision {input_precision!r}; expected one of {INPUT_PRECISIONS}")
    if lrn_size < 1 or k < 0 or alpha < 0:
        raise ValueError(f"LRN needs size >= 1, k >= 0 and alpha >= 0; got size={lrn_size}, k={k}, alpha={alpha}")
    stride_h, stride_w = pair(stride, "stride")
    pad_top, pad_left, pad_bottom, pad_right = four_pads(padding)
    dil_h, dil_w = pair(dilation, "dilation")
    if min(stride_h, stride_w, dil_h, dil_w) < 1 or min(pad_top, pad_left, pad_bottom, pad_right) < 0:
        raise ValueError(f"conv needs stride, dilation >= 1 and padding >= 0; got {stride}, {dilation}, {padding}")
    window = pair(pool_size, "pool_size")
    pool_steps = pair(pool_stride, "pool_stride")
    pool_pads = four_pads(pool_padding)

    batch, c_in, height, width = x.shape
    c_out, c_in_group, kh, kw = weight.shape
    if groups < 1 or c_in % groups or c_out % groups or c_in_group != c_in // groups:
        raise ValueError(f"conv weight {tuple(weight.shape)} does not fit {c_in} input channels in {groups} groups")
    if kh + kw > MAX_NCHW_FILTER_TAPS:
        raise ValueError(f"conv supports filters with KH + KW <= {MAX_NCHW_FILTER_TAPS}, got {kh} x {kw}")
    if bias.shape != (c_out,):
        raise ValueError(f"conv bias has shape {tuple(bias.shape)}, expected ({c_out},)")
    c_out_group = c_out // groups
    _check_channels(c_out_group)
    if config is None and x.device.type == "cpu":
        config = {"BLOCK_N": max(16, triton.next_power_of_2(c_out_group)), **INTERPRETER_CONFIG}
    config = dict(config or pick_config(c_out_group, x.dtype, input_precision))
    if config["BLOCK_N"] < c_out_group:
        raise ValueError(f"BLOCK_N={config['BLOCK_N']} cannot hold the {c_out_group} output channels of a group")
    conv_h = output_length(height, kh, stride_h, pad_top, pad_bottom, dil_h)
    conv_w = output_length(width, kw, stride_w, pad_left, pad_right, dil_w)
    if conv_h < 1 or conv_w < 1:
        raise ValueError(f"conv output would be empty: input {height} x {width}, kernel {kh} x {kw}")
    out_h, out_w = pool_geometry(conv_h, conv_w, window, pool_steps, pool_pads, (1, 1), ceil_mode)

    out_shape = (batch, c_out, out_h, out_w)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif out.shape != out_shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, expected {x.dtype} {out_shape} on {x.device}")

    weight_rows = weight.reshape(c_out, c_in_group * kh * kw)  # K = (c, kh, kw): a view of any NCHW weight
    grid = (triton.cdiv(out_h * out_w, config["BLOCK_P"]), groups, batch)
    arguments = {
        "x_ptr": x, "w_ptr": weight_rows, "b_ptr": bias, "y_ptr": out,
        "H": height, "W": width, "CONV_OH": conv_h, "CONV_OW": conv_w, "OH": out_h, "OW": out_w,
        "C_IN_G": c_in_group, "C_OUT_G": c_out_group,
        **stride_arguments("x", x, "nchw"), **stride_arguments("w", weight_rows, "ok"),
        **stride_arguments("y", out, "nchw"),
        "conv_stride_h": stride_h, "conv_stride_w": stride_w,
        "pad_h": pad_top, "pad_w": pad_left, "dil_h": dil_h, "dil_w": dil_w,  # the kernel starts windows there
        "alpha": float(alpha), "beta": float(beta), "k": float(k),
        "pool_stride_h": pool_steps[0], "pool_stride_w": pool_steps[1],
        "pool_pad_h": pool_pads[0], "pool_pad_w": pool_pads[1],
        "KH": kh, "KW": kw, "LRN_SIZE": lrn_size, "POOL_KH": window[0], "POOL_KW": window[1],
        "INPUT_PRECISION": input_precision, "LRN_PIECES": _lrn_pieces(x.dtype, input_precision),
        "BF16_BAND": x.device.type != "cpu",
        **config,
    }  # fmt: skip
    return grid, arguments


def _check_tensors(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"conv+LRN+maxpool supports float32, float16 and bfloat16 inputs, got {x.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"conv+LRN+maxpool needs an N x C x H x W input and a C_out x C_in/groups x KH x KW weight, "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor.dtype != x.dtype:
            raise TypeError(f"conv+LRN+maxpool {name} is {tensor.dtype} but the input is {x.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"conv+LRN+maxpool {name} is on {tensor.device} but the input is on {x.device}")

