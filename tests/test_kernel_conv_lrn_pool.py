"""The fused conv + bias + ReLU + LRN + max-pool kernel (codegen/conv_lrn_pool.py) against PyTorch in float64.

The reference is F.max_pool2d(paper_lrn(F.relu(F.conv2d(...)))) on the same (already rounded) inputs, with the
paper's LRN written out here: squares padded on the channel axis and summed over the window, alpha not divided by
the window size, each group's channels normalized on their own. Inputs are fresh seeded random numbers, weights
scaled by 1/sqrt(fan-in) so conv outputs are of order one. Most cases use alpha = 0.5, k = 1, where the LRN changes
the result by tens of percent, so a wrong window or a padded channel leaking into a sum shows; one case uses
AlexNet's constants. Tolerances: fp32 1e-4 (exact fp32 products), bf16 1.6e-2 (fp32 accumulation, then one
rounding of the output to bf16). Without a GPU this runs in Triton's interpreter: small shapes, big pixel tiles.

The sm_90 test compiles AlexNet's conv1 and conv2 stages for the H100 (no GPU needed) with the picked configs.
"""

import inspect
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from kernel_support import (
    DEVICE,
    INTERPRETING,
    PRECISIONS,
    TOLERANCES,
    explicit_pool,
    explicitly_padded,
    four_pads,
    random,
)

from netdsl.codegen import conv_lrn_pool as module
from netdsl.codegen.conv_lrn_pool import conv_lrn_maxpool, pick_config
from netdsl.codegen.layouts import to_layout
from netdsl.codegen.target import SM90_MAX_SHARED_BYTES, CompileRequest, compile_sm90_many, format_table

# The interpreter warns when a matmul meets NaN or inf: a masked load that read memory it should not have.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.usefixtures("interpreter_bf16_dot")]
# Under the interpreter a program costs about the same whatever its size: few, big programs.
BIG_TILES = {"BLOCK_P": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2}
# Several pixel tiles and a ragged K tail, for the cases that test tiling.
SMALL_TILES = {"BLOCK_P": 16, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2}
SENSITIVE_LRN = {"lrn_size": 5, "alpha": 0.5, "beta": 0.75, "k": 1.0}
ALEXNET_LRN = {"lrn_size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}


def paper_lrn(y: torch.Tensor, lrn_size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """b_c = a_c / (k + alpha * sum_{j = c - (n-1)//2 .. c + n//2} a_j^2)^beta, the window clipped at the ends."""
    below = (lrn_size - 1) // 2
    squares = F.pad(y * y, (0, 0, 0, 0, below, lrn_size - 1 - below))
    sums = sum(squares[:, j : j + y.shape[1]] for j in range(lrn_size))
    return y / (k + alpha * sums) ** beta


def reference(x, weight, bias, stride, padding, groups, lrn, pool_size, pool_stride, pool_padding, ceil_mode):
    """In float64; padding (top, left, bottom, right), which PyTorch's conv and pooling cannot take, explicitly."""
    x = explicitly_padded(x.double(), padding)
    y = F.relu(F.conv2d(x, weight.double(), bias.double(), stride, 0 if four_pads(padding) else padding, 1, groups))
    y = torch.cat([paper_lrn(part, **lrn) for part in y.chunk(groups, dim=1)], dim=1)
    if four_pads(pool_padding):
        window = pool_size if isinstance(pool_size, tuple) else (pool_size, pool_size)
        steps = pool_stride if isinstance(pool_stride, tuple) else (pool_stride, pool_stride)
        return explicit_pool(y, "max", window, steps, pool_padding, ceil_mode=ceil_mode)
    return F.max_pool2d(y, pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)


def check(
    *,
    batch: int,
    c_in: int,
    c_out: int,
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride=1,
    padding=0,
    groups: int = 1,
    lrn: dict = SENSITIVE_LRN,
    pool_size=3,
    pool_stride=2,
    pool_padding=0,
    ceil_mode: bool = False,
    precision: str = "fp32",
    tiles: dict | None = BIG_TILES,
    seed: int = 0,
    layout: str = "nchw",
) -> None:
    dtype, input_precision = PRECISIONS[precision]
    generator = torch.Generator().manual_seed(seed)
    fan_in = c_in // groups * kernel[0] * kernel[1]
    x = random(generator, batch, c_in, *size).to(DEVICE, dtype)
    weight = random(generator, c_out, c_in // groups, *kernel, scale=fan_in**-0.5).to(DEVICE, dtype)
    bias = random(generator, c_out, scale=0.5).to(DEVICE, dtype)
    pool = (pool_size, pool_stride, pool_padding, ceil_mode)
    expected = reference(x, weight, bias, stride, padding, groups, lrn, *pool)

    config = None if tiles is None else {**pick_config(c_out // groups, dtype, input_precision), **tiles}
    out = to_layout(torch.full(expected.shape, float("nan"), dtype=dtype, device=DEVICE), layout)
    actual = conv_lrn_maxpool(
        to_layout(x, layout), weight, bias, stride, padding, 1, groups, **lrn,
        pool_size=pool_size, pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode,
        input_precision=input_precision, out=out, config=config,
    )  # fmt: skip
    assert actual is out
    torch.testing.assert_close(actual.double(), expected, **TOLERANCES[precision])


CASES = {
    # AlexNet's conv1 stage in miniature: 3 -> 48 channels, 11 x 11 at stride 4, LRN, 3 x 3 / 2 pool (51 -> 11 -> 5).
    "conv1-like": {"batch": 2, "c_in": 3, "c_out": 48, "size": (51, 51), "kernel": (11, 11), "stride": 4},
    # conv2 on one tower: 48 -> 128 channels, 5 x 5 pad 2 on 13 x 13 (-> 6 x 6 pooled).
    "conv2-like": {"batch": 1, "c_in": 48, "c_out": 128, "size": (13, 13), "kernel": (5, 5), "padding": 2},
    # Both towers of conv2 in one launch: each group's LRN sees its own 20 channels only.
    "groups2": {"batch": 2, "c_in": 12, "c_out": 40, "size": (11, 11), "kernel": (3, 3), "padding": 1, "groups": 2},
    "20-channels-2x2-pool": {"batch": 2, "c_in": 5, "c_out": 20, "size": (12, 10), "kernel": (3, 3),
                             "pool_size": 2, "pool_stride": 2},
    # 13 -> 7 pooled: the last window hangs over the edge and sees only conv row/column 12.
    "ceil-mode": {"batch": 1, "c_in": 4, "c_out": 48, "size": (13, 13), "kernel": (3, 3), "padding": 1,
                  "pool_size": 2, "pool_stride": 2, "ceil_mode": True},
    "ceil-mode-3x3-padded": {"batch": 2, "c_in": 6, "c_out": 20, "size": (14, 11), "kernel": (3, 3), "stride": 1,
                             "pool_padding": 1, "ceil_mode": True},
    "even-lrn-window": {"batch": 1, "c_in": 6, "c_out": 20, "size": (9, 9), "kernel": (3, 3),
                        "lrn": {"lrn_size": 4, "alpha": 0.5, "beta": 0.75, "k": 1.0}},
    "alexnet-lrn-constants": {"batch": 1, "c_in": 3, "c_out": 48, "size": (35, 35), "kernel": (11, 11), "stride": 4,
                              "lrn": ALEXNET_LRN},
    "small-tiles": {"batch": 2, "c_in": 5, "c_out": 20, "size": (16, 15), "kernel": (3, 3), "padding": 1,
                    "tiles": SMALL_TILES},
    # TensorFlow's SAME for a 4x4 conv and a 2x2 / 2 pool: the extra row and column at the bottom and right.
    "same-even-kernels": {"batch": 2, "c_in": 3, "c_out": 16, "size": (9, 9), "kernel": (4, 4),
                          "padding": (1, 1, 2, 2), "pool_size": 2, "pool_stride": 2, "pool_padding": (0, 0, 1, 1)},
    # Pool padding past half the window, differing at each end, in ceil mode; SAME_LOWER-like conv padding.
    "pool-pads-to-size-1": {"batch": 1, "c_in": 4, "c_out": 20, "size": (10, 9), "kernel": (3, 2),
                            "padding": (1, 1, 0, 0), "pool_padding": (2, 0, 1, 2), "ceil_mode": True},
    "picked-config": {"batch": 1, "c_in": 6, "c_out": 48, "size": (11, 11), "kernel": (3, 3), "tiles": None},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_fp32(case: str):
    check(**CASES[case], precision="fp32")


@pytest.mark.parametrize("case", ["conv1-like", "groups2"])
def test_channels_last_input_and_output(case: str):
    """Input and output channels-last, as the layout pass lays out maps between convs (the kernel takes
    any strides)."""
    check(**CASES[case], layout="nhwc", seed=7)


@pytest.mark.parametrize("case", ["conv1-like", "conv2-like", "groups2", "ceil-mode"])
def test_bf16(case: str):
    check(**CASES[case], precision="bf16", seed=1)


def test_allocates_output_of_input_dtype_into_a_channel_slice():
    generator = torch.Generator().manual_seed(2)
    x = random(generator, 1, 4, 9, 9).to(DEVICE, torch.float16)
    weight = random(generator, 20, 4, 3, 3, scale=36**-0.5).to(DEVICE, torch.float16)
    bias = random(generator, 20).to(DEVICE, torch.float16)
    arguments = (x, weight, bias, 1, 1, 1, 1, *SENSITIVE_LRN.values(), 3, 2)
    y = conv_lrn_maxpool(*arguments)
    assert y.dtype == torch.float16 and y.shape == (1, 20, 4, 4)
    expected = reference(x, weight, bias, 1, 1, 1, SENSITIVE_LRN, 3, 2, 0, False)
    torch.testing.assert_close(y.double(), expected, **TOLERANCES["fp16"])
    buffer = torch.full((1, 30, 4, 4), float("nan"), dtype=torch.float16, device=DEVICE)
    conv_lrn_maxpool(*arguments, out=buffer[:, 5:25])
    torch.testing.assert_close(buffer[:, 5:25].double(), expected, **TOLERANCES["fp16"])
    assert buffer[:, :5].isnan().all() and buffer[:, 25:].isnan().all(), "wrote outside the output slice"


def test_rejects_bad_arguments():
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=DEVICE)

    x = zeros(1, 4, 9, 9)
    lrn_and_pool = (*ALEXNET_LRN.values(), 3, 2)
    with pytest.raises(ValueError, match="at most 128"):
        conv_lrn_maxpool(x, zeros(130, 4, 3, 3), zeros(130), 1, 0, 1, 1, *lrn_and_pool)
    with pytest.raises(ValueError, match="at most 128"):
        pick_config(129)
    with pytest.raises(ValueError, match="BLOCK_N"):
        conv_lrn_maxpool(x, zeros(40, 4, 3, 3), zeros(40), 1, 0, 1, 1, *lrn_and_pool, config={"BLOCK_N": 32})
    with pytest.raises(ValueError, match="groups"):
        conv_lrn_maxpool(x, zeros(6, 1, 3, 3), zeros(6), 1, 0, 1, 3, *lrn_and_pool)
    with pytest.raises(TypeError, match="bfloat16"):
        conv_lrn_maxpool(x, zeros(6, 4, 3, 3).bfloat16(), zeros(6), 1, 0, 1, 1, *lrn_and_pool)
    with pytest.raises(ValueError, match="out"):
        conv_lrn_maxpool(x, zeros(6, 4, 3, 3), zeros(6), 1, 0, 1, 1, *lrn_and_pool, out=zeros(1, 6, 4, 4))


# One AlexNet tower at batch 128: (input shape, weight shape, stride, padding).
SM90_LAYERS = {
    "conv1": ((128, 3, 227, 227), (48, 3, 11, 11), 4, 0),
    "conv2": ((128, 48, 27, 27), (128, 48, 5, 5), 1, 2),
}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def sm90_request(layer: str, precision: str) -> CompileRequest:
    """What a launch of the layer's stage with the picked config compiles: the launcher runs on "meta" tensors, unit
    integers become constexpr 1 and integers divisible by 16 are marked so, as Triton's launcher does."""
    dtype, input_precision = PRECISIONS[precision]
    x_shape, w_shape, stride, padding = SM90_LAYERS[layer]

    def meta(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    _, arguments = module.conv_lrn_maxpool_launch(
        meta(*x_shape), meta(*w_shape), meta(w_shape[0]), stride, padding, 1, 1, *ALEXNET_LRN.values(), 3, 2,
        input_precision=input_precision,
    )  # fmt: skip
    options = {"num_warps": arguments.pop("num_warps"), "num_stages": arguments.pop("num_stages")}
    signature, constexprs, divisible = {}, {}, []
    for name, parameter in inspect.signature(module.conv_lrn_pool_kernel.fn).parameters.items():
        value = arguments[name]
        unit = isinstance(value, int) and not isinstance(value, bool) and value == 1
        if "constexpr" in str(parameter.annotation) or unit:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = f"*{TRITON_TYPES[value.dtype]}"
            divisible.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                divisible.append(name)
    kernel = module.conv_lrn_pool_kernel
    return CompileRequest(kernel, signature, constexprs, **options, sass=False, divisible_by_16=tuple(divisible))


@pytest.mark.slow
def test_alexnet_stages_compile_for_sm90_without_spills():
    requests = [sm90_request(layer, precision) for layer in SM90_LAYERS for precision in ("bf16", "fp32")]
    # Under the interpreter each half compiles in a child process of its own, side by side.
    workers = 2 if INTERPRETING or os.environ.get("TRITON_INTERPRET") == "1" else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        halves = list(pool.map(compile_sm90_many, [requests[0::2], requests[1::2]]))
    results = [halves[index % 2][index // 2] for index in range(len(requests))]
    table = format_table(results)
    print("\n" + table)
    for result in results:
        assert result.spills == 0 and result.stack_bytes == 0 and result.local_bytes == 0, table
        assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
        assert "wgmma.mma_async" in result.mma, table  # the LRN band product always; the conv GEMM in bf16
