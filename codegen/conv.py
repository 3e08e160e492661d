"""2-D convolution as an implicit GEMM on tensor cores, with bias and activation fused into the epilogue.

For one group the GEMM rows are output pixels (M = N*OH*OW), its columns are the group's output
channels and the reduction runs over K = (C_in/groups)*KH*KW, flattened as (c, kh, kw) so that even
conv1's three input channels make a long reduction (K = 363) instead of 121 tiny ones. The patch
matrix is never built: each K step gathers a BLOCK_K x BLOCK_M tile straight from the NCHW input.
Decoding a pixel into (n, oh, ow), and into a bit mask of which filter taps fall inside the image,
happens once per program; decoding k into (c, kh, kw) once per K step on a BLOCK_K vector. Per
gathered element that leaves two shifts and two ands for the bounds test and one address add. The
weight is read as a [C_out, K] matrix, a view of any contiguous NCHW weight. Filters are limited to
KH + KW <= 31 (the tap mask is one int32).

The input channels may come from two tensors (channel c < C0 reads x0, the rest x1), so AlexNet's
conv3 reads both towers' conv2 outputs without a concatenated copy. Every tensor is addressed with
explicit element strides: an input or the output may be a channel slice of a larger NCHW buffer, or
channels-last. The compiler runs this kernel for convs with fewer than 16 input channels per group
(conv1); wider ones run `conv_nhwc.py` on channels-last maps (netdsl.compiler.layout).

fp32 inputs multiply as `input_precision` says (here and in conv_nhwc.py, fc.py and conv_lrn_pool.py): "ieee",
exact products on the FMA units; "tf32", one TF32 tensor-core product (10-bit mantissas); "tf32x3", three TF32
products of each operand's TF32 head and tail (Triton splits them), about fp32's error on tensor cores
(tests/test_kernel_tf32x3.py). 16-bit inputs ignore it.

Both conv kernels call the device functions defined after `conv2d_kernel`, which Triton inlines:
`conv_pixels` decodes a program's output pixels, `conv_epilogue` adds the bias, applies the activation and
stores. Both launchers build their arguments with `conv_arguments`. The emitter copies a kernel into the
generated file together with the device functions it calls (netdsl.codegen.source.device_functions).
"""

# ruff: noqa: N803, N806  (Triton convention: sizes and constexprs are upper case)

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from netdsl.codegen.layouts import stride_arguments
from netdsl.codegen.limits import MAX_NCHW_FILTER_TAPS, SM_COUNT, tile_fits
from netdsl.codegen.tile_rules import SQUARE_TILES, exact_fp32
from netdsl.codegen.windows import four_pads, output_length


@triton.jit
def conv2d_kernel(
    x0_ptr, x1_ptr, w_ptr, b_ptr, y_ptr,
    BATCH, H, W, OH, OW,
    C0, C_IN_G, C_OUT_G,
    stride_x0n, stride_x0c, stride_x0h, stride_x0w,
    stride_x1n, stride_x1c, stride_x1h, stride_x1w,
    stride_wo, stride_wk,
    stride_yn, stride_yc, stride_yh, stride_yw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    slope,
    KH: tl.constexpr, KW: tl.constexpr,
    NUM_INPUTS: tl.constexpr,  # 2: channels [0, C0) come from x0, the rest from x1
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "relu" or "leaky_relu"
    INPUT_PRECISION: tl.constexpr,  # "ieee", "tf32" or "tf32x3"; ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The conv as an implicit GEMM for a tile of BLOCK_M output pixels (the batch's N x OH x OW in one row) x
    BLOCK_N output channels of one group, reduced over K = (c, kh, kw) BLOCK_K at a time with fp32 sums, then
    bias and activation (`conv_epilogue`). Grid: (pixel tiles x channel tiles, groups)."""
    KHW: tl.constexpr = KH * KW
    pid = tl.program_id(0)
    group = tl.program_id(1)
    # Neighbouring programs share a pixel tile, so the gathered input is reused from L2.
    num_pid_n = tl.cdiv(C_OUT_G, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_OUT_G
    batch, oh, ow, ih0, iw0, mask_m = conv_pixels(
        pid_m, BATCH, OH, OW, conv_stride_h, conv_stride_w, pad_h, pad_w, BLOCK_M
    )

    # Which filter taps of each pixel land inside the image: bit kh for its row, bit KH + kw for its
    # column; pixels past M get none. This mask and the pixel's address are all the K loop keeps per pixel.
    taps = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for tap_h in tl.static_range(KH):
        ih = ih0 + tap_h * dil_h
        taps |= ((ih >= 0) & (ih < H)).to(tl.int32) << tap_h
    for tap_w in tl.static_range(KW):
        iw = iw0 + tap_w * dil_w
        taps |= ((iw >= 0) & (iw < W)).to(tl.int32) << (KH + tap_w)
    taps = tl.where(mask_m, taps, 0)

    out_channel = group * C_OUT_G + offs_n
    w_rows = w_ptr + out_channel.to(tl.int64) * stride_wo

    # This group's input channels [0, c_split) live in x0, [c_split, C_IN_G) in x1.
    c_split = C_IN_G
    if NUM_INPUTS == 2:
        c_split = tl.minimum(tl.maximum(C0 - group * C_IN_G, 0), C_IN_G)

    # The accumulator is the transposed product [channels, pixels], so the gathered input tile has
    # pixels along its fast axis.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for source in tl.static_range(NUM_INPUTS):
        if source == 0:
            x_ptr = x0_ptr
            stride_xn, stride_xc, stride_xh, stride_xw = stride_x0n, stride_x0c, stride_x0h, stride_x0w
            c_begin = 0
            c_end = c_split
            first_channel = group * C_IN_G
        else:
            x_ptr = x1_ptr
            stride_xn, stride_xc, stride_xh, stride_xw = stride_x1n, stride_x1c, stride_x1h, stride_x1w
            c_begin = c_split
            c_end = C_IN_G
            first_channel = group * C_IN_G - C0
        x_cols = x_ptr + batch.to(tl.int64) * stride_xn + ih0 * stride_xh + iw0 * stride_xw
        k_end = c_end * KHW
        for k_start in range(c_begin * KHW, k_end, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            mask_k = k < k_end
            c = k // KHW
            kh = (k % KHW) // KW
            kw = k % KW
            # k past this input's range tests bit 31, which no pixel has.
            row_bit = tl.where(mask_k, kh, 31)
            col_bit = KH + kw
            inside = ((taps[None, :] >> row_bit[:, None]) & (taps[None, :] >> col_bit[:, None]) & 1) != 0
            x_rows = (first_channel + c) * stride_xc + kh * dil_h * stride_xh + kw * dil_w * stride_xw
            x = tl.load(x_cols[None, :] + x_rows[:, None], mask=inside, other=0.0)
            w = tl.load(w_rows[:, None] + k[None, :] * stride_wk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(w, x, acc=acc, input_precision=INPUT_PRECISION)

    conv_epilogue(
        acc, b_ptr, y_ptr, batch, oh, ow, mask_m, out_channel, mask_n,
        stride_yn, stride_yc, stride_yh, stride_yw, slope, HAS_BIAS, ACTIVATION, PIXEL_AXIS=1,
    )  # fmt: skip


@triton.jit
def conv_pixels(pid_m, BATCH, OH, OW, conv_stride_h, conv_stride_w, pad_h, pad_w, BLOCK_M: tl.constexpr):
    """Output pixels (GEMM rows) pid_m * BLOCK_M on, decoded once per program: each one's (batch, oh, ow),
    the top-left input position of its window (ih0, iw0), and whether it is one (mask_m: below BATCH*OH*OW)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < BATCH * OH * OW
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    batch = offs_m // (OH * OW)
    ih0 = oh * conv_stride_h - pad_h
    iw0 = ow * conv_stride_w - pad_w
    return batch, oh, ow, ih0, iw0, mask_m


@triton.jit
def conv_epilogue(
    acc, b_ptr, y_ptr, batch, oh, ow, mask_m, out_channel, mask_n,
    stride_yn, stride_yc, stride_yh, stride_yw, slope,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "relu" or "leaky_relu"
    PIXEL_AXIS: tl.constexpr,  # the axis of acc along the pixels: 0 for [pixels, channels], 1 for [channels, pixels]
):  # fmt: skip
    """Adds the bias of each output channel to the fp32 accumulator, applies the activation and stores the
    tile to y in y's dtype."""
    CHANNEL_AXIS: tl.constexpr = 1 - PIXEL_AXIS
    if HAS_BIAS:
        acc += tl.expand_dims(tl.load(b_ptr + out_channel, mask=mask_n, other=0.0).to(tl.float32), PIXEL_AXIS)
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == "leaky_relu":
        acc = tl.where(acc > 0, acc, acc * slope)

    y_pixels = y_ptr + batch.to(tl.int64) * stride_yn + oh * stride_yh + ow * stride_yw
    y_ptrs = tl.expand_dims(y_pixels, CHANNEL_AXIS) + tl.expand_dims(out_channel * stride_yc, PIXEL_AXIS)
    mask = tl.expand_dims(mask_m, CHANNEL_AXIS) & tl.expand_dims(mask_n, PIXEL_AXIS)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# Tile shapes: BLOCK_M output pixels by BLOCK_N output channels of one group. On Triton 3.9 all compile
# for sm_90 without spills in fp32 (ieee and tf32), fp16 and bf16; tests/test_sm90_conv.py keeps it so.
CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # wide layers
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # wide layers before Triton 3.9
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},  # narrow groups, few pixels
]

ACTIVATIONS = ("none", "relu", "leaky_relu")
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton 3.6 lays the gathered tile out with threads along K rather than along the pixels and needs far more
# registers: there the square tile spills on every AlexNet layer and the half-width one does not, so before 3.9
# wide layers take the half-width tile (tile_rules.SQUARE_TILES). Exact fp32 products run on the FMA units
# with their operands in registers: the narrow tile is then 128 pixels by 32 channels, K by 16, the one tried that
# built without spills at every conv of AlexNet, LeNet-5, SimpleNet (with and without bias and ReLU) and VGG-16's
# first five shapes at batch 1, 32 and 128 under Triton 3.6 and 3.9 (64 x 64 and 32 x 64 tiles spilled a few bytes
# at one layer or another).
EXACT_FP32_NARROW = {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3}


# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {"BLOCK_M": 512, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}

# The tiles `netdsl tune` times on the device beside pick_config's (the grid of bench/conv_sweep.py, which
# found pick_config's choices on an H200 in bf16): both conv kernels take them.
TUNING_TILES = (
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
)


def tuning_candidates(element_bytes: int) -> list[dict]:
    """The tiles `netdsl tune` times for a conv of this kernel (its K runs over channels and taps alike) on elements
    of `element_bytes`: those whose pipelined operand tiles fit in shared memory."""
    return [dict(tile) for tile in TUNING_TILES if tile_fits(tile, element_bytes)]


def pick_config(M: int, N: int, groups: int = 1, exact: bool = False) -> dict:
    """Block sizes for the implicit GEMM of one group (of `groups`): M pixels and N output channels.

    Groups with more than 64 channels take the square tile; narrower ones the small 64 x 64 tile
    (conv1's 48 channels per tower waste a quarter of a 64-wide tile rather than most of a 128-wide
    one; on an H200, bf16, batch 128, it ran conv1 in 0.54 ms against 0.66 ms for 128 x 64:
    bench/results/conv_sweep.tsv). When the square tile would leave most streaming multiprocessors
    idle (small batches, 13 x 13 maps; every group's tiles count, as one launch runs them all) the small
    tile wins too. Exact fp32 (`exact`: products on the FMA units) takes 128 x 32 instead.
    """
    narrow = EXACT_FP32_NARROW if exact else CONFIGS[2]
    if N <= 64:
        return narrow
    config = CONFIGS[0] if SQUARE_TILES else CONFIGS[1]
    tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]) * groups
    return config if tiles >= SM_COUNT // 2 else narrow


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def check_inputs(inputs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not 1 <= len(inputs) <= 2:
        raise ValueError(f"conv2d reads one or two input tensors, got {len(inputs)}")
    first = inputs[0]
    if first.dtype not in DTYPES:
        raise TypeError(f"conv2d supports float32, float16 and bfloat16 inputs, got {first.dtype}")
    for x in inputs:
        if x.dim() != 4:
            raise ValueError(f"conv2d inputs are N x C x H x W, got shape {tuple(x.shape)}")
        if (x.shape[0], x.shape[2], x.shape[3]) != (first.shape[0], first.shape[2], first.shape[3]):
            raise ValueError(f"conv2d inputs differ in batch or spatial size: {tuple(first.shape)} vs {tuple(x.shape)}")
    for name, tensor in [*(("input", x) for x in inputs), ("weight", weight), ("bias", bias)]:
        if tensor is None:
            continue
        if tensor.dtype != first.dtype:
            raise TypeError(f"conv2d {name} is {tensor.dtype} but the input is {first.dtype}")
        if tensor.device != first.device:
            raise ValueError(f"conv2d {name} is on {tensor.device} but the input is on {first.device}")


def conv2d(
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
) -> torch.Tensor:
    """activation(conv2d(concat(inputs, dim=1), weight) + bias), without materializing the concatenation.

    `inputs` is one N x C x H x W tensor or two whose channels are read as if concatenated. `weight` is
    C_out x (C_in/groups) x KH x KW; `padding` n, (h, w) or (top, left, bottom, right). `out` may be any
    strided N x C_out x OH x OW view, such as a channel slice of a larger buffer. `config` overrides
    `pick_config` (a dict of block sizes, num_warps, num_stages).
    """
    grid, arguments = conv2d_launch(
        inputs, weight, bias, stride, padding, dilation, groups, activation, slope, input_precision, out, config
    )
    (kernel or conv2d_kernel)[grid](**arguments)  # `kernel`: a generated copy to run instead
    return arguments["y_ptr"]


def conv2d_launch(
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
) -> tuple[tuple[int, int], dict[str, Any]]:
    """Everything `conv2d` does but the launch: checks, allocates `out` and returns the grid and the
    kernel's keyword arguments (launch options included). Works on "meta" tensors, which is how the
    sm_90 compile test sees the exact specialization a real launch would get."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    g = conv_geometry("conv2d", inputs, weight, bias, stride, padding, dilation, groups, activation, input_precision)
    if sum(g.kernel) > MAX_NCHW_FILTER_TAPS:
        raise ValueError(
            f"conv2d supports filters with KH + KW <= {MAX_NCHW_FILTER_TAPS}, got {g.kernel[0]} x {g.kernel[1]}"
        )
    out = conv_output("conv2d", out, g.out_shape, inputs[0], torch.contiguous_format)
    if config is None:  # on the CPU the interpreter runs one program at a time: few, big tiles
        on_cpu = inputs[0].device.type == "cpu"
        exact = exact_fp32(inputs[0].dtype, input_precision)
        config = INTERPRETER_CONFIG if on_cpu else pick_config(g.pixels, g.c_out_group, g.groups, exact)
    weight_rows = weight.flatten(1)  # K = (c, kh, kw): a view of any NCHW weight
    return conv_arguments(inputs, weight_rows, "ok", bias, out, g, activation, slope, input_precision, config)


@dataclass(frozen=True)
class ConvGeometry:
    """A checked convolution's sizes: input batch and map, output map, stride, padding (top, left, bottom,
    right), dilation, the filter's size (KH, KW), the groups and the channels in and out."""

    batch: int
    height: int
    width: int
    out_h: int
    out_w: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    kernel: tuple[int, int]
    groups: int
    c_in_group: int
    c_out: int

    @property
    def pixels(self) -> int:
        """Output pixels of the batch: the GEMM's rows."""
        return self.batch * self.out_h * self.out_w

    @property
    def c_out_group(self) -> int:
        return self.c_out // self.groups

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.c_out, self.out_h, self.out_w)


def conv_geometry(
    name: str,
    inputs: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | tuple[int, int, int, int],
    dilation: int | tuple[int, int],
    groups: int,
    activation: str,
    input_precision: str,
) -> ConvGeometry:
    """The checks every conv launcher (`name`, for messages) makes of its arguments, and the sizes."""
    check_inputs(inputs, weight, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"unknown input precision {input_precision!r}; expected one of {INPUT_PRECISIONS}")
    (stride_h, stride_w), pads, (dil_h, dil_w) = _pair(stride), four_pads(padding), _pair(dilation)
    if min(stride_h, stride_w, dil_h, dil_w) < 1 or min(pads) < 0:
        raise ValueError(f"{name} needs stride, dilation >= 1 and padding >= 0; got {stride}, {dilation}, {padding}")
    batch, _, height, width = inputs[0].shape
    c_in = sum(x.shape[1] for x in inputs)
    if weight.dim() != 4:
        raise ValueError(f"{name} weight is C_out x C_in/groups x KH x KW, got shape {tuple(weight.shape)}")
    c_out, c_in_group, kh, kw = weight.shape
    if groups < 1 or c_in % groups or c_out % groups or c_in_group != c_in // groups:
        raise ValueError(f"{name} weight {tuple(weight.shape)} does not fit {c_in} input channels in {groups} groups")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"{name} bias has shape {tuple(bias.shape)}, expected ({c_out},)")
    top, left, bottom, right = pads
    out_h = output_length(height, kh, stride_h, top, bottom, dil_h)
    out_w = output_length(width, kw, stride_w, left, right, dil_w)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{name} output would be empty: input {height} x {width}, kernel {kh} x {kw}")
    return ConvGeometry(
        batch, height, width, out_h, out_w, (stride_h, stride_w), pads, (dil_h, dil_w),
        kernel=(kh, kw), groups=groups, c_in_group=c_in_group, c_out=c_out,
    )  # fmt: skip


def conv_output(
    name: str, out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, memory_format
) -> torch.Tensor:
    """`out` checked against the output's shape and dtype, or a new tensor in `memory_format`."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
    if tuple(out.shape) != shape or out.dtype != like.dtype:
        raise ValueError(f"{name} out is {out.dtype} {tuple(out.shape)}, expected {like.dtype} {shape}")
    return out


def conv_arguments(
    inputs: list[torch.Tensor],
    weight: torch.Tensor,
    weight_axes: str,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    g: ConvGeometry,
    activation: str,
    slope: float,
    input_precision: str,
    config: dict,
) -> tuple[tuple[int, int], dict[str, Any]]:
    """The grid and keyword arguments (launch options included) of either conv kernel. `weight` is the
    kernel's view of the weight, `weight_axes` its axes as the kernel's stride arguments name them
    ("ok": conv2d_kernel's [C_out, K] rows; "ochw": conv2d_nhwc_kernel's 4-D weight)."""
    x0, x1 = inputs[0], inputs[-1]
    grid = (triton.cdiv(g.pixels, config["BLOCK_M"]) * triton.cdiv(g.c_out_group, config["BLOCK_N"]), g.groups)
    arguments = {
        "x0_ptr": x0, "x1_ptr": x1, "w_ptr": weight, "b_ptr": weight if bias is None else bias, "y_ptr": out,
        "BATCH": g.batch, "H": g.height, "W": g.width, "OH": g.out_h, "OW": g.out_w,
        "C0": x0.shape[1], "C_IN_G": g.c_in_group, "C_OUT_G": g.c_out_group,
        **stride_arguments("x0", x0, "nchw"), **stride_arguments("x1", x1, "nchw"),
        **stride_arguments("w", weight, weight_axes), **stride_arguments("y", out, "nchw"),
        "conv_stride_h": g.stride[0], "conv_stride_w": g.stride[1],
        "pad_h": g.padding[0], "pad_w": g.padding[1],  # top and left: where the first window starts
        "dil_h": g.dilation[0], "dil_w": g.dilation[1],
        "slope": slope,
        "KH": g.kernel[0], "KW": g.kernel[1], "NUM_INPUTS": len(inputs),
        "HAS_BIAS": bias is not None, "ACTIVATION": activation, "INPUT_PRECISION": input_precision,
        **config,
    }  # fmt: skip
    return grid, arguments

