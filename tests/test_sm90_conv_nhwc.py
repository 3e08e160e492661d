"""The channels-last conv compiles for the H100 (sm_90) for AlexNet's conv2..conv5 at batch 128
without spills, within shared memory, on wgmma, and — its reason to exist — stages both operands with
16-byte asynchronous copies (`LDGSTS.E.BYPASS.128`) where conv.py gathers 2-byte elements one by one.
No GPU is needed; run with `-s` for the table."""

import re
from functools import cache

import pytest
import torch
from test_sm90_backward import assert_fits
from test_sm90_conv import PRECISIONS, meta, specialize

from netdsl.codegen import conv_nhwc
from netdsl.codegen.target import CompileRequest, compile_sm90_many, format_table

pytestmark = pytest.mark.slow

# One tower: (input shape, weight shape, stride, padding)
LAYERS = {
    "conv2": ((48, 27, 27), (128, 48, 5, 5), 1, 2),
    "conv3": ((256, 13, 13), (192, 256, 3, 3), 1, 1),
    "conv4": ((192, 13, 13), (192, 192, 3, 3), 1, 1),
    "conv5": ((192, 13, 13), (128, 192, 3, 3), 1, 1),
}
CASES = [(layer, precision) for layer in LAYERS for precision in ("bf16", "tf32")]


def launch(batch: int, shape, weight, stride: int, padding: int, precision: str, **options) -> tuple[tuple, dict]:
    """The grid and arguments of conv2d_nhwc at one layer's geometry, on meta tensors laid out channels-last."""
    dtype, input_precision = PRECISIONS[precision]
    return conv_nhwc.conv2d_nhwc_launch(
        meta(batch, *shape, dtype=dtype).contiguous(memory_format=torch.channels_last),
        meta(*weight, dtype=dtype).contiguous(memory_format=torch.channels_last),
        meta(weight[0], dtype=dtype),
        stride,
        padding,
        activation="relu",
        input_precision=input_precision,
        **options,
    )


def compile_all(requests: dict) -> dict:
    results = compile_sm90_many(list(requests.values()))
    print("\n" + format_table(results))
    return dict(zip(requests, results, strict=True))


def assert_fits_on_tensor_cores(result, tensor_cores: bool) -> None:
    """`assert_fits` (no spills, stack or local memory; shared memory within an SM's), and wgmma where asked."""
    table = assert_fits(result)
    assert not tensor_cores or "wgmma.mma_async" in result.mma, table


@cache
def compiled() -> dict:
    requests = {}
    for layer, precision in CASES:
        _, arguments = launch(128, *LAYERS[layer], precision)
        request = specialize(conv_nhwc.conv2d_nhwc_kernel, arguments)
        requests[layer, precision] = CompileRequest(
            request.kernel, request.signature, request.constexprs, request.num_warps, request.num_stages,
            sass=True, divisible_by_16=request.divisible_by_16,
        )  # fmt: skip
    return compile_all(requests)


@pytest.mark.parametrize(("layer", "precision"), CASES)
def test_nhwc_variant_compiles_with_vector_async_copies(layer: str, precision: str):
    result = compiled()[layer, precision]
    assert_fits_on_tensor_cores(result, tensor_cores=True)
    assert len(re.findall(r"LDGSTS\.E\.BYPASS\.128", result.sass)) >= 8, "operands not staged by 16-byte cp.async"
    # One 2-byte load may read the bias in the epilogue (the 64-pixel tile lays it out one per thread);
    # gathered operands would be dozens.
    assert len(re.findall(r"LDG\.E\.U16", result.sass)) <= 1, "2-byte gathers"


# Split-K at batch 1 (`split_k=True`): AlexNet's towers merged (conv3 of one group over 384 filters, conv4 and conv5 of
# two groups), whose tiles leave most SMs idle; (input shape, weight shape, groups).
MERGED_BATCH1 = {
    "conv2": ((96, 27, 27), (256, 48, 5, 5), 2),
    "conv3": ((256, 13, 13), (384, 256, 3, 3), 1),
    "conv4": ((384, 13, 13), (384, 192, 3, 3), 2),
    "conv5": ((384, 13, 13), (256, 192, 3, 3), 2),
}
SPLIT_CASES = [(layer, precision) for layer in MERGED_BATCH1 for precision in ("bf16", "fp32")]


@cache
def compiled_split() -> dict:
    requests = {}
    for layer, precision in SPLIT_CASES:
        shape, weight, groups = MERGED_BATCH1[layer]
        grid, arguments = launch(1, shape, weight, 1, weight[2] // 2, precision, groups=groups, split_k=True)
        assert arguments["SPLIT_K"] > 1 and grid[2] == arguments["SPLIT_K"], (layer, grid)
        requests[layer, precision] = specialize(conv_nhwc.conv2d_nhwc_kernel, arguments)
    return compile_all(requests)


@pytest.mark.parametrize(("layer", "precision"), SPLIT_CASES)
def test_split_k_compiles_without_spills(layer: str, precision: str):
    assert_fits_on_tensor_cores(compiled_split()[layer, precision], tensor_cores=precision == "bf16")
