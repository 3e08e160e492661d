"""AlexNet's conv1 lowered by space-to-depth (issue 13) compiles for the H100 (sm_90): the transform kernel and the
lowered conv (conv_nhwc.py, 48 channels of 4 x 4 pixel blocks, 3 x 3 taps) at batch 128 and 1, without spills,
within shared memory; the conv on tensor cores (wgmma) in bf16, tf32 and tf32x3, its operands staged with 16-byte
asynchronous copies as conv2..conv5's are. No GPU is needed; run with `-s` for the resource table.
"""

import os
import re
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest
import torch
from test_sm90_conv import identity, meta, specialize

from netdsl.codegen import conv_nhwc
from netdsl.codegen import space_to_depth as transform
from netdsl.codegen.target import SM90_MAX_SHARED_BYTES, CompileRequest, compile_sm90_many, format_table
from netdsl.compiler.space_to_depth import space_to_depth_geometry

pytestmark = pytest.mark.slow

GEOMETRY = space_to_depth_geometry((3, 227, 227), (11, 11), (4, 4), (0, 0, 0, 0))  # -> 48 x 57 x 57, 3 x 3 taps
PRECISIONS = {"bf16": (torch.bfloat16, "ieee"), "tf32": (torch.float32, "tf32"), "tf32x3": (torch.float32, "tf32x3")}
CONV_CASES = [(batch, precision) for batch in (128, 1) for precision in PRECISIONS]
TRANSFORM_CASES = [(batch, dtype) for batch in (128, 1) for dtype in (torch.float32, torch.bfloat16)]


def channels_last(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return meta(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def conv_request(batch: int, precision: str) -> CompileRequest:
    dtype, input_precision = PRECISIONS[precision]
    filters = 48  # one tower
    _, arguments = conv_nhwc.conv2d_nhwc_launch(
        channels_last(batch, *GEOMETRY.shape, dtype=dtype),
        channels_last(filters, GEOMETRY.channels, *GEOMETRY.taps, dtype=dtype),
        meta(filters, dtype=dtype), activation="relu", input_precision=input_precision,
    )  # fmt: skip
    return specialize(conv_nhwc.conv2d_nhwc_kernel, arguments)


def transform_request(batch: int, dtype: torch.dtype) -> CompileRequest:
    _, arguments = transform.space_to_depth_launch(
        meta(batch, 3, 227, 227, dtype=dtype), GEOMETRY.block, GEOMETRY.pad, 1, GEOMETRY.size,
        out=channels_last(batch, *GEOMETRY.shape, dtype=dtype),
    )  # fmt: skip
    return specialize(transform.space_to_depth_kernel, arguments)


@cache
def compiled() -> dict:
    requests = {("conv", *case): conv_request(*case) for case in CONV_CASES}
    requests |= {("transform", *case): transform_request(*case) for case in TRANSFORM_CASES}
    requests = {
        key: CompileRequest(r.kernel, r.signature, r.constexprs, r.num_warps, r.num_stages, sass=True,
                            divisible_by_16=r.divisible_by_16)
        for key, r in requests.items()
    }  # fmt: skip
    unique = list({identity(r): r for r in requests.values()}.values())
    halves = [unique[0::2], unique[1::2]]
    with ThreadPoolExecutor(max_workers=2 if os.environ.get("TRITON_INTERPRET") == "1" else 1) as pool:
        results = [result for half in pool.map(compile_sm90_many, halves) for result in half]
    by_identity = {identity(r): result for r, result in zip(halves[0] + halves[1], results, strict=True)}
    print("\n" + format_table(list(by_identity.values())))
    return {key: by_identity[identity(r)] for key, r in requests.items()}


@pytest.mark.parametrize(("batch", "precision"), CONV_CASES)
def test_lowered_conv1_compiles_on_tensor_cores_with_vector_copies(batch: int, precision: str):
    result = compiled()["conv", batch, precision]
    table = format_table([result])
    assert result.spills == 0 and result.stack_bytes == 0, table
    assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
    assert "wgmma.mma_async" in result.mma, table
    assert len(re.findall(r"LDGSTS\.E\.BYPASS\.128", result.sass)) >= 8, "operands not staged by 16-byte cp.async"


@pytest.mark.parametrize(("batch", "dtype"), TRANSFORM_CASES)
def test_transform_compiles_without_spills(batch: int, dtype: torch.dtype):
    result = compiled()["transform", batch, dtype]
    table = format_table([result])
    assert result.spills == 0 and result.stack_bytes == 0 and result.local_bytes == 0, table
    assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
